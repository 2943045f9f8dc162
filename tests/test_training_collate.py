"""The collator's exact token layouts and label masks, the stage presets and their schedule, LoRA target errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import train_tiny_tokenizer
from PIL import Image

from core.config import ConfigError, ModelConfig
from core.image import preprocess_for
from core.prompts import IMAGE_TEXT
from core.tokenizer import TextTokenizer
from training.collate import IGNORE, CollateError, Collator
from training.data.sample import Sample, Turn
from training.stages import STAGES, LoraSettings, ScheduleConfig, StageConfig

CFG = ModelConfig.preset("tiny")  # 8 image tokens, image id 127, BOS = EOS = 0
N, IMG = 8, 127


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer(train_tiny_tokenizer(), 0, 0, IMG)


def image(colour=(255, 0, 0)):
    return Image.new("RGB", (40, 30), colour)


def test_single_turn_stage4_layout_and_labels(tok):
    sample = Sample(image(), [Turn(f"{IMAGE_TEXT} [vqa] What color is the circle?", "red")], "t")
    batch = Collator(tok, CFG, "stage4", image_size=32, max_txt_len=100)([sample])
    before, after = tok.encode("[INST] <Img>"), tok.encode("</Img> [vqa] What color is the circle? [/INST]")
    prompt = [0, *before, *[IMG] * N, *after]
    answer = [*tok.encode("red"), 0]
    assert batch.input_ids.tolist() == [prompt + answer]
    assert batch.labels.tolist() == [[IGNORE] * len(prompt) + answer]
    assert batch.attention_mask.tolist() == [[1] * (len(prompt) + len(answer))]
    assert batch.n_targets == len(answer) and batch.truncated == 0
    expected = preprocess_for(sample.image, CFG.image.replace(size=32))
    np.testing.assert_array_equal(batch.pixel_values[0].numpy(), expected)


def test_multi_turn_masks_later_questions_and_pads_right(tok):
    two = Sample(
        image(),
        [Turn(f"{IMAGE_TEXT} [vqa] What shape is blue?", "square"), Turn("[vqa] Is there a yellow star?", "no")],
        "c",
    )
    one = Sample(image((0, 0, 255)), [Turn(IMAGE_TEXT, "red")], "s")
    batch = Collator(tok, CFG, "stage4", image_size=32, max_txt_len=200)([two, one])
    q1 = [0, *tok.encode("[INST] <Img>"), *[IMG] * N, *tok.encode("</Img> [vqa] What shape is blue? [/INST]")]
    a1 = [*tok.encode("square"), 0]
    q2 = [0, *tok.encode("[INST] [vqa] Is there a yellow star? [/INST]")]  # BOS opens every later turn, masked
    a2 = [*tok.encode("no"), 0]
    row0 = q1 + a1 + q2 + a2
    assert batch.input_ids[0].tolist() == row0
    assert batch.labels[0].tolist() == [IGNORE] * len(q1) + a1 + [IGNORE] * len(q2) + a2
    row1 = [0, *tok.encode("[INST] <Img>"), *[IMG] * N, *tok.encode("</Img> [/INST]"), *tok.encode("red"), 0]
    pad = len(row0) - len(row1)
    assert batch.input_ids[1].tolist() == row1 + [0] * pad  # pad = EOS
    assert batch.attention_mask[1].tolist() == [1] * len(row1) + [0] * pad
    assert batch.labels[1, len(row1) :].tolist() == [IGNORE] * pad


def test_stage1_caption_has_no_template_and_truncation_counts_text_only(tok):
    caption = "a red circle and a blue square"
    sample = Sample(image(), [Turn(IMAGE_TEXT, caption)], "laion")
    full = Collator(tok, CFG, "none", image_size=32, max_txt_len=100)([sample])
    expected = [0, *tok.encode("<Img>"), *[IMG] * N, *tok.encode("</Img>"), *tok.encode(caption), 0]
    assert full.input_ids[0].tolist() == expected
    text_tokens = len(expected) - N
    cut = Collator(tok, CFG, "none", image_size=32, max_txt_len=text_tokens - 3)([sample])
    assert cut.input_ids[0].tolist() == expected[:-3] and cut.truncated == 1  # the EOS is gone with the cut
    assert cut.labels[0, -1].item() == expected[-4]


def test_text_only_sample_gets_zero_pixels_and_no_image_ids(tok):
    sample = Sample(None, [Turn("How many shapes are there?", "two")], "unnatural_instruction")
    batch = Collator(tok, CFG, "stage4", image_size=32)([sample])
    assert (batch.input_ids != IMG).all() and batch.pixel_values.abs().sum() == 0


def test_image_and_placeholder_must_agree(tok):
    collate = Collator(tok, CFG, "stage4", image_size=32)
    with pytest.raises(CollateError, match="has an image but no turn holds '<ImageHere>'"):
        collate([Sample(image(), [Turn("[vqa] What color?", "red")], "vqa")])
    with pytest.raises(CollateError, match="turn 0 holds an image placeholder"):
        collate([Sample(None, [Turn(IMAGE_TEXT, "red")], "bad")])
    with pytest.raises(CollateError, match="turn 1 holds an image placeholder"):
        collate([Sample(image(), [Turn(IMAGE_TEXT, "a"), Turn(IMAGE_TEXT, "b")], "twice")])


# ---------------------------------------------------------------------------------------------- stages
def test_presets_follow_the_original_table():
    real = [StageConfig.preset(s) for s in STAGES]
    assert [s.image_size for s in real] == [224, 224, 224, 448]
    assert [s.template for s in real] == ["none", "none", "stage3", "stage4"]
    assert [s.lora.r for s in real] == [0, 64, 64, 64]
    assert all((s.lora.alpha, s.lora.dropout, s.lora.targets) == (16, 0.05, ("q_proj", "k_proj", "v_proj", "dense"))
               for s in real[1:])  # fmt: skip
    assert [s.batch_size for s in real] == [64, 64, 6, 1] and [s.max_txt_len for s in real] == [32, 32, 160, 1024]
    assert [(s.schedule.init_lr, s.schedule.min_lr) for s in real] == [
        (1e-4, 8e-5),
        (1e-4, 8e-5),
        (3e-5, 1e-5),
        (1e-5, 1e-6),
    ]
    assert [StageConfig.preset(s, "demo").image_size for s in STAGES] == [64, 64, 64, 128]


def test_stage_json_round_trip_and_unknown_keys(tmp_path):
    for scale in ("tinygptv", "demo", "tiny"):
        for name in STAGES:
            stage = StageConfig.preset(name, scale)
            stage.to_json(tmp_path / "s.json")
            assert StageConfig.from_json(tmp_path / "s.json") == stage
    with pytest.raises(ConfigError, match="unknown key"):
        StageConfig.from_dict({"stage": 1, "lora_rank": 8})


def test_schedule_values_at_known_steps():
    s1 = StageConfig.preset("stage1").schedule  # warmup 1e-6 -> 1e-4 over 1000, cosine to 8e-5 over 5000 from step 0
    assert s1.lr_at(0) == pytest.approx(1e-6)
    assert s1.lr_at(500) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    assert s1.lr_at(1000) == pytest.approx(8e-5 + 2e-5 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert s1.lr_at(2500) == pytest.approx(9e-5)
    assert s1.lr_at(5000) == pytest.approx(8e-5) and s1.lr_at(6000) == pytest.approx(8e-5)
    s4 = StageConfig.preset("stage4").schedule
    assert s4.lr_at(50000) == pytest.approx(1e-6) and s4.lr_at(1000) < 1e-5
    with pytest.raises(ConfigError, match="min_lr 8e-05 is above init_lr 1e-05"):
        ScheduleConfig(init_lr=1e-5, min_lr=8e-5)


def test_lora_wrong_target_lists_the_names_that_exist():
    from core.model import TinyGPTV
    from training.lora import LoraTargetError, add_lora

    model = TinyGPTV(CFG)
    with pytest.raises(LoraTargetError) as err:
        add_lora(model, LoraSettings(r=4, targets=("query_key_value", "dense")))
    message = str(err.value)
    assert "'query_key_value' match no linear layer" in message
    assert "named dense, fc1, fc2, k_proj, lm_head, q_proj, v_proj" in message
    assert "use q_proj, k_proj, v_proj" in message
    assert not any("lora_" in n for n, _ in model.named_parameters()) and torch.is_grad_enabled()
