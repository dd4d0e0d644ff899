"""LeViT-UNet: a LeViT encoder feeding a U-Net style CNN decoder through skip connections."""

from __future__ import annotations

import copy
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .levit import ConvNorm, LeViTEncoder, LinearNorm

__all__ = ["LeViTUNet", "DecoderBlock", "fuse_batchnorm"]


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2 with ``align_corners=True`` (``nn.UpsamplingBilinear2d(scale_factor=2)``)."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)


def resize_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize (``align_corners=True``) of a square map to ``size`` x ``size``; no-op when equal."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=[size, size], mode="bilinear", align_corners=True)


class DecoderBlock(nn.Module):
    """Bilinear x2 upsampling, then two (3x3 conv without bias, BatchNorm, ReLU).

    Args:
        in_channels: channels of the (already skip-concatenated) input.
        out_channels: channels out.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        kw = {"spatial_dims": 2, "kernel_size": 3, "act": "relu", "norm": "batch", "bias": False}
        self.conv1 = Convolution(in_channels=in_channels, out_channels=out_channels, **kw)
        self.conv2 = Convolution(in_channels=out_channels, out_channels=out_channels, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(upsample2x(x)))


class LeViTUNet(nn.Module):
    """LeViT-UNet (Xu et al., "LeViT-UNet: Make Faster Encoders with Transformer for Medical Image
    Segmentation", PRCV 2023, https://arxiv.org/abs/2107.08623).

    A LeViT encoder (:class:`LeViTEncoder`: conv stem of four 3x3 stride-2 convolutions, three attention
    stages with shrink attention between them) feeds a CNN decoder. At the ``img_size / 16`` grid the
    last conv-stem map and the three stage maps (stage 2 and 3 brought to the stage-1 grid) are
    concatenated into the bottleneck; three decoder blocks (bilinear x2, two conv-BN-ReLU; 512, 256,
    128 channels) climb back to ``img_size / 2``, each after concatenating the conv-stem map of its size;
    a 3x3 convolution gives the class logits, upsampled x2 to the input size.

    Args:
        spatial_dims: must be 2: the network segments 2D slices (use ``SliceInferer`` for volumes).
        in_channels: image channels.
        out_channels: number of classes (logit channels), background included.
        variant: encoder size, ``"128s"``, ``"192"`` or ``"384"``.
        img_size: side of the square input, a multiple of 16 from 64 up.
        drop_path_rate: stochastic depth of the encoder's residual branches; ``None`` takes the
            paper's value for the variant (0, 0, 0.1).

    Input ``(B, in_channels, img_size, img_size)``; output logits ``(B, out_channels, img_size, img_size)``.
    A wrong input shape raises ``ValueError`` (``torch.jit.Error`` in a scripted model) naming both shapes.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 9,
        variant: str = "128s",
        img_size: int = 224,
        drop_path_rate: float | None = None,
    ):
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"LeViTUNet is a 2D network: spatial_dims must be 2, got {spatial_dims}.")
        if out_channels < 1:
            raise ValueError(f"out_channels must be positive, got {out_channels}.")
        self.encoder = LeViTEncoder(in_channels, variant, img_size, drop_path_rate)
        c = self.encoder.embed_dim
        stem = [c[0] // 8, c[0] // 4, c[0] // 2, c[0]]
        self.grid = img_size // 16
        self.decoder1 = DecoderBlock(stem[3] + sum(c), 512)
        self.decoder2 = DecoderBlock(512 + stem[2], 256)
        self.decoder3 = DecoderBlock(256 + stem[1], 128)
        self.head = nn.Conv2d(128 + stem[0], out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats: List[torch.Tensor] = self.encoder(x)
        s1, s2, s3, s4, t1, t2, t3 = feats[0], feats[1], feats[2], feats[3], feats[4], feats[5], feats[6]
        # stage maps to the stage-1 grid: x2 (and x2 twice for stage 3, as the official code), then an
        # align_corners resize wherever the grids are odd (224: 7 -> 14 and 4 -> 16 -> 14)
        t2 = resize_to(upsample2x(t2), self.grid)
        t3 = resize_to(upsample2x(upsample2x(t3)), self.grid)
        y = self.decoder1(torch.cat([s4, t1, t2, t3], dim=1))
        y = self.decoder2(torch.cat([y, s3], dim=1))
        y = self.decoder3(torch.cat([y, s2], dim=1))
        return upsample2x(self.head(torch.cat([y, s1], dim=1)))

    def fuse(self) -> "LeViTUNet":
        """A copy for inference with every BatchNorm folded into the conv / linear before it.

        The copy is in eval mode and gives the same outputs as this model in eval mode; this model is
        left unchanged. Training the copy is not supported (it has no BatchNorm left).
        """
        return fuse_batchnorm(self)


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Deep-copies ``model`` in eval mode and folds each BatchNorm into the layer feeding it."""
    fused = copy.deepcopy(model).eval()
    for parent in list(fused.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ConvNorm):
                setattr(parent, name, fuse_conv_bn_eval(child.linear, child.bn))
            elif isinstance(child, LinearNorm):
                setattr(parent, name, fuse_linear_bn_eval(child.linear, child.bn))
            elif isinstance(child, Convolution) and isinstance(getattr(child.adn, "N", None), nn.BatchNorm2d):
                child.conv = fuse_conv_bn_eval(child.conv, child.adn.N)
                child.adn.N = nn.Identity()
    return fused
