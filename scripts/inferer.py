"""Inferers of the bundle: slice-by-slice LeViT-UNet inference on volumes, and autocast for training.

:class:`LeViTSliceInferer` is the one path every volume takes (validation, evaluation, inference,
MONAI Label): axial slices are resized in-plane to the network's ``img_size`` (bicubic, as the
training slices), segmented, the argmax taken at the network's resolution, and the label map (not
the logits) brought back to the slice's own size with nearest-neighbour, as the papers' protocol does.
The output is a one-channel label volume, so memory stays near the volume's own size.

The fast inference form (BatchNorm folded, channels_last, bf16 autocast where the processor has
native bf16, with the convolution and linear weights cast to bf16 once rather than by autocast at every
call) is built from the network it is handed, at call time, i.e. after the weights are loaded: the
configs keep ``network_def`` the plain network.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ctypes.util
import platform
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.inferers import Inferer, SliceInferer

__all__ = ["LeViTSliceInferer", "AutocastInferer", "resolve_precision", "fast_inference_form", "precast_weights",
           "autocast", "glibc", "retain_freed_memory"]

IMAGE_MODE = "bicubic"  # in-plane resize of image slices (TransUNet zooms with cubic splines)
LABEL_MODE = "nearest-exact"  # label maps, pixel-centre aligned like the image resize
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512-BF16 or AMX): bf16 is then faster than fp32."""
    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(c is not None and c() for c in checks)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit for M_MMAP_THRESHOLD on 64-bit systems
_allocator_tuned = False


@functools.lru_cache(maxsize=None)
def glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc on Linux (``mallopt``, ``malloc_trim``), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Makes glibc's ``malloc`` keep freed memory for reuse; returns whether the setting is in force.

    By default glibc serves large blocks with fresh ``mmap`` pages and gives freed memory back to the system,
    so every forward pass on the CPU page-faults its activations in again, and the kernel zeroes each page.
    With the mmap threshold at its maximum (32 MiB; larger blocks are still mapped afresh) and trimming off,
    the next pass reuses the pages of the previous one. glibc raises its threshold by itself after freeing
    mapped blocks (its dynamic mmap threshold), sometimes in time for the next passes and sometimes not: two
    passes of LeViT-UNet-128s at 128 px, batch 8, page-faulted 0, 26 626 or 51 138 times in three processes
    (``tests/test_network.py``'s script, 2026-11-30); setting it makes the reuse certain. Measured on this project's 2-core machine (an ad hoc A/B
    script, fresh processes, 2026-11-29; ``python -m scripts.benchmark`` with and without
    ``--no-retain-memory`` makes the same comparison), LeViT-UNet-128s at 224 px, batch 8, in the bf16 inference form: page faults
    per forward 29 800 -> 14 100, and 11.1-12.1 -> 12.1-12.4 images/s (2 threads, five processes each;
    medians 11.6 -> 12.2); those processes' own peak resident sets did not grow (740-827 -> 740-753 MB). A training
    step at 128 px faults 27 000 -> 600 times. Turning ``mmap`` off altogether (``M_MMAP_MAX`` 0) removes the
    remaining faults but ran the bf16 form slower (12.0 images/s), so it is not done. The cost is memory: what
    the process freed stays mapped to it until it exits, and freed blocks are not all reused, so the peak of a
    batch-8 forward over the loaded model rose from 195 to 237 MB (128s) and from 106 to 339 MB (384) in the
    benchmark (``docs/results/benchmark_cpu.md``, commits 0784652 and 6b9150e); whole volumes' peaks did not
    move. Linux with glibc only (elsewhere it does nothing and returns False); applies to the whole process;
    idempotent.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    libc = glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    _allocator_tuned = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    return _allocator_tuned


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bf16"`` on CUDA with bf16 or a CPU with native bf16, else ``"fp32"``."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device | str, precision: str, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op context for fp32)."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision], cache_enabled=cache_enabled)


# layers whose weights autocast casts to the lower precision at every call (CPU and CUDA autocast lists)
AUTOCAST_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def precast_weights(network: nn.Module, precision: str) -> nn.Module:
    """Casts, in place, the weights and biases of every convolution and linear layer to ``precision``'s dtype.

    Under autocast these layers run in that dtype anyway: autocast casts their fp32 parameters at every call
    (its cache lives only as long as one autocast block), so casting them once gives bit-identical outputs
    without the per-call copies, and halves the weights' memory. Other parameters (attention biases, norms)
    stay fp32, as autocast treats them. The result must run under autocast; fp32 leaves it unchanged.
    """
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return network
    for layer in network.modules():
        if isinstance(layer, AUTOCAST_LAYERS):
            for name in ("weight", "bias"):
                param = getattr(layer, name, None)
                if isinstance(param, nn.Parameter):
                    param.data = param.data.to(dtype)  # keeps the memory format (channels_last stays)
    return network


def fast_inference_form(network: nn.Module, channels_last: bool = True, precision: str = "fp32") -> nn.Module:
    """The network with BatchNorm folded (a copy, when it has ``fuse()``), in channels_last layout, and with
    its convolution / linear weights cast once to the autocast dtype of ``precision`` (:func:`precast_weights`).

    Networks without ``fuse()`` (a DDP wrapper, a scripted model) and networks in training mode are returned
    unchanged: the caller's own network is never modified.
    """
    if not hasattr(network, "fuse") or network.training:
        return network
    fused = network.fuse()
    fused = fused.to(memory_format=torch.channels_last) if channels_last else fused
    return precast_weights(fused, precision)


