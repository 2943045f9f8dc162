"""Evaluation metrics of TinyGPT-V's benchmarks (reference §6.1), as pure functions on strings and boxes (torch-free).

Shared by training.eval (the PyTorch model) and export.quality (an export folder), so both score answers alike.

- VQA exact match after the official VQA normalisation (lowercase, punctuation, number words -> digits, articles),
  and beside it the original's lenient GQA rule: correct if the label is a substring of the lower-cased answer;
- the official 10-answer VQA accuracy (min(#humans that said it / 3, 1), averaged over the 10 leave-one-out subsets);
- VizWiz score: min(#ground-truth answers equal to the prediction or a substring of it either way / 3, 1);
- likelihood ranking (IconQA): the candidate with the lowest answer loss wins;
- refer: the first `{<x1><y1><x2><y2>}` of the answer, rescaled from the 0-100 grid to pixels, counts when its IoU
  with the ground truth is >= 0.5 (the original's eval_ref.py counts IoU > 0.5 with inclusive pixel edges: also given);
- true/false (VSR) and yes/no (Hateful Memes) by substring, as the original scripts.

    normalize_answer("Two dogs.")            # '2 dogs'
    vqa_exact("the red", ["red"])            # 1.0
    vizwiz_score("red", ["red", "red", "dark red", "blue"])   # 1.0 (3 matches)
    refer_hit("{<10><10><50><50>}", (10, 10, 40, 40), 100, 100)  # True
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from core.boxes import grid_to_pixels, iou, parse_boxes

# The official VQA evaluation's normalisation (vqaEval.py: processPunctuation, processDigitArticle), abridged.
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$:~']")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """Lowercase; drop punctuation (keeping decimal points and 1,000); number words -> digits; drop articles."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _COMMA_NUMBER.sub(r"\1\3", text)
    text = _PUNCT.sub(" ", text)
    text = _PERIOD.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_exact(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised ground-truth answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def vqa_substring(prediction: str, answer: str) -> float:
    """The original GQA/VSR rule (eval_vqa.py): the label is a substring of the lower-cased prediction."""
    return float(answer.lower() in prediction.lower())


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy over (up to) 10 human answers: mean over leave-one-out subsets of min(matches / 3, 1)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    scores = []
    for left_out in range(len(gts)):
        matches = sum(pred == g for j, g in enumerate(gts) if j != left_out)
        scores.append(min(matches / 3.0, 1.0))
    return sum(scores) / len(scores)


def vizwiz_score(prediction: str, answers: Sequence[str]) -> float:
    """VizWiz (eval_vqa.py): min(#answers equal to the prediction or contained in it, or containing it / 3, 1)."""
    pred = prediction.strip().lower()
    if not pred:
        return 0.0
    matches = sum(1 for a in answers if (g := a.strip().lower()) == pred or g in pred or pred in g)
    return min(matches / 3.0, 1.0)


def rank_by_likelihood(losses: Sequence[float]) -> int:
    """IconQA's multi_select: the index of the candidate whose answer loss is lowest (the first one on ties)."""
    if not losses:
        raise ValueError("rank_by_likelihood needs at least one candidate loss")
    return min(range(len(losses)), key=lambda i: (losses[i], i))


def true_false(prediction: str) -> str | None:
    """VSR: 'true' or 'false' when exactly one of them is a substring of the answer, else None."""
    text = prediction.lower()
    found = [w for w in ("true", "false") if w in text]
    return found[0] if len(found) == 1 else None


def hateful_label(prediction: str) -> int:
    """Hateful Memes: 1 when the answer says yes, else 0 (the original's 'yes' -> 1, 'no' -> 0 rule)."""
    return int("yes" in prediction.lower())


def refer_boxes(prediction: str, width: int, height: int) -> list[tuple[float, float, float, float]]:
    """Every box of the answer, rescaled from the 0-100 grid to pixel corners of a width x height image."""
    return [grid_to_pixels(b, width, height) for b in parse_boxes(prediction)]


def refer_iou(
    prediction: str, gt_xyxy: Sequence[float], width: int, height: int, pixel_inclusive: bool = False
) -> float:
    """IoU of the answer's first box (pixels) with the ground-truth corners; 0.0 when no box parses."""
    boxes = refer_boxes(prediction, width, height)
    return iou(boxes[0], gt_xyxy, pixel_inclusive=pixel_inclusive) if boxes else 0.0


def refer_hit(prediction: str, gt_xyxy: Sequence[float], width: int, height: int, threshold: float = 0.5) -> bool:
    """Acc@IoU>=threshold for one answer."""
    return refer_iou(prediction, gt_xyxy, width, height) >= threshold


def refer_hit_original(prediction: str, gt_xyxy: Sequence[float], width: int, height: int) -> bool:
    """The original eval_ref.py rule: IoU > 0.5 with inclusive pixel edges (computeIoU's +1)."""
    return refer_iou(prediction, gt_xyxy, width, height, pixel_inclusive=True) > 0.5


def answer_matches(prediction: str, expected: str, threshold: float = 0.5) -> bool:
    """One answer against one expected answer: boxes by IoU >= threshold on the 0-100 grid (first box of each) when
    the expected answer holds a box, else VQA exact match after the official normalisation."""
    want = parse_boxes(expected)
    if not want:
        return bool(vqa_exact(prediction, [expected]))
    got = parse_boxes(prediction)
    return bool(got) and iou(got[0], want[0]) >= threshold


def xywh_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    x, y, w, h = box
    return (x, y, x + w, y + h)


def mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None
