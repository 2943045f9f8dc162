"""Caption data: LAION / CC / SBU webdataset shards (stages 1-2), cc_sbu_align (stage 3), TextCaps (stage 4).

    laion = WebDatasetCaptions("/data/laion/{00000..05244}.tar", source="laion")
    for sample in laion: ...                       # one pass, shards in order
    align = CCSBUAlign("/data/cc_sbu_align")       # filter_cap.json + image/<image_id>.jpg
    caps = TextCaps("/data/textcaps/TextCaps_0.1_train.json", "/data/textcaps/train_images")

Webdataset shards are read with `tarfile` (no webdataset dependency). Members are grouped into samples by key, as
webdataset does: `dir/000123.jpg`, `dir/000123.json`, `dir/000123.txt` form sample `dir/000123`. A sample needs the
`jpg` image and the `json` metadata, whose `caption` (processed by `caption_text`) is the answer; the instruction is
the image alone. The original reads shards with `ResampledShards` (random shards with replacement) and a 1,000-sample
shuffle buffer; ours visits every shard once per pass in a seeded order and reads each shard front to back, so a
stream position is (pass, shard, samples read) and resumes exactly. Across processes the shards are divided, not the
samples. A missing or corrupt shard is skipped and counted like a bad record.
"""

from __future__ import annotations

import json
import random
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from core.image import ImageError, load_image
from core.prompts import IMAGE_TEXT, with_image
from training.data.loaders_base import BadRecord, Loader, MapLoader, PassCounter, need, open_image, read_json_records
from training.data.sample import Sample, Turn
from training.data.text import ALIGNMENT_PROMPTS, CAPTION_PROMPTS, caption_text

_BRACE = re.compile(r"\{([^{}]*)\}")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext: key up to the first dot of the name
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the original wants "jpg"; the others are accepted in its place


def expand_braces(pattern: str) -> list[str]:
    """`a/{00000..00002}.tar` -> a/00000.tar, a/00001.tar, a/00002.tar; `{x,y}` lists; several groups multiply."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    if ".." in body:
        low, high = body.split("..", 1)
        if not (low.isdigit() and high.isdigit()):
            raise ValueError(f"brace range {{{body}}} in {pattern!r} must be two non-negative integers, like {{0..9}}")
        # zero-padded like the shard names when either end is written with a leading zero
        width = max(len(low), len(high)) if low.startswith("0") or high.startswith("0") else 0
        step = 1 if int(high) >= int(low) else -1
        items = [str(i).zfill(width) for i in range(int(low), int(high) + step, step)]
    else:
        items = body.split(",")
    return [path for item in items for path in expand_braces(head + item + tail)]


def _tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each run of consecutive members sharing a key. Raises tarfile.TarError when corrupt."""
    key, group = None, {}
    with tarfile.open(path, "r|*") as tar:  # streaming: one sequential read, as webdataset does
        for member in tar:
            if not member.isfile():
                continue
            match = _KEY_EXT.match(member.name)
            if match is None or Path(member.name).name.startswith("."):
                continue
            member_key, ext = match.group(1), match.group(2).lower()
            if member_key != key and group:
                yield key, group
                group = {}
            key = member_key
            handle = tar.extractfile(member)
            group[ext] = handle.read() if handle is not None else b""
    if group:
        yield key, group


