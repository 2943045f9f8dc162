"""LoRA on the language model with peft: targets checked against the model's real module names, and merged at the end.

    add_lora(model, LoraSettings(r=64, alpha=16, dropout=0.05))   # q_proj, k_proj, v_proj, dense of every layer
    merge_lora(model)                                             # fold B @ A * alpha / r into the base weights

The adapters are injected into `model.language_model` in place (`peft.inject_adapter_in_model`), so the model stays a
`TinyGPTV` and its other names do not change; an adapted layer's base weight is then `...q_proj.base_layer.weight` and
its adapter `...q_proj.lora_A.default.weight`. `merge_lora` folds every adapter into its base layer and puts the plain
`nn.Linear` back, so the merged model saves under the original Phi-2 names that `TinyGPTV.from_pretrained` reads.

The original puts one LoRA on the fused `query_key_value` (plus `dense`); this model has Phi-2's separate q/k/v
projections, so the same adapter is three (reference §1.7). A target that names no layer (the original's
`query_key_value`, or the old Microsoft code's `Wqkv` / `out_proj`, issue #9) fails with the list of names that exist.
"""

from __future__ import annotations

import logging
import re

from torch import nn

from training.stages import LoraSettings

logger = logging.getLogger(__name__)

ADAPTER = "default"
LORA_PARAM = re.compile(r"\.lora_(A|B)\.")
_RENAMED = {
    "query_key_value": "q_proj, k_proj, v_proj (the fused projection of transformers 4.36 is split here)",
    "Wqkv": "q_proj, k_proj, v_proj (the old Microsoft Phi code's name)",
    "out_proj": "dense (the old Microsoft Phi code's name)",
}


class LoraTargetError(ValueError):
    """A LoRA target that names no linear layer of the language model."""


class QLoraUnavailable(RuntimeError):
    """QLoRA was asked for and bitsandbytes does not import."""


def linear_names(module: nn.Module) -> list[str]:
    """The distinct last names of the linear layers under `module` (`q_proj`, `dense`, `fc1`, ...), sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, child in module.named_modules() if isinstance(child, nn.Linear)})


def check_targets(module: nn.Module, targets: tuple[str, ...] | list[str]) -> None:
    """Every target must be the last name of at least one linear layer of `module` (peft's suffix rule)."""
    existing = linear_names(module)
    wrong = [t for t in targets if t not in existing]
    if not targets or wrong:
        hints = "".join(f"; for {t!r} use {_RENAMED[t]}" for t in wrong if t in _RENAMED)
        raise LoraTargetError(
            f"LoRA target(s) {', '.join(repr(t) for t in wrong) or '(none given)'} match no linear layer of the "
            f"language model; its linear layers are named {', '.join(existing)}{hints}"
        )


def add_lora(model: nn.Module, settings: LoraSettings) -> int:
    """Inject LoRA adapters into `model.language_model`; returns the number of adapter parameters (0 when r == 0)."""
    if settings.r <= 0:
        return 0
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge them (merge_lora) before adding new ones")
    from peft import LoraConfig, inject_adapter_in_model

    check_targets(model.language_model, settings.targets)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        bias="none",
        target_modules=list(settings.targets),
    )
    frozen = {name: p.requires_grad for name, p in model.language_model.named_parameters()}
    inject_adapter_in_model(config, model.language_model, adapter_name=ADAPTER)
    for name, param in model.language_model.named_parameters():  # peft freezes everything else; undo that here
        plain = name.replace(".base_layer.", ".")
        if plain in frozen and not LORA_PARAM.search(name):
            param.requires_grad_(frozen[plain])
    count = sum(p.numel() for n, p in model.named_parameters() if LORA_PARAM.search(n))
    logger.info(
        "LoRA r=%d alpha=%d on %s: %s parameters", settings.r, settings.alpha, ", ".join(settings.targets), f"{count:,}"
    )
    return count


def has_lora(model: nn.Module) -> bool:
    return any(LORA_PARAM.search(name) for name, _ in model.named_parameters())


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and restore plain nn.Linear layers (in place). Returns how many."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge(safe_merge=True)  # raises on a non-finite merged weight instead of saving it
                setattr(parent, child_name, child.get_base_layer())
                merged += 1
    return merged


QLORA_LAYERS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")


def quantize_language_model(model: nn.Module, compute_dtype=None) -> int:
    """QLoRA: the language model's frozen linear layers as bitsandbytes 4-bit NF4 (double quantization). Returns how many.

    Call before `add_lora`; peft then puts its adapters on the 4-bit layers. bitsandbytes packs the weights when the
    model moves (`.to(device)`, which accelerate's `prepare` does). The final merge never uses these 4-bit weights: `write_final` rebuilds the model in fp32 from the
    base folders and the trainable tensors.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise QLoraUnavailable(
            f"QLoRA needs bitsandbytes, which does not import here ({err}); install it (pip install bitsandbytes) "
            "or train without --qlora"
        ) from None
    import torch

    compute_dtype = compute_dtype or torch.bfloat16
    replaced = 0
    for parent in list(model.language_model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name in QLORA_LAYERS:
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=child.bias is not None,
                    compute_dtype=compute_dtype,
                    compress_statistics=True,
                    quant_type="nf4",
                )
                layer.weight = bnb.nn.Params4bit(
                    child.weight.data.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4"
                )
                if child.bias is not None:
                    layer.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(parent, name, layer)
                replaced += 1
    logger.info("QLoRA: %d linear layers of the language model in 4-bit NF4", replaced)
    return replaced
