"""ONNX export (scripts/export_onnx.py) of an img_size-64 model with fixed random weights."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO
from scripts.export_onnx import export_onnx, load_model, main
from scripts.networks import LeViTUNet
from scripts.utils import BundleInputError

IMG = 64

pytestmark = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")  # torch.onnx internals


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A bare state_dict whose BatchNorm statistics and biases are not the initial ones (so folding them matters)."""
    torch.manual_seed(0)
    model = LeViTUNet(img_size=IMG)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and ("bn" in name or ".N." in name or "attention_biases" in name):
                if "running_var" in name:
                    t.copy_(torch.rand_like(t) + 0.5)
                else:
                    t.copy_(torch.randn_like(t) * 0.2 + (1.0 if name.endswith(("N.weight", "bn.weight")) else 0.0))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_export_matches_pytorch_for_any_batch(checkpoint, tmp_path, capsys, fused):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "sub" / "model.onnx"
    args = ["--checkpoint", str(checkpoint), "--output", str(out), "--img-size", str(IMG)]
    args += ["--fused"] if fused else []
    assert main(args) == 0
    assert "max abs difference" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]  # no temporary or external-data file left
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["pred"]
    model = load_model(str(checkpoint), img_size=IMG)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert fused is ("BatchNormalization" not in ops), ops  # the plain graph keeps its BatchNorm nodes
    x = torch.randn(5, 1, IMG, IMG, generator=torch.Generator().manual_seed(1))  # a batch size the check did not use
    with torch.no_grad():
        ref = model(x)
    got = torch.from_numpy(session.run(["pred"], {"image": x.numpy()})[0])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_missing_checkpoint_says_weights_come_from_training(tmp_path):
    with pytest.raises(BundleInputError, match="trained weights not found"):
        export_onnx(str(tmp_path / "model.pt"), str(tmp_path / "model.onnx"), img_size=IMG)
    cmd = [sys.executable, "-m", "scripts.export_onnx", "--checkpoint", str(tmp_path / "model.pt"),
           "--output", str(tmp_path / "model.onnx")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "trained weights not found" in res.stderr and "come from training" in res.stderr
    assert not (tmp_path / "model.onnx").exists()


def test_a_checkpoint_of_other_settings_is_refused_naming_them(checkpoint, tmp_path):
    with pytest.raises(BundleInputError, match="img_size=96"):
        export_onnx(str(checkpoint), str(tmp_path / "model.onnx"), img_size=96)
    assert not list(tmp_path.iterdir())
