"""The demo bootstrap: tokenizer, vision targets, the shared-norm decoder, and folders the stages load strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.config import ModelConfig
from training.data.synthetic import SyntheticWorld
from training.data.synthetic_scene import Scene, ShapeObject


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(seed=0, image_size=64)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_demo_tokenizer_layout_and_round_trip(world: SyntheticWorld) -> None:
    from training.tokenizer_train import ENDOFTEXT, train_world_tokenizer, world_texts

    cfg = ModelConfig.preset("demo")
    tok = train_world_tokenizer(world, cfg, n_scenes=40)
    assert tok.vocab_size <= cfg.prompt.image_token_id == 1023
    assert tok.tokenizer.token_to_id(ENDOFTEXT) == 0 == tok.bos_token_id == tok.eos_token_id
    ids = tok.encode("{<12><30><40><77>}")
    assert [tok.tokenizer.id_to_token(i) for i in ids] == ["{", "<12>", "<30>", "<40>", "<77>", "}"]
    assert tok.decode(tok.encode_prompt("[INST] <Img><ImageHere></Img> [vqa] x [/INST]", 1, 32)) == (
        "[INST] <Img></Img> [vqa] x [/INST]"  # BOS skipped, image ids dropped
    )
    texts = list(world_texts(SyntheticWorld(seed=5, image_size=64), 20, split="test"))  # another world, held out
    assert len(texts) > 500
    assert [t for t in texts if tok.decode(tok.encode(t)) != t] == []


def test_tiny_tokenizer_fits_under_its_image_token(world: SyntheticWorld) -> None:
    from training.tokenizer_train import train_world_tokenizer, world_texts

    cfg = ModelConfig.preset("tiny")
    tok = train_world_tokenizer(world, cfg, n_scenes=10)
    assert tok.vocab_size == 127 == cfg.prompt.image_token_id  # every id below the image id
    texts = list(world_texts(world, 10))  # no byte fallback at 127 ids: the text it was trained on
    assert [t for t in texts if tok.decode(tok.encode(t)) != t] == []


# ---------------------------------------------------------------------------------------------- vision targets
def _scene() -> Scene:
    from PIL import Image

    objects = (
        ShapeObject("red", "circle", "small", (4, 4, 12, 12), 0),  # cell 0, pixels 4..15 of 64
        ShapeObject("blue", "star", "large", (40, 40, 20, 20), 8),  # cell 8, pixels 40..59
    )
    return Scene("train", 0, Image.new("RGB", (64, 64), "white"), objects, "white")


def test_scene_and_patch_targets_by_hand() -> None:
    from training.bootstrap_vision import COLOUR_NAMES, patch_targets, scene_targets

    t = scene_targets([_scene()])
    red, blue = COLOUR_NAMES.index("red") + 1, COLOUR_NAMES.index("blue") + 1
    assert t.cell_colour[0].tolist() == [red, 0, 0, 0, 0, 0, 0, 0, blue]
    assert t.cell_shape[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 4]  # circle is shape 1, star shape 4
    assert t.cell_size[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert t.cell_box[0, 0].tolist() == pytest.approx([0.06, 0.06, 0.25, 0.25])  # int(4/64*100)=6, int(16/64*100)=25
    assert t.count.tolist() == [2] and t.shape_count[0].tolist() == [1, 0, 0, 1]
    assert t.pairs[0].sum() == 2
    square, triangle = _one_object("square"), _one_object("triangle")
    colour, shape = patch_targets([square, triangle], grid=8)  # 8 px patches over a 24 px box at the corner
    square_grid, triangle_grid = shape[0].view(8, 8), shape[1].view(8, 8)
    assert square_grid[:3, :3].tolist() == [[2] * 3] * 3 and int((square_grid > 0).sum()) == 9
    assert triangle_grid[0, 0] == 0 and triangle_grid[0, 2] == 0  # the triangle leaves its box's top corners empty
    assert triangle_grid[2].tolist()[:3] == [3, 3, 3]  # and fills its base
    assert int((colour[0] > 0).sum()) == 9 and colour[0, 0] == COLOUR_NAMES.index("red") + 1


def _one_object(shape: str) -> Scene:
    from PIL import Image

    return Scene(
        "train",
        0,
        Image.new("RGB", (64, 64), "white"),
        (ShapeObject("red", shape, "large", (0, 0, 24, 24), 0),),
        "white",
    )


def test_patch_warmup_trains_the_patch_embedding_and_first_mlp_only(world: SyntheticWorld) -> None:
    from core.model import TinyGPTV
    from training.bootstrap_patches import PatchWarmup, warm_up_patches

    cfg = ModelConfig.preset("tiny")
    torch.manual_seed(0)
    model = TinyGPTV(cfg.replace(vision=cfg.vision.replace(conv_stem=(8, 16))))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = warm_up_patches(model, world, PatchWarmup(scenes=6, epochs=2, batch_size=4))
    changed = {k.rsplit(".", 1)[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {
        "vision_model.embeddings.patch_embedding", "vision_model.embeddings.patch_embedding.stem.0",
        "vision_model.embeddings.patch_embedding.stem.1", "vision_model.embeddings.patch_embedding.stem.3",
        "vision_model.embeddings.patch_embedding.stem.4", "vision_model.embeddings.patch_embedding.stem_projection",
        "vision_model.encoder.layers.0.layer_norm2", "vision_model.encoder.layers.0.mlp.fc1",
        "vision_model.encoder.layers.0.mlp.fc2",
    }  # fmt: skip
    assert [e["epoch"] for e in report["log"]] == [0, 1] and all(e["loss"] > 0 for e in report["log"])


def test_patch_shape_term_reads_object_patches_only() -> None:
    """The patch head's shape logits on background patches do not move the loss; on object patches they do."""
    from training.bootstrap_vision import COLOUR_NAMES, VisionHeads, patch_targets, vision_loss

    torch.manual_seed(0)
    scenes = [_one_object("square")]
    heads = VisionHeads(8, 8)
    tokens, queries = torch.randn(1, 1 + 64, 8), torch.randn(1, 8, 8)
    n_col = len(COLOUR_NAMES) + 1
    colour, _ = patch_targets(scenes, grid=8)
    on = colour[0] > 0  # 9 object patches of 64

    def patch_loss(shape_bias: torch.Tensor, weight: float = 1.0) -> float:
        with torch.no_grad():
            heads.patch.bias[n_col:] = 0.0
            original = heads.patch.forward
            heads.patch.forward = lambda x: original(x) + shape_bias  # [B, P, 12] offsets per patch
            _, parts = vision_loss(heads, tokens, queries, scenes, patch_shape_weight=weight)
            heads.patch.forward = original
        return parts["patch"]

    zero = torch.zeros(1, 64, n_col + 5)
    on_background, on_objects = zero.clone(), zero.clone()
    on_background[0, ~on, n_col + 2] = 50.0  # push background patches to "square"
    on_objects[0, on, n_col + 2] = 50.0  # push the object's patches to "square", their true shape
    assert patch_loss(on_background) == pytest.approx(patch_loss(zero), abs=1e-6)
    assert patch_loss(on_objects) < patch_loss(zero) - 1.0
    assert patch_loss(zero, weight=0.0) < patch_loss(zero, weight=1.0)


