"""Convert an original TinyGPT-V stage checkpoint (`TinyGPT-V_for_Stage{1..4}.pth`) into one of our model folders.

    python -m core.convert_tinygptv --checkpoint TinyGPT-V_for_Stage4.pth \
        --base-lm phi-2/ --base-vision blip2/ --out models/tinygptv-stage4 [--image-size 448] [--tokenizer DIR]

The original saves only what it trained (runner_base._save_checkpoint drops frozen tensors): the two projection layers,
the LM's norm weights and the LoRA A/B matrices, under LAVIS/peft names. The frozen parts come from local folders: Phi-2
in Hugging Face format (either layout: separate q/k/v_proj, or transformers-4.36's fused `query_key_value`) and a BLIP-2
folder in Hugging Face format (EVA ViT-g, ln_vision, Q-Former, query tokens).

Every key goes through the explicit table below; a key it does not know fails the conversion with the list. LoRA is
merged: W += (B @ A) * alpha / r. The fused `query_key_value` LoRA (one A shared by q, k, v; B rows per-head interleaved
[q_h, k_h, v_h]) is split into the three projections exactly as the fused weight is. The file is read with
`torch.load(weights_only=True)`: no code in a checkpoint ever runs.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import torch

from core.config import ModelConfig
from core.weights import (
    WeightsError,
    lm_config_from_phi,
    load_blip2_folder,
    load_phi_folder,
    vision_configs_from_blip2,
)

logger = logging.getLogger(__name__)

# The original's module paths: `llama_model` is Phi-2, wrapped by peft (`base_model.model.`) from stage 2 on.
_LM_PREFIXES = ("llama_model.base_model.model.", "llama_model.")
# (pattern on the original name after the LM prefix is removed, our name). Order matters only for readability.
KEY_TABLE: list[tuple[str, str]] = [
    (r"^llama_proj\.(weight|bias)$", r"projector.fc1.\1"),
    (r"^llama_proj2\.(weight|bias)$", r"projector.fc2.\1"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.(weight|bias)$", r"language_model.model.layers.\1.input_layernorm.\2"),
    (
        r"^model\.layers\.(\d+)\.self_attn\.([qk])_layernorm\.(weight|bias)$",
        r"language_model.model.layers.\1.self_attn.\2_layernorm.\3",
    ),
    (r"^model\.layers\.(\d+)\.post_layernorm\.weight$", r"language_model.model.layers.\1.post_layernorm.weight"),
    (r"^model\.final_layernorm\.(weight|bias)$", r"language_model.model.final_layernorm.\1"),
]
_LORA = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(query_key_value|dense)\.lora_([AB])(?:\.default)?\.weight$")


class ConversionError(WeightsError):
    pass


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an original checkpoint ({"model": {...}, "optimizer": ...} or a bare dict), tensors only."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such checkpoint file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code in it, or not a torch file at all
        raise ConversionError(f"{path}: not a weights-only torch checkpoint ({err})") from None
    state = blob.get("model", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise ConversionError(f"{path}: expected a dict of tensors (optionally under 'model')")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _strip_lm_prefix(key: str) -> str:
    for prefix in _LM_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def deinterleave_qkv(fused: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[3*D, ...] rows laid out per head as [q_h, k_h, v_h] (BLOOM style) -> q, k, v each [D, ...]."""
    per_head = fused.reshape(num_heads, 3, -1, *fused.shape[1:])  # [H, 3, hs, ...]
    return tuple(per_head[:, j].reshape(-1, *fused.shape[1:]) for j in range(3))  # type: ignore[return-value]


