"""The runtime on a real export folder (tiny preset, fp32): parity with the PyTorch reference, KV buffers reused,
streaming, chat, and no torch anywhere in the runtime's process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from runtime import Pipeline
from runtime.kv_cache import KVCache

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["[vqa] What color is the circle?", "[refer] where is the green triangle?", "How many shapes are there?"]


def images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((30 + 7 * i, 40, 3)) * 255).astype(np.uint8) for i in range(n)]


def assert_cache_holds_pytorch_kv(model, pipe: Pipeline, image, question: str, tokens: list[int]) -> None:
    """Layer 1 of the pipeline's KV cache equals PyTorch's cache for the prompt plus every generated token fed so far
    (one row, no padding: rotary positions agree whatever the cache layout)."""
    torch = pytest.importorskip("torch")
    from core.image import preprocess_for
    from core.phi import position_ids_from_mask

    ids = torch.tensor([pipe.prompt_ids(question, True) + tokens[:-1]])  # the last token was sampled, never fed
    with torch.no_grad():
        feats = model.encode_image(torch.from_numpy(preprocess_for(image, model.config.image))[None])
        mask = torch.ones_like(ids)
        _, present = model.decode(model.embed(ids, feats), mask, position_ids_from_mask(mask, ids.shape[1]), None)
    key, value = pipe.cache.layer(1)
    assert key.shape == tuple(present[1][0].shape)
    np.testing.assert_allclose(key, present[1][0].numpy(), atol=1e-4)
    np.testing.assert_allclose(value, present[1][1].numpy(), atol=1e-4)


@pytest.fixture(scope="module")
def pipe(tiny_export_dir):
    return Pipeline.load(tiny_export_dir, threads=1, batch_size=3)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The PyTorch model and a function giving its greedy answer to token rows (core.generation.generate)."""
    torch = pytest.importorskip("torch")
    from core.image import preprocess_for
    from core.model import TinyGPTV

    model = TinyGPTV.from_pretrained(tiny_model_dir).eval()
    tokenizer = model.load_tokenizer(tiny_model_dir)

    def run(rows, imgs, max_new_tokens=24, **kwargs):
        pixels = torch.from_numpy(np.stack([preprocess_for(im, model.config.image) for im in imgs]))
        out = model.generate(rows, pixel_values=pixels, max_new_tokens=max_new_tokens, tokenizer=tokenizer,
                             stop_strings=model.config.prompt.stop_strings, **kwargs)  # fmt: skip
        return out

    run.model = model
    return run


def test_greedy_batch_and_single_match_pytorch_token_for_token(pipe, reference):
    imgs = images()
    requests = [(imgs[0], QUESTIONS[0]), (imgs[1], QUESTIONS[1]), (None, QUESTIONS[2])]  # the last row: text only
    rows = [pipe.prompt_ids(q, image is not None) for image, q in requests]
    assert rows[0][0] == pipe.manifest.bos_token_id and rows[0].count(pipe.manifest.image_token_id) == 8
    ref = reference(rows, imgs, max_new_tokens=24)
    batch = pipe.generate_batch(requests, max_new_tokens=24)
    single = [pipe.generate(image, q, max_new_tokens=24) for image, q in requests]
    assert [r.tokens for r in batch] == ref.tokens == [r.tokens for r in single]
    assert [r.text for r in batch] == ref.texts
    assert all(len(t) == 24 for t in ref.tokens)  # a random model runs to the limit: 24 tokens compared per row
    penalised = pipe.generate(imgs[0], QUESTIONS[0], max_new_tokens=24, repetition_penalty=1.5)
    assert penalised.tokens == reference(rows[:1], imgs[:1], repetition_penalty=1.5).tokens[0] != ref.tokens[0]


def test_a_folder_with_every_positions_logits_gives_the_same_tokens(tiny_export_dir, tmp_path, reference):
    """Folders exported before export.last_logits (logits [B, T, V], no logits_positions) still run, token for token."""
    import shutil

    from export.last_logits import set_logits_positions
    from export.manifest import graph_signature, read_manifest, sha256_file, write_manifest

    old = Path(shutil.copytree(tiny_export_dir, tmp_path / "old"))
    assert set_logits_positions(old / "decoder.onnx", "all")
    manifest = read_manifest(old)
    del manifest["decoder"]["logits_positions"]
    manifest["graphs"]["decoder"].update(
        sha256=sha256_file(old / "decoder.onnx"), **graph_signature(old / "decoder.onnx")
    )
    write_manifest(old, manifest)
    old_pipe = Pipeline.load(old, threads=1, batch_size=2)
    assert old_pipe.manifest.decoder.logits_positions == "all"
    imgs = images(2)
    requests = [(imgs[0], QUESTIONS[0]), (imgs[1], QUESTIONS[1])]
    rows = [old_pipe.prompt_ids(q, True) for _, q in requests]
    assert [r.tokens for r in old_pipe.generate_batch(requests, max_new_tokens=12)] == reference(rows, imgs, 12).tokens


