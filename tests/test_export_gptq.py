"""GPTQ: the solver, the standard packed format, the checkpoint folder, and its ONNX MatMulNBits twin."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from core.model import TinyGPTV
from export.calibration import decoder_feed, multimodal_sequences
from export.gptq import gptq_export, load_gptq_model, main, pack_checkpoint_into, read_gptq_decoder
from export.gptq_solver import QuantizedLinear, _find_params, _group_error, gptq_linear, pack_gptq, unpack_gptq
from export.last_logits import set_logits_positions
from export.validate import open_session


def test_pack_unpack_is_exact_and_uses_the_v1_zero_convention():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (16, 64), generator=gen, dtype=torch.int32)  # [out, in]
    zeros = torch.randint(0, 16, (2, 16), generator=gen, dtype=torch.int32)  # asym, zero 0 included
    zeros[0, 0] = 0
    q = QuantizedLinear(codes, torch.rand(2, 16, generator=gen).half(), zeros, torch.randn(16).half(), 32, 4)
    packed = pack_gptq(q)
    assert packed["qweight"].shape == (8, 16) and packed["qzeros"].shape == (2, 2)
    assert packed["qweight"].dtype == torch.int32 and packed["scales"].dtype == torch.float16
    assert packed["g_idx"].tolist() == [i // 32 for i in range(64)]
    back = unpack_gptq(packed, 4, 32)
    assert torch.equal(back.codes, codes) and torch.equal(back.zeros, zeros)
    assert torch.equal(back.dequantize(), q.dequantize())
    sym = QuantizedLinear(codes, q.scales, torch.full((2, 16), 8, dtype=torch.int32), None, 32, 4)
    assert set(pack_gptq(sym)["qzeros"].flatten().tolist()) == {0x77777777}  # the familiar v1 symmetric zeros


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)  # correlated input channels
    W = torch.randn(32, 64, generator=gen)  # [out, in]
    H = 2 * X.T @ X / X.shape[0]
    codes, scales, zeros = gptq_linear(W, H, bits=4, group_size=32, sym=True)
    gptq_w = QuantizedLinear(codes, scales, zeros, None, 32, 4).dequantize()
    rtn = []
    for g in range(2):
        block = W[:, g * 32 : (g + 1) * 32]
        scale = (block.abs().max(1, keepdim=True).values * 2 / 15).half().float()
        rtn.append(scale * (torch.clamp(torch.round(block / scale) + 8, 0, 15) - 8))
    rtn_w = torch.cat(rtn, 1)
    gptq_err = ((X @ (W - gptq_w).T) ** 2).mean()
    rtn_err = ((X @ (W - rtn_w).T) ** 2).mean()
    assert codes.min() >= 0 and codes.max() <= 15
    assert gptq_err < 0.6 * rtn_err, (gptq_err, rtn_err)


def test_mse_search_never_gives_a_larger_group_error_than_min_max():
    hand_made = torch.tensor(
        [
            [0.01, -0.02, 0.03, 0.015, -0.01, 0.02, -0.03, 0.9] * 4,  # an outlier: clipping it costs more than it saves
            [0.5, -0.4, 0.3, -0.2, 0.1, 0.0, -0.1, 0.2] * 4,
            [0.0] * 32,  # flat
            [-1.0, -0.9, -0.8, -0.7, -0.75, -0.85, -0.95, -0.6] * 4,  # one-sided
        ]
    )  # [rows, group]
    gaussian = 0.1 * torch.randn(16, 32, generator=torch.Generator().manual_seed(0))  # weight-like groups
    for sym in (True, False):
        for norm in (2.4, 2.0):
            for w in (hand_made, gaussian):
                scale, zero = _find_params(w, 4, sym)
                scale_mse, zero_mse = _find_params(w, 4, sym, mse=True, norm=norm)
                minmax_err = _group_error(w, scale, zero, 15, norm)  # [rows]
                mse_err = _group_error(w, scale_mse, zero_mse, 15, norm)
                assert (mse_err <= minmax_err).all(), (sym, norm, mse_err, minmax_err)
                assert torch.equal(scale_mse.half().float(), scale_mse)  # scales still hold fp16 values
            assert (mse_err < minmax_err).sum() >= 3 and (mse_err / minmax_err).mean() < 0.99  # weight-like groups gain


def _rtn(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """Asymmetric min-max round to nearest per group, as onnxruntime's RTN: W [out, in] -> dequantized [out, in]."""
    out = []
    for g in range(0, W.shape[1], group_size):
        block = W[:, g : g + group_size]
        lo = torch.minimum(block.min(1, keepdim=True).values, torch.zeros(1))
        hi = torch.maximum(block.max(1, keepdim=True).values, torch.zeros(1))
        scale = (hi - lo) / 15
        zero = torch.round(-lo / scale)
        out.append(scale * (torch.clamp(torch.round(block / scale) + zero, 0, 15) - zero))
    return torch.cat(out, 1)


