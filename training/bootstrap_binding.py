"""Bootstrap, part 2b: point one attention head of the language model at the image token of the object a turn is about.

The language phase has to discover, from the answer loss alone, that "what colour is the circle?" is answered by
attending from the answer to the one image token that holds the circle. From scratch this is a long plateau: the
answer priors and whatever all image tokens share (the count) are learnt first, the selection of one object last
(issue 3 notes). The vision bootstrap already gives the image tokens a known layout: Q-Former query k holds the
object in cell k of the world's 3x3 grid (its slot heads and cross-attention targets, bootstrap_vision), and the
projector keeps the order, so the k-th image token of a sequence is cell k.

So, as the vision phase supervises the Q-Former's cross-attention, this supervises the decoder's: for every turn
about one object (VQA colour / shape / position / "is there" with answer yes, refer, identify), one head of one
layer, at every position that predicts one of the answer's tokens, is trained to attend to that object's image token
(`-log p(target)`, added to the answer loss with `LanguagePhase.binding_weight`). The head and the rest of the model
stay free otherwise; questions about no single object (counts, "is there" with answer no, captions) add nothing.
Every answer token, not only the first: a box's four numbers are read off the object one by one, and with the first
token alone supervised the later ones drifted to the object's neighbours (measured in the language phase alone,
1,200 steps, 144 held-out scenes: refer 0.29 -> 0.53, the box on the right object 0.58 -> 0.94 of the time,
position 0.55 -> 0.83).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.phi import PhiDecoder, apply_rotary
from training.collate import IGNORE
from training.data.sample import Sample
from training.data.synthetic_scene import Scene
from training.data.synthetic_tasks import vqa_candidates


def turn_cell(scene: Scene, source: str, meta: dict) -> int | None:
    """The grid cell (= Q-Former query index) of the one object a tagged turn is about, or None."""
    if source == "synthetic_vqa":
        for qa in vqa_candidates(scene)[meta["qtype"]]:
            if qa.question == meta["question"] and qa.answer == meta["answer"] and qa.target is not None:
                return scene.objects[qa.target].cell
        return None
    if source in ("synthetic_refer", "synthetic_identify"):
        box = tuple(meta["gt_box"])
        cells = [o.cell for o in scene.objects if o.grid_box(scene.width, scene.height) == box]
        return cells[0] if len(cells) == 1 else None
    return None


def binding_targets(
    ids: torch.Tensor, labels: torch.Tensor, cells: list[list[int | None]], image_token_id: int
) -> torch.Tensor:
    """[n, 3] rows of (batch row, query position, key position): every position that predicts an answer token of a
    turn (all but the answer's closing EOS), with the image token of the turn's cell. ids, labels [B, T]; cells[b]
    lists row b's turns in order (None where a turn is about no single object); turns cut off by truncation are
    dropped."""
    out = []
    for b, row_cells in enumerate(cells):
        if not any(c is not None for c in row_cells):
            continue
        is_answer = torch.cat([labels[b] != IGNORE, torch.tensor([False])])  # [T+1], closed at the end
        starts = (is_answer[1:] & ~is_answer[:-1]).nonzero().flatten() + 1  # first token of each answer run
        ends = (is_answer[:-1] & ~is_answer[1:]).nonzero().flatten() + 1  # one past its last token (the EOS)
        image = (ids[b] == image_token_id).nonzero().flatten()
        for turn, (start, end) in enumerate(zip(starts.tolist()[: len(row_cells)], ends.tolist())):
            cell = row_cells[turn]
            if cell is not None and cell < len(image):
                out.extend((b, t - 1, int(image[cell])) for t in range(start, max(end - 1, start + 1)))
    return torch.tensor(out, dtype=torch.long).reshape(-1, 3)


class AnswerAttention:
    """A forward hook on one attention layer that scores one head's attention at the target positions.

    Set `targets` (from `binding_targets`) before the forward pass; after it, `loss` holds the mean of -log of the
    head's attention probability on each target image token (0 when there are no targets).
    """

    def __init__(self, decoders: list[PhiDecoder], layer: int, head: int) -> None:
        self.head = head
        self.targets = torch.zeros(0, 3, dtype=torch.long)
        self.loss: torch.Tensor = torch.zeros(())
        self.handles = [d.model.layers[layer].self_attn.register_forward_hook(self._hook) for d in decoders]

    def _hook(self, module: nn.Module, args: tuple, output) -> None:
        x, cos, sin, mask, _ = args  # x [B, T, D] (after input_layernorm), cos/sin [B, 1, T, rot], mask [B, 1, T, T]
        if len(self.targets) == 0:
            self.loss = x.new_zeros(())
            return
        head = slice(self.head * module.head_size, (self.head + 1) * module.head_size)
        b, t_query, t_key = self.targets.unbind(1)
        # only this head's rows of q_proj / k_proj, and q only where it is scored
        q = F.linear(x[b, t_query], module.q_proj.weight[head], module.q_proj.bias[head])  # [n, hs]
        k = F.linear(x, module.k_proj.weight[head], module.k_proj.bias[head])  # [B, T, hs]
        if module.qk_layernorm:
            q, k = module.q_layernorm(q), module.k_layernorm(k)
        q = apply_rotary(q, cos[b, 0, t_query], sin[b, 0, t_query])
        k = apply_rotary(k, cos[:, 0], sin[:, 0])
        scores = torch.einsum("nd,ntd->nt", q, k[b]) * module.head_size**-0.5 + mask[b, 0, t_query]  # [n, T]
        logp = torch.log_softmax(scores.float(), dim=-1)
        self.loss = -logp.gather(1, t_key[:, None]).mean()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def sample_cells(scene: Scene, sample: Sample, extra: list[tuple[str, dict]]) -> list[int | None]:
    """Cells of a sequence's turns: the first from the sample itself, the later ones from (source, meta) pairs."""
    return [turn_cell(scene, sample.source, sample.meta), *(turn_cell(scene, s, m) for s, m in extra)]
