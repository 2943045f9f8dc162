"""A BLIP-2 folder written by transformers loads into TinyGPT-V's vision side, its language parts ignored."""

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

from core.config import ModelConfig
from core.model import TinyGPTV, blip2_qformer_config, blip2_vision_config
from core.weights import load_blip2_folder


def test_transformers_blip2_folder_loads_and_gives_the_same_image_features(tmp_path):
    cfg = ModelConfig.preset("tiny")
    text = OPTConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16
    )
    hf_cfg = Blip2Config(
        vision_config=blip2_vision_config(cfg).to_dict(),
        qformer_config=blip2_qformer_config(cfg).to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=cfg.qformer.num_query_tokens,
    )
    torch.manual_seed(0)
    reference = Blip2ForConditionalGeneration(hf_cfg).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)

    ours = TinyGPTV(cfg).eval()
    ignored = load_blip2_folder(ours, tmp_path)
    assert "language_projection" in ignored and "language_model" in ignored

    pixels = torch.randn(1, 3, cfg.image.size, cfg.image.size)
    with torch.no_grad():
        image_embeds = reference.vision_model(pixels).last_hidden_state
        queries = reference.qformer(
            query_embeds=reference.query_tokens, encoder_hidden_states=image_embeds
        ).last_hidden_state  # [1, N, Dq]
        expected = ours.projector(queries)
        got = ours.encode_image(pixels)
    assert (got - expected).abs().max().item() <= 1e-5