def test_normed_decoder_shares_the_stock_weights() -> None:
    from core.phi import PhiDecoder
    from training.bootstrap_lm import shared_normed_decoder

    torch.manual_seed(0)
    lm = ModelConfig.preset("tiny").language_model.replace(qk_layernorm=False, post_attention_rmsnorm=False)
    stock = PhiDecoder(lm)
    normed = shared_normed_decoder(stock)
    assert normed.model.layers[0].self_attn.q_proj.weight is stock.model.layers[0].self_attn.q_proj.weight
    assert not normed.model.layers[0].self_attn.q_layernorm.weight.requires_grad
    x, mask = torch.randn(1, 5, lm.hidden_size), torch.ones(1, 5, dtype=torch.long)
    pos = torch.arange(5)[None]
    with torch.no_grad():
        assert not torch.allclose(stock(x, mask, pos)[0], normed(x, mask, pos)[0], atol=1e-3)  # the norms matter
        stock.lm_head.bias.add_(1.0)  # one shared tensor: a change to the stock model is seen by the normed one
        assert torch.allclose(normed.lm_head.bias, stock.lm_head.bias)


def test_fan_in_init_redraws_the_weights_at_the_decoders_width() -> None:
    """The demo's language phase starts from std 1/sqrt(hidden size), not Phi-2's 0.02; biases and norms untouched."""
    from core.phi import PhiDecoder
    from training.bootstrap import BootstrapSettings
    from training.bootstrap_lm import LanguagePhase, fan_in_init

    torch.manual_seed(0)
    lm = ModelConfig.preset("demo").language_model.replace(qk_layernorm=False, post_attention_rmsnorm=False)
    decoder = PhiDecoder(lm)
    q = decoder.model.layers[0].self_attn.q_proj
    assert abs(q.weight.std().item() - 0.02) < 1e-3
    with torch.no_grad():
        q.bias.fill_(0.5)
    assert fan_in_init(decoder) == 128**-0.5
    for weight in (q.weight, decoder.model.layers[3].mlp.fc2.weight, decoder.model.embed_tokens.weight,
                   decoder.lm_head.weight):  # fmt: skip
        assert abs(weight.std().item() - 128**-0.5) < 3e-3
    assert torch.all(q.bias == 0.5) and torch.all(decoder.model.final_layernorm.weight == 1.0)
    assert not LanguagePhase().fan_in_init and BootstrapSettings.preset("demo").language.fan_in_init


