"""Optional outputs of volume inference: per-case organ volumes (CSV) and overlay pictures (PNG).

:class:`PredictionReport` is an Ignite handler for the inference evaluator (``configs/inference.json``).
Enable it with a second config file merged after the bundle's, e.g. ``report.json``::

    {
        "report": {"_target_": "scripts.outputs.PredictionReport",
                   "output_dir": "@output_dir", "label_names": "@label_names"},
        "evaluator#val_handlers": "$@handlers + [@report]"
    }

    python -m monai.bundle run --config_file "['configs/inference.json','report.json']" ...

Which space it reads: handlers run after the evaluator's postprocessing, so ``pred`` is the label map
already brought back by ``Invertd`` to the input's own grid and orientation (the one ``SaveImaged``
writes), while ``image`` is still the preprocessed image (reoriented to RAS, intensities scaled to
[0, 1]). Volumes are counted on ``pred`` with its own affine; for the pictures both are reoriented to
RAS from their affines (no resampling: the bundle's preprocessing only flips / permutes axes), and
axial slices are shown in the radiological convention (patient's right on the left, anterior up).
"""

from __future__ import annotations

import csv
import logging
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations as nio
from monai.data import NibabelWriter
from PIL import Image, ImageDraw, ImageFont

from scripts.atomic import atomic_output

__all__ = [
    "AtomicNibabelWriter",
    "PredictionReport",
    "case_name",
    "voxel_volume_ml",
    "class_volumes_ml",
    "to_ras",
    "pick_slices",
    "render_overlay",
    "overlay_size",
    "write_atomic",
    "PALETTE",
]

logger = logging.getLogger(__name__)

