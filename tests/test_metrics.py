"""Dice / HD95 (scripts.metrics) against medpy, the empty-mask protocols, and the report (scripts.report)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from conftest import REPO, shared_path
from scripts.metrics import case_metrics, class_volumes_ml, dice, hd95
from scripts.report import MetricsReportHandler, main, summarize, summary_table, write_case_csv

TS_TO_SYNAPSE = {52: 1, 4: 2, 3: 3, 2: 4, 5: 5, 7: 6, 1: 7, 6: 8}
SYNAPSE = ["background", "aorta", "gallbladder", "kidney_l", "kidney_r", "liver", "pancreas", "spleen", "stomach"]


def _medpy():
    return pytest.importorskip("medpy.metric.binary")


def _perturbations(gt: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Predictions derived from a binary mask: dilated, eroded, shifted, and with boundary voxels flipped."""
    out = [ndi.binary_dilation(gt), ndi.binary_erosion(gt, iterations=1), np.roll(gt, (1, 3, -2), axis=(0, 1, 2))]
    band = ndi.binary_dilation(gt, iterations=2) & ~ndi.binary_erosion(gt, iterations=2)
    flip = band & (rng.random(gt.shape) < 0.3)
    out.append(gt ^ flip)
    return [p for p in out if p.any()]


def _assert_same_as_medpy(p: np.ndarray, g: np.ndarray, spacing=None, connectivity: int = 1) -> None:
    mb = _medpy()
    assert dice(p, g) == pytest.approx(mb.dc(p, g), abs=1e-9)
    assert hd95(p, g, spacing, connectivity) == pytest.approx(mb.hd95(p, g, spacing, connectivity), abs=1e-9)


# ------------------------------------------------------------------------------------ equality with medpy


def test_synthetic_shapes_equal_medpy() -> None:
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:30, :40, :36]
    sphere = (zz - 15) ** 2 + (yy - 20) ** 2 + (xx - 18) ** 2 < 100
    cube = np.zeros_like(sphere)
    cube[0:12, 25:40, 3:20] = True  # touches the array border (medpy's erosion border value is 0)
    two = sphere.copy()
    two[2:5, 2:6, 30:34] = True  # a second, distant component
    noisy = ndi.binary_opening(rng.random(sphere.shape) < 0.55)
    pairs = [(sphere, cube), (two, sphere), (noisy, sphere), (cube, cube), (np.roll(sphere, 4, 1), sphere)]
    for p, g in pairs:
        for conn in (1, 3):
            _assert_same_as_medpy(p, g, connectivity=conn)
        for spacing in ((3.0, 0.7, 0.7), (0.5, 2.5, 1.25), 2.0):
            _assert_same_as_medpy(p, g, spacing)
    _assert_same_as_medpy(sphere[15], cube[5], (0.8, 1.9))  # 2D works as well


def test_acdc_volumes_equal_medpy() -> None:
    h5py = pytest.importorskip("h5py")
    _medpy()
    folder = shared_path("data", "acdc_ssl4mis", "data")
    files = sorted(folder.glob("patient*_frame*.h5"))[:4]
    assert files, f"no ACDC volumes in {folder}"
    rng = np.random.default_rng(1)
    for f in files:
        with h5py.File(f, "r") as h:
            label = h["label"][:]  # D x H x W
        for c in (1, 2, 3):
            g = label == c
            for p in _perturbations(g, rng):
                _assert_same_as_medpy(p, g)
                _assert_same_as_medpy(p, g, spacing=(10.0, 1.56, 1.56))


def _ct_synapse_label() -> tuple[np.ndarray, tuple[float, ...]]:
    nib = pytest.importorskip("nibabel")
    img = nib.load(str(shared_path("data", "ct_sample", "example_seg.nii.gz")))
    ts = np.asanyarray(img.dataobj).astype(np.int64)
    lut = np.zeros(max(ts.max(), max(TS_TO_SYNAPSE)) + 1, dtype=np.int64)
    for k, v in TS_TO_SYNAPSE.items():
        lut[k] = v
    return lut[ts], tuple(float(z) for z in img.header.get_zooms()[:3])


def _transunet_reference(pred: np.ndarray, gt: np.ndarray, spacing=None) -> tuple[float, float]:
    """TransUNet's calculate_metric_percase, with medpy."""
    mb = _medpy()
    if pred.sum() > 0 and gt.sum() > 0:
        return mb.dc(pred, gt), mb.hd95(pred, gt, spacing)
    return (1.0, 0.0) if pred.sum() > 0 else (0.0, 0.0)


