"""The fp32 export folder: graphs against PyTorch, manifest, atomic writing and the CLI's errors.

The folder itself is made once per session by the `tiny_export_dir` fixture (tests/conftest.py); tests that need
another export reuse its graphs through a patched `export_graph`, so each of them takes a second or two.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from core.model import TinyGPTV
from core.phi import position_ids_from_mask
from export import onnx as export_onnx
from export.folder import ExportError
from export.manifest import ManifestError, check_manifest, sha256_file
from export.validate import FP32_ATOL


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 2])
def test_decoder_matches_pytorch_prefill_and_decode(tiny_model_dir, tiny_plain_export_dir, batch):
    """The plain decoder: past length 0 at prefill, then 3 steps on each side's own cache; last-position logits and KV
    within 1e-5 (the GQA decoder's own check, on shared buffers: tests/test_gqa.py)."""
    model = TinyGPTV.from_pretrained(tiny_model_dir)
    lm = model.config.language_model
    decoder = _session(tiny_plain_export_dir / "decoder.onnx")
    names = [i.name for i in decoder.get_inputs()]
    gen = torch.Generator().manual_seed(batch)
    embeds = torch.randn(batch, 5, lm.hidden_size, generator=gen)  # [B, 5, D]
    mask = torch.ones(batch, 5, dtype=torch.long)
    mask[-1, :2] = 0 if batch > 1 else 1  # left padding on the last row of a batch
    ort_past = [np.zeros((batch, lm.num_heads, 0, lm.head_size), np.float32)] * (2 * lm.num_layers)
    pt_past = None
    worst = 0.0
    for _ in range(4):
        positions = position_ids_from_mask(mask, embeds.shape[1])
        out = decoder.run(None, dict(zip(names, [embeds.numpy(), mask.numpy(), positions.numpy(), *ort_past])))
        with torch.no_grad():
            logits, pt_past = model.decode(embeds, mask, positions, pt_past)
        refs = [logits[:, -1:], *[t for kv in pt_past for t in kv]]
        assert out[0].shape == (batch, 1, lm.vocab_size)  # lm_head runs for the last position only
        worst = max(worst, *(float(np.abs(o - r.numpy()).max()) for o, r in zip(out, refs)))
        assert out[1].shape[2] == mask.shape[1]  # present holds past + this step
        ort_past = out[1:]
        embeds = torch.randn(batch, 1, lm.hidden_size, generator=gen)  # [B, 1, D]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], 1)
    assert worst < 1e-5


def test_vision_and_embedding_match_pytorch(tiny_model_dir, tiny_export_dir):
    model = TinyGPTV.from_pretrained(tiny_model_dir)
    cfg = model.config
    pixels = torch.randn(3, 3, cfg.image.size, cfg.image.size, generator=torch.Generator().manual_seed(3))
    (features,) = _session(tiny_export_dir / "vision.onnx").run(None, {"pixel_values": pixels.numpy()})
    ids = torch.tensor([[0, 5] + [cfg.prompt.image_token_id] * cfg.num_image_tokens + [9, 4]] * 3)  # [3, T]
    (embeds,) = _session(tiny_export_dir / "embedding.onnx").run(
        None, {"input_ids": ids.numpy(), "image_features": features}
    )
    with torch.no_grad():
        ref_features = model.encode_image(pixels)  # [3, N, D]
        ref_embeds = model.embed(ids, ref_features)  # [3, T, D]
    assert features.shape == (3, cfg.num_image_tokens, cfg.language_model.hidden_size)
    assert np.abs(features - ref_features.numpy()).max() < 1e-5
    assert np.abs(embeds - ref_embeds.numpy()).max() < 1e-5


def test_manifest_describes_the_folder(tiny_model_dir, tiny_export_dir):
    manifest = check_manifest(tiny_export_dir)  # every sha256 and graph signature re-checked
    cfg = TinyGPTV.from_pretrained(tiny_model_dir).config
    assert manifest["schema_version"] == 1
    assert manifest["source"]["checkpoint_sha256"] == sha256_file(tiny_model_dir / "model.safetensors")
    assert manifest["files"] == {
        name: sha256_file(tiny_export_dir / name)
        for name in ("embedding.safetensors", "genai_config.json", "tokenizer.json")
    }
    assert manifest["embedding_table"] == {  # the embedding graph's table, for runtime.embedding's memory map
        "file": "embedding.safetensors", "weight": "embed_tokens.weight", "dtype": "float32", "shape": [128, 64]}  # fmt: skip
    assert manifest["decoder"] == {
        "kv_templates": {"past_key": "past_key_values.%d.key", "past_value": "past_key_values.%d.value",
                         "present_key": "present.%d.key", "present_value": "present.%d.value"},
        "num_layers": 2, "num_heads": 4, "num_kv_heads": 4, "head_size": 16, "hidden_size": 64,
        "context_length": 256, "vocab_size": 128, "logits_positions": "last", "attention": "gqa",
    }  # fmt: skip
    assert manifest["num_image_tokens"] == 8 and manifest["image_token_id"] == 127
    assert manifest["image"]["size"] == cfg.image.size and manifest["image"]["mean"] == list(cfg.image.mean)
    decoder = manifest["graphs"]["decoder"]
    assert [i["name"] for i in decoder["inputs"]][:4] == [
        "inputs_embeds", "attention_mask", "position_ids", "past_key_values.0.key"]  # fmt: skip
    assert decoder["inputs"][3]["shape"] == ["batch_size", 4, "max_sequence_length", 16]
    assert decoder["outputs"][0] == {"name": "logits", "dtype": "float32", "shape": ["batch_size", 1, 128]}
    assert decoder["outputs"][1] == {"name": "present.0.key", "dtype": "float32",
                                     "shape": ["batch_size", 4, "max_sequence_length", 16]}  # fmt: skip
    validation = manifest["validation"]
    assert validation["passed"] and validation["signature_problems"] == []
    assert validation["real"]["outputs"]["logits"]["max_abs_diff"] < FP32_ATOL
    assert [s["past_length"] for s in validation["random"]["decoder_steps"]] == [0, 15, 16, 17]
    assert all(s["argmax_equal"] for s in validation["real"]["decoder_steps"])


def test_manifest_check_names_a_tampered_file(tiny_export_dir, tmp_path):
    copy = shutil.copytree(tiny_export_dir, tmp_path / "copy")
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text() + " ")
    (copy / "stray.bin").write_bytes(b"x")
    with pytest.raises(ManifestError, match="tokenizer.json: sha256 differs.*stray.bin: not listed"):
        check_manifest(copy)


