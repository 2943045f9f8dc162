"""The GroupQueryAttention decoder (export --attention gqa, export.gqa): validation against PyTorch, the runtime's
shared KV buffer, greedy tokens equal to PyTorch in batch 1 and left-padded batches, chunked prefill, the memory plan.

Two tiny models: the tiny preset itself (head size 16, rotary dims 6: GQA's kernel cannot rotate that, so our rotary
ops run before GQA) and one with 2 heads of 32 and rotary factor 0.5 (16 rotary dims: rotary inside GQA, as Phi-2).
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest

from export.onnx import ExportError, ExportOptions, export_folder
from runtime import Pipeline
from runtime.budget import plan_memory
from runtime.kv_cache import KVCache
from runtime.manifest import read_manifest
from tests.conftest import make_tiny_model_dir
from tests.test_runtime import QUESTIONS, assert_cache_holds_pytorch_kv, images

ROPE_INSIDE = {"num_heads": 2, "partial_rotary_factor": 0.5}  # head size 32, 16 rotary dims


@pytest.fixture(scope="module")
def gqa_dir(tiny_export_dir):
    """The tiny model's default export (--attention auto: GQA at fp32); `tiny_plain_export_dir` is the same model with
    the plain decoder, exported --graphs-from it (vision and embedding copied, decoder traced)."""
    return tiny_export_dir


@pytest.fixture(scope="module")
def rope_model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("rope") / "model", **ROPE_INSIDE)


@pytest.fixture(scope="module")
def rope_gqa_dir(rope_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rope_gqa") / "out"
    export_folder(out, rope_model_dir, ExportOptions(attention="gqa"))
    return out


def gqa_nodes(folder):
    graph = onnx.load(str(folder / "decoder.onnx")).graph
    return [n for n in graph.node if n.op_type == "GroupQueryAttention"]


def reference_for(model_dir):
    torch = pytest.importorskip("torch")
    from core.image import preprocess_for
    from core.model import TinyGPTV

    model = TinyGPTV.from_pretrained(model_dir).eval()
    tokenizer = model.load_tokenizer(model_dir)

    def run(rows, imgs, max_new_tokens):
        pixels = torch.from_numpy(np.stack([preprocess_for(im, model.config.image) for im in imgs]))
        return model.generate(rows, pixel_values=pixels, max_new_tokens=max_new_tokens, tokenizer=tokenizer,
                              stop_strings=model.config.prompt.stop_strings)  # fmt: skip

    return run


@pytest.mark.parametrize("which, rotary", [("gqa_dir", 0), ("rope_gqa_dir", 1)])
def test_gqa_export_validates_against_pytorch(which, rotary, request):
    """Prefill + 3 decode steps on shared buffers, batch 2 left-padded and a real prompt: within the fp32 tolerance."""
    folder = request.getfixturevalue(which)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["decoder"]["attention"] == "gqa" and manifest["decoder"]["logits_positions"] == "last"
    validation = manifest["validation"]
    assert validation["passed"] and validation["failures"] == []
    for case in ("random", "real"):
        assert [s["past_length"] for s in validation[case]["decoder_steps"]][1:] == [
            validation[case]["decoder_steps"][0]["query_length"] + i for i in range(3)
        ]
        assert all(s["argmax_equal"] for s in validation[case]["decoder_steps"])
        assert validation[case]["outputs"]["logits"]["max_abs_diff"] < 1e-4
    if which == "gqa_dir":  # the plain export took its vision graph --graphs-from this one and traced its decoder
        plain = json.loads((request.getfixturevalue("tiny_plain_export_dir") / "manifest.json").read_text())["graphs"]
        assert manifest["graphs"]["vision"]["sha256"] == plain["vision"]["sha256"]
        assert manifest["graphs"]["decoder"]["sha256"] != plain["decoder"]["sha256"]
    nodes = gqa_nodes(folder)
    assert len(nodes) == 2  # one per layer, every layer
    assert all({a.name: a.i for a in n.attribute}["do_rotary"] == rotary for n in nodes)
    shape = next(i for i in manifest["graphs"]["decoder"]["inputs"] if i["name"] == "past_key_values.0.key")["shape"]
    assert shape[2] == "max_sequence_length"
    assert json.loads((folder / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True


@pytest.mark.parametrize("model, folder", [("tiny_model_dir", "gqa_dir"), ("rope_model_dir", "rope_gqa_dir")])
def test_gqa_greedy_batch_and_single_match_pytorch(model, folder, request):
    """Left-padded batch of 3 (image rows and a text row) and each row alone: PyTorch's tokens, 24 per row."""
    pipe = Pipeline.load(request.getfixturevalue(folder), threads=1, batch_size=3)
    assert pipe.manifest.decoder.attention == "gqa"
    imgs = images()
    requests = [(imgs[0], QUESTIONS[0]), (imgs[1], QUESTIONS[1]), (None, QUESTIONS[2])]
    rows = [pipe.prompt_ids(q, image is not None) for image, q in requests]
    assert len(set(map(len, rows))) > 1  # the batch is left-padded
    expected = reference_for(request.getfixturevalue(model))(rows, imgs, 24).tokens
    assert [r.tokens for r in pipe.generate_batch(requests, max_new_tokens=24)] == expected
    assert [pipe.generate(image, q, max_new_tokens=24).tokens for image, q in requests] == expected
    assert all(len(t) == 24 for t in expected)