def test_act_order_keeps_static_in_order_groups_and_beats_round_to_nearest():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen)
    X[:, 40] *= 8  # one loud input channel in the second group: act-order solves it first
    W = torch.randn(32, 64, generator=gen)
    H = 2 * X.T @ X / X.shape[0]
    codes, scales, zeros = gptq_linear(W, H, bits=4, group_size=32, sym=False, act_order=True)
    for g in range(2):  # static groups: each group's scale/zero is the one of the weight before solving
        scale, zero = _find_params(W[:, g * 32 : (g + 1) * 32], 4, sym=False, mse=True)
        assert torch.equal(scales[g].float(), scale) and torch.equal(zeros[g], zero.int())
    q = QuantizedLinear(codes, scales, zeros, None, 32, 4)
    assert pack_gptq(q)["g_idx"].tolist() == [i // 32 for i in range(64)]
    err = ((X @ (W - q.dequantize()).T) ** 2).mean()
    rtn_err = ((X @ (W - _rtn(W, 32)).T) ** 2).mean()
    assert err < 0.6 * rtn_err, (err, rtn_err)


def test_every_layer_of_the_tiny_decoder_has_a_lower_output_error_than_rtn(tiny_model_dir, tiny_calib_data):
    """||W X - Q X||^2 = tr(E H E^T) per Linear, on the calibration inputs GPTQ saw (blocks before quantized)."""
    import export.gptq_solver as solver

    model = TinyGPTV.from_pretrained(tiny_model_dir)
    sequences = multimodal_sequences(model, model.load_tokenizer(tiny_model_dir), tiny_calib_data, 6)
    errors = []
    solve = solver.gptq_linear

    def measured(weight, H, *args, **kwargs):
        codes, scales, zeros = solve(weight, H, *args, **kwargs)
        W = weight.detach().float()
        for Q in (QuantizedLinear(codes, scales, zeros, None, 32, 4).dequantize(), _rtn(W, 32)):
            errors.append(float(torch.trace((W - Q) @ H @ (W - Q).T)))
        return codes, scales, zeros

    solver.gptq_linear = measured
    try:
        solver.quantize_decoder(model.language_model, [torch.from_numpy(s.inputs_embeds) for s in sequences])
    finally:
        solver.gptq_linear = solve
    gptq, rtn = errors[0::2], errors[1::2]
    assert len(gptq) == 13 and all(g < r for g, r in zip(gptq, rtn)), list(zip(gptq, rtn))


@pytest.fixture(scope="module")
def gptq_dir(tiny_model_dir, tmp_path_factory, tiny_calib_data):
    model = TinyGPTV.from_pretrained(tiny_model_dir)
    out = tmp_path_factory.mktemp("gptq") / "ckpt"
    gptq_export(
        model,
        model.load_tokenizer(tiny_model_dir),
        out,
        calib_data=tiny_calib_data,
        calib_samples=6,
        tokenizer_file=tiny_model_dir / "tokenizer.json",
    )
    return out


def test_checkpoint_folder_is_standard_and_loads_back(tiny_model_dir, gptq_dir):
    qcfg = json.loads((gptq_dir / "quantize_config.json").read_text())
    assert {k: qcfg[k] for k in ("bits", "group_size", "sym", "desc_act", "lm_head", "checkpoint_format")} == {
        "bits": 4, "group_size": 32, "sym": False, "desc_act": False, "lm_head": True, "checkpoint_format": "gptq"}  # fmt: skip
    assert qcfg["mse"] == 2.4 and qcfg["static_groups"] is False and qcfg["meta"]["act_order"] is False
    assert qcfg["meta"]["calibration"]["sequences"] == 6
    hf = json.loads((gptq_dir / "config.json").read_text())
    assert hf["model_type"] == "phi" and hf["quantization_config"]["quant_method"] == "gptq"
    qcfg2, quantized, rest = read_gptq_decoder(gptq_dir)
    assert len(quantized) == 13  # 2 layers x (q, k, v, dense, fc1, fc2) + lm_head
    assert quantized["model.layers.0.self_attn.q_proj"].codes.shape == (64, 64)
    assert "model.embed_tokens.weight" in rest and "model.layers.0.self_attn.q_proj.weight" not in rest
    original = TinyGPTV.from_pretrained(tiny_model_dir)
    loaded = load_gptq_model(gptq_dir)
    w = loaded.language_model.model.layers[1].mlp.fc2.weight
    assert torch.equal(w, quantized["model.layers.1.mlp.fc2"].dequantize())
    err = (w - original.language_model.model.layers[1].mlp.fc2.weight).abs().max()
    assert 0 < err < 0.02  # quantized, but close: weights ~N(0, 0.02), 16 levels per group
    assert torch.equal(loaded.vision_model.embeddings.patch_embedding.weight,
                       original.vision_model.embeddings.patch_embedding.weight)  # fmt: skip


@pytest.mark.parametrize("level, tolerance", [(0, 1e-5), (4, 3e-2)])
def test_onnx_int4_from_checkpoint_agrees_with_pytorch(
    tiny_model_dir, tiny_export_dir, gptq_dir, tmp_path, level, tolerance, tiny_eval_data
):
    """The same integers in MatMulNBits: fp32 arithmetic (level 0) agrees to 1e-5; int8 activations (level 4) to 3e-2."""
    decoder = shutil.copy(tiny_export_dir / "decoder.onnx", tmp_path / "decoder.onnx")
    set_logits_positions(decoder, "all")  # compare every position, not only the last
    assert pack_checkpoint_into(decoder, gptq_dir, accuracy_level=level)["matmulnbits"] == 13
    session = open_session(decoder)
    reference = load_gptq_model(gptq_dir)
    model = TinyGPTV.from_pretrained(tiny_model_dir)
    worst = 0.0
    for seq in multimodal_sequences(model, model.load_tokenizer(tiny_model_dir), tiny_eval_data, 3):
        feed = decoder_feed(seq.inputs_embeds, model.config)
        (logits,) = session.run(["logits"], feed)
        with torch.no_grad():
            ref, _ = reference.decode(
                *(torch.from_numpy(feed[k]) for k in ("inputs_embeds", "attention_mask", "position_ids"))
            )
        worst = max(worst, float(np.abs(logits - ref.numpy()).max()))
    assert worst < tolerance


def test_cli_refuses_existing_and_missing(tmp_path, capsys, gptq_dir, tiny_calib_data):
    data = ["--calib-data", str(tiny_calib_data)]
    assert main(["--model", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *data]) == 2
    assert "no such model folder" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "none"), "--out", str(gptq_dir), *data]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err


