"""What every real-format loader shares: skipping bad records with counts, seeded passes, and resumable streams.

The choice, for all loaders alike:
- A loader over an indexable format (a JSON list, a pickle of refs) is a `MapLoader`: `len(loader)` records and
  `loader[i] -> Sample`, so a sampler can shard it across processes by index. `loader[i]` raises `BadRecord` for a
  missing image or a malformed record; its template choice uses a `random.Random` seeded from (seed, epoch, i), so the
  same index gives the same sample until `set_epoch` changes the epoch. `loader.sample(i, rng)` takes the rng directly.
- The webdataset tar shards of stages 1-2 are not indexable without reading every shard, so that loader is iterable
  only; it shards across processes by tar file.
- Every loader has `stream(seed, state=None, rank=0, world_size=1)`: an endless generator of `(sample, state)` that
  walks the data pass after pass in a seeded order (pass e shuffled by (seed, e)), this process's share only
  (`[rank::world_size]`). `state` is a small JSON-able dict; `stream(seed, state)` continues with exactly the sample
  that followed it. This is what `Mixture` uses, and what makes a resumed training read the same next batch.
- Iterating a loader (`for sample in loader`) is one pass in file order, epoch `loader.epoch`.

Bad records (a missing image, an undecodable image, a missing field, a bad JSON line) are skipped and counted per
reason; at the end of each pass one warning gives the counts, with an example per reason. A pass in which no record
at all was usable raises `NoUsableRecords` instead of looping forever.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from core.image import ImageError, load_image
from training.data.sample import Sample

logger = logging.getLogger(__name__)

# A record error that is the data's fault, not ours: skipped and counted.
_MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError)


class BadRecord(Exception):
    """One record that cannot be used. `reason` groups the counts ("missing image", "missing field 'caption'")."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class NoUsableRecords(RuntimeError):
    """A whole pass over a dataset yielded nothing: every record was bad, or there were none."""


def sample_rng(seed: int | str, epoch: int, key: int | str) -> random.Random:
    """The rng of one sample: the same (seed, epoch, record) always makes the same template choice, in any process."""
    return random.Random(f"{seed}/{epoch}/{key}")  # str seeds hash with SHA-512: stable across runs and machines


def open_image(path: Path) -> Image.Image:
    """Decode an image file to RGB, or raise BadRecord("missing image" | "bad image")."""
    if not path.is_file():
        raise BadRecord("missing image", str(path))
    try:
        return load_image(path)
    except ImageError as err:
        raise BadRecord("bad image", str(err)) from None


def need(record: object, key: str, kind: type | tuple[type, ...] = str) -> object:
    """`record[key]`, checked to be of `kind`, else BadRecord("missing field 'key'" | "bad field 'key'")."""
    if not isinstance(record, dict):
        raise BadRecord("record is not a JSON object", repr(record)[:80])
    if key not in record:
        raise BadRecord(f"missing field {key!r}", repr(record)[:120])
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # JSON true is no number
        raise BadRecord(f"bad field {key!r}", f"{type(value).__name__} {value!r}"[:120])
    return value


def read_json_records(path: str | Path, unwrap: str | None = None) -> list:
    """Records of an annotation file: a JSON list (or a dict holding it under `unwrap`), or JSON lines (`.jsonl`).

    A file that is missing or not JSON at all is an error for the user to fix; a bad line of a `.jsonl` file is
    skipped and counted in one warning.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    if path.suffix == ".jsonl":
        records, bad = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
        if bad:
            logger.warning("%s: skipped %d bad JSON line(s) of %d", path, bad, bad + len(records))
        return records
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); is the download complete?") from None
    if unwrap is not None and isinstance(data, dict) and unwrap in data:
        data = data[unwrap]
    if not isinstance(data, list):
        want = f"a list (or an object with {unwrap!r})" if unwrap else "a list"
        raise ValueError(f"{path}: expected {want} of records, found a JSON {type(data).__name__}")
    return data


class PassCounter:
    """Skip counts of one pass, with one example per reason; `finish` logs them once and refuses an empty pass."""

    def __init__(self, name: str):
        self.name = name
        self.skipped: Counter[str] = Counter()
        self.examples: dict[str, str] = {}
        self.good = 0

    def skip(self, err: BadRecord) -> None:
        self.skipped[err.reason] += 1
        self.examples.setdefault(err.reason, err.detail)

    def finish(self, epoch: int, resumed: bool = False) -> None:
        total = self.good + sum(self.skipped.values())
        summary = ", ".join(
            f"{reason}: {n}" + (f" (e.g. {self.examples[reason]})" if self.examples[reason] else "")
            for reason, n in self.skipped.most_common()
        )
        if self.good == 0 and not resumed:
            what = f"all {total} records were bad ({summary})" if total else "there are no records"
            raise NoUsableRecords(f"{self.name}: pass {epoch} yielded no usable sample: {what}; check the paths")
        if self.skipped:
            logger.warning(
                "%s: pass %d skipped %d of %d records: %s", self.name, epoch, total - self.good, total, summary
            )
        self.skipped.clear()
        self.examples.clear()
        self.good = 0


class Loader:
    """Common face of every loader: `source` (dataset key), `task` tag, `stream()` and one-pass iteration."""

    source: str = ""
    task: str = ""
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def stream(
        self, seed: int | str, state: dict | None = None, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[Sample, dict]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Sample]:
        raise NotImplementedError


class MapLoader(Loader):
    """A loader over a list of records; subclasses write `make(record, rng) -> Sample`."""

    def __init__(self, records: list, seed: int = 0):
        self.records = records
        self.seed = seed

    def make(self, record: object, rng: random.Random) -> Sample:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, index: int, rng: random.Random) -> Sample:
        """Record `index` as a Sample, templates chosen with `rng`; raises BadRecord for a bad record."""
        try:
            return self.make(self.records[index], rng)
        except BadRecord:
            raise
        except _MALFORMED as err:
            raise BadRecord(f"malformed record ({type(err).__name__})", f"record {index}: {err}") from None

    def __getitem__(self, index: int) -> Sample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.source}: index {index} out of range for {len(self)} records")
        index %= len(self)
        return self.sample(index, sample_rng(self.seed, self.epoch, index))

    def __iter__(self) -> Iterator[Sample]:
        counter = PassCounter(self.source)
        for index in range(len(self)):
            try:
                sample = self.sample(index, sample_rng(self.seed, self.epoch, index))
            except BadRecord as err:
                counter.skip(err)
                continue
            counter.good += 1
            yield sample
        counter.finish(self.epoch)

    def stream(
        self, seed: int | str, state: dict | None = None, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[Sample, dict]]:
        state = dict(state or {"epoch": 0, "pos": 0})
        epoch, pos = int(state["epoch"]), int(state["pos"])
        counter = PassCounter(self.source)
        resumed = pos > 0  # the part of the pass before `pos` (not re-read) had its usable samples
        while True:
            order = list(range(len(self)))
            random.Random(f"{seed}/order/{epoch}").shuffle(order)
            order = order[rank::world_size]
            for p in range(pos, len(order)):
                index = order[p]
                try:
                    sample = self.sample(index, sample_rng(seed, epoch, index))
                except BadRecord as err:
                    counter.skip(err)
                    continue
                counter.good += 1
                yield sample, {"epoch": epoch, "pos": p + 1}
            counter.finish(epoch, resumed=resumed)
            epoch, pos, resumed = epoch + 1, 0, False
