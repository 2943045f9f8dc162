"""The four training stages of TinyGPT-V as presets (reference §2), at three scales: the original, the demo, and tiny.

    stage = StageConfig.preset("stage4")                 # the original's stage 4 (448 px, LoRA r=64, [INST] template)
    stage = StageConfig.preset("stage4", scale="demo")   # the same stage, sized for a 2-core CPU (128 px, few hundred steps)
    stage.to_json("stage.json"); StageConfig.from_json("stage.json") == stage
    stage.schedule.lr_at(step)                           # linear warm-up, then cosine from step 0 (the original's schedule)

What every stage shares (reference §2): the ViT and Q-Former are frozen; the language model is frozen except the
weights (not the biases) of its norms; the projector is trained; LoRA on the attention q/k/v and output projections
from stage 2 on (stage 1 has none, as the paper says, although the released code's default would add it); AdamW with
betas (0.9, 0.999) and weight decay 0.05, none on 1-D tensors and biases.

Where we differ from the released configs, on purpose:
- stage 4's min_lr 8e-5 is above its init_lr 1e-5 (a config slip that makes the "decay" raise the rate); we use
  MiniGPT-v2's 1e-6, and a schedule whose min_lr exceeds init_lr is refused;
- the warm-up counts global steps (the original counts the in-epoch step, which breaks when warm-up > one epoch);
- answers end in EOS, which is supervised, rather than in "\\n" / "###" (core/prompts.py);
- gradients are clipped at norm 1.0 (the original does not clip; set max_grad_norm 0 to match it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from core.config import ConfigError, _Section
from core.prompts import TEMPLATES

STAGES = ("stage1", "stage2", "stage3", "stage4")
SCALES = ("tinygptv", "demo", "tiny")
DATA_KINDS = ("captions", "cc_sbu_align", "mixture")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "dense")  # the fused query_key_value of the original, split; + dense


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    """`linear_warmup_cosine_lr` of MiniGPT-4 (minigpt4/common/optims.py), over optimizer steps."""

    init_lr: float = 1e-4
    min_lr: float = 8e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 1000
    max_steps: int = 5000

    def __post_init__(self) -> None:
        if self.min_lr > self.init_lr:
            raise ConfigError(
                f"min_lr {self.min_lr:g} is above init_lr {self.init_lr:g}: the cosine would raise the rate "
                "(the original stage-4 config's slip); set min_lr <= init_lr"
            )
        if self.max_steps < 1 or self.warmup_steps < 0:
            raise ConfigError(f"max_steps {self.max_steps} must be >= 1 and warmup_steps {self.warmup_steps} >= 0")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based).

        Warm-up: warmup_lr -> init_lr linearly over warmup_steps; after it a cosine from init_lr to min_lr whose phase is
        counted from step 0 over max_steps, exactly as the original (so the first post-warm-up step is already a
        little below init_lr).
        """
        if step < self.warmup_steps:
            return min(
                self.init_lr, self.warmup_lr + (self.init_lr - self.warmup_lr) * step / max(self.warmup_steps, 1)
            )
        phase = min(step, self.max_steps) / self.max_steps
        return self.min_lr + (self.init_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * phase))


