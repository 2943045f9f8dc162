"""runtime parts that need no export: sampling vs the PyTorch reference, the memory plan, manifest reading and sha256
checks on hand-written manifests, and UTF-8-safe streaming of byte-level tokens."""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from core.tokenizer import TextTokenizer
from runtime.budget import PREFILL_CHUNK, _decoder_activations, format_bytes, parse_bytes, plan_memory, prepack_fraction
from runtime.errors import BudgetError, ManifestError, RuntimeInputError
from runtime.generate import TextStream
from runtime.manifest import read_manifest
from runtime.sampling import Sampler, SamplingParams, process_logits

# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.0, repetition_penalty=1.3),
        dict(temperature=0.7),
        dict(temperature=1.0, top_k=5),
        dict(temperature=0.9, top_p=0.8),
        dict(temperature=1.3, top_k=20, top_p=0.5, repetition_penalty=1.1),
    ],
)
def test_process_logits_equals_the_pytorch_reference(params):
    torch = pytest.importorskip("torch")
    from core.generation import process_logits as torch_process

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32) * 3  # [B, V]
    seen = [[1, 2, 3, 3], [], [49, 0, 7]]
    mask = np.zeros_like(logits, dtype=bool)
    for row, ids in enumerate(seen):
        mask[row, ids] = True
    p = SamplingParams(**params)
    ours = process_logits(logits, mask, p)
    ref = torch_process(torch.from_numpy(logits), seen, p.temperature, p.top_k, p.top_p, p.repetition_penalty).numpy()
    assert np.array_equal(np.isinf(ours), np.isinf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)


def test_greedy_is_argmax_and_never_draws_a_banned_id():
    logits = np.array([[0.0, 5.0, 1.0, 5.0], [9.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    sampler = Sampler(SamplingParams(), vocab_size=4, banned_ids=(0,))
    assert sampler(logits).tolist() == [1, 3]  # first index on ties, as torch; id 0 is banned in row 2


def test_sampling_is_seeded_and_respects_top_k():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 30)).astype(np.float32)
    top3 = [set(np.argsort(-row)[:3].tolist()) for row in logits]

    def draw(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, top_k=3, seed=seed), vocab_size=30)
        return [sampler(logits).tolist() for _ in range(40)]

    a, b, c = draw(7), draw(7), draw(8)
    assert a == b and a != c
    assert all(tok in top3[row] for step in a for row, tok in enumerate(step))
    assert len({step[0] for step in a}) == 3  # all three kept tokens do get drawn


def test_sampling_matches_the_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.2, 1e-12]], dtype=np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0), vocab_size=4)
    counts = np.bincount([int(sampler(logits)[0]) for _ in range(4000)], minlength=4)
    # top_p 0.75 keeps {0, 1} (0.5 < 0.75 <= 0.8), renormalised to 0.625 / 0.375
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 4000 - 0.625) < 0.03


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(temperature=-1), "temperature must be >= 0"),
        (dict(top_k=-2), "top_k must be an integer >= 0"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    ],
)
def test_bad_sampling_settings_are_refused(bad, message):
    with pytest.raises(RuntimeInputError, match=message.replace("(", r"\(").replace("]", r"\]")):
        SamplingParams(**bad)


# ---------------------------------------------------------------- manifest and memory plan