# RGB colour of labels 1, 2, ... (Synapse order: aorta, gallbladder, kidney L, kidney R, liver, pancreas,
# spleen, stomach); further labels cycle through it.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
    (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40),
)
PANEL = 256  # side of each slice's square panel, pixels
LEGEND_WIDTH = 180  # width of the legend column, pixels
LEGEND_ROW = 20  # height of one legend line, pixels
SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm", ".h5")  # as scripts.utils.output_path


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing through a temporary file renamed into place: a run killed while saving
    never leaves a truncated ``*_seg.nii.gz`` that a later run would take as done and skip.

    ``SaveImaged(writer="scripts.outputs.AtomicNibabelWriter", ...)``.
    """

    def write(self, filename: Any, verbose: bool = False, **obj_kwargs: Any) -> None:
        with atomic_output(filename) as tmp:
            super().write(str(tmp), verbose=verbose, **obj_kwargs)
        if verbose:
            logger.info(f"wrote {filename}")


def case_name(path: str) -> str:
    """The case name of an input file or DICOM folder: its base name less the image extension."""
    name = os.path.basename(os.path.normpath(str(path)))
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def voxel_volume_ml(affine: Any) -> float:
    """Volume of one voxel in mL (the affine's spacing is in mm): ``|det(affine[:3, :3])| / 1000``."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def class_volumes_ml(label: np.ndarray, affine: Any, num_classes: int) -> list[float]:
    """Volume in mL of classes ``0 .. num_classes - 1`` of a label map (voxel count x voxel volume)."""
    counts = np.bincount(np.asarray(label, dtype=np.int64).ravel(), minlength=num_classes)[:num_classes]
    return [float(c) * voxel_volume_ml(affine) for c in counts]


def to_ras(array: np.ndarray, affine: Any) -> tuple[np.ndarray, np.ndarray]:
    """A 3D array flipped / transposed to RAS axes by its affine, and its in-RAS voxel spacing."""
    affine = np.asarray(affine, dtype=np.float64)
    ornt = nio.io_orientation(affine)
    ras = nio.apply_orientation(array, nio.ornt_transform(ornt, nio.axcodes2ornt("RAS")))
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[np.argsort(ornt[:, 0])]
    return ras, spacing


def pick_slices(label: np.ndarray, num_slices: int) -> list[int]:
    """Axial slices (last axis) to show: the one with the most foreground in each of ``num_slices``
    equal parts of the foreground's extent; evenly spaced slices when there is no foreground."""
    depth = label.shape[-1]
    counts = (np.asarray(label) > 0).reshape(-1, depth).sum(axis=0)
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return sorted({int(round(z)) for z in np.linspace(0, depth - 1, num_slices + 2)[1:-1]}) or [depth // 2]
    span = np.arange(nonzero[0], nonzero[-1] + 1)
    parts = np.array_split(span, min(num_slices, span.size))
    return sorted({int(part[np.argmax(counts[part])]) for part in parts})


def overlay_size(num_slices: int, num_labels: int, panel: int = PANEL) -> tuple[int, int]:
    """(width, height) of the overlay picture: ``num_slices`` square panels and a legend column of
    ``num_labels - 1`` lines (the background has none)."""
    return num_slices * panel + LEGEND_WIDTH, max(panel, 2 * 8 + (num_labels - 1) * LEGEND_ROW)


def _colour(label: int) -> tuple[int, int, int]:
    return PALETTE[(label - 1) % len(PALETTE)]


def render_overlay(
    image: np.ndarray | None,
    label: np.ndarray,
    spacing: Sequence[float],
    label_names: Sequence[str],
    slices: Sequence[int],
    panel: int = PANEL,
    alpha: float = 0.45,
) -> Any:
    """A ``PIL.Image`` (RGB) of axial ``slices`` of RAS volumes: the image in grey (values in [0, 1];
    black where ``image`` is None) with the labels blended in colour, and a legend naming each colour.

    Each slice fills a ``panel`` x ``panel`` square at its physical aspect (from ``spacing``), shown
    radiologically: the patient's right on the left, anterior at the top.
    """
    label = np.asarray(label, dtype=np.int64)
    image = np.zeros(label.shape, np.float32) if image is None else np.clip(np.asarray(image, np.float32), 0, 1)
    canvas = Image.new("RGB", overlay_size(len(slices), len(label_names), panel), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    lut = np.array([(0, 0, 0)] + [_colour(i) for i in range(1, max(int(label.max()), 1) + 1)], np.float32)
    sx, sy = float(spacing[0]), float(spacing[1])
    scale = panel / max(label.shape[0] * sx, label.shape[1] * sy)
    size = (max(1, round(label.shape[0] * sx * scale)), max(1, round(label.shape[1] * sy * scale)))
    for i, z in enumerate(slices):
        grey = Image.fromarray((image[:, :, z].T[::-1, ::-1] * 255).round().astype(np.uint8))
        grey = grey.resize(size, Image.Resampling.BILINEAR)
        lab = Image.fromarray(label[:, :, z].T[::-1, ::-1].astype(np.int32))
        lab = np.asarray(lab.resize(size, Image.Resampling.NEAREST))
        rgb = np.repeat(np.asarray(grey, np.float32)[..., None], 3, axis=2)
        mask = lab > 0
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * lut[lab[mask]]
        x0, y0 = i * panel + (panel - size[0]) // 2, (panel - size[1]) // 2
        canvas.paste(Image.fromarray(rgb.round().astype(np.uint8)), (x0, y0))
        draw.text((i * panel + 4, 2), f"z={z}", fill=(255, 255, 255), font=font)
    x = len(slices) * panel + 8
    for k, name in enumerate(label_names[1:], start=1):
        y = 8 + (k - 1) * LEGEND_ROW
        draw.rectangle([x, y + 2, x + 13, y + 15], fill=_colour(k))
        draw.text((x + 20, y + 2), name, fill=(255, 255, 255), font=font)
    return canvas


def write_atomic(path: str, write: Any, mode: str = "w") -> None:
    """Calls ``write(file)`` on a temporary file next to ``path``, then renames it to ``path``."""
    newline = {"newline": ""} if "b" not in mode else {}
    with atomic_output(path) as tmp, open(tmp, mode.replace("w", "x"), **newline) as f:
        write(f)


def _array(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _affine(t: Any) -> np.ndarray:
    affine = getattr(t, "affine", None)
    return np.eye(4) if affine is None else _array(affine).astype(np.float64)


class PredictionReport:
    """Per-case organ volumes (CSV) and overlay PNGs from an inference evaluator's outputs.

    On each ``ITERATION_COMPLETED`` it reads ``engine.state.output`` (MONAI's decollated list of dicts)
    and, per case, takes ``pred`` (a ``(1, H, W, D)`` label map) and ``image`` (the preprocessed
    ``(1, H, W, D)`` image in [0, 1]), MetaTensors whose ``meta["filename_or_obj"]`` names the source.
    See the module docstring for the space each is in.

    Args:
        output_dir: folder of the CSV and the pictures (created when missing).
        label_names: class names, index = label value; the first is the background (no column).
        csv_name: the CSV of volumes in mL: a ``case`` column, then one per non-background class. It is
            rewritten whole (temporary file, then rename) after each case: rows already there, from this
            run or an earlier one, are kept; a case seen again replaces its row.
        overlay: also write ``<case>_overlay.png``.
        num_slices: axial slices in each picture.
        pred_key, image_key: keys of the label map and the image in each output dict.
        panel: side in pixels of each slice's panel.
    """

    def __init__(
        self,
        output_dir: str,
        label_names: Sequence[str],
        csv_name: str = "volumes_ml.csv",
        overlay: bool = True,
        num_slices: int = 3,
        pred_key: str = "pred",
        image_key: str = "image",
        panel: int = PANEL,
    ) -> None:
        if len(label_names) < 2:
            raise ValueError(f"label_names needs the background and at least one class, got {list(label_names)}")
        self.output_dir = str(output_dir)
        self.label_names = [str(n) for n in label_names]
        self.csv_path = os.path.join(self.output_dir, csv_name)
        self.overlay = overlay
        self.num_slices = num_slices
        self.pred_key = pred_key
        self.image_key = image_key
        self.panel = panel
        self.header = ["case"] + self.label_names[1:]

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        output = engine.state.output
        if isinstance(output, dict):  # an engine with decollate=False
            from monai.data import decollate_batch

            output = decollate_batch(output)
        for item in output:
            self.report_case(item)

    def report_case(self, item: dict) -> str:
        """Adds the CSV row (and the picture) of one output dict; returns the case name."""
        pred, image = item[self.pred_key], item.get(self.image_key)
        meta = getattr(pred, "meta", {}) or getattr(image, "meta", {}) or {}
        source = meta.get("filename_or_obj") or getattr(image, "meta", {}).get("filename_or_obj", "case")
        case = case_name(source)
        label = np.rint(_array(pred)[0]).astype(np.int64)
        volumes = class_volumes_ml(label, _affine(pred), len(self.label_names))[1:]
        self._write_row(case, volumes)
        if self.overlay:
            self._write_overlay(case, label, _affine(pred), image)
        return case

    def _read_rows(self) -> list[list[str]]:
        if not os.path.isfile(self.csv_path):
            return []
        with open(self.csv_path, newline="") as f:
            rows = list(csv.reader(f))
        if rows and rows[0] != self.header:
            raise ValueError(f"{self.csv_path} has columns {rows[0]}, not {self.header}: choose another csv_name")
        return rows[1:]

    def _write_row(self, case: str, volumes: Sequence[float]) -> None:
        rows = [r for r in self._read_rows() if r and r[0] != case]
        rows.append([case] + [f"{v:.4f}" for v in volumes])
        write_atomic(self.csv_path, lambda f: csv.writer(f).writerows([self.header] + rows))

    def _write_overlay(self, case: str, label: np.ndarray, affine: np.ndarray, image: Any) -> None:
        label_ras, spacing = to_ras(label, affine)
        image_ras = None
        if image is not None:
            image_ras = to_ras(_array(image)[0].astype(np.float32), _affine(image))[0]
            if image_ras.shape != label_ras.shape:  # a preprocessing that resamples: bring it to the label grid
                t = torch.from_numpy(np.ascontiguousarray(image_ras))[None, None]
                image_ras = F.interpolate(t, size=label_ras.shape, mode="trilinear", align_corners=False)[0, 0].numpy()
            lo, hi = float(image_ras.min()), float(image_ras.max())
            if lo < 0 or hi > 1:  # not the bundle's [0, 1] scaling: show the 1-99 percentile window
                lo, hi = np.percentile(image_ras, [1, 99])
                image_ras = (image_ras - lo) / max(hi - lo, 1e-6)
        slices = pick_slices(label_ras, self.num_slices)
        picture = render_overlay(image_ras, label_ras, spacing, self.label_names, slices, self.panel)
        path = os.path.join(self.output_dir, f"{case}_overlay.png")
        write_atomic(path, lambda f: picture.save(f, format="PNG"), mode="wb")
        logger.info(f"{case}: volumes in {self.csv_path}, overlay {path}")
