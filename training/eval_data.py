"""Readers of the evaluation files: the synthetic world's held-out split and the real benchmarks' formats (reference §4).

Each reader turns one annotation file (and the folder its images live in) into `EvalItem`s carrying the instruction
the original's eval scripts send (reference §6.1, task tag included, template not yet applied) and the ground truth.

| benchmark      | file (original name)                      | image                                   | scored by |
|----------------|-------------------------------------------|-----------------------------------------|-----------|
| synthetic      | eval/synthetic_<split>.json (our writer)  | <data>/<image>                          | VQA exact + lenient, refer IoU, identify |
| gqa            | testdev_balanced_questions.json           | <images>/<image> (or <imageId>.jpg)     | label substring of the answer, exact |
| vsr            | VSR zero-shot test as JSON/JSONL          | <images>/{train2017,val2017,.}/<image>  | 'true'/'false' substring |
| iconqa         | choose_text_val.json                      | <images>/<image_id>/image.png           | likelihood ranking |
| vizwiz         | val.json                                  | <images>/<image>                        | VizWiz score |
| hateful_memes  | dev.jsonl                                 | <images>/<img>                          | yes/no accuracy |
| refcoco        | refcoco_val.json (MiniGPT-v2 eval_data)   | <images>/<img_id[:27]>.jpg              | Acc@IoU>=0.5 |

Questions and phrases are cleaned with `caption_text`, as the real-format training loaders clean them, so the model
is asked in the form it was trained on (the synthetic writer keeps them capitalised).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from core.boxes import format_box
from core.metrics import xywh_to_xyxy
from training.data.text import caption_text

BENCHMARKS = ("synthetic", "gqa", "vsr", "iconqa", "vizwiz", "hateful_memes", "refcoco")
VQA_PROMPT = "[vqa] Based on the image, respond to this question with a short answer: {}"
VSR_PROMPT = "[vqa] Based on the image, is this statement true or false? {}"
VIZWIZ_PROMPT = (
    "[vqa] The question is '{}' Based on the image, answer the question with a single word or phrase. and reply "
    "'unanswerable' when the provided information is insufficient"
)
HATEFUL_PROMPT = "This is an image writting '{}'. Is this image hateful? Answer yes or no. Answer:"
REFER_PROMPT = "[refer] give me the location of {}"
IDENTIFY_PROMPT = "[identify] what object is in this location {}"


class EvalDataError(ValueError):
    """An evaluation file that is missing or not in the expected format; the message names the file and the field."""


@dataclass
class EvalItem:
    benchmark: str
    qid: str
    image: Path
    instruction: str  # task tag + question, before the template; the image text is added by the runner
    task: str  # vqa | refer | identify | choose | truefalse | hateful
    answers: list[str] = field(default_factory=list)
    qtype: str = ""
    choices: list[str] = field(default_factory=list)
    gt_xyxy: tuple[float, float, float, float] | None = None  # pixels of the original image
    width: int = 0
    height: int = 0
    label: int | None = None


def _load(path: Path) -> list | dict:
    if not path.is_file():
        raise EvalDataError(f"{path}: no such evaluation file")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{path}: not valid JSON ({err})") from None


def _field(entry: dict, name: str, path: Path, k: int):
    if name not in entry:
        raise EvalDataError(f"{path}: entry {k} has no {name!r} field (fields: {', '.join(sorted(entry))})")
    return entry[name]


def _as_list(data, path: Path) -> list[dict]:
    if isinstance(data, dict):  # keyed by question id, as GQA's own release and some IconQA dumps
        return [{"question_id": k, **v} for k, v in data.items()]
    if not isinstance(data, list):
        raise EvalDataError(f"{path}: expected a list of entries, got {type(data).__name__}")
    return data


def read_synthetic(data_dir: Path, split: str) -> list[EvalItem]:
    """`eval/synthetic_<split>.json` of training.data.synthetic_writers (VQA by type, refer, identify)."""
    path = Path(data_dir) / "eval" / f"synthetic_{split}.json"
    items = []
    for k, e in enumerate(_as_list(_load(path), path)):
        task, question = _field(e, "task", path, k), _field(e, "question", path, k)
        common = {"benchmark": "synthetic", "qid": str(e.get("question_id", k)), "image": Path(data_dir) / e["image"]}
        common.update(width=e.get("width", 0), height=e.get("height", 0), qtype=e.get("type", task))
        if task == "vqa":
            instruction = VQA_PROMPT.format(caption_text(question))
            items.append(EvalItem(**common, instruction=instruction, task="vqa", answers=[e["answer"]]))
        elif task == "refer":
            box = xywh_to_xyxy(_field(e, "bbox", path, k))
            instruction = REFER_PROMPT.format(caption_text(question))
            items.append(EvalItem(**common, instruction=instruction, task="refer", gt_xyxy=box))
        elif task == "identify":
            instruction = IDENTIFY_PROMPT.format(format_box(e["gt_box"]))
            items.append(EvalItem(**common, instruction=instruction, task="identify", answers=[e["answer"]]))
        else:
            raise EvalDataError(f"{path}: entry {k} has task {task!r}; expected vqa, refer or identify")
    return items


def read_gqa(path: Path, images: Path) -> list[EvalItem]:
    """GQA testdev balanced: a list of {image, question, answer} (LAVIS) or GQA's own {qid: {imageId, ...}}."""
    path, items = Path(path), []
    for k, e in enumerate(_as_list(_load(path), path)):
        image = e.get("image") or f"{_field(e, 'imageId', path, k)}.jpg"
        instruction = VQA_PROMPT.format(caption_text(_field(e, "question", path, k)))
        qid = str(e.get("question_id", k))
        items.append(EvalItem("gqa", qid, Path(images) / image, instruction, "vqa", [_field(e, "answer", path, k)]))
    return items


