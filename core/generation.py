"""Generation with the PyTorch model: prefill, then KV-cached decode steps; greedy or sampled.

This is the reference the runtime's numpy sampler and ONNX decode loop are checked against, so it keeps the same rules:
left padding for batches, positions counted over real tokens, repetition penalty as in transformers (divide positive
logits, multiply negative ones), then temperature, top-k, top-p, and one seeded draw per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from core.phi import KVCache, position_ids_from_mask
from core.prompts import cut_at_stop


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens per row, stop token excluded
    texts: list[str] | None = None
    stopped: list[bool] = field(default_factory=list)  # True where a stop id or string ended the row


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (input_ids [B, T], attention_mask [B, T]) padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def process_logits(
    logits: torch.Tensor,
    seen: list[list[int]],
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
) -> torch.Tensor:
    """logits [B, V] -> processed logits [B, V] (-inf where a token may not be drawn)."""
    logits = logits.float().clone()
    if repetition_penalty != 1.0:
        for row, tokens in enumerate(seen):
            if tokens:
                idx = torch.tensor(sorted(set(tokens)), dtype=torch.long)
                vals = logits[row, idx]
                logits[row, idx] = torch.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
    if temperature <= 0:
        return logits
    logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)  # [B]
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # [B]


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    pixel_values: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop_ids: tuple[int, ...] | None = None,
    stop_strings: tuple[str, ...] = (),
    tokenizer=None,
    use_cache: bool = True,
) -> GenerationOutput:
    """prompts: token rows from `TextTokenizer.encode_prompt` (image ids in place); pixel_values [B, 3, S, S] or None."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the text")
    cfg = model.config
    stop_ids = tuple(stop_ids) if stop_ids is not None else (cfg.language_model.eos_token_id,)
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > cfg.language_model.max_position_embeddings:
        raise ValueError(
            f"prompt {max(len(p) for p in prompts)} tokens + {max_new_tokens} new tokens "
            f"> context {cfg.language_model.max_position_embeddings}"
        )
    input_ids, mask = left_pad(prompts, cfg.language_model.eos_token_id)
    input_ids, mask = input_ids.to(device), mask.to(device)
    model.check_image_tokens(input_ids)
    if image_features is None and pixel_values is not None:
        image_features = model.encode_image(pixel_values.to(device))  # [B, N, D]
    if image_features is None:
        image_features = torch.zeros(len(prompts), 1, cfg.language_model.hidden_size, device=device)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    B = len(prompts)
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    stopped = [False] * B
    seen = [list(p) for p in prompts]
    embeds = model.embed(input_ids, image_features)  # [B, T, D]
    past: KVCache | None = None

    # --- prefill: the whole prompt at once; then one token per step from the cache
    logits, past = model.decode(embeds, mask, position_ids_from_mask(mask, embeds.shape[1]), None)
    image_id = cfg.prompt.image_token_id
    for _step in range(max_new_tokens):
        step_logits = logits[:, -1].clone()  # [B, V]
        step_logits[:, image_id] = float("-inf")  # the image id stands for an image vector, never for text
        scores = process_logits(step_logits, seen, temperature, top_k, top_p, repetition_penalty)
        next_ids = pick(scores, temperature, generator).cpu().tolist()
        for row, token in enumerate(next_ids):
            if done[row]:
                continue
            if token in stop_ids:
                done[row] = stopped[row] = True
                continue
            new[row].append(token)
            seen[row].append(token)
            if stop_strings and cut_at_stop(tokenizer.decode(new[row]), stop_strings)[1]:
                done[row] = stopped[row] = True
        if all(done):
            break
        # --- decode step
        step_ids = torch.tensor(next_ids, dtype=torch.long, device=device)[:, None]  # [B, 1]
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)  # [B, P+1]
        if use_cache:
            step_embeds = model.language_model.embed_tokens(step_ids)  # [B, 1, D]
            logits, past = model.decode(step_embeds, mask, position_ids_from_mask(mask, 1), past)
        else:
            embeds = torch.cat([embeds, model.language_model.embed_tokens(step_ids)], dim=1)  # [B, P+1, D]
            logits, _ = model.decode(embeds, mask, position_ids_from_mask(mask, embeds.shape[1]), None)

    texts = None
    if tokenizer is not None:
        texts = [
            cut_at_stop(tokenizer.decode(t), stop_strings)[0] if stop_strings else tokenizer.decode(t) for t in new
        ]
    return GenerationOutput(tokens=new, texts=texts, stopped=stopped)
