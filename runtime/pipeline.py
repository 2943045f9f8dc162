"""The Python API of the runtime: load an export folder, answer questions about images, stream, batch, chat.

    from runtime import Pipeline
    pipe = Pipeline.load("exports/demo-int4", provider="cpu", threads=2, memory_budget="8GB")
    result = pipe.generate("photo.jpg", "[vqa] What colour is the circle?", max_new_tokens=32)
    result.text, result.tokens, result.timings.decode_tokens_per_s, result.timings.token_times, result.boxes
    ids = pipe.prompt_ids("[vqa] What colour is the circle?", image=True)      # BOS, template, image ids in place
    result = pipe.generate("photo.jpg", prompt_ids=ids, max_new_tokens=64, min_new_tokens=64)   # exactly 64 tokens
    for piece in pipe.stream("photo.jpg", "[caption] Describe the image"):
        print(piece, end="", flush=True)
    results = pipe.generate_batch([("a.jpg", "[vqa] ..."), ("b.jpg", "[refer] the red square")])
    chat = pipe.chat("photo.jpg"); chat.ask("[vqa] How many circles?"); chat.ask("[vqa] And squares?")

Loading plans memory first (nothing is loaded when the plan is over budget), then checks every file's sha256, creates
the sessions and the KV cache, and warms the graphs up. The vision session is created per request and released after
it with vision="release" (runtime.budget says when "auto" chooses that), and there is no embedding session when the
folder has a memory-mapped embedding table (runtime.embedding). Prompts are built as in training: the question goes
through the manifest's template with the image placeholder in front (`core.prompts.build_prompt`), the tokenizer puts
BOS first and the image token ids at the placeholder (`TextTokenizer.encode_prompt`), and the image is preprocessed with
the manifest's size, mean and std (`core.image.preprocess_for`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from core.image import ImageInput, preprocess_for
from core.prompts import IMAGE_PLACEHOLDER, IMAGE_TEXT, build_prompt
from core.tokenizer import TextTokenizer
from runtime.budget import MemoryPlan, plan_memory
from runtime.chat import Chat
from runtime.embedding import EmbeddingTable
from runtime.errors import ManifestError, RuntimeInputError
from runtime.generate import (
    DecodeLoop,
    GenerationResult,
    RunState,
    TextStream,
    Timings,
    check_context,
    peak_rss_bytes,
    run_tokens,
)
from runtime.kv_cache import KVCache
from runtime.manifest import PREFILL_GRAPH, Manifest, read_manifest
from runtime.sampling import Sampler, SamplingParams
from runtime.session import Sessions, release_pages, resolve_provider

logger = logging.getLogger(__name__)


def _text_or_ids(prompt: str | Sequence[int]) -> tuple[str | None, Sequence[int] | None]:
    return (prompt, None) if isinstance(prompt, str) else (None, prompt)


class Stream:
    """Iterate (once) for text pieces; `.result` holds the GenerationResult once iteration ends or is broken off."""

    def __init__(self, steps: Iterator[str]) -> None:
        self._steps = steps
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self._steps

    @property
    def text(self) -> str:
        """Run to the end (if not done) and return the whole text."""
        for _ in self._steps:
            pass
        return self.result.text if self.result else ""


class Pipeline:
    def __init__(
        self,
        manifest: Manifest,
        plan: MemoryPlan,
        tokenizer: TextTokenizer,
        sessions: Sessions,
        cache: KVCache,
        table: EmbeddingTable | None = None,
    ) -> None:
        self.manifest, self.plan, self.tokenizer, self.sessions, self.cache = manifest, plan, tokenizer, sessions, cache
        self.table = table
        self.loop = DecodeLoop(sessions, cache, table=table)
        self.vision_loads = 0  # vision sessions created for requests (vision "release")
        self.last_vision_load_s = 0.0
        self.template = manifest.prompt.template
        self.stop_strings = manifest.prompt.stop_strings
        self.stop_ids = (manifest.eos_token_id,)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        memory_budget: str | int = "8GB",
        context: int | None = None,
        batch_size: int = 1,
        verify: bool = True,
        warm_up: bool = True,
        vision: str = "auto",
        embedding: str = "auto",
        spin: bool = True,
        prefill: str = "auto",
    ) -> Pipeline:
        """Plan, verify, load and warm up an export folder. Raises a RuntimeInputError subclass on bad input.

        vision: "keep" loads the vision graph now and keeps it; "release" loads it for each request's images and
        releases it (and the previous request's KV cache) before the prompt is prefilled, which costs a reload per
        image; "auto" keeps it when that plan fits `memory_budget`, else releases (runtime.budget).
        embedding: "auto" gathers from the folder's memory-mapped table when it has one (runtime.embedding), else runs
        the embedding graph; "table" or "graph" forces one.
        spin: onnxruntime's pool threads spin between ops (faster on a quiet machine); False lets them sleep, for a
        machine shared with other work (runtime.session).
        prefill: "graph" runs prompts through the folder's prefill graph (an int8 twin of the int4 decoder, export
        --prefill-graph int8: several times faster on a prompt, its weights resident beside the decoder's); "decoder"
        runs them through the decoder; "auto" uses the graph when the folder has one and that plan fits the budget.
        """
        resolve_provider(provider)
        manifest = read_manifest(model_dir)
        plan = plan_memory(
            manifest, context, batch_size, memory_budget, provider, vision=vision, embedding=embedding, prefill=prefill
        )
        plan.check()
        if (manifest.prompt.image_text, manifest.prompt.placeholder) != (IMAGE_TEXT, IMAGE_PLACEHOLDER):
            raise ManifestError(
                f"{manifest.folder}: the manifest writes the image as {manifest.prompt.image_text!r} / "
                f"{manifest.prompt.placeholder!r}; this runtime builds prompts with {IMAGE_TEXT!r}"
            )
        kv = manifest.graphs["decoder"].input(manifest.decoder.past_key(0))
        if kv is not None and kv.dtype != "float32":
            raise ManifestError(
                f"{manifest.folder}: the decoder's KV cache is {kv.dtype}; this runtime keeps a float32 cache "
                "(export with fp32 inputs and outputs, as every precision of export.onnx does)"
            )
        if verify:
            manifest.verify()
        tokenizer = TextTokenizer.from_dir(
            manifest.folder, manifest.bos_token_id, manifest.eos_token_id, manifest.image_token_id
        )
        table = EmbeddingTable.open(manifest) if plan.embedding == "table" else None
        graphs = tuple(g for g, skip in (("vision", plan.vision == "release"), ("embedding", table is not None),
                                         ("decoder", False), (PREFILL_GRAPH, plan.prefill != "graph"))
                       if not skip)  # fmt: skip
        sessions = Sessions.create(manifest, provider, threads, graphs, spin)
        cache = KVCache(manifest.decoder, plan.batch_size, plan.context, sessions.device_type)
        pipe = cls(manifest, plan, tokenizer, sessions, cache, table)
        prompts = "prefill graph" if plan.prefill == "graph" else "decoder"
        logger.info("vision %s, embedding %s, prompts through the %s; planned peak %.2f GiB", plan.vision,
                    plan.embedding, prompts, plan.peak / 2**30)  # fmt: skip
        if warm_up:
            sessions.warm_up()
        return pipe

    # --- inputs
    def encode_images(self, images: Sequence[ImageInput | None]) -> tuple[np.ndarray | None, float, float]:
        """Images (None for a text-only row) -> (features [B, N, D] or None, preprocess seconds, vision seconds).

        With vision "release" the vision graph is loaded first and released after (`last_vision_load_s` says how
        long the load took; it is not in the vision seconds), and the KV cache is emptied before it loads: an image
        starts a new conversation, so what the cache holds is not needed, and its pages go back to the system until
        the prefill writes them again.
        """
        self.last_vision_load_s = 0.0
        if all(im is None for im in images):
            return None, 0.0, 0.0
        start = time.perf_counter()
        which = [i for i, im in enumerate(images) if im is not None]
        pixels = np.stack([preprocess_for(images[i], self.manifest.image) for i in which])  # [b, 3, S, S]
        release = self.plan.vision == "release"
        if release and self.sessions.vision is None:
            self._fresh_cache()
            self.last_vision_load_s = self.sessions.load("vision")
            self.vision_loads += 1
        mid = time.perf_counter()
        try:
            (feats,) = self.sessions.vision.run(None, {"pixel_values": pixels})  # [b, N, D]
        finally:  # released even when the run fails
            end = time.perf_counter()
            if release:
                freed = self.sessions.release("vision")
                logger.info("vision: loaded in %.2f s, ran in %.2f s, released (%.0f MiB)",
                            self.last_vision_load_s, end - mid, freed / 2**20)  # fmt: skip
        out = np.zeros((len(images), *feats.shape[1:]), dtype=np.float32)  # [B, N, D]
        out[which] = feats
        return out, mid - start - self.last_vision_load_s, end - mid

    def _fresh_cache(self) -> None:
        """Give the KV cache's pages back to the system (its buffers stay allocated, and read as zeros until the next
        prefill writes them), so the vision graph loads and runs beside no resident KV cache. Reallocating the cache
        instead does not work: glibc serves same-sized buffers from the freed heap and calloc writes zeros into them,
        which made them resident again (measured: +0.61 GiB on the second request at context 512)."""
        self.cache.start(self.cache.rows)  # what the buffers held is gone: the cache is empty
        released = sum(release_pages(buffer) for side in self.cache.buffers for kv in side for buffer in kv)
        logger.info("KV cache: %.0f MiB of pages released before the vision graph loads", released / 2**20)

    def prompt_ids(self, prompt: str, image: bool, bos: bool = True) -> list[int]:
        """One user turn -> token ids: template applied, image placeholder in front when there is an image."""
        if not isinstance(prompt, str):
            raise RuntimeInputError(f"the prompt must be text, got {type(prompt).__name__}")
        text = build_prompt(prompt, self.template, image=image)
        n_images = 1 if image else 0
        return self.tokenizer.encode_prompt(text, n_images, self.manifest.num_image_tokens, add_bos=bos)

    def request_ids(
        self, image: ImageInput | None, prompt: str | None = None, prompt_ids: Sequence[int] | None = None
    ) -> list[int]:
        """The token ids of one request: `prompt` built as `prompt_ids()` does, or `prompt_ids` checked and used as is.

        Given ids are the whole prompt (BOS, template, one image id per image vector where the image goes), so the
        image token count must be the manifest's num_image_tokens with an image and 0 without.
        """
        if (prompt is None) == (prompt_ids is None):
            raise RuntimeInputError("give either a prompt (text) or prompt_ids (token ids), not both or neither")
        if prompt is not None:
            return self.prompt_ids(prompt, image is not None)
        if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence | np.ndarray):
            raise RuntimeInputError(f"prompt_ids must be a sequence of token ids, got {type(prompt_ids).__name__}")
        try:
            ids = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise RuntimeInputError("prompt_ids must hold integers (token ids)") from None
        m = self.manifest
        vocab, image_id, n = m.decoder.vocab_size, m.image_token_id, m.num_image_tokens
        bad = [t for t in ids if not 0 <= t < vocab]
        if not ids or bad:
            raise RuntimeInputError(
                f"prompt_ids must be a non-empty list of ids in 0..{vocab - 1}, got {len(ids)} ids" +
                (f" with {len(bad)} outside (first {bad[0]})" if bad else "")
            )  # fmt: skip
        found, wanted = ids.count(image_id), n if image is not None else 0
        if found != wanted:
            has = "an image" if image is not None else "no image"
            raise RuntimeInputError(
                f"prompt_ids hold {found} image token ids ({image_id}); with {has} they must hold exactly {wanted} "
                "(build them with Pipeline.prompt_ids(text, image))"
            )
        return ids

    def _settings(
        self, max_new_tokens: int, stop: str | Sequence[str] | None, min_new_tokens: int = 0, **sampling: Any
    ) -> tuple[Sampler, tuple[str, ...]]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise RuntimeInputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, int) or min_new_tokens < 0:
            raise RuntimeInputError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
        if min_new_tokens > max_new_tokens:
            raise RuntimeInputError(f"min_new_tokens {min_new_tokens} > max_new_tokens {max_new_tokens}")
        params = SamplingParams(**sampling)
        extra = (stop,) if isinstance(stop, str) else tuple(stop or ())
        sampler = Sampler(
            params, self.manifest.decoder.vocab_size, banned_ids=(self.manifest.image_token_id,),
            min_tokens=min_new_tokens, stop_ids=self.stop_ids,
        )  # fmt: skip
        return sampler, tuple(self.stop_strings) + extra

    # --- one request
    def stream(
        self,
        image: ImageInput | None,
        prompt: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        min_new_tokens: int = 0,
        prompt_ids: Sequence[int] | None = None,
    ) -> Stream:
        """Like generate(), but iterate the returned Stream for text pieces as they are decoded."""
        sampler, stops = self._settings(
            max_new_tokens, stop, min_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed,
        )  # fmt: skip
        ids = self.request_ids(image, prompt, prompt_ids)
        return self._stream(image, [ids], sampler, stops, max_new_tokens, keep_cache=False, owner=None)

    def generate(
        self,
        image: ImageInput | None,
        prompt: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        min_new_tokens: int = 0,
        prompt_ids: Sequence[int] | None = None,
    ) -> GenerationResult:
        """Answer one prompt about one image (a path, bytes, a PIL image, an array, or None for text only).

        temperature 0 is greedy; `stop` adds stop strings to the manifest's; EOS always stops, once the answer has
        `min_new_tokens` tokens (EOS cannot be chosen before, and stop strings count only in the text after them;
        min_new_tokens == max_new_tokens gives exactly that many). `prompt_ids` instead of `prompt`: the whole prompt
        as token ids (see `request_ids`). `result.timings.token_times` has the time of each new token.
        """
        stream = self.stream(
            image, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty, seed=seed, stop=stop, min_new_tokens=min_new_tokens,
            prompt_ids=prompt_ids,
        )  # fmt: skip
        for _ in stream:
            pass
        return stream.result

    def _stream(
        self,
        image: ImageInput | None,
        rows: list[list[int]],
        sampler: Sampler,
        stops: tuple[str, ...],
        max_new_tokens: int,
        keep_cache: bool,
        owner: object | None,
        features: np.ndarray | None = None,
        seen: list[list[int]] | None = None,
        on_end: Callable[[RunState], None] | None = None,
    ) -> Stream:
        # everything that can be refused is checked now, before the caller starts iterating
        start = time.perf_counter()
        check_context(self.loop, rows, max_new_tokens, keep_cache)
        timings = Timings()
        feats = features
        if image is not None:
            feats, timings.preprocess_s, timings.vision_s = self.encode_images([image])
            timings.vision_load_s = self.last_vision_load_s
        holder: list[Stream] = []

        def steps() -> Iterator[str]:
            text = TextStream(self.tokenizer, stops, sampler.min_tokens)
            state = RunState(rows=1)
            finished = False
            try:
                for pieces in run_tokens(
                    self.loop, rows, feats, sampler, max_new_tokens, self.stop_ids, [text], state,
                    self.manifest.pad_token_id, owner=owner, keep_cache=keep_cache, seen_rows=seen,
                ):  # fmt: skip
                    if pieces[0]:
                        yield pieces[0]
                tail = text.finish()
                if tail:
                    yield tail
                finished = True
            finally:
                reason = state.reasons[0] if finished else "interrupted"
                holder[0].result = self._result(text.final_text(), state, 0, len(rows[0]), reason, timings, start)
                if on_end is not None:
                    on_end(state)

        holder.append(Stream(steps()))
        return holder[0]

    def _result(
        self, text: str, state: RunState, row: int, prompt_len: int, reason: str, timings: Timings, start: float
    ) -> GenerationResult:
        timings.prefill_s = state.prefill_s
        timings.ttft_s = state.first_token_at - start if state.first_token_at else 0.0
        timings.decode_s = state.last_token_at - state.first_token_at if state.first_token_at else 0.0
        timings.decode_tokens = state.fed
        timings.total_s = time.perf_counter() - start
        timings.peak_rss_bytes = peak_rss_bytes()
        times = state.token_times
        timings.token_times = [] if times is None else (times[: len(state.new[row])] - start).tolist()
        return GenerationResult(text, list(state.new[row]), prompt_len, reason, timings)

    # --- several requests
    def generate_batch(
        self,
        requests: Sequence[tuple[ImageInput | None, str | Sequence[int]]],
        max_new_tokens: int = 128,
        stop: str | Sequence[str] | None = None,
        min_new_tokens: int = 0,
        **sampling: Any,
    ) -> list[GenerationResult]:
        """Answer several (image, prompt) pairs, `batch_size` (see load) rows at a time, left-padded.

        A prompt is text or the whole prompt as token ids (see `request_ids`); the rest is as in `generate`.
        """
        sampler, stops = self._settings(max_new_tokens, stop, min_new_tokens, **sampling)
        results: list[GenerationResult] = []
        size = self.cache.batch_size
        for first in range(0, len(requests), size):
            chunk = requests[first : first + size]
            start = time.perf_counter()
            timings = Timings()
            rows = [self.request_ids(image, *_text_or_ids(prompt)) for image, prompt in chunk]
            check_context(self.loop, rows, max_new_tokens)
            feats, timings.preprocess_s, timings.vision_s = self.encode_images([image for image, _ in chunk])
            timings.vision_load_s = self.last_vision_load_s
            streams = [TextStream(self.tokenizer, stops, min_new_tokens) for _ in chunk]
            state = RunState(rows=len(chunk))
            for _ in run_tokens(
                self.loop, rows, feats, sampler, max_new_tokens, self.stop_ids, streams, state,
                self.manifest.pad_token_id,
            ):  # fmt: skip
                pass
            for i, text in enumerate(streams):
                row_timings = replace(timings)
                results.append(
                    self._result(text.final_text(), state, i, len(rows[i]), state.reasons[i], row_timings, start)
                )
        return results

    def chat(self, image: ImageInput | None = None) -> Chat:
        """A multi-turn conversation about `image` that keeps the KV cache between turns (see runtime.chat)."""
        return Chat(self, image)
