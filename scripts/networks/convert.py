"""Checkpoint conversion into :class:`LeViTUNet` / :class:`LeViTEncoder` state_dicts.

Reads any of:

- an official LeViT-UNet checkpoint (``apple1986/LeViT-UNet``: ``cnn_b*``, ``block_1..3.*``,
  ``decoderBlock_*``, ``segmentation_head``; the 192 model's duplicated ``blocks.*`` names and the
  persistent ``attention_bias_idxs`` buffers, which the model rebuilds from its grid, included) -> a full ``LeViTUNet`` state_dict;
- a facebookresearch LeViT ImageNet checkpoint (``patch_embed.*``, ``blocks.*``; bare or under
  ``model``) -> a ``LeViTEncoder`` state_dict;
- a timm >= 1.0 LeViT checkpoint (``stem.conv*``, ``stages.*``; ``.pth`` or ``.safetensors``) -> a
  ``LeViTEncoder`` state_dict;
- this project's own layout (validated and passed through).

Classifier heads are dropped; the first convolution is adapted to ``in_channels`` (a 3-channel
ImageNet kernel is summed over RGB for a 1-channel model, as timm does); attention-bias tables are
resampled (bicubic) when ``img_size`` gives another token grid than the checkpoint's. Every other
key must map onto the target model with the target's shape, or :class:`CheckpointConversionError`
lists the offending keys: nothing loads silently partial.

Command line: ``python -m scripts.networks.convert IN OUT --variant 128s [--in-channels 1] [--img-size 224]``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Dict, List, Mapping, Tuple

import torch
import torch.nn.functional as F

from ..atomic import atomic_output
from .levit import LEVIT_VARIANTS
from .levit_unet import LeViTUNet

__all__ = ["CheckpointConversionError", "convert_checkpoint", "detect_layout", "load_checkpoint_file", "main"]

StateDict = Dict[str, torch.Tensor]


class CheckpointConversionError(ValueError):
    """A checkpoint that does not map completely onto the requested model."""


def unwrap(state_dict: Mapping) -> StateDict:
    """Returns the tensor dict of a checkpoint saved bare or under ``model`` / ``state_dict``."""
    for key in ("model", "state_dict", "network"):
        if key in state_dict and isinstance(state_dict[key], Mapping):
            return dict(state_dict[key])
    return dict(state_dict)


def detect_layout(state_dict: Mapping) -> str:
    """One of ``official_unet``, ``facebook``, ``timm``, ``ours_unet``, ``ours_encoder``."""
    keys = list(state_dict)
    if any(k.startswith("cnn_b1.") for k in keys):
        return "official_unet"
    if any(k.startswith("patch_embed.") for k in keys):
        return "facebook"
    if any(k.startswith("encoder.stem.") for k in keys):
        return "ours_unet"
    if any(k.startswith("stem.conv1.") for k in keys):
        return "timm" if any(k.startswith(("head.", "head_dist.")) for k in keys) else "ours_encoder"
    raise CheckpointConversionError(
        "unrecognised checkpoint layout: expected official LeViT-UNet (cnn_b1.*), facebook LeViT "
        f"(patch_embed.*), timm LeViT (stem.conv1.*) or LeViTUNet (encoder.stem.*) keys; first keys: {keys[:5]}"
    )


def flat_block_names(variant: str) -> List[Tuple[str, str]]:
    """Our module prefix and kind (``attn``, ``mlp``, ``down``) for each index of LeViT's flat ``blocks``."""
    cfg = LEVIT_VARIANTS[variant]
    names: List[Tuple[str, str]] = []
    for s, depth in enumerate(cfg["depth"]):
        if s > 0:
            names.append((f"stages.{s}.downsample.attn_downsample.", "down"))
            names.append((f"stages.{s}.downsample.mlp.", "mlp"))
        for b in range(depth):
            names.append((f"stages.{s}.blocks.{b}.attn.", "attn"))
            names.append((f"stages.{s}.blocks.{b}.mlp.", "mlp"))
    return names


