"""The synthetic world: a seeded, procedurally drawn world of coloured shapes that the demo trains and evaluates on.

No model hub can be reached when the kit is set up, so the embedded default learns from images of 1-4 shapes
(6 colours, 4 shapes, 2 sizes, 9 positions) with captions, questions, referring phrases and boxes in every task
format of the four stages. Image i of a split is always the same image; train, val and test draw from different
seeds (derived from the base seed and the split name), so they never share an image.

In memory:

    world = SyntheticWorld(seed=0, image_size=128)
    scene = world.scene(7, split="val")                   # image + objects (colour, shape, size, bbox, grid box)
    samples = world.samples("train", 100, tasks=("vqa", "refer"))  # 100 scenes x 2 tasks, training.data.sample.Sample

On disk, in the real datasets' formats (so the demo trains through the same loaders as real data):

    python -m training.data.synthetic --seed 0 --split train --n 1000 --out data/synthetic/train
    python -m training.data.synthetic --seed 0 --split test --n 200 --out data/synthetic/test --formats eval
    python -m training.data.synthetic ... --image-size 128 --formats stage1,stage3 --force
    python -m training.data.synthetic --seed 0 --split val --n 7 --out runs/demo/data/requests --formats requests

--formats is `all` or a comma list of stage1 (webdataset shards for stages 1-2), stage3 (cc_sbu_align),
stage4 (LLaVA, COCO-VQA, GQA, RefCOCO, Flickr30k files), eval (held-out question lists) and requests (a
`requests.jsonl` of questions for `python -m runtime --batch`, written only when named); the folder layout is
listed in training/data/synthetic_writers.py. The folder is written atomically; an existing non-empty --out is only
replaced with --force. 1,000 images with all formats take a few seconds on one CPU core.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from training.data.sample import Sample
from training.data.synthetic_scene import MIN_IMAGE_SIZE, SPLITS, Scene, draw_scene, scene_rng, split_seed
from training.data.synthetic_tasks import TASKS, build_sample

logger = logging.getLogger(__name__)

SPLIT_ID_BASE = {"train": 100_000_000, "val": 200_000_000, "test": 300_000_000}  # image ids never collide across splits
MAX_IMAGES = 100_000_000
DEFAULT_IMAGE_SIZE = 128  # the demo trains at 64 and 128 px; preprocessing resizes down


class SyntheticWorld:
    """One world: a base seed and an image size. Everything it returns is a pure function of its arguments."""

    def __init__(self, seed: int = 0, image_size: int = DEFAULT_IMAGE_SIZE) -> None:
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size {image_size} is too small to draw shapes; use at least {MIN_IMAGE_SIZE}")
        self.seed = seed
        self.image_size = image_size
        self._split_seeds = {split: split_seed(seed, split) for split in SPLITS}

    def split_seed(self, split: str) -> int:
        if split not in self._split_seeds:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return self._split_seeds[split]

    def image_id(self, index: int, split: str = "train") -> int:
        """The COCO-style integer id of image `index` (12 digits at most)."""
        self._check_index(index)
        return SPLIT_ID_BASE[split] + index

    def scene(self, index: int, split: str = "train") -> Scene:
        self._check_index(index)
        return draw_scene(self.split_seed(split), index, self.image_size, split=split)

    def rng(self, index: int, split: str, purpose: str) -> random.Random:
        """The RNG of one annotation of one image; independent of which other tasks are asked for."""
        return scene_rng(self.split_seed(split), index, purpose)

    def sample(self, index: int, task: str, split: str = "train", scene: Scene | None = None) -> Sample:
        scene = scene if scene is not None else self.scene(index, split)
        return build_sample(scene, task, self.rng(index, split, task), self.image_id(index, split))

    def iter_samples(self, split: str, n: int, tasks: Iterable[str] = TASKS, start: int = 0) -> Iterator[Sample]:
        """Scenes start..start+n-1 of `split`, one sample per task each, in scene order then task order."""
        tasks = tuple(tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown synthetic task(s) {unknown}; choose from {', '.join(TASKS)}")
        for index in range(start, start + n):
            scene = self.scene(index, split)
            for task in tasks:
                yield self.sample(index, task, split, scene=scene)

    def samples(self, split: str, n: int, tasks: Iterable[str] = TASKS, start: int = 0) -> list[Sample]:
        """`n` scenes x len(tasks) samples (see `iter_samples`)."""
        return list(self.iter_samples(split, n, tasks, start))

    @staticmethod
    def _check_index(index: int) -> None:
        if not 0 <= index < MAX_IMAGES:
            raise ValueError(f"image index {index} is outside 0..{MAX_IMAGES - 1}")


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit 2; no usage dump
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    from training.data.synthetic_writers import EXTRA_FORMATS, FORMATS, OutputExistsError, parse_formats, write_split

    parser = _ArgumentParser(prog="python -m training.data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="base seed of the world (default 0)")
    parser.add_argument("--split", required=True, choices=SPLITS)
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created atomically)")
    parser.add_argument(
        "--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help=f"pixels per side (default {DEFAULT_IMAGE_SIZE})"
    )
    parser.add_argument(
        "--formats", default="all", help=f"all, or a comma list of {', '.join(FORMATS + EXTRA_FORMATS)}"
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="images per webdataset shard (default 1000)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    args = parser.parse_args(argv)
    if not 1 <= args.n <= MAX_IMAGES:
        parser.error(f"--n {args.n} must be between 1 and {MAX_IMAGES:,}")
    if args.image_size < MIN_IMAGE_SIZE:
        parser.error(f"--image-size {args.image_size} is too small to draw shapes; use at least {MIN_IMAGE_SIZE}")
    if not 1 <= args.shard_size <= 10_000:
        parser.error(f"--shard-size {args.shard_size} must be between 1 and 10,000 (keys hold 4 digits per shard)")
    try:
        formats = parse_formats(args.formats)
    except ValueError as exc:
        parser.error(str(exc))
    world = SyntheticWorld(args.seed, args.image_size)
    try:
        manifest = write_split(
            world, args.split, args.n, args.out, formats, shard_size=args.shard_size, force=args.force
        )
    except OutputExistsError as exc:
        parser.error(str(exc))
    print(f"wrote {args.n} {args.split} images ({', '.join(manifest['formats'])}) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