def test_act_order_checkpoint_is_in_order_and_agrees_with_onnx(
    tiny_model_dir, tiny_export_dir, tmp_path, tiny_calib_data, tiny_eval_data
):
    model = TinyGPTV.from_pretrained(tiny_model_dir)
    tokenizer = model.load_tokenizer(tiny_model_dir)
    out = tmp_path / "ckpt"
    gptq_export(model, tokenizer, out, calib_data=tiny_calib_data, calib_samples=4, act_order=True, damp=0.1,
                tokenizer_file=tiny_model_dir / "tokenizer.json")  # fmt: skip
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert (qcfg["desc_act"], qcfg["static_groups"], qcfg["meta"]["act_order"], qcfg["damp_percent"]) == (
        False, True, True, 0.1)  # fmt: skip
    decoder = shutil.copy(tiny_export_dir / "decoder.onnx", tmp_path / "decoder.onnx")
    set_logits_positions(decoder, "all")
    assert pack_checkpoint_into(decoder, out, accuracy_level=0)["matmulnbits"] == 13
    reference = load_gptq_model(out)
    seq = multimodal_sequences(model, tokenizer, tiny_eval_data, 1)[0]
    feed = decoder_feed(seq.inputs_embeds, model.config)
    (logits,) = open_session(decoder).run(["logits"], feed)
    with torch.no_grad():
        ref, _ = reference.decode(
            *(torch.from_numpy(feed[k]) for k in ("inputs_embeds", "attention_mask", "position_ids"))
        )
    assert np.abs(logits - ref.numpy()).max() < 1e-5
