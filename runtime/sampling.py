"""Choosing the next token in numpy: greedy, temperature, top-k, top-p, repetition penalty; seeded and reproducible.

The rules are those of the PyTorch reference (`core.generation.process_logits`), in the same order: repetition penalty
as in transformers (divide positive logits, multiply negative ones, over every token seen, prompt included), then
temperature, top-k, top-p (keep the smallest prefix whose mass reaches top_p, never fewer than one token), then one draw
per row from a numpy Generator seeded once per generation. Temperature 0 is greedy (argmax, first index on ties, as
torch). Tokens that may never be drawn (the image token id) are masked before anything else; with `min_tokens`, the stop
ids (EOS) are masked too until each row has that many tokens, as transformers' `min_new_tokens` and onnxruntime-genai's
`min_length` do.

    sampler = Sampler(SamplingParams(temperature=0.7, top_p=0.9, seed=1), vocab_size=1024, banned_ids=(1023,))
    sampler.observe(prompt_ids_per_row)
    next_ids = sampler(logits)            # logits [B, V] -> int64 [B]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.errors import RuntimeInputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)) or self.temperature < 0:
            raise RuntimeInputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise RuntimeInputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise RuntimeInputError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise RuntimeInputError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax of [B, V] float logits, -inf allowed (at least one finite value per row)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)  # [B, V]
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> None:
    """In place: logits [B, V] at seen [B, V] (bool) divided by `penalty` where positive, multiplied where negative."""
    if penalty == 1.0:
        return
    vals = logits[seen]
    logits[seen] = np.where(vals > 0, vals / np.float32(penalty), vals * np.float32(penalty))


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep every logit >= the row's k-th largest (ties at the k-th all kept, as torch's masked_fill(< kth))."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = -np.partition(-logits, k - 1, axis=-1)[:, k - 1 : k]  # [B, 1]
    return np.where(logits < kth, -np.inf, logits).astype(logits.dtype)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability mass reaches `p` (always at least one)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")  # [B, V], descending
    sorted_logits = np.take_along_axis(logits, order, axis=-1)  # [B, V]
    probs = softmax(sorted_logits)
    drop = np.cumsum(probs, axis=-1) - probs > p  # [B, V]
    sorted_logits = np.where(drop, -np.inf, sorted_logits)
    out = np.empty_like(logits)
    np.put_along_axis(out, order, sorted_logits.astype(logits.dtype), axis=-1)
    return out


def process_logits(logits: np.ndarray, seen: np.ndarray | None, params: SamplingParams) -> np.ndarray:
    """logits [B, V] -> processed float32 logits [B, V] (-inf where a token may not be drawn)."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if seen is not None:
        apply_repetition_penalty(out, seen, params.repetition_penalty)
    if params.greedy:
        return out
    out /= np.float32(params.temperature)
    out = apply_top_k(out, params.top_k)
    return apply_top_p(out, params.top_p)


class Sampler:
    """Turns each step's logits into next token ids for a batch, remembering what each row has seen."""

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        banned_ids: Sequence[int] = (),
        min_tokens: int = 0,
        stop_ids: Sequence[int] = (),
    ) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.banned = np.array([i for i in banned_ids if 0 <= i < vocab_size], dtype=np.int64)
        early = sorted({*self.banned.tolist(), *(i for i in stop_ids if 0 <= i < vocab_size)})
        self.banned_early = np.array(early, dtype=np.int64)  # banned + stop ids, while fewer than min_tokens
        self.min_tokens = min_tokens
        self.chosen = 0  # tokens chosen per row since observe()
        self.rng = np.random.Generator(np.random.PCG64(params.seed))
        self.seen: np.ndarray | None = None  # [B, V] bool, only with a repetition penalty

    def observe(self, rows: Sequence[Sequence[int]]) -> None:
        """Start a generation: the token ids each row already holds (prompt, earlier turns)."""
        self.chosen = 0
        if self.params.repetition_penalty == 1.0:
            self.seen = None
            return
        self.seen = np.zeros((len(rows), self.vocab_size), dtype=bool)
        for row, ids in enumerate(rows):
            ids = np.asarray(list(ids), dtype=np.int64)
            self.seen[row, ids[(ids >= 0) & (ids < self.vocab_size)]] = True

    def add(self, next_ids: np.ndarray) -> None:
        """Record the ids just chosen (one per row)."""
        self.chosen += 1
        if self.seen is not None:
            self.seen[np.arange(len(next_ids)), next_ids] = True

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, V] -> next ids int64 [B]."""
        logits = np.array(logits, dtype=np.float32, copy=True)  # [B, V]
        banned = self.banned if self.chosen >= self.min_tokens else self.banned_early
        if banned.size:
            logits[:, banned] = -np.inf
        scores = process_logits(logits, self.seen, self.params)
        if self.params.greedy:
            return scores.argmax(axis=-1).astype(np.int64)  # [B]
        probs = softmax(scores.astype(np.float64))  # [B, V]
        cdf = np.cumsum(probs, axis=-1)
        u = self.rng.random(len(probs))[:, None] * cdf[:, -1:]  # [B, 1]
        picked = (cdf <= u).sum(axis=-1)  # [B] index of the first cdf value above u
        last = probs.shape[-1] - 1 - (probs[:, ::-1] > 0).argmax(axis=-1)  # [B] last drawable id (rounding guard)
        return np.minimum(picked, last).astype(np.int64)