def fake_export(folder, layers=2, heads=4, head_size=16, context=256, vocab=128, graph_bytes=(1000, 2000, 3000)):
    """A hand-written export folder: graph files of given sizes (not real ONNX) and a manifest naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    graphs = {}
    for name, size in zip(("vision", "embedding", "decoder"), graph_bytes):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        (folder / f"{name}.onnx").write_bytes(data)
        graphs[name] = {"file": f"{name}.onnx", "sha256": hashlib.sha256(data).hexdigest(), "inputs": [], "outputs": []}
    (folder / "tokenizer.json").write_text("{}")
    manifest = {
        "schema_version": 1,
        "graphs": graphs,
        "files": {"tokenizer.json": hashlib.sha256(b"{}").hexdigest()},
        "decoder": {
            "kv_templates": {
                "past_key": "past_key_values.%d.key",
                "past_value": "past_key_values.%d.value",
                "present_key": "present.%d.key",
                "present_value": "present.%d.value",
            },  # fmt: skip
            "num_layers": layers,
            "num_heads": heads,
            "head_size": head_size,
            "hidden_size": heads * head_size,
            "context_length": context,
            "vocab_size": vocab,
        },  # fmt: skip
        "image": {"size": 32, "resample": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3, "max_pixels": 1000},
        "num_image_tokens": 8,
        "image_token_id": vocab - 1,
        "prompt": {
            "template": "[INST] {} [/INST]",
            "image_text": "<Img><ImageHere></Img>",
            "placeholder": "<ImageHere>",
            "task_tags": ["[vqa]"],
            "stop_strings": ["###"],
        },  # fmt: skip
        "special_tokens": {"bos": 0, "eos": 0, "pad": 0},
        "quantization": {"precision": "fp32", "bits": 32},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, manifest


def test_manifest_is_read_and_verified(tmp_path):
    folder, _ = fake_export(tmp_path / "ok")
    m = read_manifest(folder, verify=True)
    assert m.decoder.past_key(1) == "past_key_values.1.key" and m.decoder.present_value(0) == "present.0.value"
    assert m.image.size == 32 and m.image.max_pixels == 1000 and m.prompt.stop_strings == ("###",)
    assert m.weight_sizes() == {"vision.onnx": 1000, "embedding.onnx": 2000, "decoder.onnx": 3000}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "decoder.onnx").write_bytes(b"x" * 3000), r"decoder.onnx: sha256 .*\(3,000 bytes\)"),
        (
            lambda f: (f / "vision.onnx").write_bytes((f / "vision.onnx").read_bytes()[:500]),
            r"vision.onnx: sha256 .*\(500 bytes\)",
        ),
        (lambda f: (f / "embedding.onnx").write_bytes(b""), r"embedding.onnx: .*empty \(0 bytes\)"),
        (lambda f: (f / "tokenizer.json").unlink(), r"tokenizer.json: missing"),
    ],
)
def test_a_tampered_truncated_or_missing_file_is_refused_by_name(tmp_path, damage, message):
    folder, _ = fake_export(tmp_path / "x")
    damage(folder)
    with pytest.raises(ManifestError, match=message):
        read_manifest(folder, verify=True)


def test_manifest_errors_name_the_problem(tmp_path):
    folder, manifest = fake_export(tmp_path / "x")
    with pytest.raises(ManifestError, match="no such folder"):
        read_manifest(tmp_path / "nope")
    bad = copy.deepcopy(manifest)
    bad["schema_version"] = 2
    (folder / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match="schema_version 2 is not supported; this runtime reads version 1"):
        read_manifest(folder)
    del manifest["decoder"]["num_heads"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="decoder: no 'num_heads'"):
        read_manifest(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_manifest(folder)


def test_parse_bytes_units_are_binary():
    assert parse_bytes("8GB") == parse_bytes("8G") == parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("512mb") == 512 * 2**20 and parse_bytes("1.5G") == 3 * 2**29 and parse_bytes(1000) == 1000
    with pytest.raises(RuntimeInputError, match="is not a size"):
        parse_bytes("lots")
    assert format_bytes(1536 * 2**20) == "1.50 GiB" and format_bytes(512) == "512 B"


def test_plan_numbers_follow_the_formula(tmp_path):
    folder, _ = fake_export(tmp_path / "x", layers=32, heads=32, head_size=80, context=2048, vocab=51200)
    plan = plan_memory(read_manifest(folder), context=2048, batch_size=1, budget="64GB")
    # 2 (k, v) x 32 layers x 32 heads x 80 x 2048 x 4 bytes = 1.25 GiB, twice for the swapped buffers
    assert plan.kv_cache == 2 * (2 * 32 * 32 * 80 * 2048 * 4) == 5 * 2**30 // 2
    assert plan.weights == 6000 and plan.load_transient == 3000
    half = plan_memory(read_manifest(folder), context=1024, batch_size=2, budget="64GB")
    assert half.kv_cache == plan.kv_cache  # half the context, twice the batch
    assert plan.peak == plan.runtime + plan.weights + plan.kv_cache + plan.activations + plan.arena
    # prefill runs PREFILL_CHUNK (256) tokens at a time: logits, scores [1, 32, 256, 2048] and hidden states of one
    # chunk instead of the whole prompt's (2560 = 32 x 80 wide, 4 x 2560 inner without a source config)
    manifest = read_manifest(folder)
    full, chunked = _decoder_activations(manifest, 2048, 1, chunk=2048), _decoder_activations(manifest, 2048, 1)
    assert PREFILL_CHUNK == 256 and full - chunked == 4 * (2048 - 256) * (51200 + 2 * 32 * 2048 + 8 * 2560 + 2 * 10240)
    assert chunked == 4 * (256 * 51200 + 2 * 32 * 256 * 2048 + 256 * (8 * 2560 + 2 * 10240) + 2 * 2048 * 2560)


def test_over_budget_is_refused_with_the_numbers_and_what_fits(tmp_path):
    folder, _ = fake_export(tmp_path / "x", layers=32, heads=32, head_size=80, context=2048, vocab=51200)
    manifest = read_manifest(folder)
    plan = plan_memory(manifest, context=2048, budget="2GB")
    assert not plan.fits and 0 < plan.largest_context < 2048 and plan.largest_context % 64 == 0
    assert plan_memory(manifest, context=plan.largest_context, budget="2GB").fits
    assert not plan_memory(manifest, context=plan.largest_context + 64, budget="2GB").fits
    with pytest.raises(BudgetError) as err:
        plan.check()
    text = str(err.value)
    assert f"planned peak {format_bytes(plan.peak)} > budget 2.00 GiB" in text
    assert f"KV cache {format_bytes(plan.kv_cache)} for context 2,048 x batch 1" in text
    assert f"would fit: --context {plan.largest_context}" in text
    with pytest.raises(RuntimeInputError, match="context 4,096 is longer than the model's 2,048 positions"):
        plan_memory(manifest, context=4096)


# ---------------------------------------------------------------- streaming text


@pytest.fixture(scope="module")
def byte_tokenizer():
    """Byte-level BPE without merges: every UTF-8 byte is its own token, so 'é' and '🙂' span 2 and 4 tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return TextTokenizer(tok, 0, 0, image_token_id=1000)