def test_gqa_cache_is_one_buffer_bound_as_past_and_present(gqa_dir, tiny_model_dir):
    pipe = Pipeline.load(gqa_dir, threads=1, batch_size=2)
    cache, d = pipe.cache, pipe.manifest.decoder
    assert cache.shared and cache.allocations == 2 * d.num_layers  # (key, value) x layers: half the plain cache's
    total, pointers = KVCache.allocations_total, cache.pointers()
    image = images(1)[0]
    result = pipe.generate(image, QUESTIONS[0], max_new_tokens=40)
    assert KVCache.allocations_total == total and cache.pointers() == pointers
    outputs = pipe.loop.decoder_binding.get_outputs()
    assert {o.data_ptr() for o in outputs[1:]} == pointers  # every present written into the cache's own buffers
    assert outputs[1].shape() == [1, d.num_heads, cache.context, d.head_size]
    # what the buffers hold is PyTorch's cache for the same tokens (rotary by our positions: one row, no padding)
    from core.model import TinyGPTV

    model = TinyGPTV.from_pretrained(tiny_model_dir).eval()
    assert_cache_holds_pytorch_kv(model, pipe, image, QUESTIONS[0], result.tokens)


class _CountingBinding:
    """An IOBinding that counts the binds of each name (onnxruntime reaches the real one through `_iobinding`)."""

    def __init__(self, binding) -> None:
        self._binding, self.counts = binding, collections.Counter()

    def bind_input(self, name, *args):
        self.counts[name] += 1
        return self._binding.bind_input(name, *args)

    def bind_cpu_input(self, name, *args):
        self.counts[name] += 1
        return self._binding.bind_cpu_input(name, *args)

    def bind_output(self, name, *args):
        self.counts[name] += 1
        return self._binding.bind_output(name, *args)

    def __getattr__(self, name):
        return getattr(self._binding, name)


