"""Speed, size and memory benchmark of LeViT-UNet (and, optionally, MONAI peer networks).

For each model: parameters (M), GMac per image (``torch.utils.flop_counter.FlopCounterMode``: convolutions,
matrix products and attention only; GMac = FLOPs / 2), inference throughput (images/s, the median over
``--repeats`` of the time per iteration after ``--warmup`` iterations) at each ``--batch-sizes`` entry for
several forms, the peak memory of each measurement, and the fraction of the machine's measured matmul
ceiling (fp32 or bf16, by the dtype the form computes in) that the model achieves.

Forms: ``eager_fp32`` (``model.eval()`` under ``torch.inference_mode``), ``fused`` (``model.fuse()``: every
BatchNorm folded), ``fused_cl`` (+ channels_last model and input), ``fused_cl_bf16`` (+ bf16 autocast,
convolution and linear weights cast to bf16 once, ``scripts.inferer.precast_weights``: the form
``LeViTSliceInferer`` runs by default on a CPU with native bf16, ``fused_cl`` on one without). Peers have
no ``fuse()``: they run ``eager_fp32``, ``cl`` and ``cl_bf16`` (weights cast alike). Training (``--train``, forward +
cross-entropy + backward + Adam step on one batch created once on the device, random labels) runs
``eager_fp32`` and ``cl_bf16``; its ceiling fraction counts the measured forward + backward FLOPs. On CUDA only,
``fused_cl_bf16_graph`` / ``cl_bf16_graph`` run the bf16 form captured as a CUDA graph (inference: the whole
forward, :func:`capture_cuda_graph`; training: forward and backward through ``torch.cuda.make_graphed_callables``,
with fused Adam), which removes the per-kernel launch cost that bounds these networks on a fast GPU.

Every (model, form) is measured in a fresh subprocess, so measurements do not share allocator state
(``--in-process``: all in this one, which saves an interpreter and CUDA start per measurement in a short GPU
session); each keeps freed memory for reuse (``scripts.inferer.retain_freed_memory``, as the bundle's inferer and
CPU trainer do; ``--no-retain-memory`` leaves glibc's defaults, for comparison). Peak memory ("peak MB") is the
growth over the memory held once the model is ready (weights, no input): on CPU of the process's peak resident set
(VmHWM, reset before each batch size through ``/proc/self/clear_refs``, after freed memory is handed back with
``malloc_trim``, where the kernel allows, else the process peak ``ru_maxrss``; Linux), on CUDA of
``max_memory_allocated`` over ``memory_allocated``. It covers input, activations, workspaces and, in training,
gradients and Adam state. The batch sizes run in ascending order; ``base_mb`` in the JSON is the level grown from.

Examples (from the bundle root)::

    python -m scripts.benchmark                                   # 3 variants, all forms, batch 1 and 8
    python -m scripts.benchmark --peers --train --json benchmark.json
    python -m scripts.benchmark --peers BasicUNet UNETR --forms eager_fp32 cl_bf16
    python -m scripts.benchmark --device cuda --peers --train --min-time 2
    python -m scripts.benchmark --variants 128s --iters 2 --warmup 1 --threads 2   # smoke run

UNETR and SwinUNETR need ``einops``; a model that cannot be built or run is reported with its error.

``--volume`` times something else: a whole CT-like volume (``--volume-shape``, default 512 x 512 x 150)
segmented through the bundle's inference config (``configs/inference.json`` + the Synapse preset, as
``python -m monai.bundle run`` runs it), per stage and in total, with the peak resident set of the process
doing it; random weights (speed does not depend on them). See ``scripts/volume_benchmark.py``::

    python -m scripts.benchmark --volume --threads 2 --json volume.json              # 128s, 512 x 512 x 150
    python -m scripts.benchmark --volume --volume-shape 512 512 600 --variants 128s 384 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from scripts.provenance import git_info

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ["128s", "192", "384"]
PEERS = ["BasicUNet", "AttentionUnet", "SwinUNETR", "UNETR"]
# form: (BatchNorm folded, channels_last, bf16, CUDA graph)
FORMS: Dict[str, Tuple[bool, bool, bool, bool]] = {
    "eager_fp32": (False, False, False, False),
    "fused": (True, False, False, False),
    "fused_cl": (True, True, False, False),
    "fused_cl_bf16": (True, True, True, False),
    "fused_cl_bf16_graph": (True, True, True, True),
    "cl": (False, True, False, False),
    "cl_bf16": (False, True, True, False),
    "cl_bf16_graph": (False, True, True, True),
}
LEVIT_FORMS = ["eager_fp32", "fused", "fused_cl", "fused_cl_bf16", "fused_cl_bf16_graph"]
PEER_FORMS = ["eager_fp32", "cl", "cl_bf16", "cl_bf16_graph"]
TRAIN_FORMS = ["eager_fp32", "cl_bf16", "cl_bf16_graph"]
IN_CHANNELS, OUT_CHANNELS = 1, 9


def build_model(name: str, img_size: int) -> nn.Module:
    """``LeViT-UNet-<variant>`` or one of the MONAI peers, 1 channel in, 9 classes out."""
    if name.startswith("LeViT-UNet-"):
        from scripts.networks import LeViTUNet

        return LeViTUNet(2, IN_CHANNELS, OUT_CHANNELS, variant=name.rsplit("-", 1)[1], img_size=img_size)
    from monai.networks import nets

    common: Dict[str, Any] = {"spatial_dims": 2, "in_channels": IN_CHANNELS, "out_channels": OUT_CHANNELS}
    if name == "BasicUNet":
        return nets.BasicUNet(**common)
    if name == "AttentionUnet":
        return nets.AttentionUnet(**common, channels=(64, 128, 256, 512, 1024), strides=(2, 2, 2, 2))
    if name == "SwinUNETR":  # monai >= 1.5 infers the size from the input: no img_size argument
        return nets.SwinUNETR(**common, feature_size=48)
    if name == "UNETR":
        return nets.UNETR(**common, img_size=(img_size, img_size))
    raise ValueError(f"unknown model {name!r}")


def model_stats(name: str, img_size: int, train: bool) -> Dict[str, float]:
    """Parameters (M) and GMac per image: inference, and forward + backward + loss when ``train``."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(name, img_size).eval()
    x = torch.randn(1, IN_CHANNELS, img_size, img_size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    out = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "gmac": counter.get_total_flops() / 2e9}
    if train:  # two images: BatchNorm in training needs more than one value per channel
        model.train()
        x2 = torch.randn(2, IN_CHANNELS, img_size, img_size)
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(model(x2), torch.zeros(2, img_size, img_size, dtype=torch.long)).backward()
        out["train_gmac"] = counter.get_total_flops() / 4e9
    return out


