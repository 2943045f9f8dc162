"""Random weights of a preset's real shapes, one graph's worth at a time: for sizes and memory, never for answers.

    model = lazy_random_model(ModelConfig.preset("tinygptv"))     # every parameter on the meta device: no memory
    with materialized(model, "decoder", seed=0):                  # the language model only: 11 GB fp32 at real size
        export_graph(model, "decoder", path)

The real TinyGPT-V is 3.9 B parameters (15.5 GB in fp32: ViT-g 1.0 B, Q-Former 0.1 B, Phi-2 2.8 B). Holding all of
it, plus what tracing needs, does not fit next to other work on a 24 GB machine; each graph needs only its own part,
so the others stay on the meta device (shapes only). Initialisation: Linear / Embedding / Conv weights N(0, 0.02),
biases 0, norms 1 / 0, the learned tokens and position embeddings N(0, 0.02); seeded per part, so a part is the
same whichever graph materialises it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch
from torch import nn

from core.config import ModelConfig
from core.model import TinyGPTV
from core.phi import RMSNorm, RotaryEmbedding

GRAPH_PARTS = {
    "vision": ("vision_model", "qformer", "projector", "query_tokens"),
    "embedding": ("language_model.model.embed_tokens",),
    "decoder": ("language_model",),
}


def lazy_random_model(cfg: ModelConfig) -> TinyGPTV:
    with torch.device("meta"):
        model = TinyGPTV(cfg).eval()
    model.lazy_random_init = True  # export.onnx materialises parts per graph instead of validating against PyTorch
    return model


def is_lazy(model: TinyGPTV) -> bool:
    return bool(getattr(model, "lazy_random_init", False))


def _generator(seed: int, part: str) -> torch.Generator:
    digest = int.from_bytes(hashlib.sha256(f"{seed}:{part}".encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(digest)


@torch.no_grad()
def _initialise(module: nn.Module, generator: torch.Generator) -> None:
    done = set()
    for sub in module.modules():
        if isinstance(sub, (nn.LayerNorm, RMSNorm)):
            sub.weight.fill_(1.0)
            if getattr(sub, "bias", None) is not None:
                sub.bias.zero_()
            done.update(id(p) for p in sub.parameters(recurse=False))
    for name, param in module.named_parameters():
        if id(param) in done:
            continue
        if name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=generator)


def _materialise_part(model: TinyGPTV, part: str, seed: int) -> None:
    if part == "query_tokens":
        shape = model.query_tokens.shape
        model.query_tokens = nn.Parameter(torch.randn(shape, generator=_generator(seed, part)) * 0.02)
        return
    module = model.get_submodule(part)
    module.to_empty(device="cpu")
    _initialise(module, _generator(seed, part))
    if part == "language_model":  # a buffer, not a parameter: recompute, to_empty left it uninitialised
        module.rotary = RotaryEmbedding(model.config.language_model)


def _release_part(model: TinyGPTV, part: str) -> None:
    if part == "query_tokens":
        model.query_tokens = nn.Parameter(torch.empty(model.query_tokens.shape, device="meta"))
    else:
        model.get_submodule(part).to("meta")


@contextlib.contextmanager
def materialized(model: TinyGPTV, graph: str, seed: int = 0) -> Iterator[TinyGPTV]:
    """Random weights for `graph`'s parts of a lazy model for the duration; back on the meta device after."""
    if not is_lazy(model):
        yield model
        return
    parts = GRAPH_PARTS[graph]
    for part in parts:
        _materialise_part(model, part, seed)
    try:
        yield model
    finally:
        for part in parts:
            _release_part(model, part)


def stand_in_tokenizer(cfg: ModelConfig):
    """A byte-level tokenizer (the 256 byte symbols, when the vocabulary has room for them, + merges of the prompt
    markup), for random-init folders without --tokenizer.

    Its ids are not the preset's real tokenizer's (Phi-2's cannot be downloaded here); the folder's special token ids
    stay the config's. Enough for the runtime to tokenize and decode while memory and speed are measured.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from core.prompts import TASK_TAGS, TEMPLATES, build_prompt
    from core.tokenizer import TextTokenizer

    lm = cfg.language_model
    texts = [build_prompt(f"{tag} What is in the image?", t) for tag in TASK_TAGS for t in TEMPLATES.values()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    budget = min(1024, lm.vocab_size, cfg.prompt.image_token_id)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if budget > 256 else []  # tiny presets: the texts' letters only
    trainer = trainers.BpeTrainer(vocab_size=budget, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=alphabet)  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer)
    return TextTokenizer(tokenizer, lm.bos_token_id, lm.eos_token_id, cfg.prompt.image_token_id)
