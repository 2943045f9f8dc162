"""Benchmark records and the report: one JSON record per configuration, a markdown table like llama-bench's, plots.

A record (schema_version 1), as onnxruntime-genai's BenchmarkRecord and llama-bench's JSON:

    {"schema_version": 1, "status": "ok" | "failed" | "skipped", "note": str | None,
     "config":   {runtime, label, model, precision, threads, prompt_tokens, new_tokens, reps, warmup, image, ...},
     "metadata": {git_sha, git_dirty, packages{...}, provider, cpu_model, cpu_count, threads, os, python, load_average,
                  manifest_sha256, time},
     "metrics":  {ttft_ms, prefill_ms, preprocess_ms, vision_ms, decode_tok_s, decode_ms_per_token, e2e_ms,
                  prefill_tok_s: each {n, median, mean, stdev, p50, p90, min, max, values},
                  inter_token_ms {.. p50 p90 ..}, cold, load_ms, peak_rss_bytes, peak_rss_after_load_bytes,
                  peak_gpu_bytes, memory_plan, bandwidth {bytes_per_step, bandwidth_gb_s, limit_tok_s,
                  fraction_of_limit}, samples [per-rep timestamps]},
     "info":     what the runner found out (disk bytes, decode bytes, image tokens, notes),
     "tokens":   the new token ids of the last repetition (runtimes on the same weights should agree)}
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

SCHEMA_VERSION = 1
STAT_METRICS = ("ttft_ms", "prefill_ms", "decode_tok_s", "decode_ms_per_token", "e2e_ms")
STAT_KEYS = ("n", "median", "mean", "stdev", "p50", "p90", "min", "max")
PACKAGES = ("onnxruntime", "onnxruntime-genai", "onnx", "numpy", "torch", "transformers", "tokenizers", "gguf")
REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        unit = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KM")) * unit)
    return max(sizes) if sizes else None


def git_state(repo: Path = REPO) -> tuple[str | None, bool | None]:
    """(HEAD sha, whether tracked files differ from it); (None, None) outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True)  # fmt: skip
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_metadata() -> dict:
    """What the numbers depend on besides the config: code, packages, CPU, OS, and how busy the machine was."""
    sha, dirty = git_state()
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "git_sha": sha, "git_dirty": dirty, "packages": package_versions(), "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(), "last_level_cache_bytes": last_level_cache_bytes(), "os": platform.platform(), "python": platform.python_version(),
        "load_average": load, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip


def build_record(result: dict, machine: dict, bandwidth: dict | None, note: str | None = None) -> dict:
    """A worker's result + machine metadata + the bandwidth limit -> one record (see the module docstring)."""
    config, info = result["config"], result.get("info", {})
    metrics = dict(result.get("metrics") or {})
    status = result.get("status", "ok")
    meta = dict(machine)
    meta.update(provider=info.get("provider", "cpu"), threads=config["threads"],
                manifest_sha256=info.get("manifest_sha256"))  # fmt: skip
    if status == "ok":
        metrics["memory_plan"] = info.get("memory_plan")
        metrics["bandwidth"] = bandwidth_metrics(metrics, info, bandwidth, machine.get("last_level_cache_bytes"))
    notes = [n for n in (note, info.get("note"), result.get("error")) if n]
    return {"schema_version": SCHEMA_VERSION, "status": status, "note": "; ".join(notes) or None,
            "config": config, "metadata": meta, "metrics": metrics, "info": info,
            "tokens": result.get("tokens")}  # fmt: skip


def bandwidth_metrics(metrics: dict, info: dict, bandwidth: dict | None, cache_bytes: int | None = None) -> dict | None:
    """The decode speed as a fraction of bandwidth / (decode weights + KV at the mean context).

    A step whose bytes fit in the last-level cache is not bound by memory bandwidth (the demo model's are): its
    fraction is left out (None) and `in_cache` says why.
    """
    weights = info.get("decode_weights_bytes")
    if bandwidth is None or weights is None:
        return None
    step = weights + info.get("kv_bytes_mid", 0)
    gb_s = bandwidth["best_gb_s"]
    limit = gb_s * 1e9 / step if step else None
    decode = (metrics.get("decode_tok_s") or {}).get("median")
    in_cache = bool(cache_bytes and step <= cache_bytes)
    fraction = decode / limit if decode and limit and not in_cache else None
    return {"bytes_per_step": step, "bandwidth_gb_s": gb_s, "limit_tok_s": limit, "fraction_of_limit": fraction,
            "in_cache": in_cache}  # fmt: skip


def skipped_record(config: dict, machine: dict, reason: str) -> dict:
    return {"schema_version": SCHEMA_VERSION, "status": "skipped", "note": reason, "config": config,
            "metadata": dict(machine, threads=config.get("threads")), "metrics": {}, "info": {}}  # fmt: skip