def test_ct_label_case_metrics_equal_transunet_medpy() -> None:
    _medpy()
    label, zooms = _ct_synapse_label()
    assert set(np.unique(label)) == set(range(9)), "all eight Synapse organs are in the sample"
    rng = np.random.default_rng(2)
    pred = np.zeros_like(label)
    for c in range(1, 9):  # each organ perturbed differently; the gallbladder left out (empty prediction)
        if c != 2:
            pred[_perturbations(label == c, rng)[c % 4]] = c
    spacing = (0.8, 0.8, zooms[2])  # anisotropic
    got = case_metrics(pred, label, 9, spacing=spacing)
    assert sorted(got) == list(range(1, 9))
    for c in range(1, 9):
        d, h = _transunet_reference(pred == c, label == c)
        _, h_mm = _transunet_reference(pred == c, label == c, spacing)
        assert got[c]["dice"] == pytest.approx(d, abs=1e-9)
        assert got[c]["hd95"] == pytest.approx(h, abs=1e-9)
        assert got[c]["hd95_mm"] == pytest.approx(h_mm, abs=1e-9)
    vols = class_volumes_ml(label, zooms, 9)
    assert vols[5] == pytest.approx(np.count_nonzero(label == 5) * 27 / 1000)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_monai_percentile_hausdorff_differs_from_medpy() -> None:
    """MONAI takes the larger of the two directed 95th percentiles; medpy (and the papers) pool both."""
    mb = _medpy()
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_hausdorff_distance

    g = np.zeros((48, 48, 48), bool)
    g[5:30, 5:30, 5:30] = True
    p = g.copy()
    p[34:44, 34:44, 34:44] = True  # a false-positive blob
    monai_hd = compute_hausdorff_distance(
        torch.tensor(p)[None, None], torch.tensor(g)[None, None], include_background=True, percentile=95
    ).item()
    assert hd95(p, g) == pytest.approx(mb.hd95(p, g), abs=1e-9)
    assert abs(monai_hd - mb.hd95(p, g)) > 1.0


# -------------------------------------------------------------------------------- protocols, validation


def _maps(pred_classes: set[int], gt_classes: set[int]) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.zeros((12, 12, 12), np.uint8), np.zeros((12, 12, 12), np.uint8)
    for c in pred_classes:
        pred[2 * c : 2 * c + 2, 2:8, 2:8] = c
    for c in gt_classes:
        gt[2 * c : 2 * c + 2, 3:9, 2:8] = c
    return pred, gt


def test_transunet_edge_cases() -> None:
    pred, gt = _maps({1, 2}, {1, 3})  # 1 both, 2 pred only, 3 gt only, 4 neither
    m = case_metrics(pred, gt, 5, spacing=(1, 1, 2))
    assert m[1]["dice"] == pytest.approx(dice(pred == 1, gt == 1)) and m[1]["hd95"] > 0
    assert (m[2]["dice"], m[2]["hd95"], m[2]["hd95_mm"]) == (1.0, 0.0, 0.0)
    assert (m[3]["dice"], m[3]["hd95"], m[3]["hd95_mm"]) == (0.0, 0.0, 0.0)
    assert (m[4]["dice"], m[4]["hd95"]) == (0.0, 0.0)
    assert "hd95_mm" not in case_metrics(pred, gt, 5)[1]


def test_strict_protocol() -> None:
    pred, gt = _maps({1, 2}, {1, 3})
    m = case_metrics(pred, gt, 5, protocol="strict")
    assert m[1]["dice"] == pytest.approx(dice(pred == 1, gt == 1))
    for c in (2, 3):
        assert m[c]["dice"] == 0.0 and math.isnan(m[c]["hd95"])
    assert math.isnan(m[4]["dice"]) and math.isnan(m[4]["hd95"])


