"""Multimodal calibration and evaluation sequences for quantization: image + templated prompt + answer, as inputs_embeds.

    examples = read_examples("runs/demo/calib/requests.jsonl")       # image + prompt + expected answer, one per line
    seqs = multimodal_sequences(model, tokenizer, "runs/demo/calib/requests.jsonl", n=32)
    reader = DecoderCalibrationReader(seqs, model.config)              # onnxruntime CalibrationDataReader for GPTQ

Calibrating the decoder on text alone misses what it sees most at inference: the 32 projected image vectors at the
start of every prompt, whose statistics differ from token embeddings. So each sequence is built as training builds a
stage-4 sample (BOS, `[INST] <Img><ImageHere></Img> prompt [/INST]` with the image ids in place, answer + EOS, the
answer supervised), its image goes through `encode_image`, and `embed` puts the image vectors in place; the decoder
is calibrated on the resulting inputs_embeds.

The data is a file, not a package: the runtime's request format (`python -m runtime --batch`), one JSON object a line
with "image" (a path, relative to the file's folder), "prompt" (what a user types: task tag + question) and
"expected" (the answer), optionally "task" (vqa, caption, refer, ...). The demo writes such files from the synthetic
world (`python -m training.data.synthetic --split train --formats requests`); with real data, write a few dozen lines
from the training set (calibration) or a held-out set (the quality table). So export/ never imports training/.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader

from core.config import ModelConfig
from core.image import ImageError, load_image, preprocess_for
from core.model import TinyGPTV
from core.prompts import TEMPLATE_STAGE4, PromptError, build_prompt
from core.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

IGNORE = -100  # label of the positions that are not supervised (prompt, image ids)
DATA_FORMAT = 'one JSON object a line: {"image": path, "prompt": text, "expected": answer, "task": optional}'


class CalibrationDataError(ValueError):
    """A calibration / evaluation file that cannot be read, with the file, the line and what to do."""


@dataclass(frozen=True)
class Example:
    """One line of a calibration / evaluation file."""

    image: Path
    prompt: str
    answer: str
    task: str = ""


@dataclass
class Sequence:
    """One calibration / evaluation sequence, batch 1, no padding."""

    input_ids: np.ndarray  # [1, T] int64, image ids in place
    labels: np.ndarray  # [1, T] int64, -100 outside the answer tokens and their EOS
    pixel_values: np.ndarray  # [1, 3, S, S] float32
    inputs_embeds: np.ndarray  # [1, T, D] float32, image vectors in place (PyTorch fp32 encode_image + embed)
    prompt_length: int = 0  # tokens before the answer: input_ids[0, :prompt_length] is the generation prompt
    meta: dict = field(default_factory=dict)


def read_examples(path: str | Path, n: int | None = None) -> list[Example]:
    """The first `n` (all if None) examples of a calibration / evaluation file; any bad line fails naming it."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"{path}: no such calibration / evaluation file ({DATA_FORMAT})")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise CalibrationDataError(f"{path}:{number}: not valid JSON ({err})") from None
        fields = (data.get("image"), data.get("prompt"), data.get("expected")) if isinstance(data, dict) else ()
        if len(fields) != 3 or not all(isinstance(f, str) and f for f in fields):
            raise CalibrationDataError(f"{path}:{number}: needs text fields image, prompt and expected ({DATA_FORMAT})")
        image = Path(fields[0]) if Path(fields[0]).is_absolute() else path.parent / fields[0]
        if not image.is_file():
            raise CalibrationDataError(f"{path}:{number}: image {image} does not exist")
        examples.append(Example(image, fields[1], fields[2], str(data.get("task") or "")))
        if n is not None and len(examples) == n:
            break
    if not examples:
        raise CalibrationDataError(f"{path}: no examples ({DATA_FORMAT})")
    return examples


