"""The synthetic world: determinism, disjoint splits, answers consistent with the drawn objects, and the on-disk formats."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.boxes import BOX_PATTERN, box_to_grid, format_box, parse_grounded
from core.prompts import IMAGE_TEXT
from training.data.synthetic import SyntheticWorld, main
from training.data.synthetic_scene import COLOURS, POSITION_PHRASES, POSITIONS, SHAPES, SIZES, ShapeObject
from training.data.synthetic_tasks import (
    CAPTION_PROMPTS,
    IDENTIFY_TEMPLATES,
    QUESTION_TYPES,
    REFER_TEMPLATES,
    TASKS,
    VQA_TEMPLATES,
    vqa_candidates,
)
from training.data.synthetic_writers import write_split

SIZE = 64  # small images keep the tests fast; drawing is the same at any size


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(seed=3, image_size=SIZE)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "val"
    write_split(SyntheticWorld(seed=3, image_size=SIZE), "val", 8, out, shard_size=5)
    return out


# -- scenes ---------------------------------------------------------------------------------------------------


def test_scene_is_pinned_by_seed_and_index() -> None:
    # A change here means every demo run trains on a different world: bump the manifest version if it is on purpose.
    scene = SyntheticWorld(seed=0, image_size=128).scene(1)
    assert scene.background == "white"
    assert scene.objects == (
        ShapeObject("green", "star", "large", (50, 9, 40, 40), 1),
        ShapeObject("orange", "square", "small", (102, 48, 23, 23), 5),
        ShapeObject("green", "square", "large", (87, 87, 40, 40), 8),
    )


def test_same_seed_gives_identical_images_and_annotations(world: SyntheticWorld) -> None:
    again = SyntheticWorld(seed=3, image_size=SIZE)
    for a, b in zip(world.samples("train", 6), again.samples("train", 6)):
        assert a.image.tobytes() == b.image.tobytes()
        assert [(t.instruction, t.answer) for t in a.turns] == [(t.instruction, t.answer) for t in b.turns]
        assert a.meta == b.meta
    other = SyntheticWorld(seed=4, image_size=SIZE)
    assert world.scene(0).image.tobytes() != other.scene(0).image.tobytes()


def test_a_sample_does_not_depend_on_the_other_tasks_asked(world: SyntheticWorld) -> None:
    alone = world.samples("train", 3, tasks=("vqa",), start=5)
    mixed = [s for s in world.samples("train", 3, start=5) if s.task == "vqa"]
    assert [s.turns for s in alone] == [s.turns for s in mixed]
    assert [s.meta["index"] for s in alone] == [5, 6, 7]
    assert len(world.samples("train", 2)) == 2 * len(TASKS)


def test_splits_are_disjoint(world: SyntheticWorld) -> None:
    hashes = {
        split: {hashlib.sha256(world.scene(i, split).image.tobytes()).hexdigest() for i in range(60)}
        for split in ("train", "val", "test")
    }
    assert all(len(h) == 60 for h in hashes.values())  # no repeats inside a split either
    assert (
        not hashes["train"] & hashes["val"]
        and not hashes["train"] & hashes["test"]
        and not hashes["val"] & hashes["test"]
    )
    ids = {split: {world.image_id(i, split) for i in range(60)} for split in ("train", "val", "test")}
    assert not ids["train"] & ids["val"] and not ids["val"] & ids["test"]


def test_objects_are_valid_and_do_not_overlap(world: SyntheticWorld) -> None:
    counts = set()
    for i in range(80):
        scene = world.scene(i)
        counts.add(len(scene.objects))
        for k, a in enumerate(scene.objects):
            assert a.colour in COLOURS and a.shape in SHAPES and a.size in SIZES
            x, y, w, h = a.bbox
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE
            col, row = (x + w / 2) * 3 // SIZE, (y + h / 2) * 3 // SIZE
            assert row * 3 + col == a.cell  # the position name is the cell the centre lies in
            for b in scene.objects[k + 1 :]:
                bx, by, bw, bh = b.bbox
                assert x + w <= bx or bx + bw <= x or y + h <= by or by + bh <= y
    assert counts == {1, 2, 3, 4}


def test_colours_survive_drawing_and_jpeg(written: Path, world: SyntheticWorld) -> None:
    checked = 0
    for i in range(8):
        scene = world.scene(i, "val")
        jpeg = Image.open(written / "train2014" / f"COCO_train2014_{world.image_id(i, 'val'):012d}.jpg")
        pixels = np.asarray(jpeg.convert("RGB"), dtype=np.float64)  # [H, W, 3]
        for obj in scene.objects:
            x, y, w, h = obj.bbox
            cx, cy = x + w // 2, y + h // 2
            mean = pixels[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(axis=0)  # [3]
            assert np.abs(mean - obj.rgb).max() < 12, (i, obj, mean)
            nearest = min(COLOURS, key=lambda c: float(((np.array(COLOURS[c]) - mean) ** 2).sum()))
            assert nearest == obj.colour
            checked += 1
    assert checked >= 12


# -- annotations ----------------------------------------------------------------------------------------------

_POSITION_SUFFIX = {v: k for k, v in POSITION_PHRASES.items()}


def _resolve(objects: tuple[ShapeObject, ...], description: str) -> list[ShapeObject]:
    """Objects matching a phrase like `small red circle`, `red object` or `circle at the top left`, by its words."""
    position = None
    for phrase, name in _POSITION_SUFFIX.items():
        if description.endswith(" " + phrase):
            description, position = description[: -len(phrase) - 1], name
    words = [w for w in description.split() if w not in ("the", "object")]
    return [
        o for o in objects if all(w in (o.size, o.colour, o.shape) for w in words) and position in (None, o.position)
    ]


def _recount(objects: tuple[ShapeObject, ...], question: str) -> str:
    """The answer to a question, worked out again from the objects alone."""
    if question == "How many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(sum(o.colour == m[1] for o in objects))
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return str(sum(o.shape == m[1] for o in objects))
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "yes" if any(o.colour == m[1] and o.shape == m[2] for o in objects) else "no"
    m = re.fullmatch(r"(What color is|What shape is|Where is) the (.+)\?", question)
    assert m, question
    (target,) = _resolve(objects, m[2])  # the question must pick out exactly one object
    return {"What color is": target.colour, "What shape is": target.shape, "Where is": target.position}[m[1]]


def test_every_vqa_answer_follows_from_the_objects(world: SyntheticWorld) -> None:
    answers = {t: [] for t in QUESTION_TYPES}
    for i in range(120):
        scene = world.scene(i)
        for qtype, qas in vqa_candidates(scene).items():
            for qa in qas:
                assert _recount(scene.objects, qa.question) == qa.answer, (i, qa)
                answers[qtype].append(qa.answer)
        for sample in world.samples("train", 1, tasks=("vqa",), start=i):
            assert sample.turns[0].answer == _recount(scene.objects, sample.meta["question"]) == sample.meta["answer"]
    assert set(answers["colour"]) == set(COLOURS) and set(answers["shape"]) == set(SHAPES)
    assert set(answers["count"]) == {"0", "1", "2", "3", "4"}
    assert len(set(answers["position"])) == 9 and set(answers["exists"]) == {"yes", "no"}


def test_vqa_types_and_yes_no_are_balanced(world: SyntheticWorld) -> None:
    samples = world.samples("test", 300, tasks=("vqa",))
    types = [s.meta["qtype"] for s in samples]
    assert all(40 <= types.count(t) <= 80 for t in QUESTION_TYPES), {t: types.count(t) for t in QUESTION_TYPES}
    yes = sum(s.meta["answer"] == "yes" for s in samples if s.meta["qtype"] == "exists")
    assert 0.35 <= yes / types.count("exists") <= 0.65


def test_refer_and_identify_boxes_match_the_objects(world: SyntheticWorld) -> None:
    for sample in world.samples("train", 40, tasks=("refer", "identify")):
        objects = tuple(
            ShapeObject(o["colour"], o["shape"], o["size"], tuple(o["bbox"]), POSITIONS.index(o["position"]))
            for o in sample.meta["objects"]
        )
        instruction, answer = sample.turns[0].instruction, sample.turns[0].answer
        assert instruction.startswith(IMAGE_TEXT + " ")
        box_text = answer if sample.task == "refer" else BOX_PATTERN.search(instruction)[0]
        box = tuple(int(v) for v in BOX_PATTERN.fullmatch(box_text).groups())
        assert all(0 <= v <= 100 for v in box) and box[0] < box[2] and box[1] < box[3]
        assert list(box) == sample.meta["gt_box"]
        if sample.task == "refer":
            assert any(instruction == f"{IMAGE_TEXT} {t.format(sample.meta['phrase'])}" for t in REFER_TEMPLATES)
            (target,) = _resolve(objects, sample.meta["phrase"])  # the phrase is unique in the scene
            assert box == box_to_grid(*target.bbox, SIZE, SIZE)
        else:
            assert any(instruction == f"{IMAGE_TEXT} {t.format(box_text)}" for t in IDENTIFY_TEMPLATES)
            (target,) = [o for o in objects if box_to_grid(*o.bbox, SIZE, SIZE) == box]
            assert answer == f"{target.size} {target.colour} {target.shape}"


def test_instructions_follow_the_original_templates(world: SyntheticWorld) -> None:
    by_task = {s.task or s.source: s for s in world.samples("train", 1, start=2)}
    assert by_task["synthetic_image_caption"].turns[0].instruction == IMAGE_TEXT
    caption = by_task["caption"].turns[0]
    assert caption.instruction in [f"{IMAGE_TEXT} [caption] {p}" for p in CAPTION_PROMPTS]
    vqa = by_task["vqa"]
    assert vqa.turns[0].instruction in [f"{IMAGE_TEXT} {t.format(vqa.meta['question'])}" for t in VQA_TEMPLATES]
    assert by_task["grounding"].turns[0].instruction.startswith(f"{IMAGE_TEXT} [grounding] ")
    conversation = by_task["synthetic_conversation"].turns
    assert 2 <= len(conversation) <= 3 and conversation[0].instruction.startswith(IMAGE_TEXT)
    assert all(IMAGE_TEXT not in t.instruction for t in conversation[1:])


def test_captions_grounding_and_detection_of_a_known_scene() -> None:
    world = SyntheticWorld(seed=0, image_size=128)
    samples = {s.source: s.turns[0] for s in world.samples("train", 1, start=1)}
    star, square, big_square = "{<39><7><70><38>}", "{<79><37><97><55>}", "{<67><67><99><99>}"
    assert (
        samples["synthetic_image_caption"].answer
        == "a large green star, a small orange square and a large green square"
    )
    assert samples["synthetic_detail"].answer == (
        "There are three shapes on a white background: a large green star at the top, "
        "a small orange square on the right and a large green square at the bottom right."
    )
    assert samples["synthetic_grounding"].answer == (
        f"<p>a large green star</p> {star}, <p>a small orange square</p> {square} and <p>a large green square</p> {big_square}"
    )
    for index in range(6):  # both kinds: one phrase with all its boxes, and the caption with a box per object
        detection = world.sample(index, "detection")
        parsed = parse_grounded(detection.turns[0].answer)
        assert detection.turns[0].instruction == f"{IMAGE_TEXT} [detection] {detection.meta['phrase']}"
        assert [list(b) for _, boxes in parsed for b in boxes] == detection.meta["gt_boxes"]


# -- files on disk --------------------------------------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writing_twice_gives_identical_bytes(written: Path, tmp_path: Path) -> None:
    write_split(SyntheticWorld(seed=3, image_size=SIZE), "val", 8, tmp_path / "again", shard_size=5)
    first, second = _files(written), _files(tmp_path / "again")
    assert sorted(first) == sorted(second) and all(first[k] == second[k] for k in first)
    assert not [p for p in written.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_webdataset_shards(written: Path, world: SyntheticWorld) -> None:
    assert sorted(p.name for p in (written / "shards").iterdir()) == ["00000.tar", "00001.tar"]
    with tarfile.open(written / "shards" / "00001.tar") as tar:
        names = tar.getnames()
        assert names == [f"00001000{k}.{e}" for k in range(3) for e in ("jpg", "json", "txt")]  # images 5, 6, 7
        meta = json.loads(tar.extractfile("000010001.json").read())
        image = Image.open(io.BytesIO(tar.extractfile("000010001.jpg").read()))
        caption = tar.extractfile("000010001.txt").read().decode()
    assert meta["key"] == "000010001" and meta["caption"] == caption and image.size == (SIZE, SIZE)
    assert caption == world.sample(6, "image_caption", "val").turns[0].answer


def test_stage3_and_llava_files(written: Path, world: SyntheticWorld) -> None:
    align = json.loads((written / "cc_sbu_align" / "filter_cap.json").read_text())
    first = align["annotations"][0]
    assert set(align) == {"annotations"} and first["image_id"] == str(world.image_id(0, "val"))
    assert first["caption"] == world.sample(0, "detail", "val").turns[0].answer
    assert (written / "cc_sbu_align" / "image" / f"{first['image_id']}.jpg").is_file()
    for name in ("detail_23k", "complex_reasoning_77k", "conversation_58k"):
        records = json.loads((written / "llava" / f"{name}.json").read_text())
        assert len(records) == 8
        for record in records:
            assert set(record) == {"id", "image", "conversations"} and re.fullmatch(r"\d{12}", record["id"])
            assert (written / "train2014" / f"COCO_train2014_{record['id']}.jpg").is_file()
            turns = record["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
    multitask = json.loads((written / "multitask_conversation" / "multitask_conversation.json").read_text())
    assert all(re.match(r"<image>\n\[(vqa|refer|identify)\] ", r["conversations"][0]["value"]) for r in multitask)


def test_vqa_and_gqa_files(written: Path, world: SyntheticWorld) -> None:
    vqa = json.loads((written / "coco_vqa" / "vqa_train.json").read_text())
    for record in vqa:
        assert set(record) == {"question_id", "question", "answer", "image"} and len(record["answer"]) == 10
        image_id = int(re.fullmatch(r"train2014/COCO_train2014_(\d{12})\.jpg", record["image"])[1])
        index = image_id - world.image_id(0, "val")
        assert _recount(world.scene(index, "val").objects, record["question"]) == record["answer"][0]
    assert len({r["question_id"] for r in vqa}) == len(vqa)
    gqa = json.loads((written / "gqa" / "train_balanced_questions.json").read_text())
    assert all(set(r) == {"image", "question", "answer", "question_id"} for r in gqa)
    assert all((written / "gqa" / "images" / r["image"]).is_file() for r in gqa)


class _PlainOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> None:
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def test_refcoco_files(written: Path, world: SyntheticWorld) -> None:
    refs = _PlainOnly(io.BytesIO((written / "refcoco" / "refs(unc).p").read_bytes())).load()
    instances = json.loads((written / "refcoco" / "instances.json").read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    assert {c["name"] for c in instances["categories"]} == set(SHAPES)
    assert len(refs) == len(anns) == sum(len(world.scene(i, "val").objects) for i in range(8))
    for ref in refs:
        assert {"ref_id", "ann_id", "image_id", "category_id", "split", "sentences"} <= set(ref) and ref[
            "split"
        ] == "val"
        scene = world.scene(ref["image_id"] - world.image_id(0, "val"), "val")
        for sentence in ref["sentences"]:
            assert (
                set(sentence) == {"raw", "sent", "tokens", "sent_id"} and sentence["tokens"] == sentence["raw"].split()
            )
            (target,) = _resolve(scene.objects, sentence["raw"])
            assert anns[ref["ann_id"]]["bbox"] == list(target.bbox)


def test_flickr_files(written: Path) -> None:
    grounded = json.loads((written / "flickr" / "groundedcaption.json").read_text())
    to_box = json.loads((written / "flickr" / "captiontobbox.json").read_text())
    phrases = json.loads((written / "flickr" / "phrasetobbox.json").read_text())
    assert all((written / "flickr" / f"{r['image_id']}.jpg").is_file() for r in grounded)
    assert all(set(r) == {"image_id", "caption", "output"} for r in to_box)
    for record in phrases:
        assert set(record) == {"image_id", "phrase", "bbox"}
        assert re.fullmatch(r"\{<\d+><\d+><\d+><\d+>\}(<delim>\{<\d+><\d+><\d+><\d+>\})*", record["bbox"])
    assert [p for p, _ in parse_grounded(to_box[0]["output"])] == re.findall(
        r"<p>(.*?)</p>", grounded[0]["grounded_caption"]
    )


def test_eval_files(written: Path, world: SyntheticWorld) -> None:
    questions = json.loads((written / "eval" / "synthetic_val.json").read_text())
    assert {q["type"] for q in questions} == set(QUESTION_TYPES) | {"refer", "identify"}
    for q in questions:
        scene = world.scene(q["image_id"] - world.image_id(0, "val"), "val")
        assert (written / q["image"]).is_file() and q["prompt"].endswith(q["question"])
        if q["task"] == "vqa":
            assert _recount(scene.objects, q["question"]) == q["answer"] and q["gt_box"] is None
        elif q["task"] == "refer":
            assert q["answer"] == format_box(q["gt_box"]) and q["prompt"].startswith("[refer] ")
        else:
            assert q["question"] == format_box(q["gt_box"]) and q["answer"].split()[-1] in SHAPES
    refcoco = json.loads((written / "eval" / "refcoco_val.json").read_text())
    assert all((written / "train2014" / (r["img_id"][:27] + ".jpg")).is_file() for r in refcoco)
    assert all(set(r) == {"img_id", "sents", "bbox", "height", "width"} for r in refcoco)
    testdev = json.loads((written / "gqa" / "testdev_balanced_questions.json").read_text())
    assert len(testdev) == sum(q["task"] == "vqa" for q in questions)
    manifest = json.loads((written / "synthetic.json").read_text())
    assert manifest["counts"]["eval/synthetic_val.json"] == len(questions) and manifest["seed"] == 3


# -- command line ---------------------------------------------------------------------------------------------


def test_cli_writes_refuses_and_forces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s"
    args = [
        "--seed",
        "1",
        "--split",
        "test",
        "--n",
        "3",
        "--out",
        str(out),
        "--image-size",
        "48",
        "--formats",
        "stage3",
    ]
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cc_sbu_align", "synthetic.json"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not empty; pass --force" in err
    assert main([*args[:-1], "stage1", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["shards", "synthetic.json"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--split", "dev"], "invalid choice: 'dev'"),
        (["--split", "train", "--n", "0"], "--n 0 must be between 1"),
        (["--split", "train", "--n", "2", "--formats", "stage2"], "unknown format(s) ['stage2']"),
        (["--split", "train", "--n", "2", "--image-size", "16"], "--image-size 16 is too small"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "x")] + (["--n", "1"] if "--n" not in args else []))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x").exists()


def test_a_written_split_reads_back_through_the_real_format_loaders(tmp_path: Path) -> None:
    from training.data.loaders_captions import CCSBUAlign, WebDatasetCaptions
    from training.data.loaders_grounding import (
        FlickrCaptionToPhrase,
        FlickrGroundedCaption,
        FlickrObjectToPhrase,
        RefCOCO,
    )
    from training.data.loaders_instruct import Conversation, LlavaSingleTurn
    from training.data.loaders_vqa import GQA, VQA

    world, out = SyntheticWorld(seed=5, image_size=SIZE), tmp_path / "train"
    manifest = write_split(world, "train", 4, out, formats=("stage1", "stage3", "stage4"))
    n_objects = sum(len(world.scene(i).objects) for i in range(4))
    loaders = {
        "shards": WebDatasetCaptions(str(out / "shards" / "{00000..00000}.tar")),
        "cc_sbu_align/filter_cap.json": CCSBUAlign(out / "cc_sbu_align"),
        "llava/detail_23k.json": LlavaSingleTurn(out / "llava" / "detail_23k.json", out / "train2014"),
        "multitask_conversation/multitask_conversation.json": Conversation(
            out / "multitask_conversation" / "multitask_conversation.json", out / "train2014"
        ),
        "coco_vqa/vqa_train.json": VQA(out / "coco_vqa" / "vqa_train.json", out / "train2014"),
        "gqa/train_balanced_questions.json": GQA(out / "gqa" / "train_balanced_questions.json", out / "gqa" / "images"),
        "refcoco/refs(unc).p": RefCOCO(out, out / "train2014"),
        "flickr/groundedcaption.json": FlickrGroundedCaption(out / "flickr" / "groundedcaption.json", out / "flickr"),
        "flickr/captiontobbox.json": FlickrCaptionToPhrase(out / "flickr" / "captiontobbox.json", out / "flickr"),
        "flickr/phrasetobbox.json": FlickrObjectToPhrase(out / "flickr" / "phrasetobbox.json", out / "flickr"),
    }
    read = {name: list(loader) for name, loader in loaders.items()}
    assert {name: len(samples) for name, samples in read.items()} == {
        name: manifest["counts"][name] for name in loaders
    }
    assert manifest["counts"]["refcoco/refs(unc).p"] == n_objects
    assert [s.turns[0].answer for s in read["shards"]] == [
        world.sample(i, "image_caption").turns[0].answer for i in range(4)
    ]
    refer = read["refcoco/refs(unc).p"][0]
    assert refer.turns[0].answer == format_box(world.scene(0).objects[0].grid_box(SIZE, SIZE))
    grounded = read["flickr/groundedcaption.json"][2]
    assert grounded.turns[0].answer == world.sample(2, "grounding").turns[0].answer
    assert all(s.image.size == (SIZE, SIZE) for samples in read.values() for s in samples)


def test_requests_for_the_runtime(tmp_path: Path) -> None:
    from core.prompts import TEMPLATES, apply_template, build_prompt, with_image
    from training.data.loaders_vqa import vqa_instruction
    from training.data.synthetic_tasks import referring_phrases, short_caption
    from training.data.synthetic_writers import encode_jpeg, parse_formats
    from training.data.text import caption_text

    world, out = SyntheticWorld(seed=3, image_size=SIZE), tmp_path / "requests"
    manifest = write_split(world, "val", 7, out, formats=("requests",))
    requests = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert manifest["counts"] == {"requests.jsonl": 7} and sorted(p.name for p in out.iterdir()) == [
        "drawn", "images", "requests.jsonl", "synthetic.json"]  # fmt: skip
    assert [r["task"] for r in requests] == ["vqa", "vqa", "refer", "vqa", "caption", "vqa", "refer"]
    assert [r["type"] for r in requests if r["task"] == "vqa"] == ["colour", "shape", "count", "position"]
    stage4 = TEMPLATES["stage4"]
    for i, r in enumerate(requests):
        scene = world.scene(i, "val")
        assert r["id"] == f"{world.image_id(i, 'val')}/{r['type']}" and r["image"] == f"images/{200_000_000 + i}.jpg"
        assert (out / r["image"]).read_bytes() == encode_jpeg(scene)
        if r["task"] == "vqa":  # lowercased as the VQA loaders feed questions, answer worked out again
            (qa,) = [qa for qa in vqa_candidates(scene)[r["type"]] if caption_text(qa.question) == r["prompt"][6:]]
            assert r["prompt"] == f"[vqa] {qa.question.lower()}"
            assert r["expected"] == _recount(scene.objects, qa.question)
            # the runtime's prompt (build_prompt with the manifest's template) is the stage-4 training prompt
            seed = next(s for s in range(50) if "Based" not in vqa_instruction("", random.Random(s)))  # short template
            trained = apply_template(vqa_instruction(caption_text(qa.question), random.Random(seed)), stage4)
            assert build_prompt(r["prompt"], stage4) == trained == f"[INST] {IMAGE_TEXT} {r['prompt']} [/INST]"
        elif r["task"] == "caption":
            assert r["prompt"] == "[caption] Briefly describe this image." and r["expected"] == short_caption(scene)
        else:
            (obj,) = [o for o in scene.objects if list(o.grid_box(SIZE, SIZE)) == r["gt_box"]]
            phrase = r["prompt"].removeprefix("[refer] give me the location of ")
            assert phrase in referring_phrases(scene, obj) and r["expected"] == format_box(r["gt_box"])
            assert r["draw"] == f"drawn/{200_000_000 + i}.png" and with_image(r["prompt"]).startswith(IMAGE_TEXT)
    assert not any((out / "drawn").iterdir())
    assert parse_formats("all") == ("stage1", "stage3", "stage4", "eval")  # requests only when named
    assert parse_formats("requests,all") == ("stage1", "stage3", "stage4", "eval", "requests")
