"""Bootstrap, part 1: the vision encoder and Q-Former learn to see the synthetic world before any language is involved.

Trained end to end from scratch, a small VLM of this structure stays at chance (issue 3's measurement): the language
model learns the answer priors and never looks at the image. So the ViT and Q-Former first get their own objective,
as EVA and BLIP-2 got theirs: direct prediction of everything the scene generator knows, from linear heads that are
thrown away afterwards (only the BLIP-2-format folder is kept).

- patch head on every ViT output token (after `ln_vision`): the colour of the object whose drawn shape covers at
  least half of the patch (or background), and, on those object patches only, its shape. Dense targets reach every
  patch and train the ViT far faster than pooled ones.
- slot heads on Q-Former queries 0..8, one per cell of the world's 3x3 layout (the scene generator puts at most one
  object in each cell): colour, shape and size (or empty), and the object's box on the 0-100 grid (L1).
- global heads on the mean of the other queries: object count, count per colour and per shape, which of the
  24 colour-shape pairs exist, and the background.
Because every head is linear, what the heads read is linearly decodable from the Q-Former outputs, which is what the
stages' linear projector and the language model need. The images alternate between the two sizes the stages use
(64 px for stages 1-3 and 128 px, with interpolated position embeddings, for stage 4), so the frozen ViT serves both.
`evaluate_heads` measures the heads on held-out scenes (a linear probe of the frozen features).
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from core.boxes import iou
from core.image import preprocess_for
from core.model import TinyGPTV
from training.data.synthetic_scene import BACKGROUNDS, COLOURS, SHAPES, SIZES, Scene, draw_shape
from training.data.synthetic_writers import encode_jpeg

logger = logging.getLogger(__name__)

COLOUR_NAMES = sorted(COLOURS)
BACKGROUND_NAMES = sorted(BACKGROUNDS)
N_CELLS = 9
MAX_COUNT = 4
N_PAIRS = len(COLOUR_NAMES) * len(SHAPES)


@dataclass
class SceneTargets:
    """Everything the heads predict for a batch of scenes (class 0 = empty / background where it applies)."""

    cell_colour: torch.Tensor  # [B, 9] int64, 0 = empty, 1..6
    cell_shape: torch.Tensor  # [B, 9] int64, 0 = empty, 1..4
    cell_size: torch.Tensor  # [B, 9] int64, 0 = empty, 1..2
    cell_box: torch.Tensor  # [B, 9, 4] float32, grid box / 100 (0 where empty)
    count: torch.Tensor  # [B] int64, number of objects 0..4
    colour_count: torch.Tensor  # [B, 6] int64
    shape_count: torch.Tensor  # [B, 4] int64
    pairs: torch.Tensor  # [B, 24] float32, 1 where a colour-shape pair is present
    background: torch.Tensor  # [B] int64


def scene_targets(scenes: list[Scene]) -> SceneTargets:
    B = len(scenes)
    t = SceneTargets(
        cell_colour=torch.zeros(B, N_CELLS, dtype=torch.long),
        cell_shape=torch.zeros(B, N_CELLS, dtype=torch.long),
        cell_size=torch.zeros(B, N_CELLS, dtype=torch.long),
        cell_box=torch.zeros(B, N_CELLS, 4),
        count=torch.zeros(B, dtype=torch.long),
        colour_count=torch.zeros(B, len(COLOUR_NAMES), dtype=torch.long),
        shape_count=torch.zeros(B, len(SHAPES), dtype=torch.long),
        pairs=torch.zeros(B, N_PAIRS),
        background=torch.zeros(B, dtype=torch.long),
    )
    for b, scene in enumerate(scenes):
        t.count[b] = len(scene.objects)
        t.background[b] = BACKGROUND_NAMES.index(scene.background)
        for obj in scene.objects:
            c, s = COLOUR_NAMES.index(obj.colour), SHAPES.index(obj.shape)
            t.cell_colour[b, obj.cell] = c + 1
            t.cell_shape[b, obj.cell] = s + 1
            t.cell_size[b, obj.cell] = SIZES.index(obj.size) + 1
            t.cell_box[b, obj.cell] = torch.tensor(obj.grid_box(scene.width, scene.height), dtype=torch.float32) / 100
            t.colour_count[b, c] += 1
            t.shape_count[b, s] += 1
            t.pairs[b, c * len(SHAPES) + s] = 1.0
    return t


def patch_targets(scenes: list[Scene], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour and shape (0 = background) of each patch that an object's drawn shape covers at least half of.

    -> two [B, grid*grid]. The shape's own mask, not its box: a circle leaves its box's corner patches empty and a
    square fills them, so the dense targets already tell the shapes apart.
    """
    colour = torch.zeros(len(scenes), grid * grid, dtype=torch.long)
    shape = torch.zeros(len(scenes), grid * grid, dtype=torch.long)
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            mask = Image.new("L", (scene.width, scene.height), 0)
            draw_shape(ImageDraw.Draw(mask), obj.shape, obj.bbox, 255)
            cover = torch.from_numpy(np.asarray(mask.resize((grid, grid), Image.BOX), dtype=np.float32)).flatten()
            inside = cover >= 128  # [g*g]: at least half the patch is this object
            colour[b][inside] = COLOUR_NAMES.index(obj.colour) + 1
            shape[b][inside] = SHAPES.index(obj.shape) + 1
    return colour, shape


