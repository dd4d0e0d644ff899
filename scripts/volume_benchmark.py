"""Whole-volume inference timed through the bundle's inference config (``python -m scripts.benchmark --volume``).

A synthetic CT-like volume (HU values, int16, the body phantom of ``scripts.prepare_data`` stretched along the
axial axis to the requested depth, 0.75 x 0.75 x 2.5 mm in LPS voxel order as scanner conversions often write
it) is saved as NIfTI in a work folder, next to a bundle root whose ``models/model.pt`` holds random (untrained,
seeded) LeViT-UNet weights: speed does not depend on the weights. ``configs/inference.json`` with the Synapse
preset (``configs/synapse.json``) then runs in a fresh interpreter exactly as ``python -m monai.bundle run``
runs it (``monai.bundle.create_workflow``, ``run``, ``finalize``): load, orientation to RAS, intensity window,
slice-by-slice inference (``LeViTSliceInferer``, its default fast form), inversion to the input's grid, save.

The worker times its stages (hooks on the objects the config built, nothing changed in what they compute):

- ``setup``: config parsing and instantiation (network built, transforms, handlers);
- ``load_weights``: from the workflow's start to the end of the engine's ``STARTED`` event (``CheckpointLoader``);
- ``read``: ``LoadImaged`` (NIfTI decompression);
- ``preprocess``: the rest of the data loader's batch (channel first, orientation, intensity, collate);
- ``inference``: the slice inferer call (fast form built from the loaded weights, resize, network, argmax);
- ``invert``: ``Invertd`` (back to the input's orientation); ``save``: ``SaveImaged``;
- ``other``: the remainder of the workflow (engine events, other handlers, ``finalize``).

``total_s`` is the wall time of the whole worker process (interpreter start and imports included), the time a
user's ``monai.bundle run`` command takes; ``workflow_s`` is the workflow alone (setup to finalize). The peak
resident set (``VmHWM``) is the worker's own, read when it ends: the process that did the inference, nothing
else. Each repeat is a fresh process.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SPACING = (0.75, 0.75, 2.5)  # mm: a typical abdominal CT
PHANTOM_DEPTH = 32  # slices of the phantom before it is stretched to the requested depth
STAGES = ["setup", "load_weights", "read", "preprocess", "inference", "invert", "save", "other"]
WEIGHTS_NOTE = "random (untrained, seeded) weights: speed does not depend on the weights"

__all__ = ["STAGES", "write_ct_phantom", "write_random_weights", "run_volume_benchmark", "volume_markdown"]


def write_ct_phantom(path: Path, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """Writes a CT-like int16 HU volume of ``shape`` (X, Y, Z) as NIfTI in LPS voxel order; returns its affine.

    The body phantom of :func:`scripts.prepare_data.make_demo_volume` (air, soft tissue, eight organs, noise)
    is drawn on ``PHANTOM_DEPTH`` slices and stretched along Z (nearest slice), so a deep volume costs no more
    memory to make than the volume itself.
    """
    import nibabel as nib

    from scripts.prepare_data import make_demo_volume

    nx, ny, nz = (int(s) for s in shape)
    base, _ = make_demo_volume(np.random.default_rng(seed), (nx, ny, min(nz, PHANTOM_DEPTH)))
    index = np.round(np.linspace(0, base.shape[2] - 1, nz)).astype(int)
    hu = np.clip(np.round(base), -1024, 3071).astype(np.int16)[:, :, index]
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # L->R and P->A flipped: LPS voxel axes
    affine[:3, 3] = [SPACING[0] * (nx - 1) / 2, SPACING[1] * (ny - 1) / 2, -SPACING[2] * (nz - 1) / 2]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu, affine), str(path))
    return affine


def write_random_weights(path: Path, variant: str, img_size: int, num_classes: int = 9, seed: int = 0) -> None:
    """Saves a bare state_dict of a randomly initialised LeViT-UNet (what training writes, untrained)."""
    import torch

    from scripts.networks import LeViTUNet

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(LeViTUNet(2, 1, num_classes, variant=variant, img_size=img_size).state_dict(), path)


class _Timed:
    """Calls ``fn`` and adds the seconds it took to ``times[key]``."""

    def __init__(self, fn: Callable[..., Any], times: Dict[str, float], key: str) -> None:
        self.fn, self.times, self.key = fn, times, key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.times[self.key] += time.perf_counter() - t0


def _instrument(parser: Any, times: Dict[str, float], marks: Dict[str, float]) -> None:
    """Timing hooks on the evaluator, its inferer and transforms, as the config built them.

    Only ``LoadImaged`` is wrapped in the preprocessing (``Invertd`` inverts that chain, so its invertible
    transforms stay as they are); the postprocessing chain is not inverted, so each of its transforms is.
    """
    from ignite.engine import Events
    from monai.transforms import Invertd, LoadImaged, SaveImaged

    evaluator = parser.get_parsed_content("evaluator")
    evaluator.inferer = _Timed(evaluator.inferer, times, "inference")
    pre = parser.get_parsed_content("preprocessing")
    pre.transforms = tuple(_Timed(t, times, "read") if isinstance(t, LoadImaged) else t for t in pre.transforms)
    post = parser.get_parsed_content("postprocessing")
    names = {Invertd: "invert", SaveImaged: "save"}
    post.transforms = tuple(_Timed(t, times, names.get(type(t), "other")) for t in post.transforms)

    def started(_: Any) -> None:
        times["load_weights"] += time.perf_counter() - marks["run"]

    def batch_started(_: Any) -> None:
        marks["batch"], marks["read_before"] = time.perf_counter(), times["read"]

    def batch_completed(_: Any) -> None:
        elapsed = time.perf_counter() - marks["batch"]
        times["preprocess"] += elapsed - (times["read"] - marks["read_before"])

    evaluator.add_event_handler(Events.STARTED, started)  # after the config's CheckpointLoader: registered later
    evaluator.add_event_handler(Events.GET_BATCH_STARTED, batch_started)
    evaluator.add_event_handler(Events.GET_BATCH_COMPLETED, batch_completed)


def volume_worker(job: Dict[str, Any]) -> Dict[str, Any]:
    """Runs the inference config on ``job["input"]`` as ``monai.bundle run`` does; stage seconds and peak RSS."""
    from monai.bundle import create_workflow

    from scripts.benchmark import rss_kib

    times: Dict[str, float] = defaultdict(float)
    marks: Dict[str, float] = {}
    t0 = time.perf_counter()
    configs = [str(CONFIGS / "inference.json"), str(CONFIGS / "synapse.json")]
    workflow = create_workflow(config_file=configs, meta_file=str(CONFIGS / "metadata.json"),
                               logging_file=str(CONFIGS / "logging.conf"), **job["overrides"])
    _instrument(workflow.parser, times, marks)
    times["setup"] = time.perf_counter() - t0
    marks["run"] = time.perf_counter()
    workflow.run()
    workflow.finalize()
    workflow_s = time.perf_counter() - t0
    times["other"] = workflow_s - sum(v for k, v in times.items() if k != "other")  # wrapped ones included
    peak_rss_mb = rss_kib()[1] / 1024  # VmHWM (ru_maxrss where /proc lacks it): this process's peak
    return {"workflow_s": workflow_s, "stages_s": {k: times[k] for k in STAGES}, "peak_rss_mb": peak_rss_mb}


def _run_worker(job: Dict[str, Any], log: Path) -> Dict[str, Any]:
    """``volume_worker`` in a fresh interpreter; adds ``total_s`` (the process's wall time)."""
    threads = str(job["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    out = log.with_suffix(".json")
    cmd = [sys.executable, "-m", "scripts.volume_benchmark", json.dumps(job), str(out)]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    total = time.perf_counter() - t0
    if proc.returncode != 0 or not out.exists():
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        raise RuntimeError(f"volume inference failed (exit {proc.returncode}): {lines[-1] if lines else ''} (log {log})")
    return {"total_s": total, **json.loads(out.read_text())}


@contextlib.contextmanager
def _work_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="levit_volume_") as tmp:
        yield Path(tmp)


def run_volume_benchmark(
    shape: Sequence[int],
    variants: Sequence[str],
    img_size: int = 224,
    threads: int = 1,
    repeats: int = 1,
    sw_batch_size: int | None = None,
    precision: str | None = None,
    work_dir: Path | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> Dict[str, Any]:
    """Times ``repeats`` fresh-process runs of the inference config per variant on one phantom of ``shape``.

    ``work_dir`` keeps the input (``input/ct_phantom.nii.gz``), the bundle root with its weights, the
    predictions and the worker logs (a temporary folder, removed at the end, when ``None``).
    ``sw_batch_size`` and ``precision`` override the config's (``None``: the config's own).
    """
    results: Dict[str, Any] = {}
    with _work_dir(work_dir) as work:
        image = work / "input" / "ct_phantom.nii.gz"
        log(f"[volume] writing a {tuple(shape)} CT phantom to {image}")
        affine = write_ct_phantom(image, shape)
        for variant in variants:
            root = work / f"bundle_{variant}"
            write_random_weights(root / "models" / "model.pt", variant, img_size)
            overrides: Dict[str, Any] = {"bundle_root": str(root), "input": str(image), "variant": variant,
                                         "img_size": img_size, "output_dir": str(root / "predictions"),
                                         "overwrite": True}
            if sw_batch_size is not None:
                overrides["sw_batch_size"] = sw_batch_size
            if precision is not None:
                overrides["infer_precision"] = precision
            runs: List[Dict[str, Any]] = []
            for i in range(repeats):
                log(f"[volume] LeViT-UNet-{variant}: run {i + 1}/{repeats}")
                runs.append(_run_worker({"threads": threads, "overrides": overrides}, root / f"run{i}.log"))
            prediction = root / "predictions" / "ct_phantom_seg.nii.gz"
            results[f"LeViT-UNet-{variant}"] = {
                "overrides": overrides,
                "runs": runs,
                "total_s": statistics.median(r["total_s"] for r in runs),
                "workflow_s": statistics.median(r["workflow_s"] for r in runs),
                "stages_s": {k: statistics.median(r["stages_s"][k] for r in runs) for k in STAGES},
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "prediction": str(prediction) if work_dir is not None else None,
            }
    volume = {"shape": [int(s) for s in shape], "dtype": "int16", "spacing_mm": list(SPACING), "orientation": "LPS",
              "input": str(image) if work_dir is not None else None, "affine": affine.tolist()}
    return {"volume": volume, "weights": WEIGHTS_NOTE, "models": results}


def volume_markdown(report: Dict[str, Any]) -> str:
    """Seconds per stage (median over repeats) and the peak resident set, one column per model."""
    models = report["models"]
    shape = " x ".join(str(s) for s in report["volume"]["shape"])
    head = ["stage", *models]
    lines = [f"Volume {shape} ({report['volume']['dtype']} HU, {report['volume']['orientation']}); "
             f"{report['weights']}.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [(f"{k} s", [m["stages_s"][k] for m in models.values()]) for k in STAGES]
    rows += [("workflow s", [m["workflow_s"] for m in models.values()]),
             ("**total s** (process)", [m["total_s"] for m in models.values()]),
             ("slices / s (total)", [report["volume"]["shape"][2] / m["total_s"] for m in models.values()]),
             ("**peak RSS MB**", [m["peak_rss_mb"] for m in models.values()])]
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" if v < 1000 else f"{v:.0f}" for v in values) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # worker entry: python -m scripts.volume_benchmark JOB_JSON OUT_JSON
    result = volume_worker(json.loads(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(result))
