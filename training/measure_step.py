"""Time and peak memory of one training step at a preset's real size, with random weights (no download needed).

    python -m training.measure_step --preset tinygptv --stage 4 --batch 3 --text-tokens 200          # GPU, bf16, LoRA
    python -m training.measure_step --preset tinygptv --stage 4 --batch 3 --text-tokens 200 --qlora  # 4-bit LM
    python -m training.measure_step --preset demo --stage 4 --batch 8 --cpu                          # a CPU check

It answers the original's claim that training fits a 24 GB GPU: the model is built directly on the device, frozen
parts in the compute dtype (bf16 on GPU; fp32 on CPU), the stage's trainable set (projector, norm weights, LoRA) in
fp32 under AdamW, and one sequence per row = BOS + the image tokens + `--text-tokens` text tokens, half of them
supervised. It prints one JSON line: step time (mean of `--steps` after one warm-up step), peak memory, and the
memory the weights alone take.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from core.config import ModelConfig
from core.model import TinyGPTV
from training.freeze import set_train_mode, set_trainable
from training.loop import build_optimizer, cast_frozen, token_loss_sum
from training.lora import add_lora, quantize_language_model
from training.stages import StageConfig


def measure(preset: str, stage_n: int, batch: int, text_tokens: int, steps: int, device: str, qlora: bool) -> dict:
    scale = preset if preset in ("demo", "tiny") else "tinygptv"
    stage = StageConfig.preset(f"stage{stage_n}", scale)
    cfg = ModelConfig.preset(preset)
    cfg = cfg.replace(image=cfg.image.replace(size=stage.image_size))
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    with torch.device("cpu" if qlora else device):  # bitsandbytes quantizes when the CPU weights move to the GPU
        model = TinyGPTV(cfg)
    if qlora:
        quantize_language_model(model, compute_dtype=dtype)
    add_lora(model, stage.lora)
    counts = set_trainable(model)
    cast_frozen(model, dtype)
    model.to(device)
    set_train_mode(model)
    optimizer = build_optimizer(model, stage)
    if cuda:
        torch.cuda.synchronize()
        weights_gb = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    else:
        weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30

    n_img, lm = cfg.num_image_tokens, cfg.language_model
    ids = torch.randint(1, min(lm.vocab_size, cfg.prompt.image_token_id), (batch, 1 + n_img + text_tokens))
    ids[:, 0] = lm.bos_token_id
    ids[:, 1 : 1 + n_img] = cfg.prompt.image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -(text_tokens // 2) :] = ids[:, -(text_tokens // 2) :]
    ids, labels, mask = ids.to(device), labels.to(device), torch.ones_like(ids).to(device)
    pixels = torch.randn(batch, 3, stage.image_size, stage.image_size, device=device)

    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype, enabled=cuda):
            logits = model(ids, mask, pixel_values=pixels)["logits"]  # [B, T, V]
        loss = token_loss_sum(logits, labels) / (labels[:, 1:] != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i > 0:  # the first step pays for allocations and kernel selection
            times.append(time.perf_counter() - start)
    peak_gb = (
        torch.cuda.max_memory_allocated() / 2**30
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB -> GiB)
    )
    return {
        "preset": preset,
        "stage": stage_n,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "qlora": qlora,
        "batch": batch,
        "sequence": int(ids.shape[1]),
        "image_size": stage.image_size,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_trainable": counts,
        "loss": round(loss.item(), 4),
        "step_s": round(sum(times) / len(times), 4),
        "weights_gb": round(weights_gb, 3),
        "peak_gb": round(peak_gb, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.measure_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("tinygptv", "demo", "tiny"), default="tinygptv")
    p.add_argument("--stage", type=int, choices=(1, 2, 3, 4), default=4)
    p.add_argument("--batch", type=int, default=3, help="rows per step (the original's stage 4: 1-3 per dataset)")
    p.add_argument("--text-tokens", type=int, default=200, help="text tokens per row after the image")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--cpu", action="store_true", help="measure on the CPU even where a GPU is present")
    p.add_argument("--qlora", action="store_true", help="4-bit NF4 language model (needs bitsandbytes)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    if args.preset == "tinygptv" and device == "cpu":
        print("note: the real size on a CPU needs ~20 GB of RAM and minutes per step", file=sys.stderr)
    print(json.dumps(measure(args.preset, args.stage, args.batch, args.text_tokens, args.steps, device, args.qlora)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
