"""Multi-turn chat about one image that keeps the KV cache between turns.

    chat = pipe.chat("photo.jpg")
    chat.ask("[vqa] What colour is the circle?").text
    for piece in chat.stream("[refer] the circle"):   # only the new turn is prefilled; earlier turns stay cached
        print(piece, end="")
    chat.set_image("other.jpg")                       # a new image starts a new conversation
    chat.reset()

A conversation is laid out as in training (reference §1.4, multi-turn data): the first turn is BOS + the templated
question with the image; every answer ends with EOS; every later turn is BOS + its templated question without the image.
So a later turn feeds `EOS BOS [INST] question [/INST]` (plus the last chosen token of the previous answer when that
answer ended on length or a stop string, since a chosen token enters the cache only on the next step).

The chat owns the pipeline's batch-1 cache only until something else generates; then its next turn prefills the whole
conversation again (same answer, just slower). An interrupted answer (Ctrl-C, a broken-off stream) keeps the tokens that
reached the cache, so the next turn continues from exactly what the model saw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.image import ImageInput
from runtime.generate import GenerationResult, RunState

if TYPE_CHECKING:
    from runtime.pipeline import Pipeline, Stream


class Chat:
    def __init__(self, pipe: Pipeline, image: ImageInput | None = None) -> None:
        self.pipe = pipe
        self.features = None
        self.history: list[int] = []  # every token in the cache, in order
        self.pending: list[int] = []  # chosen tokens of the last answer that did not reach the cache
        self.turns = 0
        self.set_image(image)

    def set_image(self, image: ImageInput | None) -> None:
        """Use `image` (None = text only) for a new conversation; the image is read and encoded now."""
        self.features = self.pipe.encode_images([image])[0] if image is not None else None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the image stays)."""
        self.history, self.pending, self.turns = [], [], 0

    @property
    def cached(self) -> bool:
        """True when the pipeline's cache still holds exactly this conversation."""
        cache = self.pipe.cache
        return cache.owner is self and cache.length == len(self.history) and cache.rows == 1

    def stream(self, prompt: str, max_new_tokens: int = 128, stop: Any = None, **sampling: Any) -> Stream:
        """Ask the next question; iterate the returned Stream for the answer's text pieces."""
        pipe = self.pipe
        sampler, stops = pipe._settings(max_new_tokens, stop, **sampling)
        if self.turns == 0:
            turn = pipe.prompt_ids(prompt, image=self.features is not None)
        else:
            turn = self.pending + [pipe.manifest.eos_token_id] + pipe.prompt_ids(prompt, image=False)
        keep = self.turns > 0 and self.cached
        base = list(self.history) if keep else []
        row = turn if keep else self.history + turn
        feats = None if keep else self.features

        def on_end(state: RunState) -> None:
            fed_turn = base + row
            if pipe.cache.owner is self and pipe.cache.length >= len(fed_turn):  # the prefill went through
                self.history = fed_turn + state.new[0][: state.fed]
                self.pending = state.new[0][state.fed :]
                self.turns += 1

        return pipe._stream(
            None, [row], sampler, stops, max_new_tokens, keep_cache=keep, owner=self,
            features=feats, seen=[self.history + turn], on_end=on_end,
        )  # fmt: skip

    def ask(self, prompt: str, max_new_tokens: int = 128, **kwargs: Any) -> GenerationResult:
        stream = self.stream(prompt, max_new_tokens, **kwargs)
        for _ in stream:
            pass
        return stream.result
