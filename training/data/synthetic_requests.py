"""Held-out questions for the runtime: the synthetic world's `requests` format, read by `python -m runtime --batch`.

    python -m training.data.synthetic --seed 0 --split val --n 7 --out runs/demo/data/requests --formats requests
    python -m runtime --model exports/demo-int4 --batch runs/demo/data/requests/requests.jsonl --out answers.jsonl

writes, under the output folder:

    requests.jsonl                one request per image: {"id", "image", "prompt", "expected", "task", "type"}
                                  (+ "draw" and "gt_box" for refer); paths relative to this file's folder
    images/<image_id>.jpg         the images
    drawn/                        empty: where the runtime draws the boxes of the refer answers

Image k asks the k-th kind of `PLAN` (cycled): with 7 images, four VQA questions of four different types, one caption
and two referring expressions. A prompt is what a user types to the runtime (task tag + question); the runtime adds
the image text and the stage-4 template around it (`[INST] <Img><ImageHere></Img> [vqa] ... [/INST]`), as training
did. Questions, phrases and answers are written as the real-format loaders feed them to the model: VQA questions and
answers, refer phrases and TextCaps-style captions go through `caption_text` (lowercase, punctuation removed).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from core.boxes import format_box
from training.data.synthetic_scene import Scene
from training.data.synthetic_tasks import (
    CAPTION_PROMPTS,
    QUESTION_TYPES,
    referring_phrases,
    short_caption,
    vqa_candidates,
)
from training.data.text import caption_text

REQUESTS_FILE = "requests.jsonl"
IMAGES_DIR, DRAWN_DIR = "images", "drawn"
PLAN = ("vqa", "vqa", "refer", "vqa", "caption", "vqa", "refer")  # image k asks PLAN[k % len(PLAN)]
VQA_PROMPT = "[vqa] {}"  # the short one of the VQA loaders' two templates
CAPTION_PROMPT = "[caption] " + CAPTION_PROMPTS[0]  # "[caption] Briefly describe this image."
REFER_PROMPT = "[refer] give me the location of {}"  # one of the refer templates, the one the eval scripts send


def plan(n: int) -> Iterator[tuple[int, str, str]]:
    """(image index, task, VQA type or the task) of images 0..n-1; VQA types go round QUESTION_TYPES."""
    vqa = 0
    for index in range(n):
        task = PLAN[index % len(PLAN)]
        if task == "vqa":
            yield index, task, QUESTION_TYPES[vqa % len(QUESTION_TYPES)]
            vqa += 1
        else:
            yield index, task, task


def request(scene: Scene, image_id: int, task: str, qtype: str, rng: random.Random) -> dict:
    """One request on `scene`; `qtype` falls to the next type in QUESTION_TYPES when the scene has no such question."""
    image = f"{IMAGES_DIR}/{image_id}.jpg"
    if task == "vqa":
        candidates = vqa_candidates(scene)
        start = QUESTION_TYPES.index(qtype)
        qtype = next(t for t in QUESTION_TYPES[start:] + QUESTION_TYPES[:start] if candidates[t])
        pool = candidates[qtype]
        if qtype == "exists":  # yes or no with equal chance, as training draws them
            answer = rng.choice(sorted({qa.answer for qa in pool}))
            pool = [qa for qa in pool if qa.answer == answer]
        qa = rng.choice(pool)
        prompt, expected = VQA_PROMPT.format(caption_text(qa.question)), caption_text(qa.answer)
        extra: dict = {}
    elif task == "caption":
        prompt, expected, extra = CAPTION_PROMPT, caption_text(short_caption(scene)), {}
    elif task == "refer":
        obj = rng.choice(scene.objects)
        box = obj.grid_box(scene.width, scene.height)
        prompt = REFER_PROMPT.format(caption_text(rng.choice(referring_phrases(scene, obj))))
        expected = format_box(box)
        extra = {"gt_box": list(box), "draw": f"{DRAWN_DIR}/{image_id}.png"}
    else:
        raise ValueError(f"unknown request task {task!r}; choose from {', '.join(sorted(set(PLAN)))}")
    return {"id": f"{image_id}/{qtype}", "image": image, "prompt": prompt, "expected": expected, "task": task,
            "type": qtype, **extra}  # fmt: skip
