"""LeViT-UNet network, its LeViT encoder and checkpoint conversion."""

from .levit import LEVIT_VARIANTS, LeViTEncoder
from .levit_unet import LeViTUNet, fuse_batchnorm

__all__ = ["LEVIT_VARIANTS", "LeViTEncoder", "LeViTUNet", "fuse_batchnorm"]
