"""Does the fast inference form change the segmentation? Per-class Dice between its predictions and plain fp32's.

The bundle infers in its fast form by default (``LeViTSliceInferer(precision="auto")``: BatchNorm folded,
channels_last, bf16 where the processor has native bf16, prepacked convolutions on CPU). This script segments
whole volumes of a datalist twice with the same trained weights: with the plain network in fp32 (eager, no
folding, the reference) and with the bundle's default form, and reports, per class, the Dice between the two
label maps (pooled over all volumes, and the lowest single volume), beside each form's Dice against the
ground truth. The volumes go through the bundle's own validation preprocessing (``validate#preprocessing`` of
``configs/train.json`` + the preset). ``--device cuda`` checks the GPU form (bf16 AMP where supported, fp16
otherwise); its fp32 reference runs with TF32 turned off (:func:`full_fp32`).

    python -m scripts.precision_check --preset configs/acdc.json --datalist runs/acdc_cpu/data/datalist.json \\
        --checkpoint runs/acdc_cpu/bundle/models/model_final.pt --img-size 128 --json docs/results/precision_acdc_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def dice_counts(a: np.ndarray, b: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes, 3)``: per class, |a & b|, |a|, |b| (voxel counts)."""
    out = np.zeros((num_classes, 3), np.int64)
    for c in range(num_classes):
        ma, mb = a == c, b == c
        out[c] = (np.count_nonzero(ma & mb), np.count_nonzero(ma), np.count_nonzero(mb))
    return out


def dice_from_counts(counts: np.ndarray) -> List[float]:
    """Dice per class from :func:`dice_counts` rows; 1.0 where the class is absent from both."""
    return [float(2 * i / (sa + sb)) if sa + sb else 1.0 for i, sa, sb in counts]


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """True fp32 on CUDA for the reference: PyTorch runs convolutions in TF32 there by default
    (``torch.backends.cudnn.allow_tf32``), which would make the "fp32" reference a reduced-precision one too."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def load_bundle_parts(preset: Optional[str], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """The validation preprocessing, class names and network settings of ``configs/train.json`` + ``preset``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / "train.json")] + ([preset] if preset else []))
    for key, value in overrides.items():
        parser[key] = value
    return {
        "preprocessing": parser.get_parsed_content("validate#preprocessing"),
        "label_names": parser.get_parsed_content("label_names"),
        "num_classes": parser.get_parsed_content("num_classes"),
        "variant": parser.get_parsed_content("variant"),
        "img_size": parser.get_parsed_content("img_size"),
    }


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from scripts.inferer import LeViTSliceInferer, resolve_precision
    from scripts.networks import LeViTUNet
    from scripts.utils import load_datalist, require_file

    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("img_size", args.img_size), ("variant", args.variant)) if v is not None}
    parts = load_bundle_parts(args.preset, overrides)
    num_classes, names = parts["num_classes"], parts["label_names"]
    net = LeViTUNet(2, 1, num_classes, variant=parts["variant"], img_size=parts["img_size"])
    net.load_state_dict(torch.load(require_file(args.checkpoint, "trained weights"), map_location="cpu", weights_only=True))
    device = torch.device(args.device)
    net.eval().to(device)
    fast_precision = resolve_precision("auto", device)
    forms = {
        "fp32_plain": LeViTSliceInferer(parts["img_size"], args.sw_batch_size, precision="fp32", fuse=False),
        "bundle_default": LeViTSliceInferer(parts["img_size"], args.sw_batch_size, precision="auto", fuse=True),
    }
    items = load_datalist(args.datalist, args.key)[: args.limit or None]
    agree = np.zeros((num_classes, 3), np.int64)
    truth = {name: np.zeros((num_classes, 3), np.int64) for name in forms}
    per_volume, seconds = [], {name: 0.0 for name in forms}
    for item in items:
        data = parts["preprocessing"](item)
        image = data["image"].unsqueeze(0).to(device)
        label = np.asarray(data["label"])[0].astype(np.int64)
        preds = {}
        for name, inferer in forms.items():
            t0 = time.perf_counter()
            with torch.inference_mode(), (full_fp32() if name == "fp32_plain" else contextlib.nullcontext()):
                preds[name] = inferer(image, net)[0, 0].cpu().numpy().astype(np.int64)
            seconds[name] += time.perf_counter() - t0
            truth[name] += dice_counts(preds[name], label, num_classes)
        counts = dice_counts(preds["bundle_default"], preds["fp32_plain"], num_classes)
        agree += counts
        per_volume.append({"image": item["image"], "dice_bundle_vs_fp32": dice_from_counts(counts),
                           "voxels_differing": int(np.count_nonzero(preds["bundle_default"] != preds["fp32_plain"])),
                           "voxels": int(label.size)})
    pooled = dice_from_counts(agree)
    lowest = np.min([v["dice_bundle_vs_fp32"] for v in per_volume], axis=0).tolist()
    return {
        "environment": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m scripts.precision_check", *sys.argv[1:]]),
            "torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "bundle_default_precision": fast_precision,
        },
        "checkpoint": args.checkpoint, "datalist": args.datalist, "key": args.key, "volumes": len(items),
        "classes": names,
        "dice_bundle_vs_fp32_pooled": dict(zip(names, pooled)),
        "dice_bundle_vs_fp32_lowest_volume": dict(zip(names, lowest)),
        "dice_vs_label_pooled": {form: dict(zip(names, dice_from_counts(c))) for form, c in truth.items()},
        "seconds": seconds,
        "per_volume": per_volume,
    }


