"""Train TinyGPT-V: bootstrap (demo only), stages 1-4, the merged final model, evaluation.

    python -m training --preset demo --out runs/demo            # synthetic data + bootstrap + stages 1-4 + eval
    python -m training --preset demo --out runs/demo --resume   # continue an interrupted run where it stopped
    python -m training --preset demo --out runs/demo --stage 3  # one stage (the previous one must be done)
    python -m training --preset tinygptv --base-vision blip2/ --base-lm phi-2/ --data datasets/ --out runs/real
    accelerate launch --num_processes 8 -m training --preset tinygptv ...          # 8 GPUs, DDP
    torchrun --nproc_per_node 2 -m training --preset demo --out runs/demo --cpu      # 2 CPU processes, DDP (gloo)

The run folder (`--out`) holds `data/` (demo), `base/vision` + `base/lm` (demo bootstrap), `stage1..4/` (stage.json,
metrics.jsonl, checkpoints/, trainable.safetensors, done.json), `final/` (a plain model folder, LoRA merged, with
tokenizer.json) and `eval.json`. A stage with done.json is not trained again; an interrupted one continues with
--resume. With real weights, --data is a folder in the real datasets' layout: `laion/*.tar` and `cc_sbu/*.tar`
(stages 1-2), `cc_sbu_align/` (stage 3) and the stage-4 datasets as listed in training/data/mixture.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from training.stages import STAGES, StageConfig

logger = logging.getLogger("training")

DEMO_TRAIN_IMAGES = 3000
DEMO_TEST_IMAGES = 300
DEMO_SEED = 0


class UsageError(Exception):
    """A run the user asked for that cannot go ahead as asked."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line on stderr, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m training", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("demo", "tinygptv", "tiny"), default="demo", help="model and stage sizes")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--data", type=Path, help="training data root (demo: OUT/data/train, written if absent)")
    p.add_argument("--base-vision", type=Path, help="BLIP-2 folder (demo: OUT/base/vision, bootstrapped if absent)")
    p.add_argument("--base-lm", type=Path, help="Phi-2 folder (demo: OUT/base/lm, bootstrapped if absent)")
    p.add_argument("--tokenizer", type=Path, help="folder with tokenizer.json (default: the --base-lm folder)")
    p.add_argument("--stage", type=int, choices=(1, 2, 3, 4), help="train this stage only")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage from its last checkpoint")
    p.add_argument("--steps", type=int, help="run every stage for this many steps (smoke runs; warm-up capped to it)")
    p.add_argument("--precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                   help="auto: bf16 autocast on GPU, fp32 on CPU")  # fmt: skip
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 is faster on a busy machine)")
    p.add_argument("--qlora", action="store_true", help="4-bit (bitsandbytes NF4) language model under the LoRA")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    p.add_argument("--demo-images", type=int, default=DEMO_TRAIN_IMAGES, help="synthetic training images (demo data)")
    args = p.parse_args(argv)
    if args.preset == "tinygptv":
        missing = [f"--{n.replace('_', '-')}" for n in ("base_vision", "base_lm", "data") if getattr(args, n) is None]
        if missing:
            p.error(f"--preset tinygptv needs {', '.join(missing)} (no weights or data can be downloaded here)")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps {args.steps} must be at least 1")
    return args


def _bootstrap(preset: str, out: Path) -> None:
    """The demo's base weights, trained from scratch on the synthetic world (training/bootstrap.py)."""
    from core.config import ModelConfig
    from training.bootstrap import BootstrapSettings, bootstrap

    settings = BootstrapSettings.preset("tiny" if preset == "tiny" else "demo")
    bootstrap(out, ModelConfig.preset(preset), seed=DEMO_SEED, settings=settings)


