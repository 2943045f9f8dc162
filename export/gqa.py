"""The decoder with onnxruntime's GroupQueryAttention: one KV buffer per layer that past and present share.

    export_graph(model, "decoder", path, attention="gqa")   # export.graphs traces GQADecoderGraph(model)

The plain decoder (manifest `decoder.attention: "plain"`) takes `past_key_values.%d.*` [B, H, P, hs] and returns
`present.%d.*` [B, H, P+T, hs]: every step it concatenates the whole cache into a new tensor, which at Phi-2's size
(32 layers, 20 KB per token and layer) moves as many bytes as the int4 weights at past 1,024. The GQA decoder
(`"gqa"`) takes and returns KV of shape [B, H, max_sequence_length, hs]; the runtime binds past and present to the
same buffer and `com.microsoft.GroupQueryAttention` writes the T new slots in place, nothing else moves.

Each layer keeps TinyGPT-V's arithmetic up to the attention: q/k/v projections, the per-head q/k LayerNorm, then

- rotary: inside GQA (`do_rotary=1`, non-interleaved, cos/sin caches of rotary_dim / 2 columns: Phi-2 rotates 32 of
  80 dims, and GQA rotates the first 2 x cos-cache-width dims, leaving the rest) when onnxruntime's kernel takes the
  shape (head size a multiple of 16, rotary dims a multiple of 16: Phi-2 yes); otherwise our own rotary ops before
  GQA (`do_rotary=0`, the tiny and demo presets), fed by `position_ids` as in the plain graph;
- GQA itself, with inputs computed once per step from `attention_mask` [B, P+T]:
  - `seqlens_k` [B] = P+T-1 for every row and `total_sequence_length` = P+T: slots, not real-token counts, so every
    row writes its T new slots at P..P+T-1, the same slots as the runtime's attention mask;
  - `attention_bias` [B, 1, T, P+T]: -1e9 on left-padding slots (GQA adds the causal mask itself). A large finite
    number rather than -inf, so a left-pad query that sees only padding gets finite (unused) output, never NaN.
- With rotary inside GQA the rotation angle is the slot, not the count of real tokens (GQA's own `position_ids` input
  does not give that on CPU). A row's real tokens are then all shifted by the same number of left-pad slots, and
  rotary attention depends on position differences only, so the output is the same within float rounding (tests:
  left-padded batch 2 against PyTorch); the cached keys of a left-padded row are rotated by that shift.

Known limit of onnxruntime's CPU kernel: a run of T > 1 tokens on top of a non-empty cache takes batch 1 only, so the
runtime prefills a batch of several rows in one run instead of chunks (runtime.generate).
"""

from __future__ import annotations

import torch
from onnx.defs import OpSchema
from onnxscript.values import Op, Opset
from torch import nn

from core.config import LanguageModelConfig
from core.model import TinyGPTV
from core.phi import apply_rotary

ATTENTIONS = ("auto", "plain", "gqa")
MASKED = -1e9  # attention_bias on left-padding slots


def gqa_supported(precision: str, quant: str) -> bool:
    """Whether an export of this precision and int4 method can take the GQA decoder: fp32 and int4 (rtn, hqq,
    gptq); the fp16/int8 converters and gptq-ort's calibration feeds are not made for the shared KV buffer."""
    return precision in ("fp32", "int4") and not (precision == "int4" and quant == "gptq-ort")


def resolve_attention(attention: str, precision: str, quant: str) -> str:
    """ "auto" -> "gqa" where supported (faster decode, half the KV memory: one buffer for past and present), else
    "plain"; "plain" and "gqa" stay as given."""
    if attention == "auto":
        return "gqa" if gqa_supported(precision, quant) else "plain"
    return attention


def _schema() -> OpSchema:
    """GroupQueryAttention's signature, as far as we use it: onnx does not register onnxruntime's contrib ops, and
    onnxscript needs a schema to tell inputs from attributes."""
    names = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
             "sin_cache", "position_ids", "attention_bias")  # fmt: skip
    single = {"query", "seqlens_k", "total_sequence_length"}
    option = OpSchema.FormalParameterOption
    kind = {"seqlens_k": "M", "total_sequence_length": "M", "position_ids": "P"}
    inputs = [OpSchema.FormalParameter(n, kind.get(n, "T"), param_option=option.Single if n in single else
                                       option.Optional) for n in names]  # fmt: skip
    outputs = [OpSchema.FormalParameter(n, "T") for n in ("output", "present_key", "present_value")]
    attr = OpSchema.AttrType.INT
    attributes = [OpSchema.Attribute(n, attr, "") for n in ("num_heads", "kv_num_heads", "do_rotary",
                                                             "rotary_interleaved")]  # fmt: skip
    types = [
        ("T", ["tensor(float)", "tensor(float16)"], ""),
        ("M", ["tensor(int32)"], ""),
        ("P", ["tensor(int64)"], ""),
    ]
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
                    type_constraints=types, attributes=attributes)  # fmt: skip


_GQA = Op(Opset("com.microsoft", 1), "GroupQueryAttention", _schema())


