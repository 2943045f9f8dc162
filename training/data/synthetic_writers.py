"""Writers of the real datasets' on-disk formats for a split of the synthetic world (reference §4).

The demo trains through the same loaders as real data, so a split is written as those datasets are laid out:

    synthetic.json                                  what was written: seed, split, n, image size, formats, entry counts
    stage1  shards/{00000..0000N}.tar               webdataset: <key>.jpg, <key>.json {"caption", "key", ...}, <key>.txt
    stage3  cc_sbu_align/filter_cap.json            {"annotations": [{"image_id": "100000007", "caption": detailed}]}
            cc_sbu_align/image/<image_id>.jpg
    stage4  train2014/COCO_train2014_<012d>.jpg     images of LLaVA, COCO-VQA and RefCOCO
            llava/detail_23k.json, llava/complex_reasoning_77k.json, llava/conversation_58k.json
                                                    [{"id": "<012d>", "image", "conversations": [{"from", "value"}]}]
            multitask_conversation/multitask_conversation.json   same schema, tagged turns ([vqa], [refer], [identify])
            coco_vqa/vqa_train.json                 [{"question_id", "question", "answer": [10], "image": "train2014/..."}]
            gqa/train_balanced_questions.json       [{"image": "<id>.jpg", "question", "answer", "question_id"}]
            gqa/images/<id>.jpg
            refcoco/refs(unc).p, refcoco/instances.json    REFER's pickle (plain dicts only) + COCO-style instances
            flickr/<image_id>.jpg, flickr/groundedcaption.json, flickr/captiontobbox.json, flickr/phrasetobbox.json
    eval    eval/synthetic_<split>.json             [{"question_id", "image": "train2014/...", "task", "type", "question",
                                                      "prompt", "answer", "gt_box", "bbox", "width", "height", ...}]
            eval/refcoco_<split>.json               [{"img_id": "COCO_train2014_<012d>_<k>", "sents", "bbox", "height", "width"}]
            gqa/testdev_balanced_questions.json     [{"image", "question", "answer", "question_id"}], images in gqa/images/
            train2014/...                           the images eval/*.json point at
    requests requests.jsonl, images/<image_id>.jpg, drawn/
                                            held-out questions for `python -m runtime --batch` (one per image:
                                            VQA, caption, refer; see training/data/synthetic_requests.py)

File names do not depend on the split (the folder is the split), except the eval files, whose originals carry it.
`all` means every dataset format (FORMATS); `requests` is for the runtime's demo and is written only when named.
Everything is deterministic: the same world and split give byte-identical files (tar members have mtime 0).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from core.boxes import format_box, format_grounded
from training.data.synthetic_requests import DRAWN_DIR, IMAGES_DIR, REQUESTS_FILE, plan, request
from training.data.synthetic_scene import Scene
from training.data.synthetic_tasks import (
    LLAVA_DETAIL_QUESTIONS,
    QUESTION_TYPES,
    caption_to_boxes,
    detailed_caption,
    detection_targets,
    grounded_caption,
    llava_conversation,
    pick_question,
    reason_qa,
    referring_phrases,
    short_caption,
    tagged_conversation,
    vqa_candidates,
)

if TYPE_CHECKING:
    from training.data.synthetic import SyntheticWorld

logger = logging.getLogger(__name__)

FORMATS = ("stage1", "stage3", "stage4", "eval")  # `all`
EXTRA_FORMATS = ("requests",)  # written only when named
JPEG_QUALITY = 95  # high, so that colours survive compression
CATEGORIES = [
    {"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(("circle", "square", "triangle", "star"))
]
CATEGORY_IDS = {c["name"]: c["id"] for c in CATEGORIES}
EVAL_PROMPTS = {  # fixed prompts for evaluation, as the original's eval scripts use
    "vqa": "[vqa] Based on the image, respond to this question with a short answer: {}",
    "refer": "[refer] give me the location of {}",
    "identify": "[identify] what object is in this location {}",
}


class OutputExistsError(FileExistsError):
    """The output folder exists and is not empty, and overwriting was not asked for."""


def parse_formats(text: str) -> tuple[str, ...]:
    """`all` or a comma list of FORMATS and EXTRA_FORMATS (`all` among them: every one of FORMATS) -> canonical order."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    known = FORMATS + EXTRA_FORMATS
    if "all" in names:
        names = [n for n in names if n != "all"] + list(FORMATS)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown format(s) {unknown or [text]}; use 'all' or a comma list of {', '.join(known)}")
    return tuple(f for f in known if f in names)


