"""Dataset presets: what reaches the network, per preset and source format; training vs inference resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from conftest import REPO
from scripts.inferer import LeViTSliceInferer
from scripts.prepare_data import convert_acdc_raw, convert_acdc_ssl4mis, convert_synapse_raw, convert_synapse_transunet
from test_prepare_data import acdc_raw, btcv, ssl4mis, transunet  # noqa: F401  (fixtures)

CONFIGS = REPO / "configs"


def parse(preset: str | None, dataset_dir: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json")] + ([str(CONFIGS / f"{preset}.json")] if preset else []))
    parser.update({"bundle_root": str(REPO), "dataset_dir": str(dataset_dir), **overrides})
    return parser


def network_inputs(preset: str | None, out: Path) -> list[np.ndarray]:
    """The validation preprocessing (the deterministic part of training too) of every training case."""
    parser = parse(preset, out)
    pre = parser.get_parsed_content("validate#preprocessing")
    data = parser.get_parsed_content("train#dataset#data")
    return [np.asarray(pre(item)["image"])[0] for item in data]


def test_ct_preset_windows_raw_hounsfield_units(btcv, tmp_path):
    out = Path(convert_synapse_raw(btcv, tmp_path / "out")).parent
    for image in network_inputs(None, out) + network_inputs("synapse", out):
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert image.min() == 0.0 and image.max() == 1.0  # the fixture spans [-1000, 1000) HU: both ends clip


def test_ct_preset_gives_back_transunet_values_exactly(transunet, tmp_path):
    root, vols = transunet
    out = Path(convert_synapse_transunet(root, tmp_path / "out")).parent
    (image,) = network_inputs("synapse", out)  # training = case0005
    original = vols["case0005"][0]  # D x H x W, already in [0, 1]
    np.testing.assert_allclose(image, original.transpose(2, 1, 0), atol=2e-6)  # scaled once, not twice


def test_mr_preset_scales_raw_acdc_and_keeps_ssl4mis(acdc_raw, ssl4mis, tmp_path):
    out = Path(convert_acdc_raw(acdc_raw, tmp_path / "raw")).parent
    for image in network_inputs("acdc", out):
        assert image.min() == pytest.approx(0.0) and image.max() == pytest.approx(1.0)
    root, vols = ssl4mis
    out = Path(convert_acdc_ssl4mis(root, tmp_path / "ssl")).parent
    (image,) = network_inputs("acdc", out)
    original = vols["patient010_frame01"][0]
    expected = (original - original.min()) / (original.max() - original.min())  # a no-op where it spans [0, 1]
    np.testing.assert_allclose(image, expected.transpose(2, 1, 0), atol=2e-6)


def test_presets_define_the_same_keys():
    import json

    keys = [set(json.loads((CONFIGS / f"{p}.json").read_text())) for p in ("synapse", "acdc")]
    assert keys[0] == keys[1]
    train = json.loads((CONFIGS / "train.json").read_text())
    infer = json.loads((CONFIGS / "inference.json").read_text())
    synapse = json.loads((CONFIGS / "synapse.json").read_text())
    for key in ("num_classes", "label_names", "intensity"):  # the root bundle is the Synapse preset
        assert train[key] == infer[key] == synapse[key], key
    for key in ("network_def", "variant", "img_size", "in_channels", "add_bundle_to_path"):
        assert train[key] == infer[key], key


def test_training_and_inference_give_the_network_the_same_slice(demo_dir):
    """Training resizes each 2D slice with the config's Resized; inference resizes inside the slice inferer."""
    parser = parse(None, demo_dir, img_size=96)  # the 64 x 64 demo slices are upsampled
    item = parser.get_parsed_content("train#dataset#data")[0]
    volume = parser.get_parsed_content("validate#preprocessing")(item)  # (1, X, Y, Z)
    squeeze, resize = parser.get_parsed_content("train#random_transforms")[1:3]
    seen: list[torch.Tensor] = []

    def recorder(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return torch.zeros(x.shape[0], 9, *x.shape[2:])

    LeViTSliceInferer(img_size=96, sw_batch_size=1, precision="fp32", fuse=False)(volume["image"][None], recorder)
    k = 3
    sliced = {key: volume[key][..., k : k + 1] for key in ("image", "label")}
    train_input = resize(squeeze(sliced))["image"]
    assert train_input.shape == (1, 96, 96) and seen[k].shape == (1, 1, 96, 96)
    torch.testing.assert_close(torch.as_tensor(train_input), seen[k][0], rtol=0, atol=1e-6)


def test_training_random_chain_runs_untracked_with_the_same_arithmetic(demo_dir):
    """The per-batch random transforms run on plain tensors (no MONAI meta data), with the numbers a tracked
    Compose gives for the same random state; tracking comes back on afterwards, also when a transform raises."""
    import monai
    from monai.transforms import Compose

    from scripts.transforms import UntrackedCompose

    parser = parse(None, demo_dir, img_size=48, rotate_prob=1.0, rot90_prob=1.0, flip_prob=1.0)
    item = parser.get_parsed_content("train#dataset#data")[0]
    cached = Compose(parser.get_parsed_content("train#deterministic_transforms"))(item)
    chain = parser.get_parsed_content("train#random_chain")
    assert isinstance(chain, UntrackedCompose)
    # a second parser: the first one hands out the same transform objects for every reference
    other = parse(None, demo_dir, img_size=48, rotate_prob=1.0, rot90_prob=1.0, flip_prob=1.0)
    tracked = Compose(other.get_parsed_content("train#random_transforms"))
    chain.set_random_state(seed=7)
    tracked.set_random_state(seed=7)
    plain_out, tracked_out = chain(cached), tracked(cached)
    assert len(plain_out) == len(tracked_out) == parser["samples_per_volume"]
    for a, b in zip(plain_out, tracked_out):
        for key in ("image", "label"):
            assert type(a[key]) is torch.Tensor and isinstance(b[key], monai.data.MetaTensor)
            assert a[key].dtype == b[key].dtype and a[key].shape == (1, 48, 48)
            torch.testing.assert_close(a[key], b[key].as_tensor(), rtol=0, atol=0)
    assert monai.data.get_track_meta()

    def fails(_):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        UntrackedCompose([fails])(cached)
    assert monai.data.get_track_meta()


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_are_fused_where_supported_and_step_alike(name):
    from scripts.utils import make_optimizer

    torch.manual_seed(0)
    a, b = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(3, 8, 3)
    b.load_state_dict(a.state_dict())
    fused, plain = make_optimizer(name, a.parameters(), 1e-2), make_optimizer(name, b.parameters(), 1e-2, fused=False)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for _ in range(3):
        x = torch.randn(2, 3, 8, 8)
        for net, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_make_optimizer_takes_param_groups_given_as_iterators():
    """Deciding on the fused update must not use up a param group's one-shot iterator (nor a bare generator)."""
    from scripts.utils import make_optimizer

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = make_optimizer("adamw", [{"params": net[0].parameters()}, {"params": net[1].weight, "lr": 0.1}], 1e-3)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1] and opt.defaults["fused"] is True
    assert len(make_optimizer("sgd", net.parameters(), 1e-3).param_groups[0]["params"]) == 4


