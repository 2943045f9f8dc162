"""Our runtime (runtime.Pipeline) on an export folder: the path a user of this kit runs.

Exactly `new_tokens` greedy tokens, no early stop: the Pipeline always stops at EOS and the manifest's stop strings,
so this runner drives the same decode loop the Pipeline uses (`runtime.generate.run_tokens` on `pipe.loop`) with no
stop ids and a text stream without stop strings, timestamping each token as the loop yields it (see
notes/requests_bench.md: a `min_new_tokens` option and per-token times on the Pipeline would make this a plain call).
Text decoding of each token (the TextStream) stays in the loop, as in the Pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path

from benchmarks.bandwidth import kv_bytes, onnx_decode_bytes
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

        c = self.config
        self.pipe = Pipeline.load(c.model, threads=c.threads, memory_budget=c.memory_budget, context=c.context)
        m = self.pipe.manifest
        d = m.decoder
        decoder_file = Path(c.model) / m.graphs["decoder"].file
        weights = onnx_decode_bytes(decoder_file)
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
        from runtime.generate import RunState, TextStream, run_tokens
        from runtime.sampling import Sampler, SamplingParams

        c, pipe = self.config, self.pipe
        m = pipe.manifest
        start = clock()
        phases: dict[str, int] = {}
        features = None
        if c.image:
            features, pre_s, vision_s = pipe.encode_images([c.image])  # [1, N, D]
            phases["preprocess"], phases["vision"] = int(pre_s * 1e9), int(vision_s * 1e9)
        ids = c.prompt_ids if c.image else c.text_ids
        sampler = Sampler(SamplingParams(), m.decoder.vocab_size, banned_ids=(m.image_token_id,))
        stream = TextStream(pipe.tokenizer, ())
        state = RunState(rows=1)
        tokens: list[int] = []
        for _pieces in run_tokens(
            pipe.loop, [ids], features, sampler, c.new_tokens, (), [stream], state, m.pad_token_id
        ):
            tokens.append(clock())
        end = clock()
        phases["prefill"] = int(state.prefill_s * 1e9)
        if len(state.new[0]) != c.new_tokens:
            raise RuntimeError(f"ours: {len(state.new[0])} tokens instead of exactly {c.new_tokens}")
        self.last_tokens = list(state.new[0])
        return Sample(start, end, tokens, phases)

    def close(self) -> None:
        self.pipe = None


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
