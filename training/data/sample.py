"""The one record every dataset loader yields, whatever the on-disk format.

A sample is an image (or none, for text-only instruction data) and one or more turns. A turn's `instruction` is the
user text *before* the stage's template is applied, with the image written as `<Img><ImageHere></Img>` in the first
turn that has one (`<Img><ImageHere></Img> [vqa] What colour is the circle?`). Stages 1-2 have no instruction: their
single turn has `instruction == "<Img><ImageHere></Img>"` and the caption as answer. The collator applies the template
and the tokenizer; loaders never tokenize.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class Turn:
    instruction: str
    answer: str


@dataclass
class Sample:
    image: Image.Image | None
    turns: list[Turn]
    source: str  # dataset key, e.g. "coco_vqa", "refcoco", "synthetic_caption"
    task: str = ""  # task tag without brackets ("vqa", "refer", ...) or "" for captions and conversations
    meta: dict = field(default_factory=dict)  # ground truth for evaluation: boxes, answer lists, question type, ids