DEMO = ROOT / "runs" / "demo" / "final"


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="no trained demo model in runs/demo/final")
def test_greedy_matches_pytorch_on_the_demo_model(tmp_path):
    torch = pytest.importorskip("torch")
    from core.image import preprocess_for
    from core.model import TinyGPTV
    from export.onnx import export_folder

    export_folder(tmp_path / "demo", DEMO)
    demo = Pipeline.load(tmp_path / "demo", threads=2, batch_size=2)
    model = TinyGPTV.from_pretrained(DEMO).eval()
    imgs = images(2, seed=3)
    rows = [demo.prompt_ids(q, True) for q in QUESTIONS[:2]]
    pixels = torch.from_numpy(np.stack([preprocess_for(im, model.config.image) for im in imgs]))
    ref = model.generate(rows, pixel_values=pixels, max_new_tokens=32, tokenizer=model.load_tokenizer(DEMO))
    assert [r.tokens for r in demo.generate_batch(list(zip(imgs, QUESTIONS[:2])), max_new_tokens=32)] == ref.tokens


def test_kv_buffers_are_allocated_once_and_written_in_place(pipe, reference):
    cache = pipe.cache
    d = pipe.manifest.decoder
    assert cache.allocations == 2 * d.num_layers  # (key, value) x layers, at load: GQA's past and present are one
    total, pointers = KVCache.allocations_total, cache.pointers()
    image = images(1)[0]
    pipe.generate(image, QUESTIONS[0], max_new_tokens=8)  # warm: first-call allocations are not the loop's
    stream = pipe.stream(image, QUESTIONS[0], max_new_tokens=200)
    pieces = iter(stream)
    tracemalloc.start()
    next(pieces)  # prefill done, first token out
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    for _ in pieces:  # 199 decode steps
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    result = stream.result
    assert len(result.tokens) == 200 and KVCache.allocations_total == total and cache.pointers() == pointers
    # the decoder wrote `present` straight into the cache's buffers (no output of its own)
    outputs = pipe.loop.decoder_binding.get_outputs()
    assert {o.data_ptr() for o in outputs[1:]} <= pointers
    assert outputs[0].data_ptr() == pipe.loop.step_logits.ctypes.data
    # a loop that concatenated KV in numpy would hold the old and the new cache at once at the last step
    kv_bytes = 2 * d.num_layers * d.num_heads * cache.length * d.head_size * 4  # [L, 2, 1, H, P, hs] float32
    assert peak - before < kv_bytes / 2, f"{peak - before} bytes held by decode steps: something grows"
    # and what is in them is the PyTorch model's cache for the same tokens
    assert_cache_holds_pytorch_kv(reference.model, pipe, image, QUESTIONS[0], result.tokens)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}])
def test_stream_yields_the_same_text_as_generate(pipe, sampling):
    image = images(1)[0]
    stream = pipe.stream(image, QUESTIONS[1], max_new_tokens=30, **sampling)
    pieces = list(stream)
    result = pipe.generate(image, QUESTIONS[1], max_new_tokens=30, **sampling)
    assert "".join(pieces) == stream.result.text == result.text and stream.result.tokens == result.tokens
    assert len([p for p in pieces if p]) > 5  # it did stream, piece by piece
    assert result.text == pipe.tokenizer.decode(result.tokens)  # no stop string in a random model's text


def test_chat_keeps_the_cache_between_turns(pipe, reference):
    image = images(1)[0]
    chat = pipe.chat(image)
    first = chat.ask(QUESTIONS[0], max_new_tokens=6)
    after_first = pipe.cache.length
    assert after_first == len(chat.history) == first.prompt_tokens + 5  # the 6th token is chosen, not yet fed
    second = chat.ask("And the square?", max_new_tokens=6)
    # only the new turn was prefilled: its prompt is the pending token, EOS, then BOS + the templated question
    turn = chat.history[after_first : after_first + second.prompt_tokens]
    assert turn == first.tokens[-1:] + [0] + pipe.prompt_ids("And the square?", image=False)
    # the answer is the reference's for the whole conversation, so turn 1 was in the cache
    whole = chat.history[: after_first + second.prompt_tokens]
    assert second.tokens == reference([whole], [image], max_new_tokens=6).tokens[0]
    # another generation takes the cache; the chat notices and prefills the conversation again, same answer
    pipe.generate(None, "hello", max_new_tokens=3)
    third = chat.ask("[vqa] what else?", max_new_tokens=6)
    assert third.prompt_tokens == len(chat.history) - 5  # the whole conversation was prefilled again
    assert third.tokens == reference([chat.history[: third.prompt_tokens]], [image], max_new_tokens=6).tokens[0]


