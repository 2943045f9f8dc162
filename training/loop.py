"""The one training loop of all four stages, on accelerate: CPU, one GPU, DDP across GPUs and nodes.

    result = train_stage(model, stage, batches, collator, out_dir)                 # resume=True continues a run
    accelerate launch --num_processes 8 -m training --preset tinygptv --stage 4 ... # 8 GPUs, DDP

`batches(state)` is a function that returns an endless iterator of `(samples, state)`: a list of samples for this
process and the data position right after them (see `loader_batches`). The loop keeps the position of the last batch
it trained on, so a resumed run reads exactly the batch that came next.

Per optimizer step: `grad_accum` micro-batches are collated (in a background thread), the number of supervised tokens
of the whole step is summed over micro-batches and processes, and each micro-batch's loss is its token loss *sum*
divided by that global count (times the world size, which DDP's gradient mean divides out). So the gradient is the
mean over every answer token of the global batch, whatever the split into processes and micro-batches, and one
process with batch 2B gives what two with batch B give. (The original averages per batch; with equal token counts
that is the same.) Then clipping, the warm-up + cosine rate of this step, AdamW, and every `log_every` steps a JSON
line in `metrics.jsonl` (loss, lr, grad norm, tokens/s) and the tqdm bar (shown only on a terminal).

Precision: on GPU, bf16 autocast (fp16 + loss scaling where bf16 is missing) with fp32 trainable parameters and the
frozen parts cast to the compute dtype, as the original keeps its frozen ViT and Phi-2 in fp16; on CPU fp32, or bf16
autocast with `precision="bf16"` (faster on CPUs with bf16 units). SIGINT/SIGTERM finish the current step, write a
checkpoint and return, so a pre-empted job resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from training.collate import IGNORE, Batch, Collator
from training.data.sample import Sample
from training.freeze import set_train_mode, trainable_state
from training.stages import StageConfig

logger = logging.getLogger(__name__)

BatchSource = Callable[[dict | None], Iterator[tuple[list[Sample], dict]]]
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to train): set by the CLI."""

    precision: str = "auto"  # auto | no | bf16 | fp16 ; auto = bf16 (or fp16) on GPU, no (fp32) on CPU
    cpu: bool = False  # force the CPU even where a GPU is present
    frozen_dtype: str = "auto"  # auto (= the compute dtype) | float32 | bfloat16 | float16
    prefetch: int = 2  # batches collated ahead in a background thread (0 = in the loop)
    progress: bool | None = None  # None: a tqdm bar when stderr is a terminal
    stop_after: int | None = None  # stop (with a checkpoint) after this step, as if pre-empted


@dataclass
class StageResult:
    steps: int
    loss: float  # token-mean loss over the last log window
    elapsed_s: float
    interrupted: bool
    checkpoint: Path | None


def loader_batches(loader, batch_size: int, seed: int | str, rank: int = 0, world_size: int = 1) -> BatchSource:
    """Fixed-size batches from a loader's resumable `stream` (training.data.loaders_base)."""

    def make(state: dict | None) -> Iterator[tuple[list[Sample], dict]]:
        stream = loader.stream(seed, state, rank, world_size)
        while True:
            samples = []
            for _ in range(batch_size):
                sample, position = next(stream)
                samples.append(sample)
            yield samples, position

    return make


def make_accelerator(options: RunOptions = RunOptions()):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    precision = options.precision
    if precision == "auto":
        on_gpu = torch.cuda.is_available() and not options.cpu
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "no"
    # every parameter takes part in every step (the collator always sends pixels), so no unused-parameter search
    ddp = DistributedDataParallelKwargs(find_unused_parameters=False)
    return Accelerator(cpu=options.cpu, mixed_precision=precision, kwargs_handlers=[ddp])


