"""The demo's stand-in for pretrained weights: train the base vision and language models from scratch on the synthetic
world, and write them in the formats of the real ones, so that the four stages load them as they load EVA/BLIP-2 and
Phi-2 folders (core.weights.load_blip2_folder / load_phi_folder, core.tokenizer.TextTokenizer.from_dir).

    python -m training.bootstrap --preset demo --out runs/demo/base    # 8 min wall, 16 CPU-minutes on 2 threads (AVX-512 box)
    result = bootstrap("runs/demo/base", ModelConfig.preset("demo"))
    result.vision_dir   # runs/demo/base/vision : BLIP-2 folder (vision_model.*, qformer.*, query_tokens)
    result.lm_dir       # runs/demo/base/lm     : Phi-2 folder, stock Phi (no TinyGPT-V norms) + tokenizer.json
    result.report       # also runs/demo/base/bootstrap.json: losses, probe accuracies, timings

Three steps (each explained in its module):
1. a byte-level BPE tokenizer on the world's text (training/tokenizer_train.py);
2. the ViT + Q-Former on direct scene prediction through throw-away linear heads (training/bootstrap_vision.py),
   after a warm-up of the patch embedding as a per-patch classifier (training/bootstrap_patches.py);
   their held-out accuracy is the linear probe of the frozen features reported in bootstrap.json;
3. the stock-Phi language model on the world's text in the stages' formats, reading the frozen vision through a
   temporary projector that is not kept (training/bootstrap_lm.py).
Each folder is written to a temporary name and renamed at the end, so a half-written base is never taken for one.
With `time_budget_s`, a step that runs past its share of the budget stops early with a warning (and the report says
so); without it the step counts of the settings are run in full, so two runs give the same weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from core.config import ModelConfig
from core.model import TinyGPTV
from core.phi import PhiDecoder
from core.weights import write_blip2_folder, write_phi_folder
from training.bootstrap_lm import LanguagePhase, answer_loss, quick_eval, train_language
from training.bootstrap_patches import PatchWarmup, warm_up_patches
from training.bootstrap_vision import VisionPhase, evaluate_heads, train_vision
from training.tokenizer_train import train_world_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootstrapSettings:
    patch_warmup: PatchWarmup = field(default_factory=PatchWarmup)
    vision: VisionPhase = field(default_factory=VisionPhase)
    language: LanguagePhase = field(default_factory=LanguagePhase)
    tokenizer_scenes: int = 1500
    probe_scenes: int = 192  # held-out scenes for the probe and the quick evaluation (0 = skip both)
    world_image_size: int = 128  # the synthetic world draws at this size, as its on-disk splits

    @classmethod
    def preset(cls, name: str) -> BootstrapSettings:
        if name not in _PRESETS:
            raise ValueError(f"unknown bootstrap preset {name!r}; choose one of {', '.join(_PRESETS)}")
        return _PRESETS[name]


# demo (issue 3, 2026-12-02): with the demo config's conv stem, a 3-epoch patch warm-up over 2,000 cached scenes and
# 480 vision steps x batch 8 (80 % at 64 px), the held-out probe reads shape (slot shape 0.99 / 0.98 at 64 / 128 px,
# against 0.34 with the plain patch conv and 160 x 32 steps), colour 1.00, box 0.86 / 0.84, count 0.88 / 0.85, in
# 48 + 275 CPU-s (warm-up + phase). Without the warm-up, the same stem and phase: shape 0.91 / 0.88, 278 CPU-s;
# the warm-up without the stem: shape 0.39 / 0.38; 2 warm-up epochs and 440 steps: shape 0.94 / 0.88, box 0.86 / 0.79,
# 296 CPU-s (runs/exp A7, B1, A6). Batch 8 lifts box and count over batch 32 at the same cost
# (measured 2026-12-01 and again here). Language phase (2026-12-02): a fan-in init and 400 steps at lr 2e-3 take the
# bootstrap's held-out VQA from 0.41 to 0.56 (colour 0.15 -> 0.60, shape 0.32 -> 0.79, refer 0.00 -> 0.11) for 1,933
# CPU-s instead of 967; the full demo's held-out VQA went from 0.356 to 0.567 (issue 3 notes). Then (2026-12-02,
# the same frozen vision, 144 held-out scenes, 1 thread): a 128-wide decoder learns per step as the 256-wide one at
# about half the CPU, so it gets 800 steps; the answer-attention loss (bootstrap_binding) takes its VQA from 0.53 to
# 0.61 (colour 0.59 -> 0.79, exists 0.36 -> 0.79), and the feature pool drops the per-step encode (1,479 -> 1,293
# CPU-s with the pool's encode included). Demo end to end, held-out test split: 800 steps VQA 0.603, refer 0.083,
# 18.5 min wall on a quiet box; 1,200 steps VQA 0.670, refer 0.123, 20.7 min wall on a quiet box.
# Then (2026-12-02, a faster AVX-512/AMX box): the binding loss on every answer token and the grid tokens as numbers
# (bootstrap_binding, bootstrap_grid) took the demo's refer from 0.097 to 0.440 at the same steps; 960 vision steps
# lift the probe's box IoU>=0.5 from 0.77 to 0.94 at 128 px (+70 CPU-s), and 2,000 language steps the language phase
# alone from VQA 0.77 to 0.95. With both, the demo end to end: held-out VQA 0.923, refer 0.650, 9 min 16 s wall.
_PRESETS = {
    "demo": BootstrapSettings(
        patch_warmup=PatchWarmup(scenes=2000, epochs=3),
        vision=VisionPhase(steps=960, batch_size=8, lr=1.5e-3, mixed_from=0.8),
        language=LanguagePhase(
            steps=2000,
            scenes_per_step=16,
            turns=6,
            lr=2e-3,
            norm_mix=0.5,
            fan_in_init=True,
            binding_weight=1.0,
            feature_pool=1600,
            grid_ordinal_init=True,
            grid_sigma=2.0,
        ),
        probe_scenes=96,
    ),
    "tiny": BootstrapSettings(
        patch_warmup=PatchWarmup(scenes=4, epochs=2, batch_size=2),
        vision=VisionPhase(steps=2, batch_size=4, sizes=(32, 64), log_every=1),
        language=LanguagePhase(
            steps=2,
            scenes_per_step=2,
            turns=2,
            sizes=(64, 32),
            norm_mix=0.5,
            binding_weight=1.0,
            feature_pool=3,
            log_every=1,
        ),
        tokenizer_scenes=40,
        probe_scenes=2,  # exercises the report path
        world_image_size=64,
    ),
}


@dataclass
class BootstrapResult:
    vision_dir: Path
    lm_dir: Path
    tokenizer_dir: Path
    report: dict


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def stock_lm_config(cfg: ModelConfig) -> ModelConfig:
    """The model config with Phi-2 as it ships: no q/k LayerNorm, no post-attention RMSNorm."""
    lm = cfg.language_model.replace(qk_layernorm=False, post_attention_rmsnorm=False)
    return ModelConfig(cfg.vision, cfg.qformer, cfg.projector, lm, cfg.image, cfg.prompt)


def bootstrap(
    out_dir: str | Path,
    cfg: ModelConfig,
    seed: int = 0,
    settings: BootstrapSettings | None = None,
    time_budget_s: float | None = None,
) -> BootstrapResult:
    """Train and write `out_dir/vision` (BLIP-2 folder) and `out_dir/lm` (Phi-2 folder + tokenizer.json)."""
    from training.data.synthetic import SyntheticWorld

    settings = settings or BootstrapSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.time(), time.process_time()
    budget_end = (lambda share: t0 + share * time_budget_s) if time_budget_s else (lambda share: None)
    torch.manual_seed(seed)
    world = SyntheticWorld(seed, settings.world_image_size)
    report: dict = {"seed": seed, "settings": asdict(settings), "time_budget_s": time_budget_s}

    tokenizer = train_world_tokenizer(world, cfg, settings.tokenizer_scenes)
    report["tokenizer"] = {"vocab_size": tokenizer.vocab_size, "wall_s": round(time.time() - t0, 1)}

    model = TinyGPTV(stock_lm_config(cfg))
    warmup = warm_up_patches(model, world, settings.patch_warmup) if settings.patch_warmup.scenes else None
    vision = train_vision(model, world, settings.vision, deadline=budget_end(0.45))
    heads = vision.pop("heads")
    report["vision"] = vision
    if warmup is not None:
        report["vision"]["patch_warmup"] = warmup
    if settings.probe_scenes:
        report["vision"]["probe"] = {
            str(size): evaluate_heads(model, heads, world, settings.probe_scenes, size)
            for size in sorted(set(settings.vision.sizes))
        }
        logger.info("vision probe (held-out, linear heads on frozen Q-Former outputs): %s", report["vision"]["probe"])
    model.vision_model.requires_grad_(False), model.qformer.requires_grad_(False)
    model.query_tokens.requires_grad_(False)

    language = train_language(model, tokenizer, world, settings.language, deadline=budget_end(0.93))
    normed: PhiDecoder | None = language.pop("normed")
    report["language"] = language

    # the weights first, so that nothing in the optional report below can cost them
    vision_dir, lm_dir = out_dir / "vision", out_dir / "lm"
    tmp_vision, tmp_lm = out_dir / ".vision.tmp", out_dir / ".lm.tmp"
    for tmp in (tmp_vision, tmp_lm):
        shutil.rmtree(tmp, ignore_errors=True)
    write_blip2_folder(model, tmp_vision)
    write_phi_folder(model.language_model, tmp_lm)
    tokenizer.save(tmp_lm)
    _replace_dir(tmp_vision, vision_dir)
    _replace_dir(tmp_lm, lm_dir)

    if settings.probe_scenes:
        size = max(settings.language.sizes)
        with_norms = normed if normed is not None else _normed_copy(model.language_model)
        n = settings.probe_scenes
        report["language"]["answer_loss"] = {
            "stock": answer_loss(model, tokenizer, world, n, size),
            "with_fresh_tinygptv_norms": answer_loss(model, tokenizer, world, n, size, decoder=with_norms),
        }
        report["language"]["quick_eval"] = {
            "note": "greedy, held-out val scenes, through the bootstrap's temporary projector (not kept)",
            str(size): quick_eval(model, tokenizer, world, n, size),
            f"{size}_with_fresh_norms": quick_eval(model, tokenizer, world, n, size, decoder=with_norms),
        }
        logger.info("language bootstrap: %s", {k: report["language"][k] for k in ("answer_loss", "quick_eval")})
    report["wall_s"] = round(time.time() - t0, 1)
    report["cpu_s"] = round(time.process_time() - cpu0, 1)
    (out_dir / "bootstrap.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("bootstrap written to %s in %.0f s (%.0f s CPU)", out_dir, report["wall_s"], report["cpu_s"])
    return BootstrapResult(vision_dir, lm_dir, lm_dir, report)


def _normed_copy(stock: PhiDecoder) -> PhiDecoder:
    """The stock decoder with TinyGPT-V's fresh norms added, as the stages will load it (for the report only)."""
    from training.bootstrap_lm import shared_normed_decoder

    return shared_normed_decoder(stock)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    p = _ArgumentParser(prog="python -m training.bootstrap", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="demo", choices=("demo", "tiny"), help="model preset (default demo)")
    p.add_argument("--out", type=Path, required=True, help="folder for vision/, lm/ and bootstrap.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, help="seconds; steps past their share stop early")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = bootstrap(args.out, ModelConfig.preset(args.preset), args.seed, BootstrapSettings.preset(args.preset),
                       args.time_budget)  # fmt: skip
    print(f"wrote {result.vision_dir} and {result.lm_dir} in {result.report['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
