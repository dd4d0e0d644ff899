"""The LeViT encoder of LeViT-UNet: a convolutional stem and three attention stages.

Graham et al., "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference", ICCV 2021,
https://arxiv.org/abs/2104.01136, as used by Xu et al., "LeViT-UNet: Make Faster Encoders with
Transformer for Medical Image Segmentation", https://arxiv.org/abs/2107.08623.

Module and parameter names follow timm >= 1.0 (``stem.conv1.linear``, ``stages.1.downsample...``)
so that timm ImageNet checkpoints load by name; ``convert.py`` maps the facebookresearch and the
official LeViT-UNet layouts onto them. Token grids and attention-bias index tables are computed from
``img_size``; the index tables are non-persistent buffers rebuilt at construction, and the biases are
gathered on every forward pass, so there is no cached copy that ``eval()``, ``load_state_dict`` or
``.to()`` could leave stale (the fault of the official code).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
from monai.networks.layers import DropPath

__all__ = ["LEVIT_VARIANTS", "LeViTEncoder", "LinearNorm", "ConvNorm", "attention_bias_index"]

# widths C, key dim D, heads, depth per stage and the paper's drop-path rate (paper.md, "Architecture").
LEVIT_VARIANTS = {
    "128s": {"embed_dim": (128, 256, 384), "key_dim": 16, "num_heads": (4, 6, 8), "depth": (2, 3, 4), "drop_path": 0.0},
    "192": {"embed_dim": (192, 288, 384), "key_dim": 32, "num_heads": (3, 5, 6), "depth": (4, 4, 4), "drop_path": 0.0},
    "384": {"embed_dim": (384, 512, 768), "key_dim": 32, "num_heads": (6, 9, 12), "depth": (4, 4, 4), "drop_path": 0.1},
}


def downsampled(resolution: int, stride: int = 2) -> int:
    """Grid size after a stride-``stride`` subsampling that keeps the first row and column."""
    return (resolution - 1) // stride + 1


def attention_bias_index(resolution: int, stride: int = 1) -> torch.Tensor:
    """Index table ``(N_q, N_k)`` into a ``(heads, resolution**2)`` bias table.

    Query ``(i, j)`` on the ``stride``-subsampled grid and key ``(y, x)`` on the full ``resolution``
    grid share the bias of the offset ``(|i*stride - y|, |j*stride - x|)``, numbered
    ``dy * resolution + dx``: the same numbering as the official code's first-seen order.
    """
    k = torch.arange(resolution)
    q = torch.arange(0, resolution, stride)
    dy = (q[:, None, None, None] - k[None, None, :, None]).abs()
    dx = (q[None, :, None, None] - k[None, None, None, :]).abs()
    return (dy * resolution + dx).reshape(q.numel() ** 2, resolution**2)


class ConvNorm(nn.Module):
    """Conv2d (no bias) followed by BatchNorm2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 2, padding: int = 1):
        super().__init__()
        self.linear = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


class LinearNorm(nn.Module):
    """Linear (no bias) followed by BatchNorm1d over all tokens of a ``(B, N, C)`` input."""

    def __init__(self, in_features: int, out_features: int, bn_weight_init: float = 1.0):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Subsample(nn.Module):
    """Keeps every ``stride``-th token of a square ``resolution`` grid, in both directions."""

    def __init__(self, stride: int, resolution: int):
        super().__init__()
        self.stride = stride
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, self.resolution, self.resolution, c)[:, :: self.stride, :: self.stride]
        return x.reshape(b, -1, c)