def test_gqa_decode_steps_bind_only_what_changes(gqa_dir):
    """The shared KV buffers and the fixed step buffers are bound once per generation; mask and positions each run."""
    pipe = Pipeline.load(gqa_dir, threads=1, batch_size=2)
    expected = pipe.generate(images(1)[0], QUESTIONS[0], max_new_tokens=12).tokens
    binding = pipe.loop.decode.binding = _CountingBinding(pipe.loop.decode.binding)
    pipe.loop.decode.pointers.clear()
    pipe.cache.forget_binding()
    for _ in range(2):  # the second generation starts a new cache: its buffers are bound again, once
        assert (
            pipe.generate(images(1)[0], QUESTIONS[0], max_new_tokens=12, min_new_tokens=12).tokens[: len(expected)]
            == expected
        )
    d = pipe.manifest.decoder
    assert binding.counts[d.past_key(0)] == binding.counts[d.present_value(d.num_layers - 1)] == 2
    assert binding.counts["attention_mask"] == binding.counts["position_ids"] == 2 * 12  # prefill + 11 steps, twice
    assert binding.counts["inputs_embeds"] == 2 * 2  # the prompt's array, then the step buffer
    assert binding.counts["logits"] == 1, binding.counts  # last-position logits: the one step buffer throughout


@pytest.mark.parametrize("model, folder", [("tiny_model_dir", "gqa_dir"), ("rope_model_dir", "rope_gqa_dir")])
def test_gqa_chunked_prefill_of_one_row_matches_pytorch(model, folder, request):
    """One row prefilled 5 tokens at a time (GQA on a non-empty cache), then a chat turn on top: PyTorch's tokens."""
    pipe = Pipeline.load(request.getfixturevalue(folder), threads=1, batch_size=1)
    image = images(1)[0]
    rows = [pipe.prompt_ids(QUESTIONS[0], True)]
    expected = reference_for(request.getfixturevalue(model))(rows, [image], 16).tokens
    pipe.loop.prefill_chunk = 5
    assert pipe.generate(image, QUESTIONS[0], max_new_tokens=16).tokens == expected[0]


def test_gqa_batch_prefill_on_a_filled_cache_is_refused(gqa_dir):
    from runtime.errors import ContextError

    pipe = Pipeline.load(gqa_dir, threads=1, batch_size=2)
    loop = pipe.loop
    ids = np.full((2, 4), 5, dtype=np.int64)
    pipe.cache.start(2)
    loop.prefill(loop.embed(ids, None), np.ones((2, 4), np.int64))
    with pytest.raises(ContextError, match="GroupQueryAttention decoder cannot add 4 tokens to 2 rows"):
        loop.prefill(loop.embed(ids, None), np.ones((2, 4), np.int64))


def test_gqa_memory_plan_counts_one_kv_buffer(gqa_dir, tiny_plain_export_dir):
    plain, gqa = read_manifest(tiny_plain_export_dir), read_manifest(gqa_dir)
    assert (plain.decoder.attention, gqa.decoder.attention) == ("plain", "gqa")
    d = gqa.decoder
    one = 2 * d.num_layers * d.num_heads * d.head_size * 4  # key + value, every layer, one token, float32
    for batch in (1, 2):
        p, g = plan_memory(plain, 128, batch), plan_memory(gqa, 128, batch)
        assert p.kv_cache == 2 * g.kv_cache == 2 * one * 128 * batch
        assert g.kv_bytes_per_token == one * batch and "one shared buffer" in g.describe()
    # several GQA rows prefill the whole context in one run: more activations than chunks would take
    assert plan_memory(gqa, 128, 1).activations == plan_memory(plain, 128, 1).activations
    assert Pipeline.load(gqa_dir, threads=1, batch_size=2, context=64).cache.nbytes == plan_memory(gqa, 64, 2).kv_cache


