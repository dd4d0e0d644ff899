"""Converts the dataset formats users hold into NIfTI volumes plus a MONAI datalist.

Every converter writes, under an output folder ``OUT``::

    OUT/imagesTr/<case>.nii.gz   float32 image, axial slices on the last array axis (X, Y, Z)
    OUT/labelsTr/<case>.nii.gz   uint8 label map, same grid
    OUT/datalist.json            {"name", "labels", "training", "validation", "test"}

Formats that store slices first (HDF5 volumes, stacked 2D slices; D x H x W) are transposed to
W x H x D, so ``array[x, y, k]`` is row ``y``, column ``x`` of slice ``k``; they store no spacing, so their
affine is the identity (1.0 mm placeholder spacing: distances on them are in voxels). Raw NIfTI inputs
(BTCV, ACDC) keep their own affine and header geometry; only label values and dtypes change.

Each file is written under a temporary name in its folder and renamed into place once complete; a
stale ``datalist.json`` is removed first and the new one written last, so a failed run never leaves
something that looks complete. Every fault in the input raises :class:`DataPreparationError` naming
the file.

Usage::

    python -m scripts.prepare_data synapse-raw --input BTCV --output data/synapse
    python -m scripts.prepare_data synapse-transunet --input project_TransUNet/data/Synapse --output data/synapse
    python -m scripts.prepare_data acdc-raw --input ACDC/database/training --output data/acdc
    python -m scripts.prepare_data acdc-ssl4mis --input ACDC_ssl4mis --output data/acdc
    python -m scripts.prepare_data demo --output demo_data [--num-train 8 --num-val 2 --num-test 2 --size 96 96 12 --seed 0]
    python -m scripts.prepare_data compact --input data/acdc/datalist.json --output data/acdc_small --img-size 224
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import h5py
import nibabel as nib
import numpy as np

from scripts.atomic import atomic_output

__all__ = [
    "ACDC_LABELS",
    "BTCV_TO_SYNAPSE",
    "DataPreparationError",
    "SPLIT_KEYS",
    "SYNAPSE_LABELS",
    "TRANSUNET_TEST_CASES",
    "Volume",
    "convert_acdc_raw",
    "convert_acdc_ssl4mis",
    "convert_synapse_raw",
    "convert_synapse_transunet",
    "generate_demo",
    "compact_dataset",
    "resize_slices",
    "load_split",
    "main",
    "make_demo_volume",
    "write_dataset",
]

logger = logging.getLogger(__name__)

SYNAPSE_LABELS: list[str] = [
    "background", "aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach",
]
ACDC_LABELS: list[str] = ["background", "right_ventricle", "myocardium", "left_ventricle"]

BTCV_TO_SYNAPSE: dict[int, int] = {8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8}
BTCV_MAX_ID = 13
TRANSUNET_TEST_CASES: list[str] = [
    f"case{n}" for n in ("0008", "0022", "0038", "0036", "0032", "0002", "0029", "0003", "0001", "0004", "0025", "0035")
]
HU_MIN, HU_MAX = -125.0, 275.0
SPLIT_KEYS = ("training", "validation", "test")
IMAGES_DIR, LABELS_DIR, DATALIST = "imagesTr", "labelsTr", "datalist.json"

Split = dict[str, list[str]]


class DataPreparationError(ValueError):
    """A fault in the input data; the message names the file and the problem."""


@dataclass
class Volume:
    """One case ready to write: (X, Y, Z) arrays, their affines and (for NIfTI inputs) source headers."""

    image: np.ndarray
    label: np.ndarray
    image_affine: np.ndarray
    label_affine: np.ndarray
    image_header: nib.Nifti1Header | None = None
    label_header: nib.Nifti1Header | None = None


CaseLoader = Callable[[], Volume]


# ---------------------------------------------------------------------------------------- writing


def _write_atomic(final: Path, write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp)`` on a temporary path, renamed to ``final`` once complete."""
    with atomic_output(final) as tmp:
        write(tmp)


