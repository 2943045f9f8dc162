"""The text tokenizer and how a prompt with an image becomes token ids (torch-free; the runtime uses it as is).

A folder's `tokenizer.json` (Hugging Face `tokenizers` format: Phi-2's, or the demo's own BPE) is all it needs.
A prompt's `<ImageHere>` placeholder becomes `n_image_tokens` copies of `image_token_id`, an id the tokenizer never
produces; `embed` later swaps those positions for the projected image vectors. Every sequence starts with BOS, in
training and at inference alike (the original trained with BOS and generated without it).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from core.prompts import IMAGE_PLACEHOLDER, split_on_placeholder

TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(ValueError):
    pass


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, bos_token_id: int, eos_token_id: int, image_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.image_token_id = image_token_id
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        if image_token_id < vocab:
            raise TokenizerError(
                f"image_token_id {image_token_id} is a real token of this tokenizer (vocabulary {vocab}); "
                "it must be an id the tokenizer never produces"
            )

    @classmethod
    def from_dir(cls, path: str | Path, bos_token_id: int, eos_token_id: int, image_token_id: int) -> TextTokenizer:
        file = Path(path) / TOKENIZER_FILE
        if not file.is_file():
            raise TokenizerError(
                f"{file}: no tokenizer file; a model folder needs the {TOKENIZER_FILE} of its tokenizer"
            )
        return cls(Tokenizer.from_file(str(file)), bos_token_id, eos_token_id, image_token_id)

    def save(self, path: str | Path) -> None:
        self.tokenizer.save(str(Path(path) / TOKENIZER_FILE))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Plain text to ids, no special tokens added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = [i for i in ids if i != self.image_token_id]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode_prompt(self, prompt: str, n_images: int, n_image_tokens: int, add_bos: bool = True) -> list[int]:
        """Prompt text with `n_images` placeholders -> ids with `n_image_tokens` image ids at each placeholder."""
        segments = split_on_placeholder(prompt, n_images, IMAGE_PLACEHOLDER)
        ids = [self.bos_token_id] if add_bos else []
        for i, segment in enumerate(segments):
            if i > 0:
                ids.extend([self.image_token_id] * n_image_tokens)
            ids.extend(self.encode(segment))
        return ids
