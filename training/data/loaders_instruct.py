"""Instruction data of stage 4: LLaVA-Instruct (detail, reason, conversation), multitask_conversation, unnatural
instructions.

    detail = LlavaSingleTurn("llava/detail_23k.json", "train2014", source="llava_detail")
    reason = LlavaSingleTurn("llava/complex_reasoning_77k.json", "train2014", source="llava_reason")
    conv = Conversation("llava/conversation_58k.json", "train2014", source="llava_conversation")
    multi = Conversation("multitask_conversation/multitask_conversation.json", "train2014",
                         source="multitask_conversation")
    text_only = UnnaturalInstructions("unnatural_instructions/filtered_unnatural_instruction.json")

LLaVA-format records are `{"id", "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt", ...}]}`
with the image at `<image_dir>/COCO_train2014_<id>.jpg` (the record's `image` field is ignored, as in the original).
- detail / reason: one turn. The first question loses `<image>` and its newlines and goes through `caption_text` (the
  original does this, so the question is lower-cased and loses its punctuation); the first answer is kept as written.
- conversation / multitask_conversation: every (human, gpt) pair is a turn; the first question has `<image>` and its
  newlines removed and the image text put in front; later questions are kept as written (surrounding whitespace
  stripped; the original appends a space); nothing goes through `caption_text`. The original joins turns with "!@#"
  and splits them again in the model; we keep them as a list of turns.
- unnatural instructions: text only (image None). `instances[0]`: `instruction_with_input` (+ " " + `constraints`
  when not null) -> `output`, both through `caption_text` (which cuts them to 50 words, as the original does).
"""

from __future__ import annotations

import random
from pathlib import Path

from core.prompts import with_image
from training.data.loaders_base import BadRecord, MapLoader, need, open_image, read_json_records
from training.data.sample import Sample, Turn
from training.data.text import caption_text


def first_question(text: str) -> str:
    """The original's clean-up of a LLaVA first question: drop `<image>` and every newline, strip."""
    return text.replace("<image>", "").replace("\n", "").strip()


def _turns(record: object) -> list[tuple[str, str]]:
    """(human, gpt) pairs of a LLaVA record; a conversation that does not alternate human/gpt is a bad record."""
    conversation = need(record, "conversations", list)
    if len(conversation) < 2 or len(conversation) % 2:
        raise BadRecord("bad conversation length", f"{len(conversation)} messages; need human/gpt pairs")
    pairs = []
    for i in range(0, len(conversation), 2):
        human, gpt = conversation[i], conversation[i + 1]
        if need(human, "from", str) != "human" or need(gpt, "from", str) != "gpt":
            raise BadRecord("conversation does not alternate human/gpt", f"message {i}: {human.get('from')!r}")
        pairs.append((need(human, "value", str), need(gpt, "value", str)))
    return pairs


def _coco_image(image_dir: Path, record: object):  # noqa: ANN202 - PIL image
    return open_image(image_dir / f"COCO_train2014_{need(record, 'id', (str, int))}.jpg")


class LlavaSingleTurn(MapLoader):
    """LLaVA detail_23k / complex_reasoning_77k: the first question and its answer."""

    def __init__(self, ann_path: str | Path, image_dir: str | Path, source: str = "llava_detail", seed: int = 0):
        super().__init__(read_json_records(ann_path), seed)
        self.image_dir = Path(image_dir)
        self.source = source

    def make(self, record: object, rng: random.Random) -> Sample:
        question, answer = _turns(record)[0]
        instruction = with_image(caption_text(first_question(question)))
        image = _coco_image(self.image_dir, record)
        return Sample(image, [Turn(instruction, answer)], self.source, meta={"id": record["id"]})


class Conversation(MapLoader):
    """LLaVA conversation_58k and MiniGPT-v2's multitask_conversation: all turns, the image in the first."""

    def __init__(
        self, ann_path: str | Path, image_dir: str | Path, source: str = "multitask_conversation", seed: int = 0
    ):
        super().__init__(read_json_records(ann_path), seed)
        self.image_dir = Path(image_dir)
        self.source = source

    def make(self, record: object, rng: random.Random) -> Sample:
        pairs = _turns(record)
        turns = [Turn(with_image(first_question(pairs[0][0])), pairs[0][1])]
        turns += [Turn(question.strip(), answer) for question, answer in pairs[1:]]
        image = _coco_image(self.image_dir, record)
        return Sample(image, turns, self.source, meta={"id": record["id"]})


class UnnaturalInstructions(MapLoader):
    """filtered_unnatural_instruction.json: list of {"instances": [{instruction_with_input, constraints, output}]}."""

    source = "unnatural_instruction"

    def __init__(self, ann_path: str | Path, seed: int = 0):
        super().__init__(read_json_records(ann_path), seed)

    def make(self, record: object, rng: random.Random) -> Sample:
        instances = need(record, "instances", list)
        if not instances:
            raise BadRecord("bad field 'instances'", "empty list")
        info = instances[0]
        instruction = need(info, "instruction_with_input", str)
        constraints = need(info, "constraints", (str, type(None)))
        if constraints is not None:
            instruction = f"{instruction} {constraints}"
        answer = need(info, "output", str)
        return Sample(None, [Turn(caption_text(instruction), caption_text(answer))], self.source)