def _nifti(data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None, dtype: type) -> nib.Nifti1Image:
    """A NIfTI image of ``data`` as ``dtype``, keeping ``header`` geometry when given (scanner codes otherwise)."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine, header)
    img.set_data_dtype(dtype)
    if header is None:
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
    return img


def _save_nifti(img: nib.Nifti1Image, final: Path) -> None:
    _write_atomic(final, lambda tmp: nib.save(img, str(tmp)))


def _save_json(content: dict, final: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")

    _write_atomic(final, write)


def _entry(case: str) -> dict[str, str]:
    return {"image": f"{IMAGES_DIR}/{case}.nii.gz", "label": f"{LABELS_DIR}/{case}.nii.gz"}


def write_dataset(
    output: str | Path, name: str, labels: Sequence[str], split: Mapping[str, Sequence[str]], loaders: Mapping[str, CaseLoader]
) -> Path:
    """Writes every case named in ``split`` (loaded one at a time) and then the datalist; returns its path."""
    out = Path(output)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (out / LABELS_DIR).mkdir(parents=True, exist_ok=True)
    (out / DATALIST).unlink(missing_ok=True)
    cases = list(dict.fromkeys(c for key in SPLIT_KEYS for c in split.get(key, [])))
    for i, case in enumerate(cases, 1):
        vol = loaders[case]()
        _save_nifti(_nifti(vol.image, vol.image_affine, vol.image_header, np.float32), out / IMAGES_DIR / f"{case}.nii.gz")
        _save_nifti(_nifti(vol.label, vol.label_affine, vol.label_header, np.uint8), out / LABELS_DIR / f"{case}.nii.gz")
        logger.info(f"[{i}/{len(cases)}] {case}: {vol.image.shape}")
    datalist = {
        "name": name,
        "labels": {str(i): n for i, n in enumerate(labels)},
        **{key: [_entry(c) for c in split.get(key, [])] for key in SPLIT_KEYS},
    }
    _save_json(datalist, out / DATALIST)
    logger.info(f"wrote {len(cases)} cases and {out / DATALIST}")
    return out / DATALIST


# ---------------------------------------------------------------------------------------- reading and checks


def _read_nifti(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    """The voxel array (file dtype, scaling applied for floats) and the image; unreadable -> error naming it."""
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise DataPreparationError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    return data, img


def _read_h5(path: Path, keys: Sequence[str] = ("image", "label")) -> list[np.ndarray]:
    """Datasets ``keys`` of an HDF5 file; unreadable or missing keys -> error naming the file."""
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise DataPreparationError(f"{path} has no dataset {missing} (keys: {sorted(f.keys())})")
            return [f[k][()] for k in keys]
    except DataPreparationError:
        raise
    except Exception as e:
        raise DataPreparationError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _read_npz(path: Path, keys: Sequence[str] = ("image", "label")) -> list[np.ndarray]:
    """Arrays ``keys`` of an ``.npz`` file; unreadable or missing keys -> error naming the file."""
    try:
        with np.load(path) as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise DataPreparationError(f"{path} has no array {missing} (keys: {sorted(f.files)})")
            return [f[k] for k in keys]
    except DataPreparationError:
        raise
    except Exception as e:
        raise DataPreparationError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _check_ndim(data: np.ndarray, path: Path, ndim: int) -> np.ndarray:
    """``data`` with trailing singleton axes beyond ``ndim`` dropped; any other shape -> error."""
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != ndim:
        raise DataPreparationError(f"{path}: expected a {ndim}D {'volume' if ndim == 3 else 'slice'}, got shape {data.shape}")
    return data


def _check_shapes(image: np.ndarray, label: np.ndarray, image_path: Path, label_path: Path) -> None:
    if image.shape != label.shape:
        raise DataPreparationError(
            f"label {label_path} has shape {label.shape} but image {image_path} has shape {image.shape}"
        )


def _check_label(label: np.ndarray, path: Path, max_id: int, what: str) -> np.ndarray:
    """``label`` as uint8 after checking its values are integers in 0..``max_id``; offenders are reported."""
    values = np.unique(label)
    bad = values[(values < 0) | (values > max_id) | (values != np.round(values))]
    if bad.size:
        shown = ", ".join(f"{v:g}" for v in bad[:10].tolist()) + (", ..." if bad.size > 10 else "")
        raise DataPreparationError(f"label {path} holds values [{shown}] outside the {what} ids 0..{max_id}")
    return label.astype(np.uint8)


def _require_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataPreparationError(f"input folder {path} does not exist")
    return path


def _slices_to_xyz(volume: np.ndarray) -> np.ndarray:
    """D x H x W (slices first) -> X x Y x Z with x = column, y = row, z = slice."""
    return np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))


def _stack_slices(
    paths: Sequence[tuple[int, Path]], case: str, read: Callable[[Path], list[np.ndarray]], max_id: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """(image, uint8 label) D x H x W from 2D slice files numbered consecutively; any fault -> error naming the slice."""
    paths = sorted(paths)
    numbers = [n for n, _ in paths]
    gaps = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if gaps:
        raise DataPreparationError(f"slices {gaps} of case {case} are missing (next to {paths[0][1]})")
    images, labels = [], []
    for _, path in paths:
        image, label = (_check_ndim(a, path, 2) for a in read(path))
        _check_shapes(image, label, path, path)
        label = _check_label(label, path, max_id, what)
        if images and image.shape != images[0].shape:
            raise DataPreparationError(f"slice {path} has shape {image.shape}, other slices of {case} {images[0].shape}")
        images.append(image)
        labels.append(label)
    return np.stack(images), np.stack(labels)


def _diag_affine(spacing: Sequence[float]) -> np.ndarray:
    return np.diag([*map(float, spacing), 1.0])


# ---------------------------------------------------------------------------------------- splits


def load_split(path: str | Path, available: Iterable[str]) -> Split:
    """A split JSON (``training``/``validation``/``test`` lists of case names); unknown names -> error."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataPreparationError(f"cannot read split file {path}: {e}") from e
    if not isinstance(content, dict) or set(content) - set(SPLIT_KEYS):
        raise DataPreparationError(f"split file {path} must be an object with keys among {list(SPLIT_KEYS)}")
    split = {key: content.get(key, []) for key in SPLIT_KEYS}
    if not all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in split.values()):
        raise DataPreparationError(f"split file {path}: each list must hold case names (strings)")
    unknown = sorted({c for v in split.values() for c in v} - set(available))
    if unknown:
        raise DataPreparationError(f"split file {path} names cases not in the input: {unknown[:10]}")
    return split