def test_weight_decay_reaches_only_convolution_and_linear_weights():
    """AdamW's decay shrinks conv / linear weights; norms, biases and LeViT's attention bias tables keep theirs."""
    from scripts.networks import LeViTUNet
    from scripts.utils import make_optimizer, weight_decay_groups

    net = LeViTUNet(in_channels=1, out_channels=4, variant="128s", img_size=64)
    decay, keep = weight_decay_groups(net)
    names = {id(p): n for n, p in net.named_parameters()}
    assert keep["weight_decay"] == 0.0 and "weight_decay" not in decay
    assert len(decay["params"]) + len(keep["params"]) == len(list(net.parameters()))
    assert all(p.ndim >= 2 and not names[id(p)].endswith("attention_biases") for p in decay["params"])
    kept = {names[id(p)] for p in keep["params"]}
    assert any(n.endswith("attention_biases") for n in kept) and any(".bn." in n or "norm" in n for n in kept)
    frozen = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).requires_grad_(False)
    assert [len(g["params"]) for g in weight_decay_groups(frozen)] == [1, 3]  # listed as parameters() lists them

    # one AdamW step with zero gradients: only the decayed weights move, by exactly lr * wd of themselves
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.rand_like(p))  # BatchNorm shifts and attention biases start at zero; make every one non-zero
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = make_optimizer("adamw", weight_decay_groups(net), lr=0.1, weight_decay=0.5)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in net.named_parameters():
        expected = before[n] * (0.95 if n not in kept else 1.0)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=n)


def test_train_config_builds_the_decay_groups():
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "acdc.json")])
    parser.update({"bundle_root": str(REPO), "device": "$torch.device('cpu')", "img_size": 64,
                   "optimizer_name": "adamw", "weight_decay": 0.05})
    opt = parser.get_parsed_content("optimizer")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    net = parser.get_parsed_content("network")
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


@pytest.mark.parametrize("name", ["poly", "cosine", "constant"])
def test_lr_warmup_rises_linearly_then_decays_to_the_end(name):
    from scripts.utils import make_scheduler

    def trace(make, total: int) -> list[float]:
        """The lr of each of ``total + 1`` iterations of the schedule ``make(optimizer)`` builds."""
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        sched, out = make(opt), []
        for _ in range(total + 1):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    def lrs(warmup: int, total: int = 20) -> list[float]:
        return trace(lambda opt: make_scheduler(name, opt, total, warmup_iterations=warmup), total)

    plain, warm = lrs(0), lrs(5)
    assert warm[:5] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0])
    # after the warm-up the decay is the plain schedule's, compressed into the remaining 15 iterations
    expected = lrs(0, total=15)
    assert warm[5:] == pytest.approx(expected)
    if name == "constant":
        assert plain == pytest.approx([2.0] * 21)
    else:
        assert plain[0] == 2.0
        assert plain[-1] == pytest.approx(0.0, abs=1e-12) and warm[-1] == pytest.approx(0.0, abs=1e-12)
        assert all(a >= b for a, b in zip(plain, plain[1:]))
    if name == "cosine":  # the closed form equals PyTorch's CosineAnnealingLR
        reference = trace(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20), 20)
        assert plain == pytest.approx(reference, abs=1e-9)
    with pytest.raises(ValueError, match="warmup_iterations"):
        make_scheduler(name, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 10, warmup_iterations=10)