def time_per_iter(
    step: Callable[[], Any], warmup: int, iters: int, repeats: int, min_time: float, sync: Callable[[], None]
) -> List[float]:
    """Seconds per ``step`` in each of ``repeats`` runs of at least ``iters`` steps and ``min_time`` seconds."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while n < max(iters, 1) or time.perf_counter() - t0 < min_time:
            step()
            n += 1
        sync()
        times.append((time.perf_counter() - t0) / n)
    return times


def rss_kib() -> Tuple[int, int]:
    """(current, peak) resident set of this process in KiB (Linux)."""
    import resource

    cur = hwm = 0
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return cur, hwm or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def trim_heap() -> None:
    """Hands memory the process freed back to the system (glibc ``malloc_trim``), so that the resident set is
    what is in use: the workers keep freed memory for reuse (``retain_freed_memory``), which would otherwise
    count in the base level and hide the activations that later reuse it."""
    from scripts.inferer import glibc

    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def memory_mb(device: torch.device) -> float:
    """Memory held now: allocated on CUDA, resident set on CPU (MiB; freed memory trimmed first)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) / 2**20
    trim_heap()
    return rss_kib()[0] / 1024


@contextlib.contextmanager
def peak_memory(device: torch.device, base_mb: float) -> Iterator[Dict[str, float]]:
    """Fills ``{"peak_mb": peak memory within the block minus base_mb, "base_mb": base_mb}``."""
    out: Dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        trim_heap()  # the previous batch size's retained memory is not this one's
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    yield out
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = rss_kib()[1] / 1024
    out.update(base_mb=base_mb, peak_mb=max(peak - base_mb, 0.0))