@pytest.mark.parametrize(
    "pred, label, num_classes, kwargs, match",
    [
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 5), int), 2, {}, "shape"),
        (np.zeros((4, 4), int), np.zeros((4, 4), int), 2, {}, "3D"),
        (np.full((4, 4, 4), 3), np.zeros((4, 4, 4), int), 3, {}, r"\[0, 3\)"),
        (np.full((4, 4, 4), -1), np.zeros((4, 4, 4), int), 3, {}, r"\[0, 3\)"),
        (np.full((4, 4, 4), 0.5), np.zeros((4, 4, 4), int), 3, {}, "integer"),
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), 1, {}, "num_classes"),
        (np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), 2, {"protocol": "nnunet"}, "protocol"),
        (np.ones((4, 4, 4), int), np.ones((4, 4, 4), int), 2, {"spacing": (1, 1)}, "spacing"),
    ],
)
def test_case_metrics_validation(pred, label, num_classes, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        case_metrics(pred, label, num_classes, **kwargs)


def test_hd95_empty_mask_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        hd95(np.zeros((3, 3, 3), bool), np.ones((3, 3, 3), bool))
    assert dice(np.zeros(4), np.zeros(4)) == 1.0  # medpy dc


# ------------------------------------------------------------------------------------------------ report

NAMES = ["background", "rv", "myo"]
NAN = math.nan
ROWS = [  # (dice, hd95, hd95_mm) of classes 1 (rv) and 2 (myo) per case; case c has no rv (strict: NaN)
    {"case": case, "metrics": {c: dict(zip(("dice", "hd95", "hd95_mm"), v)) for c, v in enumerate(vals, start=1)}}
    for case, vals in (
        ("a", ((0.8, 2, 3), (0.6, 4, 5))),
        ("b", ((1, 0, 0), (0.4, 8, 9))),
        ("c", ((NAN,) * 3, (0.2, 6, 7))),
    )
]


def test_case_csv(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    write_case_csv(ROWS, NAMES, path)
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["case", "rv_dice", "rv_hd95", "rv_hd95_mm", "myo_dice", "myo_hd95", "myo_hd95_mm"]
    assert [r["case"] for r in rows] == ["a", "b", "c"]
    assert float(rows[1]["myo_hd95"]) == 8.0 and math.isnan(float(rows[2]["rv_dice"]))
    no_mm = [{"case": "a", "metrics": {c: {k: m[k] for k in ("dice", "hd95")} for c, m in ROWS[0]["metrics"].items()}}]
    write_case_csv(no_mm, NAMES[1:], path)  # foreground-only names are accepted too
    assert path.read_text().splitlines()[0] == "case,rv_dice,rv_hd95,myo_dice,myo_hd95"
    assert [p.name for p in tmp_path.iterdir()] == ["m.csv"]  # no temp file left behind


def test_summary_values_by_hand() -> None:
    s = summarize(ROWS, NAMES)
    rv, myo = s["per_class"]["rv"], s["per_class"]["myo"]
    assert rv["dice_mean"] == pytest.approx(0.9) and rv["dice_std"] == pytest.approx(0.1)
    assert myo["dice_mean"] == pytest.approx(0.4) and myo["dice_std"] == pytest.approx(np.std([0.6, 0.4, 0.2]))
    assert rv["hd95_mean"] == pytest.approx(1.0) and myo["hd95_mean"] == pytest.approx(6.0)
    assert myo["hd95_mm_mean"] == pytest.approx(7.0)
    assert s["mean_dice"] == pytest.approx(0.65) and s["mean_hd95"] == pytest.approx(3.5)
    assert s["dice_std"] == pytest.approx(np.std([0.7, 0.7, 0.2]))  # per-case means over classes
    assert s["num_cases"] == 3
    lines = summary_table(ROWS, NAMES).splitlines()
    assert lines[2] == "| | DSC (%) | HD95 | rv | myo |"
    assert lines[4] == "| mean | 65.00 | 3.50 | 90.00 | 40.00 |"
    std_dsc, std_hd, std_myo = 100 * np.std([0.7, 0.7, 0.2]), np.std([3, 4, 6]), 100 * np.std([0.6, 0.4, 0.2])
    assert lines[5] == f"| std | {std_dsc:.2f} | {std_hd:.2f} | 10.00 | {std_myo:.2f} |"
    assert "| mean (mm) | 4.25 | 1.50 | 7.00 |" in lines


def _write_nii(path: Path, data: np.ndarray, zooms=(2.0, 2.0, 3.0)) -> None:
    nib = pytest.importorskip("nibabel")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), np.diag([*zooms, 1.0])), str(path))