def encode_jpeg(scene: Scene, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    scene.image.save(buffer, format="JPEG", quality=quality, subsampling=0)  # 4:4:4 keeps small shapes' colours
    return buffer.getvalue()


def coco_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def _human_gpt(pairs: list[tuple[str, str]]) -> list[dict]:
    turns = []
    for k, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": f"<image>\n{question}" if k == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return turns


class _ShardWriter:
    """Webdataset tar shards written with tarfile, deterministic (fixed mtime, owner and order)."""

    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder, self.shard_size, self.count, self.tar = folder, shard_size, 0, None
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, jpeg: bytes, caption: str, width: int, height: int) -> None:
        shard, pos = divmod(self.count, self.shard_size)
        if pos == 0:
            self.close()
            self.tar = tarfile.open(self.folder / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT)
        key = f"{shard:05d}{pos:04d}"  # img2dataset's key: shard then position
        meta = {"caption": caption, "key": key, "status": "success", "width": width, "height": height}
        for suffix, data in (("jpg", jpeg), ("json", json.dumps(meta).encode()), ("txt", caption.encode())):
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


class _ImageCopies:
    """One image's JPEG under several dataset folders: written once, hard-linked elsewhere (copied where links fail)."""

    def __init__(self, jpeg: bytes) -> None:
        self.jpeg, self.first = jpeg, None

    def put(self, path: Path) -> None:
        if self.first is not None:
            try:
                os.link(self.first, path)
                return
            except OSError:
                pass
        path.write_bytes(self.jpeg)
        self.first = self.first or path


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False))


def _one_per_type(scene: Scene, world: SyntheticWorld, purpose: str) -> list:
    rng = world.rng(scene.index, scene.split, purpose)
    candidates = vqa_candidates(scene)
    return [pick_question(candidates, rng, qtype) for qtype in QUESTION_TYPES if candidates[qtype]]


