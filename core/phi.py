"""Phi-2 with TinyGPT-V's changes, as our own module (no patched transformers).

The block is Phi's parallel block: one input LayerNorm feeds attention and MLP, and the two branches are summed with the
residual. TinyGPT-V adds (each switchable in `LanguageModelConfig`):
  - `qk_layernorm`: a LayerNorm over each head's query and key, before the rotary embedding;
  - `post_attention_rmsnorm`: an RMSNorm (`post_layernorm`) on the attention branch before the sum.
With both off this is stock Phi-2 and gives transformers' `PhiForCausalLM` logits on the same weights.

Parameter names match Hugging Face's `microsoft/phi-2` (`model.layers.3.self_attn.q_proj.weight`, `lm_head.bias`, ...),
so that checkpoint loads strictly. The KV cache is plain tensors in and out: `past` is a list of (key, value) pairs of
shape [B, heads, past_len, head_size], and `decode` returns the new `present` list including the current step, which is
exactly what the exported decoder graph's `past_key_values.%d.*` / `present.%d.*` inputs and outputs hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.config import LanguageModelConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm, the variance computed in fp32 as TinyGPT-V's `post_layernorm` does."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Partial rotary embedding: the first `rotary_dim` of each head's dims rotate, the rest pass through."""

    def __init__(self, cfg: LanguageModelConfig) -> None:
        super().__init__()
        dim = cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [rot/2]

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, rot/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, rot]
        return emb.cos()[:, None], emb.sin()[:, None]  # [B, 1, T, rot] each


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, head] with its first cos.shape[-1] dims rotated."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x_rot = x_rot * cos.to(x.dtype) + _rotate_half(x_rot) * sin.to(x.dtype)
    return torch.cat((x_rot, x_pass), dim=-1)


def causal_mask(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, T, P+T]: query i (at absolute slot P+i) sees key j if j <= P+i and attention_mask[:, j] is 1.

    A large negative number rather than -inf, so that a fully masked row (a left-pad query) gives uniform weights instead
    of NaN; its output is never used.
    """
    total = attention_mask.shape[-1]  # P + T
    past = total - query_len
    q_pos = torch.arange(query_len, device=attention_mask.device)[:, None] + past  # [T, 1]
    k_pos = torch.arange(total, device=attention_mask.device)[None, :]  # [1, P+T]
    allowed = (k_pos <= q_pos)[None, None] & attention_mask[:, None, None, :].bool()  # [B, 1, T, P+T]
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class PhiAttention(nn.Module):
    def __init__(self, cfg: LanguageModelConfig) -> None:
        super().__init__()
        d, self.heads, self.head_size = cfg.hidden_size, cfg.num_heads, cfg.head_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.dense = nn.Linear(d, d)
        self.qk_layernorm = cfg.qk_layernorm
        if cfg.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(self.head_size, eps=cfg.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_size, eps=cfg.layer_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_size).transpose(1, 2)  # [B, H, T, hs]
        k = self.k_proj(x).view(B, T, self.heads, self.head_size).transpose(1, 2)  # [B, H, T, hs]
        v = self.v_proj(x).view(B, T, self.heads, self.head_size).transpose(1, 2)  # [B, H, T, hs]
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past is not None:
            k = torch.cat((past[0], k), dim=2)  # [B, H, P+T, hs]
            v = torch.cat((past[1], v), dim=2)  # [B, H, P+T, hs]
        scores = (q @ k.transpose(-1, -2)) * self.head_size**-0.5 + mask  # [B, H, T, P+T]
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # softmax in fp32, as TinyGPT-V does
        out = (probs @ v).transpose(1, 2).reshape(B, T, -1)  # [B, T, D]
        return self.dense(out), (k, v)


class PhiMLP(nn.Module):
    def __init__(self, cfg: LanguageModelConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported; Phi-2 uses 'gelu_new'")
        self.approximate = "none" if cfg.hidden_act == "gelu" else "tanh"  # gelu_new is the tanh approximation
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class PhiBlock(nn.Module):
    def __init__(self, cfg: LanguageModelConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = PhiAttention(cfg)
        self.mlp = PhiMLP(cfg)
        if cfg.post_attention_rmsnorm:
            self.post_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x, cos, sin, mask, past):
        h = self.input_layernorm(x)  # [B, T, D]
        attn, present = self.self_attn(h, cos, sin, mask, past)
        if hasattr(self, "post_layernorm"):
            attn = self.post_layernorm(attn)
        x = self.resid_dropout(attn) + self.resid_dropout(self.mlp(h)) + x  # parallel block
        return x, present


class PhiModel(nn.Module):
    """The transformer body; named `model` inside PhiDecoder so keys read `model.layers.N...` as in Phi-2."""

    def __init__(self, cfg: LanguageModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(PhiBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class PhiDecoder(nn.Module):
    def __init__(self, cfg: LanguageModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = PhiModel(cfg)
        self.rotary = RotaryEmbedding(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Phi's initializer_range 0.02; norms at 1/0 (nn defaults), as TinyGPT-V's new q/k-LN and RMSNorm start.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # [B, T, D]

    def empty_cache(self, batch_size: int, device=None, dtype=torch.float32) -> KVCache:
        """A past of length 0: what the exported decoder takes at prefill."""
        shape = (batch_size, self.config.num_heads, 0, self.config.head_size)
        return [(torch.zeros(shape, device=device, dtype=dtype),) * 2 for _ in range(self.config.num_layers)]

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """inputs_embeds [B, T, D]; attention_mask [B, P+T] (1 = real token); position_ids [B, T]; past: P cached steps.

        Returns logits [B, T, V] and present (P+T steps per layer).
        """
        T = inputs_embeds.shape[1]
        mask = causal_mask(attention_mask, T, inputs_embeds.dtype)  # [B, 1, T, P+T]
        cos, sin = self.rotary(position_ids)  # [B, 1, T, rot]
        x = inputs_embeds
        present: KVCache = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, cos, sin, mask, past[i] if past is not None else None)
            present.append(kv)
        logits = self.lm_head(self.model.final_layernorm(x))  # [B, T, V]
        return logits, present


def position_ids_from_mask(attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
    """Positions of the last `query_len` slots, counting real tokens only (left padding gets position 0).

    attention_mask [B, P+T] -> position_ids [B, T]; the same rule the runtime uses.
    """
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, P+T]
    return positions[:, -query_len:]
