"""What two common inference additions outside the papers' protocol would do to a trained model's figures.

The bundle's evaluation follows the papers' protocol: argmax at the network's resolution, the label map brought
back with nearest-neighbour, no post-processing. Two additions are common elsewhere (nnU-Net uses both), and this
script measures them on the same weights, on TRAINING volumes as well as validation ones: an addition should be
chosen on the training data (as nnU-Net chooses its post-processing on its training folds), not on the
validation set that reports the result.

- ``lcc``: per foreground class, only the largest 3D connected component of the prediction is kept
  (:func:`keep_largest_component`, ``scipy.ndimage.label`` with full 3D connectivity);
- ``tta``: each slice, at the network's resolution, is also segmented rotated by each of ``--angles`` degrees
  (bilinear, zero padding, as the training rotation); the softmax probabilities are rotated back and averaged
  (:class:`RotationTTA`), and the bundle's inferer takes the argmax there and brings it back with
  nearest-neighbour, as the protocol does.

Per set (validation; every ``--train-every``-th training volume) and variant (plain, lcc, tta, tta+lcc): mean
Dice and HD95 (voxels) per class over volumes, TransUNet's conventions (``scripts.metrics.case_metrics``).
The volumes go through the bundle's validation preprocessing (``configs/train.json`` + the preset); the plain
variant is the bundle's own ``LeViTSliceInferer`` (default fast form).

    python -m scripts.inference_diagnostics --preset configs/acdc.json --datalist runs/acdc_cpu4/data/datalist.json \\
        --checkpoint runs/acdc_cpu4/bundle/models/model_final.pt --json docs/results/inference_diagnostics_acdc_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("plain", "lcc", "tta", "tta+lcc")


def keep_largest_component(pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``pred`` (an integer label map) with each foreground class reduced to its largest connected component
    (full connectivity: faces, edges and corners); the voxels removed become background."""
    from scipy import ndimage

    out = np.zeros_like(pred)
    structure = np.ones((3,) * pred.ndim, bool)
    for c in range(1, num_classes):
        components, n = ndimage.label(pred == c, structure=structure)
        if n:
            sizes = np.bincount(components.ravel())[1:]
            out[components == 1 + int(np.argmax(sizes))] = c
    return out


def rotate(x: torch.Tensor, degrees: float, mode: str = "bilinear") -> torch.Tensor:
    """``(B, C, H, W)`` rotated by ``degrees`` about the centre, zero padding; in fp32 whatever autocast is on
    (the sampling grid is a matrix product, which autocast would run in bf16)."""
    t = math.radians(degrees)
    theta = torch.tensor([[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]])
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


