"""scripts/inference_diagnostics.py: largest component and rotation TTA, measured beside the protocol (issue 5)."""

from __future__ import annotations

import json

import numpy as np
import torch

from conftest import IMG
from scripts import inference_diagnostics as diag
from scripts.inferer import LeViTSliceInferer
from scripts.networks import LeViTUNet


def test_keep_largest_component_per_class():
    pred = np.zeros((6, 6, 3), np.int64)
    pred[0:2, 0:2, 0] = 1  # class 1: 4 voxels
    pred[4:6, 4:6, 0:2] = 1  # class 1: 8 voxels, the largest
    pred[3, 3, 2] = 1  # class 1: 1 voxel, touching the 8 only by a corner: part of them (full connectivity)
    pred[0, 5, :] = 2  # class 2: one component
    out = diag.keep_largest_component(pred, num_classes=4)
    expected = pred.copy()
    expected[0:2, 0:2, 0] = 0
    np.testing.assert_array_equal(out, expected)
    assert not diag.keep_largest_component(np.zeros((3, 3, 3), np.int64), 3).any()


def test_rotate_quarter_turn_moves_pixels_onto_pixels():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(diag.rotate(x, 90.0), torch.rot90(x, 1, dims=(2, 3)), atol=1e-4, rtol=0)
    back = diag.rotate(diag.rotate(x, 30.0), -30.0)
    torch.testing.assert_close(back[..., 1:3, 1:3], x[..., 1:3, 1:3], atol=2.0, rtol=0)


def test_tta_without_rotations_is_the_bundles_inferer():
    torch.manual_seed(0)
    net = LeViTUNet(2, 1, 4, variant="128s", img_size=IMG).eval()
    volume = torch.rand(1, 1, 50, 70, 3)
    inferer = LeViTSliceInferer(IMG, 2, precision="auto")
    expected = inferer(volume, net)
    torch.testing.assert_close(inferer(volume, diag.RotationTTA(net, [0.0]).eval()), expected, rtol=0, atol=0)
    assert inferer(volume, diag.RotationTTA(net, [0.0, -10.0, 10.0]).eval()).shape == expected.shape


def test_cli_reports_every_variant_on_both_sets(trained, demo_dir, tmp_path):
    out = tmp_path / "diag.json"
    assert diag.main(["--checkpoint", str(trained / "models" / "model.pt"),
                      "--datalist", str(demo_dir / "datalist.json"), "--img-size", str(IMG),
                      "--train-every", "1", "--limit", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["results"]) == {"validation", "training"} and r["angles"] == [0.0, -10.0, 10.0]
    for res in r["results"].values():
        assert res["volumes"] == 1 and set(diag.VARIANTS) <= set(res)
        plain = res["plain"]
        assert 0.0 <= plain["mean_dice_pct"] <= 100.0 and len(plain["per_class"]) == 8
        assert np.isclose(plain["mean_dice_pct"], np.mean([c["dice_pct"] for c in plain["per_class"].values()]))
    assert "| validation (1) | tta+lcc |" in (tmp_path / "diag.md").read_text()
