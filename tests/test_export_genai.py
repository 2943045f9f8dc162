"""onnxruntime-genai runs the export folder through genai_config.json and gives PyTorch's greedy tokens.

Skipped cleanly where onnxruntime-genai is not installed (`pip install onnxruntime-genai==0.18.*`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.image import preprocess_for
from core.model import TinyGPTV
from core.phi import position_ids_from_mask
from export.validate import demo_image

og = pytest.importorskip("onnxruntime_genai")


def greedy_reference(model: TinyGPTV, prompt: list[int], features: torch.Tensor, steps: int) -> list[int]:
    """Plain greedy with the KV cache, every id allowed (genai has no way to forbid the image id; a trained model
    never picks it since it is never a target)."""
    ids = torch.tensor([prompt])  # [1, T]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits, past = model.decode(model.embed(ids, features), mask, position_ids_from_mask(mask, ids.shape[1]))
        tokens = []
        for _ in range(steps):
            tokens.append(int(logits[0, -1].argmax()))
            step = torch.tensor([[tokens[-1]]])
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
            logits, past = model.decode(model.embed(step, features), mask, position_ids_from_mask(mask, 1), past)
    return tokens


def genai_greedy(folder, prompt: list[int], features: np.ndarray, steps: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_model_input("image_features", features)
    generator.append_tokens(np.array(prompt, dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def test_genai_text_prompt_matches_pytorch_greedy(tiny_model_dir, tiny_export_dir):
    model = TinyGPTV.from_pretrained(tiny_model_dir)
    prompt = [0, 5, 9, 33, 12, 40, 7]
    zeros = torch.zeros(1, 1, model.config.language_model.hidden_size)  # text only: one row of zeros, never read
    expected = greedy_reference(model, prompt, zeros, steps=10)
    assert genai_greedy(tiny_export_dir, prompt, zeros.numpy(), steps=10) == expected


def test_genai_image_prompt_matches_pytorch_greedy(tiny_model_dir, tiny_export_dir):
    """vision.onnx's features as genai's extra input: the image answer comes out of genai too."""
    model = TinyGPTV.from_pretrained(tiny_model_dir)
    cfg = model.config
    tokenizer = model.load_tokenizer(tiny_model_dir)
    prompt = tokenizer.encode_prompt("[INST] <Img><ImageHere></Img> [vqa] What color is the circle? [/INST]", 1, 8)
    pixels = torch.from_numpy(preprocess_for(demo_image(cfg.image.size), cfg.image))[None]  # [1, 3, S, S]
    with torch.no_grad():
        features = model.encode_image(pixels)  # [1, N, D]
    expected = greedy_reference(model, prompt, features, steps=8)
    assert genai_greedy(tiny_export_dir, prompt, features.numpy(), steps=8) == expected


@pytest.fixture(scope="module")
def gqa_export_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with --attention gqa: genai binds past and present to one buffer (past_present_share_buffer)."""
    from export.onnx import ExportOptions, export_folder

    out = tmp_path_factory.mktemp("genai_gqa") / "gqa"
    export_folder(out, tiny_model_dir, ExportOptions(attention="gqa"))
    return out


def test_genai_runs_the_gqa_decoder_with_a_shared_buffer(tiny_model_dir, gqa_export_dir):
    model = TinyGPTV.from_pretrained(tiny_model_dir)
    prompt = [0, 5, 9, 33, 12, 40, 7]
    zeros = torch.zeros(1, 1, model.config.language_model.hidden_size)
    expected = greedy_reference(model, prompt, zeros, steps=10)
    assert genai_greedy(gqa_export_dir, prompt, zeros.numpy(), steps=10) == expected
