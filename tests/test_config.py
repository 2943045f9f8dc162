"""Config: presets carry the real sizes, JSON round trips, unknown keys and wrong types are named."""

import json
import subprocess
import sys

import pytest

from core.config import ConfigError, ModelConfig


def test_tinygptv_preset_has_the_real_sizes():
    cfg = ModelConfig.preset("tinygptv")
    assert (cfg.vision.num_layers, cfg.vision.hidden_size, cfg.vision.patch_size) == (39, 1408, 14)
    assert (cfg.qformer.num_query_tokens, cfg.qformer.hidden_size, cfg.qformer.cross_attention_frequency) == (
        32,
        768,
        2,
    )
    assert (cfg.projector.hidden_size, cfg.language_model.hidden_size) == (4096, 2560)
    lm = cfg.language_model
    assert (lm.num_layers, lm.num_heads, lm.head_size, lm.rotary_dim, lm.vocab_size) == (32, 32, 80, 32, 51200)
    assert lm.qk_layernorm and lm.post_attention_rmsnorm


@pytest.mark.parametrize("name", ["tiny", "demo", "tinygptv"])
def test_json_round_trip(tmp_path, name):
    cfg = ModelConfig.preset(name)
    cfg.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == cfg
    assert cfg.prompt.image_token_id < cfg.language_model.vocab_size


def test_unknown_key_is_named(tmp_path):
    data = ModelConfig.preset("tiny").to_dict()
    data["language_model"]["num_layer"] = 3
    with pytest.raises(ConfigError, match=r"language_model: unknown key\(s\) num_layer; known keys are vocab_size"):
        ModelConfig.from_dict(data)


def test_wrong_type_is_named():
    data = ModelConfig.preset("tiny").to_dict()
    data["vision"]["num_layers"] = "4"
    with pytest.raises(ConfigError, match=r"ModelConfig.vision.num_layers: expected an integer, got str '4'"):
        ModelConfig.from_dict(data)
    data["vision"]["num_layers"] = 4
    data["image"]["mean"] = [0.5, "x", 0.5]
    with pytest.raises(ConfigError, match=r"image.mean\[1\]: expected a number"):
        ModelConfig.from_dict(data)


def test_unknown_preset_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'big'; choose one of tiny, demo, tinygptv"):
        ModelConfig.preset("big")
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "c.json")


def test_core_and_torch_free_modules_do_not_import_torch():
    code = (
        "import sys, json, core, core.config, core.prompts, core.tokenizer, core.image, core.boxes\n"
        "print(json.dumps('torch' in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) is False


def test_inconsistent_sizes_are_refused_with_the_numbers():
    data = ModelConfig.preset("tiny").to_dict()
    data["prompt"]["image_token_id"] = 500
    data["image"]["size"] = 36
    with pytest.raises(
        ConfigError, match=r"image.size 36 is not a multiple of patch_size 8; prompt.image_token_id 500 is outside"
    ):
        ModelConfig.from_dict(data)
