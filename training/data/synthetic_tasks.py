"""Annotations of a synthetic scene in the text forms the four stages use, and `Sample`s built from them.

Everything here is derived from a scene's objects: captions (short, detailed, grounded), VQA questions with a question
type (colour, shape, count, position, exists) whose answer is unique, referring phrases that pick out exactly one
object, detection targets, and multi-turn conversations. Instructions follow the original's templates (MiniGPT-v2's
`[vqa]`, `[refer]`, `[identify]`, `[grounding]`, `[detection]`, `[caption]` pools; MiniGPT-4's stage-3 alignment
prompts), chosen by the RNG passed in, so a sample is a pure function of (scene, RNG seed).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from core.boxes import format_box, format_grounded
from core.prompts import IMAGE_TEXT, with_image
from training.data.sample import Sample, Turn
from training.data.synthetic_scene import COLOURS, POSITION_PHRASES, SHAPES, Scene, ShapeObject
from training.data.text import (  # the original's instruction pools, shared with the real-format loaders
    ALIGNMENT_PROMPTS as _ALIGNMENT_LINES,
)
from training.data.text import (
    CAPTION_PROMPTS as _TEXTCAPS_PROMPTS,
)
from training.data.text import (
    DETECTION_TEMPLATE,
    GROUNDING_TEMPLATES,
    IDENTIFY_TEMPLATES,
    REFER_TEMPLATES,
    VQA_TEMPLATES,
)

# TextCaps' short-caption prompts after the [caption] tag, without the original's stray trailing spaces.
CAPTION_PROMPTS = tuple(p.strip() for p in _TEXTCAPS_PROMPTS)
# MiniGPT-4 prompts/alignment.txt (stage 3) without the image text, which `with_image` adds back.
ALIGNMENT_PROMPTS = tuple(p.replace(IMAGE_TEXT, "").strip() for p in _ALIGNMENT_LINES)
LLAVA_DETAIL_QUESTIONS = (
    "Describe the following image.",
    "What is this photo about?",
    "Explain the visual content of the image in great detail.",
    "Can you elaborate on the elements of the picture provided?",
    "What do you see happening in this image?",
    "Write a detailed description of the given image.",
)
QUESTION_TYPES = ("colour", "shape", "count", "position", "exists")
TASKS = ("image_caption", "detail", "caption", "vqa", "refer", "identify", "grounding", "detection", "conversation")
NUMBER_WORDS = ("no", "one", "two", "three", "four")


@dataclass(frozen=True)
class QA:
    qtype: str  # one of QUESTION_TYPES
    question: str  # without tag or image
    answer: str  # a single word or short phrase, for exact match
    target: int | None = None  # index of the object asked about, if one


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _count(scene: Scene, **attrs: str) -> int:
    """How many objects of the scene have all of `attrs` (plain loops: this runs ~100 times per scene)."""
    n = 0
    for obj in scene.objects:
        for key, value in attrs.items():
            if getattr(obj, key) != value:
                break
        else:
            n += 1
    return n


def short_caption(scene: Scene) -> str:
    """`a large red circle and a small blue square` (reading order)."""
    parts = [article(o.name) for o in scene.objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def detailed_caption(scene: Scene) -> str:
    """`There are two shapes on a white background: a large red circle at the top left and a small blue ...`."""
    n = len(scene.objects)
    shapes = f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}"
    head = f"There {'is' if n == 1 else 'are'} {shapes} on {article(scene.background)} background"
    parts = [f"{article(o.name)} {POSITION_PHRASES[o.position]}" for o in scene.objects]
    body = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{head}: {body}."


def grounded_caption(scene: Scene) -> str:
    """The short caption with each object's phrase grounded: `<p>a large red circle</p> {<..>} and <p>...</p> {<..>}`."""
    parts = [format_grounded(article(o.name), [o.grid_box(scene.width, scene.height)]) for o in scene.objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def referring_phrases(scene: Scene, obj: ShapeObject) -> list[str]:
    """Phrases (no article, RefCOCO style) that pick out `obj` alone; positional ones only when nothing else does."""
    options = [("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")]
    phrases = [
        " ".join(getattr(obj, a) for a in attrs)
        for attrs in options
        if _count(scene, **{a: getattr(obj, a) for a in attrs}) == 1
    ]
    return phrases or [f"{obj.colour} {obj.shape} {POSITION_PHRASES[obj.position]}"]


def _described(scene: Scene, obj: ShapeObject, without: str) -> str:
    """The shortest phrase for `obj` that does not name its `without` attribute ("colour" or "shape")."""
    noun = "object" if without == "shape" else obj.shape
    kept = ("colour",) if without == "shape" else ("shape",)
    for attrs in (kept, ("size", *kept)):
        if _count(scene, **{a: getattr(obj, a) for a in attrs}) == 1:
            words = [getattr(obj, a) for a in attrs if a != "shape"]
            return " ".join(["the", *words, noun])
    return f"the {noun} {POSITION_PHRASES[obj.position]}"


def vqa_candidates(scene: Scene) -> dict[str, tuple[QA, ...]]:
    """Every question with a unique answer, by type. `exists` holds both yes and no questions."""
    return dict(_vqa_candidates(scene.objects, scene.index))  # a copy: the cached dict stays as computed


class _Layout(NamedTuple):  # what questions depend on: a hashable stand-in for a Scene
    objects: tuple[ShapeObject, ...]
    index: int


@functools.lru_cache(maxsize=256)  # the writers ask for one scene's questions several times in a row
def _vqa_candidates(objects: tuple[ShapeObject, ...], index: int) -> dict[str, tuple[QA, ...]]:
    scene = _Layout(objects, index)
    out: dict[str, list[QA]] = {t: [] for t in QUESTION_TYPES}
    for i, obj in enumerate(scene.objects):
        out["colour"].append(QA("colour", f"What color is {_described(scene, obj, 'colour')}?", obj.colour, i))
        out["shape"].append(QA("shape", f"What shape is {_described(scene, obj, 'shape')}?", obj.shape, i))
        phrases = referring_phrases(scene, obj)
        if not phrases[0].endswith(POSITION_PHRASES[obj.position]):  # never ask where X is when X names its position
            out["position"] += [QA("position", f"Where is the {p}?", obj.position, i) for p in phrases]
        out["exists"].append(QA("exists", f"Is there {article(obj.colour + ' ' + obj.shape)}?", "yes", i))
    n = len(scene.objects)
    out["count"].append(QA("count", "How many shapes are there?", str(n)))
    for shape in SHAPES:
        if _count(scene, shape=shape):
            out["count"].append(QA("count", f"How many {shape}s are there?", str(_count(scene, shape=shape))))
    for colour in sorted({o.colour for o in scene.objects}):
        out["count"].append(QA("count", f"How many {colour} shapes are there?", str(_count(scene, colour=colour))))
    absent = [s for s in SHAPES if not _count(scene, shape=s)]
    if absent:  # one zero-count question, not three, so that "0" does not dominate
        out["count"].append(QA("count", f"How many {absent[scene.index % len(absent)]}s are there?", "0"))
    present = {(o.colour, o.shape) for o in scene.objects}
    for colour in sorted(COLOURS):  # hard negatives: share the colour or the shape of an object in the scene
        for shape in SHAPES:
            near = any(colour == c or shape == s for c, s in present)
            if (colour, shape) not in present and near:
                out["exists"].append(QA("exists", f"Is there {article(colour + ' ' + shape)}?", "no"))
    return {qtype: tuple(qas) for qtype, qas in out.items()}


def pick_question(candidates: dict[str, Sequence[QA]], rng: random.Random, qtype: str | None = None) -> QA:
    """One question: a type uniformly among those available (or `qtype`), then a question; yes/no balanced."""
    if qtype is None:
        qtype = rng.choice([t for t in QUESTION_TYPES if candidates[t]])
    pool = candidates[qtype]
    if qtype == "exists":
        answer = rng.choice(sorted({qa.answer for qa in pool}))
        pool = [qa for qa in pool if qa.answer == answer]
    return rng.choice(pool)


def detection_targets(scene: Scene) -> list[tuple[str, list[tuple[int, int, int, int]]]]:
    """(phrase, grid boxes of every object it names) for `colour shape` and `shape` phrases present in the scene."""
    targets = []
    keys = sorted({(o.colour, o.shape) for o in scene.objects}) + [
        (None, s) for s in sorted({o.shape for o in scene.objects})
    ]
    for colour, shape in keys:
        objs = [o for o in scene.objects if o.shape == shape and colour in (None, o.colour)]
        phrase = f"{colour} {shape}" if colour else shape
        targets.append((phrase, [o.grid_box(scene.width, scene.height) for o in objs]))
    return targets


def caption_to_boxes(scene: Scene) -> str:
    """The Flickr `captiontobbox` output for the short caption: each object's phrase with its box, concatenated."""
    return "".join(format_grounded(article(o.name), [o.grid_box(scene.width, scene.height)]) for o in scene.objects)


def _tagged_turn(scene: Scene, rng: random.Random, kind: str) -> tuple[str, str, dict]:
    """One tagged instruction (no image text), its answer and its ground truth."""
    if kind == "vqa":
        qa = pick_question(vqa_candidates(scene), rng)
        return (
            rng.choice(VQA_TEMPLATES).format(qa.question),
            qa.answer,
            {"qtype": qa.qtype, "question": qa.question, "answer": qa.answer},
        )
    obj = rng.choice(scene.objects)
    box = obj.grid_box(scene.width, scene.height)
    if kind == "refer":
        phrase = rng.choice(referring_phrases(scene, obj))
        return (
            rng.choice(REFER_TEMPLATES).format(phrase),
            format_box(box),
            {"phrase": phrase, "gt_box": list(box), "bbox": list(obj.bbox)},
        )
    if kind == "identify":
        return (
            rng.choice(IDENTIFY_TEMPLATES).format(format_box(box)),
            obj.name,
            {"phrase": obj.name, "gt_box": list(box), "answer": obj.name},
        )
    raise ValueError(f"unknown turn kind {kind!r}")


def tagged_conversation(scene: Scene, rng: random.Random) -> list[tuple[str, str, dict]]:
    """2-3 distinct tagged turns (vqa twice as often as refer or identify), MiniGPT-v2 multitask-conversation style."""
    turns: list[tuple[str, str, dict]] = []
    seen: set = set()
    for _ in range(12):  # a one-object scene has few distinct questions; stop trying after a dozen draws
        kind = rng.choice(("vqa", "vqa", "refer", "identify"))
        turn = _tagged_turn(scene, rng, kind)
        key = (kind, turn[2].get("question") or tuple(turn[2]["gt_box"]))  # never the same question or object twice
        if key not in seen:
            seen.add(key)
            turns.append(turn)
        if len(turns) == 3 or (len(turns) == 2 and rng.random() < 0.5):
            break
    return turns


def llava_conversation(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """2-3 distinct untagged questions and short answers, LLaVA conversation style."""
    candidates = vqa_candidates(scene)
    pairs: list[tuple[str, str]] = []
    for _ in range(12):
        qa = pick_question(candidates, rng)
        if all(qa.question != q for q, _ in pairs):
            pairs.append((qa.question, qa.answer))
        if len(pairs) == 3 or (len(pairs) == 2 and rng.random() < 0.5):
            break
    return pairs


def _counted(n: int, shape: str) -> str:
    return f"{NUMBER_WORDS[n]} {shape}{'' if n == 1 else 's'}"


def reason_qa(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A LLaVA complex-reasoning style pair: compare two counts and explain the answer."""
    present = {o.shape for o in scene.objects}  # a pair that mentions a shape in the scene: yes and no equally likely
    first, second = rng.choice([(a, b) for a in SHAPES for b in SHAPES if a != b and (a in present or b in present)])
    a, b = _count(scene, shape=first), _count(scene, shape=second)
    verdict = "Yes" if a > b else "No"
    return (
        f"Are there more {first}s than {second}s in the image?",
        f"{verdict}. The image has {_counted(a, first)} and {_counted(b, second)}.",
    )


def build_sample(scene: Scene, task: str, rng: random.Random, image_id: int) -> Sample:
    """The `Sample` of one task on one scene; `meta` carries the ground truth for evaluation."""
    w, h = scene.width, scene.height
    meta: dict = {"split": scene.split, "index": scene.index, "image_id": image_id, "width": w, "height": h}
    meta.update(background=scene.background, objects=scene.object_dicts())
    tag = task if task in ("caption", "vqa", "refer", "identify", "grounding", "detection") else ""
    if task == "image_caption":
        turns = [Turn(IMAGE_TEXT, short_caption(scene))]
    elif task == "detail":
        turns = [Turn(with_image(rng.choice(ALIGNMENT_PROMPTS)), detailed_caption(scene))]
    elif task == "caption":
        turns = [Turn(with_image("[caption] " + rng.choice(CAPTION_PROMPTS)), short_caption(scene))]
    elif task in ("vqa", "refer", "identify"):
        instruction, answer, truth = _tagged_turn(scene, rng, task)
        turns = [Turn(with_image(instruction), answer)]
        meta.update(truth)
    elif task == "grounding":
        turns = [Turn(with_image(rng.choice(GROUNDING_TEMPLATES)), grounded_caption(scene))]
        meta["gt_boxes"] = [list(o.grid_box(w, h)) for o in scene.objects]
    elif task == "detection":
        if rng.random() < 0.5:
            phrase, boxes = rng.choice(detection_targets(scene))
            answer = format_grounded(phrase, boxes)
        else:
            phrase, boxes = short_caption(scene), [o.grid_box(w, h) for o in scene.objects]
            answer = caption_to_boxes(scene)
        turns = [Turn(with_image(DETECTION_TEMPLATE.format(phrase)), answer)]
        meta.update(phrase=phrase, gt_boxes=[list(b) for b in boxes])
    elif task == "conversation":
        turns, meta["turns"] = [], []
        for k, (instruction, answer, truth) in enumerate(tagged_conversation(scene, rng)):
            turns.append(Turn(with_image(instruction) if k == 0 else instruction, answer))
            meta["turns"].append(truth)
    else:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {', '.join(TASKS)}")
    return Sample(image=scene.image, turns=turns, source=f"synthetic_{task}", task=tag, meta=meta)
