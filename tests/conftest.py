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
    """Path under ../shared; skips the test (fails it under REQUIRE_SHARED=1) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f"{path} is absent (tests that need the project's shared reference data / scans)"
        if os.environ.get("REQUIRE_SHARED") == "1":
            pytest.fail(f"REQUIRE_SHARED=1 but {reason}")
        pytest.skip(reason)
    return path
