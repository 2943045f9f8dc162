"""The PyTorch model: Phi parity with transformers, KV-cache consistency, image embedding, folders and strict loading."""

import pytest
import torch
from transformers import PhiConfig, PhiForCausalLM

from core.config import ModelConfig
from core.model import TinyGPTV
from core.phi import PhiDecoder, position_ids_from_mask
from core.prompts import PromptError
from core.weights import WeightsError, load_phi_folder, load_strict, write_phi_folder

TINY = ModelConfig.preset("tiny")


def hf_phi(lm, qk_layernorm=False):
    return PhiConfig(
        vocab_size=lm.vocab_size,
        hidden_size=lm.hidden_size,
        intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_heads,
        partial_rotary_factor=lm.partial_rotary_factor,
        rope_theta=lm.rope_theta,
        max_position_embeddings=lm.max_position_embeddings,
        qk_layernorm=qk_layernorm,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )


@pytest.fixture(scope="module")
def hf_phi_dir(tmp_path_factory):
    torch.manual_seed(0)
    lm = TINY.language_model
    model = PhiForCausalLM(hf_phi(lm)).eval()
    path = tmp_path_factory.mktemp("phi")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def test_stock_phi_matches_transformers_from_a_phi_folder(hf_phi_dir):
    path, reference = hf_phi_dir
    ours = PhiDecoder(TINY.language_model.replace(qk_layernorm=False, post_attention_rmsnorm=False)).eval()
    assert load_phi_folder(ours, path) == []
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got, _ = ours(ours.embed_tokens(ids), mask, position_ids_from_mask(mask, 9))
    assert (got - expected).abs().max().item() <= 1e-5


def test_tinygptv_norms_start_fresh_on_stock_phi_and_only_they_may_be_missing(hf_phi_dir):
    path, _ = hf_phi_dir
    ours = PhiDecoder(TINY.language_model)
    added = load_phi_folder(ours, path)
    assert len(added) == TINY.language_model.num_layers * 5  # q-LN w/b, k-LN w/b, post RMSNorm w
    assert torch.equal(ours.model.layers[0].post_layernorm.weight, torch.ones(TINY.language_model.hidden_size))


