"""python -m runtime: every bad input gets one line on stderr and exit status 2; odd image modes are converted; batch,
chat (with Ctrl-C) and box drawing."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from core.boxes import PALETTE
from core.image import load_image
from runtime import Pipeline
from runtime.cli import draw_answer, main
from runtime.generate import GenerationResult

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def pipe(tiny_export_dir):
    return Pipeline.load(tiny_export_dir, threads=1)


def run_cli(capsys, *args):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def copy_export(src, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(src, dst)
    return dst


def bomb_png(path, width=10_000, height=10_000):
    """A 1x1 PNG whose header claims width x height pixels (the decompression-bomb shape)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def edit_manifest(folder, **changes):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


BAD_IMAGES = {
    "missing.png": (None, "missing.png: no such file"),
    "empty.png": (b"", "empty.png: the file is empty (0 bytes)"),
    "notes.png": (b"these are not pixels\n" * 20, "notes.png: not an image Pillow can read"),
    "half.png": ("truncate", "half.png: the image data is truncated or corrupt"),
    "bomb.png": ("bomb", "bomb.png: 10,000 x 10,000 = 100,000,000 pixels is more than the limit of 89,478,485 pixels"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_images_are_one_line_and_exit_2(tiny_export_dir, photo, tmp_path, capsys, name):
    content, message = BAD_IMAGES[name]
    path = tmp_path / name
    if content == "truncate":
        big = tmp_path / "big.png"
        Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)).save(big)
        path.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    elif content == "bomb":
        bomb_png(path)
    elif content is not None:
        path.write_bytes(content)
    code, out, err = run_cli(capsys, "--model", tiny_export_dir, "--image", path, "--prompt", "[vqa] what?")
    assert (code, out) == (2, "") and err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_bad_folders_and_settings_are_one_line_and_exit_2(tiny_export_dir, photo, tmp_path, capsys):
    model = copy_export(tiny_export_dir, tmp_path)
    ask = ["--image", photo, "--prompt", "[vqa] What color is the circle?"]
    cases = [
        (["--model", tmp_path / "nowhere", *ask], "nowhere: no such folder"),
        (["--model", tmp_path, *ask], "no manifest.json; this is not an export folder"),
        (["--model", model, *ask, "--max-new-tokens", "0"], "--max-new-tokens must be positive, got 0"),
        (["--model", model, *ask, "--max-new-tokens", "-3"], "--max-new-tokens must be positive, got -3"),
        (["--model", model, *ask, "--context", "999"], "context 999 is longer than the model's 256 positions"),
        (["--model", model, *ask, "--memory-budget", "lots"], "memory budget 'lots' is not a size"),
        (["--model", model, *ask, "--memory-budget", "20MB"], "planned peak"),
        (["--model", model, *ask, "--temperature", "-1"], "temperature must be >= 0"),
        (["--model", model, *ask, "--threads", "0"], "--threads must be positive"),
        (["--model", model, *ask, "--bogus"], "unrecognized arguments: --bogus"),
        (["--model", model, "--image", photo], "--prompt is required"),
        (["--model", model, *ask, "--draw", tmp_path / "no" / "out.png"], "the folder"),
    ]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        cases.append((["--model", model, *ask, "--provider", "cuda"], "have: CPUExecutionProvider"))
    for args, message in cases:
        code, out, err = run_cli(capsys, *args)
        assert (code, out) == (2, ""), (args, out, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (args, err)


def test_context_overflow_gives_each_number(tiny_export_dir, photo, capsys, pipe):
    prompt = "[vqa] What color is the circle?"
    ids = pipe.prompt_ids(prompt, image=True)
    code, _, err = run_cli(capsys, "--model", tiny_export_dir, "--image", photo, "--prompt", prompt,
                           "--max-new-tokens", 250)  # fmt: skip
    text = len(ids) - 8
    assert code == 2 and (
        f"prompt {text} text tokens + 8 image tokens + max_new_tokens 250 = {len(ids) + 250} > context 256" in err
    )
    code, _, err = run_cli(capsys, "--model", tiny_export_dir, "--image", photo, "--prompt", prompt,
                           "--max-new-tokens", 200, "--context", 128)  # fmt: skip
    assert code == 2 and f"= {len(ids) + 200} > context 128" in err


def test_tampered_export_is_refused_by_name(tiny_export_dir, photo, tmp_path, capsys):
    model = copy_export(tiny_export_dir, tmp_path)
    data = bytearray((model / "decoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (model / "decoder.onnx").write_bytes(bytes(data))
    code, out, err = run_cli(capsys, "--model", model, "--image", photo, "--prompt", "x")
    assert code == 2 and "decoder.onnx: sha256" in err and "does not match the manifest" in err
    (model / "decoder.onnx").write_bytes(b"")
    code, out, err = run_cli(capsys, "--model", model, "--image", photo, "--prompt", "x")
    assert code == 2 and "decoder.onnx: sha256" in err and "empty (0 bytes)" in err
    edit_manifest(model, schema_version=7)
    code, out, err = run_cli(capsys, "--model", model, "--image", photo, "--prompt", "x")
    assert code == 2 and "schema_version 7 is not supported; this runtime reads version 1" in err


def test_a_real_process_exits_2_with_one_line_and_no_traceback(tiny_export_dir, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    out = subprocess.run(
        [sys.executable, "-m", "runtime", "--model", str(tiny_export_dir), "--image", str(tmp_path / "empty.jpg"),
         "--prompt", "[vqa] what?"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"error: {tmp_path / 'empty.jpg'}: the file is empty (0 bytes)\n"


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA", "1"])
def test_odd_image_modes_are_converted_not_refused(tiny_export_dir, photo, tmp_path, capsys, pipe, mode):
    rgb = Image.open(photo)
    if mode == "I;16":
        im = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    elif mode == "P":
        im = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        im = rgb.convert(mode)
    path = tmp_path / ("odd.jpg" if mode == "CMYK" else "odd.png")
    im.save(path)
    code, out, err = run_cli(capsys, "--model", tiny_export_dir, "--image", path, "--prompt", "[vqa] what?",
                             "--max-new-tokens", 6, "--json")  # fmt: skip
    assert code == 0, err
    expected = pipe.generate(load_image(path), "[vqa] what?", max_new_tokens=6)
    assert json.loads(out)["tokens"] == expected.tokens


def test_json_answer_and_timings(tiny_export_dir, photo, capsys, pipe):
    code, out, err = run_cli(capsys, "--model", tiny_export_dir, "--image", photo, "--prompt", "[vqa] what?",
                             "--max-new-tokens", 5, "--json", "--timings", "--threads", 1)  # fmt: skip
    data = json.loads(out)
    assert code == 0 and data["tokens"] == pipe.generate(photo, "[vqa] what?", max_new_tokens=5).tokens
    assert data["stop_reason"] == "length" and data["timings"]["decode_tokens"] == 4 and data["boxes"] == []
    assert "first token" in err and "tokens/s" in err and "peak RSS" in err
    code, out, err = run_cli(capsys, "--model", tiny_export_dir, "--image", photo, "--prompt", "[vqa] what?",
                             "--max-new-tokens", 5)  # fmt: skip
    assert code == 0 and out == pipe.generate(photo, "[vqa] what?", max_new_tokens=5).text + "\n"


def test_plan_prints_without_loading(tiny_export_dir, capsys, tmp_path):
    model = copy_export(tiny_export_dir, tmp_path)
    (model / "decoder.onnx").write_bytes(b"broken")  # --plan reads the manifest only
    code, out, err = run_cli(capsys, "--model", model, "--plan", "--context", 128)
    assert code == 0 and "KV cache" in out and "context 128 x batch 1" in out and "fits" in out
    code, out, err = run_cli(capsys, "--model", model, "--plan", "--memory-budget", "10MB")
    assert code == 2 and "OVER BUDGET" in out and err.startswith("error: planned peak")


def test_batch_answers_in_order_and_reports_bad_lines(tiny_export_dir, photo, tmp_path, capsys, pipe):
    shutil.copy(photo, tmp_path / "a.png")
    lines = [
        {"id": 1, "image": "a.png", "prompt": "[vqa] What color is the circle?", "answer": "red"},
        {"id": 2, "image": "gone.png", "prompt": "[vqa] x"},
        "not json",
        {"id": 4, "image": None, "prompt": "How many shapes are there?", "expected": "Two."},
        {"id": 5, "image": "a.png", "prompt": "[refer] where is the green triangle?", "expected": "{<0><0><50><50>}"},
        {"id": 6, "prompt": "[vqa] x", "expected": 2},
    ]
    lines[0]["expected"] = " " + pipe.generate(photo, lines[0]["prompt"], max_new_tokens=7).text.upper() + ". "
    (tmp_path / "req.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    code, out, err = run_cli(capsys, "--model", tiny_export_dir, "--batch", tmp_path / "req.jsonl",
                             "--out", tmp_path / "ans.jsonl", "--batch-size", 2, "--max-new-tokens", 7)  # fmt: skip
    answers = [json.loads(x) for x in (tmp_path / "ans.jsonl").read_text().splitlines()]
    assert code == 2 and [a.get("id") for a in answers] == [1, 2, None, 4, 5, 6]
    assert "gone.png: no such file" in answers[1]["error"] and "not valid JSON" in answers[2]["error"]
    assert '"expected" must be text or null, got 2' in answers[5]["error"]
    for answer, (image, prompt) in zip([answers[0], answers[3], answers[4]], [(photo, lines[0]["prompt"]),
                                       (None, lines[3]["prompt"]), (photo, lines[4]["prompt"])]):  # fmt: skip
        assert answer["tokens"] == pipe.generate(image, prompt, max_new_tokens=7).tokens
    # case, spaces and a final period aside; a box by IoU (the random model answers no box: IoU 0)
    assert [(a["expected"], a["match"]) for a in answers[0:4:3]] == [(lines[0]["expected"], True), ("Two.", False)]
    assert answers[4]["boxes"] == [] and (answers[4]["match"], answers[4]["iou"]) == (False, 0.0)
    assert err.count("\n") == 4 and "3 of 6 requests failed" in err
    table = out.splitlines()
    assert table[0].split() == ["#", "question", "answer", "expected", "match", "first", "token", "new", "tokens/s",
                                "total"]  # fmt: skip
    assert [row.split()[0] for row in table[2:5]] == ["0", "3", "4"]
    assert "  yes  " in table[2] and "  no  " in table[3] and "  no (IoU 0.00)  " in table[4]
    assert table[5].startswith("3 answered | 1 of 3 match the expected answer | median first token")
    assert table[6] == f"answers written to {tmp_path / 'ans.jsonl'}"


def test_match_answer():
    from runtime.cli_batch import match_answer

    assert match_answer("Red.", " red") == (True, None) and match_answer("blue", "red") == (False, None)
    assert match_answer("it is {<10><10><50><50>}", "{<10><10><50><60>}") == (True, pytest.approx(0.8))
    assert match_answer("{<0><0><10><10>}", "{<10><10><50><60>}") == (False, 0.0)
    assert match_answer("nowhere", "{<10><10><50><60>}") == (False, 0.0)


def test_chat_keeps_context_and_survives_errors_and_ctrl_c(tiny_export_dir, photo, capsys, monkeypatch, pipe):
    script = iter(["[vqa] What color is the circle?", KeyboardInterrupt, "And the square?", "/image nowhere.png",
                   "/bogus", "/reset", "[vqa] What color is the circle?", "/quit"])  # fmt: skip

    def fake_input(prompt=""):
        item = next(script)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    monkeypatch.setattr("builtins.input", fake_input)
    code, out, err = run_cli(capsys, "--model", tiny_export_dir, "--image", photo, "--chat", "--max-new-tokens", 6)
    chat = pipe.chat(photo)
    expected = [chat.ask("[vqa] What color is the circle?", max_new_tokens=6).text,
                chat.ask("And the square?", max_new_tokens=6).text]  # fmt: skip
    assert code == 0 and out.splitlines() == [expected[0], expected[1], expected[0]]
    assert "(Ctrl-C again, Ctrl-D or /quit to leave)" in err and "nowhere.png: no such file" in err
    assert "unknown command /bogus" in err and "(conversation forgotten)" in err


def test_ctrl_c_during_an_answer_stops_the_answer_not_the_chat(tiny_export_dir, photo, capsys, monkeypatch):
    from runtime import cli_chat

    script = iter(["[vqa] What color is the circle?", "[vqa] again", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(script))

    class Interrupting(io.StringIO):
        armed = True

        def write(self, text):
            if self.armed and text.strip() and text != " [stopped]":
                self.armed = False
                raise KeyboardInterrupt
            return super().write(text)

    fake = Interrupting()
    monkeypatch.setattr(cli_chat.sys, "stdout", fake)
    code, _, _ = run_cli(capsys, "--model", tiny_export_dir, "--image", photo, "--chat", "--max-new-tokens", 6)
    lines = fake.getvalue().splitlines()
    assert code == 0 and lines[0] == " [stopped]" and len(lines) == 2 and lines[1]


def test_draw_answer_puts_labelled_boxes_on_the_image(tmp_path):
    image = Image.new("RGB", (200, 100), "white")
    result = GenerationResult("<p>a dog</p> {<10><20><50><60>}", [], 0, "eos")
    assert draw_answer(image, result, tmp_path / "out.png") == 1
    drawn = np.asarray(Image.open(tmp_path / "out.png"))
    assert tuple(drawn[40, 20]) == PALETTE[0]  # left edge at x = 10% of 200, inside the box's rows
    assert tuple(drawn[40, 60]) == (255, 255, 255)  # inside the box stays white
    plain = GenerationResult("{<0><0><100><100>}", [], 0, "eos")
    assert draw_answer(image, plain, tmp_path / "plain.png") == 1
    assert draw_answer(image, GenerationResult("red", [], 0, "eos"), tmp_path / "none.png") == 0
    assert not (tmp_path / "none.png").exists()


def test_batch_of_the_synthetic_requests_format(tiny_export_dir, tmp_path, capsys):
    """What `make demo` runs: the synthetic world's requests.jsonl answered through the CLI, one table row each."""
    from training.data.synthetic import SyntheticWorld
    from training.data.synthetic_writers import write_split

    write_split(SyntheticWorld(seed=0, image_size=64), "val", 7, tmp_path / "req", formats=("requests",))
    requests = [json.loads(x) for x in (tmp_path / "req" / "requests.jsonl").read_text().splitlines()]
    code, out, err = run_cli(capsys, "--model", tiny_export_dir, "--batch", tmp_path / "req" / "requests.jsonl",
                             "--out", tmp_path / "ans.jsonl", "--max-new-tokens", 6, "--threads", 1)  # fmt: skip
    answers = [json.loads(x) for x in (tmp_path / "ans.jsonl").read_text().splitlines()]
    assert code == 0 and err == "" and [a["id"] for a in answers] == [r["id"] for r in requests]
    assert [a["expected"] for a in answers] == [r["expected"] for r in requests]
    rows = out.splitlines()[2:9]
    assert [row.split("  ")[0] for row in rows] == [str(i) for i in range(7)]
    assert all(r["prompt"][:40] in row for r, row in zip(requests, rows))
    refer = [i for i, r in enumerate(requests) if r["task"] == "refer"]
    assert [a.get("drawn") for a in answers] == [0 if i in refer else None for i in range(7)]  # a random model: no box
    assert out.splitlines()[10:12] == [f"[{i}] no box in the answer; nothing drawn" for i in refer]