def run_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """One (model, form) measurement: inference at every batch size, or training at ``train_batch``."""
    device = torch.device(job["device"])
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN pick its fastest kernels
    fuse, cl, bf16, graph = FORMS[job["form"]]
    if graph and device.type != "cuda":
        raise ValueError(f"{job['form']}: CUDA graphs need a CUDA device")
    fmt = torch.channels_last if cl else torch.contiguous_format
    size, timing = job["img_size"], (job["warmup"], job["iters"], job["repeats"], job["min_time"], sync)
    torch.manual_seed(0)
    model = build_model(job["model"], size)
    # a captured graph must not rely on autocast's weight-cast cache (its copies would be freed under it)
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not graph)  # noqa: E731
    results: Dict[str, Any] = {}
    if job["task"] == "infer":
        model = (model.fuse() if fuse else model.eval()).to(device, memory_format=fmt)
        if bf16:
            from scripts.inferer import precast_weights

            precast_weights(model, "bf16")
        base = memory_mb(device)
        for b in sorted(job["batch_sizes"]):
            x = torch.randn(b, IN_CHANNELS, size, size, device=device).contiguous(memory_format=fmt)

            def step() -> None:
                with torch.inference_mode(), amp():
                    model(x)

            if graph:
                step = capture_cuda_graph(step)
            with peak_memory(device, base) as mem:
                times = time_per_iter(step, *timing)
            sec = statistics.median(times)
            results[str(b)] = {"img_s": b / sec, "sec_per_iter": sec, "times": times, **mem}
        return results
    model = model.train().to(device, memory_format=fmt)
    # graph form: one fused Adam kernel set instead of per-parameter ones, forward and backward graphed
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=graph or None)
    base = memory_mb(device)
    b = job["train_batch"]
    x = torch.randn(b, IN_CHANNELS, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, OUT_CHANNELS, (b, size, size), device=device)
    if graph:
        with amp():
            model = torch.cuda.make_graphed_callables(model, (x,))

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    with peak_memory(device, base) as mem:
        times = time_per_iter(train_step, *timing)
    sec = statistics.median(times)
    return {str(b): {"img_s": b / sec, "sec_per_iter": sec, "times": times, **mem}}


def capture_cuda_graph(step: Callable[[], Any]) -> Callable[[], None]:
    """``step`` (fixed inputs, no host synchronisation) captured once as a CUDA graph; returns its replay.

    A LeViT-UNet forward is a few hundred small kernels: on a fast GPU their launches, not their arithmetic,
    set the pace (about 11 ms per forward of 128s on an H200 at batch 1 and at batch 8 alike). A graph launches
    them all at once.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires (cuDNN picks its kernels)
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def run_in_process(job: Dict[str, Any]) -> Dict[str, Any]:
    """``run_job`` here (``--in-process``); ``{"error": ...}`` when it fails. Saves an interpreter start per
    measurement; on CUDA the peak memory is reset per batch size anyway, and the cached blocks are released."""
    try:
        return run_job(job)
    except Exception as e:  # noqa: BLE001 - report it in the table and go on
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_in_subprocess(job: Dict[str, Any]) -> Dict[str, Any]:
    """``run_job`` in a fresh interpreter; ``{"error": ...}`` when it fails."""
    threads = str(job["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "scripts.benchmark", "--worker", json.dumps(job), "--worker-out", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return {"error": next((ln for ln in reversed(lines) if ln.strip()), f"exit status {proc.returncode}")}
        return json.loads(out.read_text())


def measure_ceiling(device: torch.device, size: int, timing: Tuple[int, int, int, float]) -> Dict[str, float]:
    """Best-of-repeats GFLOP/s of a ``size`` x ``size`` matrix product in fp32 and bf16."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    warmup, iters, repeats, min_time = timing
    out = {}
    for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        times = time_per_iter(lambda: torch.mm(a, b), max(warmup, 1), iters, repeats, min_time, sync)
        out[key] = 2 * size**3 / min(times) / 1e9
    return out


