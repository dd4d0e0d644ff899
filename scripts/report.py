"""Per-case metric tables and summaries in the layout of the LeViT-UNet / TransUNet papers.

Three ways in:
  * functions on "rows" (one per case: ``{"case": str, "metrics": case_metrics(...)}``):
    :func:`write_case_csv`, :func:`summarize`, :func:`summary_table`, :func:`write_reports`;
  * a command line comparing a folder of predicted NIfTI label maps with a folder of labels::

        python -m scripts.report PRED_DIR LABEL_DIR --labels background,aorta,... \\
            [--protocol transunet|strict] [--output-dir DIR]

    Both folders are searched recursively for ``*.nii.gz`` / ``*.nii``. A prediction is matched to
    the label with the same file name, else after removing one known suffix before the extension
    (predictions: ``_seg``, ``_pred``, ``_prediction``, ``_segmentation``, ``_trans`` (MONAI
    SaveImage's default postfix); labels: ``_label``, ``_labels``, ``_gt``, ``_seg``, ``_mask``), so
    ``case0001_seg.nii.gz`` (or MONAI's ``case0001/case0001_seg.nii.gz``) matches ``case0001.nii.gz``.
    ``--labels`` lists every class by label value, background first. Spacing comes from the label's
    header; it writes ``metrics_per_case.csv``, ``metrics_summary.md`` and ``metrics_summary.json``
    (default: into PRED_DIR) and prints the Markdown table;
  * :class:`MetricsReportHandler`, an Ignite handler for a MONAI bundle evaluator.

Summary convention (TransUNet's): for each class the mean over cases, then the mean over classes;
NaN values (``strict`` protocol) are left out of every mean; std is the population std (ddof=0) over
cases, for the overall columns of the per-case mean over classes. DSC in %, HD95 in voxels (the
papers' convention) with millimetre columns added when the spacing is known.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from scripts.atomic import atomic_output
from scripts.metrics import PROTOCOLS, case_metrics

__all__ = [
    "ReportInputError",
    "write_case_csv",
    "summarize",
    "summary_table",
    "write_reports",
    "match_files",
    "evaluate_folders",
    "MetricsReportHandler",
    "main",
]

logger = logging.getLogger(__name__)

PRED_SUFFIXES = ("_segmentation", "_prediction", "_pred", "_seg", "_trans")
LABEL_SUFFIXES = ("_labels", "_label", "_gt", "_seg", "_mask")
CSV_NAME, MD_NAME, JSON_NAME = "metrics_per_case.csv", "metrics_summary.md", "metrics_summary.json"
Row = dict[str, Any]


class ReportInputError(ValueError):
    """Bad input to the report (missing / unreadable / mismatched file); the message names the file."""


# ----------------------------------------------------------------------------------------------- rows


def _classes(rows: Sequence[Row], class_names: Sequence[str]) -> list[tuple[int, str]]:
    """(class index, name) of the foreground classes. ``class_names`` is either the full list indexed by
    label value (background first) or the foreground names only; the rows' class count decides which."""
    names = list(class_names)
    k = max((int(c) for r in rows for c in r["metrics"]), default=0)
    if k == 0:  # no rows: a first name like "background" marks the full list
        k = len(names) - 1 if names and names[0].lower() in ("background", "bg") else len(names)
    if len(names) == k + 1:
        names = names[1:]
    elif len(names) != k:
        raise ValueError(f"{len(names)} class names given for {k} foreground classes (give all, background first)")
    return list(enumerate(names, start=1))


def _get(row: Row, c: int, key: str) -> float:
    """Metric ``key`` of class ``c`` in ``row`` (NaN when absent)."""
    m = row["metrics"].get(c, row["metrics"].get(str(c), {}))
    return float(m.get(key, math.nan))


def _has_mm(rows: Sequence[Row]) -> bool:
    return any("hd95_mm" in m for r in rows for m in r["metrics"].values())


def _atomic_write(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to a temp file next to ``path`` then renames it over ``path`` (no partial files)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, newline="")


