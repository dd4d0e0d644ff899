"""scripts/benchmark.py: a tiny run completes and writes the expected JSON (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO


@pytest.mark.slow
def test_benchmark_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "scripts.benchmark", "--variants", "128s", "--img-size", "64", "--iters", "1",
           "--warmup", "0", "--repeats", "1", "--batch-sizes", "1", "--threads", "1", "--matmul-size", "64",
           "--forms", "eager_fp32", "fused_cl_bf16", "cl_bf16", "--train", "--train-batch", "2",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "| LeViT-UNet-128s | fused_cl_bf16 |" in proc.stdout

    report = json.loads(out.read_text())
    assert set(report) == {"environment", "settings", "ceiling_gflops", "models"}
    env = report["environment"]
    for key in ("date", "command", "git_commit", "torch", "threads", "cpu", "mkldnn", "avx512_bf16", "amx_tile",
                "load_average", "load_average_end"):
        assert key in env
    assert env["threads"] == 1
    assert set(report["ceiling_gflops"]) == {"fp32", "bf16"}

    res = report["models"]["LeViT-UNet-128s"]
    assert res["params_m"] > 0 and res["gmac"] > 0 and res["train_gmac"] > res["gmac"]
    assert set(res["inference"]) == {"eager_fp32", "fused_cl_bf16"}
    assert set(res["train"]) == {"eager_fp32", "cl_bf16"}
    assert res["best_inference_form"] in res["inference"]
    for per_batch in [*res["inference"].values(), *res["train"].values()]:
        assert "error" not in per_batch, per_batch
        for r in per_batch.values():
            assert {"img_s", "sec_per_iter", "times", "peak_mb", "base_mb", "ceiling_pct"} <= set(r)
            assert r["img_s"] > 0


def test_in_process_measures_the_same_and_reports_failures(tmp_path, monkeypatch):
    from scripts import benchmark

    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    writes = []
    real_write = benchmark.write_outputs
    monkeypatch.setattr(benchmark, "write_outputs", lambda *a, **k: (writes.append(k.get("quiet", False)),
                                                                     real_write(*a, **k)))
    real_job = benchmark.run_job

    def run_job(job):  # BasicUNet's measurements fail: reported in the table, the run goes on
        if job["model"] == "BasicUNet":
            raise RuntimeError("boom")
        return real_job(job)

    monkeypatch.setattr(benchmark, "run_job", run_job)
    argv = ["--variants", "128s", "--peers", "BasicUNet", "--img-size", "64", "--iters", "1", "--warmup", "0",
            "--repeats", "1", "--batch-sizes", "1", "--threads", "1", "--matmul-size", "64", "--forms",
            "eager_fp32", "cl_bf16", "--in-process", "--json", str(out), "--markdown", str(md)]
    assert benchmark.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["in_process"] is True
    assert report["models"]["LeViT-UNet-128s"]["inference"]["eager_fp32"]["1"]["img_s"] > 0
    assert report["models"]["BasicUNet"]["inference"]["eager_fp32"] == {"error": "RuntimeError: boom"}
    assert writes == [True, True, False]  # rewritten after each model, so a run cut short keeps what it measured
    assert "| LeViT-UNet-128s | eager_fp32 |" in md.read_text()


def test_cuda_graph_forms_are_cuda_only(tmp_path):
    from scripts import benchmark

    job = {"device": "cpu", "threads": 1, "img_size": 64, "batch_sizes": [1], "train_batch": 2, "warmup": 0,
           "iters": 1, "repeats": 1, "min_time": 0.0, "model": "LeViT-UNet-128s", "form": "fused_cl_bf16_graph",
           "task": "infer"}
    assert benchmark.run_in_process(job) == {"error": "ValueError: fused_cl_bf16_graph: CUDA graphs need a CUDA device"}
    out = tmp_path / "b.json"  # on a CPU run they are left out of the table, not reported as failures
    argv = ["--variants", "128s", "--img-size", "64", "--iters", "1", "--warmup", "0", "--repeats", "1",
            "--batch-sizes", "1", "--threads", "1", "--matmul-size", "64", "--in-process", "--train",
            "--train-batch", "2", "--forms", "fused_cl_bf16", "fused_cl_bf16_graph", "cl_bf16_graph", "--json", str(out)]
    assert benchmark.main(argv) == 0
    res = json.loads(out.read_text())["models"]["LeViT-UNet-128s"]
    assert set(res["inference"]) == {"fused_cl_bf16"} and "train" not in res


@pytest.mark.slow
def test_volume_smoke_runs_the_inference_config(tmp_path):
    """--volume on a tiny phantom: the JSON has every stage and the saved labels lie on the input's grid."""
    import nibabel as nib
    import numpy as np

    from scripts.volume_benchmark import STAGES

    out, work = tmp_path / "volume.json", tmp_path / "work"
    cmd = [sys.executable, "-m", "scripts.benchmark", "--volume", "--volume-shape", "64", "64", "6", "--img-size",
           "64", "--threads", "1", "--repeats", "2", "--volume-dir", str(work), "--json", str(out),
           "--markdown", str(tmp_path / "volume.md")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "speed does not depend on the weights" in proc.stdout
    assert "| **peak RSS MB** |" in (tmp_path / "volume.md").read_text()

    report = json.loads(out.read_text())
    assert set(report) == {"environment", "settings", "volume", "weights", "models"}
    assert report["volume"]["shape"] == [64, 64, 6] and report["volume"]["orientation"] == "LPS"
    res = report["models"]["LeViT-UNet-128s"]  # the default variant of --volume
    assert len(res["runs"]) == 2 and res["overrides"]["img_size"] == 64
    assert set(res["stages_s"]) == set(STAGES)
    for run in res["runs"]:
        assert min(run["stages_s"].values()) >= 0 and run["stages_s"]["inference"] > 0
        assert sum(run["stages_s"].values()) == pytest.approx(run["workflow_s"])
        assert run["total_s"] > run["workflow_s"] and run["peak_rss_mb"] > 0
    assert res["peak_rss_mb"] == max(r["peak_rss_mb"] for r in res["runs"])

    image, seg = nib.load(report["volume"]["input"]), nib.load(res["prediction"])
    assert image.shape == seg.shape == (64, 64, 6)
    np.testing.assert_allclose(seg.affine, image.affine, atol=1e-5)
    np.testing.assert_allclose(image.affine, report["volume"]["affine"], atol=1e-6)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # the config's orientation step has work to do
    hu = np.asarray(image.dataobj)
    assert image.get_data_dtype() == np.int16 and hu.min() < -900 and hu.max() > 100  # air and contrast organs
    assert seg.get_data_dtype() == np.uint8 and np.asarray(seg.dataobj).max() <= 8


def test_loader_timing_times_the_training_loader(demo_dir):
    from scripts import loader_timing

    overrides = {"img_size": 32, "samples_per_volume": 2, "batch_size": 4, "num_workers": 0}
    with_meta = loader_timing.time_loader(None, demo_dir / "datalist.json", overrides, epochs=2, skip=1)
    # 8 training volumes, 2 per batch: 4 batches an epoch, 8 in all, the first untimed
    assert with_meta["batches_timed"] == 7 and with_meta["batch_shape"] == (4, 1, 32, 32)
    assert with_meta["ms_per_batch"] > 0 and with_meta["track_meta"] is True
    import monai

    plain = loader_timing.time_loader(None, demo_dir / "datalist.json", overrides, epochs=1, skip=1, track_meta=False)
    assert plain["track_meta"] is False and monai.data.get_track_meta()  # switched back afterwards
    with pytest.raises(ValueError, match="nothing left to time"):
        loader_timing.time_loader(None, demo_dir / "datalist.json", overrides, epochs=1, skip=4)
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        loader_timing.main(["--datalist", str(demo_dir / "datalist.json"), "--set", "img_size"])


def test_op_profile_prices_the_convolution_bound(tmp_path):
    """The operator profile splits a bf16 batch into convolution and other time and derives the bound from it."""
    from scripts import op_profile

    conv = torch.nn.Conv2d(3, 5, 3, padding=1, groups=1)
    assert op_profile.conv_gflop(conv, torch.randn(2, 3, 8, 8)) == pytest.approx(2 * 2 * 5 * 8 * 8 * 3 * 9 / 1e9)
    grouped = torch.nn.Conv2d(4, 4, 3, stride=2, groups=4)
    assert op_profile.conv_gflop(grouped, torch.randn(1, 4, 9, 9)) == pytest.approx(2 * 4 * 4 * 4 * 9 / 1e9)

    r = op_profile.profile_ops("128s", 64, 2, warmup=1, iters=1, profile_iters=1, matmul_size=64)
    assert r["matmul_gflop_s"]["fp32"] > 0 and r["matmul_gflop_s"]["bf16"] > 0
    assert 0 < r["conv_ms"] < r["profiled_ms"] and r["other_ms"] == pytest.approx(r["profiled_ms"] - r["conv_ms"])
    assert r["bound_speedup"] == pytest.approx(r["eager_fp32_ms"] / r["conv_ms"])
    assert r["conv_gflop"] > 0 and any(o["op"] in op_profile.CONV_OPS for o in r["ops"])
    assert op_profile.other_ms_for(r, 1e9) < 0  # no form is a billion times faster
    out = tmp_path / "p.json"
    assert op_profile.main(["--img-size", "64", "--batch", "2", "--iters", "1", "--warmup", "1",
                            "--profile-iters", "1", "--matmul-size", "0", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["goal"] == 2.5 and "scripts.op_profile" in saved["environment"]["command"]
    assert saved["matmul_gflop_s"] == {} and saved["bound_speedup"] > 0