def _select(split: Split, cases: Iterable[str] | None, limit: int | None, available: Iterable[str]) -> Split:
    """``split`` restricted to ``cases`` (all when None) and to the first ``limit`` of each list."""
    if cases is not None:
        cases = set(cases)
        unknown = sorted(cases - set(available))
        if unknown:
            raise DataPreparationError(f"requested cases not in the input: {unknown[:10]}")
        split = {k: [c for c in v if c in cases] for k, v in split.items()}
    if limit is not None:
        split = {k: v[:limit] for k, v in split.items()}
    return split


def _resolve_split(
    default: Split, split_file: str | Path | None, cases: Iterable[str] | None, limit: int | None, available: Sequence[str]
) -> Split:
    """The split file's lists (else ``default``), restricted by ``cases`` and ``limit``."""
    split = load_split(split_file, available) if split_file else default
    return _select(split, cases, limit, available)


# ---------------------------------------------------------------------------------------- Synapse (BTCV raw)


def _btcv_folder(root: Path) -> Path:
    """The folder holding ``img/`` and ``label/``: ``root``, ``root/Training`` or ``root/RawData/Training``."""
    for folder in (root / "RawData" / "Training", root / "Training", root):
        if (folder / "img").is_dir():
            return folder
    raise DataPreparationError(f"{root} holds no BTCV cases (empty folder?): expected RawData/Training/img/img00NN.nii.gz")


def _load_btcv_case(image_path: Path, label_path: Path) -> Volume:
    image, image_img = _read_nifti(image_path)
    label, label_img = _read_nifti(label_path)
    image, label = _check_ndim(image, image_path, 3), _check_ndim(label, label_path, 3)
    _check_shapes(image, label, image_path, label_path)
    lut = np.zeros(BTCV_MAX_ID + 1, dtype=np.uint8)
    for btcv, synapse in BTCV_TO_SYNAPSE.items():
        lut[btcv] = synapse
    label = lut[_check_label(label, label_path, BTCV_MAX_ID, "BTCV")]
    return Volume(image.astype(np.float32), label, image_img.affine, label_img.affine, image_img.header, label_img.header)


def convert_synapse_raw(
    input_dir: str | Path,
    output_dir: str | Path,
    split_file: str | Path | None = None,
    cases: Iterable[str] | None = None,
    limit: int | None = None,
) -> Path:
    """BTCV ``RawData/Training/{img,label}`` -> Synapse 8 organs (TransUNet order); returns the datalist path.

    Case ``img00NN`` becomes ``caseNNNN``; BTCV ids 8, 4, 3, 2, 6, 11, 1, 7 -> 1..8, others -> 0. Intensities
    stay in HU and each file keeps its own affine and header geometry. Default split: TransUNet's 12 test
    cases in both ``validation`` and ``test`` (TransUNet has no separate validation set), the others in
    ``training``.
    """
    folder = _btcv_folder(_require_dir(input_dir))
    images = {}
    for path in sorted((folder / "img").glob("img*.nii*")):
        m = re.fullmatch(r"img(\d+)\.nii(\.gz)?", path.name)
        if m:
            images[f"case{int(m[1]):04d}"] = path
    if not images:
        raise DataPreparationError(f"{folder / 'img'} holds no BTCV images img00NN.nii.gz (empty folder?)")
    loaders = {}
    for case, image_path in images.items():
        label_path = folder / "label" / image_path.name.replace("img", "label", 1)
        if not label_path.is_file():
            raise DataPreparationError(f"image {image_path} has no label: expected {label_path}")
        loaders[case] = lambda i=image_path, l=label_path: _load_btcv_case(i, l)
    test = [c for c in sorted(images) if c in TRANSUNET_TEST_CASES]
    default = {"training": [c for c in sorted(images) if c not in test], "validation": test, "test": test}
    split = _resolve_split(default, split_file, cases, limit, list(images))
    return write_dataset(output_dir, "Synapse multi-organ CT (BTCV)", SYNAPSE_LABELS, split, loaders)


