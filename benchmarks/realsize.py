"""The memory proof at full context: each export folder in a fresh process, its peak RSS against the plan and budget.

    python -m export.onnx --preset tinygptv --random-init --precision int4 --quant rtn --vision-precision int8 \\
        --out /work/big/tinygptv-int4-rtn-v8
    # 448 px in two processes: in one, the traced model and the int8 quantizer together passed 23 GB (killed)
    python -m export.onnx --preset tinygptv --random-init --precision fp32 --no-validate --image-size 448 \
        --out /work/big/tinygptv-fp32-graphs-448
    python -m export.onnx ... --image-size 448 --graphs-from /work/big/tinygptv-fp32-graphs-448 \
        --out /work/big/tinygptv-int4-rtn-v8-448
    python -m benchmarks.realsize --model /work/big/tinygptv-int4-rtn-v8 --model /work/big/tinygptv-int4-rtn-v8-448 \\
        --out reports/realsize --context 2048 --new-tokens 64 --budget 8GB --goal 4GB
    # with the int8 prefill graph (export.onnx --prefill-graph int8; at 448 px it takes --graphs-from as above):
    python -m benchmarks.realsize --model DIR --out reports/realsize-p8 --vision release --prefill graph   # or decoder

Per folder, one configuration of benchmarks.sweep (a fresh `benchmarks.worker` process: load, `--warmup` requests,
`--reps` measured ones): the committed image and question, lengthened with the committed filler to exactly
`--context` - `--new-tokens` prompt tokens (32 image tokens included), then exactly `--new-tokens` greedy tokens, so the
KV cache is planned for and filled to the whole context. Peak RSS is the worker's VmHWM (the high-water mark of the
process: load, vision, full-context prefill, decode). The runtime plans memory with `--plan-budget` (default:
`--budget`) and refuses to load when its plan is over it: that refusal is the result then (raise `--plan-budget` to
measure anyway). Written to --out: results.json, records/, report.md (the benchmark table plus the memory table: plan
by term, measured peak, budget and goal) and plots. Exit status 2 with one line on stderr on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from benchmarks.report import write_report
from benchmarks.sweep import Target, sweep
from benchmarks.workload import Workload, WorkloadError, prompt_ids, read_export_manifest, text_only
from runtime.budget import EMBEDDING_MODES, PREFILL_MODES, VISION_MODES, format_bytes, parse_bytes
from runtime.errors import RuntimeInputError

PLAN_TERMS = (
    "weights",
    "prepacked",
    "prefill_graph",
    "load_transient",
    "kv_cache",
    "activations",
    "arena",
    "table",
    "vision_phase",
    "runtime",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.realsize", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="export folder (repeat: one per image size)")
    p.add_argument("--out", required=True, help="report folder, e.g. reports/realsize")
    p.add_argument("--context", type=int, default=2048, help="KV cache length, filled by prompt + new tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens after the prompt (no early stop)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads")
    p.add_argument("--reps", type=int, default=1, help="measured requests")
    p.add_argument("--warmup", type=int, default=0, help="requests before measuring (the first is the cold one)")
    p.add_argument("--budget", default="8GB", help="the device's memory budget the peak is compared with")
    p.add_argument("--goal", default="4GB", help="the peak this kit aims for")
    p.add_argument("--plan-budget", help="budget the runtime plans with (default: --budget; raise it to measure)")
    p.add_argument("--request", type=int, default=0, help="which committed image + question (benchmarks/assets)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per folder")
    p.add_argument("--vision", default="auto", choices=VISION_MODES, help="the runtime's vision mode (runtime.budget)")
    p.add_argument("--embedding", default="auto", choices=EMBEDDING_MODES, help="the runtime's embedding mode")
    p.add_argument("--prefill", default="auto", choices=PREFILL_MODES, help="the runtime's prefill mode (the "
                   "folder's int8 prefill graph or the decoder)")  # fmt: skip
    args = p.parse_args(argv)
    if args.context < 2 or args.new_tokens < 1 or args.new_tokens >= args.context or args.threads < 1:
        p.error("need --context >= 2, 1 <= --new-tokens < --context and --threads >= 1")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    try:
        args.budget_bytes, args.goal_bytes = parse_bytes(args.budget), parse_bytes(args.goal)
        parse_bytes(args.plan_budget or args.budget)
    except RuntimeInputError as err:
        p.error(str(err))
    return args


def fill_ids(folder: str, manifest: dict, question: str, prompt_tokens: int, filler: str) -> tuple[list, list]:
    """(prompt ids with the image ids in place, the same length text-only) of exactly `prompt_tokens` tokens."""
    from core.tokenizer import TextTokenizer

    special = manifest["special_tokens"]
    tokenizer = TextTokenizer.from_dir(folder, special["bos"], special["eos"], manifest["image_token_id"])
    ids = prompt_ids(tokenizer, manifest["prompt"]["template"], question, prompt_tokens, True,
                     manifest["image_token_id"], manifest["num_image_tokens"], filler)  # fmt: skip
    return ids, text_only(ids, manifest["image_token_id"], tokenizer.encode(" " + filler))


def _gib(n: int | None) -> str:
    return "-" if n is None else format_bytes(n)


def _verdict(peak: int | None, limit: int) -> str:
    if peak is None:
        return "-"
    return f"{'within' if peak <= limit else 'OVER'} ({peak / limit:.0%})"


def plan_for(
    folder: str, context: int, budget: str, vision: str = "auto", embedding: str = "auto", prefill: str = "auto"
) -> dict:
    """The runtime's memory plan for `folder` at `context`, worked out from its manifest (nothing is loaded)."""
    from runtime.budget import plan_memory
    from runtime.manifest import read_manifest

    plan = plan_memory(
        read_manifest(folder), context, budget=budget, vision=vision, embedding=embedding, prefill=prefill
    )
    return plan.to_dict()


