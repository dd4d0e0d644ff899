"""MONAI Label 0.8.5 serves the bundle the way its ``monaibundle`` app does.

MONAI Label 0.8.5 forces numpy < 2, so it lives in its own virtual environment, ``.venv-monailabel``
(``bash setup_monailabel.sh`` creates it; ``.ci/run`` does). These tests run ``tests/monailabel_check.py``
with that environment's python on a temporary copy of the bundle (configs/, scripts/, models/model.pt with
small random-but-fixed weights; no trained weights exist) and check that

* ``BundleInferTask`` segments a real CT volume (and an LPS-oriented crop of it) into the very label map,
  voxel for voxel and on the input's grid, that the bundle's own ``python -m monai.bundle run ... inference.json``
  writes with the same weights, and reports the bundle's label names;
* one ``BundleTrainTask`` epoch on a tiny local datastore rewrites ``models/model.pt`` (a bare state_dict);
* ``BundleInferTask`` serves the ACDC bundle that ``python -m scripts.make_bundle acdc`` writes: it reports the
  labels right_ventricle / myocardium / left_ventricle and segments a real ACDC validation volume (converted from
  the SSL4MIS HDF5 files to NIfTI) on the input's grid, voxel for voxel as the ACDC bundle's own inference.

Without the environment they skip with the reason, unless ``REQUIRE_MONAILABEL=1`` (set by ``.ci/run``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, shared_path
from scripts.make_bundle import make_bundle as build_bundle
from scripts.networks import LeViTUNet
from scripts.prepare_data import convert_acdc_ssl4mis

VENV = REPO / os.environ.get("MONAILABEL_VENV", ".venv-monailabel")
CHECK = REPO / "tests" / "monailabel_check.py"
BUNDLE_NAME = "levit_unet_synapse"
ACDC_CASE = "patient045_frame01"  # the smallest ACDC validation volume of the SSL4MIS files (8 slices)
TRAIN_IMG = 64  # network side for the training epoch (the bundle's default, 224, is kept for inference)


def venv_python() -> Path:
    py = VENV / "bin" / "python"
    if not py.exists():
        reason = (f"{py} is absent: MONAI Label 0.8.5 (numpy < 2) runs in its own environment; "
                  "create it with `bash setup_monailabel.sh`")
        if os.environ.get("REQUIRE_MONAILABEL") == "1":
            pytest.fail(f"REQUIRE_MONAILABEL=1, but {reason}")
        pytest.skip(reason)
    return py


def make_bundle(root: Path, img_size: int) -> Path:
    """A copy of the bundle (configs/, scripts/) with random weights, seeded, as models/model.pt."""
    bundle = root / BUNDLE_NAME
    shutil.copytree(REPO / "configs", bundle / "configs")
    shutil.copytree(REPO / "scripts", bundle / "scripts", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    torch.save(LeViTUNet(img_size=img_size).state_dict(), bundle / "models" / "model.pt")
    return bundle


def bundle_inference(bundle: Path, inputs: str, out: Path) -> None:
    """The bundle's own inference (main environment): ``python -m monai.bundle run`` with its inference.json."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--meta_file", str(bundle / "configs" / "metadata.json"),
           "--config_file", str(bundle / "configs" / "inference.json"),
           "--logging_file", str(bundle / "configs" / "logging.conf"), "--bundle_root", str(bundle),
           "--input", inputs, "--output_dir", str(out)]
    res = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{res.stdout[-3000:]}\nSTDERR:\n{res.stderr[-3000:]}"


def run_check(py: Path, out: Path, *args: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = out / "report.json"
    cmd = [str(py), str(CHECK), "--result", str(result), "--out-dir", str(out), *args]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=900, env=env)
    (out / "check.log").write_text(res.stdout + res.stderr)
    assert res.returncode == 0 and result.exists(), (
        f"{' '.join(cmd)} failed ({res.returncode})\nSTDOUT:\n{res.stdout[-3000:]}\nSTDERR:\n{res.stderr[-6000:]}")
    report = json.loads(result.read_text())
    assert report["versions"]["monailabel"] == "0.8.5", report["versions"]
    return report