def write_case_csv(rows: Sequence[Row], class_names: Sequence[str], path: str | os.PathLike) -> None:
    """CSV, one row per case: ``case``, then per class ``<name>_dice``, ``<name>_hd95`` (voxels) and
    ``<name>_hd95_mm`` when any row has it; NaN written as ``nan``. Written atomically."""
    classes, mm = _classes(rows, class_names), _has_mm(rows)
    keys = ["dice", "hd95"] + (["hd95_mm"] if mm else [])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case"] + [f"{name}_{k}" for _, name in classes for k in keys])
    for r in rows:
        w.writerow([r["case"]] + [repr(_get(r, c, k)) for c, _ in classes for k in keys])
    _atomic_write(path, buf.getvalue())


def _mean_std(v: np.ndarray) -> tuple[float, float]:
    """Mean and population std of the non-NaN values (NaN, NaN when there are none)."""
    v = v[~np.isnan(v)]
    return (float(v.mean()), float(v.std())) if v.size else (math.nan, math.nan)


def summarize(rows: Sequence[Row], class_names: Sequence[str]) -> dict[str, Any]:
    """Numeric summary: ``num_cases``; ``mean_dice`` / ``mean_hd95`` (mean over classes of each class's
    mean over cases; Dice as a fraction) with ``dice_std`` / ``hd95_std`` (std over cases of the per-case
    mean over classes); ``mean_hd95_mm`` / ``hd95_mm_std`` when spacing was known; and ``per_class``
    ``{name: {"dice_mean", "dice_std", "hd95_mean", "hd95_std"[, "hd95_mm_mean", "hd95_mm_std"]}}``."""
    classes = _classes(rows, class_names)
    keys = ["dice", "hd95"] + (["hd95_mm"] if _has_mm(rows) else [])
    out: dict[str, Any] = {"num_cases": len(rows)}
    per_class: dict[str, dict[str, float]] = {name: {} for _, name in classes}
    for k in keys:
        table = np.array([[_get(r, c, k) for c, _ in classes] for r in rows], dtype=float)
        table = table.reshape(len(rows), len(classes))
        for j, (_, name) in enumerate(classes):
            per_class[name][f"{k}_mean"], per_class[name][f"{k}_std"] = _mean_std(table[:, j])
        out[f"mean_{k}"] = _mean_std(np.array([per_class[n][f"{k}_mean"] for _, n in classes]))[0]
        valid = ~np.isnan(table)
        case_means = np.where(valid.any(1), np.nansum(table, 1) / np.maximum(valid.sum(1), 1), np.nan)
        out[f"{k}_std"] = _mean_std(case_means)[1]
    out["per_class"] = per_class
    return out


def _fmt(v: float, scale: float = 1.0) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v * scale:.2f}"


