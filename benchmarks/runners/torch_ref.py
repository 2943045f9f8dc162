"""The PyTorch reference: core.TinyGPTV with its KV cache, fp32 or bf16, on the checkpoint the export came from.

Prefill and decode are the model's own `encode_image` / `embed` / `decode`, greedy as `core.generation.generate`
(the image id masked), written out here only to read the clock between the phases and at every token.

Where the export was made from random weights (`source.random_init`) the same shapes are rebuilt from the manifest's
config with a fixed seed: the speed is the same, the values are not those of the export.
"""

from __future__ import annotations

import logging
from pathlib import Path

from benchmarks.bandwidth import kv_bytes
from benchmarks.harness import Clock, Sample
from benchmarks.runners import RunConfig

logger = logging.getLogger(__name__)

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class TorchRunner:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.info: dict = {}

    def load(self) -> None:
        import torch

        from core.config import ModelConfig
        from core.model import TinyGPTV

        c = self.config
        torch.set_num_threads(c.threads)
        source = c.options.get("torch_source", {})
        dtype = getattr(torch, DTYPES[c.precision])
        if source.get("model_dir"):
            model = TinyGPTV.from_pretrained(source["model_dir"])
            note = None
        else:
            torch.manual_seed(int(source.get("seed", 0)))
            model = TinyGPTV(ModelConfig.from_dict(source["config"]))
            note = "random weights of the export's shapes (the export was made from random weights)"
        self.model = model.to(dtype).eval()
        self.dtype = dtype
        lm = model.config.language_model
        element = torch.finfo(dtype).bits // 8
        lm_params = sum(p.numel() for n, p in model.language_model.named_parameters() if "embed_tokens" not in n)
        mean_context = c.prompt_tokens + c.new_tokens / 2
        self.info = {
            "precision": c.precision,
            "disk_bytes": sum(p.numel() for p in model.parameters()) * element,
            "decode_weights_bytes": lm_params * element,
            "kv_bytes_mid": kv_bytes(lm.num_layers, lm.num_heads, lm.head_size, mean_context, element),
            "image_size": model.config.image.size,
            "image_tokens": model.config.num_image_tokens if c.image else 0,
            "provider": "cpu",
            "torch_threads": torch.get_num_threads(),
        }
        if note:
            self.info["note"] = note

    def run_once(self, clock: Clock) -> Sample:
        import torch

        from core.image import preprocess_for
        from core.phi import position_ids_from_mask

        c, model = self.config, self.model
        cfg = model.config
        image_id = cfg.prompt.image_token_id
        with torch.inference_mode():
            start = clock()
            phases: dict[str, int] = {}
            if c.image:
                pixels = torch.from_numpy(preprocess_for(c.image, cfg.image))[None].to(self.dtype)  # [1, 3, S, S]
                t1 = clock()
                features = model.encode_image(pixels)  # [1, N, D]
                t2 = clock()
                phases["preprocess"], phases["vision"] = t1 - start, t2 - t1
                ids = c.prompt_ids
            else:
                features = torch.zeros(1, 1, cfg.language_model.hidden_size, dtype=self.dtype)  # [1, 1, D]
                ids = c.text_ids
            t3 = clock()
            input_ids = torch.tensor([ids], dtype=torch.long)  # [1, T]
            mask = torch.ones_like(input_ids)  # [1, T]
            embeds = model.embed(input_ids, features)  # [1, T, D]
            logits, past = model.decode(embeds, mask, position_ids_from_mask(mask, embeds.shape[1]), None)
            phases["prefill"] = clock() - t3
            tokens, new = [], []
            for step in range(c.new_tokens):
                scores = logits[:, -1].float()  # [1, V]
                scores[:, image_id] = float("-inf")
                next_id = int(scores.argmax(-1))
                tokens.append(clock())
                new.append(next_id)
                if step == c.new_tokens - 1:
                    break
                step_ids = torch.tensor([[next_id]], dtype=torch.long)  # [1, 1]
                mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)  # [1, P+1]
                step_embeds = model.language_model.embed_tokens(step_ids)  # [1, 1, D]
                logits, past = model.decode(step_embeds, mask, position_ids_from_mask(mask, 1), past)
            end = clock()
        self.last_tokens = new
        return Sample(start, end, tokens, phases)

    def close(self) -> None:
        self.model = None


def torch_source(manifest: dict) -> dict:
    """Where the PyTorch baseline gets its weights: the export's checkpoint folder if it is still there, else shapes."""
    source = manifest.get("source", {})
    model_dir = source.get("model_dir")
    if model_dir and (Path(model_dir) / "model.safetensors").is_file() and not source.get("random_init"):
        return {"model_dir": model_dir}
    return {"config": source.get("config"), "seed": int(source.get("seed", 0))}
