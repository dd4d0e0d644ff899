"""scripts/benchmark.py: a tiny run completes and writes the expected JSON (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_benchmark_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "scripts.benchmark", "--variants", "128s", "--img-size", "64", "--iters", "1",
           "--warmup", "0", "--repeats", "1", "--batch-sizes", "1", "--threads", "1", "--matmul-size", "64",
           "--forms", "eager_fp32", "fused_cl_bf16", "cl_bf16", "--train", "--train-batch", "2", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "| LeViT-UNet-128s | fused_cl_bf16 |" in proc.stdout

    report = json.loads(out.read_text())
    assert set(report) == {"environment", "settings", "ceiling_gflops", "models"}
    env = report["environment"]
    for key in ("date", "command", "git_commit", "torch", "threads", "cpu", "mkldnn", "avx512_bf16", "amx_tile"):
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