def summary_table(rows: Sequence[Row], class_names: Sequence[str], title: str | None = None) -> str:
    """Markdown summary in the layout of the papers' tables: a row of means (DSC %, HD95 voxels, then
    each class's DSC %) and a row of stds, then an HD95 table (overall and per class; voxels, and mm
    when known)."""
    s = summarize(rows, class_names)
    names = [n for _, n in _classes(rows, class_names)]
    pc = s["per_class"]
    lines = [title or f"Metrics over {s['num_cases']} cases (DSC in %, HD95 in voxels; NaN excluded)", ""]
    lines += ["| | DSC (%) | HD95 | " + " | ".join(names) + " |", "| --- " * (len(names) + 3) + "|"]
    for stat, d_key, h_key in (("mean", "mean_dice", "mean_hd95"), ("std", "dice_std", "hd95_std")):
        cells = [_fmt(s[d_key], 100), _fmt(s[h_key])] + [_fmt(pc[n][f"dice_{stat}"], 100) for n in names]
        lines.append(f"| {stat} | " + " | ".join(cells) + " |")
    lines += ["", "| HD95 | all | " + " | ".join(names) + " |", "| --- " * (len(names) + 2) + "|"]
    for unit, key in (("voxels", "hd95"), ("mm", "hd95_mm")):
        if f"mean_{key}" in s:
            for stat, overall in (("mean", s[f"mean_{key}"]), ("std", s[f"{key}_std"])):
                cells = [_fmt(overall)] + [_fmt(pc[n][f"{key}_{stat}"]) for n in names]
                lines.append(f"| {stat} ({unit}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _nan_to_none(x: Any) -> Any:
    """``x`` with NaN floats replaced by None (``null``: NaN is not valid JSON)."""
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    return None if isinstance(x, float) and math.isnan(x) else x


def write_reports(
    rows: Sequence[Row], class_names: Sequence[str], output_dir: str | os.PathLike, protocol: str = "transunet"
) -> tuple[str, dict[str, Any]]:
    """Writes ``metrics_per_case.csv``, ``metrics_summary.md`` and ``metrics_summary.json`` (summary plus
    protocol and class names; NaN as ``null``) into ``output_dir``; returns (Markdown table, summary dict)."""
    out = Path(output_dir)
    write_case_csv(rows, class_names, out / CSV_NAME)
    table = summary_table(rows, class_names, title=f"Metrics over {len(rows)} cases, protocol {protocol!r} "
                          "(DSC in %, HD95 in voxels; NaN excluded)")
    summary = summarize(rows, class_names)
    _atomic_write(out / MD_NAME, table)
    meta = {"protocol": protocol, "class_names": [n for _, n in _classes(rows, class_names)]}
    _atomic_write(out / JSON_NAME, json.dumps(_nan_to_none({**meta, **summary}), indent=2) + "\n")
    return table, summary


# --------------------------------------------------------------------------------------------- folders


def _stem(path: Path) -> str:
    """File name without ``.nii.gz`` / ``.nii`` (or, for other names, the last extension)."""
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return os.path.splitext(name[:-3] if name.endswith(".gz") else name)[0]


def _strip(stem: str, suffixes: Sequence[str]) -> str:
    """``stem`` without the first of ``suffixes`` it ends with (never down to an empty name)."""
    for s in suffixes:
        if stem.endswith(s) and len(stem) > len(s):
            return stem[: -len(s)]
    return stem


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith((".nii.gz", ".nii")))


