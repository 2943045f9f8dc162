"""Shared fixtures: a tiny model folder (tiny preset + a tiny BPE tokenizer) and its fp32 export, each built once a session.

def test_x(tiny_model_dir): ...     # config.json + model.safetensors + tokenizer.json, seeded weights
def test_y(tiny_export_dir): ...    # vision/embedding/decoder.onnx + tokenizer.json + manifest.json (fp32, validated)
def test_z(tiny_calib_data, tiny_eval_data): ...   # requests.jsonl files of the synthetic world (train / test split)
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_CORPUS = [
    "[INST] <Img><ImageHere></Img> [vqa] What color is the circle? [/INST] red",
    "[INST] <Img><ImageHere></Img> [vqa] What shape is blue? [/INST] square",
    "[INST] <Img><ImageHere></Img> [caption] Briefly describe this image. [/INST] a red circle and a blue square",
    "[INST] <Img><ImageHere></Img> [refer] where is the green triangle? [/INST] {<10><20><30><40>}",
    "How many shapes are there? two. Is there a yellow star? no.",
]


def train_tiny_tokenizer(vocab_size: int = 120):
    """A BPE tokenizer over TINY_CORPUS with `<|endoftext|>` as id 0 and fewer ids than the tiny image_token_id 127."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<unk>"], show_progress=False)
    tokenizer.train_from_iterator(TINY_CORPUS, trainer)
    assert tokenizer.token_to_id("<|endoftext|>") == 0 and tokenizer.get_vocab_size() < 127
    return tokenizer


def make_tiny_model_dir(path: Path, seed: int = 0, **language_model) -> Path:
    """The tiny preset with seeded weights; `language_model` overrides fields of its language model config."""
    import torch

    from core.config import ModelConfig
    from core.model import TinyGPTV
    from core.tokenizer import TextTokenizer

    torch.manual_seed(seed)
    cfg = ModelConfig.preset("tiny")
    cfg = cfg.replace(language_model=cfg.language_model.replace(**language_model))
    model = TinyGPTV(cfg).eval()
    lm = cfg.language_model
    tokenizer = TextTokenizer(train_tiny_tokenizer(), lm.bos_token_id, lm.eos_token_id, cfg.prompt.image_token_id)
    model.save_pretrained(path, tokenizer)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny-preset model (seed 0) with its tokenizer: config.json, model.safetensors, tokenizer.json."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_model") / "model")


@pytest.fixture(scope="session")
def tiny_export_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The default fp32 export folder of `tiny_model_dir` (GQA decoder; validated against PyTorch as every export is)."""
    from export.onnx import export_folder

    out = tmp_path_factory.mktemp("tiny_export") / "fp32"
    export_folder(out, tiny_model_dir)
    return out


@pytest.fixture(scope="session")
def tiny_plain_export_dir(tiny_model_dir, tiny_export_dir, tmp_path_factory) -> Path:
    """The fp32 export of `tiny_model_dir` with the plain decoder (--attention plain: past in, past + new out), which
    fp16, int8 and gptq-ort exports take; its vision and embedding graphs are the default export's."""
    from export.onnx import ExportOptions, export_folder

    out = tmp_path_factory.mktemp("tiny_plain_export") / "fp32"
    export_folder(out, tiny_model_dir, ExportOptions(attention="plain"), graphs_from=tiny_export_dir)
    return out


@pytest.fixture
def reuse_tiny_graphs(monkeypatch, tiny_export_dir, tiny_plain_export_dir):
    """export.onnx's export_graph copies the session's fp32 graphs of the asked decoder attention instead of tracing
    again (seconds, not a minute)."""
    import shutil

    from export import onnx as export_onnx
    from export.graphs import GRAPH_FILES

    def copy(model, name, path, seed=0, attention="plain"):
        source = tiny_plain_export_dir if attention == "plain" else tiny_export_dir
        shutil.copy(source / GRAPH_FILES[name], path)

    monkeypatch.setattr(export_onnx, "export_graph", copy)


def write_requests(folder: Path, split: str, n: int) -> Path:
    """The synthetic world's `requests` format for `split` (image + prompt + expected answer a line): the data file
    export.calibration reads for GPTQ calibration and the quality table."""
    from training.data.synthetic import SyntheticWorld
    from training.data.synthetic_writers import write_split

    write_split(SyntheticWorld(seed=0, image_size=64), split, n, folder, formats=("requests",))
    return folder / "requests.jsonl"


@pytest.fixture(scope="session")
def tiny_calib_data(tmp_path_factory) -> Path:
    """8 training-split requests (vqa, vqa, refer, vqa, caption, vqa, refer, vqa)."""
    return write_requests(tmp_path_factory.mktemp("calib") / "train", "train", 8)


@pytest.fixture(scope="session")
def tiny_eval_data(tmp_path_factory) -> Path:
    """4 held-out test-split requests (vqa, vqa, refer, vqa)."""
    return write_requests(tmp_path_factory.mktemp("eval") / "test", "test", 4)
