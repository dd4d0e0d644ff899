"""Shared fixtures: the ``../shared`` folder, which tests skip without unless REQUIRE_SHARED=1."""

from __future__ import annotations

import os
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
