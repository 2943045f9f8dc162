"""Weights in and out: safetensors files, strict loading, and the Hugging Face Phi-2 and BLIP-2 folder formats.

Loading is strict everywhere: a missing or unexpected key, or a shape that differs, fails with the list of them.
The one allowed gap is documented where it is made: a stock Phi-2 folder lacks TinyGPT-V's new norms (q/k LayerNorm,
post-attention RMSNorm), which start at weight 1 / bias 0 exactly as in the original.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The parameters TinyGPT-V adds to Phi-2; a stock Phi-2 checkpoint does not have them.
TINYGPTV_NEW_NORMS = re.compile(
    r"model\.layers\.\d+\.(self_attn\.[qk]_layernorm\.(weight|bias)|post_layernorm\.weight)$"
)


class WeightsError(ValueError):
    """A weights file or folder that does not fit the model: the message lists the keys."""


def _key_list(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write atomically: a temporary file renamed over the target, so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a folder holding model.safetensors or a sharded model.safetensors.index.json."""
    path = Path(path)
    if path.is_dir():
        if (path / WEIGHTS_FILE).is_file():
            path = path / WEIGHTS_FILE
        elif (path / INDEX_FILE).is_file():
            index = json.loads((path / INDEX_FILE).read_text())
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(load_file(str(path / shard)))
            return state
        else:
            found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
            raise WeightsError(f"{path}: no {WEIGHTS_FILE} or {INDEX_FILE} (found: {found}); only safetensors are read")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise WeightsError(f"{path}: not a readable safetensors file ({err})") from None


def load_strict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    allow_missing: re.Pattern | None = None,
) -> list[str]:
    """Copy `state` into `module`; every key must match in name and shape. Returns the allowed missing keys."""
    own = module.state_dict()
    missing = set(own) - set(state)
    allowed = {k for k in missing if allow_missing is not None and allow_missing.search(k)}
    missing -= allowed
    unexpected = set(state) - set(own)
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_key_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_key_list(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:10])}")
    if problems:
        raise WeightsError(f"{source} does not fit the model: " + " | ".join(problems))
    module.load_state_dict(state, strict=False)
    if allowed:
        logger.info("%s: %d TinyGPT-V norm parameters not in the checkpoint start at 1/0", source, len(allowed))
    return sorted(allowed)


# ---------------------------------------------------------------------------------------------- Phi-2 (HF format)
def phi_config_dict(lm_cfg) -> dict:
    """A transformers PhiConfig-style config.json for a LanguageModelConfig.

    transformers 5 writes `rope_parameters` only; older readers silently use partial_rotary_factor 0.5 without the
    top-level keys, so both are written.
    """
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": lm_cfg.vocab_size,
        "hidden_size": lm_cfg.hidden_size,
        "intermediate_size": lm_cfg.intermediate_size,
        "num_hidden_layers": lm_cfg.num_layers,
        "num_attention_heads": lm_cfg.num_heads,
        "num_key_value_heads": lm_cfg.num_heads,
        "partial_rotary_factor": lm_cfg.partial_rotary_factor,
        "rope_theta": lm_cfg.rope_theta,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": lm_cfg.rope_theta,
            "partial_rotary_factor": lm_cfg.partial_rotary_factor,
        },
        "max_position_embeddings": lm_cfg.max_position_embeddings,
        "layer_norm_eps": lm_cfg.layer_norm_eps,
        "hidden_act": lm_cfg.hidden_act,
        "qk_layernorm": lm_cfg.qk_layernorm,
        "resid_pdrop": lm_cfg.resid_pdrop,
        "embd_pdrop": 0.0,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": lm_cfg.bos_token_id,
        "eos_token_id": lm_cfg.eos_token_id,
        "torch_dtype": "float32",
    }


def lm_config_from_phi(config: dict, base):
    """Read a Phi-2 config.json into our LanguageModelConfig, keeping TinyGPT-V's switches from `base`."""
    rope = config.get("rope_parameters") or {}
    return base.replace(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        partial_rotary_factor=float(config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))),
        rope_theta=float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
        max_position_embeddings=config.get("max_position_embeddings", base.max_position_embeddings),
        layer_norm_eps=float(config.get("layer_norm_eps", base.layer_norm_eps)),
        hidden_act=config.get("hidden_act", base.hidden_act),
        bos_token_id=config.get("bos_token_id", base.bos_token_id) or 0,
        eos_token_id=config.get("eos_token_id", base.eos_token_id) or 0,
    )


def split_fused_qkv(prefix: str, state: dict[str, torch.Tensor], num_heads: int) -> None:
    """transformers-4.36 / TinyGPT-V `query_key_value` [3*D, D], per-head interleaved [q_h, k_h, v_h], -> q/k/v_proj (in place)."""
    for kind in ("weight", "bias"):
        fused = state.pop(f"{prefix}.query_key_value.{kind}", None)
        if fused is None:
            continue
        per_head = fused.reshape(num_heads, 3, -1, *fused.shape[1:])  # [H, 3, hs, (D)]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            state[f"{prefix}.{name}.{kind}"] = per_head[:, j].reshape(-1, *fused.shape[1:]).clone()


