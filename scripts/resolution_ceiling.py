"""The best score the evaluation protocol allows at a network size: ``python -m scripts.resolution_ceiling``.

The protocol (TransUNet's ``test_single_volume``, :mod:`scripts.inferer`) resizes every axial slice to
``img_size`` x ``img_size``, takes the argmax there and brings the label map back to the slice's own size with
nearest-neighbour. A network that predicts every pixel of the resized slice right can still not score Dice 1:
the round trip of the ground truth itself (resized to ``img_size`` with nearest-neighbour, as training labels
are, then back, as predictions are) loses the detail finer than the network's grid. This tool scores that round
trip against the ground truth with the protocol's metrics (:func:`scripts.metrics.case_metrics`, 3D Dice per
class and case, means over cases): the ceiling of a network trained and evaluated at ``img_size``.

    python -m scripts.resolution_ceiling --datalist runs/acdc_cpu/data/datalist.json --key validation \\
        --num-classes 4 --img-size 128 160 224 [--json ceiling.json]

Reads labels only (NIfTI, as the data preparation writes them), in the RAS orientation the bundle's
transforms give, so the slices are the axial ones the inferer slides over.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from scripts.inferer import LABEL_MODE
from scripts.metrics import case_metrics
from scripts.prepare_data import resize_slices

__all__ = ["round_trip", "resolution_ceiling", "main"]


def round_trip(label: np.ndarray, img_size: int) -> np.ndarray:
    """``label`` (X, Y, Z) with each axial slice resized to ``img_size`` and back, nearest-neighbour both ways."""
    small = resize_slices(label, (img_size, img_size), LABEL_MODE)
    return np.rint(resize_slices(small, label.shape[:2], LABEL_MODE)).astype(np.int64)


def _load_labels(datalist_file: str, key: str) -> List[tuple[str, np.ndarray]]:
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    from scripts.utils import load_datalist

    load = Compose([LoadImaged(keys="label", image_only=True), EnsureChannelFirstd(keys="label"),
                    Orientationd(keys="label", axcodes="RAS")])
    out = []
    for item in load_datalist(datalist_file, key):
        label = load({"label": item["label"]})["label"][0]
        out.append((str(item["label"]), np.asarray(label).round().astype(np.int64)))
    return out


def resolution_ceiling(
    labels: Sequence[tuple[str, np.ndarray]], num_classes: int, img_sizes: Sequence[int]
) -> Dict[int, Dict[str, Any]]:
    """Per ``img_size``: the mean over cases of each class's Dice of the round trip (``per_class``, classes
    1..num_classes-1), their mean (``mean_dice``) and the lowest case of each class (``min_case``)."""
    out: Dict[int, Dict[str, Any]] = {}
    for size in img_sizes:
        per_case = [case_metrics(round_trip(lab, size), lab, num_classes) for _, lab in labels]
        per_class = {c: float(np.mean([m[c]["dice"] for m in per_case])) for c in range(1, num_classes)}
        out[int(size)] = {
            "per_class": per_class,
            "mean_dice": float(np.mean(list(per_class.values()))),
            "min_case": {c: float(min(m[c]["dice"] for m in per_case)) for c in range(1, num_classes)},
            "num_cases": len(per_case),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.resolution_ceiling", description=__doc__.split("\n")[0])
    p.add_argument("--datalist", required=True, help="a datalist JSON (prepare_data's)")
    p.add_argument("--key", default="validation", help="its list to read (default: validation)")
    p.add_argument("--num-classes", type=int, required=True, help="classes, background included")
    p.add_argument("--img-size", type=int, nargs="+", required=True, help="network sizes to score")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    labels = _load_labels(args.datalist, args.key)
    result = resolution_ceiling(labels, args.num_classes, args.img_size)
    print(f"{len(labels)} cases of {args.datalist} ({args.key}); Dice of the ground truth after the round trip")
    print("| img_size | " + " | ".join(f"class {c}" for c in range(1, args.num_classes)) + " | mean |")
    print("|---" * (args.num_classes + 1) + "|")
    for size, r in result.items():
        cells = [f"{r['per_class'][c]:.4f}" for c in range(1, args.num_classes)]
        print(f"| {size} | " + " | ".join(cells) + f" | {r['mean_dice']:.4f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"datalist": args.datalist, "key": args.key, "ceiling": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