def map_checkpoint(
    state: dict[str, torch.Tensor], num_heads: int, lora_alpha: float = 16.0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Original names -> (our tensors to set, our weight deltas to add from merged LoRA). Unknown keys fail."""
    direct: dict[str, torch.Tensor] = {}
    lora: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in state.items():
        name = _strip_lm_prefix(key)
        match = _LORA.match(name)
        if match:
            layer, module, ab = match.groups()
            lora.setdefault((layer, module), {})[ab] = value.float()
            continue
        for pattern, target in KEY_TABLE:
            if re.match(pattern, name):
                direct[re.sub(pattern, target, name)] = value.float()
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} checkpoint key(s) not in the conversion table: {', '.join(sorted(unknown)[:20])}"
        )
    deltas: dict[str, torch.Tensor] = {}
    for (layer, module), ab in sorted(lora.items()):
        if set(ab) != {"A", "B"}:
            raise ConversionError(f"layer {layer} {module}: LoRA has {sorted(ab)} but needs both A and B")
        rank = ab["A"].shape[0]
        delta = ab["B"] @ ab["A"] * (lora_alpha / rank)  # [out, in]
        prefix = f"language_model.model.layers.{layer}.self_attn"
        if module == "dense":
            deltas[f"{prefix}.dense.weight"] = delta
        else:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), deinterleave_qkv(delta, num_heads)):
                deltas[f"{prefix}.{name}.weight"] = part
    return direct, deltas


def convert(
    checkpoint: str | Path,
    base_lm: str | Path,
    base_vision: str | Path,
    image_size: int | None = None,
    lora_alpha: float = 16.0,
):
    """Build a TinyGPTV from the base folders and apply the checkpoint. Returns the model (eval mode, fp32)."""
    import json

    from core.model import TinyGPTV

    state = read_checkpoint(checkpoint)  # first: a bad checkpoint fails before anything large is built
    for folder, what in ((base_lm, "Phi-2"), (base_vision, "BLIP-2")):
        if not (Path(folder) / "config.json").is_file():
            raise ConversionError(f"{folder}: not a {what} folder in Hugging Face format (no config.json)")
    base = ModelConfig.preset("tinygptv")
    lm_cfg = lm_config_from_phi(json.loads((Path(base_lm) / "config.json").read_text()), base.language_model)
    vision, qformer = vision_configs_from_blip2(json.loads((Path(base_vision) / "config.json").read_text()), base)
    # The image id is a row of the embedding table the tokenizer never produces: the last one (Phi-2: 51199 of 51200).
    prompt = base.prompt.replace(image_token_id=lm_cfg.vocab_size - 1)
    projector = base.projector
    if "llama_proj.weight" in state:  # 4096 in the original; read it rather than assume it
        projector = projector.replace(hidden_size=state["llama_proj.weight"].shape[0])
    cfg = base.replace(language_model=lm_cfg, vision=vision, qformer=qformer, prompt=prompt, projector=projector)
    if image_size is not None:
        cfg = cfg.replace(image=cfg.image.replace(size=image_size))
    direct, deltas = map_checkpoint(state, lm_cfg.num_heads, lora_alpha)
    model = TinyGPTV(cfg)
    load_blip2_folder(model, base_vision)
    load_phi_folder(model.language_model, base_lm)
    own = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in {**direct, **deltas}.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise ConversionError(f"checkpoint does not fit the base models: {'; '.join(wrong[:10])}")
    with torch.no_grad():
        for key, value in direct.items():
            own[key].copy_(value)
        for key, delta in deltas.items():
            own[key].add_(delta)
    logger.info("applied %d tensors and %d merged LoRA deltas from %s", len(direct), len(deltas), checkpoint)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.convert_tinygptv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="original TinyGPT-V stage .pth")
    parser.add_argument("--base-lm", required=True, help="Phi-2 folder in Hugging Face format")
    parser.add_argument("--base-vision", required=True, help="BLIP-2 folder in Hugging Face format")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json (default: --base-lm)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--image-size", type=int, help="224 for stages 1-3, 448 for stage 4 (default: the ViT's own)")
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty", file=sys.stderr)
        return 2
    try:
        model = convert(args.checkpoint, args.base_lm, args.base_vision, args.image_size, args.lora_alpha)
        tokenizer = model.load_tokenizer(args.tokenizer or args.base_lm)
    except (WeightsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, tokenizer=tokenizer)
    tmp.rename(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
