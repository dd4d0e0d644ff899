"""Preflight checks of the input files, before any long work starts.

Every image (and label) is read the way the bundle's pipeline reads it (MONAI ``LoadImage``, default readers) and
checked for the faults hospitals' archives produce: unreadable, empty or truncated files, 2D or 4D / multi-channel
volumes where one 3D single-channel volume is expected, NaN or infinite voxels, a DICOM folder holding more than
one series, labels outside the preset's classes (or not whole numbers), and image / label pairs whose shape or
geometry differ. Each fault is reported as ``<file>: <fault>``.

- Training and evaluation (:func:`check_datalist`): all entries of the named lists are checked before the datasets
  are built (the configs make the datasets ``_requires_`` it), and one :class:`~scripts.utils.BundleInputError`
  lists every fault: nothing is trained on a partly bad datalist.
- Inference (:func:`usable_images`): bad inputs are logged, listed in ``<output_dir>/rejected_inputs.csv`` and
  left out; the good ones are still segmented. Only when no input is usable does it raise.

``python -m scripts.preflight DATALIST [--keys training validation] [--num-classes 9]`` runs the same check alone.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from scripts.atomic import atomic_output
from scripts.utils import BundleInputError, load_datalist

__all__ = ["VolumeInfo", "inspect_volume", "check_pair", "check_datalist", "usable_images", "REJECTED_FILE"]

logger = logging.getLogger(__name__)
REJECTED_FILE = "rejected_inputs.csv"
_AFFINE_TOL = 1e-3  # mm (and mm per voxel along each axis direction)


@dataclass
class VolumeInfo:
    """What the pipeline would see of one file: spatial shape, affine, and the problems found."""

    path: str
    shape: tuple = ()
    affine: Any = None
    problems: list = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.problems = [] if self.problems is None else self.problems


def _dicom_series(folder: str) -> list[str]:
    """Series instance UIDs of the DICOM files in ``folder`` (ITK / GDCM, as MONAI's ITKReader finds them)."""
    import itk

    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(False)
    names.SetDirectory(folder)
    return list(names.GetSeriesUIDs())


def _load(path: str) -> Any:
    from monai.transforms import LoadImage

    return LoadImage(image_only=True)(path)


def inspect_volume(path: str, in_channels: int = 1, label: bool = False, num_classes: int | None = None) -> VolumeInfo:
    """Reads ``path`` fully as the pipeline does and lists its problems as an image (or, with ``label``, a label map
    of ``num_classes`` classes). The array is not kept."""
    info = VolumeInfo(path)
    if not os.path.exists(path):
        info.problems.append("does not exist")
        return info
    if os.path.isdir(path):
        try:
            series = _dicom_series(path)
        except Exception as e:  # noqa: BLE001 - any reader failure is the user's file problem to report
            info.problems.append(f"is a folder ITK cannot read as DICOM ({type(e).__name__}: {e})")
            return info
        if not series:
            info.problems.append("is a folder without a DICOM series")
            return info
        if len(series) > 1:
            info.problems.append(
                f"is a DICOM folder holding {len(series)} series ({', '.join(series[:4])}{', ...' if len(series) > 4 else ''}): "
                "put each series in its own folder"
            )
            return info
    elif os.path.getsize(path) == 0:
        info.problems.append("is empty (0 bytes)")
        return info
    try:
        img = _load(path)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        hint = " (truncated or corrupt file?)" if isinstance(e, (EOFError, OSError, zlib.error)) else ""
        info.problems.append(f"cannot be read{hint}: {type(e).__name__}: {msg[-1] if msg else ''}"[:400])
        return info

    channel_dim = img.meta.get("original_channel_dim", "no_channel")
    shape = tuple(int(s) for s in img.shape)
    if isinstance(channel_dim, (int, np.integer)) and not isinstance(channel_dim, bool):
        channels = shape[channel_dim]
        spatial = tuple(s for i, s in enumerate(shape) if i != channel_dim % len(shape))
    else:
        channels, spatial = 1, shape
    while len(spatial) > 3 and spatial[-1] == 1:  # NIfTI's singleton time axis of vector images (x, y, z, 1, c)
        spatial = spatial[:-1]
    info.shape, info.affine = spatial, np.asarray(img.affine, dtype=np.float64)
    if len(spatial) != 3:
        info.problems.append(f"is {len(spatial)}D (shape {shape}): the bundle expects a 3D volume")
    if channels != (1 if label else in_channels):
        kind = "a 4D (time or multi-channel) volume" if len(shape) == 4 else "a multi-channel image"
        want = "a single-channel label map" if label else f"{in_channels} channel{'s' if in_channels > 1 else ''}"
        info.problems.append(f"is {kind} with {channels} channels (shape {shape}): the bundle expects {want}")
    if info.problems:
        return info

    data = np.asarray(img)
    if label:
        values = np.unique(data)
        bad = values[~np.isfinite(values) | (values != np.round(values))] if np.issubdtype(values.dtype, np.floating) else []
        if len(bad):
            info.problems.append(f"has label values that are not whole numbers: {bad[:5].tolist()}")
        elif num_classes is not None:
            outside = values[(values < 0) | (values >= num_classes)]
            if len(outside):
                info.problems.append(
                    f"has label values {outside[:8].astype(np.int64).tolist()} outside the preset's classes 0..{num_classes - 1}"
                )
    elif np.issubdtype(data.dtype, np.floating):
        finite = np.isfinite(data)
        if not finite.all():
            n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
            info.problems.append(f"has {n_nan} NaN and {n_inf} infinite voxels")
    return info


def check_pair(image: VolumeInfo, label: VolumeInfo) -> list[str]:
    """Problems of an image / label pair that each read fine: different grids."""
    if image.problems or label.problems:
        return []
    if image.shape != label.shape:
        return [f"label {label.path} has shape {label.shape}, its image {image.path} has {image.shape}"]
    diff = float(np.abs(image.affine - label.affine).max())
    if diff > _AFFINE_TOL:
        return [f"label {label.path} and its image {image.path} lie on different grids (affines differ by up to {diff:.4g})"]
    return []


def _problems(entry: dict, in_channels: int, num_classes: int | None) -> list[str]:
    image = inspect_volume(entry["image"], in_channels)
    found = [f"{image.path}: {p}" for p in image.problems]
    if "label" in entry:
        label = inspect_volume(entry["label"], label=True, num_classes=num_classes)
        found += [f"{label.path}: {p}" for p in label.problems] + check_pair(image, label)
    return found


def check_datalist(
    datalist_file: str,
    keys: Sequence[str] = ("training", "validation"),
    num_classes: int | None = None,
    in_channels: int = 1,
    enabled: bool = True,
) -> dict[str, int]:
    """Checks every entry of the lists ``keys`` of ``datalist_file`` (images and labels); raises one
    :class:`~scripts.utils.BundleInputError` naming each bad file and its fault. Returns ``{key: entries}``."""
    if not enabled:
        return {}
    counts, found = {}, []
    for key in keys:
        items = load_datalist(datalist_file, key)
        counts[key] = len(items)
        for i, entry in enumerate(items):
            found += [f"{key}[{i}] {p}" for p in _problems(entry, in_channels, num_classes)]
    if found:
        listed = "\n".join(f"  - {p}" for p in found)
        raise BundleInputError(
            f"datalist {datalist_file}: {len(found)} problem(s) in its {'/'.join(keys)} entries; nothing was started:\n"
            f"{listed}\n(run `python -m scripts.preflight {datalist_file}` to check it again after fixing)"
        )
    logger.info(f"preflight: {datalist_file} {counts} checked, no problems")
    return counts


def usable_images(items: list[dict], output_dir: str, in_channels: int = 1, enabled: bool = True) -> list[dict]:
    """The entries of ``items`` whose image passes :func:`inspect_volume`; the others are logged and listed (file,
    problem) in ``output_dir/rejected_inputs.csv`` (rewritten each run that rejects some). Raises
    :class:`~scripts.utils.BundleInputError` when none is usable."""
    if not enabled or not items:
        return items
    good, rejected = [], []
    for entry in items:
        problems = inspect_volume(entry["image"], in_channels).problems
        if problems:
            rejected += [(entry["image"], p) for p in problems]
            logger.error(f"skipping {entry['image']}: {'; '.join(problems)}")
        else:
            good.append(entry)
    if rejected:
        path = os.path.join(output_dir, REJECTED_FILE)
        with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "problem"])
            writer.writerows(rejected)
        logger.error(f"{len(items) - len(good)} of {len(items)} inputs rejected, listed in {path}")
    if not good:
        listed = "\n".join(f"  - {f}: {p}" for f, p in rejected)
        raise BundleInputError(f"none of the {len(items)} inputs can be segmented:\n{listed}")
    return good


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datalist", help="datalist JSON (prepare_data's datalist.json)")
    p.add_argument("--keys", nargs="+", default=["training", "validation"])
    p.add_argument("--num-classes", type=int, default=None, help="label values must lie in 0..N-1")
    p.add_argument("--in-channels", type=int, default=1)
    args = p.parse_args(argv)
    try:
        counts = check_datalist(args.datalist, args.keys, args.num_classes, args.in_channels)
    except BundleInputError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{args.datalist}: {counts} entries checked, no problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