def test_feature_pool_holds_what_the_frozen_vision_encodes_per_step(world: SyntheticWorld) -> None:
    """The pool's Q-Former outputs equal a fresh encode of the same training scenes at each size."""
    from core.model import TinyGPTV
    from training.bootstrap import stock_lm_config
    from training.bootstrap_lm import FeaturePool
    from training.bootstrap_vision import encode, pixels

    torch.manual_seed(0)
    model = TinyGPTV(stock_lm_config(ModelConfig.preset("tiny"))).eval()
    pool = FeaturePool(model, world, 5, sizes=(64, 32, 64), batch=2)
    assert sorted(pool.queries) == [32, 64] and pool.queries[64].shape[0] == 5
    scenes, queries = pool.get([4, 1], 32)
    assert [s.objects for s in scenes] == [world.scene(i, "train").objects for i in (4, 1)]
    with torch.no_grad():
        _, fresh = encode(model, pixels(scenes, model, 32))
    torch.testing.assert_close(queries, fresh, rtol=1e-5, atol=1e-5)


def test_vqa_text_is_cleaned_as_the_loaders_clean_it(world: SyntheticWorld) -> None:
    from training.bootstrap_lm import as_loaded

    sample = world.sample(0, "vqa", "train")
    cleaned = as_loaded(sample)
    q = sample.meta["question"]
    assert q[0].isupper() and q.lower() in cleaned.turns[0].instruction and q not in cleaned.turns[0].instruction


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    from training.bootstrap import BootstrapSettings, bootstrap

    out = tmp_path_factory.mktemp("bootstrap") / "base"
    bootstrap(out, ModelConfig.preset("tiny"), seed=0, settings=BootstrapSettings.preset("tiny"))
    return out


def test_bootstrap_folders_load_as_real_base_weights(tiny_base: Path) -> None:
    from core.model import TinyGPTV
    from core.phi import PhiDecoder
    from core.tokenizer import TextTokenizer
    from core.weights import load_blip2_folder, load_phi_folder, load_safetensors

    cfg = ModelConfig.preset("tiny")
    model = TinyGPTV(cfg)  # TinyGPT-V's LM: q/k LayerNorm and post-attention RMSNorm on
    assert load_blip2_folder(model, tiny_base / "vision") == []
    saved = load_safetensors(tiny_base / "vision")
    assert torch.equal(model.query_tokens, saved["query_tokens"])
    missing = load_phi_folder(model.language_model, tiny_base / "lm")
    layers = cfg.language_model.num_layers
    assert len(missing) == 5 * layers  # q/k LayerNorm weight+bias and the RMSNorm weight per layer: the stages add them
    assert all("layernorm" in k for k in missing)
    phi_config = json.loads((tiny_base / "lm" / "config.json").read_text())
    assert phi_config["qk_layernorm"] is False and phi_config["model_type"] == "phi"
    stock = PhiDecoder(cfg.language_model.replace(qk_layernorm=False, post_attention_rmsnorm=False))
    assert load_phi_folder(stock, tiny_base / "lm") == []  # a stock Phi loads it with nothing missing
    tok = TextTokenizer.from_dir(tiny_base / "lm", 0, 0, cfg.prompt.image_token_id)
    assert tok.decode(tok.encode("[refer] where is the red circle ?")) == "[refer] where is the red circle ?"


