"""scripts/precision_check.py: the fast inference form's predictions against plain fp32's (issue 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import IMG
from scripts import precision_check


def test_dice_between_label_maps():
    a = np.array([0, 1, 1, 2, 2, 2])
    b = np.array([0, 1, 2, 2, 2, 0])
    counts = precision_check.dice_counts(a, b, 4)
    assert counts[1].tolist() == [1, 2, 1] and counts[2].tolist() == [2, 3, 3]
    dice = precision_check.dice_from_counts(counts)
    assert dice[1] == 2 / 3 and dice[2] == 2 / 3 and dice[3] == 1.0  # class 3 absent from both: agreement


def test_fast_form_agrees_with_plain_fp32_on_trained_weights(trained, demo_dir, tmp_path):
    out = tmp_path / "precision.json"
    assert precision_check.main(["--checkpoint", str(trained / "models" / "model.pt"), "--datalist",
                                 str(demo_dir / "datalist.json"), "--img-size", str(IMG), "--threads", "2",
                                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["volumes"] == 2 and len(r["per_volume"]) == 2
    organs = r["classes"][1:]
    present = [n for n in organs if r["dice_vs_label_pooled"]["fp32_plain"][n] > 0.5]
    assert present, r["dice_vs_label_pooled"]
    for name in present:  # where the model finds the organ, the fast form finds the same voxels
        assert r["dice_bundle_vs_fp32_pooled"][name] > 0.95, (name, r["dice_bundle_vs_fp32_pooled"])
    assert (tmp_path / "precision.md").read_text().startswith("# Fast inference form vs plain fp32: 2 volumes")
    assert r["environment"]["device"] == "cpu" and r["environment"]["gpu"] is None
    assert "2 CPU threads" in (tmp_path / "precision.md").read_text()


def test_fp32_reference_turns_tf32_off_and_restores_it():
    import torch

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with pytest.raises(KeyError):
            with precision_check.full_fp32():
                assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
                raise KeyError("left early")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
