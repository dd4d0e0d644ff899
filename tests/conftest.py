"""Shared fixtures: the ``../shared`` folder, which tests skip without unless REQUIRE_SHARED=1."""

from __future__ import annotations

import locale
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LEVIT_SHARED_DIR", REPO.parent / "shared"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# torch >= 2.10 warns that TorchScript is deprecated (the model zoo still exports with it).
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)


@pytest.fixture(autouse=True)
def _environment_locale():
    """Text I/O in the locale of the environment: a native library loaded by an earlier test can switch the
    process to the "C" locale, and Python would then decode the subprocess logs (progress bars) as ASCII."""
    try:
        locale.setlocale(locale.LC_CTYPE, "")
    except locale.Error:
        pass
    yield


def shared_path(*parts: str) -> Path:
    """Path under ../shared; skips the test when it is absent.

    With REQUIRE_SHARED=1 (set by .ci/run) a missing path fails the test wherever the shared folder
    itself exists, so the equivalence and real-data tests cannot silently stop running in CI.
    """
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f"{path} is absent (tests that need the project's shared reference data / scans)"
        if os.environ.get("REQUIRE_SHARED") == "1" and SHARED.is_dir():
            pytest.fail(f"REQUIRE_SHARED=1 and {SHARED} exists, but {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """A small synthetic Synapse-like dataset (8 training, 2 validation, 2 test phantoms of 64x64x8)."""
    from scripts.prepare_data import generate_demo

    out = tmp_path_factory.mktemp("demo")
    generate_demo(out, num_train=8, num_val=2, num_test=2, size=(64, 64, 8), seed=0)
    return out


CONFIGS = REPO / "configs"


def copy_repo(dest: Path) -> Path:
    """A copy of what the bundle tools read and write (configs, docs, scripts, LICENSE, large_files.yml) at
    ``dest``, so that tests may change or break it without touching the repository."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for rel in ("configs", "docs", "scripts"):
        shutil.copytree(REPO / rel, dest / rel, ignore=ignore)
    for rel in ("LICENSE", "large_files.yml"):
        shutil.copy(REPO / rel, dest / rel)
    return dest
IMG = 64  # network input side for the tests (the bundle's default is 224)


def bundle_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", *args, "--meta_file", str(CONFIGS / "metadata.json"),
            "--logging_file", str(CONFIGS / "logging.conf")]


def run(cmd: list[str], cwd: Path = REPO, timeout: int = 1200) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{res.stdout[-4000:]}\nSTDERR:\n{res.stderr[-4000:]}"
    return res


TRAIN_OVERRIDES = ["--img_size", str(IMG), "--batch_size", "16", "--num_workers", "0", "--optimizer_name", "adam",
                   "--learning_rate", "0.003", "--lr_schedule", "constant"]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, demo_dir) -> Path:
    """A bundle root with weights trained for 20 epochs x 4 iterations of 16 demo slices (CPU)."""
    root = tmp_path_factory.mktemp("bundle")
    res = run(bundle_cmd("training", "--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(root),
                         "--dataset_dir", str(demo_dir), "--epochs", "20", "--val_interval", "10", *TRAIN_OVERRIDES))
    (root / "train.log").write_text(res.stdout + res.stderr)
    return root


QUICK = ["--img_size", str(IMG), "--batch_size", "4", "--samples_per_volume", "2", "--num_workers", "0",
         "--val_interval", "1", "--cache_rate", "0.0"]