# ---------------------------------------------------------------------------------------- Synapse (TransUNet)


def _restore_hu(image: np.ndarray) -> np.ndarray:
    """TransUNet's [0, 1] (clipped [-125, 275] HU) back to HU, so the CT preset returns the same values."""
    return (image.astype(np.float64) * (HU_MAX - HU_MIN) + HU_MIN).astype(np.float32)


def _transunet_volume(image: np.ndarray, label: np.ndarray, path: Path) -> Volume:
    label = _check_label(label, path, len(SYNAPSE_LABELS) - 1, "Synapse")
    affine = _diag_affine((1.0, 1.0, 1.0))
    return Volume(_slices_to_xyz(_restore_hu(image)), _slices_to_xyz(label), affine, affine)


def _load_transunet_h5(path: Path) -> Volume:
    image, label = (_check_ndim(a, path, 3) for a in _read_h5(path))
    _check_shapes(image, label, path, path)
    return _transunet_volume(image, label, path)


def _load_transunet_npz(case: str, slices: list[tuple[int, Path]]) -> Volume:
    image, label = _stack_slices(slices, case, _read_npz, len(SYNAPSE_LABELS) - 1, "Synapse")
    return _transunet_volume(image, label, slices[0][1])


def convert_synapse_transunet(
    input_dir: str | Path,
    output_dir: str | Path,
    split_file: str | Path | None = None,
    cases: Iterable[str] | None = None,
    limit: int | None = None,
) -> Path:
    """TransUNet's ``train_npz/caseNNNN_sliceNNN.npz`` + ``test_vol_h5/caseNNNN.npy.h5`` -> volumes.

    Training slices are stacked back by slice number. Images are stored in HU (``image * 400 - 125``);
    the spacing is not stored in these files, so the affine is the identity (1.0 mm). Default split:
    ``train_npz`` cases for training, ``test_vol_h5`` cases for both validation and test.
    """
    root = _require_dir(input_dir)
    train: dict[str, list[tuple[int, Path]]] = {}
    for path in (root / "train_npz").glob("*.npz"):
        m = re.fullmatch(r"(.+)_slice(\d+)\.npz", path.name)
        if m:
            train.setdefault(m[1], []).append((int(m[2]), path))
    test = {}
    for path in (root / "test_vol_h5").glob("*.h5"):
        m = re.fullmatch(r"(.+?)(\.npy)?\.h5", path.name)
        test[m[1]] = path
    if not train and not test:
        raise DataPreparationError(f"{root} holds no TransUNet cases (empty folder?): expected train_npz/ and test_vol_h5/")
    both = sorted(set(train) & set(test))
    if both:
        raise DataPreparationError(f"cases {both} are both in {root / 'train_npz'} and {root / 'test_vol_h5'}")
    loaders: dict[str, CaseLoader] = {c: (lambda c=c, s=s: _load_transunet_npz(c, s)) for c, s in train.items()}
    loaders.update({c: (lambda p=p: _load_transunet_h5(p)) for c, p in test.items()})
    default = {"training": sorted(train), "validation": sorted(test), "test": sorted(test)}
    split = _resolve_split(default, split_file, cases, limit, list(loaders))
    return write_dataset(output_dir, "Synapse multi-organ CT (TransUNet preprocessed)", SYNAPSE_LABELS, split, loaders)


# ---------------------------------------------------------------------------------------- ACDC (raw NIfTI)


def _load_acdc_nifti(image_path: Path, label_path: Path) -> Volume:
    image, image_img = _read_nifti(image_path)
    label, label_img = _read_nifti(label_path)
    image, label = _check_ndim(image, image_path, 3), _check_ndim(label, label_path, 3)
    _check_shapes(image, label, image_path, label_path)
    label = _check_label(label, label_path, len(ACDC_LABELS) - 1, "ACDC")
    return Volume(image.astype(np.float32), label, image_img.affine, label_img.affine, image_img.header, label_img.header)


