"""The report's PNG plots (matplotlib, Agg backend: no display needed).

- ttft_breakdown.png: time to first token per runtime, stacked by phase (preprocess, vision, prefill, first sample)
- decode_vs_context.png: decode tokens/s against prompt length, one line per runtime and thread count, with the
  bandwidth limit of each runtime dashed
- memory_vs_budget.png: measured peak RSS per runtime against the memory plan's peak and the budget
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

PHASES = (("preprocess_ms", "preprocess"), ("vision_ms", "vision"), ("prefill_ms", "prefill"))


def _median(metrics: dict, name: str) -> float | None:
    return (metrics.get(name) or {}).get("median")


def _ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r["status"] == "ok"]


def plot_ttft(records: list[dict], path: Path) -> bool:
    import matplotlib.pyplot as plt

    rows = []
    for r in _ok(records):
        c, m = r["config"], r["metrics"]
        ttft = _median(m, "ttft_ms")
        parts = [_median(m, key) or 0.0 for key, _ in PHASES]
        rest = _median(m, "first_sample_ms")
        rest = max(ttft - sum(parts), 0.0) if rest is None else max(rest, 0.0)
        rows.append((f"{c['label']} t{c['threads']} {'img+' if c.get('image') else ''}pp{c['prompt_tokens']}",
                     parts + [rest]))  # fmt: skip
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.6))
    left = [0.0] * len(rows)
    for i, name in enumerate([n for _, n in PHASES] + ["first sample + overhead"]):
        widths = [parts[i] for _, parts in rows]
        ax.barh([label for label, _ in rows], widths, left=left, label=name)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("time to first token (ms, median)")
    ax.invert_yaxis()
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Time to first token by phase")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_decode(records: list[dict], path: Path) -> bool:
    import matplotlib.pyplot as plt

    lines: dict[tuple[str, int], list[tuple[int, float, float]]] = defaultdict(list)
    limits: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for r in _ok(records):
        c, m = r["config"], r["metrics"]
        stats = m.get("decode_tok_s") or {}
        if stats.get("median") is None:
            continue
        key = (c["label"], c["threads"])
        lines[key].append((c["prompt_tokens"], stats["median"], stats["stdev"] or 0.0))
        bw = m.get("bandwidth") or {}
        if bw.get("limit_tok_s") and not bw.get("in_cache"):
            limits[key].append((c["prompt_tokens"], bw["limit_tok_s"]))
    if not lines:
        return False
    labels = sorted({label for label, _ in lines})
    threads = sorted({t for _, t in lines})
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    markers = "os^Dv<>p"
    fig, ax = plt.subplots(figsize=(8, 5))
    for (label, t), points in sorted(lines.items()):
        colour = colours(labels.index(label) % colours.N)
        xs, ys, es = zip(*sorted(points))
        ax.errorbar(xs, ys, yerr=es, marker=markers[threads.index(t) % len(markers)], capsize=3, color=colour,
                    label=f"{label} t{t}")  # fmt: skip
        if limits.get((label, t)):
            lx, ly = zip(*sorted(limits[(label, t)]))
            ax.plot(lx, ly, linestyle="--", color=colour, alpha=0.5)
    ax.set_xlabel("prompt tokens (context before decoding)")
    ax.set_ylabel("decode tokens/s (median ± sd)")
    ax.set_title("Decode speed vs context (dashed: that runtime's bandwidth limit)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_memory(records: list[dict], path: Path) -> bool:
    import matplotlib.pyplot as plt

    peaks: dict[str, float] = {}
    planned: dict[str, float] = {}
    budget = None
    for r in _ok(records):
        c, m = r["config"], r["metrics"]
        key = c["label"]
        peaks[key] = max(peaks.get(key, 0.0), (m.get("peak_rss_bytes") or 0) / 2**30)
        plan = m.get("memory_plan")
        if plan:
            planned[key] = max(planned.get(key, 0.0), plan["peak"] / 2**30)
            budget = plan["budget"] / 2**30
    if not peaks:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(peaks) + 1.8))
    names = sorted(peaks)
    ax.barh(names, [peaks[n] for n in names], label="measured peak RSS")
    if planned:
        ax.scatter([planned.get(n, float("nan")) for n in names], names, marker="D", color="black", zorder=3,
                   label="memory plan's peak")  # fmt: skip
    if budget:
        ax.axvline(budget, color="red", linestyle="--", label=f"budget {budget:.1f} GiB")
    ax.set_xlabel("GiB")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.set_title("Peak memory vs budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(records: list[dict], out: Path) -> list[Path]:
    """Every plot that has data; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for name, plot in (("ttft_breakdown", plot_ttft), ("decode_vs_context", plot_decode),
                       ("memory_vs_budget", plot_memory)):  # fmt: skip
        path = out / f"{name}.png"
        if plot(records, path):
            written.append(path)
    return written