def test_bootstrap_report(tiny_base: Path) -> None:
    report = json.loads((tiny_base / "bootstrap.json").read_text())
    assert report["vision"]["steps_done"] == 2 and report["vision"]["images_seen"] == 8
    assert report["language"]["steps_done"] == 2
    assert all(entry["binding"] > 0 for entry in report["language"]["log"])  # the answer-attention loss ran
    assert report["language"]["log"][0]["binding_targets"] > 0
    assert report["tokenizer"]["vocab_size"] == 127
    assert not list(tiny_base.glob(".*.tmp"))  # temporary folders renamed away
    assert set(report["language"]["answer_loss"]) == {"stock", "with_fresh_tinygptv_norms"}
    assert 0.0 <= report["language"]["quick_eval"]["64"]["vqa_all"] <= 1.0
    assert set(report["vision"]["probe"]) == {"32", "64"}
    assert report["vision"]["patch_warmup"]["scenes"] == 4 and len(report["vision"]["patch_warmup"]["log"]) == 2


# ---------------------------------------------------------------------------------------------- binding loss
def test_binding_targets_point_each_answer_at_its_objects_image_token(world: SyntheticWorld) -> None:
    """Turn cells come from the scene (VQA target, refer/identify box); targets sit where the answer is predicted."""
    from training.bootstrap_binding import binding_targets, turn_cell

    scene = world.scene(5, "train")  # blue square (cell 1), blue star (4), red triangle (6), orange star (8)
    assert [(o.colour, o.shape, o.cell) for o in scene.objects] == [
        ("blue", "square", 1), ("blue", "star", 4), ("red", "triangle", 6), ("orange", "star", 8)
    ]  # fmt: skip
    vqa = {"qtype": "shape", "question": "What shape is the red object?", "answer": "triangle"}
    assert turn_cell(scene, "synthetic_vqa", vqa) == 6
    assert (
        turn_cell(scene, "synthetic_vqa", {**vqa, "qtype": "count", "question": "How many shapes are there?"}) is None
    )
    box = list(scene.objects[3].grid_box(scene.width, scene.height))
    assert turn_cell(scene, "synthetic_identify", {"gt_box": box}) == 8
    assert turn_cell(scene, "synthetic_caption", {}) is None
    # row 0: image ids at 1..4, answers at 6 (one token) and 8-11 (three tokens + EOS); row 1: no cells;
    # row 2: the second turn was cut off
    ignore, img = -100, 99
    ids = torch.tensor([[5, img, img, img, img, 7, 8, 7, 7, 8, 8, 0], [5, img, img, img, img, 7, 8, 0, 0, 0, 0, 0],
                        [5, img, img, img, img, 7, 8, 7, 7, 7, 7, 7]])  # fmt: skip
    labels = torch.full_like(ids, ignore)
    labels[0, 6], labels[0, 8:12], labels[1, 6], labels[2, 6] = 8, ids[0, 8:12], 8, 8
    targets = binding_targets(ids, labels, [[2, 3], [None], [None, 1]], img)
    assert targets.tolist() == [[0, 5, 3], [0, 7, 4], [0, 8, 4], [0, 9, 4]]  # each predicts an answer token, not EOS


