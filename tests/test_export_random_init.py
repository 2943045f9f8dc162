"""--preset NAME --random-init: parts get random weights one graph at a time; the folder is smoke-validated."""

from __future__ import annotations

import pytest
import torch

from core.config import ModelConfig
from core.phi import RotaryEmbedding
from export.folder import ExportError
from export.onnx import ExportOptions, export_folder
from export.random_init import lazy_random_model, materialized


def test_materialized_holds_only_the_graph_parts_and_releases_them():
    model = lazy_random_model(ModelConfig.preset("tiny"))
    assert all(p.is_meta for p in model.parameters())
    with materialized(model, "decoder", seed=0):
        lm = model.language_model
        assert not any(p.is_meta for p in lm.parameters()) and model.vision_model.embeddings.class_embedding.is_meta
        q = lm.model.layers[0].self_attn.q_proj
        assert 0.015 < float(q.weight.detach().std()) < 0.025 and float(q.bias.detach().abs().max()) == 0.0
        assert float(lm.model.layers[0].input_layernorm.weight.detach().min()) == 1.0
        assert torch.equal(lm.rotary.inv_freq, RotaryEmbedding(model.config.language_model).inv_freq)
        first = q.weight.clone()
    assert all(p.is_meta for p in model.parameters())
    with materialized(model, "decoder", seed=0):
        assert torch.equal(model.language_model.model.layers[0].self_attn.q_proj.weight, first)  # seeded per part
    with materialized(model, "vision", seed=0):
        assert not model.query_tokens.is_meta and model.language_model.lm_head.weight.is_meta


def test_random_init_int4_folder_is_smoke_validated(tmp_path, reuse_tiny_graphs):
    manifest = export_folder(tmp_path / "r", preset="tiny", options=ExportOptions(precision="int4", quant="rtn"))
    validation = manifest["validation"]
    assert validation["passed"] and validation["finite"] and validation["signature_problems"] == []
    assert validation["pytorch_comparison"].startswith("skipped")
    assert manifest["source"]["random_init"] and manifest["source"]["checkpoint_sha256"] is None
    assert "stand-in" in manifest["source"]["tokenizer"] and "tokenizer.json" in manifest["files"]
    assert manifest["quantization"]["decoder"]["matmulnbits"] == 13 and "quality" not in manifest


def test_random_init_refuses_gptq(tmp_path):
    with pytest.raises(ExportError, match="GPTQ needs trained weights.*--quant rtn or hqq"):
        export_folder(tmp_path / "r", preset="tiny", options=ExportOptions(precision="int4", quant="gptq"))
    assert list(tmp_path.iterdir()) == []


def test_image_size_traces_the_vision_graph_at_that_size_with_interpolated_positions(tmp_path):
    """--image-size 48 on the tiny preset (trained at 32 px, as 448 is to TinyGPT-V's 224): the graph takes 48 px
    and gives PyTorch's features, position embeddings interpolated inside the graph."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from export.graphs import export_graph
    from export.onnx import load_model

    model, _ = load_model(None, "tiny", image_size=48)
    assert model.config.image.size == 48 and model.config.vision.image_size == 32
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with materialized(model, "vision", seed=0):
        export_graph(model, "vision", tmp_path / "vision.onnx")
        with torch.no_grad():
            reference = model.encode_image(pixels).numpy()  # [2, N, D]
    dims = onnx.load(str(tmp_path / "vision.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == ["batch_size", 3, 48, 48]
    session = ort.InferenceSession(str(tmp_path / "vision.onnx"), providers=["CPUExecutionProvider"])
    (features,) = session.run(None, {"pixel_values": pixels.numpy()})
    assert features.shape == reference.shape and np.abs(features - reference).max() < 1e-5


def test_image_size_is_checked(tmp_path, tiny_model_dir):
    with pytest.raises(ExportError, match="--image-size 50: must be a positive multiple of the patch size 8"):
        export_folder(tmp_path / "r", preset="tiny", options=ExportOptions(image_size=50))
    with pytest.raises(ExportError, match="--image-size is for --random-init"):
        export_folder(tmp_path / "r", tiny_model_dir, options=ExportOptions(image_size=48))
    assert list(tmp_path.iterdir()) == []


def test_graphs_from_copies_the_graphs_it_holds_and_traces_the_rest(tmp_path, tiny_export_dir, capsys):
    """The 448-px folder of a random-init model from the 224-px one's graphs: decoder and embedding copied, and the
    vision graph, which the source holds at another size, traced at the asked one."""
    import shutil

    import onnx

    from export.onnx import main

    source = tmp_path / "fp32"
    source.mkdir()
    for name in ("decoder.onnx", "embedding.onnx", "vision.onnx"):
        shutil.copy(tiny_export_dir / name, source / name)
    manifest = export_folder(tmp_path / "r", preset="tiny", options=ExportOptions(image_size=48), graphs_from=source)
    assert manifest["image"]["size"] == 48 and manifest["validation"]["passed"]
    assert (tmp_path / "r" / "decoder.onnx").read_bytes() == (source / "decoder.onnx").read_bytes()
    dims = onnx.load(str(tmp_path / "r" / "vision.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims] == ["batch_size", 3, 48, 48]
    argv = ["--preset", "tiny", "--random-init", "--out", str(tmp_path / "x"), "--graphs-from", str(tmp_path / "no")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: --graphs-from {tmp_path / 'no'}: no such folder"
