"""GPTQ on the PyTorch decoder, calibrated on multimodal inputs_embeds, and the standard packed format it is stored in.

    result = quantize_decoder(model.language_model, sequences, bits=4, group_size=32)   # sym=False, mse=True
    result["model.layers.0.self_attn.q_proj"]   # QuantizedLinear(codes [out, in], scales/zeros [groups, out], bias)
    tensors = pack_gptq(q)                       # {"qweight", "qzeros", "scales", "g_idx"}: AutoGPTQ/gptqmodel "gptq" format
    weight = unpack_gptq(tensors, ...)           # [out, in] float32, exactly scales * (codes - zeros)

The algorithm is GPTQ (Frantar et al. 2022) as AutoGPTQ / gptqmodel run it: blocks one after another, each block's
Linear layers quantized from the Hessian H = 2 X X^T of their inputs (X measured with the blocks before already
quantized), lazy batches of 128 columns, `damp` (1 %) dampening, groups of `group_size` input channels sharing one
scale and zero point. Scales are rounded to fp16 while solving, because that is how they are stored, so the error
compensation sees the weights that will really be used. lm_head is quantized too (`lm_head: true`), as the ONNX int4
decoder quantizes it.
Options, each measured on the demo model (the issue-4 notes, gptq.md; the defaults are the closest to fp32 there,
by the mean KL of the answer tokens' distributions: sym + min-max 0.078e-3, asym + min-max 0.049e-3, asym + mse
0.037e-3, onnxruntime's RTN 0.69e-3):
  - sym: one scale per group and zero point 8 (no zero points stored), or asymmetric (default) with its own zero
    point per group, as onnxruntime's RTN;
  - mse: the group's scale/zero from a shrink search of the min-max range (the reference Quantizer's mse=True;
    default on) instead of min-max itself;
  - act_order: columns in order of decreasing Hessian diagonal, with static groups so that g_idx stays i // group_size
    (default off: it lowered the layers' output error but not the model's distance to fp32);
  - damp: 0.01 (default) or more; 0.1 was further from fp32.
The block inputs are the calibration sequences' inputs_embeds — image vectors in place — which is why this exists
rather than gptqmodel, whose calibration feeds token ids only (see the note in export/gptq.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core.phi import PhiDecoder, causal_mask

logger = logging.getLogger(__name__)

SYM = False  # the defaults, measured on the demo model (see the module docstring and notes/gptq.md)
MSE = True
ACT_ORDER = False
DAMP = 0.01


@dataclass
class QuantizedLinear:
    codes: torch.Tensor  # [out, in] int32 in 0..2^bits-1
    scales: torch.Tensor  # [groups, out] float16
    zeros: torch.Tensor  # [groups, out] int32 (the true zero point, not the v1 "minus one")
    bias: torch.Tensor | None  # [out] float16
    group_size: int
    bits: int

    def dequantize(self) -> torch.Tensor:
        g_idx = torch.arange(self.codes.shape[1]) // self.group_size  # [in]
        scales = self.scales.float()[g_idx].T  # [out, in]
        return scales * (self.codes - self.zeros[g_idx].T).float()  # [out, in]


def _find_params(
    w: torch.Tensor, bits: int, sym: bool, mse: bool = False, grid: int = 100, maxshrink: float = 0.8, norm: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero of w [out, g] (AutoGPTQ's Quantizer.find_params, weight mode); scale rounded to fp16.

    mse=True: the reference Quantizer's `mse` search. The min-max range is shrunk by p = 1, 0.99, ... (down to
    1 - maxshrink, `grid` steps per unit) and each row keeps the p whose rounding error sum |w - q(w)|^norm is smallest;
    p = 1 is min-max itself, so the search never does worse than min-max on that error.
    """
    maxq = 2**bits - 1
    xmin = torch.minimum(w.min(1).values, torch.zeros(1))  # [out]
    xmax = torch.maximum(w.max(1).values, torch.zeros(1))  # [out]
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = xmin.masked_fill(flat, -1), xmax.masked_fill(flat, 1)

    def params(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = ((hi - lo) / maxq).half().float()  # stored as fp16: solve with what will be used
        zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-lo / scale)
        return scale, zero

    scale, zero = params(xmin, xmax)
    if not mse:
        return scale, zero
    best = _group_error(w, scale, zero, maxq, norm)  # [out]
    for i in range(1, int(maxshrink * grid)):
        p = 1 - i / grid
        scale1, zero1 = params(p * xmin, p * xmax)
        err = _group_error(w, scale1, zero1, maxq, norm)  # [out]
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, scale1, scale), torch.where(better, zero1, zero)
    return scale, zero


