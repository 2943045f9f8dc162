"""Evaluate a trained model folder on the synthetic held-out split and on the real benchmarks' eval files.

    python -m training.eval --model runs/demo/final --split test --data runs/demo/data/test --out runs/demo/eval.json
    python -m training.eval --model runs/demo/final --split test --n 200 --out eval.json     # split drawn in memory
    python -m training.eval --model DIR --benchmark gqa testdev_balanced_questions.json gqa/images \\
        --benchmark vizwiz vizwiz/val.json vizwiz/val --benchmark iconqa choose_text_val.json iconqa/val --out eval.json

Prompts are built as the stage-4 model was trained: the model's template (`[INST] {} [/INST]`), the image text
`<Img><ImageHere></Img>`, then the benchmark's instruction with its task tag (training/eval_data.py). Generation is
greedy and batched through `model.generate`; each image is encoded once and its features reused by every question on
it. IconQA (and, with --likelihood, the synthetic VQA questions against every answer of their type) is scored by
likelihood ranking: the candidate whose answer tokens + EOS have the lowest mean loss wins. The metrics are in
core/metrics.py; the JSON holds one section per benchmark and, for the synthetic split, the per-type table.
Its `timing` section records the wall and CPU seconds of each run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from core.image import load_image, preprocess_for
from core.model import TinyGPTV
from core.prompts import build_prompt, cut_at_stop
from training.data.synthetic_scene import COLOURS, POSITIONS, SHAPES
from training.eval_data import READERS, EvalDataError, EvalItem, read_split_folder
from training.eval_score import summarize

logger = logging.getLogger(__name__)

# candidates of the synthetic world's answers by question type, for likelihood ranking
SYNTHETIC_CHOICES = {
    "colour": sorted(COLOURS),
    "shape": list(SHAPES),
    "count": [str(n) for n in range(5)],
    "position": list(POSITIONS),
    "exists": ["yes", "no"],
}


class Evaluator:
    """Greedy answers and likelihood rankings for EvalItems, with image features cached per image."""

    def __init__(self, model: TinyGPTV, tokenizer, image_size: int | None = None, batch_size: int = 32,
                 max_new_tokens: int = 24) -> None:  # fmt: skip
        self.model, self.tokenizer = model.eval(), tokenizer
        self.cfg = model.config
        self.image_cfg = self.cfg.image.replace(size=image_size) if image_size else self.cfg.image
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self._features: dict[Path, torch.Tensor] = {}

    def prompt_ids(self, item: EvalItem) -> list[int]:
        prompt = build_prompt(item.instruction, self.cfg.prompt.template)
        return self.tokenizer.encode_prompt(prompt, 1, self.cfg.num_image_tokens)

    @torch.no_grad()
    def features(self, items: list[EvalItem]) -> torch.Tensor:
        """Image features [B, N, D] for the items, encoding each image not yet cached once."""
        todo = sorted({it.image for it in items if it.image not in self._features})
        if len(self._features) + len(todo) > 512:
            self._features.clear()  # items come sorted by image, so old entries are not needed again
            todo = sorted({it.image for it in items})
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            pixels = torch.stack([torch.from_numpy(preprocess_for(load_image(p), self.image_cfg)) for p in chunk])
            for path, feats in zip(chunk, self.model.encode_image(pixels)):  # [N, D] each
                self._features[path] = feats
        return torch.stack([self._features[it.image] for it in items])  # [B, N, D]

    @torch.no_grad()
    def answer(self, items: list[EvalItem]) -> list[str]:
        out = self.model.generate(
            [self.prompt_ids(it) for it in items],
            image_features=self.features(items),
            max_new_tokens=self.max_new_tokens,
        )
        return [cut_at_stop(self.tokenizer.decode(t), self.cfg.prompt.stop_strings)[0].strip() for t in out.tokens]

    @torch.no_grad()
    def candidate_losses(self, item: EvalItem, choices: list[str]) -> list[float]:
        """Mean loss of each candidate's tokens + EOS after the item's prompt (model.forward, one row per candidate)."""
        prompt = self.prompt_ids(item)
        rows = [prompt + self.tokenizer.encode(c) + [self.tokenizer.eos_token_id] for c in choices]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.eos_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        feats = self.features([item]).expand(len(rows), -1, -1)  # [C, N, D]
        logits = self.model(ids, mask, image_features=feats)["logits"][:, :-1].float()  # [C, T-1, V]
        targets = ids[:, 1:]  # [C, T-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [C, T-1]
        answer = torch.zeros_like(nll, dtype=torch.bool)
        for i, row in enumerate(rows):
            answer[i, len(prompt) - 1 : len(row) - 1] = True
        return ((nll * answer).sum(1) / answer.sum(1)).tolist()

    def run(self, items: list[EvalItem], likelihood: bool = False) -> list[dict]:
        """One record per item: the item's ground truth plus `prediction` (and `losses`/`choice` when ranked)."""
        items = sorted(items, key=lambda it: (str(it.image), it.benchmark, it.qid))
        records: list[dict] = []
        generate = [it for it in items if it.task != "choose"]
        for start in range(0, len(generate), self.batch_size):
            batch = generate[start : start + self.batch_size]
            for it, text in zip(batch, self.answer(batch)):
                records.append(_record(it, prediction=text))
            logger.info("evaluated %d/%d generations", min(start + self.batch_size, len(generate)), len(generate))
        for it in items:
            choices = it.choices
            if it.task == "choose" or (likelihood and it.benchmark == "synthetic" and it.qtype in SYNTHETIC_CHOICES):
                choices = it.choices or SYNTHETIC_CHOICES[it.qtype]
                losses = self.candidate_losses(it, choices)
                best = min(range(len(losses)), key=lambda i: (losses[i], i))
                if it.task == "choose":
                    records.append(_record(it, prediction=choices[best], losses=losses))
                else:
                    next(r for r in records if r["qid"] == it.qid and r["benchmark"] == it.benchmark)["choice"] = (
                        choices[best]
                    )
        return records