def _write_files(
    world: SyntheticWorld, split: str, n: int, root: Path, formats: tuple[str, ...], shard_size: int
) -> dict:
    lists: dict[str, list] = {}  # relative path -> entries

    def add(rel: str, entry: object) -> None:
        lists.setdefault(rel, []).append(entry)

    shards = _ShardWriter(root / "shards", shard_size) if "stage1" in formats else None
    folders = {
        "train2014": "stage4" in formats or "eval" in formats,
        "gqa/images": "stage4" in formats or "eval" in formats,
    }
    folders |= {"cc_sbu_align/image": "stage3" in formats, "flickr": "stage4" in formats}
    for folder, wanted in folders.items():
        if wanted:
            (root / folder).mkdir(parents=True, exist_ok=True)
    refs: list[dict] = []
    instances: dict = {"images": [], "annotations": [], "categories": CATEGORIES}
    requests, planned = [], list(plan(n)) if "requests" in formats else []
    if planned:
        (root / IMAGES_DIR).mkdir()
        (root / DRAWN_DIR).mkdir()
    for index in range(n):
        scene = world.scene(index, split)
        image_id, w, h = world.image_id(index, split), scene.width, scene.height
        jpeg, caption = encode_jpeg(scene), short_caption(scene)
        images = _ImageCopies(jpeg)
        coco_file = coco_name(image_id)
        if folders["train2014"]:
            images.put(root / "train2014" / coco_file)
            images.put(root / "gqa/images" / f"{image_id}.jpg")
        if shards is not None:
            shards.add(jpeg, caption, w, h)
        if "stage3" in formats:
            images.put(root / "cc_sbu_align/image" / f"{image_id}.jpg")
            add("cc_sbu_align/filter_cap.json", {"image_id": str(image_id), "caption": detailed_caption(scene)})
        if "stage4" in formats:
            _add_stage4(world, scene, image_id, images, root, add, refs, instances)
        if "eval" in formats:
            _add_eval(world, scene, image_id, add)
        if planned:
            images.put(root / IMAGES_DIR / f"{image_id}.jpg")
            _, task, qtype = planned[index]
            requests.append(request(scene, image_id, task, qtype, world.rng(index, split, "requests")))
    if shards is not None:
        shards.close()
    counts = {}
    for rel, entries in lists.items():
        _write_json(root / rel, {"annotations": entries} if rel == "cc_sbu_align/filter_cap.json" else entries)
        counts[rel] = len(entries)
    if "stage4" in formats:
        (root / "refcoco").mkdir()
        with open(root / "refcoco" / "refs(unc).p", "wb") as f:
            pickle.dump(refs, f, protocol=4)  # plain dicts, lists, str and int: a restricted unpickler reads it
        _write_json(root / "refcoco" / "instances.json", instances)
        counts["refcoco/refs(unc).p"], counts["refcoco/instances.json"] = len(refs), len(instances["annotations"])
    if shards is not None:
        counts["shards"] = shards.count
    if planned:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests)
        (root / REQUESTS_FILE).write_text(lines, encoding="utf-8")
        counts[REQUESTS_FILE] = len(requests)
    return counts