def _load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages (other work on the machine skews the timings), where known."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def environment(args: argparse.Namespace, module: str = "scripts.benchmark") -> Dict[str, Any]:
    """Date, command line (``python -m <module> ...``), git commit, versions, threads, CPU / GPU model and native
    bf16 support."""
    cpu = None
    with contextlib.suppress(OSError):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        cpu = names[0] if names else None
    try:
        import monai

        monai_version: Optional[str] = monai.__version__
    except ImportError:
        monai_version = None
    env: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", module, *sys.argv[1:]]),
        "git_commit": git_info()["commit"],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "monai": monai_version,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "load_average": _load_average(),
        "retain_freed_memory": args.device == "cpu" and not args.no_retain_memory,
    }
    for flag in ("avx512_bf16", "amx_tile"):
        probe = getattr(torch.cpu, f"_is_{flag}_supported", None)
        env[flag] = bool(probe()) if probe is not None else None
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return env


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: Dict[str, Any], batch_sizes: List[int], train_batch: int) -> str:
    top = str(max(batch_sizes))
    head = ["model", "form", *(f"b{b} img/s" for b in batch_sizes), f"x eager_fp32 (b{top})", "params M", "GMac"]
    head += [f"% ceiling (b{top})", f"peak MB (b{top})"]
    lines: List[str] = []
    train_rows = []
    for name, res in results.items():
        if "error" in res:
            lines.append(f"| {name} | - | error: {res['error']} |")
            continue
        for form, per_batch in res["inference"].items():
            if "error" in per_batch:
                lines.append(f"| {name} | {form} | error: {per_batch['error']} |")
                continue
            r = per_batch[top]
            eager = res["inference"].get("eager_fp32", {}).get(top, {}).get("img_s")
            cells = [name, form, *(_fmt(per_batch[str(b)]["img_s"]) for b in batch_sizes)]
            cells.append(_fmt(r["img_s"] / eager, 2) if eager else "-")
            cells += [_fmt(res["params_m"], 2), _fmt(res["gmac"], 2), _fmt(r["ceiling_pct"]), _fmt(r["peak_mb"], 0)]
            lines.append("| " + " | ".join(cells) + " |")
        for form, per_batch in res.get("train", {}).items():
            r = per_batch.get(str(train_batch), per_batch)
            if "error" in r:
                cells = [name, form, f"error: {r['error']}"]
            else:
                eager = res["train"].get("eager_fp32", {}).get(str(train_batch), {}).get("img_s")
                cells = [name, form, _fmt(r["img_s"], 2), _fmt(r["img_s"] / eager, 2) if eager else "-"]
                cells += [_fmt(res["train_gmac"], 2)]
                cells += [_fmt(r["ceiling_pct"]), _fmt(r["peak_mb"], 0)]
            train_rows.append("| " + " | ".join(cells) + " |")
    if lines:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines]
    if train_rows:
        lines += ["", f"Training, batch {train_batch} (forward + cross-entropy + backward + Adam step):", ""]
        lines += ["| model | form | img/s | x eager_fp32 | train GMac/img | % ceiling | peak MB |", "|" + "---|" * 7]
        lines += train_rows
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="*", default=None, choices=VARIANTS,
                   help="LeViT-UNet variants (default: all three; with --volume: 128s)")
    p.add_argument("--peers", nargs="*", choices=PEERS, default=None, help="MONAI peers; bare --peers = all of them")
    p.add_argument("--forms", nargs="*", choices=list(FORMS), default=None, help="only these forms (default all)")
    p.add_argument("--train", action="store_true", help="also measure training throughput")
    p.add_argument("--no-inference", action="store_true",
                   help="with --train: training only (e.g. a second, shorter run after the inference one)")
    p.add_argument("--train-variants", nargs="*", default=["128s"], choices=VARIANTS, help="variants --train trains")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--img-size", type=int, default=224, help="input side (224; smaller only for smoke runs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default cpu_count)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations before each measurement")
    p.add_argument("--iters", type=int, default=20, help="minimum timed iterations per repeat")
    p.add_argument("--min-time", type=float, default=0.0, help="minimum seconds per repeat")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measurement (median reported; ceiling: best)")
    p.add_argument("--matmul-size", type=int, default=None, help="ceiling matmul side (CPU 2048, CUDA 8192)")
    p.add_argument("--json", type=Path, default=None, help="write every figure and the environment here")
    p.add_argument("--markdown", type=Path, default=None, help="write the environment and the tables here")
    p.add_argument("--volume", action="store_true", help="time whole-volume inference through configs/inference.json")
    p.add_argument("--volume-shape", nargs=3, type=int, default=[512, 512, 150], metavar=("X", "Y", "Z"),
                   help="--volume: voxels, axial slices along Z (default 512 512 150)")
    p.add_argument("--volume-dir", type=Path, default=None,
                   help="keep the phantom, bundle root, predictions and logs here (default: a temporary folder)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="--volume: slices per network call (config: 8)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="--volume: the config's infer_precision (config: auto)")
    p.add_argument("--no-retain-memory", action="store_true",
                   help="leave glibc malloc at its defaults (the bundle keeps freed memory: retain_freed_memory)")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process instead of a fresh one per (model, form): faster to run (e.g. in "
                        "a short GPU session), at the price of shared allocator state")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_outputs(args: argparse.Namespace, report: Dict[str, Any], text: str, quiet: bool = False) -> None:
    """``--json``: the whole report; ``--markdown``: the printed environment and tables. Both record the load
    average at the end next to the one at the start (``environment.load_average``)."""
    report["environment"]["load_average_end"] = _load_average()
    text += f"\n\n- load average (1, 5, 15 min) at the end: {report['environment']['load_average_end']}"
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        if not quiet:
            print(f"\nwrote {args.json}", file=sys.stderr)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")
        if not quiet:
            print(f"wrote {args.markdown}", file=sys.stderr)


