"""TinyGPT-V: EVA ViT (+ ln_vision) -> Q-Former -> two linear layers -> Phi-2 with q/k LayerNorm and post-attention RMSNorm.

    model = TinyGPTV(ModelConfig.preset("demo"))           # random weights
    model = TinyGPTV.from_pretrained("runs/demo/final")    # config.json + model.safetensors (+ tokenizer.json)
    feats = model.encode_image(pixel_values)                # [B, 32, d_model]
    embeds = model.embed(input_ids, feats)                  # image ids -> image vectors
    logits, present = model.decode(embeds, attention_mask, position_ids, past)

The three methods above are the three exported ONNX graphs, exactly. The vision parts are transformers' BLIP-2 classes
(`Blip2VisionModel`, whose `post_layernorm` is BLIP-2's `ln_vision`, and `Blip2QFormerModel`), so BLIP-2 checkpoints in
Hugging Face format load into them; the language model is our `PhiDecoder`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel

from core.config import ModelConfig
from core.phi import KVCache, PhiDecoder, position_ids_from_mask
from core.prompts import PromptError
from core.tokenizer import TOKENIZER_FILE, TextTokenizer
from core.vision_stem import ConvStemPatchEmbedding
from core.weights import WEIGHTS_FILE, load_safetensors, load_strict, save_safetensors

logger = logging.getLogger(__name__)
CONFIG_FILE = "config.json"


def blip2_vision_config(cfg: ModelConfig) -> Blip2VisionConfig:
    v = cfg.vision
    return Blip2VisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        qkv_bias=v.qkv_bias,
        initializer_range=0.02,  # BLIP-2's 1e-10 assumes pretrained weights; ours may train from scratch
    )


def blip2_qformer_config(cfg: ModelConfig) -> Blip2QFormerConfig:
    q = cfg.qformer
    return Blip2QFormerConfig(
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size,
        cross_attention_frequency=q.cross_attention_frequency,
        encoder_hidden_size=cfg.vision.hidden_size,
        layer_norm_eps=q.layer_norm_eps,
        use_qformer_text_input=False,  # TinyGPT-V deletes the text parts; only the query FFN is kept
    )


def build_vision_model(cfg: ModelConfig) -> Blip2VisionModel:
    """transformers' BLIP-2 ViT; with `vision.conv_stem`, its patch Conv2d is replaced by core.vision_stem's stem."""
    vision = Blip2VisionModel(blip2_vision_config(cfg))
    v = cfg.vision
    if v.conv_stem:
        vision.embeddings.patch_embedding = ConvStemPatchEmbedding(v.conv_stem, v.patch_size, v.hidden_size)
    return vision


class Projector(nn.Module):
    """TinyGPT-V's `llama_proj` (768 -> 4096) and `llama_proj2` (4096 -> 2560): two linear layers, no activation."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.qformer.hidden_size, cfg.projector.hidden_size)
        self.fc2 = nn.Linear(cfg.projector.hidden_size, cfg.language_model.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x))