def test_answer_attention_is_the_heads_own_softmax() -> None:
    """The hook's -log p equals the attention probability the layer itself computes, with and without the norms."""
    from core.phi import PhiDecoder, causal_mask
    from training.bootstrap_binding import AnswerAttention
    from training.bootstrap_lm import shared_normed_decoder

    torch.manual_seed(0)
    lm = ModelConfig.preset("tiny").language_model.replace(qk_layernorm=False, post_attention_rmsnorm=False)
    stock = PhiDecoder(lm)
    normed = shared_normed_decoder(stock)
    with torch.no_grad():
        for p in normed.parameters():
            if not p.requires_grad:  # the fresh norms at other values, so that using them shows
                p.normal_(1.0, 0.3)
    x, mask = torch.randn(2, 7, lm.hidden_size), torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    targets = torch.tensor([[0, 6, 2], [1, 5, 3]])
    for decoder in (stock, normed):
        recorded: dict = {}
        attn = decoder.model.layers[1].self_attn
        handle = attn.register_forward_hook(lambda m, a, o, seen=recorded: seen.update(args=a))
        hook = AnswerAttention([decoder], layer=1, head=1)
        hook.targets = targets
        with torch.no_grad():
            decoder(x, mask, (mask.cumsum(-1) - 1).clamp(min=0))
        handle.remove(), hook.remove()
        h, cos, sin, add_mask, _ = recorded["args"]
        B, T, _ = h.shape
        q = attn.q_proj(h).view(B, T, attn.heads, attn.head_size).transpose(1, 2)
        k = attn.k_proj(h).view(B, T, attn.heads, attn.head_size).transpose(1, 2)
        if attn.qk_layernorm:
            q, k = attn.q_layernorm(q), attn.k_layernorm(k)
        from core.phi import apply_rotary

        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        probs = torch.softmax((q @ k.transpose(-1, -2)) * attn.head_size**-0.5 + add_mask, dim=-1)
        expected = -(probs[0, 1, 6, 2].log() + probs[1, 1, 5, 3].log()) / 2
        torch.testing.assert_close(hook.loss, expected.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(add_mask, causal_mask(mask, T, x.dtype))


# ---------------------------------------------------------------------------------------------- grid numbers
class _GridTokenizer:
    """Stands in for TextTokenizer: `<n>` is id 10 + n, nothing else is a whole token."""

    class tokenizer:  # noqa: N801 - the attribute TextTokenizer has
        @staticmethod
        def token_to_id(token: str) -> int | None:
            return 10 + int(token[1:-1]) if token[1:-1].isdigit() else None


class _SpelledTokenizer:
    """A tokenizer too small for whole grid tokens (the tiny preset's)."""

    class tokenizer:  # noqa: N801
        @staticmethod
        def token_to_id(token: str) -> int | None:
            return None


def test_grid_soft_loss_by_hand() -> None:
    """Plain cross entropy off the grid; on it, -sum_j q_j log p(<j>) with q a Gaussian of std sigma around the label."""
    from training.bootstrap_grid import grid_soft_loss, grid_token_ids

    grid_ids = grid_token_ids(_GridTokenizer())
    assert grid_ids.tolist() == list(range(10, 111))
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 120)
    labels = torch.tensor([[-100, 3, 10 + 40, -100]])  # position 0 predicts word 3, position 1 predicts <40>
    logp = torch.log_softmax(logits[0], dim=-1)
    q = torch.exp(-((torch.arange(101.0) - 40) ** 2) / (2 * 1.5**2))
    q = q / q.sum()
    by_hand = (-logp[0, 3] - (q * logp[1, 10:111]).sum()) / 2
    assert torch.allclose(grid_soft_loss(logits, labels, grid_ids, 1.5), by_hand, atol=1e-6)
    # a very narrow Gaussian is the one-hot target: the model's own loss
    plain = torch.nn.functional.cross_entropy(logits[0, :2], torch.tensor([3, 50]))
    assert torch.allclose(grid_soft_loss(logits, labels, grid_ids, 0.05), plain, atol=1e-6)


def test_ordinal_init_makes_neighbouring_numbers_score_highest() -> None:
    """After ordinal_init, the embedding of <n> fed straight to lm_head scores <n> first and its neighbours next."""
    from core.phi import PhiDecoder
    from training.bootstrap_grid import grid_token_ids, ordinal_init

    torch.manual_seed(0)
    lm = ModelConfig.preset("demo").language_model.replace(vocab_size=200)
    decoder = PhiDecoder(lm)
    grid_ids = grid_token_ids(_GridTokenizer())
    other = decoder.model.embed_tokens.weight[:10].clone()
    ordinal_init(decoder, grid_ids, std=0.05)
    emb, head = decoder.model.embed_tokens.weight[grid_ids], decoder.lm_head.weight[grid_ids]  # [101, D]
    assert torch.equal(decoder.model.embed_tokens.weight[:10], other)  # the other rows untouched
    assert torch.equal(emb[0], torch.tensor([0.05] * 64 + [0.0] * 64))  # <0>: cos 1, sin 0
    scores = emb @ head.T  # [101, 101]
    assert scores.argmax(1).tolist() == list(range(101))
    for n in (0, 37, 90):  # falling with the distance from n
        near = scores[n, n + torch.tensor([0, 1, 2, 5, 10])].tolist()
        assert near == sorted(near, reverse=True) and len(set(near)) == 5
    assert grid_token_ids(_SpelledTokenizer()) is None
