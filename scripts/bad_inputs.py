"""The bad inputs the bundle is tested against, and the table of what a user sees for each (``docs/bad_inputs.md``).

Each case builds small files in a folder and states which check meets it: ``training`` (a datalist whose
``training`` list holds one bad entry beside a good one, checked by :func:`scripts.preflight.check_datalist` as
``configs/train.json`` and ``configs/evaluate.json`` do before any dataset is built) or ``inference`` (a list of
inputs with one bad file beside a good one, filtered by :func:`scripts.preflight.usable_images` as
``configs/inference.json`` does: the bad one is rejected, the good one is still segmented).

    python -m scripts.bad_inputs --write docs/bad_inputs.md     # regenerate the table
    python -m scripts.bad_inputs --check docs/bad_inputs.md     # exit 1 if the committed table is stale

``tests/test_robustness.py`` runs every case through the real bundle commands too.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np

__all__ = ["Case", "CASES", "NUM_CLASSES", "good_pair", "write_dicom_series", "build", "outcome", "table"]

NUM_CLASSES = 9  # the Synapse preset: background + 8 organs
SHAPE = (24, 20, 4)
AFFINE = np.diag([1.5, 1.5, 5.0, 1.0])


def _save(data: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def good_pair(folder: Path, name: str = "good", seed: int = 0) -> dict:
    """A valid CT-like image (HU) and its label map (a box of class 5, liver)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(40.0, 20.0, SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[6:16, 5:14, 1:3] = 5
    return {"image": _save(image, folder / f"{name}_img.nii.gz"), "label": _save(label, folder / f"{name}_lbl.nii.gz")}


def write_dicom_series(folder: Path, series_uid: str, slices: int = 3, z0: float = 0.0, seed: int = 0) -> None:
    """A tiny CT DICOM series (``slices`` files of 8 x 8) with the given SeriesInstanceUID, through ITK / GDCM."""
    import itk

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(slices):
        img = itk.image_from_array(rng.integers(-100, 200, (8, 8)).astype(np.int16))
        meta = img.GetMetaDataDictionary()
        for tag, value in {"0020|000e": series_uid, "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0008|0060": "CT",
                           "0020|0013": str(i + 1), "0020|0032": f"0\\0\\{z0 + 2.0 * i}",
                           "0020|0037": "1\\0\\0\\0\\1\\0"}.items():
            meta[tag] = value
        img.SetMetaDataDictionary(meta)
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        itk.imwrite(img, str(folder / f"{series_uid.rsplit('.', 1)[-1]}_{i:03d}.dcm"), imageio=io)


@dataclass
class Case:
    """One bad input: ``make(folder)`` writes it and returns the datalist entry (or inference path) it gives."""

    name: str
    where: str  # "training" (datalist preflight) or "inference" (input filter)
    make: Callable[[Path], dict]
    expect: str  # a phrase the message must contain


def _image_only(data: np.ndarray, name: str) -> Callable[[Path], dict]:
    def make(folder: Path) -> dict:
        return {**good_pair(folder, name), "image": _save(data, folder / f"{name}_img.nii.gz")}

    return make


def _label_only(data: np.ndarray, name: str, affine: np.ndarray = AFFINE) -> Callable[[Path], dict]:
    def make(folder: Path) -> dict:
        return {**good_pair(folder, name), "label": _save(data, folder / f"{name}_lbl.nii.gz", affine)}

    return make


def _nan(folder: Path) -> dict:
    pair = good_pair(folder, "nan")
    data = np.asarray(nib.load(pair["image"]).dataobj, np.float32)
    data[3, 4, 1] = np.nan
    data[5, 5, 2] = np.inf
    return {**pair, "image": _save(data, folder / "nan_img.nii.gz")}


def _multichannel(folder: Path) -> dict:
    pair = good_pair(folder, "rgb")
    vector = np.zeros((*SHAPE, 1, 3), np.float32)  # NIfTI's layout of a 3-component vector image
    return {**pair, "image": _save(vector, folder / "rgb_img.nii.gz")}


def _truncated(folder: Path) -> dict:
    pair = good_pair(folder, "trunc")
    raw = Path(pair["image"]).read_bytes()
    Path(pair["image"]).write_bytes(raw[: len(raw) // 2])
    return pair


def _not_gzip(folder: Path) -> dict:
    pair = good_pair(folder, "garbage")
    Path(pair["image"]).write_bytes(gzip.compress(b"this is not a NIfTI file" * 20))
    return pair


def _empty(folder: Path) -> dict:
    pair = good_pair(folder, "empty")
    Path(pair["image"]).write_bytes(b"")
    return pair


def _dicom_mixed(folder: Path) -> dict:
    series = folder / "mixed_series"
    write_dicom_series(series, "1.2.826.0.1.3680043.2.1125.100", seed=1)
    write_dicom_series(series, "1.2.826.0.1.3680043.2.1125.200", z0=50.0, seed=2)
    return {"image": str(series)}


_shifted = AFFINE.copy()
_shifted[:3, 3] = [5.0, 0.0, 0.0]
_label_12 = np.zeros(SHAPE, np.uint8)
_label_12[2:5, 2:5, 0] = 12
_label_half = np.zeros(SHAPE, np.float32)
_label_half[2:5, 2:5, 0] = 0.5

CASES: list[Case] = [
    Case("2D image where a 3D volume is expected", "training", _image_only(np.zeros(SHAPE[:2], np.float32), "flat"), "is 2D"),
    Case("4D image (cine / time series)", "training", _image_only(np.zeros((*SHAPE, 5), np.float32), "cine"), "4D"),
    Case("multi-channel image (3-component NIfTI vector image)", "training", _multichannel, "3 channels"),
    Case("image / label shape mismatch", "training", _label_only(np.zeros((24, 20, 5), np.uint8), "shape"), "has shape"),
    Case("image / label geometry mismatch (label shifted 5 mm)", "training", _label_only(np.zeros(SHAPE, np.uint8), "geom", _shifted),
         "different grids"),
    Case("label values outside the preset's classes (12 of 0..8)", "training", _label_only(_label_12, "classes"), "outside"),
    Case("label values that are not whole numbers", "training", _label_only(_label_half, "frac"), "not whole numbers"),
    Case("NaN / infinite voxels", "training", _nan, "NaN"),
    Case("empty file (0 bytes)", "training", _empty, "is empty"),
    Case("truncated .nii.gz (half the bytes)", "training", _truncated, "cannot be read"),
    Case("not an image (gzip of text named .nii.gz)", "training", _not_gzip, "cannot be read"),
    Case("missing file", "training", lambda f: {**good_pair(f, "missing"), "image": str(f / "absent_img.nii.gz")}, "missing"),
    Case("DICOM folder holding two series", "inference", _dicom_mixed, "2 series"),
    Case("4D image given to inference", "inference", lambda f: {"image": _save(np.zeros((*SHAPE, 5), np.float32), f / "cine4d.nii.gz")},
         "4D"),
    Case("truncated .nii.gz given to inference", "inference", lambda f: {"image": _truncated(f)["image"]}, "cannot be read"),
]


def build(case: Case, folder: Path) -> tuple[str, dict]:
    """Writes ``case`` beside one good pair into ``folder``; returns (datalist path, bad entry)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = good_pair(folder, "ok")
    bad = case.make(folder)
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"training": [good, bad], "validation": [good]}, indent=1))
    return str(datalist), bad


def outcome(case: Case, folder: Path) -> str:
    """What the user sees for ``case``: the preflight error (training) or the rejection line (inference)."""
    from scripts.preflight import REJECTED_FILE, check_datalist, usable_images
    from scripts.utils import BundleInputError

    datalist, bad = build(case, folder)
    if case.where == "training":
        try:
            check_datalist(datalist, ("training", "validation"), num_classes=NUM_CLASSES)
        except BundleInputError as e:
            return str(e)
        return "(accepted)"
    out = folder / "out"
    items = [{"image": json.loads(Path(datalist).read_text())["training"][0]["image"]}, {"image": bad["image"]}]
    kept = usable_images(items, str(out))
    rejected = (out / REJECTED_FILE).read_text().strip().splitlines()[1:] if (out / REJECTED_FILE).exists() else []
    return f"{len(kept)} of 2 inputs segmented; {REJECTED_FILE}: " + " | ".join(rejected)


def _empty_datalist(folder: Path) -> str:
    from scripts.utils import BundleInputError, load_datalist

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": [], "validation": []}))
    try:
        load_datalist(str(path), "training")
    except BundleInputError as e:
        return str(e)
    return "(accepted)"


def table(root: Path | None = None) -> str:
    """The Markdown table of every case and its message (paths shown relative to the case's folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(root or tmp)
        rows = []
        for i, case in enumerate(CASES):
            folder = base / f"case{i:02d}"
            seen = outcome(case, folder).replace(str(folder) + os.sep, "").replace(str(folder), ".")
            rows.append((case.name, case.where, seen))
        folder = base / "empty"
        rows.append(("empty datalist", "training", _empty_datalist(folder).replace(str(folder) + os.sep, "")))
    lines = [
        "# Bad inputs: what the user sees",
        "",
        "Generated by `python -m scripts.bad_inputs --write docs/bad_inputs.md` (do not edit by hand); every case is",
        "also run through the bundle's commands by `tests/test_robustness.py`. *training* = the datalist preflight",
        "(`configs/train.json` and `configs/evaluate.json` run it before any dataset is built: the run stops with this",
        "one message, listing every bad file); *inference* = the input filter of `configs/inference.json` (the bad",
        "file is logged and listed in `rejected_inputs.csv` in the output folder, the good ones are still segmented;",
        "only when no input is usable does the run stop). Each case is one bad entry beside one good pair; paths are",
        "relative to the case's folder.",
        "",
        "| case | checked at | what the user sees |",
        "|---|---|---|",
    ]
    for name, where, seen in rows:
        cell = seen.replace("|", "\\|").replace("\n", "<br>")
        lines.append(f"| {name} | {where} | {cell} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Table of the bad-input cases and what the user sees.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", type=Path, help="write the Markdown table here")
    g.add_argument("--check", type=Path, help="exit 1 if this file differs from the table generated now")
    args = p.parse_args(argv)
    text = table()
    if args.write:
        from scripts.atomic import atomic_output

        with atomic_output(args.write) as tmp:
            tmp.write_text(text)
        print(f"wrote {args.write} ({len(CASES) + 1} cases)")
        return 0
    if args.check.read_text() != text:
        print(f"{args.check} is stale: regenerate it with python -m scripts.bad_inputs --write {args.check}", file=sys.stderr)
        return 1
    print(f"{args.check} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
