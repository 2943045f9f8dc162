"""An optional convolutional stem beside the ViT's patch projection ("early convolutions help transformers see").

A from-scratch ViT whose only view of the pixels is one linear map per 8x8 patch learns local form (circle, square,
triangle, star) very slowly; a few small strided 3x3 convolutions give every patch token a non-linear reading of its
pixels and of its neighbours'. With `VisionConfig.conv_stem` empty (the default, and every EVA/BLIP-2 checkpoint) the
patch embedding stays transformers' own Conv2d and nothing here is used.

    embedding = ConvStemPatchEmbedding(channels=(24, 48, 96), patch_size=8, hidden_size=192)
    embedding(pixels)   # [B, 3, S, S] -> [B, 192, S/8, S/8], as the plain patch Conv2d gives

The token is the plain linear patch projection (kept under its own names, `patch_embedding.weight` / `.bias`) plus the
stem's projection: the linear path carries colour exactly as the plain ViT does (measured: a stem alone, without it,
lost a tenth of the patch colour accuracy), the stem adds form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each pixel of a [B, C, H, W] map: per position, so independent of the batch and
    of the image size (unlike BatchNorm). Without a norm the stem's output starts ~15x smaller than the position
    embeddings, and the ViT learned neither shape nor colour from it (measured)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # [B, C, H, W]


def stem_stride(channels: tuple[int, ...]) -> int:
    """Each stem convolution halves the image side."""
    return 2 ** len(channels)


class ConvStemPatchEmbedding(nn.Module):
    """plain patch Conv2d(pixels) + projection(stem(pixels)).

    The stem is one 3x3 stride-2 convolution + LayerNorm + GELU per entry of `channels`; its projection covers what
    the stem's stride leaves of the patch: a (patch / 2^n)-sized convolution with that stride (1x1 when the stem
    already reaches the patch grid).
    """

    def __init__(self, channels: tuple[int, ...], patch_size: int, hidden_size: int) -> None:
        super().__init__()
        if not channels or patch_size % stem_stride(channels):
            raise ValueError(f"a conv stem of {len(channels)} stride-2 layers does not divide patch_size {patch_size}")
        self.patch_size = patch_size
        # the plain patch projection, held as parameters here: transformers' Blip2VisionEmbeddings reads
        # `patch_embedding.weight.dtype`
        self.weight = nn.Parameter(torch.empty(hidden_size, 3, patch_size, patch_size))
        self.bias = nn.Parameter(torch.empty(hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's own initialisation
        nn.init.uniform_(self.bias, -1 / math.sqrt(3 * patch_size**2), 1 / math.sqrt(3 * patch_size**2))
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, kernel_size=3, stride=2, padding=1), ChannelLayerNorm(c, eps=1e-6), nn.GELU()]
            c_in = c
        self.stem = nn.Sequential(*layers)
        rest = patch_size // stem_stride(channels)
        self.stem_projection = nn.Conv2d(c_in, hidden_size, kernel_size=rest, stride=rest)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        plain = F.conv2d(pixel_values, self.weight, self.bias, stride=self.patch_size)  # [B, D, S/p, S/p]
        return plain + self.stem_projection(self.stem(pixel_values))  # [B, D, S/p, S/p]