def _acdc_default_split(names: Sequence[str]) -> Split:
    """Patients 1-70 training, 71-80 validation, 81-100 test; later patients are left out (logged)."""
    split: Split = {key: [] for key in SPLIT_KEYS}
    for case in sorted(names):
        n = int(case[len("patient"):len("patient") + 3])
        key = "training" if n <= 70 else "validation" if n <= 80 else "test" if n <= 100 else None
        if key is None:
            logger.warning(f"{case} is outside the paper's 100-patient split; pass a split file to use it")
        else:
            split[key].append(case)
    return split


def convert_acdc_raw(
    input_dir: str | Path,
    output_dir: str | Path,
    split_file: str | Path | None = None,
    cases: Iterable[str] | None = None,
    limit: int | None = None,
) -> Path:
    """ACDC ``patientNNN/patientNNN_frameFF.nii.gz`` + ``_gt`` (searched recursively; 4D files ignored).

    Case names are ``patientNNN_frameFF``; labels 0..3 kept; each file keeps its own geometry. Default
    split by patient number: 1-70 training, 71-80 validation, 81-100 test (both frames of each patient).
    """
    root = _require_dir(input_dir)
    images: dict[str, Path] = {}
    for path in sorted(root.rglob("patient*_frame*.nii*")):
        m = re.fullmatch(r"(patient\d{3}_frame\d{2})\.nii(\.gz)?", path.name)
        if not m:
            continue
        if m[1] in images:
            raise DataPreparationError(f"case {m[1]} appears twice: {images[m[1]]} and {path}")
        images[m[1]] = path
    if not images:
        raise DataPreparationError(f"{root} holds no ACDC cases patientNNN/patientNNN_frameFF.nii.gz (empty folder?)")
    loaders = {}
    for case, image_path in images.items():
        label_path = image_path.with_name(f"{case}_gt.nii.gz")
        if not label_path.is_file() and image_path.suffix == ".nii":
            label_path = image_path.with_name(f"{case}_gt.nii")
        if not label_path.is_file():
            raise DataPreparationError(f"image {image_path} has no label: expected {label_path}")
        loaders[case] = lambda i=image_path, l=label_path: _load_acdc_nifti(i, l)
    split = _resolve_split(_acdc_default_split(list(images)), split_file, cases, limit, list(images))
    return write_dataset(output_dir, "ACDC cardiac cine MRI", ACDC_LABELS, split, loaders)


# ---------------------------------------------------------------------------------------- ACDC (SSL4MIS HDF5)


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataPreparationError(f"list file {path} is missing")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _acdc_volume(image: np.ndarray, label: np.ndarray, path: Path) -> Volume:
    label = _check_label(label, path, len(ACDC_LABELS) - 1, "ACDC")
    affine = _diag_affine((1.0, 1.0, 1.0))
    return Volume(_slices_to_xyz(image.astype(np.float32)), _slices_to_xyz(label), affine, affine)


def _load_ssl4mis_slices(case: str, slices: list[tuple[int, Path]]) -> Volume:
    image, label = _stack_slices(slices, case, _read_h5, len(ACDC_LABELS) - 1, "ACDC")
    return _acdc_volume(image, label, slices[0][1])


def _load_ssl4mis_volume(path: Path) -> Volume:
    image, label = (_check_ndim(a, path, 3) for a in _read_h5(path))
    _check_shapes(image, label, path, path)
    return _acdc_volume(image, label, path)


def _ssl4mis_train_slices(root: Path, train: Sequence[str]) -> dict[str, list[tuple[int, Path]]]:
    """Slice files per training case, from ``train_slices.list`` when present, else from the folder."""
    folder = root / "data" / "slices"
    if (root / "train_slices.list").is_file():
        names = [f"{n}.h5" for n in _read_list(root / "train_slices.list")]
    else:
        names = [p.name for p in folder.glob("*_slice_*.h5")]
    slices: dict[str, list[tuple[int, Path]]] = {}
    for name in names:
        m = re.fullmatch(r"(.+)_slice_(\d+)\.h5", name)
        if m:
            slices.setdefault(m[1], []).append((int(m[2]), folder / name))
    for case in train:
        if case not in slices:
            raise DataPreparationError(f"training case {case} has no slices {folder}/{case}_slice_K.h5")
        missing = [p for _, p in slices[case] if not p.is_file()]
        if missing:
            raise DataPreparationError(f"slice file {missing[0]} is missing")
    return slices


