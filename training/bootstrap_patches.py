"""Bootstrap, part 1a: a warm-up of the ViT's patch embedding as a per-patch classifier, before the vision phase.

Every question of the synthetic world names objects by shape, and shape is a local feature that the from-scratch
demo ViT learns very slowly inside the full vision objective (issue 3: slot shape 0.34 after 160 steps, 0.42 after
400; with a conv stem alone 0.44). Trained on its own, the patch embedding learns it in seconds: the warm-up fits
the patch embedding (with `VisionConfig.conv_stem`, its stem) and the first block's MLP, attention bypassed and no
position embeddings, to the colour of every patch and the shape of the patches an object covers (the vision phase's
patch targets), a few epochs over a cached pool of rendered 64 px scenes. The vision phase then starts from tokens
that already hold shape. The images are at the model's image size (the stages' 64 px in the demo; the vision phase
adapts the tokens to 128 px). The warm-up's linear head is thrown away.

    report = warm_up_patches(model, world, PatchWarmup(scenes=2000, epochs=3))
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.model import TinyGPTV
from training.bootstrap_vision import COLOUR_NAMES, SHAPES, patch_targets, pixels

logger = logging.getLogger(__name__)
FIRST_INDEX = 10_000_000  # the pool's training scenes start here, far from the vision phase's, so they add images


@dataclass(frozen=True)
class PatchWarmup:
    scenes: int = 0  # the cached pool (0 = no warm-up)
    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3  # one-cycle: 10 % warm-up, then cosine down


def warm_up_patches(model: TinyGPTV, world, settings: PatchWarmup, seed: int = 0) -> dict:
    """Train the patch embedding and the first block's MLP in place; return the per-epoch loss and the CPU seconds."""
    cpu0 = time.process_time()
    scenes = [world.scene(FIRST_INDEX + i, "train") for i in range(settings.scenes)]
    size = model.config.image.size
    px = torch.cat([pixels(scenes[i : i + 256], model, size) for i in range(0, len(scenes), 256)])  # [N, 3, S, S]
    colour, shape = patch_targets(scenes, size // model.config.vision.patch_size)  # [N, P] each
    vision = model.vision_model
    embedding, block = vision.embeddings.patch_embedding, vision.encoder.layers[0]
    n_col = len(COLOUR_NAMES) + 1
    head = torch.nn.Linear(vision.config.hidden_size, n_col + len(SHAPES) + 1)
    params = [*embedding.parameters(), *block.layer_norm2.parameters(), *block.mlp.parameters(), *head.parameters()]
    optim = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    steps = settings.epochs * -(-settings.scenes // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=settings.lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    log = []
    for epoch in range(settings.epochs):
        total, batches = 0.0, 0
        for idx in torch.randperm(settings.scenes, generator=generator).split(settings.batch_size):
            tokens = embedding(px[idx]).flatten(2).transpose(1, 2)  # [b, P, D], no position embeddings
            tokens = tokens + block.mlp(block.layer_norm2(tokens))  # the first block without its attention
            logits = head(tokens)  # [b, P, 7+5]
            c, s = colour[idx], shape[idx]
            on = c > 0  # the patches an object covers: only they have a shape
            loss = F.cross_entropy(logits[..., :n_col].flatten(0, 1), c.flatten())
            loss = loss + F.cross_entropy(logits[..., n_col:][on], s[on])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            schedule.step()
            total, batches = total + loss.item(), batches + 1
        log.append({"epoch": epoch, "loss": round(total / max(batches, 1), 4)})
        logger.info("patch warm-up epoch %d/%d %s", epoch + 1, settings.epochs, log[-1])
    return {"scenes": settings.scenes, "epochs": settings.epochs, "cpu_s": round(time.process_time() - cpu0, 1),
            "log": log}  # fmt: skip
