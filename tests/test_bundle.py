"""The bundle's workflows end to end on the synthetic demo data: train, evaluate, infer."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import CONFIGS, IMG, QUICK, REPO, bundle_cmd, run
from scripts.networks import LeViTUNet


def test_training_writes_a_bare_state_dict_that_learned_the_phantoms(trained):
    sd = torch.load(trained / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())  # bare state_dict, no wrapper keys
    LeViTUNet(img_size=IMG).load_state_dict(sd)  # strict
    assert (trained / "models" / "model_final.pt").exists()
    dice = [float(x) for x in re.findall(r"Metrics -- .*val_mean_dice: ([0-9.]+)", (trained / "train.log").read_text())]
    assert len(dice) == 2 and dice[-1] > 0.5, dice  # 80 steps on CPU; an untrained net scores ~0.02
    assert list((trained / "eval").glob("events.out.tfevents*")), "TensorBoard log missing"


def test_evaluate_reports_paper_style_metrics(trained, demo_dir):
    out = trained / "eval_report"
    run(bundle_cmd("evaluating", "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']",
                   "--bundle_root", str(trained), "--dataset_dir", str(demo_dir), "--output_dir", str(out),
                   "--img_size", str(IMG), "--num_workers", "0"))
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["mean_dice"] > 0.5
    rows = (out / "metrics_per_case.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and "aorta_dice" in rows[0] and "aorta_hd95" in rows[0] and "aorta_hd95_mm" in rows[0]
    assert sorted(r.split(",")[0] for r in rows[1:]) == ["demo_008", "demo_009"]  # cases named by their files


def test_inference_keeps_the_input_geometry_and_never_overwrites(trained, demo_dir, tmp_path):
    # an oblique, LPS-oriented copy of a demo volume: the prediction must come back on its exact grid
    src = nib.load(demo_dir / "imagesTr" / "demo_010.nii.gz")
    rot = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.5, 1.5, 5.0])
    theta = np.deg2rad(10)
    tilt = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = tilt @ rot, [12.5, -30.0, 7.0]
    inp = tmp_path / "in"
    inp.mkdir()
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[::-1].copy(), affine), inp / "oblique.nii.gz")
    shutil.copy(demo_dir / "imagesTr" / "demo_011.nii.gz", inp / "plain.nii.gz")
    out = tmp_path / "out"
    cmd = bundle_cmd("--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(trained),
                     "--input", str(inp / "*.nii.gz"), "--output_dir", str(out), "--img_size", str(IMG))
    run(cmd)
    for name in ("oblique", "plain"):
        img, seg = nib.load(inp / f"{name}.nii.gz"), nib.load(out / f"{name}_seg.nii.gz")
        assert seg.shape == img.shape
        np.testing.assert_allclose(seg.affine, img.affine, atol=1e-5)
        assert seg.get_data_dtype() == np.uint8
    # the plain case is a demo test volume: the prediction must overlap its label
    pred = np.asarray(nib.load(out / "plain_seg.nii.gz").dataobj)
    label = np.asarray(nib.load(demo_dir / "labelsTr" / "demo_011.nii.gz").dataobj)
    fg = (pred > 0) & (label > 0)
    assert 2 * fg.sum() / ((pred > 0).sum() + (label > 0).sum()) > 0.7
    # a second run skips existing outputs; overwrite=true redoes them
    mtime = (out / "plain_seg.nii.gz").stat().st_mtime_ns
    res = run(cmd)
    assert (out / "plain_seg.nii.gz").stat().st_mtime_ns == mtime
    assert "exists: skipping" in res.stdout + res.stderr
    run(cmd + ["--overwrite", "true"])
    assert (out / "plain_seg.nii.gz").stat().st_mtime_ns != mtime


def test_missing_weights_are_reported_not_replaced_by_random_ones(demo_dir, tmp_path):
    cmd = bundle_cmd("--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(tmp_path),
                     "--input", str(demo_dir / "imagesTr" / "demo_010.nii.gz"), "--output_dir", str(tmp_path / "out"))
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "trained weights (models/model.pt) not found" in res.stderr and "train them first" in res.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_resume_continues_from_the_last_epoch(demo_dir, tmp_path):
    base = bundle_cmd("training", "--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(tmp_path),
                      "--dataset_dir", str(demo_dir), *QUICK)
    run(base + ["--epochs", "1"])
    assert (tmp_path / "models" / "resume_checkpoint_epoch=1.pt").exists()
    res = run(base + ["--epochs", "2", "--resume", "true"])
    log = res.stdout + res.stderr
    assert "resuming from" in log and "resume_checkpoint_epoch=1.pt" in log
    assert "Epoch: 2/2" in log and "Epoch: 1/2" not in log  # the finished epoch is not repeated
    assert (tmp_path / "models" / "resume_checkpoint_epoch=2.pt").exists()
    assert not (tmp_path / "models" / "resume_checkpoint_epoch=1.pt").exists()  # one resume file kept


@pytest.mark.slow
def test_multi_gpu_config_under_torchrun_on_cpu(demo_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
           "run", "training", "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
           "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']",
           "--bundle_root", str(tmp_path), "--dataset_dir", str(demo_dir), "--epochs", "1", *QUICK]
    res = run(cmd)
    log = res.stdout + res.stderr
    dist_dice = re.findall(r"Metrics -- .*val_mean_dice: ([0-9.]+)", log)
    assert len(dist_dice) == 1, log[-3000:]  # logged once, by rank 0
    saved = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert saved == ["model.pt", "model_final.pt", "resume_checkpoint_epoch=1.pt"], saved
    # every rank builds the handler objects (an empty events file each), only rank 0's hold scalars
    written = [p for p in (tmp_path / "eval").glob("events.out.tfevents*") if p.stat().st_size > 200]
    assert written and len({p.name.split(".")[-2] for p in written}) == 1, [(p.name, p.stat().st_size) for p in written]
    sd = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in sd)  # the DDP wrapper's prefix is not saved
    LeViTUNet(img_size=IMG).load_state_dict(sd)
    # the 2 processes' gathered validation = one process evaluating the same weights (model.pt: epoch 1's)
    res = run(bundle_cmd("evaluating", "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']",
                         "--bundle_root", str(tmp_path), "--dataset_dir", str(demo_dir), "--img_size", str(IMG),
                         "--num_workers", "0", "--output_dir", str(tmp_path / "eval_single")))
    single_dice = re.findall(r"Metrics -- .*val_mean_dice: ([0-9.]+)", res.stdout + res.stderr)
    assert single_dice == dist_dice
