"""Model configuration: one frozen dataclass per component, composed into ModelConfig.

Torch-free, so the runtime and the exporter's manifest code can read the same config.json.

    cfg = ModelConfig.preset("demo")
    cfg.to_json("config.json"); ModelConfig.from_json("config.json") == cfg
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or dict that does not describe a model: unknown key, wrong type, bad value."""


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` converted to `annotation` where that is lossless (list -> tuple, int -> float), else raise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: None is not allowed")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_type, _ellipsis) = typing.get_args(annotation)
        return tuple(_check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        return annotation.from_dict(value, where=where)
    raise ConfigError(f"{where}: unsupported type {annotation!r}")  # pragma: no cover - a bug in a dataclass below


class _Section:
    """JSON round trip shared by every section: `from_dict` rejects unknown keys and wrong types by name."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | None = None):
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known keys are {', '.join(names)}")
        kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class VisionConfig(_Section):
    """EVA ViT as BLIP-2 ships it (transformers' Blip2VisionModel). Its post_layernorm is BLIP-2's `ln_vision`."""

    image_size: int = 224  # the size the position embeddings were trained at; other sizes interpolate bicubically
    patch_size: int = 14
    hidden_size: int = 1408
    num_layers: int = 39
    num_heads: int = 16
    intermediate_size: int = 6144
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    # Channels of 3x3 stride-2 convolutions (+ LayerNorm + GELU) whose projection is added to the patch projection
    # (core.vision_stem); empty = EVA's plain patch Conv2d. The from-scratch demo ViT needs it to learn shapes;
    # pretrained EVA/BLIP-2 weights have none.
    conv_stem: tuple[int, ...] = ()


@dataclass(frozen=True)
class QFormerConfig(_Section):
    """BLIP-2 Q-Former (transformers' Blip2QFormerModel) with its learned query tokens; text parts removed."""

    num_query_tokens: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_frequency: int = 2
    layer_norm_eps: float = 1e-12


@dataclass(frozen=True)
class ProjectorConfig(_Section):
    """TinyGPT-V's two linear layers, Q-Former width -> hidden_size -> LM width, no activation between them."""

    hidden_size: int = 4096


@dataclass(frozen=True)
class LanguageModelConfig(_Section):
    """Phi-2 with TinyGPT-V's changes. Field names follow transformers' PhiConfig where one exists."""

    vocab_size: int = 51200
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_layers: int = 32
    num_heads: int = 32
    partial_rotary_factor: float = 0.4
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    qk_layernorm: bool = True  # TinyGPT-V: per-head LayerNorm on Q and K before RoPE
    post_attention_rmsnorm: bool = True  # TinyGPT-V: RMSNorm on the attention output before the residual sum
    rms_norm_eps: float = 1e-6
    resid_pdrop: float = 0.1
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.partial_rotary_factor)


@dataclass(frozen=True)
class ImageConfig(_Section):
    """What the preprocessing needs: the runtime reads these, it never hard-codes them."""

    size: int = 224  # the size this model runs at (224 for stages 1-3, 448 for stage 4)
    resample: str = "bicubic"
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    max_pixels: int = 89_478_485  # Pillow's own decompression-bomb limit; larger images are refused


@dataclass(frozen=True)
class PromptConfig(_Section):
    """How a question becomes a prompt. `template` holds `{}` where the instruction goes."""

    template: str = "[INST] {} [/INST]"
    image_text: str = "<Img><ImageHere></Img>"
    placeholder: str = "<ImageHere>"
    # The token id that stands for one image vector in `input_ids`: an id the tokenizer never produces
    # (Phi-2's embedding table has 51200 rows for ~50295 tokens), replaced by `embed` with the projected image.
    image_token_id: int = 51199
    stop_strings: tuple[str, ...] = ("###",)


@dataclass(frozen=True)
class ModelConfig(_Section):
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language_model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        lm, v, q = self.language_model, self.vision, self.qformer
        checks = [
            (
                lm.hidden_size % lm.num_heads == 0,
                f"language_model.hidden_size {lm.hidden_size} is not divisible by num_heads {lm.num_heads}",
            ),
            (
                v.hidden_size % v.num_heads == 0,
                f"vision.hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}",
            ),
            (
                q.hidden_size % q.num_heads == 0,
                f"qformer.hidden_size {q.hidden_size} is not divisible by num_heads {q.num_heads}",
            ),
            (
                v.image_size % v.patch_size == 0,
                f"vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}",
            ),
            (
                v.patch_size % 2 ** len(v.conv_stem) == 0 and all(c > 0 for c in v.conv_stem),
                f"vision.conv_stem {list(v.conv_stem)}: {len(v.conv_stem)} stride-2 layers do not divide "
                f"patch_size {v.patch_size}, or a channel count is not positive",
            ),
            (
                self.image.size % v.patch_size == 0,
                f"image.size {self.image.size} is not a multiple of patch_size {v.patch_size}",
            ),
            (
                0 <= self.prompt.image_token_id < lm.vocab_size,
                f"prompt.image_token_id {self.prompt.image_token_id} is outside the vocabulary (0..{lm.vocab_size - 1})",
            ),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name]()

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, where=path.name)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def num_image_tokens(self) -> int:
        return self.qformer.num_query_tokens


def _tinygptv() -> ModelConfig:
    """The real sizes: EVA ViT-g/14 (39 x 1408), Q-Former BERT-base with 32 queries, 768->4096->2560, Phi-2 2560 x 32."""
    return ModelConfig()


def _demo() -> ModelConfig:
    """The embedded default: TinyGPT-V's structure at a size that trains through all four stages on 2 CPU cores.

    64 px stands in for 224 (stages 1-3) and 128 px for 448 (stage 4); patch 8 keeps 8x8 patches at 64 px. The conv
    stem (three 3x3 stride-2 convolutions, 24/48/96 channels, beside the patch projection) is what lets this ViT,
    trained from scratch in minutes, tell the shapes apart (issue 3; core/vision_stem.py). The decoder is 128 wide:
    it learns per step about as a 256-wide one did, at about half the CPU, so the bootstrap affords more steps.
    """
    return ModelConfig(
        vision=VisionConfig(
            image_size=64,
            patch_size=8,
            hidden_size=192,
            num_layers=4,
            num_heads=4,
            intermediate_size=768,
            conv_stem=(24, 48, 96),
        ),
        qformer=QFormerConfig(
            num_query_tokens=32,
            hidden_size=192,
            num_layers=2,
            num_heads=4,
            intermediate_size=768,
            cross_attention_frequency=1,
        ),
        projector=ProjectorConfig(hidden_size=384),
        language_model=LanguageModelConfig(
            vocab_size=1024,
            hidden_size=128,
            intermediate_size=512,
            num_layers=4,
            num_heads=4,
            max_position_embeddings=512,
            resid_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
        image=ImageConfig(size=64),
        prompt=PromptConfig(image_token_id=1023),
    )


def _tiny() -> ModelConfig:
    """A few hundred thousand parameters, for unit tests that finish in seconds."""
    return ModelConfig(
        vision=VisionConfig(
            image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
        ),
        qformer=QFormerConfig(
            num_query_tokens=8,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            cross_attention_frequency=2,
        ),
        projector=ProjectorConfig(hidden_size=48),
        language_model=LanguageModelConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            max_position_embeddings=256,
            resid_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
        image=ImageConfig(size=32),
        prompt=PromptConfig(image_token_id=127),
    )


PRESETS = {"tiny": _tiny, "demo": _demo, "tinygptv": _tinygptv}
