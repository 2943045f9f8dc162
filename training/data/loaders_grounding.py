"""Grounding data of stage 4: RefCOCO / RefCOCO+ / RefCOCOg (refer and the inverse identify), Visual Genome regions,
Flickr30k grounded captions and detections.

    refcoco = RefCOCO("data", "data/train2014", dataset="refcoco", split_by="unc")            # [refer]
    invrefcocog = RefCOCO("data", "data/train2014", dataset="refcocog", split_by="umd", inverse=True)  # [identify]
    refvg = VisualGenomeRefer("visual_genome")
    grounded = FlickrGroundedCaption("flickr/groundedcaption.json", "flickr")

Boxes are written on the 0-100 grid of the ORIGINAL image (`core.boxes.box_to_grid` on the decoded image's size, then
`format_box`), as the original does. RefCOCO reads `<ann_root>/<dataset>/refs(<split_by>).p` with a restricted
unpickler (plain data only, `training.data.safe_pickle`) and `<ann_root>/<dataset>/instances.json`; only refs with
split "train" are kept; one of the ref's sentences (`raw`, through `caption_text`) is drawn per sample. Visual Genome
reads `region_descriptions.json` and `image_data.json` directly (no `visual_genome` package) and keeps regions with
width * height < 16384 pixels, as the original ("OFA practice"); the image path is the last two parts of the image's
URL under the data folder (`VG_100K/1.jpg`). Flickr fields are used as written (no caption_text), and the phrase->box
file's `bbox` is already a box string. The template is always the first draw from the sample's rng.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from core.boxes import box_to_grid, format_box
from core.prompts import with_image
from training.data.loaders_base import BadRecord, MapLoader, need, open_image, read_json_records
from training.data.safe_pickle import load_plain_pickle
from training.data.sample import Sample, Turn
from training.data.text import (
    DETECTION_TEMPLATE,
    GROUNDING_TEMPLATES,
    IDENTIFY_TEMPLATES,
    REFER_TEMPLATES,
    caption_text,
)

logger = logging.getLogger(__name__)

VG_MAX_REGION_AREA = 16384  # pixels; larger regions are left out of refer training


def _grid_box(xywh: object, width: int, height: int) -> tuple[int, int, int, int]:
    if not isinstance(xywh, (list, tuple)) or len(xywh) != 4:
        raise BadRecord("bad box", repr(xywh)[:80])
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xywh):
        raise BadRecord("bad box", repr(xywh)[:80])
    return box_to_grid(*xywh, width, height)


class RefCOCO(MapLoader):
    """RefCOCO / RefCOCO+ / RefCOCOg train refs: `[refer] {phrase}` -> box, or (inverse) `[identify] {box}` -> phrase."""

    def __init__(
        self,
        ann_root: str | Path,
        image_dir: str | Path,
        dataset: str = "refcoco",
        split_by: str = "unc",
        inverse: bool = False,
        source: str | None = None,
        seed: int = 0,
    ):
        folder = Path(ann_root) / dataset
        refs = load_plain_pickle(folder / f"refs({split_by}).p")
        if not isinstance(refs, list):
            raise ValueError(f"{folder / f'refs({split_by}).p'}: expected a list of refs, found {type(refs).__name__}")
        instances = read_json_records(folder / "instances.json", unwrap="annotations")
        self.boxes = {ann["id"]: ann.get("bbox") for ann in instances if isinstance(ann, dict) and "id" in ann}
        super().__init__([ref for ref in refs if isinstance(ref, dict) and ref.get("split") == "train"], seed)
        self.image_dir = Path(image_dir)
        self.inverse = inverse
        self.task = "identify" if inverse else "refer"
        default = {"refcoco": "refcoco", "refcoco+": "refcocop", "refcocog": "refcocog"}.get(dataset, dataset)
        self.source = source or (f"inv{default}" if inverse else default)

    def make(self, record: object, rng: random.Random) -> Sample:
        template = rng.choice(IDENTIFY_TEMPLATES if self.inverse else REFER_TEMPLATES)
        sentences = need(record, "sentences", list)
        if not sentences:
            raise BadRecord("bad field 'sentences'", "empty list")
        phrase = caption_text(need(rng.choice(sentences), "raw", str))
        ann_id = need(record, "ann_id", (int, str))
        if ann_id not in self.boxes:
            raise BadRecord("ann_id not in instances.json", str(ann_id))
        image_id = need(record, "image_id", (int, str))
        image = open_image(self.image_dir / f"COCO_train2014_{image_id!s:0>12}.jpg")
        grid = _grid_box(self.boxes[ann_id], *image.size)
        box = format_box(grid)
        turn = (
            Turn(with_image(template.format(box)), phrase)
            if self.inverse
            else Turn(with_image(template.format(phrase)), box)
        )
        meta = {"box": grid, "phrase": phrase, "ref_id": record.get("ref_id"), "image_id": image_id}
        return Sample(image, [turn], self.source, self.task, meta=meta)


class VisualGenomeRefer(MapLoader):
    """Visual Genome region descriptions as `[refer] {phrase}` -> box, regions under 16384 pixels only."""

    source = "refvg"
    task = "refer"

    def __init__(self, data_dir: str | Path, seed: int = 0):
        self.data_dir = Path(data_dir)
        urls = {}
        for image in read_json_records(self.data_dir / "image_data.json"):
            if isinstance(image, dict) and isinstance(image.get("url"), str):
                urls[image.get("image_id", image.get("id"))] = image["url"]
        regions, malformed = [], 0
        for entry in read_json_records(self.data_dir / "region_descriptions.json"):
            for region in entry.get("regions", []) if isinstance(entry, dict) else []:
                size = (region.get("width"), region.get("height")) if isinstance(region, dict) else (None, None)
                if not all(isinstance(v, (int, float)) for v in size):
                    malformed += 1
                elif size[0] * size[1] < VG_MAX_REGION_AREA:
                    regions.append(region)
        if malformed:
            logger.warning("%s: left out %d region(s) without a numeric width and height", self.data_dir, malformed)
        super().__init__(regions, seed)
        self.urls = urls

    def make(self, record: object, rng: random.Random) -> Sample:
        template = rng.choice(REFER_TEMPLATES)
        phrase = caption_text(need(record, "phrase", str))
        image_id = need(record, "image_id", (int, str))
        if image_id not in self.urls:
            raise BadRecord("image_id not in image_data.json", str(image_id))
        image = open_image(self.data_dir.joinpath(*self.urls[image_id].split("/")[-2:]))
        xywh = [need(record, k, (int, float)) for k in ("x", "y", "width", "height")]
        grid = _grid_box(xywh, *image.size)
        meta = {"box": grid, "phrase": phrase, "region_id": record.get("region_id"), "image_id": image_id}
        return Sample(
            image, [Turn(with_image(template.format(phrase)), format_box(grid))], self.source, self.task, meta
        )


class _Flickr(MapLoader):
    """Filtered Flickr30k of MiniGPT-v2: a JSON list, images at `<image_dir>/<image_id>.jpg`."""

    def __init__(self, ann_path: str | Path, image_dir: str | Path, seed: int = 0):
        super().__init__(read_json_records(ann_path), seed)
        self.image_dir = Path(image_dir)

    def turn(self, record: object, rng: random.Random) -> Turn:
        raise NotImplementedError

    def make(self, record: object, rng: random.Random) -> Sample:
        turn = self.turn(record, rng)
        image_id = need(record, "image_id", (int, str))
        image = open_image(self.image_dir / f"{image_id}.jpg")
        return Sample(image, [turn], self.source, self.task, meta={"image_id": image_id})


class FlickrGroundedCaption(_Flickr):
    """groundedcaption.json {image_id, grounded_caption}: `[grounding] please describe ...` -> the grounded caption."""

    source = "flickr_grounded_caption"
    task = "grounding"

    def turn(self, record: object, rng: random.Random) -> Turn:
        return Turn(with_image(rng.choice(GROUNDING_TEMPLATES)), need(record, "grounded_caption", str))


class FlickrCaptionToPhrase(_Flickr):
    """captiontobbox.json {image_id, caption, output}: `[detection] {caption}` -> output (phrases with boxes)."""

    source = "flickr_CaptionToPhrase"
    task = "detection"

    def turn(self, record: object, rng: random.Random) -> Turn:
        caption = need(record, "caption", str)
        return Turn(with_image(DETECTION_TEMPLATE.format(caption)), need(record, "output", str))


class FlickrObjectToPhrase(_Flickr):
    """phrasetobbox.json {image_id, phrase, bbox}: `[detection] {phrase}` -> `<p>{phrase}</p> {bbox}`."""

    source = "flickr_ObjectToPhrase"
    task = "detection"

    def turn(self, record: object, rng: random.Random) -> Turn:
        phrase, box = need(record, "phrase", str), need(record, "bbox", str)
        return Turn(with_image(DETECTION_TEMPLATE.format(phrase)), f"<p>{phrase}</p> {box}")