def memory_rows(records: list[dict], manifests: dict[str, dict], budget: int, goal: int) -> list[dict]:
    """Per folder: sizes on disk, the plan by term, the measured peaks, and the verdicts against budget and goal.

    The plan is the worker's (as the runtime made it when loading), else the one worked out here (a refused load).
    """
    rows = []
    for record in records:
        c, m, info = record["config"], record["metrics"], record.get("info", {})
        manifest = manifests[c["model"]]
        sizes = manifest.get("sizes", {})
        quant = manifest.get("quantization") or {}
        plan = m.get("memory_plan") or info.get("memory_plan") or record.get("plan") or {}
        peak = m.get("peak_rss_bytes") if record["status"] == "ok" else None
        load = m.get("load_ms")
        rows.append({
            "folder": Path(c["model"]).name, "status": record["status"], "note": record.get("note"),
            "image_size": manifest["image"]["size"], "vision": quant.get("vision"),
            "decoder": (quant.get("decoder") or {}).get("method"),
            "sizes": {k: sizes.get(f"{k}_bytes") for k in ("folder", "vision", "embedding", "decoder")},
            "context": c.get("context"), "prompt_tokens": c["prompt_tokens"], "new_tokens": c["new_tokens"],
            "plan": {k: plan.get(k) for k in (*PLAN_TERMS, "peak", "budget", "vision", "embedding", "prefill")},
            "peak_rss_bytes": peak, "peak_rss_after_load_bytes": m.get("peak_rss_after_load_bytes"),
            "load_s": None if load is None else load / 1e3,
            "vision_load_s": ((m.get("vision_load_ms") or {}).get("median") or 0) / 1e3,
            "peak_within_plan": None if peak is None or not plan else peak <= plan["peak"],
            "budget_bytes": budget, "goal_bytes": goal, "within_budget": None if peak is None else peak <= budget,
            "within_goal": None if peak is None else peak <= goal,
        })  # fmt: skip
    return rows


