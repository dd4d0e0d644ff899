"""Exports trained LeViT-UNet weights to ONNX, checked against PyTorch with onnxruntime.

    python -m scripts.export_onnx --checkpoint models/model.pt --output models/model.onnx \
        [--variant 128s --img-size 224 --num-classes 9 --in-channels 1 --fused]

The model takes ``image`` ``(B, in_channels, img_size, img_size)`` (any batch size B) and returns the
logits ``pred`` ``(B, num_classes, img_size, img_size)`` of 2D slices; resizing slices and stacking
them into volumes is the caller's (``scripts.inferer.LeViTSliceInferer`` does it for PyTorch).
``--fused`` folds every BatchNorm into the layer before it (``LeViTUNet.fuse()``): same outputs, fewer
operators. The file is written only once onnxruntime (when installed) gives PyTorch's outputs.
"""

from __future__ import annotations

import argparse
import sys

import torch
from monai.utils import optional_import

from scripts.networks import LeViTUNet
from scripts.atomic import atomic_output
from scripts.utils import BundleInputError, require_file

ort, HAS_ORT = optional_import("onnxruntime")  # optional (requirements-dev.txt): without it the export is unchecked

__all__ = ["load_model", "export_onnx", "check_onnx", "OnnxMismatchError", "main"]

WEIGHTS_HINT = (
    "No weights are published yet: they come from training (README: 'Train'; it writes models/model.pt), "
    "or from a published checkpoint converted with `python -m scripts.networks.convert`"
)


class OnnxMismatchError(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance."""


def load_model(
    checkpoint: str, variant: str = "128s", img_size: int = 224, num_classes: int = 9, in_channels: int = 1
) -> LeViTUNet:
    """LeViTUNet in eval mode with the bare state_dict ``checkpoint`` loaded strictly.

    Raises :class:`scripts.utils.BundleInputError` when the file is missing or does not fit the model.
    """
    require_file(checkpoint, "trained weights", WEIGHTS_HINT)
    model = LeViTUNet(in_channels=in_channels, out_channels=num_classes, variant=variant, img_size=img_size)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise BundleInputError(
            f"{checkpoint} does not fit LeViTUNet(variant={variant!r}, img_size={img_size}, num_classes={num_classes}, "
            f"in_channels={in_channels}): give the training's settings (it must be a bare state_dict). {e}"
        ) from e
    return model.eval()


def check_onnx(path: str, model: torch.nn.Module, batch_sizes: tuple[int, ...] = (1, 3), seed: int = 0) -> float | None:
    """Max absolute difference between onnxruntime's and ``model``'s outputs on random inputs of each
    batch size, or None when onnxruntime is not installed."""
    if not HAS_ORT:
        return None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    shape = session.get_inputs()[0].shape[1:]
    gen = torch.Generator().manual_seed(seed)
    diff = 0.0
    for b in batch_sizes:
        x = torch.randn(b, *shape, generator=gen)
        with torch.no_grad():
            ref = model(x)
        out = torch.from_numpy(session.run(["pred"], {"image": x.numpy()})[0])
        if out.shape != ref.shape:
            raise RuntimeError(f"ONNX output shape {tuple(out.shape)} != PyTorch's {tuple(ref.shape)} (batch {b})")
        diff = max(diff, float((out - ref).abs().max()))
    return diff


def export_onnx(
    checkpoint: str,
    output: str,
    variant: str = "128s",
    img_size: int = 224,
    num_classes: int = 9,
    in_channels: int = 1,
    fused: bool = False,
    atol: float = 1e-4,
    check: bool = True,
) -> float | None:
    """Exports the checkpoint to ``output`` (atomically) and returns the max ONNX - PyTorch difference
    (None when unchecked). Raises :class:`OnnxMismatchError` (writing nothing) when it exceeds ``atol``."""
    model = load_model(checkpoint, variant, img_size, num_classes, in_channels)
    if fused:
        model = model.fuse()
    x = torch.randn(2, in_channels, img_size, img_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_output(output) as tmp:
        torch.onnx.export(
            model, (x,), str(tmp), input_names=["image"], output_names=["pred"], dynamic_shapes={"x": {0: batch}},
            external_data=False,
        )
        diff = check_onnx(str(tmp), model) if check else None
        if diff is not None and not diff <= atol:
            raise OnnxMismatchError(f"ONNX outputs differ from PyTorch's by {diff:.3g} > {atol:g}: {output} unwritten")
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="models/model.pt", help="bare state_dict written by training")
    parser.add_argument("--output", default="models/model.onnx")
    parser.add_argument("--variant", default="128s", choices=["128s", "192", "384"])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=9)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--fused", action="store_true", help="fold BatchNorm into the preceding layers")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest ONNX - PyTorch difference accepted")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_args(argv)
    try:
        diff = export_onnx(args.checkpoint, args.output, args.variant, args.img_size, args.num_classes,
                           args.in_channels, args.fused, args.atol, not args.no_check)
    except (BundleInputError, OnnxMismatchError) as e:
        print(f"export_onnx: error: {e}", file=sys.stderr)
        return 1
    if diff is None:
        print(f"wrote {args.output} (not checked: {'--no-check' if args.no_check else 'onnxruntime not installed'})")
    else:
        print(f"wrote {args.output}; onnxruntime vs PyTorch max abs difference {diff:.3g} (<= {args.atol:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