def _vsr_image(images: Path, name: str) -> Path:
    for sub in ("train2017", "val2017", "."):  # the original looks in COCO train2017, then val2017
        candidate = Path(images) / sub / name
        if candidate.is_file():
            return candidate
    return Path(images) / "train2017" / name


def read_vsr(path: Path, images: Path) -> list[EvalItem]:
    """VSR zero-shot test (cambridgeltl/vsr_zeroshot, saved as JSON or JSONL): {image, caption, label 0/1}."""
    path, items = Path(path), []
    for k, e in enumerate(_as_list(_load(path), path)):
        label = int(_field(e, "label", path, k))
        instruction = VSR_PROMPT.format(_field(e, "caption", path, k))
        image = _vsr_image(images, _field(e, "image", path, k))
        answer = "true" if label else "false"
        items.append(EvalItem("vsr", str(e.get("id", k)), image, instruction, "truefalse", [answer], label=label))
    return items


def read_iconqa(path: Path, images: Path) -> list[EvalItem]:
    """IconQA choose_txt: {image_id, question, choices (list, or one string joined with '_'), answer}."""
    path, items = Path(path), []
    for k, e in enumerate(_as_list(_load(path), path)):
        choices = _field(e, "choices", path, k)
        choices = choices.split("_") if isinstance(choices, str) else list(choices)
        answer = str(_field(e, "answer", path, k))
        if answer not in choices:
            raise EvalDataError(f"{path}: entry {k}: answer {answer!r} is not one of its choices {choices}")
        image = Path(images) / str(_field(e, "image_id", path, k)) / "image.png"
        instruction = _field(e, "question", path, k)
        qid = str(e.get("question_id", k))
        items.append(EvalItem("iconqa", qid, image, instruction, "choose", [answer], choices=choices))
    return items


def read_vizwiz(path: Path, images: Path) -> list[EvalItem]:
    """VizWiz val: {image, question, answers: [{answer, answer_confidence}, ...]}."""
    path, items = Path(path), []
    for k, e in enumerate(_as_list(_load(path), path)):
        answers = [a["answer"] if isinstance(a, dict) else str(a) for a in _field(e, "answers", path, k)]
        instruction = VIZWIZ_PROMPT.format(_field(e, "question", path, k))
        image = Path(images) / _field(e, "image", path, k)
        items.append(EvalItem("vizwiz", str(e.get("question_id", k)), image, instruction, "vqa", answers))
    return items


def read_hateful_memes(path: Path, images: Path) -> list[EvalItem]:
    """Hateful Memes dev.jsonl: one {id, img, label, text} per line; no task tag."""
    path, items = Path(path), []
    for k, e in enumerate(_as_list(_load(path), path)):
        label = int(_field(e, "label", path, k))
        instruction = HATEFUL_PROMPT.format(_field(e, "text", path, k))
        image = Path(images) / _field(e, "img", path, k)
        answer = "yes" if label else "no"
        items.append(
            EvalItem("hateful_memes", str(e.get("id", k)), image, instruction, "hateful", [answer], label=label)
        )
    return items


def read_refcoco(path: Path, images: Path) -> list[EvalItem]:
    """MiniGPT-v2 eval_data/refcoco*_*.json: {img_id 'COCO_train2014_<012d>_<k>', sents, bbox [x,y,w,h], height, width}."""
    path, items = Path(path), []
    for k, e in enumerate(_as_list(_load(path), path)):
        img_id = _field(e, "img_id", path, k)
        sents = _field(e, "sents", path, k)
        box = xywh_to_xyxy(_field(e, "bbox", path, k))
        w, h = int(_field(e, "width", path, k)), int(_field(e, "height", path, k))
        for j, sent in enumerate([sents] if isinstance(sents, str) else sents):
            items.append(
                EvalItem("refcoco", f"{img_id}:{j}", Path(images) / f"{img_id[:27]}.jpg",
                         REFER_PROMPT.format(caption_text(sent)), "refer", gt_xyxy=box, width=w, height=h)
            )  # fmt: skip
    return items


READERS = {
    "gqa": read_gqa,
    "vsr": read_vsr,
    "iconqa": read_iconqa,
    "vizwiz": read_vizwiz,
    "hateful_memes": read_hateful_memes,
    "refcoco": read_refcoco,
}


def read_split_folder(data_dir: Path, split: str, benchmarks: tuple[str, ...]) -> list[EvalItem]:
    """What a synthetic split folder (format `eval`) holds: synthetic, and the same world as GQA / RefCOCO files."""
    data_dir = Path(data_dir)
    items: list[EvalItem] = []
    if "synthetic" in benchmarks:
        items += read_synthetic(data_dir, split)
    if "refcoco" in benchmarks and (data_dir / "eval" / f"refcoco_{split}.json").is_file():
        items += read_refcoco(data_dir / "eval" / f"refcoco_{split}.json", data_dir / "train2014")
    if "gqa" in benchmarks and (data_dir / "gqa" / "testdev_balanced_questions.json").is_file():
        items += read_gqa(data_dir / "gqa" / "testdev_balanced_questions.json", data_dir / "gqa" / "images")
    return items
