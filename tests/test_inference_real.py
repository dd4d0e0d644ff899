"""Inference on real scans (../shared/data/ct_sample) through the bundle command a user runs, and the
optional report outputs (scripts/outputs.py).

Every input format the README promises (NIfTI, NRRD, MHA, a DICOM series folder) and a non-RAS
orientation must give a ``<name>_seg.nii.gz`` on the input's own grid, as ITK reads both; one volume is
also recomputed here, step by step, and must match the saved labels voxel for voxel. The weights are
random (fixed seed): geometry and plumbing are tested, not accuracy.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel import orientations as nio

from conftest import REPO, shared_path
from scripts.inferer import LeViTSliceInferer
from scripts.networks import LeViTUNet
from scripts.outputs import PredictionReport, overlay_size, pick_slices, voxel_volume_ml
from scripts.utils import output_path

CONFIGS = REPO / "configs"
IMG = 64  # network input side for the tests (the bundle's default is 224)
LABELS = ["background", "aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach"]
KINDS = ["nifti", "dicom", "nrrd", "mha", "nifti_las"]

pytestmark = pytest.mark.filterwarnings("ignore:builtin type (SwigPy|swigvarlink):DeprecationWarning")  # itk's SWIG


def bundle_inference(root: Path, inputs: list[Path] | Path, out: Path, checkpoint: Path, *extra: str,
                     config: str | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` with configs/inference.json, as the README shows it."""
    inp = str(inputs) if isinstance(inputs, Path) else "[" + ",".join(f"'{p}'" for p in inputs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config or str(CONFIGS / "inference.json"),
           "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
           "--bundle_root", str(root), "--input", inp, "--output_dir", str(out), "--img_size", str(IMG),
           "--checkpoint", str(checkpoint), *extra]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{res.stdout[-4000:]}\nSTDERR:\n{res.stderr[-4000:]}"
    return res