class TinyGPTV(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.vision_model = build_vision_model(cfg)
        self.qformer = Blip2QFormerModel(blip2_qformer_config(cfg))
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.qformer.num_query_tokens, cfg.qformer.hidden_size) * 0.02)
        self.projector = Projector(cfg)
        self.language_model = PhiDecoder(cfg.language_model)

    # ------------------------------------------------------------------ the three export boundaries
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S] (normalised) -> image_features [B, n_query, d_model].

        At a size other than the one the position embeddings were trained at (224 -> 448 in stage 4), they are
        interpolated bicubically, as the original does.
        """
        interpolate = pixel_values.shape[-1] != self.config.vision.image_size
        image_embeds = self.vision_model(
            pixel_values, interpolate_pos_encoding=interpolate
        ).last_hidden_state  # [B, 1+P, Dv]
        queries = self.query_tokens.expand(pixel_values.shape[0], -1, -1)  # [B, N, Dq]
        query_out = self.qformer(
            query_embeds=queries, encoder_hidden_states=image_embeds
        ).last_hidden_state  # [B, N, Dq]
        return self.projector(query_out)  # [B, N, D]

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] with n_query image ids per image row; image_features [B, N, D] -> inputs_embeds [B, T, D].

        The k-th image id of a row takes the row's k-th image vector; rows without image ids are plain text.
        """
        is_image = input_ids == self.config.prompt.image_token_id  # [B, T]
        text = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))  # [B, T, D]
        index = (is_image.long().cumsum(-1) - 1).clamp(min=0)  # [B, T]
        index = index.clamp(max=image_features.shape[1] - 1)
        picked = torch.gather(image_features, 1, index[..., None].expand(-1, -1, image_features.shape[-1]))  # [B, T, D]
        return torch.where(is_image[..., None], picked.to(text.dtype), text)

    def decode(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """inputs_embeds [B, T, D], attention_mask [B, P+T], position_ids [B, T], past (P steps) -> logits [B, T, V], present."""
        return self.language_model(inputs_embeds, attention_mask, position_ids, past)

    # ------------------------------------------------------------------ training
    def check_image_tokens(self, input_ids: torch.Tensor, n_images: int | None = None) -> None:
        """Every row holds 0 or exactly n_query image ids; raise a PromptError naming the row otherwise."""
        n = self.config.num_image_tokens
        counts = (input_ids == self.config.prompt.image_token_id).sum(-1).tolist()
        for row, count in enumerate(counts):
            if count not in (0, n):
                raise PromptError(
                    f"row {row} holds {count} image tokens; each image takes exactly {n} (one placeholder per image)"
                )
        if n_images is not None and sum(c // n for c in counts) != n_images:
            raise PromptError(
                f"the prompts hold {sum(c // n for c in counts)} image placeholder(s) for {n_images} image(s)"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Teacher-forced pass. labels [B, T] hold -100 outside the answer tokens; loss is the mean over answer tokens."""
        if image_features is None and pixel_values is not None:
            image_features = self.encode_image(pixel_values)  # [B, N, D]
        if image_features is None:
            d = self.config.language_model.hidden_size
            image_features = torch.zeros(input_ids.shape[0], 1, d, device=input_ids.device)
        embeds = self.embed(input_ids, image_features)  # [B, T, D]
        positions = position_ids_from_mask(attention_mask, input_ids.shape[1])  # [B, T]
        logits, _ = self.decode(embeds, attention_mask, positions)  # [B, T, V]
        out = {"logits": logits}
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B*(T-1), V]
            shift_labels = labels[:, 1:].reshape(-1)  # [B*(T-1)]
            out["loss"] = nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        return out

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """See `core.generation.generate`."""
        from core.generation import generate

        return generate(self, *args, **kwargs)

    # ------------------------------------------------------------------ folders
    def save_pretrained(self, path: str | Path, tokenizer: TextTokenizer | None = None) -> None:
        """config.json + model.safetensors (+ tokenizer.json). Written in place; callers wanting atomicity write to a temp dir."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.to_json(path / CONFIG_FILE)
        save_safetensors(self.state_dict(), path / WEIGHTS_FILE)
        if tokenizer is not None:
            tokenizer.save(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> TinyGPTV:
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{path}: not a model folder (no {CONFIG_FILE}); expected config.json + {WEIGHTS_FILE}"
            )
        cfg = ModelConfig.from_json(path / CONFIG_FILE)
        model = cls(cfg)
        load_strict(model, load_safetensors(path / WEIGHTS_FILE), source=str(path / WEIGHTS_FILE))
        return model.to(dtype).eval()

    def load_tokenizer(self, path: str | Path) -> TextTokenizer:
        lm = self.config.language_model
        return TextTokenizer.from_dir(path, lm.bos_token_id, lm.eos_token_id, self.config.prompt.image_token_id)


def read_config(path: str | Path) -> ModelConfig:
    return ModelConfig.from_json(Path(path) / CONFIG_FILE)


def has_tokenizer(path: str | Path) -> bool:
    return (Path(path) / TOKENIZER_FILE).is_file()


def describe(model: TinyGPTV) -> str:
    counts = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    counts["query_tokens"] = model.query_tokens.numel()
    return json.dumps(counts)
