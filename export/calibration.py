"""Multimodal calibration and evaluation sequences for quantization: image + templated prompt + answer, as inputs_embeds.

    seqs = multimodal_sequences(model, tokenizer, n=32, split="train")   # synthetic world scenes, several task formats
    reader = DecoderCalibrationReader(seqs, model.config)                # onnxruntime CalibrationDataReader for GPTQ

Calibrating the decoder on text alone misses what it sees most at inference: the 32 projected image vectors at the
start of every prompt, whose statistics differ from token embeddings. So each sequence is built as training builds it
(training.collate.Collator: stage-4 template, BOS, image ids at the placeholder, answer + EOS), its image goes through
`encode_image`, and `embed` puts the image vectors in place; the decoder is calibrated on the resulting inputs_embeds.
Samples come from the synthetic world (training.data.synthetic), the same data the demo model trains on; the held-out
split ("test") gives the quality table's perplexity and accuracy sequences.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader

from core.config import ModelConfig
from core.model import TinyGPTV
from core.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

CALIBRATION_TASKS = ("vqa", "caption", "refer", "identify", "grounding", "detail", "conversation")
CALIBRATION_SEED = 0


@dataclass
class Sequence:
    """One calibration / evaluation sequence, batch 1, no padding."""

    input_ids: np.ndarray  # [1, T] int64, image ids in place
    labels: np.ndarray  # [1, T] int64, -100 outside the answers (the answer tokens and their EOS)
    pixel_values: np.ndarray  # [1, 3, S, S] float32
    inputs_embeds: np.ndarray  # [1, T, D] float32, image vectors in place (PyTorch fp32 encode_image + embed)
    meta: dict = field(default_factory=dict)


def synthetic_samples(split: str, n: int, tasks: tuple[str, ...] = CALIBRATION_TASKS, seed: int = CALIBRATION_SEED):
    """n samples of `split` cycling through `tasks`, one scene each (scene i gets task i mod len(tasks))."""
    from training.data.synthetic import SyntheticWorld  # the training package; only the exporter needs it

    world = SyntheticWorld(seed=seed)
    return [world.sample(i, tasks[i % len(tasks)], split) for i in range(n)]


@torch.no_grad()
def encode_samples(
    model: TinyGPTV, tokenizer: TextTokenizer, samples, template: str = "stage4", max_txt_len: int = 96
) -> list[Sequence]:
    """Samples -> sequences exactly as the training collator builds them, plus their inputs_embeds."""
    from training.collate import Collator

    collator = Collator(tokenizer, model.config, template=template, max_txt_len=max_txt_len)
    sequences = []
    for sample in samples:
        batch = collator([sample])
        features = model.encode_image(batch.pixel_values)  # [1, N, D]
        embeds = model.embed(batch.input_ids, features)  # [1, T, D]
        sequences.append(
            Sequence(
                batch.input_ids.numpy(),
                batch.labels.numpy(),
                batch.pixel_values.numpy(),
                embeds.float().numpy(),
                {"source": sample.source, "task": sample.task, **sample.meta},
            )
        )
    return sequences


def multimodal_sequences(
    model: TinyGPTV, tokenizer: TextTokenizer | None, n: int, split: str = "train", seed: int = CALIBRATION_SEED
) -> list[Sequence]:
    if tokenizer is None:
        raise ValueError("calibration needs the model's tokenizer (tokenizer.json in the model folder, or --tokenizer)")
    if n < 1:
        raise ValueError(f"--calib-samples must be at least 1, got {n}")
    return encode_samples(model.eval(), tokenizer, synthetic_samples(split, n, seed=seed))


def describe(sequences: list[Sequence], split: str = "train", seed: int = CALIBRATION_SEED) -> dict:
    """The manifest's record of the calibration data."""
    tasks: dict[str, int] = {}
    for seq in sequences:
        key = seq.meta.get("task") or seq.meta.get("source", "?")
        tasks[key] = tasks.get(key, 0) + 1
    return {
        "source": f"synthetic world seed {seed}, split {split!r} (training.data.synthetic)",
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