def normalise_phi_keys(state: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """Accept both Phi-2 layouts: today's q/k/v_proj and the fused `query_key_value` of transformers 4.36."""
    state = dict(state)
    for key in [k for k in state if k.endswith("self_attn.query_key_value.weight")]:
        split_fused_qkv(key[: -len(".query_key_value.weight")], state, num_heads)
    return state


def load_phi_folder(decoder: nn.Module, path: str | Path) -> list[str]:
    """Load a Hugging Face Phi-2 folder (config.json + safetensors) into a PhiDecoder, strictly."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise WeightsError(f"{path}: not a Phi-2 folder (no config.json)")
    hf = json.loads(cfg_file.read_text())
    ours = decoder.config
    expect = {"hidden_size": ours.hidden_size, "num_hidden_layers": ours.num_layers, "vocab_size": ours.vocab_size}
    wrong = [f"{k} {hf.get(k)} != {v}" for k, v in expect.items() if hf.get(k) != v]
    if wrong:
        raise WeightsError(f"{path}: this Phi folder does not match the model config: {'; '.join(wrong)}")
    state = normalise_phi_keys(load_safetensors(path), ours.num_heads)
    return load_strict(decoder, state, source=str(path), allow_missing=TINYGPTV_NEW_NORMS)


def write_phi_folder(decoder: nn.Module, path: str | Path) -> None:
    """Write a PhiDecoder as a Hugging Face Phi folder (what the demo bootstrap leaves in place of microsoft/phi-2)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(phi_config_dict(decoder.config), indent=2) + "\n")
    save_safetensors(decoder.state_dict(), path / WEIGHTS_FILE, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------- BLIP-2 (HF format)
BLIP2_PARTS = ("vision_model.", "qformer.", "query_tokens")


def load_blip2_folder(model: nn.Module, path: str | Path) -> list[str]:
    """Load the vision model (with ln_vision as its post_layernorm), Q-Former and query tokens of a HF BLIP-2 folder.

    Its language projection and language model are not TinyGPT-V's and are ignored with a note. Returns the ignored prefixes.
    """
    path = Path(path)
    state = load_safetensors(path)
    taken = {k: v for k, v in state.items() if k.startswith(BLIP2_PARTS)}
    ignored = sorted({k.split(".")[0] for k in state if not k.startswith(BLIP2_PARTS)})
    if not taken:
        raise WeightsError(f"{path}: no BLIP-2 vision_model.*, qformer.* or query_tokens keys found")
    own = {k: v for k, v in model.state_dict().items() if k.startswith(BLIP2_PARTS)}
    missing = set(own) - set(taken)
    unexpected = set(taken) - set(own)
    shapes = [k for k in own if k in taken and own[k].shape != taken[k].shape]
    if missing or unexpected or shapes:
        raise WeightsError(
            f"{path} does not fit the vision config: missing {_key_list(missing)} | unexpected {_key_list(unexpected)}"
            f" | shape mismatches {_key_list(shapes)}"
        )
    model.load_state_dict(taken, strict=False)
    if ignored:
        logger.info("%s: ignored the parts TinyGPT-V does not use: %s", path, ", ".join(ignored))
    return ignored


def write_blip2_folder(model: nn.Module, path: str | Path) -> None:
    """Write vision model + Q-Former + query tokens as a HF BLIP-2-style folder (config.json + model.safetensors)."""
    from core.model import blip2_qformer_config, blip2_vision_config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    vision_config = blip2_vision_config(cfg).to_dict()
    if cfg.vision.conv_stem:  # our extension (core.vision_stem); a stock BLIP-2 folder has no such key
        vision_config["conv_stem"] = list(cfg.vision.conv_stem)
    config = {
        "architectures": ["Blip2Model"],
        "model_type": "blip-2",
        "num_query_tokens": cfg.qformer.num_query_tokens,
        "vision_config": vision_config,
        "qformer_config": blip2_qformer_config(cfg).to_dict(),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    state = {k: v for k, v in model.state_dict().items() if k.startswith(BLIP2_PARTS)}
    save_safetensors(state, path / WEIGHTS_FILE, metadata={"format": "pt"})


def vision_configs_from_blip2(config: dict, base):
    """Read a HF BLIP-2 config.json's vision and Q-Former parts into (VisionConfig, QFormerConfig)."""
    v, q = config.get("vision_config", {}), config.get("qformer_config", {})
    vision = base.vision.replace(
        image_size=v.get("image_size", base.vision.image_size),
        patch_size=v.get("patch_size", base.vision.patch_size),
        hidden_size=v.get("hidden_size", base.vision.hidden_size),
        num_layers=v.get("num_hidden_layers", base.vision.num_layers),
        num_heads=v.get("num_attention_heads", base.vision.num_heads),
        intermediate_size=v.get("intermediate_size", base.vision.intermediate_size),
        layer_norm_eps=float(v.get("layer_norm_eps", base.vision.layer_norm_eps)),
        conv_stem=tuple(v.get("conv_stem", ())),  # the folder decides: none in EVA/BLIP-2 checkpoints
    )
    qformer = base.qformer.replace(
        num_query_tokens=config.get("num_query_tokens", base.qformer.num_query_tokens),
        hidden_size=q.get("hidden_size", base.qformer.hidden_size),
        num_layers=q.get("num_hidden_layers", base.qformer.num_layers),
        num_heads=q.get("num_attention_heads", base.qformer.num_heads),
        intermediate_size=q.get("intermediate_size", base.qformer.intermediate_size),
        cross_attention_frequency=q.get("cross_attention_frequency", base.qformer.cross_attention_frequency),
        layer_norm_eps=float(q.get("layer_norm_eps", base.qformer.layer_norm_eps)),
    )
    return vision, qformer