def main_volume(args: argparse.Namespace, env: Dict[str, Any]) -> int:
    """``--volume``: whole-volume inference through the bundle's inference config."""
    from scripts.volume_benchmark import run_volume_benchmark, volume_markdown

    report = run_volume_benchmark(
        args.volume_shape, args.variants or ["128s"], args.img_size, args.threads, args.repeats,
        args.sw_batch_size, args.precision, args.volume_dir,
    )
    settings = {"img_size": args.img_size, "threads": args.threads, "repeats": args.repeats,
                "sw_batch_size": args.sw_batch_size, "precision": args.precision}
    table = volume_markdown(report)
    print(table)
    write_outputs(args, {"environment": env, "settings": settings, **report}, environment_markdown(env) + table)
    return 0


def environment_markdown(env: Dict[str, Any], ceiling: Optional[Dict[str, float]] = None) -> str:
    text = "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n\n"
    if ceiling is not None:
        text += f"- matmul ceiling GFLOP/s: fp32 {ceiling['fp32']:.1f}, bf16 {ceiling['bf16']:.1f}\n\n"
    return text


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.no_inference and not args.train:
        raise SystemExit("--no-inference needs --train (there would be nothing to measure)")
    if args.worker:  # one measurement, in its own interpreter
        job = json.loads(args.worker)
        torch.set_num_threads(job["threads"])
        if job.get("retain_memory", True) and job["device"] == "cpu":
            from scripts.inferer import retain_freed_memory

            retain_freed_memory()  # process-wide, as the bundle's inferer and trainer set it: every model gets it
        args.worker_out.write_text(json.dumps(run_job(job)))
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    env = environment(args)
    print(environment_markdown(env), flush=True)
    if args.volume:
        return main_volume(args, env)
    timing = (args.warmup, args.iters, args.repeats, args.min_time)
    ceiling = measure_ceiling(device, args.matmul_size or (8192 if device.type == "cuda" else 2048), timing)
    print(f"- matmul ceiling GFLOP/s: fp32 {ceiling['fp32']:.1f}, bf16 {ceiling['bf16']:.1f}\n", flush=True)

    models = [(f"LeViT-UNet-{v}", LEVIT_FORMS, v in args.train_variants) for v in args.variants or VARIANTS]
    models += [(name, PEER_FORMS, True) for name in (PEERS if args.peers == [] else args.peers or [])]
    if args.no_inference:
        models = [m for m in models if m[2]]
    job_base = {k: getattr(args, k) for k in ("device", "threads", "img_size", "batch_sizes", "train_batch")}
    job_base.update(warmup=args.warmup, iters=args.iters, repeats=args.repeats, min_time=args.min_time,
                    retain_memory=not args.no_retain_memory)
    settings = {k: v for k, v in job_base.items() if k not in ("device", "threads")}
    settings["in_process"] = args.in_process
    results: Dict[str, Any] = {}

    def write_so_far(quiet: bool) -> str:
        table = markdown(results, sorted(args.batch_sizes), args.train_batch)
        report = {"environment": env, "settings": settings, "ceiling_gflops": ceiling, "models": results}
        write_outputs(args, report, environment_markdown(env, ceiling) + table, quiet=quiet)
        return table

    t_start = time.perf_counter()
    for name, forms, trains in models:
        print(f"[benchmark] {time.perf_counter() - t_start:6.1f} s {name}: counting", file=sys.stderr, flush=True)
        try:
            res: Dict[str, Any] = {**model_stats(name, args.img_size, args.train and trains), "inference": {}}
        except Exception as e:  # noqa: BLE001 - e.g. a peer needing einops: report it and go on
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
            continue
        tasks = [] if args.no_inference else [("infer", f) for f in forms]
        tasks += [("train", f) for f in TRAIN_FORMS] if args.train and trains else []
        for task, form in tasks:
            if args.forms is not None and form not in args.forms:
                continue
            if FORMS[form][3] and device.type != "cuda":  # CUDA graphs: not a CPU form
                continue
            print(f"[benchmark] {time.perf_counter() - t_start:6.1f} s {name}: {task} {form}", file=sys.stderr, flush=True)
            job = {**job_base, "model": name, "form": form, "task": task}
            out = run_in_process(job) if args.in_process else run_in_subprocess(job)
            gmac = res["gmac"] if task == "infer" else res["train_gmac"]
            for r in out.values() if "error" not in out else []:
                r["ceiling_pct"] = 100 * gmac * 2 * r["img_s"] / ceiling["bf16" if FORMS[form][2] else "fp32"]
            res.setdefault("inference" if task == "infer" else "train", {})[form] = out
        best = {f: r[str(max(args.batch_sizes))]["img_s"] for f, r in res["inference"].items() if "error" not in r}
        res["best_inference_form"] = max(best, key=best.__getitem__) if best else None
        results[name] = res
        write_so_far(quiet=True)  # after each model: a run stopped at a time limit keeps what it measured

    print(write_so_far(quiet=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