def convert_acdc_ssl4mis(
    input_dir: str | Path,
    output_dir: str | Path,
    split_file: str | Path | None = None,
    cases: Iterable[str] | None = None,
    limit: int | None = None,
) -> Path:
    """SSL4MIS ACDC HDF5 (``train.list`` slices in ``data/slices``, ``val.list`` volumes in ``data``) -> volumes.

    Training slices ``patientNNN_frameFF_slice_K.h5`` are stacked back by K. Intensities are kept as stored
    ([0, 1]; the MR preset's min-max scaling leaves them unchanged). No spacing is stored: the affine is the
    identity (1.0). Split: training = ``train.list``, validation = ``val.list``, test = [] (the 20 test
    patients are not in this release).
    """
    root = _require_dir(input_dir)
    if not (root / "train.list").is_file() and not (root / "val.list").is_file():
        raise DataPreparationError(f"{root} holds no SSL4MIS cases (empty folder?): expected train.list, val.list, data/")
    train = _read_list(root / "train.list") if (root / "train.list").is_file() else []
    val = _read_list(root / "val.list") if (root / "val.list").is_file() else []
    if not train and not val:
        raise DataPreparationError(f"{root / 'train.list'} and {root / 'val.list'} list no cases (empty folder?)")
    slices = _ssl4mis_train_slices(root, train)
    loaders: dict[str, CaseLoader] = {c: (lambda c=c: _load_ssl4mis_slices(c, slices[c])) for c in train}
    for case in val:
        path = root / "data" / f"{case}.h5"
        if not path.is_file():
            raise DataPreparationError(f"validation volume {path} (listed in {root / 'val.list'}) is missing")
        loaders[case] = lambda p=path: _load_ssl4mis_volume(p)
    logger.info("SSL4MIS ACDC holds no test patients: the datalist's test list is empty")
    default = {"training": sorted(train), "validation": sorted(val), "test": []}
    split = _resolve_split(default, split_file, cases, limit, list(loaders))
    return write_dataset(output_dir, "ACDC cardiac cine MRI (SSL4MIS HDF5)", ACDC_LABELS, split, loaders)


# ---------------------------------------------------------------------------------------- demo phantoms

# class id: (centre u, v in [-1, 1] of the half-size, semi-axes u, v, z centre and semi-axis as fractions
# of the depth, mean HU). +x is the patient's right, +y anterior (RAS). Painted in this order.
_DEMO_ORGANS: list[tuple[int, tuple[float, float], tuple[float, float], tuple[float, float], float]] = [
    (5, (0.40, 0.10), (0.35, 0.35), (0.55, 0.45), 60.0),  # liver
    (8, (-0.35, 0.25), (0.22, 0.18), (0.60, 0.30), -90.0),  # stomach
    (7, (-0.55, -0.15), (0.15, 0.20), (0.60, 0.30), 85.0),  # spleen
    (3, (-0.35, -0.40), (0.10, 0.14), (0.40, 0.30), 170.0),  # kidney left
    (4, (0.35, -0.40), (0.10, 0.14), (0.40, 0.30), 135.0),  # kidney right
    (6, (-0.10, 0.00), (0.25, 0.06), (0.50, 0.15), 110.0),  # pancreas
    (1, (-0.05, -0.30), (0.06, 0.06), (0.50, 1.00), 240.0),  # aorta (a tube through every slice)
    (2, (0.25, 0.15), (0.07, 0.09), (0.45, 0.20), -50.0),  # gallbladder
]
DEMO_SPACING = (1.5, 1.5, 5.0)


