"""The demo's own tokenizer: a byte-level BPE trained with `tokenizers` on the synthetic world's text.

Phi-2's tokenizer cannot be downloaded, so the demo bootstrap trains one in its place, in the same `tokenizer.json`
format (`core.tokenizer.TextTokenizer.from_dir` reads either). Its layout:

- id 0 is `<|endoftext|>`, the only special token: BOS = EOS = pad, as in Phi-2;
- then the BPE vocabulary (the 256 byte symbols when the budget allows, then merges learned on the world's text);
- then, when the budget allows, whole tokens for the grid numbers `<0>` .. `<100>` and the markup of the four stages
  (`<p>`, `</p>`, `<delim>`, `<Img>`, `</Img>`, `[INST]`, `[/INST]`, the task tags, `###`). A box `{<12><30><40><77>}`
  is then six tokens, one per corner: a small model learns one classification per corner instead of digit spelling.
  These are ordinary (not special) added tokens, so `decode(..., skip_special_tokens=True)` keeps them.

The total stays below the model's `image_token_id` (1023 in the demo), which must be an id the tokenizer never makes.

    tok = train_world_tokenizer(SyntheticWorld(seed=0), cfg, n_scenes=1500)   # -> core.tokenizer.TextTokenizer
    tok.save("runs/demo/base/lm")
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from core.config import ModelConfig
from core.prompts import TASK_TAGS, TEMPLATES, apply_template
from core.tokenizer import TextTokenizer
from training.data.text import caption_text

logger = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
GRID_TOKENS = tuple(f"<{i}>" for i in range(101))
MARKUP_TOKENS = ("<p>", "</p>", "<delim>", "<Img>", "</Img>", "[INST]", "[/INST]", *TASK_TAGS, "###")
BYTE_ALPHABET = 256
MIN_MERGES = 64  # below this many learned merges the whole-token extras are dropped to make room


class TokenizerTrainError(ValueError):
    pass


def _strip_added(texts: Iterable[str], added: tuple[str, ...]) -> Iterator[str]:
    """The training text without the added tokens: they get whole ids, the BPE should not spend merges on them."""
    if not added:
        yield from texts
        return
    pattern = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
    for text in texts:
        yield pattern.sub(" ", text)


def train_bpe(texts: Iterable[str], vocab_size: int, extra_tokens: tuple[str, ...] | None = None) -> Tokenizer:
    """A byte-level BPE with `<|endoftext|>` at id 0 and `extra_tokens` as whole tokens, `vocab_size` ids in all.

    `extra_tokens=None` picks GRID_TOKENS + MARKUP_TOKENS when the budget leaves room for the 256 byte symbols and
    at least MIN_MERGES merges, and none otherwise (the tiny test model has 127 ids: letters seen in the text only).
    """
    if extra_tokens is None:
        wanted = GRID_TOKENS + MARKUP_TOKENS
        room = vocab_size - 1 - len(wanted) - BYTE_ALPHABET
        extra_tokens = wanted if room >= MIN_MERGES else ()
    full_alphabet = vocab_size - 1 - len(extra_tokens) >= BYTE_ALPHABET + MIN_MERGES
    bpe_size = vocab_size - len(extra_tokens)
    if bpe_size < 2:
        raise TokenizerTrainError(f"vocab_size {vocab_size} leaves no room after {len(extra_tokens)} extra tokens")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if full_alphabet else [],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_strip_added(texts, extra_tokens), trainer=trainer)
    learned = tokenizer.get_vocab_size(with_added_tokens=True)
    if extra_tokens:
        tokenizer.add_tokens([AddedToken(t, normalized=False) for t in extra_tokens])
    total = tokenizer.get_vocab_size(with_added_tokens=True)
    if tokenizer.token_to_id(ENDOFTEXT) != 0:
        raise TokenizerTrainError(f"{ENDOFTEXT} got id {tokenizer.token_to_id(ENDOFTEXT)}, expected 0")
    if total > vocab_size:
        raise TokenizerTrainError(f"the tokenizer has {total} ids, above the budget of {vocab_size}")
    logger.info("tokenizer: %d ids (%d BPE incl. %s, %d whole tokens)", total, learned, ENDOFTEXT, len(extra_tokens))
    return tokenizer


def sample_texts(samples: Iterable) -> Iterator[str]:
    """Every string a stage can show the model for these samples: raw and `caption_text`-cleaned, in each template."""
    for sample in samples:
        for turn in sample.turns:
            instruction = turn.instruction.replace("<ImageHere>", " ")
            yield turn.answer
            yield caption_text(turn.answer)
            for template in TEMPLATES.values():
                yield apply_template(instruction, template)
            yield caption_text(instruction)


def world_texts(world, n_scenes: int, split: str = "train") -> Iterator[str]:
    """The text of `n_scenes` scenes of the world, every task (see training.data.synthetic_tasks.TASKS)."""
    yield from sample_texts(world.iter_samples(split, n_scenes))


def train_world_tokenizer(world, cfg: ModelConfig, n_scenes: int = 1500, split: str = "train") -> TextTokenizer:
    """A tokenizer for `cfg`'s language model: its ids stay below both the vocabulary and the image token id."""
    lm = cfg.language_model
    if lm.bos_token_id != 0 or lm.eos_token_id != 0:
        raise TokenizerTrainError(
            f"the demo tokenizer puts {ENDOFTEXT} at id 0; the config has bos {lm.bos_token_id}, eos {lm.eos_token_id}"
        )
    budget = min(lm.vocab_size, cfg.prompt.image_token_id)
    tokenizer = train_bpe(world_texts(world, n_scenes, split), budget)
    return TextTokenizer(tokenizer, lm.bos_token_id, lm.eos_token_id, cfg.prompt.image_token_id)
