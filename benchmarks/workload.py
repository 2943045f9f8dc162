"""The fixed workload: the committed images and questions, made into prompts of an exact number of tokens.

llama-bench's pp512 means 512 prompt tokens; so does `--prompt-tokens 512` here. A prompt is the question through the
export's template with the image in front (BOS + 32 image tokens + text, as the runtime builds it), then lengthened with
the committed filler text, token by token, until it has exactly that many tokens. Runtimes that take no image
(onnxruntime-genai, llama.cpp, text-only runs) get the same number of tokens with text in place of the image ids, so
every runtime prefills the same length.

    work = Workload.load()
    ids = prompt_ids(tokenizer, template, work.requests[0].question, 128, image=True, image_token_id=1023,
                     num_image_tokens=32)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.prompts import build_prompt
from core.tokenizer import TextTokenizer

ASSETS = Path(__file__).parent / "assets"


class WorkloadError(ValueError):
    pass


def read_export_manifest(folder: str) -> dict:
    """The manifest.json of an export folder, or WorkloadError saying how to make one."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise WorkloadError(f"{folder}: not an export folder (no manifest.json); make one with python -m export.onnx")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Request:
    image: Path
    question: str


@dataclass(frozen=True)
class Workload:
    requests: tuple[Request, ...]
    filler: str

    @classmethod
    def load(cls, folder: Path = ASSETS) -> Workload:
        data = json.loads((folder / "prompts.json").read_text())
        requests = tuple(Request(folder / r["image"], r["question"]) for r in data["requests"])
        missing = [str(r.image) for r in requests if not r.image.is_file()]
        if missing:
            raise WorkloadError(f"benchmark images missing: {', '.join(missing)}; run python -m benchmarks.assets.draw")
        return cls(requests, data["filler"])


def lengthen(ids: list[int], filler_ids: list[int], target: int, at: int) -> list[int]:
    """Insert filler tokens (repeated as needed) at position `at` so that the result has exactly `target` tokens."""
    if len(ids) > target:
        raise WorkloadError(f"the prompt alone is {len(ids)} tokens, more than --prompt-tokens {target}")
    need = target - len(ids)
    if need and not filler_ids:
        raise WorkloadError("the filler text encodes to no tokens; cannot lengthen the prompt")
    extra = (filler_ids * (need // len(filler_ids) + 1))[:need] if need else []
    return ids[:at] + extra + ids[at:]


def prompt_ids(
    tokenizer: TextTokenizer,
    template: str,
    question: str,
    target_tokens: int,
    image: bool,
    image_token_id: int,
    num_image_tokens: int,
    filler: str,
) -> list[int]:
    """BOS + (image ids) + templated question, lengthened with filler after the image to exactly `target_tokens`."""
    text = build_prompt(question, template, image=image)
    ids = tokenizer.encode_prompt(text, 1 if image else 0, num_image_tokens, add_bos=True)
    after_image = max((i + 1 for i, t in enumerate(ids) if t == image_token_id), default=1)
    return lengthen(ids, tokenizer.encode(" " + filler), target_tokens, after_image)


def text_only(ids: list[int], image_token_id: int, filler_ids: list[int]) -> list[int]:
    """The same length with every image id replaced by filler text (for runtimes that are fed token ids only)."""
    if not filler_ids:
        raise WorkloadError("the filler text encodes to no tokens")
    out, k = [], 0
    for t in ids:
        if t == image_token_id:
            out.append(filler_ids[k % len(filler_ids)])
            k += 1
        else:
            out.append(t)
    return out


def synthetic_ids(target_tokens: int, bos: int, vocab_size: int, seed: int = 0) -> list[int]:
    """BOS + deterministic pseudo-random token ids (llama-bench's kind of input) for models without a real tokenizer."""
    ids, state = [bos], seed * 7919 + 12345
    while len(ids) < target_tokens:
        state = (state * 1103515245 + 12345) % (1 << 31)
        ids.append(1 + state % (vocab_size - 2))
    return ids
