"""Atomic file output: write under a temporary name beside the target, rename into place when complete."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_output"]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a hidden temporary path beside ``path`` with the same extension (``.nii.gz`` kept whole, so
    writers that choose the format by extension still work); renames it to ``path`` when the block
    completes and removes it when the block fails, so ``path`` is never left half written.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if final.name.endswith(".nii.gz") else final.suffix
    stem = final.name[: len(final.name) - len(suffix)]
    tmp = final.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
