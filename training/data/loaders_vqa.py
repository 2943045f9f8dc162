"""VQA data of stage 4: COCO-VQA (VQAv2), OK-VQA, A-OKVQA and GQA, in LAVIS's JSON formats.

    vqa = VQA(["coco_vqa/vqa_train.json", "coco_vqa/vqa_val.json"], "train2014", source="coco_vqa")
    okvqa = VQA("okvqa/okvqa_train.json", "train2014", source="ok_vqa")
    aokvqa = VQA("aokvqa/aokvqa_v1p0_train.json", "train2014", source="aok_vqa", answer_field="direct_answers")
    gqa = GQA("gqa/train_balanced_questions.json", "gqa/images")

Each sample: `<Img><ImageHere></Img> [vqa] {question}` or `... [vqa] Based on the image, respond to this question with a
short answer: {question}` (the template is the first draw from the sample's rng), and one answer. With a list of
answers (ten annotators), one is drawn with probability proportional to how many annotators gave it, as the original's
`random.choices(answers, weights)` does. Question and answer go through `caption_text`. COCO images are found by the
basename of the record's `image` field (`train2014/COCO_train2014_....jpg` -> `<image_dir>/COCO_train2014_....jpg`);
GQA's `image` is joined to the image folder as is. The original silently drops records whose image is missing when it
starts; ours counts them per pass like any other bad record. `meta` keeps the question id and the full answer list.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from core.prompts import with_image
from training.data.loaders_base import BadRecord, MapLoader, need, open_image, read_json_records
from training.data.sample import Sample, Turn
from training.data.text import VQA_TEMPLATES, caption_text


def weighted_answer(answers: Sequence[str], rng: random.Random) -> str:
    """One answer with probability proportional to its frequency in `answers` (ten annotators: 'yes' x7 -> 70%)."""
    counts = Counter(answers)  # insertion-ordered: first appearance order, as the original's dict
    return rng.choices(list(counts), weights=list(counts.values()), k=1)[0]


def vqa_instruction(question: str, rng: random.Random) -> str:
    return with_image(rng.choice(VQA_TEMPLATES).format(question))


class VQA(MapLoader):
    """COCO-VQA / OK-VQA (`answer`: list of strings) and A-OKVQA (`direct_answers`) records on COCO images."""

    task = "vqa"

    def __init__(
        self,
        ann_paths: str | Path | Sequence[str | Path],
        image_dir: str | Path,
        source: str = "coco_vqa",
        answer_field: str = "answer",
        seed: int = 0,
    ):
        paths = [ann_paths] if isinstance(ann_paths, (str, Path)) else list(ann_paths)
        records = [record for path in paths for record in read_json_records(path)]
        super().__init__(records, seed)
        self.image_dir = Path(image_dir)
        self.source = source
        self.answer_field = answer_field

    def make(self, record: object, rng: random.Random) -> Sample:
        question = caption_text(need(record, "question", str))
        instruction = vqa_instruction(question, rng)
        answers = need(record, self.answer_field, (list, str))
        answers = [answers] if isinstance(answers, str) else answers
        if not answers or not all(isinstance(a, str) for a in answers):
            raise BadRecord(f"bad field {self.answer_field!r}", repr(answers)[:120])
        answer = caption_text(weighted_answer(answers, rng))
        image_name = Path(need(record, "image", str)).name
        image = open_image(self.image_dir / image_name)
        meta = {"question_id": record.get("question_id"), "answers": list(answers), "image": image_name}
        return Sample(image, [Turn(instruction, answer)], self.source, self.task, meta=meta)


class GQA(MapLoader):
    """GQA balanced train questions: list of {image, question, answer (one string), question_id}."""

    source = "gqa"
    task = "vqa"

    def __init__(self, ann_path: str | Path, image_dir: str | Path, seed: int = 0):
        super().__init__(read_json_records(ann_path), seed)
        self.image_dir = Path(image_dir)

    def make(self, record: object, rng: random.Random) -> Sample:
        question = caption_text(need(record, "question", str))
        instruction = vqa_instruction(question, rng)
        answer = caption_text(need(record, "answer", str))
        image_name = need(record, "image", str)
        image = open_image(self.image_dir / image_name)
        meta = {"question_id": record.get("question_id"), "answers": [record["answer"]], "image": image_name}
        return Sample(image, [Turn(instruction, answer)], self.source, self.task, meta=meta)