def test_gqa_refuses_what_it_does_not_support(tiny_model_dir, tiny_plain_export_dir, tmp_path):
    with pytest.raises(ExportError, match="--attention gqa is for --precision fp32 or int4"):
        export_folder(tmp_path / "a", tiny_model_dir, ExportOptions(attention="gqa", precision="fp16"))
    with pytest.raises(ExportError, match="--attention 'flash': choose one of auto, plain, gqa"):
        export_folder(tmp_path / "b", tiny_model_dir, ExportOptions(attention="flash"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_gqa_decoder_also_runs_with_a_growing_past(gqa_dir, tiny_plain_export_dir, tiny_model_dir):
    """Unbound, GQA takes past [B, H, P, hs] and returns present [B, H, P+T, hs] as the plain decoder does, so tools
    that feed a growing past (export.quality's teacher forcing) run a GQA folder unchanged: the plain folder's logits."""
    from core.config import ModelConfig
    from export.quality import FolderModel

    cfg = ModelConfig.from_json(tiny_model_dir / "config.json")
    embeds = np.random.default_rng(0).standard_normal((1, 9, cfg.language_model.hidden_size)).astype(np.float32)
    plain, gqa = FolderModel(tiny_plain_export_dir, cfg).logits(embeds), FolderModel(gqa_dir, cfg).logits(embeds)
    assert gqa.shape == plain.shape == (1, 9, cfg.language_model.vocab_size)
    np.testing.assert_allclose(gqa, plain, atol=1e-5)


def test_gqa_int4_keeps_the_contract_and_runs_batched_as_alone(rope_model_dir, rope_gqa_dir, tmp_path):
    """int4 RTN symmetric (as benchmarks.peers exports) of the rotary-inside GQA decoder: MatMulNBits fused, FastGelu,
    the same inputs as fp32 (position_ids kept although rotary inside GQA does not read it), logits near PyTorch's, and
    a left-padded batch gives each row its tokens alone."""
    options = ExportOptions(attention="gqa", precision="int4", quant="rtn", symmetric=True)
    manifest = export_folder(tmp_path / "int4", rope_model_dir, options, graphs_from=rope_gqa_dir)
    fp32 = json.loads((rope_gqa_dir / "manifest.json").read_text())["graphs"]["decoder"]
    assert manifest["graphs"]["decoder"]["inputs"] == fp32["inputs"] and manifest["decoder"]["attention"] == "gqa"
    decoder = manifest["quantization"]["decoder"]
    assert decoder["matmulnbits"] == 13 and decoder["fused_away"] == 6 and decoder["fast_gelu"] == 2
    assert len(gqa_nodes(tmp_path / "int4")) == 2
    logits = manifest["validation"]["random"]["outputs"]["logits"]
    assert manifest["validation"]["passed"] and logits["max_abs_diff"] < 0.5 * logits["max_abs_ref"]
    pipe = Pipeline.load(tmp_path / "int4", threads=1, batch_size=2)
    imgs = images(2)
    results = pipe.generate_batch([(imgs[0], QUESTIONS[0]), (imgs[1], QUESTIONS[1])], max_new_tokens=8)
    assert [len(r.tokens) for r in results] == [8, 8]
    assert [r.tokens for r in results] == [pipe.generate(im, q, max_new_tokens=8).tokens for im, q in
                                           [(imgs[0], QUESTIONS[0]), (imgs[1], QUESTIONS[1])]]  # fmt: skip


def test_decode_step_times_a_gqa_graph_on_a_shared_buffer(gqa_dir, tiny_plain_export_dir):
    """benchmarks.decode_step binds a GQA graph's past and present to one buffer: the step's logits are the plain
    graph's for the same cache contents (and the bound arrays outlive the caller's feeds)."""
    from benchmarks.decode_step import decoder_of, open_session, runner, shared_buffer, step_feeds

    logits = []
    for folder in (tiny_plain_export_dir, gqa_dir):
        graph, head_size = decoder_of(folder)
        session = open_session(graph, 1, None)
        run = runner(session, step_feeds(session, 20, head_size, slots=64 if shared_buffer(session) else 0))
        run()  # a second run rewrites the same slot: the same logits
        found = run()
        logits.append(np.asarray(found if isinstance(found, np.ndarray) else found.numpy()))
    sessions = [open_session(decoder_of(f)[0], 1, None) for f in (tiny_plain_export_dir, gqa_dir)]
    assert [shared_buffer(s) for s in sessions] == [False, True]
    assert logits[0].shape == logits[1].shape == (1, 1, 128)
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-5)
