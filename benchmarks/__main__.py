"""Benchmark an export folder against its baselines: latency by phase, decode speed, memory, bandwidth limit.

    python -m benchmarks --model exports/demo-int4 --out reports/demo
    python -m benchmarks --model exports/demo-int4 --model exports/demo-fp32 --out reports/demo \\
        --baselines torch,ort-genai --threads 1,2 --prompt-tokens 128,256 --new-tokens 64 --reps 10 --warmup 2 --passes 3

Each configuration (runtime x threads x prompt length) runs in a fresh process: load, `--warmup` requests (the first
is reported as the cold one), `--reps` measured requests of exactly `--new-tokens` greedy tokens (no early stop) on the
committed image and question (benchmarks/assets), lengthened to exactly `--prompt-tokens` tokens (image tokens
included). Written to --out: records/*.json (one per configuration), results.json, report.md, PNG plots, worker.log.

Baselines: torch (the PyTorch reference, fp32 and bf16, KV cache), ort-genai (onnxruntime-genai on the same graphs
through the folder's genai_config.json, with the same image features), ort-genai-builder and llama-cpp (these two need stock Phi-2 weights, since neither keeps TinyGPT-V's
q/k LayerNorm: `python -m benchmarks.peers` runs them; here they are recorded as skipped unless --builder-dir /
--gguf point at their models). Numbers from a shared machine drift: compare runtimes within one run (--passes 3
alternates them three times). Exit status 2 with one line on stderr on bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from benchmarks.report import write_report
from benchmarks.runners.torch_ref import torch_source
from benchmarks.sweep import Target, int_list, sweep
from benchmarks.workload import Workload, WorkloadError, prompt_ids, read_export_manifest, text_only

BASELINES = ("torch", "ort-genai", "ort-genai-builder", "llama-cpp")
PEERS_ONLY = "runs on stock Phi-2 weights only (neither keeps TinyGPT-V's q/k LayerNorm): python -m benchmarks.peers"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="export folder (repeat to compare several)")
    p.add_argument("--out", required=True, help="report folder, e.g. reports/demo")
    p.add_argument("--baselines", default="torch,ort-genai", help=f"comma-separated, from {', '.join(BASELINES)}")
    p.add_argument("--threads", type=int_list, default=[2], help="comma-separated intra-op thread counts")
    p.add_argument("--prompt-tokens", type=int_list, default=[128], help="prompt lengths, image tokens included")
    p.add_argument("--new-tokens", type=int, default=64, help="exactly this many greedy tokens per request")
    p.add_argument("--reps", type=int, default=10, help="measured requests per configuration")
    p.add_argument("--warmup", type=int, default=2, help="requests before measuring (the first is the cold one)")
    p.add_argument("--passes", type=int, default=1, help="repeat the sweep, alternating runtimes each time")
    p.add_argument("--request", type=int, default=0, help="which committed image + question (benchmarks/assets)")
    p.add_argument("--text-only", action="store_true", help="no image: every runtime is fed token ids")
    p.add_argument("--memory-budget", default="8GB", help="the runtime's memory plan budget")
    p.add_argument("--context", type=int, help="KV cache length the runtime plans for (default: the model's)")
    p.add_argument("--builder-dir", help="ort-genai-builder: a folder made by onnxruntime-genai's builder")
    p.add_argument("--gguf", help="llama-cpp: a GGUF file (stock Phi-2 weights)")
    p.add_argument("--llama-bench", help="path of llama-bench (default: $LLAMA_BENCH, PATH, or the kit's build)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    args = p.parse_args(argv)
    args.baselines = [b for b in args.baselines.split(",") if b]
    unknown = [b for b in args.baselines if b not in BASELINES]
    if unknown:
        p.error(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    if args.reps < 1 or args.warmup < 0 or args.new_tokens < 1 or args.passes < 1:
        p.error("--reps, --new-tokens and --passes must be >= 1 and --warmup >= 0")
    return args


def build_targets(args: argparse.Namespace, manifests: dict[str, dict]) -> list[Target]:
    targets: list[Target] = []
    several = len(manifests) > 1
    image = not args.text_only
    for folder, manifest in manifests.items():
        precision = (manifest.get("quantization") or {}).get("precision", "fp32")
        name = f"ours {precision}" + (f" ({Path(folder).name})" if several else "")
        context = manifest["decoder"]["context_length"]
        targets.append(Target("ours", folder, name, precision, image=image, context=context))
        if "ort-genai" in args.baselines:
            targets.append(Target("ort-genai", folder, name.replace("ours", "ort-genai"), precision, image=image,
                                  context=context))  # fmt: skip
    first_folder, first = next(iter(manifests.items()))
    context = first["decoder"]["context_length"]
    if "torch" in args.baselines:
        source = torch_source(first)
        for dtype in ("fp32", "bf16"):
            targets.append(Target("torch", first_folder, f"torch {dtype}", dtype, image=image, context=context,
                                  options={"torch_source": source}))  # fmt: skip
    if "ort-genai-builder" in args.baselines:
        skip = None if args.builder_dir else PEERS_ONLY
        targets.append(Target("ort-genai", args.builder_dir or "", "ort-genai builder", "int4", skip=skip))
    if "llama-cpp" in args.baselines:
        skip = None if args.gguf else PEERS_ONLY
        options = {"llama_bench": args.llama_bench} if args.llama_bench else {}
        targets.append(Target("llama-cpp", args.gguf or "", "llama.cpp", "q4_0", skip=skip, options=options))
    return targets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifests = {folder: read_export_manifest(folder) for folder in args.model}
        work = Workload.load()
        if not 0 <= args.request < len(work.requests):
            raise WorkloadError(f"--request {args.request}: there are {len(work.requests)} committed requests")
        request = work.requests[args.request]
        folder, manifest = next(iter(manifests.items()))
        from core.tokenizer import TextTokenizer

        special = manifest["special_tokens"]
        tokenizer = TextTokenizer.from_dir(folder, special["bos"], special["eos"], manifest["image_token_id"])
        filler_ids = tokenizer.encode(" " + work.filler)

        def make_ids(n: int) -> tuple[list[int], list[int]]:
            ids = prompt_ids(tokenizer, manifest["prompt"]["template"], request.question, n, True,
                             manifest["image_token_id"], manifest["num_image_tokens"], work.filler)  # fmt: skip
            return ids, text_only(ids, manifest["image_token_id"], filler_ids)

        for n in args.prompt_tokens:
            make_ids(n)  # a prompt longer than asked fails here, before anything runs
    except (WorkloadError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    targets = build_targets(args, manifests)
    out = Path(args.out)
    records = sweep(targets, args.threads, args.prompt_tokens, args.new_tokens, args.reps, args.warmup, make_ids,
                    str(request.image), out, passes=args.passes, memory_budget=args.memory_budget,
                    run_context=args.context, timeout=args.timeout)  # fmt: skip
    report = write_report(records, out, f"Benchmark: {', '.join(Path(m).name for m in args.model)}")
    print(report.read_text())
    failed = [r for r in records if r["status"] == "failed"]
    print(f"wrote {report} ({len(records)} configurations, {len(failed)} failed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
