"""transformers' PhiForCausalLM on a stock Phi-2 folder, with its KV cache: the original repository's path (peers).

Greedy, exactly `new_tokens`, timestamps at every token; prefill is the forward pass over the prompt with
`logits_to_keep=1` (as `generate` does). transformers 5 takes the KV cache as `cache=` (`past_key_values=` is deprecated).
"""

from __future__ import annotations

import logging

from benchmarks.bandwidth import kv_bytes
from benchmarks.harness import Clock, Sample
from benchmarks.runners import RunConfig

logger = logging.getLogger(__name__)


class TransformersRunner:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.info: dict = {}

    def load(self) -> None:
        import torch
        from transformers import PhiForCausalLM

        from benchmarks.runners.torch_ref import DTYPES

        c = self.config
        torch.set_num_threads(c.threads)
        dtype = getattr(torch, DTYPES[c.precision])
        self.model = PhiForCausalLM.from_pretrained(c.model, dtype=dtype).eval()
        cfg = self.model.config
        element = torch.finfo(dtype).bits // 8
        params = sum(p.numel() for p in self.model.parameters())
        embed = self.model.get_input_embeddings().weight.numel()
        heads = cfg.num_attention_heads
        self.info = {
            "precision": c.precision,
            "disk_bytes": params * element,
            "decode_weights_bytes": (params - embed) * element,
            "kv_bytes_mid": kv_bytes(
                cfg.num_hidden_layers, heads, cfg.hidden_size // heads, c.prompt_tokens + c.new_tokens / 2, element
            ),  # fmt: skip
            "image_tokens": 0,
            "provider": "cpu",
            "transformers_attention": getattr(cfg, "_attn_implementation", None),
        }

    def run_once(self, clock: Clock) -> Sample:
        import torch
        from transformers import DynamicCache

        c = self.config
        with torch.inference_mode():
            start = clock()
            ids = torch.tensor([c.text_ids], dtype=torch.long)  # [1, T]
            cache = DynamicCache(config=self.model.config)
            out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)  # cache filled in place
            prefill = clock() - start
            tokens, new = [], []
            for step in range(c.new_tokens):
                next_id = int(out.logits[:, -1].argmax(-1))
                tokens.append(clock())
                new.append(next_id)
                if step == c.new_tokens - 1:
                    break
                step_ids = torch.tensor([[next_id]], dtype=torch.long)  # [1, 1]
                out = self.model(input_ids=step_ids, cache=cache, use_cache=True)
            end = clock()
        self.last_tokens = new
        return Sample(start, end, tokens, {"prefill": prefill})

    def close(self) -> None:
        self.model = None