def test_refuses_existing_folder_and_force_replaces_it(tiny_model_dir, tmp_path, reuse_tiny_graphs):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_onnx.export_folder(out, tiny_model_dir)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    export_onnx.export_folder(out, tiny_model_dir, force=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "decoder.onnx", "embedding.onnx", "embedding.safetensors", "genai_config.json", "manifest.json",
        "tokenizer.json", "vision.onnx"]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_failed_validation_leaves_nothing(tiny_model_dir, tmp_path, reuse_tiny_graphs):
    """Graphs of the seed-0 model checked against a seed-1 model: fp32 validation fails, no folder appears."""
    torch.manual_seed(1)
    other = TinyGPTV(TinyGPTV.from_pretrained(tiny_model_dir).config).eval()
    with pytest.raises(ExportError, match=r"validation failed: random image_features: max abs diff \d"):
        export_onnx.export_folder(tmp_path / "out", tiny_model_dir, model=other)
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_are_one_line_and_leave_nothing(tiny_model_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tiny_model_dir / "config.json", broken / "config.json")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    cases = [
        (["--model", str(tmp_path / "missing")], "missing: no such model folder"),
        (["--model", str(broken)], "cannot load the model:.*model.safetensors: not a readable safetensors file"),
    ]
    for argv, message in cases:
        assert export_onnx.main([*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ")
        assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
