"""Checkpoints that resume exactly: trainable tensors, optimizer, schedule position, RNG states and data position.

    save_checkpoint(run_dir, step, model, optimizer, rank_state, meta, accelerator)
    path = latest_checkpoint(run_dir)                  # run_dir/checkpoints/step-000300, or None
    step, rank_state, meta = load_checkpoint(path, model, optimizer, accelerator)

A checkpoint is a folder `checkpoints/step-NNNNNN/`:
- `trainable.safetensors`  the parameters with requires_grad (projector, norm weights, LoRA), as the original keeps;
- `optimizer.safetensors` + `optimizer.json`  AdamW's moment tensors, and its param groups with the parameter names;
- `state.json`  step, world size, the stage config, counters (the schedule is a pure function of the step);
- `rank{r}.json` + `rank{r}.rng.safetensors`  per process: the data stream's position and the python, numpy, torch
  (and CUDA) RNG states.
No pickle anywhere. Every process writes its own rank files into `step-NNNNNN.tmp/`; rank 0 writes the rest and
renames the folder, then rewrites `checkpoints/latest`; a crash mid-write leaves only a `.tmp` folder, which is never
read. All processes must see the same file system (one node, or a shared disk across nodes).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.weights import load_safetensors, save_safetensors
from training.freeze import trainable_state

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run resuming from it."""


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- RNG
def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of every RNG this process draws from."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# ---------------------------------------------------------------------------------------------- optimizer
def _optimizer_parts(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict[str, torch.Tensor]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return {"param_groups": groups, "scalars": scalars, "param_names": names}, tensors


def _load_optimizer(optimizer: torch.optim.Optimizer, plain: dict, tensors: dict, names: list[str]) -> None:
    if plain["param_names"] != names:
        raise CheckpointError(
            f"the checkpoint's optimizer holds {len(plain['param_names'])} parameters that differ from this run's "
            f"{len(names)} trainable parameters; was it written by another stage or LoRA setting?"
        )
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(plain["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in plain["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order (the order its state dict numbers them)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


# ---------------------------------------------------------------------------------------------- folders
def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (`checkpoints/latest` if it points at one, else the highest step)."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / "state.json").is_file():
            return target
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_state: dict,
    meta: dict,
    accelerator,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` atomically from every process (collective: all ranks must call it)."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    rank, main = accelerator.process_index, accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    plain, tensors = rng_state()
    _write_json(tmp / f"rank{rank}.json", {"data": rank_state, "rng": plain})
    save_safetensors(tensors, tmp / f"rank{rank}.rng.safetensors")
    if main:
        names = optimizer_param_names(model, optimizer)
        opt_plain, opt_tensors = _optimizer_parts(optimizer, names)
        save_safetensors(trainable_state(model), tmp / "trainable.safetensors")
        save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
        _write_json(tmp / "optimizer.json", opt_plain)
        _write_json(tmp / "state.json", {**meta, "step": step, "world_size": accelerator.num_processes})
    accelerator.wait_for_everyone()
    if main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_json(final.parent / LATEST, final.name)  # a text file, not a symlink: works on every file system
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainable(model: nn.Module, path: str | Path, allow_missing: re.Pattern | None = None) -> list[str]:
    """Copy a trainable-tensors file into `model`. Every key must exist in the model with its shape; the model's own
    trainable parameters absent from the file are allowed only if `allow_missing` matches them. Returns those."""
    state = load_safetensors(path)
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    shapes = [
        f"{k} {tuple(v.shape)} != {tuple(params[k].shape)}"
        for k, v in state.items()
        if k in params and v.shape != params[k].shape
    ]
    missing = sorted(k for k, p in params.items() if p.requires_grad and k not in state)
    not_allowed = [k for k in missing if allow_missing is None or not allow_missing.search(k)]
    if unknown or shapes or not_allowed:
        raise CheckpointError(
            f"{path} does not fit the model: unknown keys {unknown[:8]} ({len(unknown)}), shape mismatches "
            f"{shapes[:5]}, trainable parameters it lacks {not_allowed[:8]} ({len(not_allowed)})"
        )
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value)
    return missing


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, accelerator
) -> tuple[int, dict, dict]:
    """Restore a checkpoint into this process; returns (step, this rank's data state, the state.json dict)."""
    path = Path(path)
    meta = json.loads((path / "state.json").read_text())
    if meta["world_size"] != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was written by {meta['world_size']} process(es) and this run has {accelerator.num_processes}; "
            "each process keeps its own data position, so resume with the same number of processes"
        )
    load_trainable(model, path / "trainable.safetensors")
    names = optimizer_param_names(model, optimizer)
    plain = json.loads((path / "optimizer.json").read_text())
    _load_optimizer(optimizer, plain, load_safetensors(path / "optimizer.safetensors"), names)
    rank = accelerator.process_index
    own = json.loads((path / f"rank{rank}.json").read_text())
    set_rng_state(own["rng"], load_safetensors(path / f"rank{rank}.rng.safetensors"))
    return int(meta["step"]), own["data"], meta