def itk_read(path: Path):
    """The image ITK reads: a file, or the DICOM series in a folder (GDCM series reader)."""
    if path.is_dir():
        names = itk.GDCMSeriesFileNames.New(Directory=str(path))
        files = names.GetFileNames(names.GetSeriesUIDs()[0])
        reader = itk.ImageSeriesReader[itk.Image[itk.SS, 3]].New(FileNames=list(files), ImageIO=itk.GDCMImageIO.New())
        reader.Update()
        return reader.GetOutput()
    return itk.imread(str(path))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(LeViTUNet(img_size=IMG).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The real CT in each format: the NIfTI and DICOM as shared, NRRD / MHA copies written by ITK, and
    an LAS copy of the NIfTI (first axis and affine flipped: the same scan on another voxel order)."""
    ct = shared_path("data", "ct_sample", "example_ct_sm.nii.gz")
    dicom = shared_path("data", "ct_sample", "example_ct_dicom")
    folder = tmp_path_factory.mktemp("inputs")
    image = itk.imread(str(ct))
    itk.imwrite(image, str(folder / "ct_copy.nrrd"))
    itk.imwrite(image, str(folder / "ct_copy.mha"))
    nii = nib.load(ct)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = nii.shape[0] - 1
    las = nib.Nifti1Image(np.asanyarray(nii.dataobj)[::-1].copy(), nii.affine @ flip)
    assert nib.aff2axcodes(las.affine) == ("L", "A", "S")
    nib.save(las, folder / "ct_las.nii.gz")
    return {"nifti": ct, "dicom": dicom, "nrrd": folder / "ct_copy.nrrd", "mha": folder / "ct_copy.mha",
            "nifti_las": folder / "ct_las.nii.gz"}


@pytest.fixture(scope="module")
def predictions(inputs, checkpoint, tmp_path_factory) -> Path:
    """One bundle run over all five inputs. fp32, so that the direct computation below can match it exactly
    (``auto`` picks bf16 on CPUs with native bf16)."""
    out = tmp_path_factory.mktemp("predictions")
    root = tmp_path_factory.mktemp("root")
    bundle_inference(root, list(inputs.values()), out, checkpoint, "--infer_precision", "fp32")
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_prediction_is_on_the_input_grid(kind, inputs, predictions):
    src = inputs[kind]
    out = Path(output_path(str(src), str(predictions)))
    assert out.is_file(), f"{out} missing; written: {sorted(p.name for p in predictions.iterdir())}"
    image, seg = itk_read(src), itk.imread(str(out))
    assert tuple(itk.size(seg)) == tuple(itk.size(image))
    np.testing.assert_allclose(seg.GetSpacing(), image.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(seg.GetOrigin(), image.GetOrigin(), atol=1e-3)  # mm; NIfTI stores float32
    np.testing.assert_allclose(itk.array_from_matrix(seg.GetDirection()), itk.array_from_matrix(image.GetDirection()),
                               atol=1e-5)
    assert nib.load(out).get_data_dtype() == np.uint8
    labels = itk.array_view_from_image(seg)
    assert labels.dtype == np.uint8 and labels.max() <= len(LABELS) - 1


def load_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The voxels (x, y, z order) and RAS affine of a scan: nibabel for NIfTI, ITK otherwise."""
    if path.name.endswith(".nii.gz"):
        nii = nib.load(path)
        return np.asanyarray(nii.dataobj).astype(np.float32), nii.affine
    image = itk_read(path)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ itk.array_from_matrix(image.GetDirection()) @ np.diag(image.GetSpacing())
    affine[:3, 3] = lps_to_ras @ np.asarray(image.GetOrigin())
    return itk.array_from_image(image).transpose(2, 1, 0).astype(np.float32), affine


def direct_prediction(path: Path, checkpoint: Path) -> np.ndarray:
    """The bundle's pipeline by hand: to RAS, clip [-125, 275] -> [0, 1], slice inference, back to the input's axes."""
    volume, affine = load_volume(path)
    to_ras = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))
    x = torch.from_numpy(np.ascontiguousarray(nio.apply_orientation(volume, to_ras)))[None, None]
    x = ((x - (-125)) / (275 - (-125)) * (1.0 - 0.0) + 0.0).clamp(0.0, 1.0)  # ScaleIntensityRange's arithmetic
    model = LeViTUNet(img_size=IMG)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    with torch.no_grad():
        pred = LeViTSliceInferer(img_size=IMG, precision="fp32")(x, model.eval())
    assert pred.shape == x.shape
    back = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.io_orientation(affine))
    return nio.apply_orientation(pred[0, 0].numpy(), back).astype(np.uint8)


@pytest.mark.parametrize("kind", KINDS)
def test_saved_labels_equal_the_direct_computation(kind, inputs, predictions, checkpoint):
    src = inputs[kind]
    expected = direct_prediction(src, checkpoint)
    saved = np.asanyarray(nib.load(output_path(str(src), str(predictions))).dataobj)
    assert saved.shape == expected.shape
    assert len(np.unique(expected)) > 1  # random weights still give several classes: a real comparison
    mismatch = int((saved != expected).sum())
    assert mismatch == 0, f"{mismatch} of {saved.size} voxels differ from the direct computation"


def test_las_and_ras_copies_give_the_same_labels_in_space(inputs, predictions):
    ras = np.asanyarray(nib.load(output_path(str(inputs["nifti"]), str(predictions))).dataobj)
    las = np.asanyarray(nib.load(output_path(str(inputs["nifti_las"]), str(predictions))).dataobj)
    np.testing.assert_array_equal(las[::-1], ras)


# ---- the optional report outputs (scripts/outputs.py) ----

def _meta_tensor(array: np.ndarray, affine: np.ndarray, source: str):
    from monai.data import MetaTensor

    return MetaTensor(torch.as_tensor(array)[None], affine=torch.as_tensor(affine), meta={"filename_or_obj": source})