class LeViTSliceInferer(SliceInferer):
    """Axial slice-by-slice inference of a 2D segmentation network on ``(B, C, H, W, D)`` volumes.

    Args:
        img_size: the network's input side; slices are resized to it and back.
        num_classes: unused by the computation; kept so configs document the output's label range.
        sw_batch_size: slices per network call.
        spatial_dim: the sliding axis among ``H, W, D``: 2 = the last axis, the axial slices of a volume
            in RAS orientation.
        precision: ``"auto"`` (bf16 where fast, else fp32), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        fuse: run the fast inference form (folded BatchNorm, channels_last) built after loading; on the
            CPU also keep freed memory for the next slices (:func:`retain_freed_memory`).
        output: ``"label"`` for the argmax label map (1 channel) or ``"prob"`` for softmax
            probabilities resized bilinearly (C channels; more memory).
        sw_device, device, progress: as in ``SlidingWindowInferer`` (keep the volume on ``device="cpu"``
            and send slices to ``sw_device`` to infer volumes larger than the GPU).
    """

    def __init__(
        self,
        img_size: int = 224,
        sw_batch_size: int = 8,
        spatial_dim: int = 2,
        precision: str = "auto",
        fuse: bool = True,
        output: str = "label",
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        num_classes: int | None = None,
    ) -> None:
        if output not in ("label", "prob"):
            raise ValueError(f"output must be 'label' or 'prob', got {output!r}")
        super().__init__(
            spatial_dim=spatial_dim,
            roi_size=(-1, -1),
            sw_batch_size=sw_batch_size,
            overlap=0.0,
            mode="constant",
            sw_device=sw_device,
            device=device,
            progress=progress,
        )
        self.img_size = img_size
        self.precision = precision
        self.fuse = fuse
        self.output = output
        self.num_classes = num_classes

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if inputs.dim() != 5:
            raise ValueError(f"LeViTSliceInferer expects a (B, C, H, W, D) volume, got shape {tuple(inputs.shape)}")
        device = self.sw_device if self.sw_device is not None else inputs.device
        precision = resolve_precision(self.precision, device)
        if self.fuse and torch.device(device).type == "cpu":
            retain_freed_memory()
        fast = self.fuse and isinstance(network, nn.Module)
        net = fast_inference_form(network, precision=precision) if fast else network
        channels_last = self.fuse and net is not network

        def predict(x: torch.Tensor) -> torch.Tensor:
            size = x.shape[-2:]
            if tuple(size) != (self.img_size, self.img_size):
                x = F.interpolate(x, size=(self.img_size, self.img_size), mode=IMAGE_MODE, align_corners=False)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(x.device, precision):
                logits = net(x)
            if self.output == "label":
                y = logits.argmax(dim=1, keepdim=True).float()
                return F.interpolate(y, size=size, mode=LABEL_MODE) if y.shape[-2:] != size else y
            y = logits.float().softmax(dim=1)
            return F.interpolate(y, size=size, mode="bilinear", align_corners=False) if y.shape[-2:] != size else y

        return super().__call__(inputs, predict, *args, **kwargs)


class AutocastInferer(Inferer):
    """Runs the network under autocast (``precision`` as in :func:`resolve_precision`); fp32 logits out.

    MONAI's trainers autocast on CUDA only (``amp=True``); this gives CPU training bf16 as well.

    ``cuda_graphs``: on CUDA, the network's training forward and backward are captured as CUDA graphs
    (``torch.cuda.make_graphed_callables``) at the first training batch, and replayed for every batch of the
    same shape after it. A LeViT-UNet step is hundreds of small kernels, whose launches rather than their
    arithmetic bound it on a fast GPU. The graph replaces the module's ``forward`` in training mode only (its
    weights, state dict and eval-mode forward are untouched, so validation and checkpoints work as before); a
    batch of another shape (an epoch's last, partial one) runs the class's eager ``forward`` on the same
    weights. Autocast's weight-cast cache is off then, as capture requires. If the capture fails, training goes
    on eagerly (a warning says why). No effect on CPU, in eval mode, or without gradients.
    """

    def __init__(self, precision: str = "fp32", cuda_graphs: bool = False) -> None:
        super().__init__()
        self.precision = precision
        self.cuda_graphs = cuda_graphs
        self._graphed: dict = {}  # id(network) -> input shape it was captured for, or None after a failure

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        precision = resolve_precision(self.precision, inputs.device)
        if precision != "fp32" and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        graphs = self._use_graphs(inputs, network) and not args and not kwargs
        with autocast(inputs.device, precision, cache_enabled=not graphs):
            if graphs and id(network) not in self._graphed:
                self._graphed[id(network)] = self._capture(network, inputs)
            shape = self._graphed.get(id(network))
            if graphs and shape is not None and tuple(inputs.shape) != shape:
                out = type(network).forward(network, inputs)  # e.g. an epoch's last, partial batch: eager
            else:
                out = network(inputs, *args, **kwargs)
        return out.float()

    def _use_graphs(self, inputs: torch.Tensor, network: Callable[..., Any]) -> bool:
        return (self.cuda_graphs and inputs.is_cuda and isinstance(network, nn.Module) and network.training
                and torch.is_grad_enabled())

    @staticmethod
    def _capture(network: nn.Module, inputs: torch.Tensor) -> tuple | None:
        try:
            torch.cuda.make_graphed_callables(network, (inputs.detach().clone(),))
        except Exception as e:  # noqa: BLE001 - fall back to eager training, loudly
            warnings.warn(f"cuda_graphs: capture failed, training eagerly ({type(e).__name__}: {e})", stacklevel=3)
            return None
        return tuple(inputs.shape)
