"""The child process of one configuration: load, warm up, repeat, measure peak RSS, write the result as JSON.

    python -m benchmarks.worker CONFIG.json RESULT.json

Every configuration runs in a fresh process (benchmarks.__main__ starts this one), so one runtime's arenas, thread
pools and peak RSS never leak into the next one's numbers. Peak RSS is this process's high-water mark (read after
loading and again at the end), or the child's for runtimes that run as a child (llama-bench polls it).
Exit status 0 with {"status": "ok", ...}, or 1 with {"status": "failed", "error": ...}; the parent records both.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path

from benchmarks.harness import NS_PER_MS, aggregate, measure, peak_rss_bytes
from benchmarks.runners import RunConfig, make_runner

logger = logging.getLogger("benchmarks.worker")


def run_config(config: RunConfig) -> dict:
    """Load and measure one configuration in this process; the result dict the parent turns into a record."""
    runner = make_runner(config)
    start = time.perf_counter_ns()
    runner.load()
    load_ms = (time.perf_counter_ns() - start) / NS_PER_MS
    rss_after_load = peak_rss_bytes()
    if hasattr(runner, "run_all"):  # runtimes that repeat by themselves (llama-bench)
        samples, cold = runner.run_all()
    else:
        samples, cold = measure(runner.run_once, config.warmup, config.reps)
    metrics = aggregate(samples, config.prompt_tokens, cold)
    metrics["load_ms"] = load_ms if getattr(runner, "load_is_measured", True) else None
    metrics["peak_rss_after_load_bytes"] = rss_after_load
    metrics["peak_rss_bytes"] = max(peak_rss_bytes(), getattr(runner, "child_peak_rss_bytes", 0))
    metrics["peak_gpu_bytes"] = None  # CPU providers only in this version
    tokens = getattr(runner, "last_tokens", None)
    runner.close()
    return {"status": "ok", "config": config.public(), "info": runner.info, "metrics": metrics, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m benchmarks.worker CONFIG.json RESULT.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = RunConfig.from_dict(json.loads(Path(argv[0]).read_text()))
    try:
        result = run_config(config)
        code = 0
    except Exception as err:  # a runtime that fails is a result too: recorded, and the sweep goes on
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        result = {"status": "failed", "config": config.public(), "error": f"{type(err).__name__}: {first}",
                  "traceback": traceback.format_exc(limit=6)}  # fmt: skip
        code = 1
    Path(argv[1]).write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
