"""The path from base folders to a final model: model assembly per stage, data per stage, the final merge.

    cfg = model_config("demo", vision_dir, lm_dir)
    model = build_stage_model(cfg, stage, vision_dir, lm_dir, previous="runs/demo/stage1/trainable.safetensors")
    batches = stage_batches(stage, data_dir, rank, world_size)
    write_final(cfg, stage4, vision_dir, lm_dir, "runs/demo/stage4/trainable.safetensors", tokenizer, "runs/demo/final")

Each stage starts as the original does (reference §1.8, `ckpt` in the stage yamls): the base weights (a BLIP-2 folder
for the ViT + Q-Former, a Phi-2 folder for the language model), then the previous stage's trainable tensors on top
(projector, norm weights, and LoRA adapters from stage 2 on; stage 2 adds fresh adapters to stage 1's projector and
norms). The final model is stage 4's, LoRA merged, saved as a plain folder with the tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from core.config import ModelConfig
from core.model import TinyGPTV
from core.tokenizer import TextTokenizer
from core.weights import lm_config_from_phi, load_blip2_folder, load_phi_folder, vision_configs_from_blip2
from training.checkpoint import load_trainable
from training.freeze import set_trainable
from training.loop import BatchSource
from training.lora import LORA_PARAM, add_lora, merge_lora
from training.stages import StageConfig

logger = logging.getLogger(__name__)

# Stages 1-2 read webdataset shard folders under the data root: LAION and CC+SBU with the original's ratios, or the
# synthetic world's single `shards/` folder.
CAPTION_SHARDS = (("laion", 115), ("cc_sbu", 14), ("shards", 1))


def model_config(preset: str, vision_dir: str | Path, lm_dir: str | Path) -> ModelConfig:
    """The preset's config with the vision, Q-Former and language-model sizes read from the base folders."""
    base = ModelConfig.preset(preset)
    for folder, what in ((vision_dir, "a BLIP-2 folder (--base-vision)"), (lm_dir, "a Phi-2 folder (--base-lm)")):
        if not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(f"{folder} is not {what}: it has no config.json")
    blip2 = json.loads((Path(vision_dir) / "config.json").read_text())
    phi = json.loads((Path(lm_dir) / "config.json").read_text())
    vision, qformer = vision_configs_from_blip2(blip2, base)
    lm = lm_config_from_phi(phi, base.language_model)
    cfg = ModelConfig(vision, qformer, base.projector, lm, base.image, base.prompt)
    if not cfg.prompt.image_token_id < lm.vocab_size:
        raise ValueError(f"image_token_id {cfg.prompt.image_token_id} is outside the embedding table ({lm.vocab_size})")
    return cfg


def load_tokenizer(cfg: ModelConfig, tokenizer_dir: str | Path) -> TextTokenizer:
    lm = cfg.language_model
    return TextTokenizer.from_dir(tokenizer_dir, lm.bos_token_id, lm.eos_token_id, cfg.prompt.image_token_id)


def build_stage_model(
    cfg: ModelConfig,
    stage: StageConfig,
    vision_dir: str | Path,
    lm_dir: str | Path,
    previous: str | Path | None = None,
    qlora: bool = False,
) -> TinyGPTV:
    """Base folders + the previous stage's trainable tensors + this stage's LoRA; trainable flags set."""
    torch.manual_seed(stage.seed)  # the projector's and LoRA's initialisation
    model = TinyGPTV(cfg.replace(image=cfg.image.replace(size=stage.image_size)))
    load_blip2_folder(model, vision_dir)
    load_phi_folder(model.language_model, lm_dir)
    if qlora:
        from training.lora import quantize_language_model

        quantize_language_model(model)
    add_lora(model, stage.lora)
    counts = set_trainable(model)
    if previous is not None:
        fresh = load_trainable(model, previous, allow_missing=LORA_PARAM)
        if fresh:
            logger.info("%s: %d LoRA tensors start fresh (not in %s)", stage.name, len(fresh), previous)
    logger.info("%s trains %s", stage.name, ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return model


# ---------------------------------------------------------------------------------------------- data
def _mixture_source(build) -> BatchSource:
    built = [build()]  # built once now, so that a missing dataset fails here, with its path, not in the loader thread

    def make(state: dict | None):
        mixture = built.pop() if built else build()
        if state:
            mixture.load_state_dict(state)
        for _name, batch in mixture:
            yield batch, mixture.state_dict()

    return make


def stage_batches(stage: StageConfig, data_dir: str | Path, rank: int = 0, world_size: int = 1) -> BatchSource:
    """The batches of a stage from a data root in the real datasets' layout (what the synthetic world writes)."""
    from training.data.loaders_captions import WebDatasetCaptions
    from training.data.mixture import Mixture, build_stage3_mixture, build_stage4_mixture

    data_dir = Path(data_dir)
    seed = stage.seed + stage.stage  # stages 1 and 2 read the same shards: not in the same order

    if stage.data == "captions":
        found = {
            name: (sorted(str(p) for p in (data_dir / name).glob("*.tar")), ratio) for name, ratio in CAPTION_SHARDS
        }
        found = {name: v for name, v in found.items() if v[0]}
        if not found:
            names = ", ".join(name for name, _ in CAPTION_SHARDS)
            raise FileNotFoundError(f"{stage.name}: no webdataset shards (*.tar) under {data_dir}/{{{names}}}")

        def build():
            datasets = {n: (WebDatasetCaptions(s, source=n), r, stage.batch_size) for n, (s, r) in found.items()}
            return Mixture(datasets, seed=seed, rank=rank, world_size=world_size)

    elif stage.data == "cc_sbu_align":
        if not (data_dir / "cc_sbu_align" / "filter_cap.json").is_file():
            raise FileNotFoundError(f"{stage.name}: no cc_sbu_align/filter_cap.json under {data_dir}")

        def build():
            return build_stage3_mixture(data_dir / "cc_sbu_align", stage.batch_size, seed, rank, world_size)

    else:

        def build():
            mixture = build_stage4_mixture(data_dir, seed, rank, world_size)
            if stage.batch_size == 1:
                return mixture
            scaled = {n: (loader, r, b * stage.batch_size) for n, (loader, r, b) in mixture.datasets.items()}
            return Mixture(scaled, seed=seed, rank=rank, world_size=world_size)

    return _mixture_source(build)


# ---------------------------------------------------------------------------------------------- final
def write_final(
    cfg: ModelConfig,
    stage: StageConfig,
    vision_dir: str | Path,
    lm_dir: str | Path,
    trainable: str | Path,
    tokenizer: TextTokenizer,
    out: str | Path,
) -> TinyGPTV:
    """Stage `stage`'s model in fp32 with LoRA merged, saved atomically as a plain folder at `out`."""
    model = build_stage_model(cfg, stage, vision_dir, lm_dir, previous=trainable)
    merge_lora(model)
    model.requires_grad_(False).eval()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    logger.info("final model (LoRA merged) -> %s", out)
    return model