def _add_stage4(
    world, scene: Scene, image_id: int, images: _ImageCopies, root: Path, add, refs: list, instances: dict
) -> None:
    index, split, w, h = scene.index, scene.split, scene.width, scene.height
    llava = {"id": f"{image_id:012d}", "image": coco_name(image_id)}
    detail_q = world.rng(index, split, "llava_detail").choice(LLAVA_DETAIL_QUESTIONS)
    add("llava/detail_23k.json", {**llava, "conversations": _human_gpt([(detail_q, detailed_caption(scene))])})
    add(
        "llava/complex_reasoning_77k.json",
        {**llava, "conversations": _human_gpt([reason_qa(scene, world.rng(index, split, "llava_reason"))])},
    )
    pairs = llava_conversation(scene, world.rng(index, split, "llava_conversation"))
    add("llava/conversation_58k.json", {**llava, "conversations": _human_gpt(pairs)})
    tagged = [(q, a) for q, a, _ in tagged_conversation(scene, world.rng(index, split, "multitask_conversation"))]
    add("multitask_conversation/multitask_conversation.json", {**llava, "conversations": _human_gpt(tagged)})
    for k, qa in enumerate(_one_per_type(scene, world, "coco_vqa")):
        entry = {"question_id": image_id * 10 + k, "question": qa.question, "answer": [qa.answer] * 10}
        add("coco_vqa/vqa_train.json", {**entry, "image": f"train2014/{coco_name(image_id)}"})
    for k, qa in enumerate(_one_per_type(scene, world, "gqa")):
        entry = {"image": f"{image_id}.jpg", "question": qa.question, "answer": qa.answer}
        add("gqa/train_balanced_questions.json", {**entry, "question_id": str(image_id * 10 + k)})
    instances["images"].append({"id": image_id, "file_name": coco_name(image_id), "width": w, "height": h})
    for k, obj in enumerate(scene.objects):
        ann_id = image_id * 10 + k
        x, y, bw, bh = obj.bbox
        instances["annotations"].append(
            {"id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[obj.shape], "bbox": [x, y, bw, bh],
             "area": bw * bh, "iscrowd": 0, "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]}
        )  # fmt: skip
        sentences = [
            {"raw": p, "sent": p, "tokens": p.split(), "sent_id": ann_id * 10 + j}
            for j, p in enumerate(referring_phrases(scene, obj)[:3])
        ]
        refs.append(
            {"ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "category_id": CATEGORY_IDS[obj.shape],
             "split": split, "file_name": f"{coco_name(image_id)[:-4]}_{ann_id}.jpg", "sentences": sentences,
             "sent_ids": [s["sent_id"] for s in sentences]}
        )  # fmt: skip
    images.put(root / "flickr" / f"{image_id}.jpg")
    add("flickr/groundedcaption.json", {"image_id": str(image_id), "grounded_caption": grounded_caption(scene)})
    add(
        "flickr/captiontobbox.json",
        {"image_id": str(image_id), "caption": short_caption(scene), "output": caption_to_boxes(scene)},
    )
    for phrase, boxes in detection_targets(scene):
        bbox = format_grounded(phrase, boxes).split("</p> ", 1)[1]  # the `{<..>}<delim>{<..>}` part alone
        add("flickr/phrasetobbox.json", {"image_id": str(image_id), "phrase": phrase, "bbox": bbox})


def _add_eval(world, scene: Scene, image_id: int, add) -> None:
    w, h, split = scene.width, scene.height, scene.split
    common = {"image": f"train2014/{coco_name(image_id)}", "image_id": image_id, "width": w, "height": h}
    qas = _one_per_type(scene, world, "eval")
    for k, qa in enumerate(qas):
        entry = {"question_id": image_id * 10 + k, **common, "task": "vqa", "type": qa.qtype, "question": qa.question}
        add(
            f"eval/synthetic_{split}.json",
            {
                **entry,
                "prompt": EVAL_PROMPTS["vqa"].format(qa.question),
                "answer": qa.answer,
                "gt_box": None,
                "bbox": None,
            },
        )
        gqa = {
            "image": f"{image_id}.jpg",
            "question": qa.question,
            "answer": qa.answer,
            "question_id": str(image_id * 10 + k),
        }
        add("gqa/testdev_balanced_questions.json", gqa)
    rng = world.rng(scene.index, split, "eval_refer")
    for task, k in (("refer", len(qas)), ("identify", len(qas) + 1)):
        obj = rng.choice(scene.objects)
        box, phrase = list(obj.grid_box(w, h)), rng.choice(referring_phrases(scene, obj))
        question, answer = (phrase, format_box(box)) if task == "refer" else (format_box(box), obj.name)
        entry = {"question_id": image_id * 10 + k, **common, "task": task, "type": task, "question": question}
        add(
            f"eval/synthetic_{split}.json",
            {
                **entry,
                "prompt": EVAL_PROMPTS[task].format(question),
                "answer": answer,
                "gt_box": box,
                "bbox": list(obj.bbox),
            },
        )
    for k, obj in enumerate(scene.objects):
        entry = {"img_id": f"{coco_name(image_id)[:-4]}_{k}", "sents": referring_phrases(scene, obj)[0]}
        add(f"eval/refcoco_{split}.json", {**entry, "bbox": list(obj.bbox), "height": h, "width": w})


def write_split(
    world: SyntheticWorld,
    split: str,
    n: int,
    out: str | Path,
    formats: tuple[str, ...] = FORMATS,
    shard_size: int = 1000,
    force: bool = False,
) -> dict:
    """Write images 0..n-1 of `split` to `out` in `formats`, atomically (a temporary folder renamed at the end).

    Returns the manifest also written as `out/synthetic.json`.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputExistsError(f"{out} exists and is not empty; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the renamed folder should read like any other
    try:
        counts = _write_files(world, split, n, tmp, tuple(formats), shard_size)
        manifest = {"version": 1, "seed": world.seed, "split": split, "n": n, "image_size": world.image_size,
                    "formats": list(formats), "jpeg_quality": JPEG_QUALITY, "counts": dict(sorted(counts.items()))}  # fmt: skip
        _write_json(tmp / "synthetic.json", manifest)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "wrote %d %s images to %s: %s", n, split, out, ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
    )
    return manifest
