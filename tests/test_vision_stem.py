"""The optional conv stem of the ViT's patch embedding (core.vision_stem): config, BLIP-2 folder, ONNX graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.config import ConfigError, ModelConfig
from core.model import TinyGPTV
from core.vision_stem import ConvStemPatchEmbedding
from core.weights import WeightsError, load_blip2_folder, vision_configs_from_blip2, write_blip2_folder


def stem_config(channels: tuple[int, ...] = (8, 16)) -> ModelConfig:
    cfg = ModelConfig.preset("tiny")
    return cfg.replace(vision=cfg.vision.replace(conv_stem=channels))


def test_stem_gives_the_patch_grid_beside_the_plain_projection():
    torch.manual_seed(0)
    model = TinyGPTV(stem_config((8, 16))).eval()
    embedding = model.vision_model.embeddings.patch_embedding
    assert isinstance(embedding, ConvStemPatchEmbedding)
    assert embedding.weight.shape == (32, 3, 8, 8)  # the plain patch projection, under its own name
    assert embedding.stem_projection.weight.shape == (32, 16, 2, 2)  # what two halvings leave of the 8 px patch
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert embedding(pixels).shape == (2, 32, 6, 6)  # 48 px / patch 8
        torch.nn.init.zeros_(embedding.stem_projection.weight), torch.nn.init.zeros_(embedding.stem_projection.bias)
        plain = torch.nn.functional.conv2d(pixels, embedding.weight, embedding.bias, stride=8)
        assert torch.equal(embedding(pixels), plain)  # without the stem's share, the plain ViT's patch tokens
    keys = sorted(k.split("patch_embedding.")[1] for k in model.state_dict() if ".patch_embedding." in k)
    assert keys == ["bias", "stem.0.bias", "stem.0.weight", "stem.1.bias", "stem.1.weight", "stem.3.bias",
                    "stem.3.weight", "stem.4.bias", "stem.4.weight", "stem_projection.bias", "stem_projection.weight",
                    "weight"]  # fmt: skip
    plain_model = TinyGPTV(ModelConfig.preset("tiny"))
    assert isinstance(plain_model.vision_model.embeddings.patch_embedding, torch.nn.Conv2d)  # default: EVA's own


def test_stem_that_does_not_divide_the_patch_is_refused():
    with pytest.raises(
        ConfigError, match=r"vision.conv_stem \[4, 4, 4, 4\]: 4 stride-2 layers do not divide patch_size 8"
    ):
        stem_config((4, 4, 4, 4))


def test_stem_config_round_trips_through_the_blip2_folder(tmp_path):
    torch.manual_seed(0)
    cfg = stem_config((8, 16, 24))  # 1x1 projection after three halvings
    model = TinyGPTV(cfg).eval()
    write_blip2_folder(model, tmp_path / "stem")
    config = json.loads((tmp_path / "stem" / "config.json").read_text())
    assert config["vision_config"]["conv_stem"] == [8, 16, 24]
    vision, qformer = vision_configs_from_blip2(config, ModelConfig.preset("tiny"))
    assert vision == cfg.vision and qformer == cfg.qformer
    loaded = TinyGPTV(cfg.replace(vision=vision)).eval()
    load_blip2_folder(loaded, tmp_path / "stem")
    loaded.projector.load_state_dict(model.projector.state_dict())
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))

    # a stock folder (no stem) says nothing about one, reads as none, and does not load into a stem model
    write_blip2_folder(TinyGPTV(ModelConfig.preset("tiny")), tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "conv_stem" not in config["vision_config"]
    assert vision_configs_from_blip2(config, cfg)[0].conv_stem == ()
    with pytest.raises(WeightsError, match=r"missing .*patch_embedding\.stem\.0\.bias"):
        load_blip2_folder(TinyGPTV(cfg), tmp_path / "plain")


@pytest.mark.parametrize("size", [32, 64])
def test_stem_vision_graph_matches_pytorch(tmp_path, size):
    """The ONNX vision graph of a stem model gives PyTorch's image features, at the trained size and at twice it
    (position embeddings interpolated inside the graph)."""
    import onnxruntime as ort

    from export.graphs import export_graph

    torch.manual_seed(0)
    cfg = stem_config((8, 16))
    model = TinyGPTV(cfg.replace(image=cfg.image.replace(size=size))).eval()
    export_graph(model, "vision", tmp_path / "vision.onnx")
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    session = ort.InferenceSession(str(tmp_path / "vision.onnx"), providers=["CPUExecutionProvider"])
    (features,) = session.run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        reference = model.encode_image(pixels).numpy()  # [3, N, D]
    assert features.shape == reference.shape == (3, cfg.num_image_tokens, cfg.language_model.hidden_size)
    assert np.abs(features - reference).max() < 1e-5