def test_an_interrupted_answer_keeps_what_reached_the_cache(pipe, reference):
    image = images(1)[0]
    chat = pipe.chat(image)
    stream = chat.stream(QUESTIONS[1], max_new_tokens=20)
    pieces = iter(stream)
    next(pieces), next(pieces), next(pieces)
    pieces.close()  # what Ctrl-C does in the CLI
    assert stream.result.stop_reason == "interrupted" and pipe.cache.length == len(chat.history)
    fed = len(chat.history) - stream.result.prompt_tokens
    assert chat.history[stream.result.prompt_tokens :] == stream.result.tokens[:fed] and fed >= 2
    again = chat.ask("[vqa] and now?", max_new_tokens=5)
    whole = chat.history[: len(chat.history) - 4]
    assert again.tokens == reference([whole], [image], max_new_tokens=5).tokens[0]


def test_no_torch_in_the_runtime_process(tiny_export_dir, tmp_path):
    """Import every runtime module, generate, stream, chat, batch and run the CLI: torch never gets imported."""
    script = textwrap.dedent(f"""
        import importlib, json, pkgutil, sys
        import numpy as np
        import runtime
        for mod in pkgutil.iter_modules(runtime.__path__):
            if mod.name != "__main__":
                importlib.import_module("runtime." + mod.name)
        from runtime import Pipeline
        from runtime.cli import main
        pipe = Pipeline.load({str(tiny_export_dir)!r}, threads=1)
        img = np.zeros((20, 20, 3), np.uint8)
        pipe.generate(img, "[vqa] what?", max_new_tokens=4)
        list(pipe.stream(img, "[vqa] what?", max_new_tokens=4))
        pipe.generate_batch([(img, "a"), (None, "b")], max_new_tokens=3)
        pipe.chat(img).ask("hi", max_new_tokens=3)
        main(["--model", {str(tiny_export_dir)!r}, "--prompt", "hi", "--max-new-tokens", "2", "--json"])
        heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft", "training", "export")]
        print(json.dumps(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_api_refuses_bad_input_at_the_call_not_at_the_first_piece(pipe, tmp_path):
    from core.image import ImageError
    from runtime.errors import ContextError, RuntimeInputError

    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.png: the file is empty"):
        pipe.stream(tmp_path / "empty.png", "[vqa] what?")
    with pytest.raises(ContextError, match=r"max_new_tokens 300 = \d+ > context 256"):
        pipe.stream(None, "[vqa] what?", max_new_tokens=300)
    with pytest.raises(RuntimeInputError, match="max_new_tokens must be a positive integer, got 0"):
        pipe.generate(None, "[vqa] what?", max_new_tokens=0)
    with pytest.raises(ContextError, match="256"):
        pipe.generate_batch([(None, "a"), (None, "b " * 300)], max_new_tokens=4)


def test_chunked_prefill_gives_the_logits_and_tokens_of_one_run(pipe, reference):
    """Prefill in chunks of 7 tokens (a left-padded batch, image rows and a text row) == one decoder run == PyTorch."""
    imgs = images()
    requests = [(imgs[0], QUESTIONS[0] + " and the square?" * 3), (imgs[1], QUESTIONS[1]), (None, QUESTIONS[2])]
    rows = [pipe.prompt_ids(q, image is not None) for image, q in requests]
    assert max(map(len, rows)) > 3 * 7 and min(map(len, rows)) < max(map(len, rows))  # several chunks, left padding
    loop, width = pipe.loop, max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows], dtype=np.int64)  # [3, T] left-padded
    masks = (np.arange(width)[None] >= width - np.array([len(r) for r in rows])[:, None]).astype(np.int64)
    features, _, _ = pipe.encode_images([im for im, _ in requests])  # [3, N, D]
    last = {}
    for chunk in (7, 1000):
        loop.prefill_chunk = chunk
        pipe.cache.start(3)
        last[chunk] = loop.prefill(loop.embed(ids, features), masks)  # [3, V]
        assert pipe.cache.length == width
    assert np.abs(last[7] - last[1000]).max() < 1e-5
    loop.prefill_chunk = 7
    try:
        batch = pipe.generate_batch(requests, max_new_tokens=12)
    finally:
        loop.prefill_chunk = 256
    assert [r.tokens for r in batch] == [r.tokens for r in pipe.generate_batch(requests, max_new_tokens=12)]
    assert [r.tokens for r in batch] == reference(rows, imgs, max_new_tokens=12).tokens
