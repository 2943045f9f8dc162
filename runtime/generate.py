"""Prefill and decode with the ONNX graphs, the token loop, and text that streams correctly across token boundaries.

Two phases, as in the PyTorch reference (`core.generation.generate`): prefill runs the embedding graph and the decoder
over the whole (left-padded) prompt at once; then each decode step embeds the batch's chosen tokens and runs the
decoder for one position against the KV cache. When the plan loads the folder's prefill graph (an int8 twin of an int4
decoder, export.quantize), the prompt runs through it instead, against the same cache: same inputs, same outputs.
Positions count real tokens only and left padding is masked, so a batch gives each row the tokens it would get alone.
Decode steps write into buffers allocated once (`DecodeLoop.__init__`, `KVCache`); nothing grows per token.

`TextStream` turns token ids into printable text: byte-level tokens can split one UTF-8 character across two tokens,
so text is only released once it decodes without a trailing replacement character, and text that could be the start of
a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnxruntime as ort

from core.boxes import parse_boxes, parse_grounded
from core.prompts import cut_at_stop, holds_stop_prefix
from core.tokenizer import TextTokenizer
from runtime.budget import PREFILL_CHUNK
from runtime.embedding import EmbeddingTable
from runtime.errors import ContextError
from runtime.kv_cache import KVCache
from runtime.sampling import Sampler
from runtime.session import Sessions

REPLACEMENT = "\ufffd"


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (0 where the platform does not say).

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's own memory; getrusage's ru_maxrss is
    not used there because it carries over across exec and would report the parent's size (a pytest full of torch).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


class TextStream:
    """Token ids in, text out; `pieces` joined equal `cut_at_stop(tokenizer.decode(ids), stop_strings)[0]`.

    With `min_tokens` > 0, stop strings are looked for only in the text after the first `min_tokens` tokens' text.
    """

    def __init__(self, tokenizer: TextTokenizer, stop_strings: Sequence[str] = (), min_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.min_tokens = min_tokens
        self.stop_from: int | None = 0 if min_tokens <= 0 else None  # stop strings start here; None: not yet
        self.ids: list[int] = []
        self.text = ""  # decoded text of ids[:read], complete characters only
        self.prefix = 0  # window start: decoding from here gives the same text as decoding from 0
        self.read = 0  # ids up to here are in `text`
        self.emitted = 0  # characters of `text` handed out
        self.stopped = False  # a stop string appeared

    def push(self, token_id: int) -> str:
        """Add one token; return the text that can be shown now ('' if none yet). Sets `stopped` on a stop string."""
        self.ids.append(int(token_id))
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        delta = after[len(before) :] if after.startswith(before) else after  # [len(before):] on a window start
        complete = not after.endswith(REPLACEMENT)
        candidate = self.text + delta
        if self.stop_from is None:  # fewer than min_tokens tokens so far: no stop string counts yet
            if len(self.ids) >= self.min_tokens:
                self.stop_from = len(candidate) if complete else len(self.text)
        elif self.stop_strings and self._cut(candidate)[1]:
            complete = True  # a stop string is there even if a partial character follows it
        if not complete:
            return ""
        self.text, self.prefix, self.read = candidate, self.read, len(self.ids)
        return self._release()

    def _cut(self, text: str) -> tuple[str, bool]:
        """`cut_at_stop` on the part of `text` where stop strings count (all of it unless min_tokens is set)."""
        if not self.stop_from:
            return cut_at_stop(text, self.stop_strings) if self.stop_from == 0 else (text, False)
        cut, stopped = cut_at_stop(text[self.stop_from :], self.stop_strings)
        return text[: self.stop_from] + cut, stopped

    def _release(self) -> str:
        if self.stop_strings:
            cut, stopped = self._cut(self.text)
            if stopped:
                self.stopped = True
                end = len(cut)
            else:
                end = len(self.text) - holds_stop_prefix(self.text, self.stop_strings)
        else:
            end = len(self.text)
        piece = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece

    def final_text(self) -> str:
        return self._cut(self.tokenizer.decode(self.ids))[0]

    def finish(self) -> str:
        """The rest of the text (held-back characters, a trailing partial character), once generation ended."""
        final = self.final_text()
        piece = final[self.emitted :] if len(final) > self.emitted else ""
        self.emitted = len(final)
        return piece


@dataclass
class Timings:
    preprocess_s: float = 0.0  # image load + resize + normalise
    vision_s: float = 0.0  # vision graph
    vision_load_s: float = 0.0  # loading the vision graph for this request (vision "release"), not in vision_s
    prefill_s: float = 0.0  # embedding + decoder over the prompt
    ttft_s: float = 0.0  # call start -> first token chosen
    decode_s: float = 0.0  # first token -> last token
    decode_tokens: int = 0  # tokens made by decode steps (new tokens - 1)
    total_s: float = 0.0
    peak_rss_bytes: int = 0
    token_times: list[float] = field(default_factory=list)  # call start -> each new token chosen (s); [0] == ttft_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "decode_tokens_per_s": self.decode_tokens_per_s}

    def describe(self) -> str:
        return (
            f"preprocess {self.preprocess_s * 1e3:.1f} ms | vision {self.vision_s * 1e3:.1f} ms | "
            + (f"vision load {self.vision_load_s * 1e3:.1f} ms | " if self.vision_load_s else "")
            + f"prefill {self.prefill_s * 1e3:.1f} ms | first token {self.ttft_s * 1e3:.1f} ms | "
            f"decode {self.decode_tokens} tokens at {self.decode_tokens_per_s:.1f} tokens/s | "
            f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"
        )


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]  # new token ids, the stop id excluded
    prompt_tokens: int  # prompt length in tokens, image tokens included
    stop_reason: str  # "eos" | "stop_string" | "length" | "interrupted"
    timings: Timings = field(default_factory=Timings)

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        return parse_boxes(self.text)

    @property
    def grounded(self) -> list[tuple[str, list[tuple[int, int, int, int]]]]:
        return parse_grounded(self.text)

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "stop_reason": self.stop_reason,
            "boxes": [list(b) for b in self.boxes],
            "grounded": [{"phrase": p, "boxes": [list(b) for b in bs]} for p, bs in self.grounded],
            "timings": self.timings.to_dict(),
        }


@dataclass
class BoundDecoder:
    """A decoder session, its IOBinding, and the float32 CPU buffers bound to it by pointer: a decode step binds the
    same fixed buffers every time, so only a changed pointer or shape is bound again."""

    session: ort.InferenceSession
    binding: ort.IOBinding
    pointers: dict[str, tuple[int, list[int]]] = field(default_factory=dict)  # name -> (pointer, shape)

    @classmethod
    def of(cls, session: ort.InferenceSession) -> BoundDecoder:
        return cls(session, session.io_binding())

    def bind_pointer(self, name: str, shape: list[int], pointer: int, output: bool = False) -> None:
        if self.pointers.get(name) == (pointer, shape):
            return
        bind = self.binding.bind_output if output else self.binding.bind_input
        bind(name, "cpu", 0, np.float32, shape, pointer)
        self.pointers[name] = (pointer, shape)


class DecodeLoop:
    """Runs the embedding and decoder graphs against one KVCache, with fixed buffers for every decode step.

    Prefill runs the prompt `prefill_chunk` tokens at a time (see runtime.budget: the plan counts one chunk), through
    the prefill graph's session when there is one (`prompt`), else through the decoder's (`decode`).
    """

    def __init__(
        self,
        sessions: Sessions,
        cache: KVCache,
        prefill_chunk: int = PREFILL_CHUNK,
        table: EmbeddingTable | None = None,
    ) -> None:
        d = sessions.manifest.decoder
        self.sessions, self.cache, self.spec = sessions, cache, d
        self.table = table  # embeddings gathered from the mapped table (runtime.embedding); None: the embedding graph
        self.prefill_chunk = prefill_chunk
        self.image_token_id = sessions.manifest.image_token_id
        self.device = sessions.device_type
        B = cache.batch_size
        self.step_ids = np.zeros((B, 1), dtype=np.int64)  # [B, 1]
        self.no_image = np.zeros((B, 1, d.hidden_size), dtype=np.float32)  # [B, 1, D]: text-only rows
        self.step_embeds = np.zeros((B, 1, d.hidden_size), dtype=np.float32)  # [B, 1, D]
        self.step_logits = np.zeros((B, 1, d.vocab_size), dtype=np.float32)  # [B, 1, V]
        self.embed_binding = sessions.embedding.io_binding() if table is None else None
        self.decode = BoundDecoder.of(sessions.decoder)
        self.prompt = BoundDecoder.of(sessions.decoder_prefill) if sessions.decoder_prefill else self.decode

    @property
    def decoder_binding(self) -> ort.IOBinding:
        """The decoder's binding: after a generation, it holds the last decode step's outputs."""
        return self.decode.binding

    def embed(self, ids: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """ids [rows, T] int64, features [rows, N, D] or None -> inputs_embeds [rows, T, D]."""
        if self.table is not None:
            return self.table.embed(ids, features)  # [rows, T, D]
        rows = ids.shape[0]
        feeds = {"input_ids": ids, "image_features": features if features is not None else self.no_image[:rows]}
        (embeds,) = self.sessions.embedding.run(None, feeds)  # [rows, T, D]
        return embeds

    def _run_decoder(
        self, run: BoundDecoder, embeds_ptr: int, embeds_shape: list[int], row_masks: np.ndarray, logits_out: bool
    ) -> None:
        cache, b = self.cache, run.binding
        new = row_masks.shape[1]
        mask = cache.extend_mask(row_masks)  # [rows, P+T]
        positions = cache.positions(row_masks)  # [rows, T]
        run.bind_pointer("inputs_embeds", embeds_shape, embeds_ptr)
        b.bind_cpu_input("attention_mask", mask)
        b.bind_cpu_input("position_ids", positions)
        if logits_out:
            logits = self.step_logits[: cache.rows]
            run.bind_pointer("logits", list(logits.shape), logits.ctypes.data, output=True)
        else:
            b.bind_output("logits", "cpu")  # prefill: [rows, T, V], allocated by onnxruntime for this run only
            run.pointers.pop("logits", None)
        cache.bind(b, new)
        run.session.run_with_iobinding(b)
        cache.advance(new)

    def prefill(self, embeds: np.ndarray, row_masks: np.ndarray) -> np.ndarray:
        """embeds [rows, T, D] after the cache's P tokens; row_masks [rows, T] -> last logits [rows, V].

        One decoder run per chunk of `prefill_chunk` tokens, each against the cache filled by the chunks before it:
        the same logits as one run over the whole prompt, with a chunk's activations instead of the prompt's.
        A GQA decoder (export.gqa) with several rows prefills in one run (its kernel's limit, see below).
        A decoder with last-position logits writes each chunk's straight into the fixed step buffer, as a decode step
        does; one with every position's logits (older folders) gets a [rows, C, V] array per chunk, freed at once.
        """
        embeds = np.asarray(embeds, dtype=np.float32)
        total, size = embeds.shape[1], self.prefill_chunk
        if self.spec.attention == "gqa" and self.cache.rows > 1 and total > 1:
            # onnxruntime's GroupQueryAttention (CPU) runs T > 1 tokens on a non-empty cache for batch 1 only:
            # several rows prefill in one run, and only from an empty cache
            if self.cache.length:
                raise ContextError(
                    f"this export's GroupQueryAttention decoder cannot add {total} tokens to {self.cache.rows} rows "
                    f"that already hold {self.cache.length} (onnxruntime's kernel takes that for one row only); "
                    "continue one row at a time, or use a folder exported with --attention plain"
                )
            size = total
        last_only = self.spec.logits_positions == "last"
        for first in range(0, total, size):
            chunk = np.ascontiguousarray(embeds[:, first : first + size])  # [rows, C, D]
            mask = row_masks[:, first : first + size]
            self._run_decoder(self.prompt, chunk.ctypes.data, list(chunk.shape), mask, last_only)
            if last_only:
                continue
            if first + size >= total:
                last = self.prompt.binding.get_outputs()[0].numpy()[:, -1].copy()  # [rows, V]
            self.prompt.binding.clear_binding_outputs()  # let the chunk's logits [rows, C, V] go now
            self.cache.forget_binding()  # its present outputs went with them
        return self.step_logits[: self.cache.rows, 0] if last_only else last  # [rows, V]

    def step(self, next_ids: np.ndarray) -> np.ndarray:
        """One decode step for the chosen ids [rows] -> logits [rows, V] (a view of the fixed logits buffer)."""
        rows = self.cache.rows
        ids = self.step_ids[:rows]
        ids[:, 0] = next_ids
        embeds = self.step_embeds[:rows]  # [rows, 1, D]
        if self.table is not None:
            self.table.rows(ids, out=embeds)
        else:
            e = self.embed_binding
            e.bind_cpu_input("input_ids", ids)
            e.bind_cpu_input("image_features", self.no_image[:rows])
            e.bind_output("inputs_embeds", "cpu", 0, np.float32, list(embeds.shape), embeds.ctypes.data)
            self.sessions.embedding.run_with_iobinding(e)
        ones = np.ones((rows, 1), dtype=np.int64)
        self._run_decoder(self.decode, embeds.ctypes.data, list(embeds.shape), ones, logits_out=True)
        return self.step_logits[:rows, 0]  # [rows, V]


@dataclass
class RunState:
    """What one generation has done so far; readable after an interruption."""

    rows: int
    new: list[list[int]] = field(default_factory=list)  # chosen tokens per row (stop ids excluded)
    fed: int = 0  # how many of the chosen tokens are in the cache (the same for every row)
    done: list[bool] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    prefill_s: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    token_times: np.ndarray | None = None  # [max_new_tokens] perf_counter when step k's tokens were chosen

    def __post_init__(self) -> None:
        self.new = [[] for _ in range(self.rows)]
        self.done = [False] * self.rows
        self.reasons = ["length"] * self.rows


def check_context(
    loop: DecodeLoop, prompt_rows: Sequence[Sequence[int]], max_new_tokens: int, keep_cache: bool = False
) -> None:
    """ContextError, with each number, when the cache cannot hold the prompt and max_new_tokens more tokens."""
    cache = loop.cache
    width = max(len(r) for r in prompt_rows)
    start_len = cache.length if keep_cache else 0
    if start_len + width + max_new_tokens > cache.context:
        longest = max(prompt_rows, key=len)
        images = sum(1 for t in longest if t == loop.image_token_id)
        held = f"{start_len:,} tokens of conversation + " if start_len else ""
        raise ContextError(
            f"{held}prompt {width - images:,} text tokens + {images:,} image tokens + max_new_tokens "
            f"{max_new_tokens:,} = {start_len + width + max_new_tokens:,} > context {cache.context:,}; "
            "shorten the prompt, lower --max-new-tokens or raise --context"
        )


def run_tokens(
    loop: DecodeLoop,
    prompt_rows: Sequence[Sequence[int]],
    features: np.ndarray | None,
    sampler: Sampler,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    streams: Sequence[TextStream],
    state: RunState,
    pad_id: int,
    owner: object | None = None,
    keep_cache: bool = False,
    seen_rows: Sequence[Sequence[int]] | None = None,
) -> Iterator[list[str]]:
    """Prefill `prompt_rows` (left-padded), then decode; yields each step's new text per row.

    With keep_cache=True the prompt continues the cache's current content (a chat turn) instead of starting afresh.
    `seen_rows` (default: the prompt rows) are the tokens the repetition penalty counts as already said.
    """
    cache = loop.cache
    rows, width = len(prompt_rows), max(len(r) for r in prompt_rows)
    check_context(loop, prompt_rows, max_new_tokens, keep_cache)
    ids = np.full((rows, width), pad_id, dtype=np.int64)  # [rows, T]
    row_masks = np.zeros((rows, width), dtype=np.int64)  # [rows, T]
    for i, row in enumerate(prompt_rows):
        ids[i, width - len(row) :] = row
        row_masks[i, width - len(row) :] = 1
    if not keep_cache:
        cache.start(rows, owner)
    sampler.observe(seen_rows if seen_rows is not None else prompt_rows)
    state.token_times = times = np.zeros(max_new_tokens)  # [max_new_tokens], written in place: nothing grows per token

    # --- prefill: the whole prompt in one run of each graph
    start = time.perf_counter()
    logits = loop.prefill(loop.embed(ids, features), row_masks)  # [rows, V]
    state.prefill_s = time.perf_counter() - start
    stops = set(int(s) for s in stop_ids)
    for step in range(max_new_tokens):
        next_ids = sampler(logits)  # [rows]
        now = time.perf_counter()
        state.first_token_at = state.first_token_at or now
        state.last_token_at = times[step] = now
        pieces = [""] * rows
        for row, token in enumerate(next_ids.tolist()):
            if state.done[row]:
                continue
            if token in stops:
                state.done[row], state.reasons[row] = True, "eos"
                continue
            state.new[row].append(token)
            pieces[row] = streams[row].push(token)
            if streams[row].stopped:
                state.done[row], state.reasons[row] = True, "stop_string"
        sampler.add(next_ids)
        yield pieces
        if all(state.done) or step == max_new_tokens - 1:
            break
        # --- decode step: every row feeds its chosen token, finished rows included (as the reference)
        logits = loop.step(next_ids)
        state.fed += 1
