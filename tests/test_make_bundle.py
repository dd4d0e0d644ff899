"""scripts/make_bundle.py: ``synapse`` reproduces the repository root; ``acdc`` is complete and runs on its own."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, verify_metadata

from conftest import REPO, copy_repo, shared_path
from scripts.make_bundle import (
    DIAGRAM_MARKER,
    BundleError,
    main,
    make_bundle,
    merge_preset,
    render_large_files,
    set_values,
    task_large_files,
)
from scripts.networks import LeViTUNet
from scripts.prepare_data import convert_acdc_ssl4mis
from test_prepare_data import ssl4mis  # noqa: F401  (fixture)

# What the Synapse bundle must hold byte for byte as the repository root does.
ROOT_FILES = (
    "configs/metadata.json", "configs/train.json", "configs/evaluate.json", "configs/inference.json",
    "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md", "docs/data_license.txt",
    "LICENSE", "large_files.yml",
)
CONFIGS = ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json")
ACDC_LABELS = ["background", "right_ventricle", "myocardium", "left_ventricle"]
SYNAPSE_WORDS = ("synapse", "btcv", "hounsfield", "aorta", "kidney", "abdom")
VAL_CASE = "patient045_frame01"  # the smallest ACDC validation volume of the SSL4MIS files (8 slices)


def preset(name: str) -> dict:
    return json.loads((REPO / "configs" / f"{name}.json").read_text())


def no_pythonpath() -> dict:
    return dict(os.environ, PYTHONPATH="")  # the bundle must be found through its own folder alone


@pytest.fixture(scope="module")
def acdc_bundle(tmp_path_factory) -> Path:
    """The ACDC bundle, written once for the module (tests read it; those that run it copy it first)."""
    return make_bundle("acdc", tmp_path_factory.mktemp("dist") / "levit_unet_acdc")


def assert_bundle_layout(out: Path) -> None:
    assert (out / "metadata.json").is_symlink() and os.readlink(out / "metadata.json") == "configs/metadata.json"
    assert (out / "metadata.json").resolve() == (out / "configs" / "metadata.json").resolve()
    assert sorted(p.name for p in (out / "configs").iterdir()) == sorted([*CONFIGS, "logging.conf", "metadata.json"])
    assert sorted(p.name for p in (out / "docs").iterdir()) == ["README.md", "data_license.txt"]
    assert (out / "models").is_dir() and not list((out / "models").iterdir())
    assert (out / "README.md").read_text().startswith("# LeViT-UNet ")
    for rel in ("__init__.py", "utils.py", "inferer.py", "prepare_data.py", "networks/levit_unet.py"):
        assert (out / "scripts" / rel).is_file(), rel
    for tool in ("make_bundle.py", "model_card.py", "release_weights.py"):  # they edit the repository
        assert not (out / "scripts" / tool).exists(), tool
    assert not [p for p in out.rglob("*") if p.name == "__pycache__" or p.suffix == ".pyc"]


# ---------------------------------------------------------------------------------- synapse = the root


def test_synapse_bundle_is_the_repository_root(tmp_path):
    out = make_bundle("synapse", tmp_path / "levit_unet_synapse")
    for rel in ROOT_FILES:
        assert (out / rel).read_bytes() == (REPO / rel).read_bytes(), f"{rel} differs from the root's"
    assert_bundle_layout(out)
    assert (out / "scripts" / "demo.py").is_file()  # the demo's synthetic data is Synapse-like


# ---------------------------------------------------------------------------------- acdc: configs and metadata


def test_acdc_configs_are_the_root_configs_with_the_preset_merged(acdc_bundle):
    acdc, synapse = preset("acdc"), preset("synapse")
    assert_bundle_layout(acdc_bundle)
    assert not (acdc_bundle / "scripts" / "demo.py").exists()  # it generates Synapse-like CT
    defined = set()
    for name in CONFIGS:
        root_text = (REPO / "configs" / name).read_text()
        text = (acdc_bundle / "configs" / name).read_text()
        root, config = json.loads(root_text), json.loads(text)
        assert list(config) == list(root), f"{name}: key order"
        for key, value in config.items():
            assert value == (acdc[key] if key in acdc else root[key]), f"{name}: {key}"
        defined |= set(config) & set(acdc)
        assert not [w for w in SYNAPSE_WORDS if w in text.lower()], name
        # only the preset's values were re-rendered, in the root's style: merging Synapse back gives the root
        assert merge_preset(text, synapse, name) == root_text, f"{name}: formatting not kept"
    assert defined == set(acdc)  # every preset key landed somewhere
    for name in ("train.json", "inference.json"):
        config = json.loads((acdc_bundle / "configs" / name).read_text())
        assert config["num_classes"] == 4 and config["label_names"] == ACDC_LABELS
        assert config["intensity"]["_target_"] == "ScaleIntensityd"
    assert json.loads((acdc_bundle / "configs" / "train.json").read_text())["dataset_dir"].endswith("/acdc")


def test_acdc_metadata_content(acdc_bundle):
    meta = json.loads((acdc_bundle / "configs" / "metadata.json").read_text())
    root = json.loads((REPO / "configs" / "metadata.json").read_text())
    assert list(meta) == list(root)
    for key in ("schema", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
                "authors", "copyright", "data_type", "pred_classes"):
        assert meta[key] == root[key], key
    assert meta["version"] in meta["changelog"] and meta["intended_use"] == "Research only, not for clinical use"
    assert "ACDC" in meta["name"] and "https://www.creatis.insa-lyon.fr/Challenge/acdc/" in meta["data_source"]
    assert any("Bernard" in r and "2018" in r for r in meta["references"])
    assert any("LeViT-UNet" in r for r in meta["references"])
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["modality"], image["format"], image["num_channels"]) == ("MR", "magnitude", 1)
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 4 and pred["channel_def"] == {str(i): n for i, n in enumerate(ACDC_LABELS)}
    for name in ACDC_LABELS[1:]:
        assert name in meta["label_classes"]
    text = (acdc_bundle / "configs" / "metadata.json").read_text()
    assert not [w for w in SYNAPSE_WORDS if w in text.lower()]
    # written in the root's style: putting the root's values back gives the root's file
    assert set_values(text, root, "metadata") == (REPO / "configs" / "metadata.json").read_text()


def test_acdc_metadata_matches_the_schema(acdc_bundle, tmp_path):
    schema = tmp_path / "schema.json"
    shutil.copy(shared_path("reference", "monai", "meta_schema_20240725.json"), schema)  # no download
    verify_metadata(meta_file=str(acdc_bundle / "configs" / "metadata.json"), filepath=str(schema))


# ---------------------------------------------------------------------------------- acdc: model card


def _sections(card: str) -> list[str]:
    return [line for line in card.splitlines() if line.startswith("## ")]


def test_acdc_model_card(acdc_bundle):
    card = (acdc_bundle / "docs" / "README.md").read_text()
    root_card = (REPO / "docs" / "README.md").read_text()
    assert _sections(card) == _sections(root_card)  # same shape as the Synapse card
    assert card.startswith("# LeViT-UNet: ACDC") and "Research only, not for clinical use" in card
    assert DIAGRAM_MARKER not in card and "make_bundle:" not in card
    diagram = re.search(r"## Model architecture\n(```.*?```)", root_card, re.S).group(1)
    assert diagram in card
    if not task_large_files("acdc"):
        assert "No trained weights are published yet" in card
    for row in ("| LeViT-UNet-384 (paper) | 90.32 | 89.55 | 87.64 | 93.76 |",
                "| Swin-Unet (paper) | 90.00 | 88.55 | 85.62 | 95.83 |",
                "| TransUNet (paper) | 89.71 | 88.86 | 84.54 | 95.73 |"):
        assert row in card
    assert "Bernard O." in card and "https://www.creatis.insa-lyon.fr/Challenge/acdc/" in card
    assert "--dataset_dir /data/acdc" in card and "ckpt_export" in card
    assert not [w for w in ("aorta", "hounsfield", "btcv") if w in card.lower()]


def test_acdc_model_card_rows_are_the_papers(acdc_bundle):
    paper = shared_path("reference", "paper.md").read_text()
    table = paper.split("ACDC cardiac cine MRI", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isalpha() and "method" not in line]
    assert len(rows) == 3
    card = (acdc_bundle / "docs" / "README.md").read_text()
    for row in rows:
        method, *numbers = [c.strip() for c in row.strip("|").split("|")]
        assert f"| {method} (paper) | {' | '.join(numbers)} |" in card


def test_acdc_model_card_parameter_counts(acdc_bundle):
    card = (acdc_bundle / "docs" / "README.md").read_text()
    counts = dict(re.findall(r"^\| (128s|192|384) \|.*\| ([\d.]+) M \|$", card, re.M))
    assert sorted(counts) == ["128s", "192", "384"]
    for variant, params in counts.items():
        model = LeViTUNet(out_channels=4, variant=variant)
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 3) == float(params), variant


# ---------------------------------------------------------------------------------- acdc: MONAI workflows


@pytest.mark.parametrize("config,workflow_type", [("train.json", "train"), ("inference.json", "infer")])
def test_acdc_bundle_properties(config, workflow_type, acdc_bundle, ssl4mis, tmp_path):  # noqa: F811
    data = convert_acdc_ssl4mis(ssl4mis[0], tmp_path / "acdc").parent
    checkpoint = tmp_path / "model.pt"
    img_size = json.loads((acdc_bundle / "configs" / "inference.json").read_text())["img_size"]
    torch.save(LeViTUNet(out_channels=4, img_size=img_size).state_dict(), checkpoint)
    wf = ConfigWorkflow(config_file=str(acdc_bundle / "configs" / config),
                        meta_file=str(acdc_bundle / "configs" / "metadata.json"), workflow_type=workflow_type,
                        bundle_root=str(acdc_bundle), dataset_dir=str(data), input=str(data / "imagesTr" / "*.nii.gz"),
                        num_workers=0, cache_rate=0.0, checkpoint=str(checkpoint))
    wf.initialize()
    assert wf.check_properties() == []
    with torch.no_grad():
        assert wf.parser.get_parsed_content("network_def").eval()(torch.zeros(1, 1, img_size, img_size)).shape[1] == 4
    if workflow_type == "train":
        assert len(wf.parser.get_parsed_content("train#dataset#data")) == 1  # the fixture's training case


def test_acdc_bundle_runs_outside_the_repository(acdc_bundle, tmp_path):
    """A copy of the bundle, run from its own folder with no PYTHONPATH, segments a real ACDC volume."""
    data = convert_acdc_ssl4mis(shared_path("data", "acdc_ssl4mis"), tmp_path / "data", cases=[VAL_CASE]).parent
    image = data / "imagesTr" / f"{VAL_CASE}.nii.gz"
    bundle = shutil.copytree(acdc_bundle, tmp_path / "elsewhere" / "levit_unet_acdc", symlinks=True)
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    torch.save(LeViTUNet(out_channels=4, img_size=64).state_dict(), checkpoint)
    out = tmp_path / "pred"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
           "--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf",
           "--bundle_root", str(bundle), "--input", str(image), "--output_dir", str(out),
           "--img_size", "64", "--checkpoint", str(checkpoint), "--device", "$torch.device('cpu')"]
    res = subprocess.run(cmd, cwd=bundle, env=no_pythonpath(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    src, seg = nib.load(str(image)), nib.load(str(out / f"{VAL_CASE}_seg.nii.gz"))
    assert seg.shape == src.shape and seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-5)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 3}


def test_acdc_ckpt_export_from_another_folder(acdc_bundle, tmp_path):
    torch.manual_seed(0)
    model = LeViTUNet(out_channels=4, img_size=64).eval()
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    ts = tmp_path / "model.ts"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
           "--ckpt_file", str(ckpt), "--meta_file", str(acdc_bundle / "configs" / "metadata.json"),
           "--config_file", str(acdc_bundle / "configs" / "inference.json"), "--bundle_root", str(acdc_bundle),
           "--img_size", "64"]
    res = subprocess.run(cmd, cwd=tmp_path, env=no_pythonpath(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    exported = torch.jit.load(str(ts))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        y = exported(x)
        assert y.shape == (2, 4, 64, 64)
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- the tool itself


@pytest.fixture
def fake_repo(tmp_path) -> Path:
    """A copy of what make_bundle reads, so that tests may break it (and a bad guard could harm only a copy)."""
    repo = copy_repo(tmp_path / "repo")
    return repo


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp" in p.name]


def test_refuses_non_empty_folders_and_force_replaces_only_a_bundle(tmp_path, capsys):
    out = tmp_path / "bundle"
    out.mkdir()
    assert main(["acdc", str(out)]) == 0  # an empty folder is fine
    (out / "stale.txt").write_text("from an earlier build")
    assert main(["acdc", str(out)]) == 1
    assert "--force" in capsys.readouterr().err and (out / "stale.txt").exists()
    assert main(["synapse", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists()
    assert (out / "configs" / "train.json").read_bytes() == (REPO / "configs" / "train.json").read_bytes()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("not a bundle")
    assert main(["acdc", str(other), "--force"]) == 1
    assert "does not look like a bundle" in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["mine.txt"]
    assert leftovers(tmp_path) == []


def test_never_replaces_the_repository(fake_repo):
    for target in (fake_repo, fake_repo.parent):
        with pytest.raises(BundleError, match="repository itself"):
            make_bundle("synapse", target, force=True, repo=fake_repo)
    with pytest.raises(BundleError, match="inside the repository's scripts/"):
        make_bundle("acdc", fake_repo / "scripts" / "bundle", repo=fake_repo)
    assert (fake_repo / "configs" / "acdc.json").is_file() and not (fake_repo / "scripts" / "bundle").exists()


def test_a_failure_leaves_no_half_bundle(fake_repo, tmp_path):
    out = tmp_path / "dist" / "levit_unet_acdc"
    card = fake_repo / "docs" / "README.md"  # a card without an architecture section (generated blocks intact)
    card.write_text(card.read_text().replace("## Model architecture", "## Architecture"))
    with pytest.raises(BundleError, match="Model architecture"):
        make_bundle("acdc", out, repo=fake_repo)
    assert not out.exists() and leftovers(out.parent) == []
    make_bundle("synapse", out, repo=fake_repo)  # the Synapse card needs no diagram: a previous bundle
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(BundleError):
        make_bundle("acdc", out, force=True, repo=fake_repo)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    assert leftovers(out.parent) == []


def test_preset_keys_must_exist_in_the_configs(fake_repo, tmp_path):
    acdc = preset("acdc")
    (fake_repo / "configs" / "acdc.json").write_text(json.dumps({**acdc, "num_clases": 4}))
    with pytest.raises(BundleError, match="num_clases"):
        make_bundle("acdc", tmp_path / "out", repo=fake_repo)
    (fake_repo / "configs" / "acdc.json").write_text(json.dumps({**acdc, "num_classes": 3}))
    with pytest.raises(BundleError, match="num_classes"):
        make_bundle("acdc", tmp_path / "out", repo=fake_repo)
    data = json.loads((REPO / "configs" / "acdc_bundle.json").read_text())
    data["metadata"]["network_data_format#inputs#image#modalty"] = "MR"
    (fake_repo / "configs" / "acdc.json").write_text(json.dumps(acdc))
    (fake_repo / "configs" / "acdc_bundle.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="modalty"):
        make_bundle("acdc", tmp_path / "out", repo=fake_repo)
    assert not (tmp_path / "out").exists()


def test_large_files_come_from_the_task_never_from_another_bundle(fake_repo, tmp_path):
    """The root's large_files.yml lists the Synapse weights; the ACDC bundle's is written from its own list."""
    synapse_entry = {"path": "models/model.pt", "url": "https://example.org/synapse/model.pt", "hash_type": "sha256",
                     "hash_val": "a" * 64}
    (fake_repo / "large_files.yml").write_text(render_large_files([synapse_entry]))
    assert task_large_files("synapse", fake_repo) == [synapse_entry]
    assert task_large_files("acdc", fake_repo) == []
    with pytest.raises(BundleError, match="scripts.model_card"):
        make_bundle("synapse", tmp_path / "synapse", repo=fake_repo)  # its card must now say weights exist
    from scripts.model_card import main as model_card

    assert model_card(["--repo", str(fake_repo)]) == 0
    acdc = make_bundle("acdc", tmp_path / "acdc", repo=fake_repo)
    synapse = make_bundle("synapse", tmp_path / "synapse", repo=fake_repo)
    assert (synapse / "large_files.yml").read_bytes() == (fake_repo / "large_files.yml").read_bytes()
    assert (acdc / "large_files.yml").read_text() == render_large_files([])
    assert "large_files: []" in (acdc / "large_files.yml").read_text()
    assert "No trained weights are published yet" in (acdc / "README.md").read_text()
    assert "Published weights (`models/model.pt`)" in (synapse / "README.md").read_text()
    data = json.loads((fake_repo / "configs" / "acdc_bundle.json").read_text())
    data["large_files"] = [{**synapse_entry, "size": 1}]
    (fake_repo / "configs" / "acdc_bundle.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="exactly the keys"):
        make_bundle("acdc", tmp_path / "bad", repo=fake_repo)


def test_root_large_files_is_in_the_rendered_form():
    assert (REPO / "large_files.yml").read_text() == render_large_files(task_large_files("synapse"))


def test_set_values_keeps_every_other_byte():
    text = ('{\n    "a": [1, 2],\n    "b": {\n        "c": 1,\n        "d": [\n            "x"\n        ]\n    },\n'
            '  "e":3}\n')
    assert set_values(text, {"a": [1, 2], "b#c": 1}, "t") == text  # equal values: untouched
    assert set_values(text, {"a": [3], "b#d": ["y", "z"], "e": "f"}, "t") == (
        '{\n    "a": [3],\n    "b": {\n        "c": 1,\n        "d": [\n            "y",\n            "z"\n'
        '        ]\n    },\n  "e":"f"}\n'
    )
    with pytest.raises(BundleError, match="no key 'b#x'"):
        set_values(text, {"b#x": 1}, "t")


def test_command_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "scripts.make_bundle", "acdc", str(tmp_path / "b")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "wrote the acdc bundle" in res.stdout, res.stderr
    res = subprocess.run([sys.executable, "-m", "scripts.make_bundle", "acdc", str(tmp_path / "b")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "not empty" in res.stderr
    res = subprocess.run([sys.executable, "-m", "scripts.make_bundle", "kidney", str(tmp_path / "c")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and not (tmp_path / "c").exists()
