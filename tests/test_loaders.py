"""The real-format loaders, the caption text processor, the restricted unpickler and the mixture.

Every fixture is written here, in the exact on-disk format of the original datasets, with real JPEGs made by Pillow.
Template choices are checked against the rng contract (the template is the first draw of the sample's rng) and
against literal strings for fixed seeds.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import tarfile
from itertools import islice
from pathlib import Path

import pytest
from PIL import Image

from training.data.loaders_base import BadRecord, MapLoader, NoUsableRecords
from training.data.loaders_captions import CCSBUAlign, TextCaps, WebDatasetCaptions, expand_braces
from training.data.loaders_grounding import (
    FlickrCaptionToPhrase,
    FlickrGroundedCaption,
    FlickrObjectToPhrase,
    RefCOCO,
    VisualGenomeRefer,
)
from training.data.loaders_instruct import Conversation, LlavaSingleTurn, UnnaturalInstructions
from training.data.loaders_vqa import GQA, VQA, weighted_answer
from training.data.mixture import STAGE4, Mixture, build_stage4_mixture
from training.data.safe_pickle import PickleRefused, load_plain_pickle, loads_plain_pickle
from training.data.sample import Sample, Turn
from training.data.text import ALIGNMENT_PROMPTS, CAPTION_PROMPTS, caption_text

IMG = "<Img><ImageHere></Img>"


def jpeg(path: Path, size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG")
    return path


def jpeg_bytes(color: tuple[int, int, int] = (20, 200, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, "JPEG")
    return buf.getvalue()


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def pairs(samples: list[Sample]) -> list[tuple[str, str]]:
    return [(t.instruction, t.answer) for s in samples for t in s.turns]


# ---------------------------------------------------------------- caption_text


def test_caption_text_matches_blip_caption() -> None:
    assert caption_text("A Dog (brown)!  Runs.") == "a dog brown runs"
    assert caption_text('Hello: "World"; ~x* #y') == "hello world x y"
    assert caption_text("what's this, dog?") == "what's this, dog?"  # , ' ? are kept
    assert caption_text("  A cat.\n") == "a cat"
    assert caption_text("a\nb") == "a\nb"  # a lone newline survives, as in the original (only runs of 2+ collapse)
    assert caption_text(" ".join(f"w{i}" for i in range(60))) == " ".join(f"w{i}" for i in range(50))
    assert caption_text("one two three four", max_words=3) == "one two three"


# ---------------------------------------------------------------- safe_pickle


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Plain:
    pass


def test_restricted_unpickler_admits_plain_data(tmp_path: Path) -> None:
    refs = [{"ref_id": 1, "sentences": [{"raw": "man", "tokens": ["man"]}], "box": (1.5, 2), "x": None, "ok": True}]
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"refs{protocol}.p"
        path.write_bytes(pickle.dumps(refs, protocol=protocol))
        assert load_plain_pickle(path) == refs


def test_restricted_unpickler_refuses_globals_and_other_types(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(PickleRefused, match=rf"refusing to load global '{os.system.__module__}\.system'"):
        loads_plain_pickle(pickle.dumps([{"a": _Evil(marker)}]))
    assert not marker.exists()  # refused before anything was called
    with pytest.raises(PickleRefused, match=r"global 'tests\.test_loaders\._Plain'|global '[\w.]*_Plain'"):
        loads_plain_pickle(pickle.dumps({"x": _Plain()}))
    with pytest.raises(PickleRefused, match=r"type 'builtins\.set' at <root>\[0\]\['s'\]"):
        loads_plain_pickle(pickle.dumps([{"s": {1, 2}}], protocol=4))
    with pytest.raises(PickleRefused, match=r"type 'builtins\.bytes'"):
        loads_plain_pickle(pickle.dumps({"b": b"raw"}, protocol=3))
    with pytest.raises(PickleRefused, match="not a readable pickle"):
        loads_plain_pickle(b"\x80\x04garbage")


# ---------------------------------------------------------------- stages 1-3 captions


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def caption_member(key: str, caption: str) -> list[tuple[str, bytes]]:
    meta = json.dumps({"caption": caption, "url": "http://x", "key": key}).encode()
    return [(f"{key}.jpg", jpeg_bytes()), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)]


@pytest.fixture
def shards(tmp_path: Path) -> str:
    write_shard(
        tmp_path / "laion" / "00000.tar",
        caption_member("000000000", "A Red Square.") + caption_member("000000001", "Two (blue) circles!"),
    )
    bad = [("000010002.jpg", jpeg_bytes()), ("000010002.json", b"{not json")]  # bad json
    bad += [("000010003.json", b'{"caption": "no image"}')]  # no jpg member
    bad += [("000010004.jpg", b"not a jpeg"), ("000010004.json", b'{"caption": "x"}')]  # undecodable image
    write_shard(tmp_path / "laion" / "00001.tar", bad + caption_member("000010005", "A green    triangle"))
    return str(tmp_path / "laion" / "{00000..00001}.tar")


def test_expand_braces() -> None:
    assert expand_braces("d/{00008..00011}.tar") == [f"d/000{i:02d}.tar" for i in (8, 9, 10, 11)]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="two non-negative integers"):
        expand_braces("{a..b}.tar")


def test_webdataset_captions_one_pass_skips_and_counts(shards: str, caplog: pytest.LogCaptureFixture) -> None:
    loader = WebDatasetCaptions(shards, source="laion")
    with caplog.at_level(logging.WARNING):
        samples = list(loader)
    assert pairs(samples) == [(IMG, "a red square"), (IMG, "two blue circles"), (IMG, "a green triangle")]
    assert samples[0].image.size == (24, 16) and samples[0].image.mode == "RGB"
    assert [s.meta["key"] for s in samples] == ["000000000", "000000001", "000010005"]
    (warning,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "laion: pass 0 skipped 3 of 6 records" in warning
    assert "bad json: 1" in warning and "missing jpg member: 1" in warning and "bad image: 1" in warning


def test_webdataset_stream_resumes_exactly(shards: str) -> None:
    loader = WebDatasetCaptions(shards, source="laion")
    run = list(islice(loader.stream(seed=5), 8))  # 3 good samples per pass: crosses two pass boundaries
    assert sorted(pairs([s for s, _ in run[:3]])) == sorted(pairs(list(loader)))
    for cut in (1, 2, 4):
        resumed = list(islice(loader.stream(seed=5, state=run[cut - 1][1]), 8 - cut))
        assert pairs([s for s, _ in resumed]) == pairs([s for s, _ in run[cut:]])


def test_all_bad_dataset_raises_after_one_pass(tmp_path: Path) -> None:
    write_shard(tmp_path / "bad.tar", [("k.json", b'{"caption": "no image"}')])
    with pytest.raises(NoUsableRecords, match="pass 0 yielded no usable sample: all 1 records were bad"):
        next(WebDatasetCaptions(str(tmp_path / "bad.tar")).stream(seed=0))
    write_json(tmp_path / "gqa.json", [{"image": "absent.jpg", "question": "q?", "answer": "a"}] * 3)
    with pytest.raises(NoUsableRecords, match=r"gqa: .*all 3 records were bad \(missing image: 3"):
        next(GQA(tmp_path / "gqa.json", tmp_path).stream(seed=0))


def test_cc_sbu_align(tmp_path: Path) -> None:
    write_json(tmp_path / "filter_cap.json", {"annotations": [{"image_id": "2", "caption": "A cat. On a mat!"}]})
    jpeg(tmp_path / "image" / "2.jpg")
    loader = CCSBUAlign(tmp_path)
    sample = loader.sample(0, random.Random(1))
    assert random.Random(1).choice(ALIGNMENT_PROMPTS) == ALIGNMENT_PROMPTS[1]
    assert pairs([sample]) == [(f"{IMG} Take a look at this image and describe what you notice.", "A cat. On a mat!")]
    assert {loader.sample(0, random.Random(s)).turns[0].instruction for s in range(40)} == set(ALIGNMENT_PROMPTS)


def test_textcaps(tmp_path: Path) -> None:
    ann = write_json(
        tmp_path / "TextCaps_0.1_train.json", {"data": [{"image_id": "0a1b", "caption_str": "A Sign: STOP!"}]}
    )
    jpeg(tmp_path / "train_images" / "0a1b.jpg")
    sample = TextCaps(ann, tmp_path / "train_images").sample(0, random.Random(3))
    assert random.Random(3).choice(CAPTION_PROMPTS) == "An image that shows "
    assert pairs([sample]) == [(f"{IMG} [caption] An image that shows", "a sign stop")]
    assert sample.task == "caption" and sample.source == "textcaps_caption"


# ---------------------------------------------------------------- VQA


def test_vqa_formats(tmp_path: Path) -> None:
    coco = tmp_path / "train2014"
    jpeg(coco / "COCO_train2014_000000000009.jpg")
    record = {
        "question_id": 7,
        "question": "What Color is the Cat?",
        "image": "train2014/COCO_train2014_000000000009.jpg",
    }
    vqa = VQA(write_json(tmp_path / "vqa.json", [{**record, "answer": ["Black."] * 10}]), coco)
    assert pairs([vqa.sample(0, random.Random(1))]) == [(f"{IMG} [vqa] what color is the cat?", "black")]
    long = f"{IMG} [vqa] Based on the image, respond to this question with a short answer: what color is the cat?"
    assert pairs([vqa.sample(0, random.Random(0))]) == [(long, "black")]
    aok = VQA(
        write_json(tmp_path / "aok.json", [{**record, "direct_answers": ["gray"] * 10, "choices": ["a", "b"]}]),
        coco,
        source="aok_vqa",
        answer_field="direct_answers",
    )
    assert aok.sample(0, random.Random(1)).turns[0].answer == "gray" and aok.source == "aok_vqa"
    jpeg(tmp_path / "gqa" / "n1234.jpg")
    gqa = GQA(write_json(tmp_path / "gqa.json", [{"image": "n1234.jpg", "question": "Is it Left?", "answer": "Left"}]),
              tmp_path / "gqa")  # fmt: skip
    assert pairs([gqa.sample(0, random.Random(1))]) == [(f"{IMG} [vqa] is it left?", "left")]


def test_vqa_answer_drawn_by_frequency() -> None:
    rng = random.Random(0)
    answers = ["yes"] * 7 + ["no"] * 2 + ["maybe"]
    draws = [weighted_answer(answers, rng) for _ in range(2000)]
    assert abs(draws.count("yes") / 2000 - 0.7) < 0.03
    assert abs(draws.count("no") / 2000 - 0.2) < 0.03
    assert abs(draws.count("maybe") / 2000 - 0.1) < 0.02


def test_missing_image_and_bad_record_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    coco = tmp_path / "train2014"
    jpeg(coco / "COCO_train2014_000000000001.jpg")
    (coco / "COCO_train2014_000000000003.jpg").write_bytes(b"truncated")
    good = {"question": "q?", "answer": ["a"], "image": "COCO_train2014_000000000001.jpg"}
    records = [good, {**good, "image": "COCO_train2014_000000000002.jpg"}, {"answer": ["a"], "image": "x.jpg"}]
    records += [{**good, "image": "COCO_train2014_000000000003.jpg"}, {**good, "answer": 5}]
    loader = VQA(write_json(tmp_path / "vqa.json", records), coco)
    assert len(loader) == 5
    with pytest.raises(BadRecord, match="missing image"):
        loader[1]
    with caplog.at_level(logging.WARNING):
        assert len(list(loader)) == 1
    (warning,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "coco_vqa: pass 0 skipped 4 of 5 records" in warning
    for part in ("missing image: 1", "missing field 'question': 1", "bad image: 1", "bad field 'answer': 1"):
        assert part in warning


def test_bad_json_lines_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    jpeg(tmp_path / "a.jpg")
    lines = [json.dumps({"image": "a.jpg", "question": "Q", "answer": "A"}), "{broken", ""]
    (tmp_path / "q.jsonl").write_text("\n".join(lines))
    with caplog.at_level(logging.WARNING):
        loader = GQA(tmp_path / "q.jsonl", tmp_path)
    assert len(loader) == 1 and "skipped 1 bad JSON line(s) of 2" in caplog.text


# ---------------------------------------------------------------- grounding


def write_refcoco(root: Path, dataset: str = "refcoco", split_by: str = "unc") -> None:
    refs = [
        {"ref_id": 1, "ann_id": 11, "image_id": 5, "category_id": 1, "split": "train",
         "sentences": [{"raw": "The Man on the LEFT.", "sent": "the man on the left", "tokens": [], "sent_id": 0}]},
        {"ref_id": 2, "ann_id": 11, "image_id": 5, "category_id": 1, "split": "val",
         "sentences": [{"raw": "val only", "sent": "val only", "tokens": [], "sent_id": 1}]},
    ]  # fmt: skip
    (root / dataset).mkdir(parents=True, exist_ok=True)
    (root / dataset / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    instances = {"images": [{"id": 5, "width": 200, "height": 100}], "categories": [{"id": 1, "name": "person"}],
                 "annotations": [{"id": 11, "image_id": 5, "bbox": [10, 20, 30, 40], "category_id": 1}]}  # fmt: skip
    write_json(root / dataset / "instances.json", instances)


def test_refcoco_refer_and_identify(tmp_path: Path) -> None:
    write_refcoco(tmp_path / "refcoco")
    coco = tmp_path / "train2014"
    jpeg(coco / "COCO_train2014_000000000005.jpg", size=(200, 100))
    refer = RefCOCO(tmp_path / "refcoco", coco)
    assert len(refer) == 1 and refer.source == "refcoco" and refer.task == "refer"  # the val ref is left out
    # 10/200, 20/100, 40/200, 60/100 of the grid
    assert pairs([refer.sample(0, random.Random(7))]) == [
        (f"{IMG} [refer] where is the man on the left ?", "{<5><20><20><60>}")
    ]
    assert pairs([refer.sample(0, random.Random(5))]) == [
        (f"{IMG} [refer] the location of the man on the left is", "{<5><20><20><60>}")
    ]
    assert refer.sample(0, random.Random(5)).meta["box"] == (5, 20, 20, 60)
    identify = RefCOCO(tmp_path / "refcoco", coco, inverse=True)
    assert identify.source == "invrefcoco" and identify.task == "identify"
    assert pairs([identify.sample(0, random.Random(7))]) == [
        (f"{IMG} [identify] identify the object present at this location {{<5><20><20><60>}}", "the man on the left")
    ]


def test_refcoco_refuses_a_pickle_with_a_class(tmp_path: Path) -> None:
    folder = tmp_path / "refcoco" / "refcoco+"
    write_refcoco(tmp_path / "refcoco", "refcoco+")
    (folder / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1, "evil": _Evil(tmp_path / "pwned")}]))
    with pytest.raises(PickleRefused, match=r"refs\(unc\)\.p: refusing to load global '\w+\.system'"):
        RefCOCO(tmp_path / "refcoco", tmp_path, dataset="refcoco+")
    assert not (tmp_path / "pwned").exists()


def test_visual_genome_regions(tmp_path: Path) -> None:
    vg = tmp_path / "visual_genome"
    jpeg(vg / "VG_100K_2" / "1.jpg", size=(200, 100))
    write_json(vg / "image_data.json", [{"image_id": 1, "url": "https://cs.stanford.edu/VG_100K_2/1.jpg"}])
    region = {"region_id": 10, "image_id": 1, "phrase": "A Red Ball.", "x": 20, "y": 10, "width": 40, "height": 30}
    too_big = [{**region, "region_id": 11, "width": 128, "height": 128}, {**region, "width": 200, "height": 100}]
    write_json(vg / "region_descriptions.json", [{"id": 1, "regions": [region, *too_big]}])
    loader = VisualGenomeRefer(vg)
    assert len(loader) == 1  # 128 * 128 = 16384 is not < 16384
    assert pairs([loader.sample(0, random.Random(7))]) == [
        (f"{IMG} [refer] where is a red ball ?", "{<10><10><30><40>}")
    ]


def test_flickr_formats(tmp_path: Path) -> None:
    images = tmp_path / "flickr30k-images"
    jpeg(images / "1000.jpg")
    grounded = "<p>A man</p> {<1><2><30><40>} rides <p>a horse</p> {<20><30><90><95>}."
    g = FlickrGroundedCaption(
        write_json(tmp_path / "g.json", [{"image_id": "1000", "grounded_caption": grounded}]), images
    )
    assert pairs([g.sample(0, random.Random(0))]) == [(f"{IMG} [grounding] give a thorough description of what you see in this image", grounded)]  # fmt: skip
    output = "<p>A man</p> {<1><2><30><40>}"
    c = FlickrCaptionToPhrase(
        write_json(tmp_path / "c.json", [{"image_id": 1000, "caption": "A Man riding.", "output": output}]), images
    )
    assert pairs([c.sample(0, random.Random(0))]) == [(f"{IMG} [detection] A Man riding.", output)]
    o = FlickrObjectToPhrase(
        write_json(tmp_path / "o.json", [{"image_id": "1000", "phrase": "a horse", "bbox": "{<20><30><90><95>}"}]),
        images,
    )
    assert pairs([o.sample(0, random.Random(0))]) == [
        (f"{IMG} [detection] a horse", "<p>a horse</p> {<20><30><90><95>}")
    ]
    assert (g.task, c.task, o.task) == ("grounding", "detection", "detection")


# ---------------------------------------------------------------- instructions


def llava_record(conversation: list[tuple[str, str]]) -> dict:
    messages = [m for q, a in conversation for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    return {"id": "000000033471", "image": "000000033471.jpg", "conversations": messages}


def test_llava_and_conversations(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    coco = tmp_path / "train2014"
    jpeg(coco / "COCO_train2014_000000033471.jpg")
    turns = [("<image>\nWhat is Unusual about this image?", "The man is ironing. On a car!"), ("Why? \n", "Because.")]
    ann = write_json(tmp_path / "llava.json", [llava_record(turns)])
    single = LlavaSingleTurn(ann, coco, source="llava_reason")
    assert pairs([single[0]]) == [(f"{IMG} what is unusual about this image?", "The man is ironing. On a car!")]
    odd = llava_record(turns)
    odd["conversations"] = odd["conversations"][:3]
    conv = Conversation(
        write_json(tmp_path / "conv.json", [llava_record(turns), odd]), coco, source="llava_conversation"
    )
    with caplog.at_level(logging.WARNING):
        (sample,) = list(conv)
    assert sample.turns == [
        Turn(f"{IMG} What is Unusual about this image?", "The man is ironing. On a car!"),
        Turn("Why?", "Because."),
    ]
    assert "bad conversation length: 1" in caplog.text


def test_unnatural_instructions(tmp_path: Path) -> None:
    records = [
        {"instances": [{"instruction_with_input": "Write the word: HELLO.", "constraints": "Use lowercase!", "output": "Hello."}]},
        {"instances": [{"instruction_with_input": "Say Hi", "constraints": None, "output": "Hi!"}]},
    ]  # fmt: skip
    samples = list(UnnaturalInstructions(write_json(tmp_path / "u.json", records)))
    assert pairs(samples) == [("write the word hello use lowercase", "hello"), ("say hi", "hi")]
    assert all(s.image is None for s in samples)


# ---------------------------------------------------------------- mixture


class Numbers(MapLoader):
    """Text-only records 0..n-1, for fast mixture tests; record 3 is bad when `bad` is set."""

    def __init__(self, n: int, source: str, bad: bool = False):
        super().__init__(list(range(n)))
        self.source, self.bad = source, bad

    def make(self, record: object, rng: random.Random) -> Sample:
        if self.bad and record == 3:
            raise BadRecord("missing image", "record 3")
        return Sample(None, [Turn(f"q{record}", str(rng.random()))], self.source)


def test_stream_passes_are_permutations_and_shard_by_rank() -> None:
    loader = Numbers(10, "n")
    first, second = (
        [int(s.turns[0].instruction[1:]) for s, _ in islice(loader.stream(seed=1), i, i + 10)] for i in (0, 10)
    )
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    shares = [
        {int(s.turns[0].instruction[1:]) for s, _ in islice(loader.stream(1, rank=r, world_size=2), 5)} for r in (0, 1)
    ]
    assert shares[0] | shares[1] == set(range(10)) and not shares[0] & shares[1]


def test_mixture_draws_in_proportion_with_own_batch_sizes() -> None:
    mix = Mixture({"a": (Numbers(7, "a"), 50, 1), "b": (Numbers(5, "b"), 30, 2), "c": (Numbers(3, "c"), 20, 3)}, seed=3)
    counts = {"a": 0, "b": 0, "c": 0}
    for name, batch in islice(mix, 2000):
        counts[name] += 1
        assert len(batch) == {"a": 1, "b": 2, "c": 3}[name] and all(s.source == name for s in batch)
    assert abs(counts["a"] / 2000 - 0.5) < 0.03
    assert abs(counts["b"] / 2000 - 0.3) < 0.03
    assert abs(counts["c"] / 2000 - 0.2) < 0.03


def test_mixture_resumes_exactly_from_its_state_dict(tmp_path: Path) -> None:
    coco = tmp_path / "train2014"
    jpeg(coco / "COCO_train2014_000000000001.jpg")
    good = {"question": "What?", "answer": ["yes", "no", "no"], "image": "COCO_train2014_000000000001.jpg"}
    vqa_path = write_json(tmp_path / "vqa.json", [good, {**good, "image": "absent.jpg"}, {**good, "question": "Who?"}])

    def make() -> Mixture:
        return Mixture({"n": (Numbers(6, "n", bad=True), 3, 2), "v": (VQA(vqa_path, coco), 1, 3)}, seed=11)

    def flat(batches: list) -> list:
        return [(name, pairs(batch)) for name, batch in batches]

    straight = make()
    list(islice(straight, 23))
    state = json.loads(json.dumps(straight.state_dict()))  # a checkpoint stores it as JSON
    expected = flat(list(islice(straight, 40)))
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.step == 23
    assert flat(list(islice(resumed, 40))) == expected
    again = make()
    assert flat(list(islice(again, 63)))[23:] == expected  # and both equal an uninterrupted run
    with pytest.raises(ValueError, match="belongs to rank 0 of 1, not rank 1 of 2"):
        Mixture({"n": (Numbers(6, "n"), 1, 1)}, seed=11, rank=1, world_size=2).load_state_dict(state)


def test_build_stage4_mixture_takes_the_present_datasets(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert sum(r for _, r, _ in STAGE4) == 690 and len(STAGE4) == 20
    with pytest.raises(FileNotFoundError, match="no stage-4 dataset found"):
        build_stage4_mixture(tmp_path)
    jpeg(tmp_path / "gqa" / "images" / "n1.jpg")
    write_json(
        tmp_path / "gqa" / "train_balanced_questions.json", [{"image": "n1.jpg", "question": "Q", "answer": "A"}]
    )
    write_refcoco(tmp_path, "refcocog", "umd")
    jpeg(tmp_path / "train2014" / "COCO_train2014_000000000005.jpg", size=(200, 100))
    with caplog.at_level(logging.INFO):
        mix = build_stage4_mixture(tmp_path, seed=1)
    assert mix.names == ["refcocog", "invrefcocog", "gqa"]
    assert mix.probabilities() == {"refcocog": 25 / 85, "invrefcocog": 10 / 85, "gqa": 50 / 85}
    assert "leaving out llava_detail (ratio 20)" in caplog.text
    name, batch = next(mix)
    assert len(batch) == 3 and {s.source for s in batch} == {name}
