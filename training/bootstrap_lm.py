"""Bootstrap, part 2: the language model learns the world's language, and to read image tokens, before the stages.

The real Phi-2 comes to TinyGPT-V as a strong language model with in-context skills no 4-layer model trained for
minutes can have. What stands in for them here: the stock-Phi decoder (no TinyGPT-V norms, as Phi-2 ships) is
trained from scratch on the world's text in the stages' exact formats (templates, task tags, answers + EOS, built by
the training engine's `Collator`), with the bootstrapped vision frozen and image tokens in place, through a temporary
projector that is thrown away afterwards (the stages train their own, from a fresh initialisation, as with real
weights). Each sequence holds one image and several turns (VQA, refer, identify, conversation, captions, grounding,
detection, in the proportions of `TASK_WEIGHTS`), so the 32 image tokens are paid once per several answers.

Questions, answers and phrases are cleaned with `caption_text` where the real-format loaders clean them (VQA, refer,
identify, stage-1 and TextCaps captions), so the language model sees the text the stages will feed it.

`fan_in_init` re-draws every Linear and the embedding of the decoder with std 1/sqrt(hidden size) before training,
instead of Phi-2's initializer_range 0.02 (which is 1/sqrt(2560), right for Phi-2's width only). At width 256 (the
demo's until it went to 128) 0.02 starts the attention logits ~10x too small; attention then stays uniform for
hundreds of steps and the decoder reads only what every image token shares (the count), never one object out of
several (issue 3 notes: the toy binding runs, and the language phase on oracle features, where the fan-in init lifted
shape from 0.31 to 0.72, refer from 0.00 to 0.10, and made the answers depend on the image at all).

`binding_weight` > 0 adds the answer-attention loss of `training.bootstrap_binding`: one head is shown which image
token each answer is about, instead of finding it from the answer loss alone.

`feature_pool` > 0 encodes that many training scenes once at each size (the vision is frozen here, so their Q-Former
outputs never change) and draws every step's scenes from the pool in turn, each time with freshly drawn questions,
instead of encoding fresh scenes each step: the encode was a sixth of a step at width 256, a third at 128.

`grid_ordinal_init` and `grid_sigma` give the grid tokens `<0>` .. `<100>` the order of numbers (training/bootstrap_grid.py).

`norm_mix` > 0 trains the same stock weights, on that share of the steps, with TinyGPT-V's q/k LayerNorm and
post-attention RMSNorm in place at their fresh values (weight 1, bias 0, not trained, not written): the stages add
exactly those norms, and a model that never saw them loses its skills when they appear (measured in the note).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass

import torch
from torch import nn

from core.boxes import iou, parse_boxes
from core.model import Projector, TinyGPTV
from core.phi import PhiDecoder
from core.prompts import build_prompt
from training.bootstrap_binding import AnswerAttention, binding_targets, sample_cells
from training.bootstrap_grid import grid_soft_loss, grid_token_ids, ordinal_init
from training.bootstrap_vision import encode, pixels
from training.collate import IGNORE, Collator
from training.data.sample import Sample, Turn
from training.data.synthetic_tasks import QUESTION_TYPES, llava_conversation, reason_qa, vqa_candidates
from training.data.text import caption_text

logger = logging.getLogger(__name__)

# task -> (weight, template); one sequence = one image + turns drawn by these weights
TASK_WEIGHTS = {
    "vqa": (6.0, "stage4"),
    "refer": (4.0, "stage4"),
    "identify": (1.0, "stage4"),
    "caption": (0.5, "stage4"),
    "grounding": (0.7, "stage4"),
    "detection": (0.7, "stage4"),
    "conversation": (0.7, "stage4"),
    "llava": (0.7, "stage4"),
    "image_caption": (0.7, "none"),
    "detail": (0.5, "stage3"),
}
MULTI_TURN = ("vqa", "refer", "identify")  # tasks whose turns can follow one another on one image


def as_loaded(sample: Sample) -> Sample:
    """The sample as the real-format loaders yield it: `caption_text` on VQA text, refer phrases and captions."""
    meta, turns = sample.meta, sample.turns
    if sample.source == "synthetic_vqa":
        q = meta["question"]
        turns = [Turn(turns[0].instruction.replace(q, caption_text(q)), caption_text(turns[0].answer))]
    elif sample.source == "synthetic_refer":
        p = meta["phrase"]
        turns = [Turn(turns[0].instruction.replace(p, caption_text(p)), turns[0].answer)]
    elif sample.source in ("synthetic_identify", "synthetic_image_caption", "synthetic_caption"):
        turns = [Turn(turns[0].instruction, caption_text(turns[0].answer))]
    return Sample(sample.image, turns, sample.source, sample.task, meta)


def _llava_sample(scene, rng: random.Random) -> Sample:
    """An untagged LLaVA-style conversation (or a reasoning pair) on the scene, image in the first turn."""
    pairs = llava_conversation(scene, rng) if rng.random() < 0.7 else [reason_qa(scene, rng)]
    turns = [Turn(build_prompt(q, "{}") if k == 0 else q, a) for k, (q, a) in enumerate(pairs)]
    return Sample(scene.image, turns, "synthetic_llava", "", {})


def scene_sequences(world, scene, index: int, rng: random.Random, turns: int) -> list[tuple[str, Sample]]:
    """Training sequences for one scene: (template, sample), each sample one image and up to `turns` turns."""
    names = list(TASK_WEIGHTS)
    weights = [TASK_WEIGHTS[n][0] for n in names]
    task = rng.choices(names, weights)[0]
    if task == "llava":
        return [("stage4", _llava_sample(scene, rng))]
    first = as_loaded(world.sample(index, task, "train", scene=scene))
    if task not in MULTI_TURN:
        return [(TASK_WEIGHTS[task][1], first)]
    out_turns, later = list(first.turns), []
    for _ in range(turns - 1):  # later turns: other tagged tasks, text only (the image sits in turn 1)
        extra = rng.choices(MULTI_TURN, [TASK_WEIGHTS[t][0] for t in MULTI_TURN])[0]
        s = as_loaded(_fresh_sample(world, scene, index, extra, rng))
        out_turns.append(Turn(s.turns[0].instruction.replace("<Img><ImageHere></Img> ", ""), s.turns[0].answer))
        later.append((s.source, s.meta))
    meta = {**first.meta, "turn_cells": sample_cells(scene, first, later)}  # for the binding loss (bootstrap_binding)
    return [("stage4", Sample(scene.image, out_turns, first.source, first.task, meta))]


def _fresh_sample(world, scene, index: int, task: str, rng: random.Random) -> Sample:
    from training.data.synthetic_tasks import build_sample

    return build_sample(scene, task, random.Random(rng.getrandbits(64)), world.image_id(index, "train"))


@dataclass(frozen=True)
class LanguagePhase:
    steps: int = 300
    scenes_per_step: int = 16
    turns: int = 4  # turns per multi-turn sequence (VQA / refer / identify)
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.05
    sizes: tuple[int, ...] = (128, 64)  # image size by step, cycled (stage 4's and stages 1-3's)
    max_txt_len: int = 200
    norm_mix: float = 0.0  # share of steps run with TinyGPT-V's fresh norms in place (see module docstring)
    fan_in_init: bool = False  # re-draw the decoder's weights with std 1/sqrt(hidden size) first (module docstring)
    binding_weight: float = 0.0  # > 0: the answer-attention loss of bootstrap_binding, with this weight
    binding_layer: int = 1  # the decoder layer and head it trains
    binding_head: int = 0
    feature_pool: int = 0  # > 0: encode this many training scenes once per size and draw every step's scenes from them
    grid_ordinal_init: bool = False  # grid tokens' rows start as Fourier features of their number (bootstrap_grid)
    grid_sigma: float = 0.0  # > 0: grid-number answers scored against a Gaussian of this std (bootstrap_grid)
    log_every: int = 25


class FeaturePool:
    """Q-Former outputs of training scenes 0..n-1 at each size, encoded once by the frozen vision."""

    def __init__(self, model: TinyGPTV, world, n: int, sizes: tuple[int, ...], batch: int = 64) -> None:
        self.scenes = [world.scene(i, "train") for i in range(n)]
        self.queries: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for size in sorted(set(sizes)):
                parts = [encode(model, pixels(self.scenes[i : i + batch], model, size))[1] for i in range(0, n, batch)]
                self.queries[size] = torch.cat(parts)  # [n, N, Dq]

    def get(self, indices: list[int], size: int):
        """(scenes, their Q-Former outputs [len(indices), N, Dq] at `size`)."""
        return [self.scenes[i] for i in indices], self.queries[size][torch.tensor(indices)]


@torch.no_grad()
def fan_in_init(decoder: PhiDecoder) -> float:
    """Re-draw every Linear and Embedding weight of `decoder` from N(0, 1/hidden size); returns the std used."""
    std = decoder.config.hidden_size**-0.5
    for module in decoder.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
    return std


def shared_normed_decoder(stock: PhiDecoder) -> PhiDecoder:
    """A decoder with TinyGPT-V's norms (frozen at 1/0) whose every other parameter IS `stock`'s (shared tensors)."""
    cfg = stock.config.replace(qk_layernorm=True, post_attention_rmsnorm=True)
    normed = PhiDecoder(cfg)
    for name, param in stock.named_parameters():
        owner_name, _, attr = name.rpartition(".")
        setattr(normed.get_submodule(owner_name), attr, param)
    for param in normed.parameters():
        if not any(param is p for p in stock.parameters()):
            param.requires_grad_(False)
    return normed


def make_batch(collators: dict[str, Collator], sequences: list[tuple[str, Sample]], pad: int):
    """(template, sample) rows -> input_ids, attention_mask, labels [B, T], right-padded with EOS."""
    encoded = [collators[template].encode(sample)[:2] for template, sample in sequences]
    T = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), T), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    labels = torch.full((len(encoded), T), IGNORE, dtype=torch.long)
    for row, (i, lab) in enumerate(encoded):
        ids[row, : len(i)], mask[row, : len(i)], labels[row, : len(lab)] = torch.tensor(i), 1, torch.tensor(lab)
    return ids, mask, labels


def train_language(model: TinyGPTV, tokenizer, world, phase: LanguagePhase, deadline: float | None = None) -> dict:
    """Train model.language_model (stock Phi) and a temporary projector; the vision parts are frozen."""
    cfg = model.config
    collators = {
        t: Collator(tokenizer, cfg, template=t, max_txt_len=phase.max_txt_len) for t in ("none", "stage3", "stage4")
    }
    stock = model.language_model
    if phase.fan_in_init:
        fan_in_init(stock)
    wants_grid = phase.grid_ordinal_init or phase.grid_sigma > 0
    grid_ids = grid_token_ids(tokenizer) if wants_grid else None
    if wants_grid and grid_ids is None:
        logger.warning("language bootstrap: the tokenizer has no whole grid tokens <0>..<100>; grid settings unused")
    if grid_ids is not None and phase.grid_ordinal_init:
        ordinal_init(stock, grid_ids, std=float(stock.model.embed_tokens.weight.std()))
    soft_grid = grid_ids is not None and phase.grid_sigma > 0
    normed = shared_normed_decoder(stock) if phase.norm_mix > 0 else None
    model.projector = Projector(cfg)
    params = [*stock.parameters(), *model.projector.parameters()]
    optim = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": phase.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=phase.lr,
    )
    from training.bootstrap_vision import _warmup_cosine

    schedule = torch.optim.lr_scheduler.LambdaLR(optim, _warmup_cosine(phase.warmup_steps, phase.steps))
    rng = random.Random(f"bootstrap-lm:{world.seed}")
    log, t0, cpu0, index, step = [], time.time(), time.process_time(), 0, -1
    pool = FeaturePool(model, world, phase.feature_pool, phase.sizes) if phase.feature_pool else None
    binding = None
    if phase.binding_weight:
        decoders = [stock] if normed is None else [stock, normed]
        binding = AnswerAttention(decoders, phase.binding_layer, phase.binding_head)
    for step in range(phase.steps):
        if deadline is not None and time.time() > deadline:
            logger.warning("language bootstrap: time budget reached after %d of %d steps", step, phase.steps)
            break
        size = phase.sizes[step % len(phase.sizes)]
        if pool is not None:
            indices = [(index + k) % phase.feature_pool for k in range(phase.scenes_per_step)]
            scenes, queries = pool.get(indices, size)
        else:
            indices = [index + k for k in range(phase.scenes_per_step)]
            scenes = [world.scene(i, "train") for i in indices]
            with torch.no_grad():
                _, queries = encode(model, pixels(scenes, model, size))  # [S, N, Dq]
        rows, owner = [], []
        for k, scene in enumerate(scenes):
            for seq in scene_sequences(world, scene, indices[k], rng, phase.turns):
                rows.append(seq)
                owner.append(k)
        index += phase.scenes_per_step
        ids, mask, labels = make_batch(collators, rows, tokenizer.eos_token_id)
        features = model.projector(queries[torch.tensor(owner)])  # [B, N, D]
        use_norms = normed is not None and rng.random() < phase.norm_mix
        model.language_model = normed if use_norms else stock
        if binding is not None:
            cells = [sample.meta.get("turn_cells", []) for _, sample in rows]
            binding.targets = binding_targets(ids, labels, cells, cfg.prompt.image_token_id)
        if soft_grid:
            logits = model(ids, mask, image_features=features)["logits"]
            loss = grid_soft_loss(logits, labels, grid_ids, phase.grid_sigma)
        else:
            loss = model(ids, mask, labels=labels, image_features=features)["loss"]
        model.language_model = stock
        total = loss + phase.binding_weight * binding.loss if binding is not None else loss
        optim.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        schedule.step()
        if step % phase.log_every == 0 or step == phase.steps - 1:
            entry = {
                "step": step,
                "size": size,
                "loss": round(loss.item(), 4),
                "rows": len(rows),
                "tokens": int(mask.sum()),
            }
            entry["norms"] = use_norms
            if binding is not None:
                entry["binding"] = round(binding.loss.item(), 4)
                entry["binding_targets"] = len(binding.targets)
            entry["wall_s"] = round(time.time() - t0, 1)
            log.append(entry)
            logger.info("language step %d/%d %s", step, phase.steps, entry)
    if binding is not None:
        binding.remove()
    return {
        "steps_done": step + 1,
        "wall_s": round(time.time() - t0, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
        "log": log,
        "normed": normed,
    }


@torch.no_grad()
def quick_eval(
    model: TinyGPTV, tokenizer, world, n: int, size: int, split: str = "val", decoder: nn.Module | None = None
) -> dict:
    """Greedy VQA exact match per question type and refer Acc@IoU>=0.5 on held-out scenes, through model.generate."""
    stock = model.language_model
    if decoder is not None:
        model.language_model = decoder
    rng = random.Random(f"quick-eval:{split}")
    scenes = [world.scene(i, split) for i in range(n)]
    prompts, kinds, truths = [], [], []
    for scene in scenes:
        qtype = QUESTION_TYPES[len(prompts) // 2 % len(QUESTION_TYPES)]
        cands = vqa_candidates(scene)
        if not cands[qtype]:
            qtype = "count"
        qa = rng.choice(cands[qtype])
        prompts.append(build_prompt(f"[vqa] {caption_text(qa.question)}"))
        kinds.append(qtype)
        truths.append(caption_text(qa.answer))
        obj = rng.choice(scene.objects)
        from training.data.synthetic_tasks import referring_phrases

        prompts.append(build_prompt(f"[refer] where is {rng.choice(referring_phrases(scene, obj))} ?"))
        kinds.append("refer")
        truths.append(obj.grid_box(scene.width, scene.height))
    cfg = model.config
    ids = [tokenizer.encode_prompt(p, 1, cfg.num_image_tokens) for p in prompts]
    scene_pixels = pixels(scenes, model, size).repeat_interleave(2, dim=0)  # [2n, 3, S, S]
    hits: dict[str, list[float]] = {}
    for start in range(0, len(ids), 64):
        out = model.generate(ids[start : start + 64], pixel_values=scene_pixels[start : start + 64], max_new_tokens=12)
        for k, tokens in enumerate(out.tokens):
            i = start + k
            text = tokenizer.decode(tokens).strip()
            if kinds[i] == "refer":
                boxes = parse_boxes(text)
                ok = bool(boxes) and iou(boxes[0], truths[i]) >= 0.5
            else:
                ok = caption_text(text) == truths[i]
            hits.setdefault(kinds[i], []).append(float(ok))
    model.language_model = stock
    result = {k: round(sum(v) / len(v), 4) for k, v in hits.items()}
    vqa = [x for k, v in hits.items() if k != "refer" for x in v]
    result["vqa_all"] = round(sum(vqa) / max(len(vqa), 1), 4)
    return result


@torch.no_grad()
def answer_loss(model: TinyGPTV, tokenizer, world, n: int, size: int, decoder: nn.Module | None = None) -> float:
    """Mean answer-token loss on held-out single-turn VQA/refer sequences (the norms' effect is read off this)."""
    stock = model.language_model
    if decoder is not None:
        model.language_model = decoder
    collator = Collator(tokenizer, model.config, template="stage4", max_txt_len=200)
    scenes = [world.scene(i, "val") for i in range(n)]
    samples = [as_loaded(world.sample(i, ("vqa", "refer")[i % 2], "val", scene=s)) for i, s in enumerate(scenes)]
    ids, mask, labels = make_batch({"stage4": collator}, [("stage4", s) for s in samples], tokenizer.eos_token_id)
    loss = model(ids, mask, labels=labels, pixel_values=pixels(scenes, model, size))["loss"]
    model.language_model = stock
    return round(float(loss), 4)
