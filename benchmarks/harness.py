"""The timing harness: repetitions of one request, timestamps turned into phase times, and their statistics.

A runner answers one request per call and returns a `Sample`: the clock at the start and the end, the clock at every
new token chosen, and the durations of the phases it can tell apart (preprocess, vision, prefill). Everything else is
arithmetic done here, once, for every runtime alike (so it is tested with a fake clock):

    ttft       = first token - start            (time to first token: preprocess + vision + prefill + first sample)
    decode     = tokens 2..N: (N - 1) / (last token - first token) tokens/s, as llama-bench's tg and pymllm
    itl        = the gaps between consecutive tokens (inter-token latency), pooled over repetitions for p50/p90
    e2e        = end - start

    samples, cold = measure(runner.run_once, warmup=2, reps=10)      # clock: time.perf_counter_ns by default
    metrics = aggregate(samples, prompt_tokens=128)                     # median, mean, stdev, p50, p90, per-rep values

The first warm-up request is kept apart as the cold request (llama.cpp#27147: the first image request is slower); the
others are discarded; the repetitions that follow are the steady state.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

Clock = Callable[[], int]  # nanoseconds, monotonic
NS_PER_MS = 1_000_000


@dataclass
class Sample:
    """One request: clock readings in ns (any origin; only differences are used) and separately timed phases."""

    start_ns: int
    end_ns: int
    token_ns: list[int]  # the clock when each new token was chosen; [0] is the first token
    phases_ns: dict[str, int] = field(default_factory=dict)  # e.g. preprocess, vision, prefill

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(values: Sequence[float]) -> dict:
    """Statistics of repeated measurements; stdev is the sample standard deviation (n - 1), 0 for one value."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0, "median": None, "mean": None, "stdev": None, "p50": None, "p90": None,
                "min": None, "max": None, "values": []}  # fmt: skip
    n = len(values)
    mean = sum(values) / n
    stdev = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    median = percentile(values, 50)
    return {"n": n, "median": median, "mean": mean, "stdev": stdev, "p50": median, "p90": percentile(values, 90),
            "min": min(values), "max": max(values), "values": values}  # fmt: skip


def rep_metrics(sample: Sample, prompt_tokens: int) -> dict[str, float | None]:
    """One request's numbers in ms (and tokens/s) from its timestamps."""
    if not sample.token_ns:
        raise ValueError("a sample without any new token: the runner must choose at least one")
    tokens = sample.token_ns
    out: dict[str, float | None] = {f"{name}_ms": ns / NS_PER_MS for name, ns in sample.phases_ns.items()}
    out["ttft_ms"] = (tokens[0] - sample.start_ns) / NS_PER_MS
    if sample.phases_ns:  # what the phases do not cover: sampling the first token, glue between the phases
        out["first_sample_ms"] = out["ttft_ms"] - sum(sample.phases_ns.values()) / NS_PER_MS
    out["e2e_ms"] = (sample.end_ns - sample.start_ns) / NS_PER_MS
    out["new_tokens"] = float(len(tokens))
    span = tokens[-1] - tokens[0]
    out["decode_ms_per_token"] = span / (len(tokens) - 1) / NS_PER_MS if len(tokens) > 1 else None
    out["decode_tok_s"] = (len(tokens) - 1) / (span / 1e9) if len(tokens) > 1 and span > 0 else None
    prefill = sample.phases_ns.get("prefill")
    out["prefill_tok_s"] = prompt_tokens / (prefill / 1e9) if prefill else None
    return out


def inter_token_ms(sample: Sample) -> list[float]:
    """Gaps between consecutive new tokens, in ms."""
    t = sample.token_ns
    return [(b - a) / NS_PER_MS for a, b in zip(t, t[1:])]


def aggregate(samples: Sequence[Sample], prompt_tokens: int, cold: Sample | None = None) -> dict:
    """Per-metric statistics over repetitions, pooled inter-token latency, the cold request, and the samples."""
    if not samples:
        raise ValueError("no repetitions to aggregate")
    reps = [rep_metrics(s, prompt_tokens) for s in samples]
    names = sorted({k for r in reps for k in r})
    metrics: dict = {}
    for name in names:
        values = [r[name] for r in reps if r.get(name) is not None]
        metrics[name] = summarize(values)
    metrics["inter_token_ms"] = summarize([gap for s in samples for gap in inter_token_ms(s)])
    metrics["inter_token_ms"].pop("values")  # pooled gaps are many; the per-rep token times are kept in samples
    metrics["cold"] = rep_metrics(cold, prompt_tokens) if cold is not None else None
    metrics["samples"] = [s.to_dict() for s in samples]
    return metrics


def measure(
    run_once: Callable[[Clock], Sample],
    warmup: int,
    reps: int,
    clock: Clock = time.perf_counter_ns,
    on_rep: Callable[[int], None] | None = None,
) -> tuple[list[Sample], Sample | None]:
    """Run `warmup` requests (the first kept as the cold one) and then `reps` measured ones."""
    if warmup < 0 or reps < 1:
        raise ValueError(f"need warmup >= 0 and reps >= 1, got warmup={warmup} reps={reps}")
    cold = None
    for i in range(warmup):
        sample = run_once(clock)
        cold = sample if i == 0 else cold
    samples = []
    for i in range(reps):
        samples.append(run_once(clock))
        if on_rep is not None:
            on_rep(i)
    return samples, cold


def timed(fn: Callable[[], object], clock: Clock = time.perf_counter_ns) -> tuple[object, float]:
    """(fn(), milliseconds it took)."""
    start = clock()
    result = fn()
    return result, (clock() - start) / NS_PER_MS


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Peak resident memory of a process (this one by default), in bytes.

    On Linux, VmHWM of /proc/PID/status: the high-water mark of the process's own address space. getrusage's
    ru_maxrss is not used there because Linux carries it across fork + exec, so a child started from a large parent
    reports at least the parent's size. Elsewhere, ru_maxrss (KiB on Linux, bytes on macOS), as onnxruntime-genai's
    C benchmark reads it.
    """
    status = Path(f"/proc/{pid}/status")
    try:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    if pid != "self":
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
