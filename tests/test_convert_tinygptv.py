"""The original TinyGPT-V checkpoint converter: fused per-head-interleaved qkv and its LoRA, norms, projector."""

import json

import pytest
import torch

from core.config import ModelConfig
from core.convert_tinygptv import ConversionError, convert, main, map_checkpoint
from core.model import TinyGPTV
from core.phi import position_ids_from_mask
from core.weights import phi_config_dict, save_safetensors, write_blip2_folder

TINY = ModelConfig.preset("tiny")
SCALE = 16 / 4  # lora_alpha 16, rank 4


def fuse_per_head(q, k, v, heads):
    """The original layout: rows [q_h, k_h, v_h] for each head h (BLOOM style)."""
    parts = [t.reshape(heads, -1, *t.shape[1:]) for t in (q, k, v)]  # [H, hs, ...] each
    return torch.stack(parts, dim=1).reshape(-1, *q.shape[1:])  # [H*3*hs, ...]


@pytest.fixture(scope="module")
def original_files(tmp_path_factory):
    """A truth model, and the files the original would have: base Phi (fused layout), BLIP-2 folder, stage .pth."""
    torch.manual_seed(0)
    cfg = TINY.replace(prompt=TINY.prompt.replace(image_token_id=TINY.language_model.vocab_size - 1))
    truth = TinyGPTV(cfg).eval()
    with torch.no_grad():  # norms away from their 1/0 start so that copying them is visible
        for name, p in truth.named_parameters():
            if "layernorm" in name or "post_layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    root = tmp_path_factory.mktemp("original")
    lm, heads, rank = cfg.language_model, cfg.language_model.num_heads, 4
    base, ckpt = {}, {}
    prefix = "llama_model.base_model.model."
    for key, value in truth.language_model.state_dict().items():
        if (
            "_layernorm" in key
            or "post_layernorm" in key
            or "final_layernorm.weight" in key
            or "input_layernorm.weight" in key
        ):
            if key.endswith("weight") or "_layernorm.bias" in key and ("q_layernorm" in key or "k_layernorm" in key):
                ckpt[prefix + key] = value.clone()
        if "post_layernorm" in key or "q_layernorm" in key or "k_layernorm" in key:
            continue
        base[key] = value.clone()
    for i in range(lm.num_layers):
        attn = f"model.layers.{i}.self_attn"
        a_qkv, b_qkv = torch.randn(rank, lm.hidden_size) * 0.1, torch.randn(3 * lm.hidden_size, rank) * 0.1
        a_d, b_d = torch.randn(rank, lm.hidden_size) * 0.1, torch.randn(lm.hidden_size, rank) * 0.1
        fused_w = fuse_per_head(*(base.pop(f"{attn}.{n}_proj.weight") for n in "qkv"), heads)
        base[f"{attn}.query_key_value.weight"] = fused_w - b_qkv @ a_qkv * SCALE
        base[f"{attn}.query_key_value.bias"] = fuse_per_head(*(base.pop(f"{attn}.{n}_proj.bias") for n in "qkv"), heads)
        base[f"{attn}.dense.weight"] = base[f"{attn}.dense.weight"] - b_d @ a_d * SCALE
        ckpt[f"{prefix}{attn}.query_key_value.lora_A.weight"] = a_qkv
        ckpt[f"{prefix}{attn}.query_key_value.lora_B.weight"] = b_qkv
        ckpt[f"{prefix}{attn}.dense.lora_A.default.weight"] = a_d
        ckpt[f"{prefix}{attn}.dense.lora_B.default.weight"] = b_d
    for ours, theirs in (("fc1", "llama_proj"), ("fc2", "llama_proj2")):
        for kind in ("weight", "bias"):
            ckpt[f"{theirs}.{kind}"] = getattr(truth.projector, ours).state_dict()[kind].clone()
    (root / "phi").mkdir()
    (root / "phi" / "config.json").write_text(json.dumps(phi_config_dict(lm.replace(qk_layernorm=False))))
    save_safetensors(base, root / "phi" / "model.safetensors")
    write_blip2_folder(truth, root / "blip2")
    torch.save({"model": ckpt, "epoch": 3}, root / "stage.pth")
    return truth, root


def test_converted_model_equals_the_truth(original_files):
    truth, root = original_files
    converted = convert(root / "stage.pth", root / "phi", root / "blip2")
    ids = torch.tensor([[0, 5, 6] + [converted.config.prompt.image_token_id] * TINY.num_image_tokens + [7, 8]])
    mask = torch.ones_like(ids)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = truth.decode(
            truth.embed(ids, truth.encode_image(pixels)), mask, position_ids_from_mask(mask, ids.shape[1])
        )[0]
        got = converted.decode(
            converted.embed(ids, converted.encode_image(pixels)), mask, position_ids_from_mask(mask, ids.shape[1])
        )[0]
    assert (got - want).abs().max().item() <= 1e-5


def test_unknown_checkpoint_key_fails_with_the_list():
    with pytest.raises(
        ConversionError, match="1 checkpoint key.* not in the conversion table: llama_model.model.mystery"
    ):
        map_checkpoint({"llama_model.model.mystery.weight": torch.zeros(1)}, num_heads=4)


def test_lora_without_its_pair_fails():
    key = "llama_model.base_model.model.model.layers.0.self_attn.dense.lora_A.weight"
    with pytest.raises(ConversionError, match=r"layer 0 dense: LoRA has \['A'\] but needs both A and B"):
        map_checkpoint({key: torch.zeros(4, 8)}, num_heads=4)


def test_cli_refuses_a_pickle_with_code_and_exits_2(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": Evil()}))
    code = main(
        [
            "--checkpoint",
            str(tmp_path / "evil.pth"),
            "--base-lm",
            str(tmp_path),
            "--base-vision",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "not a weights-only torch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
