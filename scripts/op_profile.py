"""Where an inference batch's time goes, by operator, and the speed-up over plain fp32 the convolutions allow.

    python -m scripts.op_profile --variant 128s --img-size 224 --batch 8 --threads 2 --json op_profile.json

Times (with freed memory kept for reuse, ``scripts.inferer.retain_freed_memory``, as ``scripts.benchmark``
does) LeViT-UNet's plain ``eager_fp32`` form and the bundle's CPU form ``fused_cl_bf16`` (the forms of
``scripts.benchmark``) per batch, the median of ``--iters`` batches after ``--warmup``, then profiles the bf16 form
(``torch.profiler``, ``--profile-iters`` batches): self time per operator, and the convolutions' share with the
rate they compute at (their FLOPs counted from the layers' shapes). The bound it prints is the speed-up over
eager fp32 that the bf16 form would reach if everything but its convolutions took no time: ``t_fp32 / t_conv``.
A goal above that bound needs fewer or faster convolutions, not less overhead.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from scripts.benchmark import IN_CHANNELS, build_model, environment, measure_ceiling, time_per_iter

CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_overrideable", "aten::_convolution_mode", "aten::thnn_conv2d")


def conv_gflop(model: nn.Module, x: torch.Tensor) -> float:
    """GFLOP of every ``nn.Conv2d`` in one forward of ``x`` (2 per multiply-add), from the output shapes."""
    total = [0.0]

    def hook(module: nn.Conv2d, _inp: Any, out: torch.Tensor) -> None:
        kh, kw = module.kernel_size
        total[0] += 2.0 * out.numel() * (module.in_channels // module.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0] / 1e9


def profile_ops(variant: str, img_size: int, batch: int, warmup: int = 2, iters: int = 5,
                profile_iters: int = 3, top: int = 12, matmul_size: int = 2048) -> Dict[str, Any]:
    """Timings of both forms, the bf16 form's operator breakdown and the convolution bound (ms per batch), with
    the machine's fp32 and bf16 matmul rates (``scripts.benchmark.measure_ceiling``; 0: not measured)."""
    from torch.profiler import ProfilerActivity, profile

    from scripts.inferer import precast_weights

    torch.manual_seed(0)
    x = torch.randn(batch, IN_CHANNELS, img_size, img_size)

    def per_batch(model: nn.Module, inp: torch.Tensor, bf16: bool) -> float:
        def step() -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(inp)

        return statistics.median(time_per_iter(step, warmup, 1, iters, 0.0, lambda: None)) * 1e3

    plain = build_model(f"LeViT-UNet-{variant}", img_size).eval()
    fp32_ms = per_batch(plain, x, False)
    gflop = conv_gflop(plain, x)
    fast = build_model(f"LeViT-UNet-{variant}", img_size).fuse().to(memory_format=torch.channels_last)
    precast_weights(fast, "bf16")
    xc = x.contiguous(memory_format=torch.channels_last)
    bf16_ms = per_batch(fast, xc, True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(profile_iters):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                fast(xc)
    events = prof.key_averages()
    rows = sorted(((e.key, e.self_cpu_time_total / 1e3 / profile_iters, e.count // profile_iters) for e in events
                   if e.self_cpu_time_total > 0), key=lambda r: -r[1])
    profiled_ms = sum(r[1] for r in rows)
    conv_ms = sum(r[1] for r in rows if r[0] in CONV_OPS)
    if conv_ms <= 0:
        raise RuntimeError(f"no convolution operator among the profiled ones ({', '.join(r[0] for r in rows[:5])})")
    ceiling = measure_ceiling(torch.device("cpu"), matmul_size, (1, 3, 3, 0.0)) if matmul_size else {}
    return {
        "matmul_gflop_s": ceiling, "matmul_size": matmul_size,
        "variant": variant, "img_size": img_size, "batch": batch,
        "eager_fp32_ms": fp32_ms, "fused_cl_bf16_ms": bf16_ms, "speedup": fp32_ms / bf16_ms,
        "profiled_ms": profiled_ms, "conv_ms": conv_ms, "conv_share": conv_ms / profiled_ms,
        "other_ms": profiled_ms - conv_ms, "conv_gflop": gflop, "conv_gflop_s": gflop / (conv_ms / 1e3),
        "eager_fp32_conv_gflop_s_at_least": gflop / (fp32_ms / 1e3),
        "bound_speedup": fp32_ms / conv_ms,
        "ops": [{"op": name, "ms": ms, "calls": calls, "share": ms / profiled_ms} for name, ms, calls in rows[:top]],
    }


def other_ms_for(result: Dict[str, Any], goal: float) -> float:
    """Milliseconds per batch the non-convolution work may take for the bf16 form to reach ``goal`` x eager fp32
    (negative: unreachable even at zero)."""
    return result["eager_fp32_ms"] / goal - result["conv_ms"]


def markdown(result: Dict[str, Any], goal: float, env: Optional[Dict[str, Any]] = None) -> str:
    r = result
    lines = [f"- {k}: {v}" for k, v in (env or {}).items() if k in ("date", "command", "git_commit", "torch", "cpu",
                                                                    "threads", "avx512_bf16",
                                                                    "retain_freed_memory")]
    lines += [
        "",
        f"LeViT-UNet-{r['variant']}, {r['img_size']} x {r['img_size']}, batch {r['batch']}: eager fp32 "
        f"{r['eager_fp32_ms']:.0f} ms per batch, fused_cl_bf16 {r['fused_cl_bf16_ms']:.0f} ms: "
        f"**{r['speedup']:.2f}x**.",
        "",
        f"Profiled bf16 batch: {r['profiled_ms']:.0f} ms, of which convolutions {r['conv_ms']:.0f} ms "
        f"({100 * r['conv_share']:.1f} %, {r['conv_gflop']:.0f} GFLOP at {r['conv_gflop_s']:.0f} GFLOP/s; eager fp32 "
        f"runs the same convolutions at {r['eager_fp32_conv_gflop_s_at_least']:.0f} GFLOP/s counting its whole batch "
        f"time). Everything else: {r['other_ms']:.0f} ms.",
    ]
    if r["matmul_gflop_s"]:
        mm = r["matmul_gflop_s"]
        n = r["matmul_size"]
        lines += ["", f"This machine's {n} x {n} matrix product: fp32 {mm['fp32']:.0f}, bf16 {mm['bf16']:.0f} GFLOP/s "
                  f"(bf16 / fp32 = {mm['bf16'] / mm['fp32']:.2f})."]
    lines += [
        "",
        f"Bound (non-convolution work free): **{r['bound_speedup']:.2f}x**. For {goal:g}x the non-convolution work "
        f"would have to take {other_ms_for(r, goal):.0f} ms per batch (it takes {r['other_ms']:.0f}).",
        "",
        "| operator (self time) | ms per batch | calls | share |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {o['op']} | {o['ms']:.1f} | {o['calls']} | {100 * o['share']:.1f} % |" for o in r["ops"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="128s", choices=["128s", "192", "384"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--profile-iters", type=int, default=3)
    p.add_argument("--matmul-size", type=int, default=2048, help="the ceiling's matrix size (0: skip it)")
    p.add_argument("--goal", type=float, default=2.5, help="the speed-up over eager fp32 to price (default 2.5)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from scripts.inferer import retain_freed_memory

    retain_freed_memory()  # as the bundle's inferer and scripts.benchmark: freed memory is reused, not re-faulted
    result = profile_ops(args.variant, args.img_size, args.batch, args.warmup, args.iters, args.profile_iters,
                         matmul_size=args.matmul_size)
    env = environment(argparse.Namespace(device="cpu", no_retain_memory=False), module="scripts.op_profile")
    text = markdown(result, args.goal, env)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "goal": args.goal, **result}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