def stream_pieces(tokenizer, ids, stops=()):
    stream = TextStream(tokenizer, stops)
    pieces = [stream.push(i) for i in ids]
    return pieces, stream.finish(), stream


def test_stream_never_splits_a_character(byte_tokenizer):
    text = "héllo 🙂 wörld ✓"
    ids = byte_tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    pieces, tail, _ = stream_pieces(byte_tokenizer, ids)
    assert "".join(pieces) + tail == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[ids.index(ids[0]) : 3] == ["h", "", "é"]  # 'é' waits for its second byte
    assert "🙂" in pieces and pieces[pieces.index("🙂") - 3 : pieces.index("🙂")] == ["", "", ""]


def test_stream_holds_back_a_possible_stop_string_and_cuts_at_it(byte_tokenizer):
    ids = byte_tokenizer.encode("red # and ## then ### more")
    pieces, tail, stream = stream_pieces(byte_tokenizer, ids, stops=("###",))
    assert stream.stopped and "".join(pieces) + tail == "red # and ## then "
    assert "".join(pieces[: ids.index(byte_tokenizer.encode("#")[0]) + 1]) == "red "  # '#' held back until 'a'
    pieces, tail, stream = stream_pieces(byte_tokenizer, byte_tokenizer.encode("ends with ##"), stops=("###",))
    assert not stream.stopped and "".join(pieces) == "ends with " and tail == "##"