def rotary_inside(lm: LanguageModelConfig) -> bool:
    """Whether onnxruntime's GroupQueryAttention can do this model's rotary itself (its CPU kernel's shape limits)."""
    return lm.head_size % 16 == 0 and lm.rotary_dim > 0 and lm.rotary_dim % 16 == 0


def rotary_caches(lm: LanguageModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_position_embeddings, rotary_dim / 2]: GQA's caches, the same angles as core.phi.RotaryEmbedding."""
    dim = lm.rotary_dim
    inv_freq = 1.0 / (lm.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # [rot/2]
    angles = torch.arange(lm.max_position_embeddings).float()[:, None] * inv_freq  # [C, rot/2]
    return angles.cos(), angles.sin()


@torch.library.custom_op("tinygptv::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    seqlens_k: torch.Tensor,
    total_sequence_length: torch.Tensor,
    cos_cache: torch.Tensor | None,
    sin_cache: torch.Tensor | None,
    attention_bias: torch.Tensor,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stand-in traced into com.microsoft.GroupQueryAttention (export only: PyTorch never runs it)."""
    raise NotImplementedError("tinygptv::group_query_attention exists to be exported to ONNX, not to run")


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
      attention_bias, num_heads):  # fmt: skip
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def _onnx_group_query_attention(query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
                                cos_cache, sin_cache, attention_bias, num_heads: int):  # fmt: skip
    rotary = cos_cache is not None
    return _GQA(
        query, key, value, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
        None, attention_bias,  # position_ids: none, GQA counts slots (see the module docstring)
        num_heads=num_heads, kv_num_heads=num_heads, do_rotary=int(rotary), rotary_interleaved=0,
    )  # fmt: skip


TRANSLATIONS = {torch.ops.tinygptv.group_query_attention.default: _onnx_group_query_attention}


class GQADecoderGraph(nn.Module):
    """PhiDecoder.forward with each layer's attention through GroupQueryAttention; KV [B, H, max_sequence_length, hs]."""

    def __init__(self, model: TinyGPTV) -> None:
        super().__init__()
        self.language_model = model.language_model
        cfg = model.config.language_model
        self.heads, self.head_size, self.num_layers = cfg.num_heads, cfg.head_size, cfg.num_layers
        self.inside = rotary_inside(cfg)
        cos, sin = rotary_caches(cfg)
        self.register_buffer("cos_cache", cos, persistent=False)  # [C, rot/2]
        self.register_buffer("sin_cache", sin, persistent=False)

    def _attention(self, attn, h, cos, sin, seqlens_k, total, bias, past_k, past_v):
        B, T, D = h.shape
        q = attn.q_proj(h).view(B, T, self.heads, self.head_size)  # [B, T, H, hs]
        k = attn.k_proj(h).view(B, T, self.heads, self.head_size)  # [B, T, H, hs]
        v = attn.v_proj(h)  # [B, T, D]
        if attn.qk_layernorm:
            q, k = attn.q_layernorm(q), attn.k_layernorm(k)
        if not self.inside:  # our rotary; cos/sin [B, 1, T, rot] -> [B, T, 1, rot] for the [B, T, H, hs] layout
            cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        caches = (self.cos_cache, self.sin_cache) if self.inside else (None, None)
        out, present_k, present_v = group_query_attention(
            q.reshape(B, T, D), k.reshape(B, T, D), v, past_k, past_v, seqlens_k, total, *caches, bias, self.heads
        )
        return attn.dense(out), (present_k, present_v)  # [B, T, D]

    def forward(self, inputs_embeds, attention_mask, position_ids, *past_flat):
        T = inputs_embeds.shape[1]
        ones = torch.ones_like(attention_mask, dtype=torch.int32)  # [B, P+T]
        seqlens_k = ones.sum(-1, dtype=torch.int32) - 1  # [B]: P+T-1 in every row (slots, see the docstring)
        total = ones[0].sum(dtype=torch.int32)  # scalar P+T
        pad = (attention_mask[:, None, None, :] == 0).to(inputs_embeds.dtype) * MASKED  # [B, 1, 1, P+T]
        bias = pad.expand(-1, -1, T, -1)  # [B, 1, T, P+T]: GQA wants the query axis spelled out
        cos, sin = (None, None) if self.inside else self.language_model.rotary(position_ids)  # [B, 1, T, rot]
        x = inputs_embeds
        present = []
        for i, layer in enumerate(self.language_model.model.layers):
            h = layer.input_layernorm(x)  # [B, T, D]
            attn, kv = self._attention(
                layer.self_attn, h, cos, sin, seqlens_k, total, bias, *past_flat[2 * i : 2 * i + 2]
            )
            if hasattr(layer, "post_layernorm"):
                attn = layer.post_layernorm(attn)
            x = attn + layer.mlp(h) + x  # Phi's parallel block (dropout is off in eval)
            present.extend(kv)
        logits = self.language_model.lm_head(self.language_model.model.final_layernorm(x))  # [B, T, V]
        return (logits, *present)