class _Prefetch:
    """Collate batches ahead in a thread; each item is (Batch list of one step, data position after it)."""

    def __init__(self, source: Iterator, collator: Collator, accum: int, depth: int) -> None:
        self.source, self.collator, self.accum = source, collator, accum
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True) if depth > 0 else None
        if self.thread:
            self.thread.start()

    def _step(self) -> tuple[list[Batch], dict]:
        batches, position = [], None
        for _ in range(self.accum):
            samples, position = next(self.source)
            batches.append(self.collator(samples))
        return batches, position

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                item = self._step()
            except BaseException as err:  # handed to the training thread, which raises it
                item = err
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self) -> tuple[list[Batch], dict]:
        if self.thread is None:
            return self._step()
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        if self.thread:
            self.thread.join(timeout=5)


@contextmanager
def _stop_on_signal():
    """A flag set by SIGINT/SIGTERM (a second SIGINT interrupts at once); handlers restored afterwards."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):  # noqa: ARG001
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        logger.warning("signal %d: finishing this step, writing a checkpoint, then stopping", signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def build_optimizer(model: nn.Module, stage: StageConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on 1-D tensors, biases and norms (the original's rule: ndim < 2, "bias", "ln", "bn")."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name
        (no_decay if plain else decay).append(param)
    groups = [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=stage.schedule.lr_at(0), betas=tuple(stage.betas))


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen ViT and language-model weights in `dtype` (trainable ones and the Q-Former stay fp32, as the original)."""
    for part in (model.vision_model, model.language_model):
        for param in part.parameters():
            if not param.requires_grad:
                param.data = param.data.to(dtype)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over supervised positions; logits [B, T, V], labels [B, T]."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B*(T-1), V]
    shift_labels = labels[:, 1:].reshape(-1)  # [B*(T-1)]
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")


def _resolve_frozen_dtype(options: RunOptions, accelerator) -> torch.dtype | None:
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if options.frozen_dtype != "auto":
        return names[options.frozen_dtype]
    if accelerator.device.type == "cuda":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    return None