def _group_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, norm: float) -> torch.Tensor:
    """Sum over a row of |w - dequant(quant(w))|^norm: w [out, g], scale and zero [out] -> [out]."""
    q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)  # [out, g]
    return (scale[:, None] * (q - zero[:, None]) - w).abs().pow(norm).sum(1)


def gptq_linear(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool = SYM,
    damp: float = DAMP,
    blocksize: int = 128,
    mse: bool = MSE,
    act_order: bool = ACT_ORDER,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [out, in], H [in, in] -> codes [out, in], scales [groups, out], zeros [groups, out].

    mse: each group's scale/zero from the shrink search of `_find_params` instead of min-max.
    act_order: columns solved in order of decreasing H diagonal (the inputs with the most energy first, while the
    most error can still be compensated), with static groups: every group's scale/zero is fixed from the weight before
    solving, so column i still belongs to group i // group_size and the stored g_idx stays the trivial one that
    MatMulNBits and desc_act-false loaders assume.
    """
    maxq = 2**bits - 1
    W = weight.detach().clone().float()  # [out, in]
    H = H.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    n_groups = math.ceil(cols / group_size)
    scales = torch.zeros(n_groups, W.shape[0])
    zeros = torch.zeros(n_groups, W.shape[0], dtype=torch.int32)
    perm = torch.arange(cols)
    if act_order:
        for g in range(n_groups):  # static groups, from the weight as it is before any compensation
            scale, zero = _find_params(W[:, g * group_size : (g + 1) * group_size], bits, sym, mse)
            scales[g], zeros[g] = scale, zero.int()
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # [in, in]
    codes = torch.zeros_like(W, dtype=torch.int32)  # [out, in], original column order
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # [out, b]
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # the original input channel
            if act_order:
                scale, zero = scales[col // group_size], zeros[col // group_size].float()
            elif col % group_size == 0:
                # AutoGPTQ reads the group from W, whose in-block columns lag W1's updates; kept for fidelity
                scale, zero = _find_params(W[:, col : col + group_size], bits, sym, mse)
                scales[col // group_size], zeros[col // group_size] = scale, zero.int()
            w = W1[:, i]  # [out]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)  # [out]
            codes[:, col] = q.int()
            err = (w - scale * (q - zero)) / Hinv1[i, i]  # [out]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, scales.half(), zeros


class _HessianHook:
    def __init__(self, size: int) -> None:
        self.H = torch.zeros(size, size)
        self.tokens = 0

    def __call__(self, module, inputs, output) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # [tokens, in]
        self.H *= self.tokens / (self.tokens + x.shape[0])
        self.tokens += x.shape[0]
        x = math.sqrt(2 / self.tokens) * x
        self.H += x.T @ x


def _quantize_linears(
    modules: dict[str, nn.Linear], run, bits, group_size, sym, **solver
) -> dict[str, QuantizedLinear]:
    """Measure each module's input Hessian over `run()`, then quantize and write the dequantized weight back."""
    hooks = {name: _HessianHook(m.in_features) for name, m in modules.items()}
    handles = [m.register_forward_hook(hooks[name]) for name, m in modules.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, module in modules.items():
        codes, scales, zeros = gptq_linear(module.weight, hooks[name].H, bits, group_size, sym, **solver)
        bias = module.bias.detach().half() if module.bias is not None else None
        q = QuantizedLinear(codes, scales, zeros, bias, group_size, bits)
        with torch.no_grad():
            module.weight.copy_(q.dequantize())
            if module.bias is not None:
                module.bias.copy_(bias.float())
        out[name] = q
    return out


@torch.no_grad()
def quantize_decoder(
    decoder: PhiDecoder, embeds: list[torch.Tensor], bits: int = 4, group_size: int = 32, sym: bool = SYM,
    damp: float = DAMP, mse: bool = MSE, act_order: bool = ACT_ORDER,
) -> dict[str, QuantizedLinear]:  # fmt: skip
    """GPTQ every Linear of `decoder` (in place: weights become their dequantized values). embeds: [1, T, D] each."""
    solver = {"damp": damp, "mse": mse, "act_order": act_order}
    decoder.eval()
    states = [e.float() for e in embeds]  # block inputs, [1, T, D] each
    contexts = []
    for x in states:
        T = x.shape[1]
        mask = causal_mask(torch.ones(1, T, dtype=torch.long), T, x.dtype)  # [1, 1, T, T]
        cos, sin = decoder.rotary(torch.arange(T)[None])  # [1, 1, T, rot]
        contexts.append((cos, sin, mask))
    result: dict[str, QuantizedLinear] = {}
    for index, block in enumerate(decoder.model.layers):
        linears = {f"model.layers.{index}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear)}

        def run(block=block, states=states):
            for x, (cos, sin, mask) in zip(states, contexts):
                block(x, cos, sin, mask, None)

        result.update(_quantize_linears(linears, run, bits, group_size, sym, **solver))
        states = [block(x, cos, sin, mask, None)[0] for x, (cos, sin, mask) in zip(states, contexts)]  # quantized block
        logger.info("GPTQ block %d/%d done", index + 1, len(decoder.model.layers))

    def run_head():
        for x in states:
            decoder.lm_head(decoder.model.final_layernorm(x))

    result.update(_quantize_linears({"lm_head": decoder.lm_head}, run_head, bits, group_size, sym, **solver))
    return result


# ------------------------------------------------------------------------------ the standard packed format (v1, "gptq")
def pack_gptq(q: QuantizedLinear) -> dict[str, torch.Tensor]:
    """AutoGPTQ / gptqmodel checkpoint_format "gptq": qweight int32 [in*bits/32, out] (input channels packed, low bits
    first), qzeros int32 [groups, out*bits/32] holding zero-1 (the v1 convention), scales fp16 [groups, out], g_idx."""
    per = 32 // q.bits
    out_features, in_features = q.codes.shape
    if in_features % per or out_features % per:
        raise ValueError(
            f"GPTQ packing needs in and out features divisible by {per}; got {in_features}, {out_features}"
        )
    codes = q.codes.T.numpy().astype(np.uint32).reshape(in_features // per, per, out_features)  # [in/8, 8, out]
    shifts = (np.arange(per, dtype=np.uint32) * q.bits)[None, :, None]
    qweight = np.bitwise_or.reduce(codes << shifts, axis=1)  # [in/8, out]
    zeros = (q.zeros.numpy() - 1).astype(np.uint32) & (2**q.bits - 1)  # v1 stores zero - 1
    zeros = zeros.reshape(zeros.shape[0], out_features // per, per)  # [groups, out/8, 8]
    qzeros = np.bitwise_or.reduce(zeros << shifts.reshape(1, 1, per), axis=2)  # [groups, out/8]
    tensors = {
        "qweight": torch.from_numpy(qweight.view(np.int32).copy()),
        "qzeros": torch.from_numpy(qzeros.view(np.int32).copy()),
        "scales": q.scales.half(),
        "g_idx": (torch.arange(in_features) // q.group_size).int(),
    }
    if q.bias is not None:
        tensors["bias"] = q.bias.half()
    return tensors


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> QuantizedLinear:
    per = 32 // bits
    mask = np.uint32(2**bits - 1)
    shifts = np.arange(per, dtype=np.uint32) * bits
    qweight = tensors["qweight"].numpy().view(np.uint32)  # [in/8, out]
    codes = (qweight[:, None, :] >> shifts[None, :, None]) & mask  # [in/8, 8, out]
    codes = codes.reshape(-1, qweight.shape[1]).T  # [out, in]
    qzeros = tensors["qzeros"].numpy().view(np.uint32)  # [groups, out/8]
    zeros = ((qzeros[:, :, None] >> shifts[None, None, :]) & mask).reshape(qzeros.shape[0], -1)  # [groups, out]
    g_idx = tensors["g_idx"].numpy()
    if not np.array_equal(g_idx, np.arange(len(g_idx)) // group_size):
        raise ValueError("act-order checkpoints (g_idx not i // group_size) are not supported by this loader")
    return QuantizedLinear(
        torch.from_numpy(codes.astype(np.int32)),
        tensors["scales"].half(),
        torch.from_numpy(((zeros + 1) & mask).astype(np.int32)),  # back from the v1 "minus one"
        tensors.get("bias"),
        group_size,
        bits,
    )
