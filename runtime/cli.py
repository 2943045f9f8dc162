"""Command line of the runtime: one question, an interactive chat, or a batch file, against an export folder.

    python -m runtime --model exports/demo-int4 --image photo.jpg --prompt "[vqa] What color is the circle?"
    python -m runtime --model exports/demo-int4 --image photo.jpg --prompt "[refer] the red circle" --draw out.png
    python -m runtime --model exports/demo-int4 --image photo.jpg --chat          # /image PATH, /reset, /quit
    python -m runtime --model exports/demo-int4 --batch requests.jsonl --out answers.jsonl --batch-size 4
    python -m runtime --model exports/demo-int4 --plan --context 256 --memory-budget 2GB

The answer streams to stdout; `--timings` adds preprocess, vision, prefill, time to first token, decode tokens/s and
peak memory on stderr; `--json` prints one JSON object instead (text, tokens, parsed boxes, timings). Bad input (a
missing folder or image, a tampered file, a prompt longer than the context, ...) gets one line on stderr and exit
status 2. In a chat, Ctrl-C stops the answer, not the program. Batch requests are JSON lines
{"image": PATH or null, "prompt": TEXT, "id": ANY, "draw": OUT.png, "expected": TEXT}; relative paths are read from
the request file's folder; each request that fails gets {"error": ...} in the output and a line on stderr, the others
are answered; with --out, a table of questions, answers, expected answers (matched or not) and timings is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

from core.image import load_image
from runtime.budget import EMBEDDING_MODES, PREFILL_MODES, VISION_MODES, plan_memory
from runtime.errors import INPUT_ERRORS, RuntimeInputError
from runtime.generate import GenerationResult
from runtime.manifest import read_manifest

logger = logging.getLogger("runtime")


class UsageError(RuntimeInputError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, as every other bad input
        self.exit(2, f"error: {message} (see python -m runtime --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m runtime", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="export folder (manifest.json + vision/embedding/decoder.onnx)")
    p.add_argument("--image", help="image file (any format Pillow reads; converted to RGB)")
    p.add_argument("--prompt", help='the question, task tag first: "[vqa] What color is the circle?"')
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true", help="interactive multi-turn chat (/image PATH, /reset, /quit)")
    mode.add_argument("--batch", metavar="REQUESTS.jsonl", help="answer every line of a JSONL request file")
    mode.add_argument("--plan", action="store_true", help="print the memory plan and exit without loading")
    p.add_argument("--out", metavar="ANSWERS.jsonl", help="with --batch: write answers here (default stdout)")
    p.add_argument("--batch-size", type=int, default=1, help="rows decoded together with --batch (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, boxes, timings")
    p.add_argument("--timings", action="store_true", help="print timings and peak memory to stderr")
    p.add_argument("--draw", metavar="OUT.png", help="draw the boxes of the answer on the image and save it")
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=128, help="default 128")
    g.add_argument("--min-new-tokens", type=int, default=0, help="no EOS or stop string before this many (default 0)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="1 = off (default)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off (default)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible answers)")
    g.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable)")
    r = p.add_argument_group("resources")
    r.add_argument("--provider", default="cpu", help="cpu (default) or cuda")
    r.add_argument("--threads", type=int, default=None, help="threads per graph (default: one per physical core)")
    r.add_argument("--no-spin", action="store_true",
                   help="let onnxruntime's threads sleep between ops instead of spinning (for a machine shared with "
                   "other work; spinning is faster on a quiet one)")  # fmt: skip
    r.add_argument("--memory-budget", default="8GB", help="refuse to load above this (default 8GB; binary units)")
    r.add_argument("--context", type=int, default=None, help="KV cache length (default: the model's)")
    r.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the files (trusted folders)")
    r.add_argument("--vision", default="auto", choices=VISION_MODES,
                   help="keep: the vision graph stays loaded; release: loaded per image and released before the "
                   "prompt runs (less memory, a reload per image); auto (default): keep if the plan fits the budget")  # fmt: skip
    r.add_argument("--embedding", default="auto", choices=EMBEDDING_MODES,
                   help="table: gather from the folder's memory-mapped embedding table; graph: the embedding graph; "
                   "auto (default): the table when the folder has one")  # fmt: skip
    r.add_argument("--prefill", default="auto", choices=PREFILL_MODES,
                   help="graph: run prompts through the folder's int8 prefill graph (export --prefill-graph int8; "
                   "faster prompts, its weights in memory too); decoder: through the decoder; auto (default): the "
                   "graph when the folder has one and the plan fits the budget")  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be refused before reading any file."""
    if args.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        raise UsageError(
            f"--min-new-tokens must be in 0..--max-new-tokens {args.max_new_tokens}, got {args.min_new_tokens}"
        )
    if args.threads is not None and args.threads <= 0:
        raise UsageError(f"--threads must be positive, got {args.threads}")
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.context is not None and args.context <= 0:
        raise UsageError(f"--context must be positive, got {args.context}")
    if not (args.chat or args.batch or args.plan) and args.prompt is None:
        raise UsageError("--prompt is required (or use --chat, --batch or --plan)")
    if args.out and not args.batch:
        raise UsageError("--out goes with --batch; a single answer goes to stdout")
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise UsageError(f"--out {args.out}: the folder {Path(args.out).parent} does not exist")
    if args.draw:
        if args.chat or args.batch:
            raise UsageError('--draw is for a single question; in a batch give each request a "draw" path')
        if not args.image:
            raise UsageError("--draw needs --image to draw on")
        if not Path(args.draw).resolve().parent.is_dir():
            raise UsageError(f"--draw {args.draw}: the folder {Path(args.draw).parent} does not exist")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.min_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
    }


