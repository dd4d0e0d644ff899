"""What the MONAI model zoo's CI checks, driven through MONAI's own functions."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow, verify_metadata

from conftest import REPO, shared_path
from scripts.networks import LeViTUNet

META = REPO / "configs" / "metadata.json"


def test_metadata_is_linked_at_the_root():
    assert (REPO / "metadata.json").is_symlink()
    assert (REPO / "metadata.json").resolve() == META.resolve()


def test_metadata_matches_the_schema(tmp_path):
    schema = tmp_path / "schema.json"
    shutil.copy(shared_path("reference", "monai", "meta_schema_20240725.json"), schema)  # no download
    meta = json.loads(META.read_text())
    assert meta["schema"].endswith("meta_schema_20240725.json")
    verify_metadata(meta_file=str(META), filepath=str(schema))
    assert meta["version"] in meta["changelog"]


def _imported_top_level_modules() -> set[str]:
    mods: set[str] = set()
    for path in (REPO / "scripts").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return mods


def test_every_runtime_import_is_a_declared_requirement():
    dist_names = {"ignite": "pytorch-ignite", "yaml": "pyyaml", "PIL": "pillow"}
    third_party = {
        m for m in _imported_top_level_modules()
        if m not in sys.stdlib_module_names and m not in ("scripts", "torch", "monai", "numpy", "__future__")
    }
    meta = json.loads(META.read_text())
    declared = set(meta["required_packages_version"])
    requirements = {
        line.split("=")[0].split(">")[0].strip().lower()
        for line in (REPO / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")
    }
    for module in third_party:
        name = dist_names.get(module, module)
        assert name in declared, f"{name} (imported by scripts/) missing from required_packages_version"
        assert name in requirements, f"{name} (imported by scripts/) missing from requirements.txt"


@pytest.mark.parametrize("config,workflow_type", [("train.json", "train"), ("inference.json", "infer")])
def test_bundle_properties(config, workflow_type, demo_dir, tmp_path):
    checkpoint = tmp_path / "model.pt"  # inference refuses to start without weights
    torch.save(LeViTUNet().state_dict(), checkpoint)
    wf = ConfigWorkflow(config_file=str(REPO / "configs" / config), meta_file=str(META), workflow_type=workflow_type,
                        bundle_root=str(REPO), dataset_dir=str(demo_dir), input=str(demo_dir / "imagesTr" / "*.nii.gz"),
                        num_workers=0, cache_rate=0.0, checkpoint=str(checkpoint))
    wf.initialize()
    assert wf.check_properties() == []


def test_large_files_list_is_what_monai_reads(tmp_path):
    """MONAI's reader of the zoo's large_files.yml (``monai.bundle.download_large_files``) accepts the root's list;
    every entry (none until weights are published) has exactly path, url, hash_type sha256 and hash_val."""
    from monai.bundle import ConfigParser, download_large_files

    parser = ConfigParser()
    parser.read_config(str(REPO / "large_files.yml"))
    entries = parser.get()["large_files"]
    assert isinstance(entries, list)
    for entry in entries:
        assert sorted(entry) == ["hash_type", "hash_val", "path", "url"] and entry["hash_type"] == "sha256"
    if not entries:  # nothing to download: MONAI reads the list and does nothing (no network here)
        shutil.copy(REPO / "large_files.yml", tmp_path / "large_files.yml")
        download_large_files(bundle_path=str(tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["large_files.yml"]


def test_license_and_no_committed_weights():
    assert (REPO / "LICENSE").read_text().startswith(" " * 33 + "Apache License")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert not [f for f in tracked if f.endswith((".pt", ".pth", ".ts", ".onnx", ".safetensors", ".ckpt"))]
    assert (REPO / "large_files.yml").exists()


def test_ckpt_export_and_net_in_out_from_another_folder(tmp_path):
    """As the zoo runs them: outside the bundle, with --bundle_root, without the workflow's initialize."""
    torch.manual_seed(0)
    model = LeViTUNet(img_size=64).eval()
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    ts = tmp_path / "model.ts"
    env = dict(os.environ, PYTHONPATH="")  # the bundle must be found through --bundle_root alone
    common = ["--meta_file", str(META), "--config_file", str(REPO / "configs" / "inference.json"),
              "--bundle_root", str(REPO)]
    res = subprocess.run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
                          "--ckpt_file", str(ckpt), *common, "--img_size", "64"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "is deprecated" not in res.stderr  # the TorchScript notice is filtered, nothing else is
    exported = torch.jit.load(str(ts))
    assert isinstance(exported, torch.jit.ScriptModule)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)
    res = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", *common],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "data shape of network is verified with no error" in res.stdout + res.stderr
