"""The memory-bandwidth limit of decoding: this machine's read bandwidth / the bytes one decode step must read.

A decode step of batch 1 reads every weight of the decoder once (all MatMuls and norms, the LM head included; of the
token-embedding table only one row, so it is left out) plus the whole KV cache so far. No runtime can decode faster
than bandwidth / those bytes, so each runtime's decode tokens/s is reported as a fraction of that limit.

Read bandwidth: the largest-value reduction (`numpy.max`, SIMD, no pairwise summation) over a float32 array far larger
than the last-level cache, one slice per thread (numpy releases the GIL inside the reduction); median and best of
several repetitions. On a shared 2-core machine the best repetition is the closest to what the hardware can do.

    python -m benchmarks.bandwidth --threads 1,2 --mib 512
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.harness import summarize

# onnx tensor element type -> bytes per element (int4/uint4 are half a byte)
_ONNX_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 21: 0.5, 22: 0.5}


def read_bandwidth(threads: int = 1, mib: int = 512, reps: int = 7, min_seconds: float = 2.0) -> dict:
    """Measured read bandwidth in GB/s (1e9 bytes/s) with `threads` threads over a `mib` MiB array: at least `reps`
    reads and `min_seconds` of them, the best one counting as the machine's limit. The time window matters: the sweep
    measures right after a worker exits, and a worker that held 16 GB (transformers bf16) leaves the kernel freeing
    its pages for a moment; 7 reads (0.2 s) then measured 15.4 GB/s on a 28 GB/s box (2026-12-02)."""
    data = np.ones(mib * (1 << 20) // 4, dtype=np.float32)  # touched once by the fill, so no page faults below
    parts = np.array_split(data, threads)
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, parts))  # warm-up
        until = time.perf_counter() + min_seconds
        while len(rates) < reps or time.perf_counter() < until:
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            rates.append(data.nbytes / (time.perf_counter() - start) / 1e9)
    stats = summarize(rates)
    return {"threads": threads, "bytes": int(data.nbytes), "kernel": "numpy.max float32, one slice per thread",
            "gb_s": stats, "best_gb_s": stats["max"]}  # fmt: skip


def onnx_decode_bytes(path: str | Path) -> dict:
    """Bytes of a decoder graph's weights that one decode step reads (initializers, minus tables only Gathered).

    Reads the graph without its external data: sizes come from the initializers' dims and types.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    used_elsewhere = {i for n in graph.node if n.op_type != "Gather" for i in n.input}
    total = skipped = 0
    for init in graph.initializer:
        count = int(np.prod(init.dims)) if init.dims else 1
        size = int(count * _ONNX_BYTES.get(init.data_type, 4))
        if init.name in gathered and init.name not in used_elsewhere:
            skipped += size
        else:
            total += size
    return {"weights_bytes": total, "gathered_tables_bytes": skipped}


def gguf_decode_bytes(path: str | Path) -> dict:
    """Bytes of a GGUF model's tensors one decode step reads (all but the token-embedding table)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    total = skipped = 0
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            skipped += int(tensor.n_bytes)
        else:
            total += int(tensor.n_bytes)
    return {"weights_bytes": total, "gathered_tables_bytes": skipped}


def kv_bytes(layers: int, kv_heads: int, head_size: int, tokens: float, element_bytes: int) -> int:
    """Bytes of keys and values for `tokens` positions."""
    return int(2 * layers * kv_heads * head_size * tokens * element_bytes)


def decode_limit(weights_bytes: int, kv_bytes_mid: int, bandwidth_gb_s: float) -> dict:
    """Tokens/s the bandwidth allows when each step reads the weights and the KV cache (at its mean length)."""
    step = weights_bytes + kv_bytes_mid
    return {"bytes_per_step": step, "bandwidth_gb_s": bandwidth_gb_s,
            "limit_tok_s": bandwidth_gb_s * 1e9 / step if step else None}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bandwidth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--mib", type=int, default=512, help="array size in MiB (well above the last-level cache)")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    for threads in [int(t) for t in args.threads.split(",")]:
        result = read_bandwidth(threads, args.mib, args.reps)
        result["gb_s"].pop("values")
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