def draw_answer(image: Any, result: GenerationResult, path: str | Path) -> int:
    """Draw the answer's boxes (grounded phrases labelled) on `image`, save to `path`; returns how many were drawn."""
    from core.boxes import draw_boxes

    items = [(phrase, box) for phrase, boxes in result.grounded for box in boxes]
    if not items:
        items = [(None, box) for box in result.boxes]
    if items:
        draw_boxes(image, items).save(path)
    return len(items)


def print_timings(result: GenerationResult) -> None:
    print(f"[{result.prompt_tokens} prompt tokens, {len(result.tokens)} new, {result.stop_reason}] "
          f"{result.timings.describe()}", file=sys.stderr)  # fmt: skip


def write_stream(stream: Any, quiet: bool) -> bool:
    """Write a stream's pieces to stdout as they come (unless quiet). False if Ctrl-C stopped it (the stream is closed)."""
    pieces = iter(stream)
    try:
        for piece in pieces:
            if not quiet:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        pieces.close()
        return False
    return True


def run_single(pipe: Any, args: argparse.Namespace, image: Any) -> int:
    stream = pipe.stream(image, args.prompt, **sampling_kwargs(args))
    if not write_stream(stream, quiet=args.json):
        print("\n[stopped]", file=sys.stderr)
        return 130
    result = stream.result
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    if args.timings:
        print_timings(result)
    if args.draw:
        drawn = draw_answer(image, result, args.draw)
        print(f"drew {drawn} box(es) to {args.draw}" if drawn else "no boxes in the answer; nothing drawn",
              file=sys.stderr)  # fmt: skip
    return 0


def run_plan(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.model)
    plan = plan_memory(manifest, args.context, args.batch_size, args.memory_budget, args.provider,
                       vision=args.vision, embedding=args.embedding, prefill=args.prefill)  # fmt: skip
    if args.json:
        print(json.dumps(plan.to_dict()))
    else:
        quant = manifest.quantization.get("precision") or manifest.quantization.get("method") or "?"
        print(f"{args.model}: {manifest.decoder.num_layers} layers x {manifest.decoder.hidden_size}, {quant}")
        print(plan.describe())
    plan.check()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        check_args(args)
        if args.plan:
            return run_plan(args)
        manifest = read_manifest(args.model)
        image = load_image(args.image, max_pixels=manifest.image.max_pixels) if args.image else None
        if args.batch:
            from runtime.cli_batch import read_requests

            requests = read_requests(args.batch)  # the request file is read before the model loads
        from runtime.pipeline import Pipeline

        pipe = Pipeline.load(
            args.model, provider=args.provider, threads=args.threads, memory_budget=args.memory_budget,
            context=args.context, batch_size=args.batch_size, verify=not args.no_verify, vision=args.vision,
            embedding=args.embedding, spin=not args.no_spin, prefill=args.prefill,
        )  # fmt: skip
        if args.chat:
            from runtime.cli_chat import run_chat

            return run_chat(pipe, args, image)
        if args.batch:
            from runtime.cli_batch import run_batch

            return run_batch(pipe, args, requests)
        return run_single(pipe, args, image)
    except INPUT_ERRORS as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