def test_int4_is_suggested_when_only_smaller_weights_would_fit(tmp_path):
    folder, manifest = fake_export(tmp_path / "x", context=256)
    with open(folder / "decoder.onnx", "r+b") as f:  # a sparse 400 MiB decoder: the plan reads sizes only
        f.truncate(400 << 20)
    plan = plan_memory(read_manifest(folder), budget="512MB")
    assert plan.largest_context == 0 and plan.weights_int4 < 110 << 20
    with pytest.raises(BudgetError, match=r"would fit: an int4 export \(about 9\d\.\d MiB of weights\)"):
        plan.check()
    manifest["quantization"] = {"precision": "int4", "decoder": {"bits": 4}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    int4 = plan_memory(read_manifest(folder), budget="512MB")  # an int4 decoder is repacked at load: 0.42 x its bytes
    assert plan.prepacked == 0 and int4.prepacked == int(prepack_fraction(32) * (400 << 20))
    assert round(prepack_fraction(32), 2) == 0.42 and round(prepack_fraction(128), 3) == 0.124
    assert int4.peak == int4.runtime + int4.weights + int4.prepacked + max(int4.load_transient, int4.run)
    with pytest.raises(BudgetError, match="nothing smaller fits, raise --memory-budget"):
        plan_memory(read_manifest(folder), budget="512MB").check()


def test_graphs_with_external_data_load_once_and_prepack_all_their_bytes(tmp_path):
    """A decoder whose weights lie in decoder.onnx.data (export.graphs.EXTERNAL_DATA_FROM): the load transient is
    its small protobuf, not its weights again, and the int4 repacking still counts every byte of the weights."""
    folder, manifest = fake_export(tmp_path / "x", graph_bytes=(1000, 2000, 3000))
    manifest["quantization"] = {"precision": "int4", "decoder": {"bits": 4}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    single = plan_memory(read_manifest(folder))
    with open(folder / "decoder.onnx.data", "wb") as f:  # sparse 300 MiB of weights; the protobuf stays 3,000 bytes
        f.truncate(300 << 20)
    manifest["files"]["decoder.onnx.data"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    split = plan_memory(read_manifest(folder))
    assert single.load_transient == 3000 and split.load_transient == 3000  # the protobuf only, in both layouts
    assert split.weights == single.weights + (300 << 20)
    assert split.prepacked == int(prepack_fraction(32) * (3000 + (300 << 20)))
    manifest["quantization"]["decoder"]["block_size"] = 128  # fewer blocks, less repacked: 8.4 bytes a block
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert plan_memory(read_manifest(folder)).prepacked == int(prepack_fraction(128) * (3000 + (300 << 20)))


# ---------------------------------------------------------------- memory handed back after loading


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from /proc (Linux)")
def test_release_freed_memory_gives_freed_heap_pages_back():
    """64 MiB of small blocks freed below a live one stay resident (glibc does not trim the middle of its heap by
    itself) until release_freed_memory, which reports what went."""
    from runtime.session import release_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    script = (
        "import ctypes, ctypes.util\n"
        "from runtime.session import release_freed_memory\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "blocks = [libc.malloc(4096) for _ in range(16384)]\n"
        "for b in blocks: ctypes.memset(b, 1, 4096)\n"
        "keep = libc.malloc(4096)\n"
        "for b in blocks: libc.free(ctypes.c_void_p(b))\n"
        "print(release_freed_memory(), release_freed_memory())\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True)
    first, second = map(int, out.stdout.split())
    assert first > 48 << 20 and second < 4 << 20  # most of the 64 MiB went back at once; nothing left the second time
    assert release_freed_memory() >= 0


def test_each_graph_load_is_followed_by_a_trim(tiny_export_dir, monkeypatch):
    from runtime import session

    calls = []
    monkeypatch.setattr(session, "release_freed_memory", lambda: calls.append(1) or 1000)
    sessions = session.Sessions.create(read_manifest(tiny_export_dir), threads=1)
    assert len(calls) == 3 and sessions.trimmed_bytes == 3000


def test_pool_threads_spin_unless_told_not_to(tiny_export_dir):
    """The decoder's pool spins (onnxruntime's and genai's default, faster on a quiet box); --no-spin turns it off."""
    from runtime.cli import build_parser
    from runtime.session import Sessions, session_options

    key = "session.intra_op.allow_spinning"
    assert session_options(2).get_session_config_entry(key) == "1"
    assert session_options(2, spin=False).get_session_config_entry(key) == "0"
    sessions = Sessions.create(read_manifest(tiny_export_dir), threads=2)
    spins = {name: getattr(sessions, name).get_session_options().get_session_config_entry(key)
             for name in ("vision", "embedding", "decoder")}  # fmt: skip
    assert spins == {"vision": "0", "embedding": "0", "decoder": "1"}  # once-per-request graphs never spin
    assert not Sessions.create(read_manifest(tiny_export_dir), threads=1, spin=False).spin
    args = build_parser().parse_args(["--model", "m", "--prompt", "x", "--no-spin"])
    assert args.no_spin and not build_parser().parse_args(["--model", "m", "--prompt", "x"]).no_spin