def _write_demo_data(root: Path, image_size: int, n_train: int) -> None:
    from training.data.synthetic import SyntheticWorld
    from training.data.synthetic_writers import write_split

    world = SyntheticWorld(DEMO_SEED, image_size)
    if not (root / "train" / "synthetic.json").is_file():
        logger.info("writing %d synthetic training images to %s", n_train, root / "train")
        write_split(world, "train", n_train, root / "train", ("stage1", "stage3", "stage4"), force=True)
    if not (root / "test" / "synthetic.json").is_file():
        write_split(world, "test", max(10, min(DEMO_TEST_IMAGES, n_train // 10)), root / "test", ("eval",), force=True)


def run(args: argparse.Namespace) -> int:
    from core.model import TinyGPTV
    from training.loop import RunOptions, make_accelerator, train_stage
    from training.pipeline import build_stage_model, load_tokenizer, model_config, stage_batches, write_final

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options = RunOptions(precision=args.precision, cpu=args.cpu)
    accelerator = make_accelerator(options)
    main = accelerator.is_main_process
    out: Path = args.out
    scale = "tinygptv" if args.preset == "tinygptv" else args.preset
    stages = [StageConfig.preset(name, scale) for name in STAGES]
    if args.steps:
        stages = [
            s.replace(
                schedule=s.schedule.replace(max_steps=args.steps, warmup_steps=min(s.schedule.warmup_steps, args.steps))
            )
            for s in stages
        ]

    data_dir = args.data or out / "data" / "train"
    vision_dir, lm_dir = args.base_vision or out / "base" / "vision", args.base_lm or out / "base" / "lm"
    if main and args.data is None:
        from training.data.synthetic import DEFAULT_IMAGE_SIZE

        _write_demo_data(out / "data", DEFAULT_IMAGE_SIZE, args.demo_images)
    if main and args.base_vision is None and not (vision_dir / "config.json").is_file():
        _bootstrap(args.preset, out / "base")
    accelerator.wait_for_everyone()
    cfg = model_config(args.preset, vision_dir, lm_dir)
    tokenizer = load_tokenizer(cfg, args.tokenizer or lm_dir)

    todo = [args.stage] if args.stage else [1, 2, 3, 4]
    for n in todo:
        stage, stage_dir = stages[n - 1], out / f"stage{n}"
        if (stage_dir / "done.json").is_file():
            logger.info("stage %d is done (%s); not training it again", n, stage_dir / "done.json")
            continue
        if (stage_dir / "checkpoints").is_dir() and not args.resume:
            raise UsageError(f"{stage_dir} holds an interrupted run; pass --resume to continue it or delete it")
        previous = out / f"stage{n - 1}" / "trainable.safetensors" if n > 1 else None
        if previous is not None and not previous.is_file():
            raise FileNotFoundError(f"stage {n} starts from stage {n - 1}'s result, and {previous} does not exist")
        from training.collate import Collator

        model: TinyGPTV = build_stage_model(cfg, stage, vision_dir, lm_dir, previous, qlora=args.qlora)
        collator = Collator(tokenizer, model.config, stage.template, stage.image_size, stage.max_txt_len)
        batches = stage_batches(stage, data_dir, accelerator.process_index, accelerator.num_processes)
        result = train_stage(model, stage, batches, collator, stage_dir, args.resume, options, accelerator)
        if result.interrupted:
            logger.warning("stage %d stopped at step %d; rerun with --resume to continue", n, result.steps)
            return 1
        logger.info("stage %d: %d steps, loss %.4f, %.0f s", n, result.steps, result.loss, result.elapsed_s)

    last = out / "stage4" / "trainable.safetensors"
    if main and last.is_file() and (args.stage in (None, 4)):
        write_final(cfg, stages[3], vision_dir, lm_dir, last, tokenizer, out / "final")
        if args.stage is None and not args.no_eval:
            _evaluate(out)
    accelerator.wait_for_everyone()
    return 0


def _evaluate(out: Path) -> None:
    try:
        from training.eval import main as eval_main
    except ImportError:
        logger.warning("training.eval is not available yet; no %s", out / "eval.json")
        return
    eval_main(["--model", str(out / "final"), "--split", "test", "--data", str(out / "data" / "test"),
               "--out", str(out / "eval.json")])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from core.config import ConfigError
    from core.tokenizer import TokenizerError
    from core.weights import WeightsError
    from training.checkpoint import CheckpointError
    from training.lora import LoraTargetError, QLoraUnavailable

    try:
        return run(args)
    except (FileNotFoundError, ConfigError, WeightsError, CheckpointError, LoraTargetError, QLoraUnavailable,
            TokenizerError, UsageError) as err:  # fmt: skip
        sys.stderr.write(f"python -m training: error: {err}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
