"""The sweep: every target x thread count x prompt length, each in a fresh process, runtimes alternating.

On a shared machine the speed drifts by a third between minutes, so the order matters more than the count: within one
(threads, prompt length) cell every runtime runs once before the next cell starts, and `passes` > 1 repeats the whole
sweep, so a comparison is always between neighbours in time. The read bandwidth is measured at the start of every pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bandwidth import read_bandwidth
from benchmarks.report import build_record, machine_metadata, skipped_record
from benchmarks.runners import RunConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One runtime on one model, as the report names it."""

    runtime: str
    model: str
    label: str
    precision: str
    image: bool = False  # runs with an image through the vision graph (ours, torch); others are fed token ids
    context: int | None = None  # the model's context: longer prompt + new tokens are skipped
    options: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None  # a reason to record instead of running (baseline not available)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def run_in_child(config: RunConfig, log: Path, timeout: float) -> dict:
    """Run one configuration in `python -m benchmarks.worker`; the worker's result, or a failed one."""
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        spec, result = Path(tmp) / "config.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps(config.to_dict()))
        with log.open("a") as err:
            err.write(f"\n=== {config.label} threads={config.threads} prompt={config.prompt_tokens}\n")
            err.flush()
            try:
                subprocess.run([sys.executable, "-m", "benchmarks.worker", str(spec), str(result)],
                               stdout=err, stderr=err, timeout=timeout, check=False)  # fmt: skip
            except subprocess.TimeoutExpired:
                return {"status": "failed", "config": config.public(), "error": f"timed out after {timeout:.0f} s"}
        if not result.is_file():
            return {"status": "failed", "config": config.public(), "error": f"the worker died; see {log}"}
        return json.loads(result.read_text())


def sweep(
    targets: list[Target],
    threads: list[int],
    prompt_tokens: list[int],
    new_tokens: int,
    reps: int,
    warmup: int,
    make_ids: Callable[[int], tuple[list[int], list[int]]],
    image: str | None,
    out: Path,
    passes: int = 1,
    memory_budget: str = "8GB",
    run_context: int | None = None,
    bandwidth_mib: int = 512,
    timeout: float = 1800,
    progress: bool = True,
) -> list[dict]:
    """All records of the sweep (ok, failed and skipped alike), in the order they ran."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    log = out / "worker.log"
    machine = machine_metadata()
    cells = [(p, t, n) for p in range(passes) for t in threads for n in prompt_tokens]
    bar = tqdm(total=len(cells) * len(targets), desc="benchmark", disable=not (progress and sys.stderr.isatty()))
    records: list[dict] = []
    bandwidth: dict[tuple[int, int], dict] = {}
    for pass_index, n_threads, n_prompt in cells:
        if (pass_index, n_threads) not in bandwidth:
            bandwidth[(pass_index, n_threads)] = read_bandwidth(n_threads, bandwidth_mib)
            logger.info("read bandwidth, %d threads: %.1f GB/s (best)", n_threads,
                        bandwidth[(pass_index, n_threads)]["best_gb_s"])  # fmt: skip
        ids, text_ids = make_ids(n_prompt)
        for target in targets:
            config = RunConfig(
                runtime=target.runtime, model=target.model, label=target.label, precision=target.precision,
                threads=n_threads, prompt_tokens=n_prompt, new_tokens=new_tokens, reps=reps, warmup=warmup,
                image=image if target.image else None, prompt_ids=ids, text_ids=text_ids,
                context=run_context, memory_budget=memory_budget, options=dict(target.options, bench_pass=pass_index),
            )  # fmt: skip
            bar.set_postfix_str(f"{target.label} t{n_threads} pp{n_prompt}")
            if target.skip:
                records.append(skipped_record(config.public(), machine, target.skip))
            elif target.context and n_prompt + new_tokens > target.context:
                reason = f"prompt {n_prompt} + {new_tokens} new tokens > context {target.context}"
                records.append(skipped_record(config.public(), machine, reason))
            else:
                result = run_in_child(config, log, timeout)
                bw = bandwidth[(pass_index, n_threads)]
                records.append(build_record(result, dict(machine, bandwidth=_brief(bw)), bw))
                if result["status"] != "ok":
                    logger.warning("%s threads %d prompt %d failed: %s", target.label, n_threads, n_prompt,
                                   result.get("error"))  # fmt: skip
            bar.update(1)
    bar.close()
    return records


def _brief(bandwidth: dict) -> dict:
    return {"threads": bandwidth["threads"], "best_gb_s": bandwidth["best_gb_s"],
            "median_gb_s": bandwidth["gb_s"]["median"], "kernel": bandwidth["kernel"]}  # fmt: skip