def _cli_folders(tmp_path: Path) -> tuple[Path, Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    rng = np.random.default_rng(3)
    cases = {}
    for i, name in enumerate(["case01", "case02"]):
        gt = np.zeros((16, 14, 10), np.uint8)
        gt[3:10, 2:9, 2:7] = 1
        gt[9:14, 6:12, 4:9] = 2
        pred = gt.copy()
        pred[rng.random(gt.shape) < 0.05] = 0
        pred = np.roll(pred, i + 1, axis=0)
        cases[name] = (pred, gt)
        _write_nii(tmp_path / "labels" / f"{name}.nii.gz", gt)
    _write_nii(tmp_path / "preds" / "case01_seg.nii.gz", cases["case01"][0])
    _write_nii(tmp_path / "preds" / "case02" / "case02_pred.nii.gz", cases["case02"][0])  # MONAI SaveImage layout
    return tmp_path / "preds", tmp_path / "labels", cases


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preds, labels, cases = _cli_folders(tmp_path)
    out = tmp_path / "out"
    assert main([str(preds), str(labels), "--labels", "background,rv,myo", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((out / "metrics_per_case.csv").open()))
    assert [r["case"] for r in rows] == ["case01", "case02"]
    for r in rows:
        want = case_metrics(*cases[r["case"]], 3, spacing=(2.0, 2.0, 3.0))
        for c, name in ((1, "rv"), (2, "myo")):
            for k in ("dice", "hd95", "hd95_mm"):
                assert float(r[f"{name}_{k}"]) == pytest.approx(want[c][k], abs=1e-9)
    summary = json.loads((out / "metrics_summary.json").read_text())
    assert summary["protocol"] == "transunet" and summary["num_cases"] == 2
    md = (out / "metrics_summary.md").read_text()
    assert md in printed and f"| mean | {100 * summary['mean_dice']:.2f} |" in md


def test_cli_module_entry_point(tmp_path: Path) -> None:
    preds, labels, _ = _cli_folders(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "scripts.report", str(preds), str(labels), "--labels", "bg,rv,myo", "--protocol=strict"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "| mean |" in res.stdout and (preds / "metrics_summary.json").exists()


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preds, labels, cases = _cli_folders(tmp_path)
    args = ["--labels", "background,rv,myo", "--output-dir", str(tmp_path / "out")]

    def fails(pred_dir: Path, *needles: str) -> None:
        assert main([str(pred_dir), str(labels), *args]) == 2
        err = capsys.readouterr().err
        for n in needles:
            assert n in err, err

    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "no prediction files", "empty")
    _write_nii(preds / "case09_seg.nii.gz", cases["case01"][0])
    fails(preds, "no label", "case09_seg.nii.gz")
    (preds / "case09_seg.nii.gz").unlink()
    _write_nii(labels / "case03.nii.gz", cases["case01"][1])
    _write_nii(preds / "case03_seg.nii.gz", cases["case01"][0][:, :, :5])
    fails(preds, "shape mismatch", "case03_seg.nii.gz", "case03.nii.gz")
    (preds / "case03_seg.nii.gz").write_bytes(b"not a nifti file")
    fails(preds, "cannot read", "case03_seg.nii.gz")
    (preds / "case03_seg.nii.gz").unlink()
    assert main([str(preds), str(labels), "--labels", "background,rv", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--labels must list every class" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- handler


def test_handler_on_ignite_engine(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from ignite.engine import Engine
    from monai.data import MetaTensor

    gt = np.zeros((12, 10, 8), np.int64)
    gt[2:8, 2:7, 1:6] = 1
    gt[7:11, 5:9, 3:7] = 2
    pred = np.roll(gt, 1, axis=1)
    affine = torch.diag(torch.tensor([1.5, 1.5, 4.0, 1.0], dtype=torch.float64))

    def item(name: str | None, one_hot: bool = False) -> dict:
        p = torch.as_tensor(pred)
        p = torch.nn.functional.one_hot(p, 3).permute(3, 0, 1, 2).float() if one_hot else p[None].float()
        meta = {"filename_or_obj": f"/data/{name}.nii.gz"} if name else {}
        label = torch.as_tensor(gt)[None].float()
        pred_t, label_t = MetaTensor(p, affine=affine, meta=dict(meta)), MetaTensor(label, affine=affine, meta=meta)
        return {"pred": pred_t, "label": label_t}

    batches = [[item("img01"), item("img02", one_hot=True)], [item(None)]]
    engine = Engine(lambda e, b: b)
    handler = MetricsReportHandler(str(tmp_path / "report"), NAMES)
    handler.attach(engine)
    engine.run(batches, max_epochs=1)

    want = case_metrics(pred, gt, 3, spacing=(1.5, 1.5, 4.0))
    rows = list(csv.DictReader((tmp_path / "report" / "metrics_per_case.csv").open()))
    assert [r["case"] for r in rows] == ["img01", "img02", "case_0002"]
    for r in rows:
        assert float(r["myo_dice"]) == pytest.approx(want[2]["dice"])
        assert float(r["rv_hd95_mm"]) == pytest.approx(want[1]["hd95_mm"])
    summary = json.loads((tmp_path / "report" / "metrics_summary.json").read_text())
    assert summary["mean_dice"] == pytest.approx((want[1]["dice"] + want[2]["dice"]) / 2)
    assert handler.summary is not None and (tmp_path / "report" / "metrics_summary.md").exists()