class WebDatasetCaptions(Loader):
    """LAION / CC3M+CC12M+SBU image-caption shards (img2dataset output): `jpg` + `json` with a `caption`."""

    def __init__(self, shards: str | Sequence[str], source: str = "laion"):
        patterns = [shards] if isinstance(shards, str) else list(shards)
        self.shards = [Path(p) for pattern in patterns for part in pattern.split("::") for p in expand_braces(part)]
        if not self.shards:
            raise ValueError(f"{source}: no shard paths in {shards!r}")
        self.source = source

    def _sample(self, shard: Path, key: str, group: dict[str, bytes]) -> Sample:
        image_bytes = next((group[ext] for ext in IMAGE_EXTS if ext in group), None)
        if image_bytes is None:
            raise BadRecord("missing jpg member", f"{shard}:{key} has {sorted(group)}")
        if "json" not in group:
            raise BadRecord("missing json member", f"{shard}:{key} has {sorted(group)}")
        try:
            meta = json.loads(group["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadRecord("bad json", f"{shard}:{key}.json: {err}") from None
        caption = need(meta, "caption", str)
        try:
            image = load_image(image_bytes)
        except ImageError as err:
            raise BadRecord("bad image", f"{shard}:{key}: {err}") from None
        turn = Turn(instruction=IMAGE_TEXT, answer=caption_text(caption))
        return Sample(image=image, turns=[turn], source=self.source, meta={"shard": shard.name, "key": key})

    def _read_shard(self, shard: Path, counter: PassCounter, skip: int = 0) -> Iterator[tuple[Sample, int]]:
        """(sample, samples read so far in this shard), the first `skip` samples passed over without decoding."""
        if not shard.is_file():
            counter.skip(BadRecord("missing shard", str(shard)))
            return
        read = 0
        try:
            for key, group in _tar_samples(shard):
                read += 1
                if read <= skip:
                    continue
                try:
                    sample = self._sample(shard, key, group)
                except BadRecord as err:
                    counter.skip(err)
                    continue
                counter.good += 1
                yield sample, read
        except (tarfile.TarError, OSError, EOFError) as err:
            counter.skip(BadRecord("corrupt shard", f"{shard} after {read} samples: {err}"))

    def __iter__(self) -> Iterator[Sample]:
        counter = PassCounter(self.source)
        for shard in self.shards:
            for sample, _ in self._read_shard(shard, counter):
                yield sample
        counter.finish(self.epoch)

    def stream(
        self, seed: int | str, state: dict | None = None, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[Sample, dict]]:
        state = dict(state or {"epoch": 0, "shard": 0, "offset": 0})
        epoch, start, skip = int(state["epoch"]), int(state["shard"]), int(state["offset"])
        counter = PassCounter(self.source)
        resumed = start > 0 or skip > 0
        while True:
            order = list(self.shards)
            random.Random(f"{seed}/order/{epoch}").shuffle(order)
            order = order[rank::world_size]
            for position in range(start, len(order)):
                for sample, read in self._read_shard(order[position], counter, skip):
                    yield sample, {"epoch": epoch, "shard": position, "offset": read}
                skip = 0
            counter.finish(epoch, resumed=resumed)
            epoch, start, resumed = epoch + 1, 0, False


class CCSBUAlign(MapLoader):
    """cc_sbu_align (stage 3): `filter_cap.json` {"annotations": [{image_id, caption}]} + `image/<image_id>.jpg`.

    The instruction is one of the four alignment prompts; the caption is used as written (no caption_text).
    The original draws one prompt per batch; we draw one per sample.
    """

    source = "cc_sbu_align"

    def __init__(self, root: str | Path, seed: int = 0):
        self.root = Path(root)
        super().__init__(read_json_records(self.root / "filter_cap.json", unwrap="annotations"), seed)

    def make(self, record: object, rng: random.Random) -> Sample:
        instruction = rng.choice(ALIGNMENT_PROMPTS)
        image_id = need(record, "image_id", (str, int))
        caption = need(record, "caption", str)
        image = open_image(self.root / "image" / f"{image_id}.jpg")
        return Sample(image, [Turn(instruction, caption)], self.source, meta={"image_id": image_id})


class TextCaps(MapLoader):
    """TextCaps: `{"data": [{image_id, caption_str}]}`, image `<image_dir>/<image_id>.jpg`; `[caption]` + 17 prompts."""

    source = "textcaps_caption"
    task = "caption"

    def __init__(self, ann_path: str | Path, image_dir: str | Path, seed: int = 0):
        self.image_dir = Path(image_dir)
        super().__init__(read_json_records(ann_path, unwrap="data"), seed)

    def make(self, record: object, rng: random.Random) -> Sample:
        instruction = with_image(f"[caption] {rng.choice(CAPTION_PROMPTS)}")
        image_id = need(record, "image_id", (str, int))
        caption = caption_text(need(record, "caption_str", str))
        image = open_image(self.image_dir / f"{image_id}.jpg")
        return Sample(image, [Turn(instruction, caption)], self.source, self.task, meta={"image_id": image_id})
