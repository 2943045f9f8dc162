"""One decode step of decoder graphs, graph only (no runtime loop around it), alternating, with a per-op profile.

    python -m benchmarks.decode_step reports/peers/models/ours-int4-l32 reports/peers/models/builder-int4-l32 \\
        --past 128 --threads 2 --reps 30 --profile
    python -m benchmarks.decode_step FOLDER... --past 0 --tokens 128      # a prefill of 128 tokens instead

Separates the two things a slow decode can be: the graph (its kernels: unfused attention, Concat of the KV cache,
lm_head precision) and the loop around it (binding, sampling, text). Each argument is an export folder (decoder.onnx,
head size from manifest.json) or a genai folder (genai_config.json names the graph and the head size). Inputs are a
batch of 1, `--tokens` new tokens (default 1: a decode step) after `--past` cached tokens; the graphs run in turn, `--reps` times each, and the medians are printed. With
--profile, onnxruntime's profiler adds the time per operator type per step.
A GQA decoder of ours (export --attention gqa: KV inputs of max_sequence_length slots) runs as the runtime runs it:
each past and its present bound to one buffer of `--slots` slots (default 2,048, the runtime's usual context).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.harness import summarize


def decoder_of(folder: Path) -> tuple[Path, int]:
    """(decoder graph file, head size) of an export folder or a genai folder."""
    if (folder / "manifest.json").is_file():
        manifest = json.loads((folder / "manifest.json").read_text())
        return folder / manifest["graphs"]["decoder"]["file"], manifest["decoder"]["head_size"]
    if (folder / "genai_config.json").is_file():
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        return folder / decoder["filename"], decoder["head_size"]
    raise FileNotFoundError(f"{folder}: neither manifest.json nor genai_config.json")


def shared_buffer(session) -> bool:
    """Whether the graph's KV inputs are one buffer of max_sequence_length slots (our GQA export)."""
    return any(i.name.startswith("past_") and i.shape[2] == "max_sequence_length" for i in session.get_inputs())


def step_feeds(
    session, past: int, head_size: int, seed: int = 0, tokens: int = 1, slots: int = 0
) -> dict[str, np.ndarray]:
    """Inputs of one run over `tokens` new tokens after `past` cached ones, from the graph's own input list; with
    `slots`, KV buffers of that many slots (the first `past` filled) for a shared-buffer graph."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session.get_inputs():
        name = spec.name
        if name == "input_ids":
            feeds[name] = np.ones((1, tokens), dtype=np.int64)
        elif name == "inputs_embeds":
            feeds[name] = rng.standard_normal((1, tokens, spec.shape[2])).astype(np.float32) * 0.02
        elif name == "attention_mask":
            feeds[name] = np.ones((1, past + tokens), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(past, past + tokens, dtype=np.int64)[None]
        elif name.startswith("past_"):
            feeds[name] = np.zeros((1, spec.shape[1], max(slots, past), head_size), dtype=np.float32)
            feeds[name][:, :, :past] = rng.standard_normal((1, spec.shape[1], past, head_size))
        else:
            raise ValueError(f"{name}: an input this tool does not know how to fill")
    return feeds


def open_session(graph: Path, threads: int, profile_dir: str | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / graph.parent.name)
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def op_profile(trace_file: str, steps: int) -> dict[str, float]:
    """Milliseconds per step by operator type from an onnxruntime profile trace."""
    totals: dict[str, float] = defaultdict(float)
    for event in json.loads(Path(trace_file).read_text()):
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[event["args"].get("op_name", "?")] += event["dur"] / 1000 / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def runner(session, feeds: dict[str, np.ndarray]):
    """A function running one step and returning its logits: session.run, or for a shared-buffer graph a binding of
    each past and its present to the same buffer (as runtime.kv_cache does)."""
    if not shared_buffer(session):
        return lambda: session.run(None, feeds)[0]
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_input(name, "cpu", 0, value.dtype, list(value.shape), value.ctypes.data)
    for out in session.get_outputs():
        if out.name.startswith("present"):
            buffer = feeds[out.name.replace("present", "past_key_values", 1)]
            binding.bind_output(out.name, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        else:
            binding.bind_output(out.name, "cpu")

    def run(kept=feeds):  # `kept`: the bound arrays live as long as this function
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]  # the logits, left where onnxruntime put them

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="export folders and/or genai folders")
    parser.add_argument("--past", type=int, default=128, help="cached tokens before the step")
    parser.add_argument("--tokens", type=int, default=1, help="new tokens per run (1: decode step; more: prefill)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="per-operator-type time per step")
    parser.add_argument("--slots", type=int, default=2048, help="KV buffer slots of a shared-buffer (GQA) graph")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for folder in args.folders:
            graph, head_size = decoder_of(Path(folder))
            session = open_session(graph, args.threads, tmp if args.profile else None)
            slots = max(args.slots, args.past + args.tokens) if shared_buffer(session) else 0
            feeds = step_feeds(session, args.past, head_size, tokens=args.tokens, slots=slots)
            run = runner(session, feeds)
            run()  # warm-up
            runs.append((folder, session, run, []))
        for _ in range(args.reps):  # alternate, so drift hits every graph alike
            for _folder, _session, run, times in runs:
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) * 1e3)
        for folder, session, _run, times in runs:
            stats = summarize(times)
            print(f"{folder}: {stats['median']:.2f} ms per run (p90 {stats['p90']:.2f}, min {stats['min']:.2f})")
            if args.profile:
                trace = session.end_profiling()
                for op, ms in list(op_profile(trace, args.reps + 1).items())[:10]:
                    print(f"    {op:<28}{ms:8.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
