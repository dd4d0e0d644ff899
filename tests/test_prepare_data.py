"""Dataset converters: tiny fixtures of every format, the real SSL4MIS ACDC files, errors, the demo phantoms."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, shared_path
from scripts import prepare_data as pd
from scripts.prepare_data import DataPreparationError

SHAPE = (16, 12, 4)  # X, Y, Z of the NIfTI fixtures
BTCV_CASES = (1, 5, 6)  # case0001 is a TransUNet test case


# ---------------------------------------------------------------------------------------- helpers


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.8, 3.0, 1.0]) if affine is None else affine), str(path))


def save_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["image"], f["label"] = image, label


def load(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img


def datalist(out: Path) -> dict:
    return json.loads((out / "datalist.json").read_text())


def cases_of(entries: list[dict]) -> list[str]:
    return [Path(e["image"]).name[: -len(".nii.gz")] for e in entries]


def assert_nothing_partial(out: Path) -> None:
    """No datalist and no temporary file after a failed conversion."""
    assert not (out / "datalist.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def btcv_label(rng: np.random.Generator) -> np.ndarray:
    label = rng.integers(0, 14, SHAPE).astype(np.uint8)
    label.flat[:14] = np.arange(14)  # every BTCV id present
    return label


@pytest.fixture
def btcv(tmp_path: Path) -> Path:
    """RawData/Training/{img,label} with three cases of 16 x 12 x 4."""
    rng = np.random.default_rng(0)
    root = tmp_path / "btcv"
    affine = np.array([[-0.7, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 3.0, -30], [0, 0, 0, 1]])
    for n in BTCV_CASES:
        save_nifti(root / f"RawData/Training/img/img{n:04d}.nii.gz", rng.integers(-1000, 1000, SHAPE).astype(np.int16), affine)
        save_nifti(root / f"RawData/Training/label/label{n:04d}.nii.gz", btcv_label(rng), affine)
    return root


@pytest.fixture
def transunet(tmp_path: Path) -> tuple[Path, dict]:
    """train_npz (case0005, 4 slices of H 12 x W 16) and test_vol_h5 (case0001, 4 x 12 x 16)."""
    rng = np.random.default_rng(1)
    root = tmp_path / "transunet"
    (root / "train_npz").mkdir(parents=True)
    vols = {
        c: (rng.random((4, 12, 16)).astype(np.float32), rng.integers(0, 9, (4, 12, 16)).astype(np.float32))
        for c in ("case0005", "case0001")
    }
    for k in (2, 0, 3, 1):
        np.savez(root / f"train_npz/case0005_slice{k:03d}.npz", image=vols["case0005"][0][k], label=vols["case0005"][1][k])
    save_h5(root / "test_vol_h5/case0001.npy.h5", *vols["case0001"])
    return root, vols


@pytest.fixture
def acdc_raw(tmp_path: Path) -> Path:
    """patient001 / 075 / 090, frames 01 and 12 each, plus the 4D file and Info.cfg."""
    rng = np.random.default_rng(2)
    root = tmp_path / "acdc"
    for p in (1, 75, 90):
        folder = root / f"patient{p:03d}"
        for f in (1, 12):
            save_nifti(folder / f"patient{p:03d}_frame{f:02d}.nii.gz", rng.random(SHAPE).astype(np.float32) * 500)
            save_nifti(folder / f"patient{p:03d}_frame{f:02d}_gt.nii.gz", rng.integers(0, 4, SHAPE).astype(np.uint8))
        save_nifti(folder / f"patient{p:03d}_4d.nii.gz", np.zeros((*SHAPE, 3), np.int16))
        (folder / "Info.cfg").write_text("ED: 1\nES: 12\n")
    return root


@pytest.fixture
def ssl4mis(tmp_path: Path) -> tuple[Path, dict]:
    """train.list with one case of 11 slices (slice_1..slice_11, 6 x 5) and val.list with one 3 x 6 x 5 volume."""
    rng = np.random.default_rng(3)
    root = tmp_path / "ssl4mis"
    vols = {
        c: (rng.random((n, 6, 5)).astype(np.float32), rng.integers(0, 4, (n, 6, 5)).astype(np.uint8))
        for c, n in (("patient010_frame01", 11), ("patient071_frame02", 3))
    }
    image, label = vols["patient010_frame01"]
    for k in range(11):
        save_h5(root / f"data/slices/patient010_frame01_slice_{k + 1}.h5", image[k], label[k])
    save_h5(root / "data/patient071_frame02.h5", *vols["patient071_frame02"])
    (root / "train.list").write_text("patient010_frame01\n")
    (root / "train_slices.list").write_text("".join(f"patient010_frame01_slice_{k + 1}\n" for k in range(11)))
    (root / "val.list").write_text("patient071_frame02\n")
    return root, vols


# ---------------------------------------------------------------------------------------- converters


def test_synapse_raw(btcv: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert pd.convert_synapse_raw(btcv, out) == out / "datalist.json"
    dl = datalist(out)
    assert dl["name"] and dl["labels"] == {str(i): n for i, n in enumerate(pd.SYNAPSE_LABELS)}
    assert dl["labels"]["1"] == "aorta" and dl["labels"]["8"] == "stomach"
    assert cases_of(dl["training"]) == ["case0005", "case0006"]
    assert cases_of(dl["validation"]) == cases_of(dl["test"]) == ["case0001"]
    assert dl["training"][0] == {"image": "imagesTr/case0005.nii.gz", "label": "labelsTr/case0005.nii.gz"}
    lut = np.array([0, 7, 4, 3, 2, 0, 5, 8, 1, 0, 0, 6, 0, 0])  # BTCV id -> Synapse id
    for n in BTCV_CASES:
        src_img = nib.load(str(btcv / f"RawData/Training/img/img{n:04d}.nii.gz"))
        src_lab = np.asarray(nib.load(str(btcv / f"RawData/Training/label/label{n:04d}.nii.gz")).dataobj)
        image, img = load(out / f"imagesTr/case{n:04d}.nii.gz")
        label, lab = load(out / f"labelsTr/case{n:04d}.nii.gz")
        assert image.dtype == np.float32 and label.dtype == np.uint8
        np.testing.assert_array_equal(image, src_img.get_fdata())
        np.testing.assert_array_equal(label, lut[src_lab])
        np.testing.assert_allclose(img.affine, src_img.affine)
        np.testing.assert_allclose(lab.affine, src_img.affine)
        assert set(np.unique(label)) == set(range(9))
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"case{n:04d}.nii.gz" for n in BTCV_CASES]


def test_btcv_mapping_constants() -> None:
    assert [pd.BTCV_TO_SYNAPSE[b] for b in (8, 4, 3, 2, 6, 11, 1, 7)] == list(range(1, 9))
    assert len(pd.TRANSUNET_TEST_CASES) == 12 and "case0035" in pd.TRANSUNET_TEST_CASES
    assert pd.ACDC_LABELS == ["background", "right_ventricle", "myocardium", "left_ventricle"]


def test_split_file_and_selection(btcv: Path, tmp_path: Path) -> None:
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"training": ["case0001"], "test": ["case0006"]}))
    out = tmp_path / "out"
    pd.convert_synapse_raw(btcv, out, split_file=split)
    dl = datalist(out)
    assert (cases_of(dl["training"]), dl["validation"], cases_of(dl["test"])) == (["case0001"], [], ["case0006"])
    assert not (out / "imagesTr/case0005.nii.gz").exists()
    pd.convert_synapse_raw(btcv, tmp_path / "one", cases=["case0006"])
    assert cases_of(datalist(tmp_path / "one")["training"]) == ["case0006"]
    split.write_text(json.dumps({"training": ["case0099"]}))
    with pytest.raises(DataPreparationError, match=r"split\.json.*case0099"):
        pd.convert_synapse_raw(btcv, tmp_path / "bad", split_file=split)


def test_synapse_transunet(transunet: tuple[Path, dict], tmp_path: Path) -> None:
    root, vols = transunet
    out = tmp_path / "out"
    pd.convert_synapse_transunet(root, out)
    dl = datalist(out)
    assert cases_of(dl["training"]) == ["case0005"]
    assert cases_of(dl["validation"]) == cases_of(dl["test"]) == ["case0001"]
    for case, (src_image, src_label) in vols.items():
        image, img = load(out / f"imagesTr/{case}.nii.gz")
        label, _ = load(out / f"labelsTr/{case}.nii.gz")
        assert image.shape == label.shape == (16, 12, 4) and image.dtype == np.float32 and label.dtype == np.uint8
        np.testing.assert_allclose(img.affine, np.eye(4))
        for k in range(4):  # slice k of the output is input slice k, x = column, y = row
            np.testing.assert_allclose(image[..., k], (src_image[k] * 400 - 125).T, atol=1e-4)
            np.testing.assert_array_equal(label[..., k], src_label[k].T)
        windowed = np.clip((image + 125) / 400, 0, 1)  # the CT preset gives back the published values
        np.testing.assert_allclose(windowed, np.transpose(src_image, (2, 1, 0)), atol=1e-6)


def test_acdc_raw(acdc_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pd.convert_acdc_raw(acdc_raw, out)
    dl = datalist(out)
    assert dl["labels"] == {"0": "background", "1": "right_ventricle", "2": "myocardium", "3": "left_ventricle"}
    assert cases_of(dl["training"]) == ["patient001_frame01", "patient001_frame12"]
    assert cases_of(dl["validation"]) == ["patient075_frame01", "patient075_frame12"]
    assert cases_of(dl["test"]) == ["patient090_frame01", "patient090_frame12"]
    assert not list((out / "imagesTr").glob("*4d*"))
    src = nib.load(str(acdc_raw / "patient075/patient075_frame12.nii.gz"))
    image, img = load(out / "imagesTr/patient075_frame12.nii.gz")
    label, _ = load(out / "labelsTr/patient075_frame12.nii.gz")
    np.testing.assert_allclose(image, src.get_fdata(), rtol=1e-6)
    np.testing.assert_allclose(img.affine, src.affine)
    np.testing.assert_array_equal(label, np.asarray(nib.load(str(acdc_raw / "patient075/patient075_frame12_gt.nii.gz")).dataobj))
    assert label.dtype == np.uint8 and image.dtype == np.float32


def test_acdc_ssl4mis_fixture(ssl4mis: tuple[Path, dict], tmp_path: Path) -> None:
    root, vols = ssl4mis
    out = tmp_path / "out"
    pd.convert_acdc_ssl4mis(root, out)
    dl = datalist(out)
    assert (cases_of(dl["training"]), cases_of(dl["validation"]), dl["test"]) == (["patient010_frame01"], ["patient071_frame02"], [])
    for case, (src_image, src_label) in vols.items():
        image, img = load(out / f"imagesTr/{case}.nii.gz")
        label, _ = load(out / f"labelsTr/{case}.nii.gz")
        assert image.shape == (5, 6, len(src_image))
        np.testing.assert_allclose(img.affine, np.eye(4))
        for k in range(len(src_image)):  # slice_1..slice_11 sorted numerically
            np.testing.assert_array_equal(image[..., k], src_image[k].T)
            np.testing.assert_array_equal(label[..., k], src_label[k].T)


def test_acdc_ssl4mis_real(tmp_path: Path) -> None:
    root = shared_path("data", "acdc_ssl4mis")
    from monai.transforms import ScaleIntensity

    cases = ["patient003_frame01", "patient002_frame02"]  # one stacked training case, one validation volume
    out = tmp_path / "out"
    pd.convert_acdc_ssl4mis(root, out, cases=cases)
    dl = datalist(out)
    assert (cases_of(dl["training"]), cases_of(dl["validation"]), dl["test"]) == ([cases[0]], [cases[1]], [])
    image, _ = load(out / f"imagesTr/{cases[0]}.nii.gz")
    label, _ = load(out / f"labelsTr/{cases[0]}.nii.gz")
    slices = sorted((root / "data/slices").glob(f"{cases[0]}_slice_*.h5"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    assert image.shape[2] == len(slices) == 10
    for k, path in enumerate(slices):
        with h5py.File(path) as f:
            np.testing.assert_array_equal(image[..., k], f["image"][()].T)
            np.testing.assert_array_equal(label[..., k], f["label"][()].T)
    with h5py.File(root / f"data/{cases[1]}.h5") as f:
        val_image = f["image"][()]
    image_val, _ = load(out / f"imagesTr/{cases[1]}.nii.gz")
    np.testing.assert_array_equal(image_val, np.transpose(val_image, (2, 1, 0)))
    for case in cases:
        image, _ = load(out / f"imagesTr/{case}.nii.gz")
        label, _ = load(out / f"labelsTr/{case}.nii.gz")
        assert set(np.unique(label)) <= {0, 1, 2, 3}
        assert image.min() == 0.0 and image.max() == 1.0  # so the MR preset's min-max scaling is a no-op
        np.testing.assert_allclose(np.asarray(ScaleIntensity(minv=0.0, maxv=1.0)(image)), image, atol=1e-6)


# ---------------------------------------------------------------------------------------- errors


CONVERTERS = [pd.convert_synapse_raw, pd.convert_synapse_transunet, pd.convert_acdc_raw, pd.convert_acdc_ssl4mis]


@pytest.mark.parametrize("convert", CONVERTERS)
def test_missing_and_empty_input(convert, tmp_path: Path) -> None:
    with pytest.raises(DataPreparationError, match=r"nowhere.*does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPreparationError, match=r"empty.*empty folder"):
        convert(tmp_path / "empty", tmp_path / "out")
    assert_nothing_partial(tmp_path / "out")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


IMG5, LAB5 = "RawData/Training/img/img0005.nii.gz", "RawData/Training/label/label0005.nii.gz"
BAD_IDS = np.full(SHAPE, 14, np.uint8) + np.arange(4, dtype=np.uint8) * 6  # 14, 20, 26, 32
BTCV_FAULTS = {
    "no label": (lambda r: (r / LAB5).unlink(), r"img0005\.nii\.gz has no label"),
    "shape": (lambda r: save_nifti(r / LAB5, np.zeros((16, 12, 5), np.uint8)), r"label0005\.nii\.gz has shape"),
    "values": (lambda r: save_nifti(r / LAB5, BAD_IDS), r"label0005\.nii\.gz holds values \[14, 20, 26, 32\] outside the BTCV ids 0\.\.13"),
    "corrupt": (lambda r: _truncate(r / IMG5), r"cannot read .*img0005\.nii\.gz"),
    "not 3D": (lambda r: save_nifti(r / IMG5, np.zeros((16, 12), np.int16)), r"img0005\.nii\.gz: expected a 3D volume"),
}


@pytest.mark.parametrize("fault", BTCV_FAULTS)
def test_btcv_errors(fault: str, btcv: Path, tmp_path: Path) -> None:
    make, message = BTCV_FAULTS[fault]
    make(btcv)
    out = tmp_path / "out"
    with pytest.raises(DataPreparationError, match=message):
        pd.convert_synapse_raw(btcv, out)
    assert_nothing_partial(out)
    assert not (out / "imagesTr/case0005.nii.gz").exists()
    assert not (out / "labelsTr/case0005.nii.gz").exists()


def test_acdc_raw_errors(acdc_raw: Path, tmp_path: Path) -> None:
    save_nifti(acdc_raw / "patient075/patient075_frame01_gt.nii.gz", np.full(SHAPE, 4, np.uint8))
    with pytest.raises(DataPreparationError, match=r"patient075_frame01_gt\.nii\.gz holds values \[4\] outside the ACDC ids 0\.\.3"):
        pd.convert_acdc_raw(acdc_raw, tmp_path / "out")
    assert_nothing_partial(tmp_path / "out")
    (acdc_raw / "patient090/patient090_frame12_gt.nii.gz").unlink()
    with pytest.raises(DataPreparationError, match=r"patient090_frame12\.nii\.gz has no label"):
        pd.convert_acdc_raw(acdc_raw, tmp_path / "out")


def test_h5_and_npz_errors(ssl4mis: tuple[Path, dict], transunet: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = ssl4mis
    _truncate(root / "data/patient071_frame02.h5")
    with pytest.raises(DataPreparationError, match=r"cannot read .*patient071_frame02\.h5"):
        pd.convert_acdc_ssl4mis(root, tmp_path / "a")
    assert_nothing_partial(tmp_path / "a")
    save_h5(root / "data/patient071_frame02.h5", np.zeros((6, 5), np.float32), np.zeros((6, 5), np.uint8))
    with pytest.raises(DataPreparationError, match=r"patient071_frame02\.h5: expected a 3D volume"):
        pd.convert_acdc_ssl4mis(root, tmp_path / "a")
    save_h5(root / "data/slices/patient010_frame01_slice_3.h5", np.zeros((6, 5), np.float32), np.full((6, 5), 7, np.uint8))
    with pytest.raises(DataPreparationError, match=r"patient010_frame01_slice_3\.h5 holds values \[7\]"):
        pd.convert_acdc_ssl4mis(root, tmp_path / "a")
    (root / "data/slices/patient010_frame01_slice_4.h5").unlink()
    with pytest.raises(DataPreparationError, match=r"patient010_frame01_slice_4\.h5 is missing"):
        pd.convert_acdc_ssl4mis(root, tmp_path / "a")
    assert_nothing_partial(tmp_path / "a")

    troot, _ = transunet
    _truncate(troot / "train_npz/case0005_slice002.npz")
    with pytest.raises(DataPreparationError, match=r"cannot read .*case0005_slice002\.npz"):
        pd.convert_synapse_transunet(troot, tmp_path / "b")
    (troot / "train_npz/case0005_slice002.npz").unlink()
    with pytest.raises(DataPreparationError, match=r"slices \[2\] of case case0005 are missing"):
        pd.convert_synapse_transunet(troot, tmp_path / "b")
    save_h5(troot / "test_vol_h5/case0001.npy.h5", np.zeros((4, 12, 16), np.float32), np.zeros((4, 12, 15), np.float32))
    with pytest.raises(DataPreparationError, match=r"case0001\.npy\.h5 has shape"):
        pd.convert_synapse_transunet(troot, tmp_path / "b", cases=["case0001"])
    assert_nothing_partial(tmp_path / "b")


def test_failure_removes_stale_datalist_and_temp_files(btcv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    pd.convert_synapse_raw(btcv, out)
    real_save = nib.save

    def crash(img, filename):  # writes part of the file, then fails
        real_save(img, filename)
        _truncate(Path(filename))
        raise OSError("disk full")

    monkeypatch.setattr(pd.nib, "save", crash)
    (out / "imagesTr/case0005.nii.gz").unlink()
    with pytest.raises(OSError, match="disk full"):
        pd.convert_synapse_raw(btcv, out)
    assert_nothing_partial(out)  # the previous run's datalist is gone too: its files are being replaced
    assert not (out / "imagesTr/case0005.nii.gz").exists()


def test_cli(btcv: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "scripts.prepare_data", "synapse-raw", "--input", str(tmp_path / "nowhere"), "--output", "x"]
    bad = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert bad.returncode == 2 and "nowhere" in bad.stderr and "Traceback" not in bad.stderr
    assert pd.main(["synapse-raw", "--input", str(btcv), "--output", str(tmp_path / "out"), "--limit", "1"]) == 0
    dl = datalist(tmp_path / "out")
    assert (len(dl["training"]), len(dl["validation"]), len(dl["test"])) == (1, 1, 1)


# ---------------------------------------------------------------------------------------- demo


def test_demo(tmp_path: Path) -> None:
    args = ["demo", "--num-train", "3", "--num-val", "1", "--num-test", "1", "--size", "40", "36", "6", "--seed", "7"]
    assert pd.main([*args, "--output", str(tmp_path / "a")]) == 0
    assert pd.main([*args, "--output", str(tmp_path / "b")]) == 0
    dl = datalist(tmp_path / "a")
    assert dl == datalist(tmp_path / "b") and dl["labels"] == {str(i): n for i, n in enumerate(pd.SYNAPSE_LABELS)}
    assert [len(dl[k]) for k in ("training", "validation", "test")] == [3, 1, 1]
    for entry in dl["training"] + dl["validation"] + dl["test"]:
        image, img = load(tmp_path / "a" / entry["image"])
        label, _ = load(tmp_path / "a" / entry["label"])
        np.testing.assert_array_equal(image, load(tmp_path / "b" / entry["image"])[0])
        assert image.shape == label.shape == (40, 36, 6) and image.dtype == np.float32 and label.dtype == np.uint8
        np.testing.assert_allclose(img.header.get_zooms(), (1.5, 1.5, 5.0))
        if entry in dl["training"]:
            assert set(np.unique(label)) == set(range(9))
    assert pd.generate_demo(tmp_path / "c", 1, 0, 0, size=(40, 36, 6), seed=8)
    assert not np.array_equal(load(tmp_path / "c/imagesTr/demo_000.nii.gz")[0], load(tmp_path / "a/imagesTr/demo_000.nii.gz")[0])


def test_demo_default_phantom_intensities() -> None:
    image, label = pd.make_demo_volume(np.random.default_rng(0))
    assert image.shape == label.shape == (96, 96, 12)
    assert set(np.unique(label)) == set(range(9))
    assert abs(np.median(image[:3, :3]) + 1000) < 20  # air in the corners
    means = [float(image[label == c].mean()) for c in range(1, 9)]
    assert all(-125 < m < 275 for m in means) and min(np.diff(sorted(means))) > 10  # distinct, within the CT window


# ---------------------------------------------------------------------------------------- compact copy


def test_compact_copy_resizes_training_and_keeps_evaluation_grids(tmp_path: Path) -> None:
    full = tmp_path / "full"
    pd.generate_demo(full, num_train=2, num_val=1, num_test=1, size=(40, 32, 5), seed=1)
    out = tmp_path / "small"
    path = pd.compact_dataset(full / "datalist.json", out, img_size=24)
    assert json.loads(path.read_text()) == datalist(full)  # same cases, same relative paths
    dl = datalist(full)
    for key in ("training", "validation", "test"):
        for item in dl[key]:
            src_img, dst_img = nib.load(str(full / item["image"])), nib.load(str(out / item["image"]))
            src, dst = np.asarray(src_img.dataobj, np.float32), np.asarray(dst_img.dataobj, np.float32)
            src_lab = np.asarray(nib.load(str(full / item["label"])).dataobj)
            dst_lab = nib.load(str(out / item["label"]))
            assert dst_img.get_data_dtype() == np.uint8 and dst_lab.get_data_dtype() == np.uint8
            step = (src.max() - src.min()) / 255
            if key == "training":  # slices pre-resized in-plane, depth and physical extent kept
                assert dst.shape == (24, 24, 5) == dst_lab.shape
                np.testing.assert_allclose(np.abs(np.diag(dst_img.affine)[:3]) * [24, 24, 5],
                                           np.abs(np.diag(src_img.affine)[:3]) * [40, 32, 5])
                assert set(np.unique(np.asarray(dst_lab.dataobj))) <= set(np.unique(src_lab))
                assert src.min() - 1e-3 <= dst.min() and dst.max() <= src.max() + 1e-3  # clipped to the range
            else:  # the volumes metrics are computed on keep their grid; only 8-bit quantisation
                assert dst.shape == src.shape and np.array_equal(np.asarray(dst_lab.dataobj), src_lab)
                np.testing.assert_allclose(dst_img.affine, src_img.affine)
                assert np.abs(dst - src).max() <= step / 2 + 1e-3 * step
    size = lambda d: sum(f.stat().st_size for f in d.rglob("*.nii.gz"))  # noqa: E731
    assert size(out) < size(full) / 2
    with pytest.raises(DataPreparationError, match="overwrite its input"):
        pd.compact_dataset(full / "datalist.json", full, img_size=24)
    assert pd.main(["compact", "--input", str(tmp_path / "missing.json"), "--output", str(out)]) == 2


def test_compact_acdc_for_a_gpu_machine(tmp_path: Path) -> None:
    """reproduce_acdc --compact --prepare-only on two real cases: a datalist the bundle trains from, much smaller."""
    root = shared_path("data", "acdc_ssl4mis")
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "scripts.reproduce_acdc", "--profile", "gpu", "--data", str(root), "--workdir",
           str(work), "--limit", "2", "--compact", "--prepare-only"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "--prepare-only: stopping here" in proc.stdout and not (work / "bundle").exists()
    dl = datalist(work / "data")
    assert dl == datalist(work / "full") and len(dl["training"]) == 2 and len(dl["validation"]) == 2
    train = nib.load(str(work / "data" / dl["training"][0]["image"]))
    val_full = nib.load(str(work / "full" / dl["validation"][0]["image"]))
    val = nib.load(str(work / "data" / dl["validation"][0]["image"]))
    assert train.shape[:2] == (224, 224) and val.shape == val_full.shape  # the gpu profile's img_size
    assert train.get_data_dtype() == np.uint8
    assert np.abs(np.asarray(val.dataobj) - np.asarray(val_full.dataobj)).max() <= 0.5 / 255 + 1e-6
