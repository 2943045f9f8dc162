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
from export.gptq_solver import QuantizedLinear, gptq_linear, pack_gptq, unpack_gptq
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
        "bits": 4, "group_size": 32, "sym": True, "desc_act": False, "lm_head": True, "checkpoint_format": "gptq"}  # fmt: skip
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