def validate_record(record: dict) -> list[str]:
    """What is missing or malformed in a record (empty when it follows schema_version 1)."""
    problems = []
    for key in ("schema_version", "status", "config", "metadata", "metrics", "info"):
        if key not in record:
            problems.append(f"missing {key}")
    if problems:
        return problems
    if record["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {record['schema_version']} != {SCHEMA_VERSION}")
    if record["status"] not in ("ok", "failed", "skipped"):
        problems.append(f"status {record['status']!r}")
    for key in ("runtime", "label", "precision", "threads", "prompt_tokens", "new_tokens"):
        if key not in record["config"]:
            problems.append(f"config.{key} missing")
    for key in ("git_sha", "packages", "cpu_model", "threads", "provider"):
        if key not in record["metadata"]:
            problems.append(f"metadata.{key} missing")
    if record["status"] == "ok":
        m = record["metrics"]
        for name in STAT_METRICS:
            stats = m.get(name)
            if not isinstance(stats, dict) or any(k not in stats for k in STAT_KEYS + ("values",)):
                problems.append(f"metrics.{name} lacks statistics")
        for key in ("peak_rss_bytes", "load_ms", "inter_token_ms", "samples", "bandwidth"):
            if key not in m:
                problems.append(f"metrics.{key} missing")
    return problems


def write_records(records: list[dict], out: Path) -> None:
    """records/<n>_<label>.json each, and results.json with all of them."""
    folder = out / "records"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.json"):  # records of an earlier run in the same folder
        stale.unlink()
    for i, record in enumerate(records):
        c = record["config"]
        name = f"{i:03d}_{c['label']}_t{c['threads']}_p{c['prompt_tokens']}".replace(" ", "-").replace("/", "-")
        (folder / f"{name}.json").write_text(json.dumps(record, indent=1))
    (out / "results.json").write_text(json.dumps(records, indent=1))


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _stat(m: dict, name: str, digits: int = 1) -> str:
    s = m.get(name) or {}
    if s.get("median") is None:
        return "-"
    return f"{s['median']:,.{digits}f} ± {s['stdev']:,.{digits}f}"


def _gib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**30:.2f} GiB"


def case_name(config: dict) -> str:
    """llama-bench's naming: pp128+tg64, with img+ in front when an image went through the vision graph."""
    return ("img+" if config.get("image") else "") + f"pp{config['prompt_tokens']}+tg{config['new_tokens']}"


def markdown_table(records: list[dict]) -> str:
    """The main table (medians ± stdev over repetitions), then the time-to-first-token breakdown, then skips."""
    lines = [
        "| runtime | precision | on disk | threads | test | TTFT ms | prefill tok/s | decode tok/s | "
        "ITL p50 / p90 ms | peak RSS | planned peak | of BW limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    breakdown = ["| runtime | threads | test | preprocess ms | vision ms | prefill ms | first sample ms | TTFT ms | "
                 "cold TTFT ms |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    other = []
    for r in records:
        c, m, info = r["config"], r["metrics"], r.get("info", {})
        if r["status"] != "ok":
            other.append(f"- {c['label']} threads {c['threads']} {case_name(c)}: **{r['status']}** ({r.get('note')})")
            continue
        itl = m.get("inter_token_ms") or {}
        bw = m.get("bandwidth") or {}
        frac = bw.get("fraction_of_limit")
        lines.append(
            f"| {c['label']} | {info.get('precision', c['precision'])} | {_gib(info.get('disk_bytes'))} | "
            f"{c['threads']} | {case_name(c)} | {_stat(m, 'ttft_ms')} | {_stat(m, 'prefill_tok_s')} | "
            f"{_stat(m, 'decode_tok_s', 2)} | {_fmt(itl.get('p50'), 2)} / {_fmt(itl.get('p90'), 2)} | "
            f"{_gib(m.get('peak_rss_bytes'))} | {_gib((m.get('memory_plan') or {}).get('peak'))} | "
            f"{'in cache' if bw.get('in_cache') else '-' if frac is None else f'{frac:.2f}'} |"
        )
        med = {k: (m.get(k) or {}).get("median") for k in ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms")}
        rest = (m.get("first_sample_ms") or {}).get("median")
        cold = (m.get("cold") or {}).get("ttft_ms")
        breakdown.append(
            f"| {c['label']} | {c['threads']} | {case_name(c)} | {_fmt(med['preprocess_ms'])} | {_fmt(med['vision_ms'])} "
            f"| {_fmt(med['prefill_ms'])} | {_fmt(rest)} | {_fmt(med['ttft_ms'])} | {_fmt(cold)} |"
        )
    text = "\n".join(lines) + "\n\nTime to first token, by phase (medians):\n\n" + "\n".join(breakdown)
    if other:
        text += "\n\nNot measured:\n\n" + "\n".join(other)
    return text + "\n"


def write_report(records: list[dict], out: Path, title: str, preamble: str = "") -> Path:
    """results.json, records/, report.md and the PNG plots in `out`; returns the report's path."""
    from benchmarks.plots import write_plots

    out.mkdir(parents=True, exist_ok=True)
    write_records(records, out)
    plots = write_plots(records, out)
    machine = next((r["metadata"] for r in records), {})
    head = [f"# {title}", "", preamble.strip(), ""] if preamble.strip() else [f"# {title}", ""]
    head += [
        f"git {machine.get('git_sha')}{' (dirty)' if machine.get('git_dirty') else ''} | CPU {machine.get('cpu_model')} "
        f"x {machine.get('cpu_count')} | load average at start {machine.get('load_average')} | {machine.get('time')}",
        "",
        "Medians ± standard deviation over the repetitions; TTFT = time to first token; ITL = inter-token latency; "
        "decode counts tokens 2..N; 'of BW limit' = decode tok/s / (read bandwidth / bytes per decode step).",
        "",
    ]
    text = "\n".join(head) + markdown_table(records)
    text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n"
    path = out / "report.md"
    path.write_text(text)
    return path
