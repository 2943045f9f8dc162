"""Less resident memory: the vision graph loaded only per request (vision "release"), and token embeddings gathered
from the memory-mapped table instead of the embedding graph's session (runtime.embedding), with the plan's terms."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime import Pipeline
from runtime.budget import ARENA_FRACTION, _vision_activations, plan_memory
from runtime.embedding import EmbeddingTable
from runtime.errors import RuntimeInputError
from runtime.manifest import read_manifest
from tests.test_runtime import QUESTIONS, images, reference  # noqa: F401 (fixture)
from tests.test_runtime_units import fake_export


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def older_folder(tiny_export_dir, tmp_path_factory) -> Path:
    """The tiny export as folders from before the table were: no embedding.safetensors, no embedding_table."""
    old = Path(shutil.copytree(tiny_export_dir, tmp_path_factory.mktemp("older") / "fp32"))
    (old / "embedding.safetensors").unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["embedding_table"], manifest["files"]["embedding.safetensors"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    return old


def test_table_gathers_what_the_embedding_graph_computes(tiny_export_dir):
    manifest = read_manifest(tiny_export_dir)
    table = EmbeddingTable.open(manifest)
    image_id, n = manifest.image_token_id, manifest.num_image_tokens
    ids = np.array([[0, 5] + [image_id] * n + [9, 4], [3] * (n + 4)], dtype=np.int64)  # [2, T]: image row, text row
    features = np.random.default_rng(1).standard_normal((2, n, 64)).astype(np.float32)  # [2, N, D]
    features[1] = 0  # the pipeline's zeros for a text row
    (want,) = _session(tiny_export_dir / "embedding.onnx").run(None, {"input_ids": ids, "image_features": features})
    assert table.dtype == np.float32 and table.weight.shape == (128, 64)
    np.testing.assert_array_equal(table.embed(ids, features), want)  # float32: bit for bit
    step = np.zeros((2, 1, 64), dtype=np.float32)
    table.rows(ids[:, -1:], out=step)
    np.testing.assert_array_equal(step, want[:, -1:])


def test_release_and_table_give_pytorchs_tokens_and_load_vision_per_request(tiny_export_dir, reference):  # noqa: F811
    imgs = images(2)
    keep = Pipeline.load(tiny_export_dir, threads=1, vision="keep", embedding="graph")
    low = Pipeline.load(tiny_export_dir, threads=1, vision="release", embedding="table")
    assert (keep.plan.vision, keep.plan.embedding, keep.sessions.embedding is not None) == ("keep", "graph", True)
    assert (low.plan.vision, low.plan.embedding) == ("release", "table")
    assert low.sessions.vision is None and low.sessions.embedding is None  # neither loaded at start
    rows = [low.prompt_ids(q, True) for q in QUESTIONS[:2]]
    ref = [reference([r], [im], max_new_tokens=16).tokens[0] for r, im in zip(rows, imgs)]
    for pipe in (keep, low):
        assert [pipe.generate(im, q, max_new_tokens=16).tokens for im, q in zip(imgs, QUESTIONS[:2])] == ref
    assert low.vision_loads == 2 and low.sessions.vision is None  # loaded for each image, released after
    from runtime.kv_cache import KVCache

    first_cache, allocated = low.cache, KVCache.allocations_total
    result = low.generate(imgs[0], QUESTIONS[0], max_new_tokens=4)
    assert low.cache is first_cache and KVCache.allocations_total == allocated  # pages released, buffers kept
    assert result.timings.vision_load_s > 0 and result.timings.ttft_s > result.timings.vision_load_s
    assert keep.generate(imgs[0], QUESTIONS[0], max_new_tokens=4).timings.vision_load_s == 0
    chat = low.chat(imgs[1])  # a chat encodes its image once, then keeps its cache between turns
    first = chat.ask(QUESTIONS[0], max_new_tokens=6)
    assert chat.cached and chat.ask(QUESTIONS[2], max_new_tokens=6).tokens and low.vision_loads == 4
    assert first.tokens == keep.chat(imgs[1]).ask(QUESTIONS[0], max_new_tokens=6).tokens


def test_a_folder_without_the_table_runs_through_the_graph(older_folder, tiny_export_dir):
    old = Pipeline.load(older_folder, threads=1)
    assert old.plan.embedding == "graph" and old.table is None and old.sessions.embedding is not None
    new = Pipeline.load(tiny_export_dir, threads=1)
    assert new.plan.embedding == "table" and new.sessions.embedding is None
    img = images(1)[0]
    assert old.generate(img, QUESTIONS[1], max_new_tokens=12).tokens == new.generate(img, QUESTIONS[1], 12).tokens
    with pytest.raises(
        RuntimeInputError, match="no embedding table in this folder .* python -m export.embedding_table"
    ):
        Pipeline.load(older_folder, embedding="table")


def test_embedding_table_command_adds_the_table_to_an_older_folder(older_folder, tmp_path):
    from export.embedding_table import main
    from export.manifest import check_manifest

    out = tmp_path / "with-table"
    assert main(["--model", str(older_folder), "--out", str(out), "--dtype", "float16"]) == 0
    manifest = check_manifest(out)  # every sha256 true, nothing unlisted
    assert manifest["embedding_table"] == {"file": "embedding.safetensors", "weight": "embed_tokens.weight",
                                           "dtype": "float16", "shape": [128, 64]}  # fmt: skip
    assert os.stat(out / "decoder.onnx").st_ino == os.stat(older_folder / "decoder.onnx").st_ino  # hard link
    assert not (older_folder / "embedding.safetensors").exists()  # the source is not changed
    assert main(["--model", str(older_folder), "--out", str(older_folder)]) == 2


@pytest.mark.parametrize(("dtype", "max_table_err", "max_logit_err"), [("float16", 1e-3, 1e-3), ("int8", 2e-2, 2e-2)])
def test_smaller_tables_change_logits_little(older_folder, tmp_path, dtype, max_table_err, max_logit_err):
    """Prefill logits with a float16 / int8 table against the float32 graph's, relative to the largest logit (tiny
    model, random weights). Measured on 3 prompts: float16 3.0e-4, int8 8.3e-3; the demo preset (random init)
    1.9e-4 and 5.6e-3 (/work/notes/lowmem.md)."""
    from export.embedding_table import derive_folder

    derive_folder(older_folder, tmp_path / dtype, dtype)
    ref, small = Pipeline.load(older_folder, threads=1), Pipeline.load(tmp_path / dtype, threads=1)
    full = _session(older_folder / "embedding.onnx")
    vocab = np.arange(128, dtype=np.int64)[None]  # [1, V]: every row
    (want,) = full.run(None, {"input_ids": vocab, "image_features": np.zeros((1, 8, 64), np.float32)})
    got = small.table.embed(vocab, None)
    assert 0 < np.abs(got - want).max() / np.abs(want).max() < max_table_err
    img = images(1)[0]
    logits = []
    for pipe in (ref, small):
        ids = np.array([pipe.prompt_ids(QUESTIONS[0], True)], dtype=np.int64)
        features, _, _ = pipe.encode_images([img])
        pipe.cache.start(1)
        logits.append(pipe.loop.prefill(pipe.loop.embed(ids, features), np.ones_like(ids)).copy())  # [1, V]
    err = np.abs(logits[1] - logits[0]).max() / np.abs(logits[0]).max()
    assert err < max_logit_err
    assert int(logits[0].argmax()) == int(logits[1].argmax())


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from /proc (Linux)")
def test_gathered_table_pages_leave_rss(tmp_path):
    """A 64 MiB table: gathering every row maps all of it, and the pages go again once the gather is done."""
    from safetensors.numpy import save_file

    from runtime.session import _resident_bytes

    save_file({"embed_tokens.weight": np.ones((8192, 2048), dtype=np.float32)}, str(tmp_path / "t.safetensors"))
    table = EmbeddingTable(tmp_path / "t.safetensors", "embed_tokens.weight", None, image_token_id=-1)
    ids = np.arange(8192, dtype=np.int64)[None]  # [1, 8192]
    out = np.empty((1, 8192, 2048), dtype=np.float32)  # [1, T, D]: 64 MiB, resident before the gather
    out.fill(0)
    before = _resident_bytes()
    table.rows(ids, out=out)
    assert out.min() == 1.0
    assert _resident_bytes() - before < 8 << 20  # without the release: + 64 MiB of mapped table pages
    table.weight[::256].sum()  # touch a page per row block without the release: they stay
    assert _resident_bytes() - before > 4 << 20
    table.release()
    assert _resident_bytes() - before < 2 << 20


def test_plan_terms_for_release_and_table(tmp_path):
    """vision "release": the vision graph leaves `weights` for the vision phase; the table replaces the embedding
    graph's bytes by one gather's pages; "auto" keeps the vision graph while that plan fits, else releases it."""
    folder, manifest = fake_export(tmp_path / "x", layers=32, heads=32, head_size=80, context=2048, vocab=51200,
                                   graph_bytes=(3000, 2000, 1000))  # fmt: skip
    (folder / "embedding.safetensors").write_bytes(b"x" * 500)
    manifest["files"]["embedding.safetensors"] = "0" * 64
    manifest["embedding_table"] = {"file": "embedding.safetensors", "dtype": "float32", "shape": [51200, 2560]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    m = read_manifest(folder)
    graph = plan_memory(m, 2048, budget="64GB", embedding="graph")
    keep = plan_memory(m, 2048, budget="64GB", vision="keep")
    low = plan_memory(m, 2048, budget="64GB", vision="release")
    assert graph.weights == 6000 and graph.load_transient == 3000 and graph.table == 0  # the table file never counts
    assert keep.weights == 4000 and keep.table == 2048 * 4 * 4096  # 10,240-byte rows span at most 4 pages
    vision = _vision_activations(m, 1)
    assert low.weights == 1000 and low.load_transient == 1000 and low.activations == keep.activations - vision
    assert low.vision_phase == 3000 + max(3000, vision + int(vision * ARENA_FRACTION))
    assert low.peak == low.runtime + 1000 + max(1000, low.kv_cache + low.activations + low.arena + low.table,
                                                low.vision_phase)  # fmt: skip
    assert keep.peak - low.peak == 3000 + vision + int(keep.activations * ARENA_FRACTION) - low.arena
    between = (low.peak + keep.peak) // 2
    assert plan_memory(m, 2048, budget=keep.peak, vision="auto").vision == "keep"
    auto = plan_memory(m, 2048, budget=between, vision="auto")
    assert auto.vision == "release" and auto.fits and auto.largest_context == 2048
    assert "vision phase" in low.describe() and "vision phase" not in keep.describe()
    with pytest.raises(RuntimeInputError, match="vision 'later'; choose one of auto, keep, release"):
        plan_memory(m, 2048, vision="later")


def test_cli_plan_and_answer_with_vision_release(tiny_export_dir, capsys, tmp_path):
    from PIL import Image

    from runtime.cli import main

    assert main(["--model", str(tiny_export_dir), "--plan", "--vision", "release", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["vision"] == "release" and plan["embedding"] == "table" and plan["vision_phase"] > 0
    assert main(["--model", str(tiny_export_dir), "--plan", "--vision", "keep", "--embedding", "graph"]) == 0
    out = capsys.readouterr().out
    assert "vision phase" not in out and "table" not in out and "weights" in out
    Image.fromarray(images(1)[0]).save(tmp_path / "a.png")
    ask = ["--model", str(tiny_export_dir), "--image", str(tmp_path / "a.png"), "--prompt", QUESTIONS[0],
           "--max-new-tokens", "6", "--json"]  # fmt: skip
    answers = []
    for vision in ("keep", "release"):
        assert main([*ask, "--vision", vision]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[0]["tokens"] == answers[1]["tokens"] and len(answers[0]["tokens"]) == 6
    assert answers[0]["timings"]["vision_load_s"] == 0 < answers[1]["timings"]["vision_load_s"]
    with pytest.raises(SystemExit) as exited:  # argparse's choices: one line, exit 2
        main([*ask, "--vision", "later"])
    assert exited.value.code == 2
    assert "argument --vision: invalid choice: 'later'" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from /proc (Linux)")
def test_release_pages_hands_a_buffers_pages_back_and_keeps_it_usable():
    from runtime.session import _resident_bytes, release_pages

    buffer = np.zeros(16 << 20, dtype=np.float32)  # 64 MiB
    buffer.fill(1.0)
    before = _resident_bytes()
    assert release_pages(buffer) >= (64 << 20) - 8192
    assert before - _resident_bytes() > 60 << 20  # gone from RSS
    assert buffer[1024:-1024].max() == 0.0 and buffer[0] == 1.0  # whole pages read as zeros; partial ones are kept
    buffer[2048:3072] = 2.0  # still the same allocation, writable
    assert buffer[1024:-1024].sum() == 2048.0
