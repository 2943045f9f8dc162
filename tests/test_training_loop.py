"""The training loop: exact resume, gradient accumulation and two-process DDP equal to one process, the CLI end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_tiny_tokenizer

from core.config import ModelConfig
from core.model import TinyGPTV
from core.tokenizer import TextTokenizer
from training.collate import Collator
from training.data.loaders_base import MapLoader
from training.data.synthetic import SyntheticWorld
from training.freeze import set_trainable, trainable_state
from training.loop import RunOptions, loader_batches, make_accelerator, train_stage
from training.lora import add_lora
from training.stages import StageConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is far faster on one thread when the cores are shared
    yield
    torch.set_num_threads(threads)


class MemoryLoader(MapLoader):
    source = "memory"

    def make(self, record, rng):
        return record


def run_tiny(out, batch=4, steps=6, accum=1, dropout=0.05, stop_after=None, resume=False):
    """Stage 2 of the tiny preset (projector + norms + LoRA) on 12 synthetic scenes; returns (model, result)."""
    cfg = ModelConfig.preset("tiny")
    tokenizer = TextTokenizer(train_tiny_tokenizer(), 0, 0, cfg.prompt.image_token_id)
    samples = SyntheticWorld(0, 64).samples("train", 12, tasks=("vqa", "refer", "conversation"))
    stage = StageConfig.preset("stage2", "tiny")
    stage = stage.replace(batch_size=batch, grad_accum=accum, lora=stage.lora.replace(dropout=dropout),
                          schedule=stage.schedule.replace(max_steps=steps), save_every=100)  # fmt: skip
    torch.manual_seed(0)
    model = TinyGPTV(cfg)
    add_lora(model, stage.lora)
    set_trainable(model)
    options = RunOptions(cpu=True, progress=False, stop_after=stop_after)
    accelerator = make_accelerator(options)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = loader_batches(MemoryLoader(samples), batch, seed=0, rank=rank, world_size=world)
    collator = Collator(tokenizer, cfg, stage.template, stage.image_size, stage.max_txt_len)
    result = train_stage(model, stage, batches, collator, out, resume, options, accelerator)
    return model, result


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(tmp_path):
    whole, result = run_tiny(tmp_path / "whole")
    assert result.steps == 6 and not result.interrupted
    _, first = run_tiny(tmp_path / "split", stop_after=3)
    assert first.interrupted and first.steps == 3 and first.checkpoint.name == "step-000003"
    torch.manual_seed(1234)  # a resumed process starts with other RNG states; the checkpoint restores them
    torch.rand(100)
    resumed, second = run_tiny(tmp_path / "split", resume=True)
    assert second.steps == 6 and not second.interrupted
    assert max_difference(trainable_state(whole), trainable_state(resumed)) <= 1e-6
    assert losses(tmp_path / "split") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 6
    assert (tmp_path / "split" / "done.json").is_file()


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    big, _ = run_tiny(tmp_path / "big", batch=4, steps=3, dropout=0.0)
    accumulated, _ = run_tiny(tmp_path / "accum", batch=2, accum=2, steps=3, dropout=0.0)
    assert max_difference(trainable_state(big), trainable_state(accumulated)) <= 1e-6


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "import torch\ntorch.set_num_threads(1)\n"
        "from test_training_loop import run_tiny\n"
        "run_tiny(sys.argv[1], batch=2, steps=3, dropout=0.0)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), str(tmp_path / "ddp")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    one, _ = run_tiny(tmp_path / "one", batch=4, steps=3, dropout=0.0)
    from core.weights import load_safetensors

    two = load_safetensors(tmp_path / "ddp" / "trainable.safetensors")
    assert max_difference(trainable_state(one), two) <= 1e-5
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["world_size"] == 2 and state["counters"]["samples"] == 12
    assert {p.name for p in (tmp_path / "ddp" / "checkpoints" / "step-000003").glob("rank*.json")} == {
        "rank0.json", "rank1.json"}  # fmt: skip


def test_cli_trains_four_stages_and_writes_a_loadable_merged_model(tmp_path, capsys):
    from core.weights import write_blip2_folder, write_phi_folder
    from training.__main__ import main
    from training.pipeline import build_stage_model, model_config

    out = tmp_path / "run"
    torch.manual_seed(0)
    base = TinyGPTV(ModelConfig.preset("tiny"))
    write_blip2_folder(base, out / "base" / "vision")
    write_phi_folder(base.language_model, out / "base" / "lm")
    train_tiny_tokenizer().save(str(out / "base" / "lm" / "tokenizer.json"))
    argv = ["--preset", "tiny", "--out", str(out), "--demo-images", "12", "--steps", "2", "--no-eval"]
    assert main(argv) == 0
    for n in range(1, 5):
        assert json.loads((out / f"stage{n}" / "done.json").read_text())["steps"] == 2
    final = TinyGPTV.from_pretrained(out / "final")
    assert (out / "final" / "tokenizer.json").is_file() and final.config.image.size == 64
    assert not any("lora" in k for k in final.state_dict())
    cfg = model_config("tiny", out / "base" / "vision", out / "base" / "lm")
    stage4 = StageConfig.preset("stage4", "tiny")
    unmerged = build_stage_model(cfg, stage4, out / "base" / "vision", out / "base" / "lm",
                                 out / "stage4" / "trainable.safetensors").eval()  # fmt: skip
    ids = torch.tensor([[0, 5, *[127] * 8, 6, 7]])
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = unmerged(ids, torch.ones_like(ids), pixel_values=pixels)["logits"]
        got = final(ids, torch.ones_like(ids), pixel_values=pixels)["logits"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    from core.weights import load_safetensors

    s1, s4 = (load_safetensors(out / f"stage{n}" / "trainable.safetensors") for n in (1, 4))
    assert "projector.fc1.weight" in s1 and not any("lora" in k for k in s1) and any("lora_A" in k for k in s4)
    assert (s1["projector.fc1.weight"] - s4["projector.fc1.weight"]).abs().max() > 0  # stages 2-4 kept training it
    assert main(argv) == 0  # a second run finds every stage done and only rewrites final/
    (out / "stage4" / "done.json").unlink()  # as if killed after its last checkpoint
    assert main(argv) == 2
    assert "stage4 holds an interrupted run; pass --resume to continue it" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0 and (out / "stage4" / "done.json").is_file()


def test_cli_refuses_bad_input_with_one_line(tmp_path, capsys):
    from training.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "tinygptv", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "python -m training: error: --preset tinygptv needs --base-vision, --base-lm, --data "
        "(no weights or data can be downloaded here)"
    )
    (tmp_path / "base" / "vision").mkdir(parents=True)
    argv = ["--preset", "tiny", "--out", str(tmp_path), "--data", str(tmp_path)]
    assert main([*argv, "--base-vision", str(tmp_path / "base" / "vision"), "--base-lm", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"python -m training: error: {tmp_path}/base/vision is not a BLIP-2 folder (--base-vision): it has no config.json\n"
    )