class Attention(nn.Module):
    """LeViT multi-head self-attention with a learned per-head bias per relative offset.

    Args:
        dim: token width in and out.
        key_dim: width of a query / key per head (D).
        num_heads: number of heads.
        attn_ratio: value width per head as a multiple of ``key_dim``.
        resolution: side of the square token grid.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: int):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.qkv = LinearNorm(dim, self.val_attn_dim + 2 * key_dim * num_heads)
        self.proj = nn.Sequential()
        self.proj.add_module("act", nn.Hardswish())
        self.proj.add_module("ln", LinearNorm(self.val_attn_dim, dim, bn_weight_init=0.0))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution**2))
        self.register_buffer("attention_bias_idxs", attention_bias_index(resolution), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.val_attn_dim)
        return self.proj(x)


class AttentionDownsample(nn.Module):
    """LeViT shrink attention: queries from the stride-2 subsampled grid, keys / values from the full one.

    Args:
        in_dim: token width in.
        out_dim: token width out (the next stage's width).
        key_dim: width of a query / key per head.
        num_heads: number of heads.
        attn_ratio: value width per head as a multiple of ``key_dim``.
        stride: subsampling stride of the queries.
        resolution: side of the input token grid.
    """

    def __init__(
        self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: float, stride: int, resolution: int
    ):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.val_dim = int(attn_ratio * key_dim)
        self.val_attn_dim = self.val_dim * num_heads
        self.resolution_out = downsampled(resolution, stride)
        self.kv = LinearNorm(in_dim, self.val_attn_dim + key_dim * num_heads)
        self.q = nn.Sequential()
        self.q.add_module("down", Subsample(stride, resolution))
        self.q.add_module("ln", LinearNorm(in_dim, key_dim * num_heads))
        self.proj = nn.Sequential()
        self.proj.add_module("act", nn.Hardswish())
        self.proj.add_module("ln", LinearNorm(self.val_attn_dim, out_dim))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution**2))
        self.register_buffer("attention_bias_idxs", attention_bias_index(resolution, stride), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        k, v = self.kv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        q = self.q(x).view(b, -1, self.num_heads, self.key_dim).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, -1, self.val_attn_dim)
        return self.proj(x)


class LevitMlp(nn.Module):
    """Token MLP: LinearNorm, Hardswish, LinearNorm (its last BatchNorm starts at zero, as in LeViT)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.ln1 = LinearNorm(dim, hidden_dim)
        self.act = nn.Hardswish()
        self.ln2 = LinearNorm(hidden_dim, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln2(self.act(self.ln1(x)))


class LevitBlock(nn.Module):
    """Residual attention followed by a residual MLP, each with per-sample stochastic depth."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int, drop_path: float):
        super().__init__()
        self.attn = Attention(dim, key_dim, num_heads, attn_ratio=2.0, resolution=resolution)
        self.drop_path1 = DropPath(drop_path)
        self.mlp = LevitMlp(dim, 2 * dim)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(x))
        return x + self.drop_path2(self.mlp(x))


class LevitDownsample(nn.Module):
    """Shrink attention (not residual: the width changes) followed by a residual MLP."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, resolution: int, drop_path: float):
        super().__init__()
        self.attn_downsample = AttentionDownsample(
            in_dim, out_dim, key_dim, num_heads=in_dim // key_dim, attn_ratio=4.0, stride=2, resolution=resolution
        )
        self.mlp = LevitMlp(out_dim, 2 * out_dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_downsample(x)
        return x + self.drop_path(self.mlp(x))


class LevitStage(nn.Module):
    """One transformer stage: an optional shrink-attention downsample, then ``depth`` blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        key_dim: int,
        num_heads: int,
        depth: int,
        resolution: int,
        downsample: bool,
        drop_path: float,
    ):
        super().__init__()
        if downsample:
            self.downsample: nn.Module = LevitDownsample(in_dim, dim, key_dim, resolution, drop_path)
            resolution = downsampled(resolution)
        else:
            self.downsample = nn.Identity()
        self.resolution = resolution
        self.blocks = nn.Sequential(*[LevitBlock(dim, key_dim, num_heads, resolution, drop_path) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class Stem(nn.Module):
    """Four 3x3 stride-2 ConvNorms, Hardswish after the first three; returns every stage's map."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        c = out_channels
        self.conv1 = ConvNorm(in_channels, c // 8)
        self.act1 = nn.Hardswish()
        self.conv2 = ConvNorm(c // 8, c // 4)
        self.act2 = nn.Hardswish()
        self.conv3 = ConvNorm(c // 4, c // 2)
        self.act3 = nn.Hardswish()
        self.conv4 = ConvNorm(c // 2, c)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        x1 = self.act1(self.conv1(x))
        x2 = self.act2(self.conv2(x1))
        x3 = self.act3(self.conv3(x2))
        return [x1, x2, x3, self.conv4(x3)]


class LeViTEncoder(nn.Module):
    """LeViT encoder (Graham et al. 2021) as used by LeViT-UNet (Xu et al. 2021).

    A convolutional stem of four 3x3 stride-2 convolutions brings the image to a ``img_size / 16``
    token grid; three attention stages follow, the second and third starting with a shrink attention
    that halves the grid (224: 14 -> 7 -> 4).

    Args:
        in_channels: image channels (1 for CT / MRI; 3 for the ImageNet classifiers).
        variant: one of ``"128s"``, ``"192"``, ``"384"`` (widths, heads and depths of the paper).
        img_size: side of the square input; a multiple of 16, at least 64.
        drop_path_rate: stochastic-depth rate of every residual branch; ``None`` takes the
            variant's own (0, 0, 0.1). Active only in training.

    Forward returns seven maps ``[stem1, stem2, stem3, stem4, stage1, stage2, stage3]``: the conv stem
    at 1/2, 1/4, 1/8, 1/16 of ``img_size`` (the last without activation) and the three stages as
    ``(B, C_i, r_i, r_i)`` maps.
    """

    def __init__(self, in_channels: int = 1, variant: str = "128s", img_size: int = 224, drop_path_rate: float | None = None):
        super().__init__()
        variant = str(variant)  # `--variant 384` on the bundle command line arrives as the int 384
        if variant not in LEVIT_VARIANTS:
            raise ValueError(f"variant must be one of {sorted(LEVIT_VARIANTS)}, got {variant!r}.")
        if img_size < 64 or img_size % 16:
            raise ValueError(f"img_size must be a multiple of 16 and at least 64, got {img_size}.")
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}.")
        cfg = LEVIT_VARIANTS[variant]
        drop_path = cfg["drop_path"] if drop_path_rate is None else float(drop_path_rate)
        embed_dim: Sequence[int] = cfg["embed_dim"]
        self.variant = variant
        self.in_channels = in_channels
        self.img_size = img_size
        self.embed_dim = list(embed_dim)
        self.stem = Stem(in_channels, embed_dim[0])
        resolution = img_size // 16
        stages = []
        for i, (dim, heads, depth) in enumerate(zip(embed_dim, cfg["num_heads"], cfg["depth"])):
            stage = LevitStage(
                embed_dim[max(i - 1, 0)], dim, cfg["key_dim"], heads, depth, resolution, downsample=i > 0, drop_path=drop_path
            )
            resolution = stage.resolution
            stages.append(stage)
        self.stages = nn.ModuleList(stages)

    def check_input(self, x: torch.Tensor) -> None:
        """Raises ``ValueError`` naming the expected and the actual shape where ``x`` does not fit."""
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(
                f"LeViT-UNet expects input (B, {self.in_channels}, {self.img_size}, {self.img_size}) "
                f"(in_channels={self.in_channels}, img_size={self.img_size}), got {list(x.shape)}."
            )

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        self.check_input(x)
        outs = self.stem(x)
        tokens = outs[-1].flatten(2).transpose(1, 2)
        for stage in self.stages:
            tokens = stage(tokens)
            r = stage.resolution
            outs.append(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, r, r))
        return outs
