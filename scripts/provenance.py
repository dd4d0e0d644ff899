"""Which code produced a results file: the git commit of this checkout."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Dict

REPO = Path(__file__).resolve().parents[1]


def git_info() -> Dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository these scripts live in.

    ``LEVIT_UNET_COMMIT``, where set, is taken instead: a copy of the working tree sent to another machine (e.g. a
    GPU one) may carry no ``.git``, or a stale one, and only the sender knows the commit it was made from.
    """
    if os.environ.get("LEVIT_UNET_COMMIT"):
        return {"commit": os.environ["LEVIT_UNET_COMMIT"], "dirty": None}

    def git(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("diff", "--quiet", "HEAD", "--")
    except OSError:
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip() or None, "dirty": {0: False, 1: True}.get(dirty.returncode)}