def memory_table(rows: list[dict]) -> str:
    """The memory proof as markdown: measured peak vs plan vs budget and goal, then the plan by term."""
    if not rows:
        return ""
    budget, goal = rows[0]["budget_bytes"], rows[0]["goal_bytes"]
    lines = [
        f"| folder | image px | vision | test | on disk (vision / embedding / decoder) | load s | vision reload s | "
        f"planned peak | peak RSS (VmHWM) | peak while loading | vs budget {_gib(budget)} | vs goal {_gib(goal)} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    terms = ["| folder | vision / embedding / prompts | " + " | ".join(t.replace("_", " ") for t in PLAN_TERMS) +
             " | planned peak |", "|---|---|" + "---|" * (len(PLAN_TERMS) + 1)]  # fmt: skip
    for r in rows:
        s, plan = r["sizes"], r["plan"]
        test = f"img+pp{r['prompt_tokens']}+tg{r['new_tokens']} (context {r['context']})"
        load = "-" if r["load_s"] is None else f"{r['load_s']:.1f}"
        lines.append(
            f"| {r['folder']} | {r['image_size']} | {r['vision']} | {test} | {_gib(s['folder'])} ({_gib(s['vision'])}"
            f" / {_gib(s['embedding'])} / {_gib(s['decoder'])}) | {load} | {r.get('vision_load_s') or 0:.1f} | "
            f"{_gib(plan.get('peak'))} | "
            f"{_gib(r['peak_rss_bytes'])} | {_gib(r['peak_rss_after_load_bytes'])} | "
            f"{_verdict(r['peak_rss_bytes'], budget)} | {_verdict(r['peak_rss_bytes'], goal)} |"
        )
        modes = (
            f"{plan.get('vision') or 'keep'} / {plan.get('embedding') or 'graph'} / {plan.get('prefill') or 'decoder'}"
        )
        terms.append(f"| {r['folder']} | {modes} | " + " | ".join(_gib(plan.get(t)) for t in PLAN_TERMS) +
                     f" | {_gib(plan.get('peak'))} |")  # fmt: skip
    text = "\n".join(lines) + "\n\nThe memory plan by term (runtime.budget):\n\n" + "\n".join(terms) + "\n"
    failed = [f"- {r['folder']}: **{r['status']}** ({r['note']})" for r in rows if r["status"] != "ok"]
    return text + ("\nNot measured:\n\n" + "\n".join(failed) + "\n" if failed else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prompt_tokens = args.context - args.new_tokens
    try:
        manifests = {folder: read_export_manifest(folder) for folder in args.model}
        work = Workload.load()
        if not 0 <= args.request < len(work.requests):
            raise WorkloadError(f"--request {args.request}: there are {len(work.requests)} committed requests")
        request = work.requests[args.request]
        ids = {f: fill_ids(f, m, request.question, prompt_tokens, work.filler) for f, m in manifests.items()}
        for folder, manifest in manifests.items():
            if args.context > manifest["decoder"]["context_length"]:
                raise WorkloadError(f"--context {args.context} > {folder}'s {manifest['decoder']['context_length']}")
    except (WorkloadError, ValueError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    records = []
    for folder, manifest in manifests.items():
        precision = (manifest.get("quantization") or {}).get("precision", "fp32")
        label = f"ours {precision} {manifest['image']['size']}px"
        target = Target("ours", folder, label, precision, image=True, context=args.context,
                        options={"vision": args.vision, "embedding": args.embedding,
                                 "prefill": args.prefill})  # fmt: skip
        records += sweep([target], [args.threads], [prompt_tokens], args.new_tokens, args.reps, args.warmup,
                         lambda n, f=folder: ids[f], str(request.image), out / "runs" / Path(folder).name,
                         memory_budget=args.plan_budget or args.budget, run_context=args.context,
                         timeout=args.timeout)  # fmt: skip
        records[-1]["plan"] = plan_for(folder, args.context, args.plan_budget or args.budget, args.vision,
                                       args.embedding, args.prefill)  # fmt: skip
    rows = memory_rows(records, manifests, args.budget_bytes, args.goal_bytes)
    preamble = (
        f"Context {args.context:,}: prompt {prompt_tokens:,} tokens (32 image tokens included) + {args.new_tokens} "
        f"new tokens, {args.threads} threads, one fresh process per folder. Peak RSS is the worker's VmHWM.\n\n"
        + memory_table(rows)
    )
    report = write_report(records, out, f"Memory at context {args.context:,}: {', '.join(manifests)}", preamble)
    (out / "memory.json").write_text(json.dumps(rows, indent=1))
    print(report.read_text())
    failed = [r for r in records if r["status"] != "ok"]
    print(f"wrote {report} ({len(records)} folders, {len(failed)} not measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
