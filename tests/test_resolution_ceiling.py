"""scripts/resolution_ceiling.py: the protocol's best possible Dice at a network size."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO
from scripts.metrics import case_metrics
from scripts.resolution_ceiling import resolution_ceiling, round_trip


def disc_label(shape=(96, 80, 4), line: bool = True) -> np.ndarray:
    """A disc (class 1) inside a ring (class 2) and a one-voxel line (class 3, else a square) on each slice."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    r = np.hypot(x - 48, y - 40)
    lab = np.zeros(shape[:2], np.int64)
    lab[r < 20] = 2
    lab[r < 14] = 1
    if line:
        lab[10, 5:70] = 3
    else:
        lab[70:90, 5:25] = 3
    return np.repeat(lab[:, :, None], shape[2], axis=2)


def test_round_trip_is_exact_at_the_slice_size_and_loses_thin_structures_below():
    lab = disc_label()
    same = round_trip(lab, 96)
    assert same.shape == lab.shape
    # 96 x 80 slices resized to 96 x 96 and back: the X axis is untouched, Y is stretched and shrunk exactly
    assert np.array_equal(same, lab)
    half = round_trip(lab, 40)
    assert half.shape == lab.shape and set(np.unique(half)) <= {0, 1, 2, 3}
    m = case_metrics(half, lab, 4)
    assert 0.9 < m[1]["dice"] < 1.0  # the disc keeps most of its area
    assert m[3]["dice"] < 0.7  # the one-voxel line at every other row cannot survive a 2.4x shrink


def test_ceiling_rises_with_the_network_size():
    # (a one-voxel line is not monotonic: nearest-neighbour keeps or drops it by where the samples fall)
    labels = [("a", disc_label(line=False)), ("b", np.roll(disc_label(line=False), 7, axis=1))]
    res = resolution_ceiling(labels, 4, [32, 64, 96])
    means = [res[s]["mean_dice"] for s in (32, 64, 96)]
    assert means[0] < means[1] < means[2] == pytest.approx(1.0)
    assert res[64]["num_cases"] == 2 and set(res[64]["per_class"]) == {1, 2, 3}
    assert all(res[64]["min_case"][c] <= res[64]["per_class"][c] for c in (1, 2, 3))


def test_cli_reads_a_datalist(tmp_path):
    lab = disc_label()
    for name in ("c1", "c2"):
        nib.save(nib.Nifti1Image(lab.astype(np.uint8), np.eye(4)), str(tmp_path / f"{name}_gt.nii.gz"))
        nib.save(nib.Nifti1Image(lab.astype(np.float32), np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    items = [{"image": f"{n}.nii.gz", "label": f"{n}_gt.nii.gz"} for n in ("c1", "c2")]
    (tmp_path / "datalist.json").write_text(json.dumps({"validation": items}))
    out = tmp_path / "ceiling.json"
    cmd = [sys.executable, "-m", "scripts.resolution_ceiling", "--datalist", str(tmp_path / "datalist.json"),
           "--num-classes", "4", "--img-size", "48", "96", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| 96 | 1.0000 | 1.0000 | 1.0000 | 1.0000 |" in proc.stdout
    ceiling = json.loads(out.read_text())["ceiling"]
    assert ceiling["48"]["mean_dice"] < 1.0 and ceiling["48"]["num_cases"] == 2
