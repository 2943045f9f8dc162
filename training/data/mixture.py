"""Multi-dataset sampling as the original runner does it, deterministic and exactly resumable; the stage mixtures.

Each step draws ONE dataset with probability proportional to its ratio and yields one batch of that dataset's own batch
size (reference §2, `MultiIterLoader`). The draw of step t comes from an rng seeded by (seed, t), and each dataset is
read through its loader's `stream` (see `loaders_base`), so the whole data order is a function of the seed, and
`state_dict()` (the step and each dataset's stream position, JSON-able) lets a resumed run continue with the very batch
that would have come next.

    mix = build_stage4_mixture("data", seed=42)
    for step, (name, batch) in zip(range(1000), mix):   # batch: list[Sample], len == that dataset's batch size
        ...
    torch.save({"data": mix.state_dict(), ...}, "ckpt.pt"); later: mix.load_state_dict(ckpt["data"])

With several processes, build one Mixture per process with its `rank` and `world_size`: all processes draw the same
dataset at each step (same seed) and read disjoint shares of it. Each process's stream positions differ, so a
checkpoint must keep every rank's `state_dict()`.

Layout of `data_dir` read by `build_stage4_mixture` (the original's file names, arranged as the synthetic world writes
them, see `training/data/synthetic_writers.py`; absent datasets are left out with a logged note):

    train2014/COCO_train2014_<id:012d>.jpg        LLaVA, multitask conversation, VQAv2, OK-VQA, A-OKVQA, RefCOCO*
    llava/detail_23k.json, llava/complex_reasoning_77k.json, llava/conversation_58k.json
    multitask_conversation/multitask_conversation.json
    unnatural_instructions/filtered_unnatural_instruction.json
    refcoco/ and refcoco+/ with refs(unc).p + instances.json, refcocog/ with refs(umd).p + instances.json
    visual_genome/region_descriptions.json, image_data.json, VG_100K/, VG_100K_2/
    flickr/groundedcaption.json, captiontobbox.json, phrasetobbox.json, <image_id>.jpg
    textcaps/TextCaps_0.1_train.json, textcaps/train_images/<image_id>.jpg
    coco_vqa/vqa_train.json (+ vqa_val.json), okvqa/okvqa_train.json, aokvqa/aokvqa_v1p0_train.json
    gqa/train_balanced_questions.json, gqa/images/<image>
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from training.data.loaders_base import Loader
from training.data.loaders_captions import CCSBUAlign, TextCaps, WebDatasetCaptions
from training.data.loaders_grounding import (
    FlickrCaptionToPhrase,
    FlickrGroundedCaption,
    FlickrObjectToPhrase,
    RefCOCO,
    VisualGenomeRefer,
)
from training.data.loaders_instruct import Conversation, LlavaSingleTurn, UnnaturalInstructions
from training.data.loaders_vqa import GQA, VQA
from training.data.sample import Sample

logger = logging.getLogger(__name__)


class Mixture:
    """Draw a dataset per step (probability ∝ ratio), yield `(name, batch)` with that dataset's batch size."""

    def __init__(
        self, datasets: dict[str, tuple[Loader, float, int]], seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        if not datasets:
            raise ValueError("a Mixture needs at least one dataset")
        for name, (_, ratio, batch_size) in datasets.items():
            if not ratio > 0:
                raise ValueError(f"dataset {name!r}: ratio must be > 0, got {ratio}")
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"dataset {name!r}: batch size must be a positive integer, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
        self.datasets = dict(datasets)
        self.names = list(self.datasets)  # the draw depends on this order: keep it stable between runs
        self.ratios = [float(self.datasets[n][1]) for n in self.names]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0
        self._positions: dict[str, dict | None] = {name: None for name in self.names}
        self._streams: dict[str, Iterator[tuple[Sample, dict]]] = {}

    def probabilities(self) -> dict[str, float]:
        total = sum(self.ratios)
        return {name: ratio / total for name, ratio in zip(self.names, self.ratios)}

    def draw(self, step: int) -> str:
        """The dataset of `step`: a function of (seed, step) only."""
        return random.Random(f"{self.seed}/draw/{step}").choices(self.names, weights=self.ratios, k=1)[0]

    def _stream(self, name: str) -> Iterator[tuple[Sample, dict]]:
        if name not in self._streams:
            loader = self.datasets[name][0]
            self._streams[name] = loader.stream(
                f"{self.seed}/{name}", self._positions[name], self.rank, self.world_size
            )
        return self._streams[name]

    def __iter__(self) -> Mixture:
        return self

    def __next__(self) -> tuple[str, list[Sample]]:
        name = self.draw(self.step)
        stream, batch_size = self._stream(name), self.datasets[name][2]
        batch = []
        for _ in range(batch_size):
            sample, position = next(stream)
            batch.append(sample)
            self._positions[name] = position
        self.step += 1
        return name, batch

    def state_dict(self) -> dict:
        """The exact data position: seed, step, each dataset's stream position (JSON-able)."""
        return {
            "seed": self.seed,
            "step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
            "positions": {name: (dict(pos) if pos else None) for name, pos in self._positions.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"this data state belongs to rank {state['rank']} of {state['world_size']}, not rank {self.rank} "
                f"of {self.world_size}; load each process's own state, with the same number of processes"
            )
        unknown = sorted(set(state["positions"]) - set(self.names))
        if unknown:
            raise ValueError(f"the data state has datasets {unknown} that this mixture lacks ({self.names})")
        if state["seed"] != self.seed:
            logger.info("data mixture: taking the checkpoint's seed %s in place of %s", state["seed"], self.seed)
        self.seed, self.step = state["seed"], int(state["step"])
        self._positions = {name: state["positions"].get(name) for name in self.names}
        self._streams = {}


# (name, ratio, batch size) of `train_configs/tinygptv_stage4.yaml` (reference §3.4; total ratio 690)
STAGE4 = (
    ("multitask_conversation", 50, 1),
    ("llava_conversation", 30, 1),
    ("unnatural_instruction", 10, 1),
    ("refvg", 40, 3),
    ("llava_detail", 20, 2),
    ("llava_reason", 80, 2),
    ("flickr_grounded_caption", 80, 1),
    ("flickr_CaptionToPhrase", 80, 1),
    ("flickr_ObjectToPhrase", 80, 1),
    ("textcaps_caption", 30, 3),
    ("refcoco", 25, 3),
    ("refcocop", 25, 3),
    ("refcocog", 25, 3),
    ("invrefcoco", 10, 3),
    ("invrefcocop", 10, 3),
    ("invrefcocog", 10, 3),
    ("coco_vqa", 15, 3),
    ("ok_vqa", 8, 3),
    ("aok_vqa", 12, 3),
    ("gqa", 50, 3),
)

_REFER = {"refcoco": ("refcoco", "unc"), "refcocop": ("refcoco+", "unc"), "refcocog": ("refcocog", "umd")}


def _stage4_recipe(name: str, d: Path) -> tuple[list[Path], Callable[[], Loader]]:
    """The files dataset `name` needs under `d`, and how to build its loader from them."""
    coco = d / "train2014"
    if name in ("multitask_conversation", "llava_conversation"):
        ann = d / "multitask_conversation/multitask_conversation.json"
        ann = ann if name == "multitask_conversation" else d / "llava/conversation_58k.json"
        return [ann, coco], lambda: Conversation(ann, coco, source=name)
    if name in ("llava_detail", "llava_reason"):
        ann = d / ("llava/detail_23k.json" if name == "llava_detail" else "llava/complex_reasoning_77k.json")
        return [ann, coco], lambda: LlavaSingleTurn(ann, coco, source=name)
    if name == "unnatural_instruction":
        ann = d / "unnatural_instructions/filtered_unnatural_instruction.json"
        return [ann], lambda: UnnaturalInstructions(ann)
    if name == "refvg":
        vg = d / "visual_genome"
        return [vg / "region_descriptions.json", vg / "image_data.json"], lambda: VisualGenomeRefer(vg)
    if name.removeprefix("inv") in _REFER:
        dataset, split_by = _REFER[name.removeprefix("inv")]
        need = [d / dataset / f"refs({split_by}).p", d / dataset / "instances.json", coco]
        return need, lambda: RefCOCO(d, coco, dataset, split_by, inverse=name.startswith("inv"), source=name)
    if name.startswith("flickr_"):
        files = {"flickr_grounded_caption": ("groundedcaption.json", FlickrGroundedCaption),
                 "flickr_CaptionToPhrase": ("captiontobbox.json", FlickrCaptionToPhrase),
                 "flickr_ObjectToPhrase": ("phrasetobbox.json", FlickrObjectToPhrase)}  # fmt: skip
        file, cls = files[name]
        return [d / "flickr" / file], lambda: cls(d / "flickr" / file, d / "flickr")
    if name == "textcaps_caption":
        ann, images = d / "textcaps/TextCaps_0.1_train.json", d / "textcaps/train_images"
        return [ann, images], lambda: TextCaps(ann, images)
    if name == "coco_vqa":
        anns = [p for p in (d / "coco_vqa/vqa_train.json", d / "coco_vqa/vqa_val.json") if p.exists()]
        return [*(anns or [d / "coco_vqa/vqa_train.json"]), coco], lambda: VQA(anns, coco, source=name)
    if name == "ok_vqa":
        ann = d / "okvqa/okvqa_train.json"
        return [ann, coco], lambda: VQA(ann, coco, source=name)
    if name == "aok_vqa":
        ann = d / "aokvqa/aokvqa_v1p0_train.json"
        return [ann, coco], lambda: VQA(ann, coco, source=name, answer_field="direct_answers")
    if name == "gqa":
        ann, images = d / "gqa/train_balanced_questions.json", d / "gqa/images"
        return [ann, images], lambda: GQA(ann, images)
    raise KeyError(f"no stage-4 recipe for dataset {name!r}")


def build_stage4_mixture(
    data_dir: str | Path,
    seed: int = 42,
    rank: int = 0,
    world_size: int = 1,
    only: Sequence[str] | None = None,
) -> Mixture:
    """The 20 datasets of TinyGPT-V's stage 4 with their ratios and batch sizes, those whose files are present.

    `only` restricts the mixture to some dataset names. Raises FileNotFoundError when none is present.
    """
    data_dir = Path(data_dir)
    datasets: dict[str, tuple[Loader, float, int]] = {}
    for name, ratio, batch_size in STAGE4:
        if only is not None and name not in only:
            continue
        needed, build = _stage4_recipe(name, data_dir)
        missing = [str(p.relative_to(data_dir)) for p in needed if not p.exists()]
        if missing:
            logger.info("stage 4: leaving out %s (ratio %d): %s not found under %s", name, ratio, missing, data_dir)
            continue
        datasets[name] = (build(), ratio, batch_size)
    if not datasets:
        raise FileNotFoundError(
            f"no stage-4 dataset found under {data_dir}; see the layout in training/data/mixture.py's docstring"
        )
    considered = len(only) if only is not None else len(STAGE4)
    logger.info("stage 4 mixture: %d of %d datasets: %s", len(datasets), considered, ", ".join(datasets))
    return Mixture(datasets, seed=seed, rank=rank, world_size=world_size)


def build_pretrain_mixture(
    laion_shards: str | Sequence[str],
    cc_sbu_shards: str | Sequence[str],
    batch_size: int = 64,
    seed: int = 42,
    rank: int = 0,
    world_size: int = 1,
) -> Mixture:
    """Stages 1-2: LAION (ratio 115) and CC3M+CC12M+SBU (ratio 14) webdataset shards, batch 64 each."""
    return Mixture(
        {
            "laion": (WebDatasetCaptions(laion_shards, source="laion"), 115, batch_size),
            "cc_sbu": (WebDatasetCaptions(cc_sbu_shards, source="cc_sbu"), 14, batch_size),
        },
        seed=seed,
        rank=rank,
        world_size=world_size,
    )


def build_stage3_mixture(
    root: str | Path, batch_size: int = 6, seed: int = 42, rank: int = 0, world_size: int = 1
) -> Mixture:
    """Stage 3: cc_sbu_align alone, batch 6."""
    return Mixture({"cc_sbu_align": (CCSBUAlign(root), 1, batch_size)}, seed=seed, rank=rank, world_size=world_size)