def bundle_labels() -> dict[str, int]:
    """The bundle's label names: metadata.json's channel_def of "pred" (the same list as inference.json's)."""
    meta = json.loads((REPO / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    names = [channel_def[str(i)] for i in range(len(channel_def))]
    assert names == json.loads((REPO / "configs" / "inference.json").read_text())["label_names"]
    assert names[0] == "background" and names[-1] == "stomach" and len(names) == 9
    return {n: i for i, n in enumerate(names)}


def lps_crop(src: Path, dst: Path, z: slice = slice(10, 20)) -> None:
    """The same anatomy as ``src`` (RAS) stored in LPS voxel order, a few slices only (MONAI Label's
    inverse of the bundle's Orientationd then has work to do)."""
    img = nib.load(src)
    data = np.asarray(img.dataobj)[::-1, ::-1, z]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [img.shape[0] - 1, img.shape[1] - 1, z.start]
    nib.save(nib.Nifti1Image(data.copy(), img.affine @ flip), dst)


def test_monailabel_infer_equals_the_bundles_own_inference(tmp_path):
    py = venv_python()
    ct = shared_path("data", "ct_sample", "example_ct_sm.nii.gz")
    inputs = tmp_path / "images"
    inputs.mkdir()
    shutil.copy(ct, inputs / "example_ct_sm.nii.gz")
    lps_crop(ct, inputs / "example_ct_sm_lps.nii.gz")
    images = sorted(inputs.glob("*.nii.gz"))
    bundle = make_bundle(tmp_path, img_size=224)

    # the bundle's own inference (main environment), same weights
    own = tmp_path / "bundle_out"
    bundle_inference(bundle, str(inputs / "*.nii.gz"), own)

    # MONAI Label's BundleInferTask (its own environment), same bundle folder
    report = run_check(py, tmp_path / "monailabel", "--infer-bundle", str(bundle), "--images", *map(str, images))
    infer = report["infer"]
    expected = {n: i for n, i in bundle_labels().items() if n != "background"}  # MONAI Label leaves out background
    assert infer["labels"] == expected, infer["labels"]
    assert infer["type"].lower().endswith("segmentation")

    for image in images:
        out = infer["outputs"][str(image)]
        assert out["label_names"] == expected
        ref = nib.load(image)
        mine = nib.load(own / image.name.replace(".nii.gz", "_seg.nii.gz"))
        theirs = nib.load(out["label_file"])
        a, b = np.asarray(mine.dataobj), np.asarray(theirs.dataobj)
        assert a.shape == b.shape == ref.shape, (image.name, a.shape, b.shape, ref.shape)
        np.testing.assert_allclose(theirs.affine, ref.affine, atol=1e-4)
        np.testing.assert_allclose(mine.affine, ref.affine, atol=1e-4)
        assert np.array_equal(b, np.round(b)) and b.min() >= 0 and b.max() <= 8
        differ = int((a.astype(np.int64) != b.astype(np.int64)).sum())
        assert differ == 0, f"{image.name}: {differ} of {a.size} voxels differ between MONAI Label and the bundle"
        assert len(np.unique(a)) > 2, f"{image.name}: a near-constant label map would make the comparison vacuous"


def test_monailabel_train_epoch_updates_the_model(tmp_path, demo_dir):
    py = venv_python()
    bundle = make_bundle(tmp_path, img_size=TRAIN_IMG)
    # a MONAI Label local datastore: images, and their final labels in labels/final
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    cases = sorted((demo_dir / "imagesTr").glob("*.nii.gz"))[:5]
    for case in cases:
        shutil.copy(case, studies / case.name)
        shutil.copy(demo_dir / "labelsTr" / case.name, studies / "labels" / "final" / case.name)
    model = bundle / "models" / "model.pt"
    before = model.read_bytes()
    overrides = {"img_size": TRAIN_IMG, "epochs": 1, "batch_size": 8, "samples_per_volume": 8, "val_interval": 1,
                 "num_workers": 0}
    report = run_check(py, tmp_path / "monailabel", "--train-bundle", str(bundle), "--studies", str(studies),
                       "--train-overrides", json.dumps(overrides), "--max-epochs", "1")
    train = report["train"]
    assert train["labelled_images"] == len(cases)
    assert train["before"] is not None and train["after"] is not None
    assert train["after"]["mtime_ns"] > train["before"]["mtime_ns"]
    assert train["after"]["sha256"] != train["before"]["sha256"]
    assert model.read_bytes() != before
    sd = torch.load(model, weights_only=True)  # still a bare state_dict the bundle (and MONAI Label) load
    LeViTUNet(img_size=TRAIN_IMG).load_state_dict(sd)
    assert "model_final.pt" in train["models"]


def test_monailabel_segments_an_acdc_volume_with_the_acdc_bundle(tmp_path):
    """The ACDC bundle as ``make_bundle`` writes it, served by MONAI Label's ``BundleInferTask``, on a real ACDC
    validation volume converted to NIfTI.

    The weights are a randomly initialised (seeded) 4-class network saved as ``models/model.pt``: this checks the
    mechanics (the bundle loads, the label names MONAI Label reports, the output's geometry, and that MONAI Label
    computes the bundle's own label map), not accuracy. No trained ACDC weights are published.
    """
    py = venv_python()
    data = convert_acdc_ssl4mis(shared_path("data", "acdc_ssl4mis"), tmp_path / "acdc", cases=[ACDC_CASE]).parent
    image = data / "imagesTr" / f"{ACDC_CASE}.nii.gz"
    bundle = build_bundle("acdc", tmp_path / "levit_unet_acdc")
    torch.manual_seed(0)
    img_size = json.loads((bundle / "configs" / "inference.json").read_text())["img_size"]
    torch.save(LeViTUNet(out_channels=4, img_size=img_size).state_dict(), bundle / "models" / "model.pt")

    own = tmp_path / "bundle_out"
    bundle_inference(bundle, str(image), own)
    report = run_check(py, tmp_path / "monailabel", "--infer-bundle", str(bundle), "--images", str(image))
    infer = report["infer"]
    expected = {"right_ventricle": 1, "myocardium": 2, "left_ventricle": 3}  # RV / myocardium / LV, no background
    assert infer["labels"] == expected, infer["labels"]
    assert infer["type"].lower().endswith("segmentation")
    out = infer["outputs"][str(image)]
    assert out["label_names"] == expected

    ref, theirs = nib.load(image), nib.load(out["label_file"])
    mine = nib.load(own / f"{ACDC_CASE}_seg.nii.gz")
    b, a = np.asarray(theirs.dataobj), np.asarray(mine.dataobj)
    assert b.shape == a.shape == ref.shape, (b.shape, a.shape, ref.shape)
    np.testing.assert_allclose(theirs.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(theirs.header.get_zooms()[:3], ref.header.get_zooms()[:3], atol=1e-5)
    assert np.array_equal(b, np.round(b)) and set(np.unique(b).tolist()) <= {0, 1, 2, 3}
    differ = int((a.astype(np.int64) != b.astype(np.int64)).sum())
    assert differ == 0, f"{differ} of {a.size} voxels differ between MONAI Label and the ACDC bundle's own inference"
    assert len(np.unique(a)) > 1, "a constant label map would make the comparison vacuous"