def _where(env: Dict[str, Any]) -> str:
    return f"{env['gpu']} ({env['device']})" if env.get("gpu") else f"{env['threads']} CPU threads"


def markdown(r: Dict[str, Any]) -> str:
    names = r["classes"][1:]
    lines = [
        f"# Fast inference form vs plain fp32: {r['volumes']} volumes",
        "",
        f"`{r['environment']['command']}` ({r['environment']['date']}, torch {r['environment']['torch']}, "
        f"{_where(r['environment'])}). The bundle's default form here computes in "
        f"**{r['environment']['bundle_default_precision']}**. Dice between the two label maps per class (pooled over "
        "all volumes, and the lowest single volume), and each form's Dice against the ground truth (pooled).",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        "| default vs fp32, pooled | " + " | ".join(f"{r['dice_bundle_vs_fp32_pooled'][n]:.4f}" for n in names) + " |",
        "| default vs fp32, lowest volume | " + " | ".join(f"{r['dice_bundle_vs_fp32_lowest_volume'][n]:.4f}" for n in names) + " |",
    ]
    for form, label in (("fp32_plain", "plain fp32 vs label"), ("bundle_default", "default vs label")):
        lines.append(f"| {label} | " + " | ".join(f"{r['dice_vs_label_pooled'][form][n]:.4f}" for n in names) + " |")
    lines += ["", "Seconds for all volumes: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


def write_report(json_path: Path, result: Dict[str, Any], text: str) -> None:
    """``result`` as JSON at ``json_path`` and the Markdown ``text`` beside it (``.md``), each written atomically."""
    from scripts.atomic import atomic_output

    with atomic_output(json_path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    with atomic_output(json_path.with_suffix(".md")) as tmp:
        tmp.write_text(text)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="trained weights (a bare state_dict, e.g. models/model.pt)")
    p.add_argument("--datalist", required=True, help="datalist JSON with images and labels")
    p.add_argument("--key", default="validation", help="which list of the datalist")
    p.add_argument("--preset", default=None, help="a preset merged after configs/train.json, e.g. configs/acdc.json")
    p.add_argument("--img-size", type=int, default=None, help="the network's input side (the config's by default)")
    p.add_argument("--variant", default=None, help="128s, 192 or 384 (the config's by default)")
    p.add_argument("--sw-batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the default form there: bf16 AMP where supported)")
    p.add_argument("--limit", type=int, default=0, help="only the first N volumes")
    p.add_argument("--json", type=Path, default=None, help="write the figures here (and the Markdown beside it)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = markdown(result)
    print(text)
    if args.json:
        write_report(args.json, result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