def test_prediction_report_volumes_and_overlay(tmp_path):
    from ignite.engine import Engine, Events
    from PIL import Image

    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    label = np.zeros((40, 32, 12), np.uint8)
    label[5:20, 4:12, 2:9] = 5  # liver
    label[25:30, 20:28, 6:10] = 7  # spleen
    label[22, 3, 11] = 1
    image = rng.random(label.shape).astype(np.float32)
    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    las[0, 3] = label.shape[0] - 1
    cases = [  # one RAS case and one LAS case (pred on the input's axes, image in RAS, as after Invertd)
        {"pred": _meta_tensor(label.astype(np.float32), affine, "/data/case_a.nii.gz"),
         "image": _meta_tensor(image, affine, "/data/case_a.nii.gz")},
        {"pred": _meta_tensor(label[::-1].astype(np.float32), affine @ las, "/data/dicom_b"),
         "image": _meta_tensor(image, affine, "/data/dicom_b")},
    ]
    engine = Engine(lambda e, batch: batch)
    report = PredictionReport(str(tmp_path / "report"), LABELS, num_slices=3)
    report.attach(engine)
    seen = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(
        (tmp_path / "report" / "volumes_ml.csv").read_text()))
    engine.run([[c] for c in cases], max_epochs=1)

    rows = list(csv.DictReader((tmp_path / "report" / "volumes_ml.csv").open()))
    assert [r["case"] for r in rows] == ["case_a", "dicom_b"]
    assert list(rows[0]) == ["case"] + LABELS[1:]
    ml = voxel_volume_ml(affine)
    assert ml == pytest.approx(0.8 * 0.8 * 2.5 / 1000)
    for row in rows:
        for k, name in enumerate(LABELS[1:], start=1):
            assert float(row[name]) == pytest.approx((label == k).sum() * ml, abs=1e-4), (row["case"], name)
    assert "case_a" in seen[0] and "dicom_b" not in seen[0]  # written after each case
    assert not [p for p in (tmp_path / "report").iterdir() if p.name.startswith(".")]  # no temporary files left

    for case in ("case_a", "dicom_b"):
        png = Image.open(tmp_path / "report" / f"{case}_overlay.png")
        assert png.format == "PNG" and png.size == overlay_size(3, len(LABELS))
    a = np.asarray(Image.open(tmp_path / "report" / "case_a_overlay.png"))
    b = np.asarray(Image.open(tmp_path / "report" / "dicom_b_overlay.png"))
    np.testing.assert_array_equal(a, b)  # the LAS case is shown in RAS like the other
    assert a[:, : 3 * 256].reshape(-1, 3).std(axis=0).min() > 0  # grey image and colours, not blank

    # a second run (e.g. after new inputs) keeps earlier rows; a case seen again replaces its row
    report2 = PredictionReport(str(tmp_path / "report"), LABELS, overlay=False)
    report2.report_case(cases[0])
    assert [r["case"] for r in csv.DictReader((tmp_path / "report" / "volumes_ml.csv").open())] == ["dicom_b", "case_a"]
    with pytest.raises(ValueError, match="columns"):
        PredictionReport(str(tmp_path / "report"), LABELS[:3], overlay=False).report_case(cases[0])


def test_pick_slices_spreads_over_the_foreground():
    label = np.zeros((4, 4, 30), np.uint8)
    label[0, 0, 10:20] = 1  # foreground on slices 10..19, the most on 15
    label[:, :, 15] = 3
    assert pick_slices(label, 3) == [10, 15, 17]  # the fullest slice of each third of 10..19
    assert pick_slices(np.zeros((4, 4, 9)), 3) == [2, 4, 6]  # no foreground: evenly spaced


def test_report_handler_in_the_bundle_run(inputs, checkpoint, tmp_path):
    """The report switched on with --write_report true, on the LAS scan: volumes agree with the saved labels."""
    out = tmp_path / "out"
    bundle_inference(tmp_path / "root", inputs["nifti_las"], out, checkpoint, "--write_report", "true")
    seg = nib.load(out / "ct_las_seg.nii.gz")
    labels = np.asanyarray(seg.dataobj)
    (row,) = list(csv.DictReader((out / "volumes_ml.csv").open()))
    assert row["case"] == "ct_las"
    for k, name in enumerate(LABELS[1:], start=1):
        assert float(row[name]) == pytest.approx((labels == k).sum() * voxel_volume_ml(seg.affine), abs=1e-4)
    from PIL import Image

    assert Image.open(out / "ct_las_overlay.png").size == overlay_size(3, len(LABELS))