def _record(item: EvalItem, **extra) -> dict:
    rec = {
        "benchmark": item.benchmark,
        "qid": item.qid,
        "task": item.task,
        "qtype": item.qtype,
        "image": str(item.image),
    }
    rec.update(instruction=item.instruction, answers=item.answers, choices=item.choices, label=item.label)
    rec.update(gt_xyxy=list(item.gt_xyxy) if item.gt_xyxy else None, width=item.width, height=item.height)
    rec.update(extra)
    return rec


def evaluate(model_dir: Path, items: list[EvalItem], likelihood: bool = False, image_size: int | None = None,
             batch_size: int = 32, max_new_tokens: int = 24) -> tuple[dict, list[dict]]:  # fmt: skip
    """Load the folder, answer every item, score: (summary dict, per-item records)."""
    model = TinyGPTV.from_pretrained(model_dir)
    tokenizer = model.load_tokenizer(model_dir)
    evaluator = Evaluator(model, tokenizer, image_size, batch_size, max_new_tokens)
    t0, cpu0 = time.time(), time.process_time()
    records = evaluator.run(items, likelihood=likelihood)
    summary = summarize(records)
    summary["timing"] = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - cpu0, 1),
                         "items": len(records), "image_size": evaluator.image_cfg.size}  # fmt: skip
    return summary, records


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    p = _ArgumentParser(prog="python -m training.eval", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", type=Path, required=True, help="model folder (config.json, model.safetensors, tokenizer.json)"
    )
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="synthetic split (default test)")
    p.add_argument("--data", type=Path, help="a split folder written with format 'eval' (default: draw --n images)")
    p.add_argument("--n", type=int, default=200, help="images to draw when --data is not given (default 200)")
    p.add_argument("--seed", type=int, default=0, help="world seed when --data is not given (default 0)")
    p.add_argument("--only", default="synthetic,refcoco,gqa", help="benchmarks read from --data (default all three)")
    p.add_argument("--benchmark", nargs=3, action="append", default=[], metavar=("NAME", "FILE", "IMAGES"),
                   help=f"a real benchmark file and its image folder; NAME is one of {', '.join(READERS)}")  # fmt: skip
    p.add_argument("--likelihood", action="store_true", help="also rank synthetic VQA answers by likelihood")
    p.add_argument("--image-size", type=int, help="override the model config's image size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--limit", type=int, help="evaluate the first N items only")
    p.add_argument("--predictions", type=Path, help="also write every prediction as JSON lines")
    p.add_argument("--out", type=Path, required=True, help="summary JSON to write")
    args = p.parse_args(argv)
    only = tuple(b for b in args.only.split(",") if b)
    unknown = [b for b in only if b not in ("synthetic", "refcoco", "gqa")] + [
        b[0] for b in args.benchmark if b[0] not in READERS
    ]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; --only takes synthetic, refcoco, gqa and "
                f"--benchmark one of {', '.join(READERS)}")  # fmt: skip
    if not (args.model / "config.json").is_file():
        p.error(f"{args.model} is not a model folder (no config.json)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with tempfile.TemporaryDirectory(prefix="tinygptv-eval-") as tmp:
            data = args.data
            if data is None and only:
                from training.data.synthetic import SyntheticWorld
                from training.data.synthetic_writers import write_split

                data = Path(tmp) / args.split
                write_split(SyntheticWorld(args.seed), args.split, args.n, data, ("eval",))
            items = read_split_folder(data, args.split, only) if only else []
            for name, file, images in args.benchmark:
                items += READERS[name](Path(file), Path(images))
            if args.limit:
                items = items[: args.limit]
            if not items:
                p.error("nothing to evaluate: no items were read")
            summary, records = evaluate(args.model, items, args.likelihood, args.image_size, args.batch_size,
                                        args.max_new_tokens)  # fmt: skip
    except (EvalDataError, FileNotFoundError) as err:
        p.error(str(err))
    summary = {"model": str(args.model), "split": args.split, "data": str(args.data) if args.data else None, **summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    if args.predictions:
        args.predictions.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(json.dumps({k: v for k, v in summary.items() if k in ("headline", "timing")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