def check_data(path: str | Path | None, flag: str = "--calib-data") -> None:
    """Fail early, before any slow work, when the file named by `flag` is missing or its first example is bad."""
    if path is None:
        raise CalibrationDataError(
            f"GPTQ calibrates on image + prompt + answer examples: pass {flag} FILE.jsonl ({DATA_FORMAT}; "
            "the demo's: python -m training.data.synthetic --split train --formats requests)"
        )
    read_examples(path, 1)


@torch.no_grad()
def encode_examples(model: TinyGPTV, tokenizer: TextTokenizer, examples: list[Example]) -> list[Sequence]:
    """Examples -> stage-4 sequences as training builds them, plus their inputs_embeds."""
    cfg = model.config
    sequences = []
    for example in examples:
        try:
            prompt = tokenizer.encode_prompt(build_prompt(example.prompt, TEMPLATE_STAGE4), 1, cfg.num_image_tokens)
            pixels = preprocess_for(load_image(example.image), cfg.image)[None]  # [1, 3, S, S]
        except (PromptError, ImageError) as err:
            raise CalibrationDataError(f"{example.image}: {err}") from None
        answer = tokenizer.encode(example.answer) + [tokenizer.eos_token_id]
        input_ids = torch.tensor([prompt + answer])  # [1, T]
        features = model.encode_image(torch.from_numpy(pixels))  # [1, N, D]
        embeds = model.embed(input_ids, features)  # [1, T, D]
        sequences.append(
            Sequence(
                input_ids.numpy(),
                np.array([[IGNORE] * len(prompt) + answer], np.int64),
                pixels.astype(np.float32),
                embeds.float().numpy(),
                len(prompt),
                {"task": example.task, "answer": example.answer},
            )
        )
    return sequences


def multimodal_sequences(
    model: TinyGPTV, tokenizer: TextTokenizer | None, data: str | Path | None, n: int
) -> list[Sequence]:
    """The first n examples of the file `data`, encoded (what GPTQ calibrates on)."""
    if tokenizer is None:
        raise ValueError("calibration needs the model's tokenizer (tokenizer.json in the model folder, or --tokenizer)")
    check_data(data)
    if n < 1:
        raise ValueError(f"--calib-samples must be at least 1, got {n}")
    examples = read_examples(data, n)
    if len(examples) < n:
        logger.warning("%s holds %d examples, fewer than the %d asked for: calibrating on all", data, len(examples), n)
    return encode_examples(model.eval(), tokenizer, examples)


def describe(sequences: list[Sequence], data: str | Path) -> dict:
    """The manifest's record of the calibration data."""
    tasks: dict[str, int] = {}
    for seq in sequences:
        key = seq.meta.get("task") or "untagged"
        tasks[key] = tasks.get(key, 0) + 1
    return {
        "source": str(data),
        "format": "stage-4 template, image vectors in inputs_embeds, answer + EOS",
        "sequences": len(sequences),
        "tokens": int(sum(s.input_ids.shape[1] for s in sequences)),
        "tasks": tasks,
    }


def decoder_feed(embeds: np.ndarray, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The decoder graph's inputs for a prefill of `embeds` [1, T, D] at past length 0."""
    lm = cfg.language_model
    B, T, _ = embeds.shape
    feed = {
        "inputs_embeds": embeds.astype(np.float32),
        "attention_mask": np.ones((B, T), np.int64),
        "position_ids": np.arange(T, dtype=np.int64)[None].repeat(B, 0),
    }
    empty = np.zeros((B, lm.num_heads, 0, lm.head_size), np.float32)
    for i in range(lm.num_layers):
        feed[f"past_key_values.{i}.key"] = empty
        feed[f"past_key_values.{i}.value"] = empty
    return feed


class DecoderCalibrationReader(CalibrationDataReader):
    """Feeds onnxruntime's quantizers one multimodal sequence at a time (prefill, past length 0)."""

    def __init__(self, sequences: list[Sequence], cfg: ModelConfig) -> None:
        self.feeds = [decoder_feed(s.inputs_embeds, cfg) for s in sequences]
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def __len__(self) -> int:
        return len(self.feeds)

    def rewind(self) -> None:
        self.index = 0
