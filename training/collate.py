"""Samples -> a training batch: template, tokens, image ids, label mask, padding and pixels (reference §1.4).

    collator = Collator(tokenizer, cfg, template="stage4", image_size=448, max_txt_len=1024)
    batch = collator(samples)      # Batch(input_ids [B,T], attention_mask [B,T], labels [B,T], pixel_values [B,3,S,S])

One sample becomes, turn after turn (N = the number of image tokens, 32 in TinyGPT-V):

    [BOS] template(instruction 1, its <ImageHere> as N image ids) answer 1 [EOS]
    [BOS] template(instruction 2) answer 2 [EOS] ...

Labels are -100 everywhere except the answers and their EOS, which is supervised (core/prompts.py), so every later
question is masked, as in the original, whose later questions start with the BOS text `<|endoftext|>` too. The prompt
and the answer are tokenized apart, as the original does. A sequence keeps at most `max_txt_len` text tokens (image ids
not counted) and at most the language model's context; the rest is cut at the end, so a cut answer loses its EOS.
Rows are right-padded (pad = EOS, attention 0, label -100). A text-only sample (unnatural instructions) gets zero
pixels, which `embed` never reads because its row has no image ids; a batch always has pixels, so the projector takes
part in every step and DDP needs no `find_unused_parameters` (a zero gradient, not a missing one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from core.config import ModelConfig
from core.image import preprocess_for
from core.prompts import IMAGE_PLACEHOLDER, TEMPLATES, PromptError, apply_template
from core.tokenizer import TextTokenizer
from training.data.sample import Sample

logger = logging.getLogger(__name__)
IGNORE = -100


class CollateError(ValueError):
    """A sample that cannot become a training sequence (its image and placeholders disagree)."""


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64, 1 = real token
    labels: torch.Tensor  # [B, T] int64, -100 outside answers
    pixel_values: torch.Tensor  # [B, 3, S, S] float32; zeros for text-only rows
    truncated: int = 0  # rows cut to max_txt_len / context

    @property
    def n_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        """Real (unpadded) tokens, image tokens included: what tokens/s counts."""
        return int(self.attention_mask.sum())

    @property
    def n_targets(self) -> int:
        """Supervised positions, as the shifted loss sees them (a label at position 0 is never predicted)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.pixel_values.to(device),
            self.truncated,
        )


class Collator:
    def __init__(
        self,
        tokenizer: TextTokenizer,
        cfg: ModelConfig,
        template: str = "none",
        image_size: int | None = None,
        max_txt_len: int = 32,
    ) -> None:
        if template not in TEMPLATES and "{}" not in template:
            raise CollateError(f"template {template!r} is neither one of {', '.join(TEMPLATES)} nor holds '{{}}'")
        self.tokenizer = tokenizer
        self.template = TEMPLATES.get(template, template)
        self.image_cfg = cfg.image.replace(size=image_size) if image_size else cfg.image
        self.n_image_tokens = cfg.num_image_tokens
        self.image_token_id = cfg.prompt.image_token_id
        self.max_txt_len = max_txt_len
        self.context = cfg.language_model.max_position_embeddings
        self.eos = tokenizer.eos_token_id
        if tokenizer.image_token_id != self.image_token_id:
            raise CollateError(
                f"the tokenizer's image_token_id {tokenizer.image_token_id} != the model's {self.image_token_id}"
            )

    def encode(self, sample: Sample) -> tuple[list[int], list[int], bool]:
        """One sample -> (input ids, labels, truncated)."""
        ids: list[int] = []
        labels: list[int] = []
        images_seen = 0
        for k, turn in enumerate(sample.turns):
            prompt = apply_template(turn.instruction, self.template)
            n_images = prompt.count(IMAGE_PLACEHOLDER)
            images_seen += n_images
            if images_seen > (1 if sample.image is not None else 0):
                has = "one image" if sample.image is not None else "no image"
                raise CollateError(
                    f"{sample.source}: turn {k} holds an image placeholder {IMAGE_PLACEHOLDER!r} but the sample has "
                    f"{has} already placed; write the image once, in the first turn"
                )
            try:
                prompt_ids = self.tokenizer.encode_prompt(prompt, n_images, self.n_image_tokens, add_bos=True)
            except PromptError as err:
                raise CollateError(f"{sample.source}: {err}") from None
            answer_ids = self.tokenizer.encode(turn.answer) + [self.eos]
            ids += prompt_ids + answer_ids
            labels += [IGNORE] * len(prompt_ids) + answer_ids
        if sample.image is not None and images_seen == 0:
            raise CollateError(
                f"{sample.source}: the sample has an image but no turn holds {IMAGE_PLACEHOLDER!r}; "
                "the first instruction must contain <Img><ImageHere></Img>"
            )
        cut = self._cut(ids)
        return ids[:cut], labels[:cut], cut < len(ids)

    def _cut(self, ids: list[int]) -> int:
        """Length to keep: at most max_txt_len text tokens and at most the context; never inside the image ids."""
        text = 0
        for position, token in enumerate(ids):
            if token != self.image_token_id:
                text += 1
            if text > self.max_txt_len or position >= self.context:
                if 0 < position < len(ids) and ids[position - 1] == self.image_token_id == ids[position]:
                    raise CollateError(
                        f"max_txt_len {self.max_txt_len} / context {self.context} would cut inside the "
                        f"{self.n_image_tokens} image tokens at position {position}; raise max_txt_len"
                    )
                return position
        return len(ids)

    def __call__(self, samples: list[Sample]) -> Batch:
        if not samples:
            raise CollateError("an empty list of samples cannot make a batch")
        encoded = [self.encode(s) for s in samples]
        T = max(len(ids) for ids, _, _ in encoded)
        B = len(samples)
        input_ids = torch.full((B, T), self.eos, dtype=torch.long)  # pad = EOS, as the original (pad_token = eos)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        for row, (ids, labs, _) in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            labels[row, : len(labs)] = torch.tensor(labs)
        size = self.image_cfg.size
        pixels = np.zeros((B, 3, size, size), dtype=np.float32)  # text-only rows stay zero
        for row, sample in enumerate(samples):
            if sample.image is not None:
                pixels[row] = preprocess_for(sample.image, self.image_cfg)  # [3, S, S]
        return Batch(input_ids, attention_mask, labels, torch.from_numpy(pixels), sum(t for _, _, t in encoded))
