"""Our runtime (runtime.Pipeline) on an export folder: the path a user of this kit runs, through its public API.

    pipe.generate(image, prompt_ids=ids, max_new_tokens=N, min_new_tokens=N)   # greedy, exactly N tokens

The Pipeline times its own phases (preprocess, vision, prefill) and every new token (`timings.token_times`, seconds
from the call's start); they are placed on the harness's clock from the call's start. Text decoding of each token
stays in the loop, as for any user. The decoder's bytes per step are read in a child process before loading: parsing a
graph stored in one protobuf (an int4 Phi-2 decoder is 1.7 GB) would count in this worker's peak RSS.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from benchmarks.bandwidth import kv_bytes
from benchmarks.harness import Clock, Sample
from benchmarks.runners import RunConfig

logger = logging.getLogger(__name__)


class OursRunner:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.pipe = None
        self.info: dict = {}

    def load(self) -> None:
        from runtime import Pipeline
        from runtime.manifest import read_manifest

        c = self.config
        manifest = read_manifest(c.model)  # the manifest only: nothing loaded yet
        weights = decode_bytes_in_child(manifest.path(manifest.graphs["decoder"].file))
        self.pipe = Pipeline.load(
            c.model,
            threads=c.threads,
            memory_budget=c.memory_budget,
            context=c.context,
            vision=c.options.get("vision", "auto"),
            embedding=c.options.get("embedding", "auto"),
            prefill=c.options.get("prefill", "auto"),
        )
        m = self.pipe.manifest
        d = m.decoder
        mean_context = c.prompt_tokens + c.new_tokens / 2
        self.info = {
            "precision": (m.quantization or {}).get("precision", c.precision),
            "quantization": m.quantization,
            "disk_bytes": sum(m.weight_sizes().values()),
            "decode_weights_bytes": weights["weights_bytes"],
            "kv_bytes_mid": kv_bytes(d.num_layers, d.num_heads, d.head_size, mean_context, 4),
            "memory_plan": self.pipe.plan.to_dict(),
            "manifest_sha256": _sha256(Path(c.model) / "manifest.json"),
            "image_size": m.image.size,
            "image_tokens": m.num_image_tokens if c.image else 0,
            "provider": "cpu",
        }

    def run_once(self, clock: Clock) -> Sample:
        c, pipe = self.config, self.pipe
        ids = c.prompt_ids if c.image else c.text_ids
        start = clock()
        result = pipe.generate(c.image, prompt_ids=ids, max_new_tokens=c.new_tokens, min_new_tokens=c.new_tokens)
        end = clock()
        t = result.timings
        if len(result.tokens) != c.new_tokens or len(t.token_times) != c.new_tokens:
            raise RuntimeError(f"ours: {len(result.tokens)} tokens instead of exactly {c.new_tokens}")
        phases = {"prefill": int(t.prefill_s * 1e9)}
        if c.image:
            phases["preprocess"], phases["vision"] = int(t.preprocess_s * 1e9), int(t.vision_s * 1e9)
            if t.vision_load_s:  # vision "release": the graph is loaded for each request
                phases["vision_load"] = int(t.vision_load_s * 1e9)
        self.last_tokens = list(result.tokens)
        return Sample(start, end, [start + int(sec * 1e9) for sec in t.token_times], phases)

    def close(self) -> None:
        self.pipe = None


def decode_bytes_in_child(decoder_file: Path) -> dict:
    """benchmarks.bandwidth.onnx_decode_bytes of `decoder_file`, worked out in a child process (see the docstring)."""
    code = "import json, sys; from benchmarks.bandwidth import onnx_decode_bytes; print(json.dumps(onnx_decode_bytes(sys.argv[1])))"
    out = subprocess.run([sys.executable, "-c", code, str(decoder_file)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
