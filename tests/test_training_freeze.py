"""What each stage trains: exactly the intended parameters get gradients; the real sizes counted on the meta device."""

from __future__ import annotations

import pytest
import torch

from core.config import ModelConfig
from core.model import TinyGPTV
from training.freeze import set_train_mode, set_trainable, trainable_group
from training.lora import add_lora, merge_lora
from training.stages import STAGES, StageConfig


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is far faster on one thread when the cores are shared
    yield
    torch.set_num_threads(threads)


def test_real_preset_counts_match_the_reference_without_allocating():
    with torch.device("meta"):
        model = TinyGPTV(ModelConfig.preset("tinygptv"))
    assert set_trainable(model) == {"projector": 13_638_144, "norms": 171_520, "lora": 0}  # stage 1: no LoRA
    add_lora(model, StageConfig.preset("stage2").lora)
    counts = set_trainable(model)
    # 13.64 M projector, (80+80+2560+2560)*32 + 2560 norm weights, 64*(2560+2560)*4*32 = 41.9 M of q/k/v/dense LoRA
    assert counts == {"projector": 13_638_144, "norms": 171_520, "lora": 41_943_040}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 55_752_704
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("name", STAGES)
def test_exactly_the_intended_parameters_get_gradients(name):
    stage = StageConfig.preset(name, "tiny")
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    model = TinyGPTV(cfg)
    add_lora(model, stage.lora)
    set_trainable(model)
    set_train_mode(model)
    assert model.language_model.training and not model.vision_model.training and not model.qformer.training
    n = cfg.num_image_tokens
    ids = torch.tensor([[0, 5, *[127] * n, 6, 7, 8, 0]])  # [1, T]
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    out = model(ids, torch.ones_like(ids), labels=labels, pixel_values=torch.randn(1, 3, 32, 32))
    out["loss"].backward()
    with_grad = {k for k, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    lm = "language_model.model"
    expected_norms = {f"{lm}.layers.{i}.{part}.weight" for i in range(2)
                      for part in ("input_layernorm", "self_attn.q_layernorm", "self_attn.k_layernorm", "post_layernorm")}  # fmt: skip
    expected = {"projector.fc1.weight", "projector.fc1.bias", "projector.fc2.weight", "projector.fc2.bias",
                *expected_norms, f"{lm}.final_layernorm.weight"}  # fmt: skip
    lora = {k for k in trainable if ".lora_" in k}
    assert len(lora) == (0 if stage.lora.r == 0 else 2 * 4 * 2)  # A and B x q/k/v/dense x 2 layers
    assert trainable == expected | lora
    # LoRA B starts at zero, so A gets no gradient in the first step; everything else trainable does
    assert with_grad == expected | {k for k in lora if "lora_B" in k}
    assert trainable_group(f"{lm}.layers.0.self_attn.q_layernorm.bias") is None
    assert trainable_group("query_tokens") is None and trainable_group(f"{lm}.embed_tokens.weight") is None


def test_merge_keeps_the_function_and_the_plain_names():
    torch.manual_seed(0)
    model = TinyGPTV(ModelConfig.preset("tiny")).eval()
    plain_names = set(model.state_dict())
    ids = torch.tensor([[0, 5, *[127] * 8, 6, 7]])
    pixels = torch.randn(1, 3, 32, 32)
    base = model(ids, torch.ones_like(ids), pixel_values=pixels)["logits"]
    add_lora(model, StageConfig.preset("stage2", "tiny").lora)
    model.eval()  # the new adapters' dropout modules start in training mode
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a trained-looking adapter
    adapted = model(ids, torch.ones_like(ids), pixel_values=pixels)["logits"]
    assert (adapted - base).abs().max() > 1e-3
    assert merge_lora(model) == 8  # q/k/v/dense x 2 layers
    merged = model(ids, torch.ones_like(ids), pixel_values=pixels)["logits"]
    assert set(model.state_dict()) == plain_names
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)


def test_qlora_puts_adapters_on_4bit_layers_or_says_what_is_missing():
    from training.lora import QLoraUnavailable, quantize_language_model

    model = TinyGPTV(ModelConfig.preset("tiny"))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(QLoraUnavailable, match="QLoRA needs bitsandbytes.*train without --qlora"):
            quantize_language_model(model)
        return
    assert quantize_language_model(model) == 12  # q/k/v/dense/fc1/fc2 x 2 layers
    model.to("cpu")  # bitsandbytes packs the weights when they move (accelerate's prepare does this in training)
    add_lora(model, StageConfig.preset("stage2", "tiny").lora)
    assert set_trainable(model)["lora"] == 4096
    ids = torch.tensor([[0, 5, *[127] * 8, 6, 7]])
    model(ids, torch.ones_like(ids), labels=ids, pixel_values=torch.randn(1, 3, 32, 32))["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