class RotationTTA(nn.Module):
    """``network`` made into rotation test-time augmentation: softmax probabilities of the input rotated by
    each of ``angles`` degrees (0 = the input itself), rotated back and averaged. Run it through the bundle's
    ``LeViTSliceInferer``, which resizes the slices, builds the fast form (:meth:`fuse`) and takes the argmax
    of what this returns at the network's resolution.
    """

    def __init__(self, network: nn.Module, angles: Sequence[float]) -> None:
        super().__init__()
        self.network, self.angles = network, list(angles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def probabilities(image: torch.Tensor) -> torch.Tensor:
            return self.network(image).float().softmax(dim=1)

        return sum(rotate(probabilities(rotate(x, a)), -a) if a else probabilities(x) for a in self.angles)

    def fuse(self) -> "RotationTTA":
        """The same augmentation of the network's fast form (``network.fuse()``)."""
        return RotationTTA(self.network.fuse(), self.angles)


def summarize(rows: List[Dict[int, Dict[str, float]]], names: Sequence[str]) -> Dict[str, Any]:
    """Means over cases of :func:`scripts.metrics.case_metrics` rows, per class and overall (in %, voxels)."""
    per_class = {names[c]: {"dice_pct": 100 * float(np.mean([r[c]["dice"] for r in rows])),
                            "hd95_voxels": float(np.mean([r[c]["hd95"] for r in rows]))} for c in rows[0]}
    return {"mean_dice_pct": float(np.mean([v["dice_pct"] for v in per_class.values()])),
            "mean_hd95_voxels": float(np.mean([v["hd95_voxels"] for v in per_class.values()])),
            "per_class": per_class}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from scripts.inferer import LeViTSliceInferer, resolve_precision
    from scripts.metrics import case_metrics
    from scripts.networks import LeViTUNet
    from scripts.precision_check import load_bundle_parts
    from scripts.utils import load_datalist, require_file

    torch.set_num_threads(args.threads)
    parts = load_bundle_parts(args.preset, {"img_size": args.img_size} if args.img_size else {})
    num_classes, names, img_size = parts["num_classes"], parts["label_names"], parts["img_size"]
    net = LeViTUNet(2, 1, num_classes, variant=parts["variant"], img_size=img_size)
    weights = torch.load(require_file(args.checkpoint, "trained weights"), map_location="cpu", weights_only=True)
    net.load_state_dict(weights)
    net.eval()
    precision = resolve_precision("auto", "cpu")
    inferer = LeViTSliceInferer(img_size, args.sw_batch_size, precision="auto")
    tta = RotationTTA(net, [0.0, *args.angles]).eval()
    sets = {"validation": load_datalist(args.datalist, "validation")[: args.limit or None]}
    if args.train_every:
        sets["training"] = load_datalist(args.datalist, "training")[:: args.train_every][: args.limit or None]
    results: Dict[str, Any] = {}
    for set_name, items in sets.items():
        rows: Dict[str, List[Dict[int, Dict[str, float]]]] = {v: [] for v in VARIANTS}
        for item in items:
            data = parts["preprocessing"](item)
            image, label = data["image"].unsqueeze(0), np.asarray(data["label"])[0].astype(np.int64)
            with torch.inference_mode():
                preds = {"plain": inferer(image, net)[0, 0].numpy().astype(np.int64),
                         "tta": inferer(image, tta)[0, 0].numpy().astype(np.int64)}
            preds["lcc"] = keep_largest_component(preds["plain"], num_classes)
            preds["tta+lcc"] = keep_largest_component(preds["tta"], num_classes)
            for v in VARIANTS:
                rows[v].append(case_metrics(preds[v], label, num_classes))
        results[set_name] = {"volumes": len(items), **{v: summarize(rows[v], names) for v in VARIANTS}}
    return {
        "environment": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "command": " ".join(["python -m scripts.inference_diagnostics", *sys.argv[1:]]),
                        "torch": torch.__version__, "precision": precision},
        "checkpoint": args.checkpoint, "datalist": args.datalist, "angles": [0.0, *args.angles],
        "train_every": args.train_every, "results": results,
    }


def markdown(r: Dict[str, Any]) -> str:
    first = next(iter(r["results"].values()))["plain"]["per_class"]
    classes = list(first)
    lines = [
        "# Inference additions outside the protocol: largest component, rotation TTA",
        "",
        f"`{r['environment']['command']}` ({r['environment']['date']}, torch {r['environment']['torch']}, "
        f"{r['environment']['precision']}). TTA angles {r['angles']} degrees. Mean Dice (%) over volumes; "
        "HD95 in voxels. The protocol's figure is the `plain` row of the validation set.",
        "",
        "| set | variant | mean Dice | " + " | ".join(classes) + " | mean HD95 |",
        "|---|---|---|" + "---|" * len(classes) + "---|",
    ]
    for set_name, res in r["results"].items():
        for v in VARIANTS:
            s = res[v]
            lines.append(f"| {set_name} ({res['volumes']}) | {v} | {s['mean_dice_pct']:.2f} | "
                         + " | ".join(f"{s['per_class'][c]['dice_pct']:.2f}" for c in classes)
                         + f" | {s['mean_hd95_voxels']:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="trained weights (a bare state_dict)")
    p.add_argument("--datalist", required=True, help="datalist JSON with 'validation' (and 'training') lists")
    p.add_argument("--preset", default=None, help="a preset merged after configs/train.json, e.g. configs/acdc.json")
    p.add_argument("--img-size", type=int, default=None, help="the network's input side (the config's by default)")
    p.add_argument("--angles", type=float, nargs="*", default=[-10.0, 10.0], help="TTA rotations besides 0 (degrees)")
    p.add_argument("--train-every", type=int, default=7, help="every N-th training volume (0: none)")
    p.add_argument("--limit", type=int, default=0, help="at most N volumes per set")
    p.add_argument("--sw-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write the figures here (and the Markdown beside it)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = markdown(result)
    print(text)
    if args.json:
        from scripts.precision_check import write_report

        write_report(args.json, result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