# suffix renames inside one flat block (LeViT's Linear_BN children are ``c``/``bn``; timm's ``linear``/``bn``)
_BLOCK_SUFFIX = {
    "attn": [("m.qkv.c.", "qkv.linear."), ("m.qkv.bn.", "qkv.bn."), ("m.proj.1.c.", "proj.ln.linear."),
             ("m.proj.1.bn.", "proj.ln.bn."), ("m.attention_bias", "attention_bias")],
    "mlp": [("m.0.c.", "ln1.linear."), ("m.0.bn.", "ln1.bn."), ("m.2.c.", "ln2.linear."), ("m.2.bn.", "ln2.bn.")],
    "down": [("kv.c.", "kv.linear."), ("kv.bn.", "kv.bn."), ("q.1.c.", "q.ln.linear."), ("q.1.bn.", "q.ln.bn."),
             ("proj.1.c.", "proj.ln.linear."), ("proj.1.bn.", "proj.ln.bn."), ("attention_bias", "attention_bias")],
}


def _rename_flat_block(key: str, variant: str) -> str | None:
    """``blocks.K.<suffix>`` (facebook / official numbering) -> our encoder key, or None if unknown."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    names = flat_block_names(variant)
    if not m or int(m.group(1)) >= len(names):
        return None
    prefix, kind = names[int(m.group(1))]
    for old, new in _BLOCK_SUFFIX[kind]:
        if m.group(2).startswith(old):
            return prefix + new + m.group(2)[len(old):]
    return None


def _rename_official_unet(key: str, variant: str) -> str | None:
    if m := re.fullmatch(r"cnn_b([1-4])\.0\.c\.(.+)", key):
        return f"encoder.stem.conv{m.group(1)}.linear.{m.group(2)}"
    if m := re.fullmatch(r"cnn_b([1-4])\.0\.bn\.(.+)", key):
        return f"encoder.stem.conv{m.group(1)}.bn.{m.group(2)}"
    if m := re.fullmatch(r"decoderBlock_([1-3])\.conv([12])\.0\.(.+)", key):
        return f"decoder{m.group(1)}.conv{m.group(2)}.conv.{m.group(3)}"
    if m := re.fullmatch(r"decoderBlock_([1-3])\.conv([12])\.1\.(.+)", key):
        return f"decoder{m.group(1)}.conv{m.group(2)}.adn.N.{m.group(3)}"
    if m := re.fullmatch(r"segmentation_head\.0\.(.+)", key):
        return f"head.{m.group(1)}"
    if key.startswith("blocks."):
        new = _rename_flat_block(key, variant)
        return None if new is None else "encoder." + new
    return None


def _rename_facebook(key: str, variant: str) -> str | None:
    if m := re.fullmatch(r"patch_embed\.([0246])\.c\.(.+)", key):
        return f"stem.conv{int(m.group(1)) // 2 + 1}.linear.{m.group(2)}"
    if m := re.fullmatch(r"patch_embed\.([0246])\.bn\.(.+)", key):
        return f"stem.conv{int(m.group(1)) // 2 + 1}.bn.{m.group(2)}"
    return _rename_flat_block(key, variant)


def _merge_official_block_names(sd: StateDict) -> StateDict:
    """``block_S.K.*`` -> ``blocks.K.*``; a duplicate ``blocks.K.*`` (the 192 file) must hold the same tensor."""
    out: StateDict = {}
    for key, value in sd.items():
        new = re.sub(r"^block_[1-3]\.", "blocks.", key)
        if new in out and not torch.equal(out[new], value):
            raise CheckpointConversionError(f"checkpoint holds two different tensors for {new!r} (as {key!r} too)")
        out[new] = value
    return out


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """First-conv kernel for ``in_channels`` inputs, as timm's ``adapt_input_conv``.

    One channel: the sum over the checkpoint's input channels (an RGB image of equal channels gives
    the same response). More: the kernel tiled over the channels and scaled to keep the response.
    """
    src = weight.shape[1]
    if in_channels == src:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_channels / src)
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (src / in_channels)


def _resample_bias(table: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Bicubic resampling of a ``(heads, R*R)`` attention-bias table to ``(heads, R'*R')``."""
    heads, n_old = table.shape
    r_old, r_new = math.isqrt(n_old), math.isqrt(shape[1])
    grid = table.reshape(1, heads, r_old, r_old).float()
    grid = F.interpolate(grid, size=(r_new, r_new), mode="bicubic", align_corners=False)
    return grid.reshape(heads, r_new * r_new).to(table.dtype)


