"""scripts/release_weights.py: published weights are checked, then listed in the model zoo's large_files format."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, copy_repo
from scripts import model_card
from scripts.make_bundle import make_bundle, render_large_files, set_values
from scripts.networks import LeViTUNet
from scripts.release_weights import ReleaseError, main, release

URL = "https://example.org/levit_unet/v0.1.0/model.pt"
ACDC_IMG = json.loads((REPO / "configs" / "acdc.json").read_text())["img_size"]  # the ACDC bundle's input side


@pytest.fixture
def fake_repo(tmp_path) -> Path:
    """A copy of what the tool reads and writes (configs, docs, scripts, large_files.yml)."""
    repo = copy_repo(tmp_path / "repo")
    (repo / "models").mkdir()
    return repo


def save(model: torch.nn.Module | dict, path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(model if isinstance(model, dict) else model.state_dict(), path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listed(repo: Path) -> list[dict]:
    return yaml.safe_load((repo / "large_files.yml").read_text())["large_files"]


def test_root_bundle_entry_in_the_zoo_format(fake_repo):
    weights = save(LeViTUNet(), fake_repo / "models" / "model.pt")  # the root bundle's network: 128s, 224 px, 9 classes
    target, entries = release("synapse", [weights], [URL], repo=fake_repo)
    assert target == fake_repo / "large_files.yml"
    expected = {"path": "models/model.pt", "url": URL, "hash_type": "sha256", "hash_val": sha256(weights)}
    assert entries == [expected] and listed(fake_repo) == [expected]
    text = (fake_repo / "large_files.yml").read_text()
    assert text == render_large_files([expected]) and "No trained weights" not in text
    # a second release of the same path replaces the entry; another path is added after it
    other = save(LeViTUNet(), fake_repo / "model_v2.pt")
    _, entries = release("synapse", [other], [URL + "?v=2"], paths=["models/model.pt"], repo=fake_repo)
    assert entries == [{**expected, "url": URL + "?v=2", "hash_val": sha256(other)}]
    final = save(LeViTUNet(), fake_repo / "models" / "model_final.pt")
    _, entries = release("synapse", [final], [URL.replace("model.pt", "model_final.pt")], repo=fake_repo)
    assert [e["path"] for e in entries] == ["models/model.pt", "models/model_final.pt"]
    _, entries = release("synapse", [], [], remove=["models/model.pt", "models/model_final.pt"], repo=fake_repo)
    assert entries == [] and (fake_repo / "large_files.yml").read_text() == (REPO / "large_files.yml").read_text()


def test_monai_download_large_files_reads_the_written_file(fake_repo, tmp_path):
    """What ``python -m monai.bundle download_large_files`` does with the list (the URL pointed at a local copy,
    there being no network here): it downloads the file to its path in the bundle and checks the sha256."""
    weights = save(LeViTUNet(), fake_repo / "models" / "model.pt")
    release("synapse", [weights], [URL], repo=fake_repo)
    served = tmp_path / "served" / "model.pt"
    served.parent.mkdir()
    shutil.copy(weights, served)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    text = (fake_repo / "large_files.yml").read_text()
    assert text.count(json.dumps(URL)) == 1
    (bundle / "large_files.yml").write_text(text.replace(json.dumps(URL), json.dumps(served.as_uri())))
    cmd = [sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(bundle)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (bundle / "models" / "model.pt").read_bytes() == weights.read_bytes()
    LeViTUNet().load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    (bundle / "models" / "model.pt").write_bytes(b"tampered")  # an existing file is checked against hash_val
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "hash check" in res.stderr


@pytest.mark.parametrize("kind,message", [
    ("missing", "does not exist"),
    ("fused", "is a fused LeViT-UNet-128s"),
    ("checkpoint", "not a bare state_dict"),
    ("wrapped", "starts with 'module.'"),
    ("img_size", '"img_size": 128'),
    ("variant", '"variant": "192"'),
    ("classes", "for 4 classes, but this bundle segments 9"),
    ("not_torch", "torch.load(weights_only=True)"),
    ("pickle", "torch.load(weights_only=True)"),
    ("nan", "non-finite"),
    ("url", "not an http(s) URL"),
])
def test_refuses_what_the_bundle_could_not_load(kind, message, fake_repo, tmp_path):
    path, url = tmp_path / "model.pt", URL
    net = LeViTUNet()
    if kind == "fused":
        save(net.fuse(), path)
    elif kind == "checkpoint":
        save({"model": net.state_dict(), "optimizer": {"lr": 0.01}}, path)
    elif kind == "wrapped":
        save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    elif kind == "img_size":
        save(LeViTUNet(img_size=128), path)
    elif kind == "variant":
        save(LeViTUNet(variant="192"), path)
    elif kind == "classes":
        save(LeViTUNet(out_channels=4), path)  # ACDC weights for the Synapse bundle
    elif kind == "not_torch":
        path.write_bytes(b"not a torch file")
    elif kind == "pickle":
        torch.save({"model": net}, path)  # a pickled module: weights_only refuses to unpickle it
    elif kind == "nan":
        sd = net.state_dict()
        sd["head.bias"][0] = float("nan")
        save(sd, path)
    elif kind == "url":
        save(net, path)
        url = "ftp://example.org/model.pt"
    before = (fake_repo / "large_files.yml").read_bytes()
    with pytest.raises(ReleaseError, match=re.escape(message)):
        release("synapse", [path], [url], paths=["models/model.pt"], repo=fake_repo)
    assert (fake_repo / "large_files.yml").read_bytes() == before  # nothing written


def test_acdc_list_lives_in_its_bundle_json_and_reaches_the_bundle(fake_repo, tmp_path):
    source = fake_repo / "configs" / "acdc_bundle.json"
    before = source.read_text()
    weights = save(LeViTUNet(out_channels=4, img_size=ACDC_IMG), tmp_path / "model_final.pt")  # trained elsewhere, published as model.pt
    with pytest.raises(ReleaseError, match="9"):  # not for the root bundle: 9 classes there
        release("synapse", [weights], [URL], paths=["models/model.pt"], repo=fake_repo)
    target, entries = release("acdc", [weights], [URL], paths=["models/model.pt"], repo=fake_repo)
    assert target == source
    entry = {"path": "models/model.pt", "url": URL, "hash_type": "sha256", "hash_val": sha256(weights)}
    assert entries == [entry] and json.loads(source.read_text())["large_files"] == [entry]
    assert set_values(source.read_text(), {"large_files": []}, "acdc_bundle.json") == before  # nothing else moved
    assert (fake_repo / "large_files.yml").read_text() == (REPO / "large_files.yml").read_text()  # root's: untouched

    assert model_card.stale_files(fake_repo, ["acdc"]) == ["docs/acdc_README.md"]  # its weights sentence changed
    assert model_card.main(["--repo", str(fake_repo)]) == 0
    bundle = make_bundle("acdc", tmp_path / "dist" / "levit_unet_acdc", repo=fake_repo)
    assert yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"] == [entry]
    card = " ".join((bundle / "docs" / "README.md").read_text().split())
    assert f"Published weights: `models/model.pt` (sha256 `{entry['hash_val'][:16]}...`)" in card
    assert "No trained weights are published yet" not in card


def test_command_line(fake_repo, tmp_path, capsys):
    weights = save(LeViTUNet(out_channels=4, img_size=ACDC_IMG), tmp_path / "model.pt")
    argv = ["--repo", str(fake_repo), "--task", "acdc", "--file", str(weights), "--url", URL]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"models/model.pt  sha256 {sha256(weights)}  {URL}" in out and "scripts.model_card" in out
    assert main(["--repo", str(fake_repo), "--task", "acdc", "--file", str(tmp_path / "absent.pt"), "--url", URL]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["--repo", str(fake_repo), "--file", str(weights), "--url", URL, "--url", URL]) == 1
    assert "one --url" in capsys.readouterr().err
    assert main(["--repo", str(fake_repo), "--task", "acdc", "--remove", "models/other.pt"]) == 1
    res = subprocess.run([sys.executable, "-m", "scripts.release_weights"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "nothing to do" in res.stderr