def match_files(pred_dir: str | os.PathLike, label_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """(case id, prediction, label) for every prediction NIfTI under ``pred_dir``, matched by file name
    (exact, else with one known suffix removed; see the module doc). Raises :class:`ReportInputError`
    for a missing folder, an empty prediction folder, a prediction without label, or two predictions
    of the same case."""
    pred_dir, label_dir = Path(pred_dir), Path(label_dir)
    for d, what in ((pred_dir, "prediction"), (label_dir, "label")):
        if not d.is_dir():
            raise ReportInputError(f"{what} folder not found: {d}")
    preds = _nifti_files(pred_dir)
    if not preds:
        raise ReportInputError(f"no prediction files (*.nii.gz, *.nii) in {pred_dir}")
    exact: dict[str, Path] = {}
    stripped: dict[str, Path | None] = {}
    for lab in _nifti_files(label_dir):
        exact.setdefault(_stem(lab), lab)
        key = _strip(_stem(lab), LABEL_SUFFIXES)
        stripped[key] = None if key in stripped and stripped[key] != lab else lab  # None: ambiguous
    matches: dict[str, tuple[str, Path, Path]] = {}
    for p in preds:
        keys = dict.fromkeys((_stem(p), _strip(_stem(p), PRED_SUFFIXES)))
        found = next(((k, exact[k]) for k in keys if k in exact), None) or next(
            ((k, stripped[k]) for k in keys if stripped.get(k) is not None), None)
        if found is None:
            raise ReportInputError(f"no label in {label_dir} for prediction {p} (looked for {' or '.join(keys)})")
        case, lab = found
        if case in matches:
            raise ReportInputError(f"two predictions for case {case!r}: {matches[case][1]} and {p}")
        matches[case] = (case, p, lab)
    return list(matches.values())


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(3D array, affine, spacing) of a NIfTI file; trailing singleton axes beyond 3 are dropped."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for corrupt / non-NIfTI files
        raise ReportInputError(f"cannot read {path}: {e}") from e
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ReportInputError(f"{path} is not a 3D label map (shape {data.shape})")
    return data, img.affine, tuple(float(z) for z in img.header.get_zooms()[:3])


def evaluate_folders(
    pred_dir: str | os.PathLike, label_dir: str | os.PathLike, num_classes: int, protocol: str = "transunet"
) -> list[Row]:
    """Rows of :func:`case_metrics` for every matched (prediction, label) pair, with the label header's
    spacing (``hd95_mm``). Errors name the offending files."""
    rows = []
    for case, pred_path, label_path in match_files(pred_dir, label_dir):
        label, label_affine, spacing = _load_nifti(label_path)
        pred, pred_affine, _ = _load_nifti(pred_path)
        if pred.shape != label.shape:
            raise ReportInputError(
                f"shape mismatch: prediction {pred_path} {pred.shape} vs label {label_path} {label.shape}"
            )
        if not np.allclose(pred_affine, label_affine, atol=1e-3):
            logger.warning("affine of %s differs from its label %s (resampled back?)", pred_path, label_path)
        try:
            metrics = case_metrics(pred, label, num_classes, spacing=spacing, protocol=protocol)
        except ValueError as e:
            hint = "--labels must list every class, background first"
            raise ReportInputError(f"{pred_path} vs {label_path}: {e} ({hint})") from e
        rows.append({"case": case, "metrics": metrics})
        logger.info("%s: mean Dice %.4f", case, np.nanmean([m["dice"] for m in metrics.values()]))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module doc); returns the exit status (2 on bad input)."""
    ap = argparse.ArgumentParser(prog="python -m scripts.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("pred_dir", help="folder of predicted label maps (*.nii.gz), searched recursively")
    ap.add_argument("label_dir", help="folder of ground-truth label maps, searched recursively")
    ap.add_argument("--labels", required=True, help="comma-separated class names by label value, background first")
    ap.add_argument("--protocol", choices=PROTOCOLS, default="transunet", help="empty-mask convention")
    ap.add_argument("--output-dir", default=None, help="where the CSV / Markdown / JSON go (default: PRED_DIR)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.labels.split(",") if n.strip()]
    if len(names) < 2:
        ap.error("--labels needs at least two names (background first)")
    try:
        rows = evaluate_folders(args.pred_dir, args.label_dir, len(names), args.protocol)
        table, _ = write_reports(rows, names, args.output_dir or args.pred_dir, args.protocol)
    except ReportInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    return 0


# --------------------------------------------------------------------------------------------- handler


def _case_id(path: Any) -> str | None:
    """File name of ``filename_or_obj`` without its extension(s), or None."""
    if isinstance(path, (list, tuple)):
        path = path[0] if len(path) == 1 else None
    return _stem(Path(str(path))) if path else None


def _to_label_map(x: Any) -> np.ndarray:
    """A (1, H, W, D) label map or (C, H, W, D) one-hot / probabilities (argmax over channel 0) or an
    (H, W, D) map, as an integer numpy array."""
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if a.ndim == 4:
        a = a[0] if a.shape[0] == 1 else a.argmax(0)
    if a.ndim != 3:
        raise ValueError(f"expected a (C, H, W, D) or (H, W, D) label map, got shape {a.shape}")
    return np.rint(a).astype(np.int64) if np.issubdtype(a.dtype, np.floating) else a.astype(np.int64)


def _spacing(x: Any) -> tuple[float, ...] | None:
    """Voxel size of a MetaTensor: from its affine (which follows resampling) when it is real, i.e.
    not the default identity of a tensor without metadata, else from ``pixdim``; None when unknown."""
    meta = getattr(x, "meta", None) or {}
    affine = meta.get("affine")
    if affine is not None:
        a = np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine, dtype=float)
        if a.ndim == 3:
            a = a[0]
        if not np.allclose(a, np.eye(a.shape[0])) or "pixdim" in meta or "original_affine" in meta:
            return tuple(float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(0)))
    pixdim = meta.get("pixdim")
    if pixdim is not None:
        p = np.asarray(pixdim.detach().cpu() if hasattr(pixdim, "detach") else pixdim, dtype=float).ravel()
        return tuple(float(v) for v in p[1:4])
    return None


class MetricsReportHandler:
    """Ignite handler: per-case Dice / HD95 (:func:`case_metrics`) of a MONAI evaluator's decollated
    output, written as CSV + Markdown + JSON into ``output_dir`` at the end of each epoch.

    ``engine.state.output`` is a list (one per case) of dicts whose ``pred_key`` / ``label_key`` hold
    (1, H, W, D) label maps or (C, H, W, D) one-hot maps; the case id is the file name in the pred's
    (else the label's) ``meta["filename_or_obj"]``, else a running index. ``class_names`` lists every
    class by label value, background first. ``spacing_from`` ("label", "pred" or None) picks the tensor
    whose affine / pixdim gives the mm spacing for ``hd95_mm``. Under torch.distributed the rows are
    gathered to rank 0, which alone writes. After an epoch ``rows`` and ``summary`` hold the results.
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        protocol: str = "transunet",
        pred_key: str = "pred",
        label_key: str = "label",
        spacing_from: str | None = "label",
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if spacing_from not in ("label", "pred", None, "none"):
            raise ValueError(f"spacing_from must be 'label', 'pred' or None, got {spacing_from!r}")
        if len(class_names) < 2:
            raise ValueError("class_names must list every class, background first (at least two)")
        self.output_dir, self.class_names, self.protocol = output_dir, list(class_names), protocol
        self.pred_key, self.label_key = pred_key, label_key
        self.spacing_from = None if spacing_from == "none" else spacing_from
        self.rows: list[Row] = []
        self.summary: dict[str, Any] | None = None
        self._count = 0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self, engine: Any = None) -> None:
        self.rows, self._count = [], 0

    def iteration_completed(self, engine: Any) -> None:
        """Adds one row per case of ``engine.state.output``."""
        output = engine.state.output
        if output is None:
            return
        if isinstance(output, dict):
            pred = output[self.pred_key]
            if getattr(pred, "ndim", 0) == 5:  # not decollated: split the batch
                from monai.data import decollate_batch

                output = decollate_batch(output)
            else:
                output = [output]
        for item in output:
            missing = [k for k in (self.pred_key, self.label_key) if k not in item]
            if missing:
                raise KeyError(f"MetricsReportHandler: engine output has no {missing} (keys: {sorted(item)})")
            pred, label = item[self.pred_key], item[self.label_key]
            ids = (_case_id(getattr(t, "meta", {}).get("filename_or_obj")) for t in (pred, label))
            case = next((c for c in ids if c), None)
            rank, world = _dist_rank_world()
            case = case or (f"case_{self._count:04d}" if world == 1 else f"case_r{rank}_{self._count:04d}")
            self._count += 1
            spacing = _spacing(pred if self.spacing_from == "pred" else label) if self.spacing_from else None
            pred_map, label_map = _to_label_map(pred), _to_label_map(label)
            metrics = case_metrics(pred_map, label_map, len(self.class_names), spacing, self.protocol)
            self.rows.append({"case": case, "metrics": metrics})

    def epoch_completed(self, engine: Any) -> None:
        """Gathers the rows to rank 0, which writes the files and logs the table."""
        rank, world = _dist_rank_world()
        rows = self.rows
        if world > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if rank != 0:
            return
        table, self.summary = write_reports(rows, self.class_names, self.output_dir, self.protocol)
        self.rows = list(rows)
        logger.info("segmentation metrics written to %s\n%s", self.output_dir, table)


def _dist_rank_world() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


if __name__ == "__main__":
    sys.exit(main())