class VisionHeads(nn.Module):
    """The throw-away linear heads of the vision objective."""

    def __init__(self, vision_width: int, query_width: int) -> None:
        super().__init__()
        n_col, n_shape = len(COLOUR_NAMES) + 1, len(SHAPES) + 1
        self.patch = nn.Linear(vision_width, n_col + n_shape)
        self.slot = nn.Linear(query_width, n_col + n_shape + len(SIZES) + 1 + 4)
        self.glob = nn.Linear(
            query_width,
            (MAX_COUNT + 1) * (1 + len(COLOUR_NAMES) + len(SHAPES)) + N_PAIRS + len(BACKGROUND_NAMES),
        )
        self.split_slot = (n_col, n_shape, len(SIZES) + 1, 4)
        self.split_glob = (
            MAX_COUNT + 1,
            (MAX_COUNT + 1) * len(COLOUR_NAMES),
            (MAX_COUNT + 1) * len(SHAPES),
            N_PAIRS,
            len(BACKGROUND_NAMES),
        )


def encode(model: TinyGPTV, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values [B, 3, S, S] -> (ViT tokens after ln_vision [B, 1+P, Dv], Q-Former outputs [B, N, Dq])."""
    interpolate = pixel_values.shape[-1] != model.config.vision.image_size
    tokens = model.vision_model(pixel_values, interpolate_pos_encoding=interpolate).last_hidden_state  # [B, 1+P, Dv]
    queries = model.query_tokens.expand(pixel_values.shape[0], -1, -1)  # [B, N, Dq]
    out = model.qformer(query_embeds=queries, encoder_hidden_states=tokens).last_hidden_state  # [B, N, Dq]
    return tokens, out


def n_slots(n_queries: int) -> int:
    """Queries 0..n-1 read one cell each; the demo's 32 queries give 9 slots, the tiny test model's 8 give 7."""
    return min(N_CELLS, n_queries - 1)


def head_outputs(heads: VisionHeads, queries: torch.Tensor) -> dict[str, torch.Tensor]:
    """Q-Former outputs [B, N, Dq] -> the slot and global logits, by name."""
    B, k = queries.shape[0], n_slots(queries.shape[1])
    slot = heads.slot(queries[:, :k])  # [B, k, 7+5+3+4]
    colour, shape, size, box = slot.split(heads.split_slot, dim=-1)
    glob = heads.glob(queries[:, k:].mean(1))  # [B, G]
    count, ccount, scount, pairs, background = glob.split(heads.split_glob, dim=-1)
    return {
        "colour": colour,
        "shape": shape,
        "size": size,
        "box": box.sigmoid(),  # [B, 9, 4] in 0..1
        "count": count,
        "colour_count": ccount.view(B, len(COLOUR_NAMES), MAX_COUNT + 1),
        "shape_count": scount.view(B, len(SHAPES), MAX_COUNT + 1),
        "pairs": pairs,
        "background": background,
    }


class CrossAttentionRecorder:
    """Records the slot queries' cross-attention probabilities in every Q-Former cross-attention layer.

    The probabilities are recomputed from the layer's own query/key projections (a forward hook), so the gradient of
    a loss on them reaches those projections, the query tokens and the ViT, whatever attention kernel runs the layer.
    """

    def __init__(self, qformer: nn.Module, n_queries: int) -> None:
        self.n = n_queries
        self.probs: list[torch.Tensor] = []
        self.handles = [
            layer.crossattention.attention.register_forward_hook(self._hook, with_kwargs=True)
            for layer in qformer.encoder.layer
            if hasattr(layer, "crossattention")
        ]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [B, N, Dq]
        enc = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]  # [B, 1+P, Dv]
        B, hs = hidden.shape[0], module.attention_head_size
        q = module.query(hidden[:, : self.n]).view(B, self.n, -1, hs).transpose(1, 2)  # [B, H, n, hs]
        k = module.key(enc).view(B, enc.shape[1], -1, hs).transpose(1, 2)  # [B, H, 1+P, hs]
        self.probs.append(torch.softmax((q @ k.transpose(-1, -2)) * module.scaling, dim=-1))  # [B, H, n, 1+P]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def attention_targets(scenes: list[Scene], grid: int, k: int) -> torch.Tensor:
    """Where slot c should look: the patches under its object's box, or under its cell when it is empty.

    -> [B, k, 1+grid*grid] distributions (0 on the CLS token), proportional to each patch's overlap with the region.
    """
    edges = torch.arange(grid + 1, dtype=torch.float32) / grid  # [g+1]
    lo, hi = edges[:-1], edges[1:]  # [g]

    def overlap(a: float, b: float) -> torch.Tensor:
        return (torch.minimum(hi, torch.tensor(b)) - torch.maximum(lo, torch.tensor(a))).clamp(min=0)  # [g]

    out = torch.zeros(len(scenes), k, 1 + grid * grid)
    for b, scene in enumerate(scenes):
        boxes = {o.cell: o.bbox for o in scene.objects}
        for c in range(k):
            if c in boxes:
                x, y, w, h = boxes[c]
                rect = (x / scene.width, y / scene.height, (x + w) / scene.width, (y + h) / scene.height)
            else:
                rect = ((c % 3) / 3, (c // 3) / 3, (c % 3 + 1) / 3, (c // 3 + 1) / 3)
            area = overlap(rect[1], rect[3])[:, None] * overlap(rect[0], rect[2])[None, :]  # [g, g]
            out[b, c, 1:] = area.flatten() / area.sum()
    return out


def vision_loss(
    heads: VisionHeads,
    tokens: torch.Tensor,
    queries: torch.Tensor,
    scenes: list[Scene],
    attention: list[torch.Tensor] | None = None,
    box_weight: float = 10.0,
    occupied_weight: float = 3.0,
    attention_weight: float = 1.0,
    patch_shape_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The summed objective of one batch and its parts (for the log).

    The patch head's shape term is scored on the patches an object covers only: over all patches, the ~90 % of
    background patches (whose "no shape" the colour term already gives) drown it, and the ViT stays at the majority
    shape for hundreds of steps (measured: object patches only, 0.58 held-out patch shape after 248 steps of 32 on a
    pool of 2,000 scenes, against 0.41 and still rising slowly with the all-patch term).
    """
    t = scene_targets(scenes)
    grid = int(round((tokens.shape[1] - 1) ** 0.5))
    p_colour, p_shape = patch_targets(scenes, grid)
    patch = heads.patch(tokens[:, 1:])  # [B, P, 7+5]
    n_col = len(COLOUR_NAMES) + 1
    on = p_colour > 0  # [B, P] the patches an object covers
    parts = {"patch": F.cross_entropy(patch[..., :n_col].flatten(0, 1), p_colour.flatten())}
    if on.any():
        parts["patch"] = parts["patch"] + patch_shape_weight * F.cross_entropy(patch[..., n_col:][on], p_shape[on])
    o = head_outputs(heads, queries)
    k = o["colour"].shape[1]
    t = _keep_slots(t, k)
    occupied = (t.cell_colour > 0).float()  # [B, k]
    weight = (1.0 + (occupied_weight - 1.0) * occupied).flatten()  # the many empty cells must not drown the objects
    slot_ce = sum(
        F.cross_entropy(o[name].flatten(0, 1), target.flatten(), reduction="none")
        for name, target in (("colour", t.cell_colour), ("shape", t.cell_shape), ("size", t.cell_size))
    )
    parts["slot"] = (slot_ce * weight).sum() / weight.sum()
    l1 = (o["box"] - t.cell_box).abs().sum(-1)  # [B, k]
    parts["box"] = box_weight * (l1 * occupied).sum() / occupied.sum().clamp(min=1)
    parts["global"] = (
        F.cross_entropy(o["count"], t.count)
        + F.cross_entropy(o["colour_count"].flatten(0, 1), t.colour_count.flatten())
        + F.cross_entropy(o["shape_count"].flatten(0, 1), t.shape_count.flatten())
        + F.binary_cross_entropy_with_logits(o["pairs"], t.pairs)
        + F.cross_entropy(o["background"], t.background)
    )
    if attention:
        target = attention_targets(scenes, grid, k)  # [B, k, 1+P]
        parts["attention"] = (
            attention_weight
            * sum(-(target * probs.mean(1).clamp(min=1e-8).log()).sum(-1).mean() for probs in attention)
            / len(attention)
        )
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def _keep_slots(t: SceneTargets, k: int) -> SceneTargets:
    """The cell targets of the first k cells (all 9 in the demo)."""
    if k == N_CELLS:
        return t
    return SceneTargets(t.cell_colour[:, :k], t.cell_shape[:, :k], t.cell_size[:, :k], t.cell_box[:, :k], t.count,
                        t.colour_count, t.shape_count, t.pairs, t.background)  # fmt: skip


def pixels(scenes: list[Scene], model: TinyGPTV, size: int) -> torch.Tensor:
    """The scenes' images as the stages see them: JPEG (the writers' quality), then core.image's bicubic squash and
    CLIP mean/std -> [B, 3, S, S]."""
    image_cfg = model.config.image.replace(size=size)
    decoded = [Image.open(io.BytesIO(encode_jpeg(s))) for s in scenes]
    return torch.stack([torch.from_numpy(preprocess_for(img, image_cfg)) for img in decoded])


@dataclass(frozen=True)
class VisionPhase:
    steps: int = 500
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    sizes: tuple[int, ...] = (64, 128)  # the stages' 64 px and stage 4's 128 px (interpolated position embeddings)
    mixed_from: float = 0.5  # the first half of the steps at sizes[0] only, then the sizes in turn
    attention_weight: float = 1.0  # the slot queries' cross-attention supervision (0 = off)
    patch_shape_weight: float = 1.0  # the patch head's shape term (object patches only) against its colour term
    log_every: int = 25

    def size_at(self, step: int) -> int:
        if step < self.mixed_from * self.steps:
            return self.sizes[0]
        return self.sizes[step % len(self.sizes)]


def sincos_position_embeddings(grid: int, dim: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embeddings (half the channels for rows, half for columns), CLS at zero.

    -> [1, 1 + grid*grid, dim]. Used as the *initial* value of the ViT's learned position embeddings: BLIP-2's
    initialisation (std 0.02) leaves the patch tokens almost without position, and then the Q-Former's queries have
    nothing to tell the cells apart by (measured: its cross-attention stayed uniform for 30+ steps).
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # [D/4]
    pos = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # [g, g] each

    def embed(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.flatten()[:, None] * omega[None]  # [g*g, D/4]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [g*g, D/2]

    table = torch.cat([embed(rows), embed(cols)], dim=1)  # [g*g, 4*(D/4)]
    out = torch.zeros(1, 1 + grid * grid, dim)
    out[0, 1:, : table.shape[1]] = table
    return out


def train_vision(
    model: TinyGPTV, world, phase: VisionPhase, deadline: float | None = None, start_index: int = 0
) -> dict:
    """Train `model`'s ViT, Q-Former and query tokens on fresh training scenes; return the loss log and timing."""
    heads = VisionHeads(model.config.vision.hidden_size, model.config.qformer.hidden_size)
    v = model.config.vision
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.copy_(
            sincos_position_embeddings(v.image_size // v.patch_size, v.hidden_size)
        )
    params = [*model.vision_model.parameters(), *model.qformer.parameters(), model.query_tokens, *heads.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": phase.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=phase.lr,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optim, _warmup_cosine(phase.warmup_steps, phase.steps))
    model.vision_model.train(), model.qformer.train()
    recorder = CrossAttentionRecorder(model.qformer, n_slots(model.config.num_image_tokens))
    log, t0, cpu0, index = [], time.time(), time.process_time(), start_index
    for step in range(phase.steps):
        if deadline is not None and time.time() > deadline:
            logger.warning("vision bootstrap: time budget reached after %d of %d steps", step, phase.steps)
            break
        scenes = [world.scene(index + k, "train") for k in range(phase.batch_size)]
        index += phase.batch_size
        size = phase.size_at(step)
        recorder.probs.clear()
        tokens, queries = encode(model, pixels(scenes, model, size))  # [B, 1+P, Dv], [B, N, Dq]
        attention = recorder.probs if phase.attention_weight else None
        loss, parts = vision_loss(
            heads,
            tokens,
            queries,
            scenes,
            attention,
            attention_weight=phase.attention_weight,
            patch_shape_weight=phase.patch_shape_weight,
        )
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        schedule.step()
        if step % phase.log_every == 0 or step == phase.steps - 1:
            entry = {
                "step": step,
                "size": size,
                "loss": round(loss.item(), 4),
                **{k: round(v, 4) for k, v in parts.items()},
            }
            entry["wall_s"] = round(time.time() - t0, 1)
            log.append(entry)
            logger.info("vision step %d/%d %s", step, phase.steps, entry)
    recorder.remove()
    model.vision_model.eval(), model.qformer.eval()
    return {
        "steps_done": step + 1 if phase.steps else 0,
        "images_seen": index - start_index,
        "wall_s": round(time.time() - t0, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
        "log": log,
        "heads": heads,
    }


def _warmup_cosine(warmup: int, total: int):
    import math

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        phase = min(step - warmup, max(total - warmup, 1)) / max(total - warmup, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * phase))

    return factor


@torch.no_grad()
def evaluate_heads(model: TinyGPTV, heads: VisionHeads, world, n: int, size: int, split: str = "val") -> dict:
    """Held-out accuracy of the linear heads on frozen features: how linearly the Q-Former outputs hold the scene.

    `patch_colour` / `patch_shape` score the patch head on the patches an object covers, so a property the slots miss
    can be told apart: lost in the ViT tokens already, or only in the Q-Former's reading of them.
    """
    scenes = [world.scene(i, split) for i in range(n)]
    correct: dict[str, list[float]] = {k: [] for k in ("colour", "shape", "size", "empty", "box_iou50", "count")}
    correct.update(colour_count=[], shape_count=[], pairs=[], background=[], patch_colour=[], patch_shape=[])
    n_col = len(COLOUR_NAMES) + 1
    for start in range(0, n, 64):
        chunk = scenes[start : start + 64]
        tokens, queries = encode(model, pixels(chunk, model, size))  # [B, 1+P, Dv], [B, N, Dq]
        # the patch head on patches an object covers: what the ViT tokens hold before the Q-Former reads them
        p_colour, p_shape = patch_targets(chunk, int(round((tokens.shape[1] - 1) ** 0.5)))  # [B, P] each
        patch = heads.patch(tokens[:, 1:])  # [B, P, 7+5]
        on = p_colour > 0
        correct["patch_colour"] += (patch[..., :n_col].argmax(-1) == p_colour)[on].float().tolist()
        correct["patch_shape"] += (patch[..., n_col:].argmax(-1) == p_shape)[on].float().tolist()
        o = head_outputs(heads, queries)
        t = _keep_slots(scene_targets(chunk), o["colour"].shape[1])
        occ = t.cell_colour > 0  # [B, 9]
        correct["empty"] += ((o["colour"].argmax(-1) > 0) == occ).float().flatten().tolist()
        for key, target in (("colour", t.cell_colour), ("shape", t.cell_shape), ("size", t.cell_size)):
            correct[key] += (o[key].argmax(-1) == target)[occ].float().tolist()
        for b, c in occ.nonzero().tolist():
            correct["box_iou50"].append(float(iou(o["box"][b, c].tolist(), t.cell_box[b, c].tolist()) >= 0.5))
        correct["count"] += (o["count"].argmax(-1) == t.count).float().tolist()
        correct["colour_count"] += (o["colour_count"].argmax(-1) == t.colour_count).float().flatten().tolist()
        correct["shape_count"] += (o["shape_count"].argmax(-1) == t.shape_count).float().flatten().tolist()
        correct["pairs"] += ((o["pairs"] > 0).float() == t.pairs).float().flatten().tolist()
        correct["background"] += (o["background"].argmax(-1) == t.background).float().tolist()
    return {k: round(sum(v) / max(len(v), 1), 4) for k, v in correct.items()}