@dataclass(frozen=True)
class LoraSettings(_Section):
    """peft LoRA on the language model; r = 0 means no LoRA (stage 1)."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS


@dataclass(frozen=True)
class StageConfig(_Section):
    """One training stage. Batch sizes are per process (per GPU), as in the original."""

    stage: int = 1
    data: str = "captions"  # captions (webdataset shards) | cc_sbu_align | mixture (stage 4's datasets by ratio)
    template: str = "none"  # a key of core.prompts.TEMPLATES
    image_size: int = 224
    max_txt_len: int = 32  # text tokens per sequence (image tokens not counted); longer sequences are cut at the end
    batch_size: int = 64  # stage 4: a multiplier on each dataset's own batch size (1 = the original's 1-3)
    grad_accum: int = 1
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=0))
    weight_decay: float = 0.05
    betas: tuple[float, ...] = (0.9, 0.999)
    max_grad_norm: float = 1.0  # 0 = no clipping (the original)
    seed: int = 42
    log_every: int = 10
    save_every: int = 1000  # checkpoint every N optimizer steps (and at the end)
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.data not in DATA_KINDS:
            raise ConfigError(f"data {self.data!r} is not one of {', '.join(DATA_KINDS)}")
        if self.template not in TEMPLATES:
            raise ConfigError(f"template {self.template!r} is not one of {', '.join(TEMPLATES)}")
        for name in ("image_size", "max_txt_len", "batch_size", "grad_accum", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)} must be at least 1")

    @property
    def name(self) -> str:
        return f"stage{self.stage}"

    @classmethod
    def preset(cls, name: str, scale: str = "tinygptv") -> StageConfig:
        if name not in STAGES:
            raise ConfigError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
        if scale not in SCALES:
            raise ConfigError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
        return _PRESETS[scale][STAGES.index(name)]

    @classmethod
    def from_json(cls, path: str | Path) -> StageConfig:
        import json

        return cls.from_dict(json.loads(Path(path).read_text()), where=Path(path).name)

    def to_json(self, path: str | Path) -> None:
        import json

        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


_LORA = LoraSettings(r=64, alpha=16, dropout=0.05)
_NO_LORA = LoraSettings(r=0)

# The original (train_configs/tinygptv_stage*.yaml; reference §2's table). Stage 1 is one 5,000-step run of the
# yaml; the README runs it 17 times (~5.4 M samples): raise max_steps to match that.
_TINYGPTV = (
    StageConfig(
        stage=1,
        data="captions",
        template="none",
        image_size=224,
        max_txt_len=32,
        batch_size=64,
        lora=_NO_LORA,
        schedule=ScheduleConfig(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=1000, max_steps=5000),
    ),
    StageConfig(
        stage=2,
        data="captions",
        template="none",
        image_size=224,
        max_txt_len=32,
        batch_size=64,
        lora=_LORA,
        schedule=ScheduleConfig(init_lr=1e-4, min_lr=8e-5, warmup_lr=1e-6, warmup_steps=5000, max_steps=20000),
    ),
    StageConfig(
        stage=3,
        data="cc_sbu_align",
        template="stage3",
        image_size=224,
        max_txt_len=160,
        batch_size=6,
        lora=_LORA,
        schedule=ScheduleConfig(init_lr=3e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=200, max_steps=1000),
        save_every=200,
    ),
    StageConfig(
        stage=4,
        data="mixture",
        template="stage4",
        image_size=448,
        max_txt_len=1024,
        batch_size=1,
        lora=_LORA,
        # min_lr: MiniGPT-v2's 1e-6, not the released 8e-5 (> init_lr)
        schedule=ScheduleConfig(init_lr=1e-5, min_lr=1e-6, warmup_lr=1e-6, warmup_steps=1000, max_steps=50000),
    ),
)

# The demo: the same four stages on the synthetic world at 64 px (128 px in stage 4), sized so that all four
# train in a few minutes on 2 CPU cores. Rates are higher than the original's because the demo has hundreds of steps,
# not tens of thousands. Stage 4's batch_size multiplies each dataset's own batch size of the mixture.
_DEMO = (
    StageConfig(
        stage=1,
        data="captions",
        template="none",
        image_size=64,
        max_txt_len=32,
        batch_size=32,
        lora=_NO_LORA,
        schedule=ScheduleConfig(init_lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=10, max_steps=80),
        log_every=10,
        save_every=40,
    ),
    StageConfig(
        stage=2,
        data="captions",
        template="none",
        image_size=64,
        max_txt_len=32,
        batch_size=32,
        lora=_LORA,
        schedule=ScheduleConfig(init_lr=1e-3, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=10, max_steps=60),
        log_every=10,
        save_every=30,
    ),
    StageConfig(
        stage=3,
        data="cc_sbu_align",
        template="stage3",
        image_size=64,
        max_txt_len=96,
        batch_size=16,
        lora=_LORA,
        schedule=ScheduleConfig(init_lr=5e-4, min_lr=1e-4, warmup_lr=1e-5, warmup_steps=5, max_steps=30),
        log_every=10,
        save_every=30,
    ),
    StageConfig(
        stage=4,
        data="mixture",
        template="stage4",
        image_size=128,
        max_txt_len=160,
        batch_size=4,
        lora=_LORA,
        schedule=ScheduleConfig(init_lr=1e-3, min_lr=5e-5, warmup_lr=1e-5, warmup_steps=20, max_steps=300),
        log_every=10,
        save_every=100,
    ),
)

# Unit tests: the tiny model (32 px), a handful of steps.
_TINY = tuple(
    s.replace(
        image_size=32 if s.stage < 4 else 64,
        max_txt_len=128,
        batch_size=4 if s.stage < 4 else 1,
        schedule=ScheduleConfig(init_lr=1e-3, min_lr=1e-4, warmup_lr=1e-4, warmup_steps=2, max_steps=6),
        log_every=1,
        save_every=3,
        lora=s.lora.replace(r=4, alpha=8) if s.lora.r else s.lora,
    )
    for s in _DEMO
)

_PRESETS = {"tinygptv": _TINYGPTV, "demo": _DEMO, "tiny": _TINY}