def convert_checkpoint(
    state_dict: Mapping, variant: str, in_channels: int = 1, img_size: int = 224
) -> StateDict:
    """Converts a LeViT-UNet or LeViT checkpoint to this project's layout.

    Args:
        state_dict: the loaded checkpoint (bare, or under ``model`` / ``state_dict``).
        variant: ``"128s"``, ``"192"`` or ``"384"``; must match the checkpoint's widths.
        in_channels: input channels of the target model; the first conv is adapted.
        img_size: input size of the target model; attention biases are resampled to its token grid.

    Returns:
        a ``LeViTUNet`` state_dict for LeViT-UNet checkpoints, a ``LeViTEncoder`` state_dict for
        ImageNet classifiers (load it into ``model.encoder``).

    Raises:
        CheckpointConversionError: unknown layout, keys that map nowhere, missing keys or shape
            mismatches (each listed).
    """
    if variant not in LEVIT_VARIANTS:
        raise CheckpointConversionError(f"variant must be one of {sorted(LEVIT_VARIANTS)}, got {variant!r}")
    sd = unwrap(state_dict)
    layout = detect_layout(sd)
    full = layout in ("official_unet", "ours_unet")
    if layout == "official_unet":
        sd, rename = _merge_official_block_names(sd), _rename_official_unet
    elif layout == "facebook":
        rename = _rename_facebook
    else:  # timm and ours share names; classifier heads are dropped below
        rename = lambda key, _v: key  # noqa: E731

    out: StateDict = {}
    unknown: List[str] = []
    for key, value in sd.items():
        if key.startswith(("head.", "head_dist.")) and layout in ("facebook", "timm"):
            continue
        new = rename(key, variant)
        if new is None:
            unknown.append(key)
        elif new.endswith("attention_bias_idxs"):
            continue  # derived from the grid (rebuilt by the model), as timm's checkpoint filter does
        else:
            out[new] = value

    with torch.device("meta"):
        target = LeViTUNet(in_channels=in_channels, variant=variant, img_size=img_size)
    expected = {k: v.shape for k, v in (target if full else target.encoder).state_dict().items()}
    first_conv = "encoder.stem.conv1.linear.weight" if full else "stem.conv1.linear.weight"
    if first_conv in out and out[first_conv].dim() == 4:
        out[first_conv] = adapt_input_conv(out[first_conv], in_channels)
    for key, value in out.items():
        if key.endswith("attention_biases") and key in expected and value.shape != expected[key]:
            if value.dim() == 2 and value.shape[0] == expected[key][0]:
                out[key] = _resample_bias(value, expected[key])

    unknown += [k for k in out if k not in expected]
    missing = [k for k in expected if k not in out]
    mismatched = [
        f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(expected[k])}"
        for k in expected if k in out and out[k].shape != expected[k]
    ]
    if unknown or missing or mismatched:
        parts = [f"{layout} checkpoint does not match LeViT-UNet-{variant} (in_channels={in_channels}, img_size={img_size})"]
        for title, items in (("unknown keys", unknown), ("missing keys", missing), ("shape mismatches", mismatched)):
            if items:
                parts.append(f"{title} ({len(items)}): " + ", ".join(items))
        raise CheckpointConversionError("\n".join(parts))
    return {k: out[k].contiguous() for k in expected}


def load_checkpoint_file(path: str) -> StateDict:
    """Reads a ``.safetensors`` or a torch checkpoint (``weights_only=True``: no code is unpickled)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, or a pickle that needs code
        raise CheckpointConversionError(f"cannot read checkpoint {path}: {e}") from e


def save_state_dict(state_dict: StateDict, path: str) -> None:
    """Writes ``path`` through a temporary file and a rename, so a failed write leaves no partial file."""
    with atomic_output(path) as tmp:
        if path.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state_dict, str(tmp))
        else:
            torch.save(state_dict, tmp)


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="checkpoint to read (.pth/.pt/.bin or .safetensors)")
    parser.add_argument("output", help="state_dict to write (.pt or .safetensors)")
    parser.add_argument("--variant", required=True, choices=sorted(LEVIT_VARIANTS))
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args(argv)
    sd = convert_checkpoint(load_checkpoint_file(args.input), args.variant, args.in_channels, args.img_size)
    save_state_dict(sd, args.output)
    kind = "LeViTUNet" if any(k.startswith("encoder.") for k in sd) else "LeViTEncoder"
    print(f"wrote {len(sd)} tensors ({kind}, variant {args.variant}) to {args.output}")


if __name__ == "__main__":
    main()
