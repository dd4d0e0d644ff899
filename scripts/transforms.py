"""Transforms the bundle's configs use beside MONAI's own."""

from __future__ import annotations

from typing import Any

from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.transforms import Compose

__all__ = ["UntrackedCompose"]


def _plain(data: Any) -> Any:
    """``data`` with every MetaTensor (in dicts, lists, tuples) replaced by the plain tensor it holds."""
    if isinstance(data, MetaTensor):
        return data.as_tensor()
    if isinstance(data, dict):
        return {k: _plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_plain(v) for v in data)
    return data


class UntrackedCompose(Compose):
    """A ``Compose`` whose transforms run on plain tensors, with MONAI's meta-data tracking off while they run.

    For the per-batch random part of a training chain, whose outputs go to the network and nowhere else: nothing
    there is inverted or saved, so the affine and the transform stack every MONAI transform otherwise records
    (and copies) on each call are pure cost. On the ACDC cpu profile's loader that bookkeeping is about half of the
    time per batch (``python -m scripts.loader_timing ... [--no-meta]``, ``docs/results/acdc_experiments.md``).
    The arithmetic is the same: with the same random state the output tensors equal those of a plain ``Compose``
    (tested). Tracking is restored on return, also when a transform raises, so validation and inference in the
    same process keep their meta data. The chain is random for ``CacheDataset`` (a ``Compose`` is
    ``Randomizable``): everything before it is cached, everything in it runs per batch.

    Args:
        transforms, map_items, unpack_items, log_stats, lazy, overrides: as ``monai.transforms.Compose``.
    """

    def __call__(self, input_, start=0, end=None, threading=False, lazy: bool | None = None):
        previous = get_track_meta()
        set_track_meta(False)
        try:
            return super().__call__(_plain(input_), start=start, end=end, threading=threading, lazy=lazy)
        finally:
            set_track_meta(previous)
