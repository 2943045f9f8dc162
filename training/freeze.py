"""What a stage trains: the projector, the language model's norm weights, and LoRA adapters where there are any.

    groups = set_trainable(model)        # {"projector": 13_638_144, "norms": 171_520, "lora": 41_943_040} (real sizes)

Everything else is frozen, as in the original (reference §1.6-§1.8): the ViT with its ln_vision, the Q-Former and its
query tokens, the language model's embeddings, linear layers, lm_head and every bias (so the q/k LayerNorm biases stay
0). Frozen parts also run in eval mode (`set_train_mode`): the Q-Former has dropout 0.1 that the original switches off
by overriding `.train`.
"""

from __future__ import annotations

import re

from torch import nn

from training.lora import LORA_PARAM

# Trainable norm weights of the language model: input_layernorm, q/k_layernorm, post_layernorm per layer + final.
NORM_WEIGHT = re.compile(
    r"^language_model\.model\.(layers\.\d+\.(input_layernorm|self_attn\.[qk]_layernorm|post_layernorm)"
    r"|final_layernorm)\.weight$"
)
PROJECTOR = re.compile(r"^projector\.")


def trainable_group(name: str) -> str | None:
    """ "projector", "norms", "lora", or None (frozen) for a parameter name of TinyGPTV (with or without adapters)."""
    if PROJECTOR.match(name):
        return "projector"
    if LORA_PARAM.search(name):
        return "lora"
    if NORM_WEIGHT.match(name):
        return "norms"
    return None


def set_trainable(model: nn.Module) -> dict[str, int]:
    """Set requires_grad per the rule above; return the parameter count of each trainable group."""
    counts = {"projector": 0, "norms": 0, "lora": 0}
    for name, param in model.named_parameters():
        group = trainable_group(name)
        param.requires_grad_(group is not None)
        if group is not None:
            counts[group] += param.numel()
    if counts["projector"] == 0:
        raise ValueError("no projector parameters found; is this a TinyGPTV model?")
    return counts


def set_train_mode(model: nn.Module) -> None:
    """Training mode for the language model and projector; eval mode (no dropout) for the frozen ViT and Q-Former."""
    model.train()
    model.vision_model.eval()
    model.qformer.eval()


def trainable_state(model: nn.Module) -> dict:
    """The trainable tensors by name (what a checkpoint keeps, as the original's `_save_checkpoint` does)."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}