def test_qk_layernorm_matches_transformers_phi_with_qk_layernorm():
    torch.manual_seed(2)
    lm = TINY.language_model.replace(post_attention_rmsnorm=False)
    reference = PhiForCausalLM(hf_phi(lm, qk_layernorm=True)).eval()
    ours = PhiDecoder(lm).eval()
    load_strict(ours, reference.state_dict(), source="hf")
    ids = torch.randint(0, 120, (1, 6))
    mask = torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        got, _ = ours(ours.embed_tokens(ids), mask, position_ids_from_mask(mask, 6))
    assert (got - reference(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_write_phi_folder_loads_in_transformers(tmp_path):
    lm = TINY.language_model.replace(qk_layernorm=False, post_attention_rmsnorm=False)
    ours = PhiDecoder(lm).eval()
    write_phi_folder(ours, tmp_path)
    reference = PhiForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 120, (1, 5))
    mask = torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        got, _ = ours(ours.embed_tokens(ids), mask, position_ids_from_mask(mask, 5))
    assert (got - reference(input_ids=ids).logits).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return TinyGPTV(TINY).eval()


def prompt_ids(*text_ids, image=True):
    n, img = TINY.num_image_tokens, TINY.prompt.image_token_id
    return [0, *text_ids[:2], *([img] * n if image else []), *text_ids[2:]]


def test_step_by_step_decode_equals_full_forward(tiny_model):
    ids = torch.tensor([prompt_ids(5, 6, 7, 8, 9, 10)])
    feats = tiny_model.encode_image(torch.randn(1, 3, 32, 32))
    embeds = tiny_model.embed(ids, feats)  # [1, T, D]
    T = ids.shape[1]
    mask = torch.ones(1, T, dtype=torch.long)
    with torch.no_grad():
        full, _ = tiny_model.decode(embeds, mask, position_ids_from_mask(mask, T))
        logits, past = tiny_model.decode(embeds[:, :4], mask[:, :4], position_ids_from_mask(mask[:, :4], 4), None)
        steps = [logits]
        for t in range(4, T):
            logits, past = tiny_model.decode(
                embeds[:, t : t + 1], mask[:, : t + 1], position_ids_from_mask(mask[:, : t + 1], 1), past
            )
            steps.append(logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5
    assert past[0][0].shape == (1, TINY.language_model.num_heads, T, TINY.language_model.head_size)


def test_cached_greedy_equals_uncached_with_left_padding(tiny_model):
    prompts = [prompt_ids(5, 6, 7, 8), prompt_ids(9, 10, 11)[:3] + prompt_ids(9, 10, 11)[3:]]
    prompts[1] = prompts[1][:-1]  # different lengths: the batch is left-padded
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cached = tiny_model.generate(prompts, pixel_values=pixels, max_new_tokens=12, stop_ids=())
    uncached = tiny_model.generate(prompts, pixel_values=pixels, max_new_tokens=12, stop_ids=(), use_cache=False)
    assert cached.tokens == uncached.tokens
    assert all(len(t) == 12 for t in cached.tokens)
    # each row alone gives the same tokens as in the padded batch
    alone = tiny_model.generate(prompts[1:], pixel_values=pixels[1:], max_new_tokens=12, stop_ids=())
    assert alone.tokens[0] == cached.tokens[1]


def test_sampling_is_seeded(tiny_model):
    prompts = [prompt_ids(5, 6, 7)]
    pixels = torch.randn(1, 3, 32, 32)
    kwargs = dict(
        pixel_values=pixels,
        max_new_tokens=10,
        stop_ids=(),
        temperature=0.9,
        top_k=30,
        top_p=0.9,
        repetition_penalty=1.2,
    )
    a = tiny_model.generate(prompts, seed=7, **kwargs)
    b = tiny_model.generate(prompts, seed=7, **kwargs)
    assert a.tokens == b.tokens
    assert TINY.prompt.image_token_id not in a.tokens[0]


def test_embed_puts_image_vectors_exactly_at_the_placeholder(tiny_model):
    ids = torch.tensor([prompt_ids(5, 6, 7)])
    feats = torch.randn(1, TINY.num_image_tokens, TINY.language_model.hidden_size)
    embeds = tiny_model.embed(ids, feats)
    start = 3
    assert torch.equal(embeds[0, start : start + TINY.num_image_tokens], feats[0])
    assert torch.equal(embeds[0, :start], tiny_model.language_model.embed_tokens(ids[:, :start])[0])
    assert torch.equal(embeds[0, -1], tiny_model.language_model.embed_tokens(ids[:, -1:])[0, 0])


def test_wrong_number_of_image_tokens_fails_clearly(tiny_model):
    n = TINY.num_image_tokens
    bad = torch.tensor([[0, 5] + [TINY.prompt.image_token_id] * (2 * n)])
    with pytest.raises(PromptError, match=f"row 0 holds {2 * n} image tokens; each image takes exactly {n}"):
        tiny_model.check_image_tokens(bad)
    with pytest.raises(PromptError, match="hold 1 image placeholder"):
        tiny_model.check_image_tokens(torch.tensor([prompt_ids(5, 6)]), n_images=2)


def test_position_embeddings_interpolate_at_twice_the_size(tiny_model):
    feats = tiny_model.encode_image(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, TINY.num_image_tokens, TINY.language_model.hidden_size)


def test_save_and_load_pretrained_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    again = TinyGPTV.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_strict_loading_lists_missing_and_unexpected_keys(tiny_model):
    state = dict(tiny_model.state_dict())
    state.pop("projector.fc1.weight")
    state["projector.fc3.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as err:
        load_strict(TinyGPTV(TINY), state, source="x.safetensors")
    message = str(err.value)
    assert "missing keys (1): projector.fc1.weight" in message
    assert "unexpected keys (1): projector.fc3.weight" in message


def test_forward_loss_counts_answer_tokens_only(tiny_model):
    ids = torch.tensor([prompt_ids(5, 6, 7, 8)])
    labels = torch.full_like(ids, -100)
    labels[0, -1] = 8
    out = tiny_model(ids, torch.ones_like(ids), labels=labels, pixel_values=torch.randn(1, 3, 32, 32))
    expected = torch.nn.functional.cross_entropy(out["logits"][0, -2:-1], torch.tensor([8]))
    assert abs(out["loss"].item() - expected.item()) < 1e-6
