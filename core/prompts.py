"""Prompt templates, task tags and the image placeholder, shared by training, export and the runtime (torch-free).

TinyGPT-V writes the image as `<Img><ImageHere></Img>` inside the instruction, then wraps the instruction in a
stage's template: stage 3 `###Human: {} ###Assistant: `, stage 4 `[INST] {} [/INST]`. Stages 1-2 have no instruction
at all (the image alone, then the caption).

Unlike the original, every answer ends in the tokenizer's EOS and that EOS is supervised, so a trained model learns to
stop; "###" stays a stop string for models trained the original way.
"""

from __future__ import annotations

import re

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_TEXT = "<Img><ImageHere></Img>"

TEMPLATE_NONE = "{}"  # stages 1-2: image -> caption
TEMPLATE_STAGE3 = "###Human: {} ###Assistant: "
TEMPLATE_STAGE4 = "[INST] {} [/INST]"
TEMPLATES = {"none": TEMPLATE_NONE, "stage3": TEMPLATE_STAGE3, "stage4": TEMPLATE_STAGE4}

TASK_TAGS = ("[vqa]", "[caption]", "[refer]", "[identify]", "[grounding]", "[detection]")
STOP_STRINGS = ("###",)

_TAG_RE = re.compile(r"^\s*(\[(?:vqa|caption|refer|identify|grounding|detection)\])\s*")


class PromptError(ValueError):
    """A prompt whose image placeholders do not match the images given."""


def with_image(instruction: str) -> str:
    """`[vqa] What colour?` -> `<Img><ImageHere></Img> [vqa] What colour?` (the original's order: image, tag, text)."""
    if IMAGE_PLACEHOLDER in instruction:
        return instruction
    return f"{IMAGE_TEXT} {instruction}".rstrip() if instruction else IMAGE_TEXT


def apply_template(instruction: str, template: str = TEMPLATE_STAGE4) -> str:
    if "{}" not in template:
        raise PromptError(f"template {template!r} has no '{{}}' for the instruction")
    return template.replace("{}", instruction, 1)


def build_prompt(question: str, template: str = TEMPLATE_STAGE4, image: bool = True) -> str:
    """The full prompt text for one user turn: image placeholder (if any) + question, wrapped in the template."""
    return apply_template(with_image(question) if image else question, template)


def task_tag(text: str) -> str | None:
    """The task tag a question starts with (after the image text, if any), or None."""
    text = text.replace(IMAGE_TEXT, "").strip()
    match = _TAG_RE.match(text)
    return match.group(1) if match else None


def split_on_placeholder(prompt: str, n_images: int, placeholder: str = IMAGE_PLACEHOLDER) -> list[str]:
    """Split a prompt into the text segments around its image placeholders; their count must equal `n_images`."""
    parts = prompt.split(placeholder)
    found = len(parts) - 1
    if found != n_images:
        raise PromptError(
            f"the prompt has {found} image placeholder(s) {placeholder!r} but {n_images} image(s) were given; "
            f"write the image as {IMAGE_TEXT!r} once per image"
        )
    return parts


def cut_at_stop(text: str, stop_strings: tuple[str, ...] | list[str] = STOP_STRINGS) -> tuple[str, bool]:
    """Cut generated text at the first stop string. Returns (text, stopped)."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def holds_stop_prefix(text: str, stop_strings: tuple[str, ...] | list[str] = STOP_STRINGS) -> int:
    """How many trailing characters of `text` could be the start of a stop string (a streamer must hold them back)."""
    longest = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                longest = max(longest, n)
                break
    return longest