def _ellipsoid(grid: tuple[np.ndarray, ...], centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    """Voxels within the ellipsoid, always including the centre voxel."""
    mask = sum(((g - c) / s) ** 2 for g, c, s in zip(grid, centre, semi)) <= 1.0
    shape = mask.shape
    mask[tuple(int(np.clip(round(c), 0, n - 1)) for c, n in zip(centre, shape))] = True
    return mask


def make_demo_volume(rng: np.random.Generator, size: Sequence[int] = (96, 96, 12)) -> tuple[np.ndarray, np.ndarray]:
    """One CT-like phantom (float32 HU, uint8 labels 1..8 named as :data:`SYNAPSE_LABELS`), shape ``size``."""
    nx, ny, nz = size
    grid = np.ogrid[0:nx, 0:ny, 0:nz]
    half = np.array([(nx - 1) / 2, (ny - 1) / 2])
    body = _ellipsoid(grid[:2], half, half * rng.uniform([0.8, 0.6], [0.9, 0.7]))
    body = np.broadcast_to(body, (nx, ny, nz))
    image = np.where(body, 0.0, -1000.0)
    label = np.zeros((nx, ny, nz), np.uint8)
    means = np.zeros(len(SYNAPSE_LABELS))
    for cls, (cu, cv), (au, av), (zc, zs), hu in _DEMO_ORGANS:
        centre_uv = half * (1 + np.array([cu, cv]) + rng.uniform(-0.05, 0.05, 2))
        semi_uv = np.maximum(half * np.array([au, av]) * rng.uniform(0.85, 1.15, 2), 1.5)
        centre_z = (nz - 1) * np.clip(zc + rng.uniform(-0.1, 0.1), 0, 1)
        semi_z = max(nz * zs * rng.uniform(0.85, 1.15), 1.0) if zs < 1 else 10.0 * nz
        label[_ellipsoid(grid, (*centre_uv, centre_z), (*semi_uv, semi_z)) & body] = cls
        means[cls] = hu + rng.uniform(-5, 5)
    image = np.where(label > 0, means[label], image)
    image += rng.normal(0.0, np.where(body, 12.0, 5.0))
    return image.astype(np.float32), label


def generate_demo(
    output_dir: str | Path,
    num_train: int = 8,
    num_val: int = 2,
    num_test: int = 2,
    size: Sequence[int] = (96, 96, 12),
    seed: int = 0,
) -> Path:
    """A synthetic Synapse-like dataset (``demo_NNN``, 1.5 x 1.5 x 5 mm) deterministic for ``seed``."""
    if min(size) < 1 or len(size) != 3 or min(num_train, num_val, num_test) < 0:
        raise DataPreparationError(f"demo: size must be 3 positive ints and counts >= 0, got {size}")
    names = [f"demo_{i:03d}" for i in range(num_train + num_val + num_test)]
    ends = np.cumsum([num_train, num_val, num_test])
    split = {key: names[end - n : end] for key, n, end in zip(SPLIT_KEYS, (num_train, num_val, num_test), ends)}
    affine = _diag_affine(DEMO_SPACING)

    def loader(i: int) -> Volume:
        image, label = make_demo_volume(np.random.default_rng([seed, i]), size)
        return Volume(image, label, affine, affine)

    loaders = {name: (lambda i=i: loader(i)) for i, name in enumerate(names)}
    return write_dataset(output_dir, "Synthetic abdominal CT phantoms (demo)", SYNAPSE_LABELS, split, loaders)


# ---------------------------------------------------------------------------------------- compact copy


def _quantised(image: np.ndarray, affine: np.ndarray, lo: float, hi: float) -> nib.Nifti1Image:
    """``image`` clipped to [lo, hi] and stored as uint8 with the NIfTI scale (slope, intercept) that maps back."""
    slope = (hi - lo) / 255.0 if hi > lo else 1.0
    q = np.clip(np.round((np.clip(image, lo, hi) - lo) / slope), 0, 255).astype(np.uint8)
    img = _nifti(q, affine, None, np.uint8)
    img.header.set_slope_inter(slope, lo)
    return img


def resize_slices(volume: np.ndarray, size: Sequence[int], mode: str) -> np.ndarray:
    """Each axial slice (last axis) of ``volume`` (X, Y, Z) resized in-plane to ``size`` (X', Y') with
    ``torch.nn.functional.interpolate`` in ``mode``, as the training pipeline's ``Resized`` and the inferer do
    (``align_corners=False`` for the interpolating modes); float32 out."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).permute(2, 0, 1)[:, None]
    kw = {} if mode.startswith("nearest") else {"align_corners": False}
    out = F.interpolate(t, size=tuple(int(n) for n in size), mode=mode, **kw)
    return out[:, 0].permute(1, 2, 0).numpy()


@contextlib.contextmanager
def _gzip_level(level: int) -> Iterator[None]:
    """nibabel's gzip compression level for the files written inside the context."""
    from nibabel.openers import Opener

    before = Opener.default_compresslevel
    Opener.default_compresslevel = level
    try:
        yield
    finally:
        Opener.default_compresslevel = before


def _compact_case(base: Path, out: Path, item: Mapping[str, str], resize: bool, img_size: int | None,
                  datalist_file: Path) -> None:
    """One datalist entry of :func:`compact_dataset`."""
    if any(Path(item[k]).is_absolute() for k in ("image", "label") if k in item):
        raise DataPreparationError(f"{datalist_file}: compact_dataset needs paths relative to it, got {item}")
    img = nib.load(str(base / item["image"]))
    image = np.asarray(img.dataobj, dtype=np.float32)
    lo, hi = float(image.min()), float(image.max())
    label = np.asarray(nib.load(str(base / item["label"])).dataobj) if "label" in item else None
    affine = img.affine.copy()
    if resize and img_size:
        nx, ny = image.shape[:2]
        image = resize_slices(image, (img_size, img_size), "bicubic")
        if label is not None:
            label = np.rint(resize_slices(label, (img_size, img_size), "nearest-exact"))
        affine[:3, 0] *= nx / img_size
        affine[:3, 1] *= ny / img_size
    _save_nifti(_quantised(image, affine, lo, hi), out / item["image"])
    if label is not None:
        _save_nifti(_nifti(label, affine, None, np.uint8), out / item["label"])


def compact_dataset(datalist_file: str | Path, output: str | Path, img_size: int | None = None,
                    resize_keys: Sequence[str] = ("training",)) -> Path:
    """A small copy of a prepared dataset, to carry to another machine (e.g. a GPU one with a size limit).

    Images are stored as uint8 with a NIfTI scale (slope, intercept) spanning each volume's own [min, max]
    (256 levels: a step of 0.4 % of the range; readers apply the scale, so values keep their units). The
    volumes of ``resize_keys`` (the training list) have every axial slice resized in-plane to ``img_size``
    beforehand (image bicubic, clipped to the volume's range; label nearest-exact: what the training pipeline's
    ``Resized`` does, done once), with the affine's in-plane spacing scaled to match; the other lists (the
    validation and test volumes the metrics are computed on) keep their grid. Labels are uint8 as before.
    Writes ``output/imagesTr``, ``output/labelsTr`` and, last, ``output/datalist.json``; returns its path.
    """
    datalist_file = Path(datalist_file)
    if not datalist_file.is_file():
        raise DataPreparationError(f"datalist {datalist_file} not found: prepare the dataset first")
    content = json.loads(datalist_file.read_text())
    base, out = datalist_file.parent, Path(output)
    if out.resolve() == base.resolve():
        raise DataPreparationError(f"compact_dataset would overwrite its input {base}: choose another output")
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    (out / LABELS_DIR).mkdir(parents=True, exist_ok=True)
    (out / DATALIST).unlink(missing_ok=True)
    written = 0
    with _gzip_level(9):  # nibabel writes level 1 by default; this copy is made once and carried
        for key in SPLIT_KEYS:
            for item in content.get(key, []):
                _compact_case(base, out, item, bool(img_size) and key in resize_keys, img_size, datalist_file)
                written += 1
    _save_json(content, out / DATALIST)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    logger.info(f"wrote {written} volumes to {out}: {size / 2**20:.1f} MiB")
    return out / DATALIST


# ---------------------------------------------------------------------------------------- CLI

CONVERTERS: dict[str, Callable[..., Path]] = {
    "synapse-raw": convert_synapse_raw,
    "synapse-transunet": convert_synapse_transunet,
    "acdc-raw": convert_acdc_raw,
    "acdc-ssl4mis": convert_acdc_ssl4mis,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.prepare_data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="format", required=True)
    for name, fn in CONVERTERS.items():
        p = sub.add_parser(name, help=fn.__doc__.split("\n")[0], description=fn.__doc__)
        p.add_argument("--input", required=True, help="folder holding the dataset")
        p.add_argument("--output", required=True, help="output folder (imagesTr/, labelsTr/, datalist.json)")
        p.add_argument("--split", help="JSON with training/validation/test lists of case names (overrides the default)")
        p.add_argument("--cases", nargs="+", help="convert only these cases")
        p.add_argument("--limit", type=int, help="convert only the first N cases of each list")
    p = sub.add_parser("demo", help=generate_demo.__doc__.split("\n")[0], description=generate_demo.__doc__)
    p.add_argument("--output", required=True, help="output folder, e.g. demo_data")
    p.add_argument("--num-train", type=int, default=8)
    p.add_argument("--num-val", type=int, default=2)
    p.add_argument("--num-test", type=int, default=2)
    p.add_argument("--size", type=int, nargs=3, default=[96, 96, 12], metavar=("X", "Y", "Z"))
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("compact", help=compact_dataset.__doc__.split("\n")[0], description=compact_dataset.__doc__)
    p.add_argument("--input", required=True, help="a prepared dataset's datalist.json")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--img-size", type=int, default=None, help="resize the training slices to this (default: keep)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns 0, or 2 with the error message (no traceback) on bad input."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.format == "demo":
            path = generate_demo(args.output, args.num_train, args.num_val, args.num_test, args.size, args.seed)
        elif args.format == "compact":
            path = compact_dataset(args.input, args.output, args.img_size)
        else:
            path = CONVERTERS[args.format](args.input, args.output, args.split, args.cases, args.limit)
    except DataPreparationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