def train_stage(
    model: nn.Module,
    stage: StageConfig,
    batches: BatchSource,
    collator: Collator,
    out_dir: str | Path,
    resume: bool = False,
    options: RunOptions = RunOptions(),
    accelerator=None,
) -> StageResult:
    """Train `model` (trainable flags already set) for one stage; checkpoints and metrics go to `out_dir`."""
    from accelerate.utils import set_seed
    from tqdm import tqdm

    out_dir = Path(out_dir)
    accelerator = accelerator or make_accelerator(options)
    if str(accelerator.distributed_type).endswith("FSDP"):
        # Untested here (no GPUs) and not needed for memory: the frozen 3.7 B parameters take 7.5 GB in bf16 on every
        # GPU, the 55 M trainable ones and their AdamW state 0.9 GB. Refuse rather than write unreadable checkpoints.
        raise NotImplementedError(
            "FSDP checkpoints are not implemented; launch with DDP (accelerate launch --multi_gpu)"
        )
    rank, world = accelerator.process_index, accelerator.num_processes
    frozen_dtype = _resolve_frozen_dtype(options, accelerator)
    if frozen_dtype is not None:
        cast_frozen(model, frozen_dtype)
    optimizer = build_optimizer(model, stage)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(wrapped)
    set_train_mode(inner)
    params = [p for p in inner.parameters() if p.requires_grad]

    start, position, counters = 0, None, {"samples": 0, "tokens": 0, "targets": 0}
    found = latest_checkpoint(out_dir) if resume else None
    if found is not None:
        start, position, meta = load_checkpoint(found, inner, optimizer, accelerator)
        counters.update(meta.get("counters", {}))
        logger.info("resumed %s from %s (step %d of %d)", stage.name, found, start, stage.schedule.max_steps)
    else:
        set_seed(stage.seed + rank)  # the original's seed + rank
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        _trim_metrics(out_dir / METRICS, start)
        stage.to_json(out_dir / "stage.json")

    total = stage.schedule.max_steps
    show = options.progress if options.progress is not None else sys.stderr.isatty()
    bar = tqdm(
        total=total, initial=start, desc=stage.name, unit="step", disable=not (show and accelerator.is_main_process)
    )
    prefetch = _Prefetch(batches(position), collator, stage.grad_accum, options.prefetch)
    window = {"loss": 0.0, "targets": 0, "tokens": 0, "time": 0.0, "truncated": 0}
    began, last_loss, step, interrupted, checkpoint = time.perf_counter(), float("nan"), start, False, None
    try:
        with _stop_on_signal() as signal_flag:
            for step in range(start + 1, total + 1):
                tick = time.perf_counter()
                micro, position = prefetch.next()
                stop_local = 1.0 if signal_flag["stop"] else 0.0
                counts = torch.tensor(
                    [
                        sum(b.n_targets for b in micro),
                        sum(b.n_tokens for b in micro),
                        sum(b.n_samples for b in micro),
                        stop_local,
                    ],
                    dtype=torch.float64,
                    device=accelerator.device,
                )
                counts = accelerator.reduce(counts, "sum") if world > 1 else counts
                targets = counts[0].item()
                lr = stage.schedule.lr_at(step - 1)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=accelerator.device)
                for i, batch in enumerate(micro):
                    batch = batch.to(accelerator.device)
                    last = i == len(micro) - 1
                    with nullcontext() if last or world == 1 else accelerator.no_sync(wrapped):
                        out = wrapped(batch.input_ids, batch.attention_mask, pixel_values=batch.pixel_values)
                        summed = token_loss_sum(out["logits"], batch.labels)
                        accelerator.backward(summed * world / max(targets, 1.0))
                    loss_sum += summed.detach()
                norm = accelerator.clip_grad_norm_(params, stage.max_grad_norm or float("inf"))
                if targets > 0:
                    optimizer.step()
                else:
                    logger.warning("step %d: no supervised token in the whole batch; skipped the update", step)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = accelerator.reduce(loss_sum, "sum") if world > 1 else loss_sum
                last_loss = loss_sum.item() / max(targets, 1.0)
                elapsed = time.perf_counter() - tick
                for key, value in (("targets", targets), ("tokens", counts[1].item()), ("samples", counts[2].item())):
                    counters[key] += int(value)
                window["loss"] += loss_sum.item()
                window["targets"] += targets
                window["tokens"] += counts[1].item()
                window["time"] += elapsed
                window["truncated"] += sum(b.truncated for b in micro)
                bar.update(1)
                if step % stage.log_every == 0 or step == total:
                    record = {
                        "step": step,
                        "loss": round(window["loss"] / max(window["targets"], 1.0), 6),
                        "lr": lr,
                        "grad_norm": round(float(norm), 6),
                        "tokens_per_s": round(window["tokens"] / max(window["time"], 1e-9), 1),
                        "targets": int(window["targets"]),
                        "samples": counters["samples"],
                        "truncated": window["truncated"],  # rows cut to max_txt_len on this process
                        "elapsed_s": round(time.perf_counter() - began, 2),
                    }
                    bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    if accelerator.is_main_process:
                        with open(out_dir / METRICS, "a") as f:
                            f.write(json.dumps(record) + "\n")
                    window = {"loss": 0.0, "targets": 0, "tokens": 0, "time": 0.0, "truncated": 0}
                stop = counts[3].item() > 0 or (options.stop_after is not None and step >= options.stop_after)
                if step % stage.save_every == 0 or step == total or stop:
                    meta = {"stage": stage.to_dict(), "counters": counters, "loss": last_loss}
                    checkpoint = save_checkpoint(
                        out_dir, step, inner, optimizer, position, meta, accelerator, keep=stage.keep_checkpoints
                    )
                if stop and step < total:
                    interrupted = True
                    break
    finally:
        prefetch.close()
        bar.close()
    if not interrupted and accelerator.is_main_process:
        from core.weights import save_safetensors

        save_safetensors(trainable_state(inner), out_dir / "trainable.safetensors")
        (out_dir / "done.json").write_text(json.dumps({"steps": step, "loss": last_loss, "counters": counters}) + "\n")
    accelerator.wait_for_everyone()
    return StageResult(step, last_loss, time.perf_counter() - began, interrupted, checkpoint)


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
