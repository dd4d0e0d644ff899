"""Helpers the bundle's configs call: datalists, optimisers, schedules, handlers (checkpoints: scripts.checkpoint)."""

from __future__ import annotations

import glob
import json
import logging
import math
import os
from typing import Any, Iterable, Sequence

import torch
from monai.data import load_decathlon_datalist

__all__ = [
    "BundleInputError",
    "load_datalist",
    "list_images",
    "make_optimizer",
    "make_scheduler",
    "weight_decay_groups",
    "ClassMetricsLogger",
    "require_file",
    "skip_existing_outputs",
    "output_path",
]

logger = logging.getLogger(__name__)


class BundleInputError(ValueError):
    """Bad input to a bundle workflow; the message names the file and the fault."""


def require_file(path: str, what: str, hint: str = "") -> str:
    """Returns ``path`` if it is a file, else raises naming it (e.g. missing trained weights)."""
    if not os.path.isfile(path):
        raise BundleInputError(f"{what} not found: {path}" + (f". {hint}" if hint else ""))
    return path


def load_datalist(datalist_file: str, key: str, base_dir: str | None = None, allow_empty: bool = False) -> list[dict]:
    """Entries ``key`` of a MONAI (decathlon-style) datalist, paths resolved against ``base_dir``.

    ``base_dir`` defaults to the datalist's folder. Raises :class:`BundleInputError` naming the file
    when it is missing, is not JSON, lacks ``key``, lists no entries (unless ``allow_empty``) or names
    images / labels that do not exist.
    """
    require_file(datalist_file, "datalist", "Prepare one with `python -m scripts.prepare_data ...`")
    try:
        with open(datalist_file) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise BundleInputError(f"datalist {datalist_file} is not valid JSON: {e}") from e
    if key not in content:
        raise BundleInputError(f"datalist {datalist_file} has no {key!r} list (keys: {sorted(content)})")
    if not content[key]:
        if allow_empty:
            return []
        raise BundleInputError(f"datalist {datalist_file}: the {key!r} list is empty")
    base_dir = base_dir or os.path.dirname(os.path.abspath(datalist_file))
    items = load_decathlon_datalist(datalist_file, is_segmentation=True, data_list_key=key, base_dir=base_dir)
    missing = [p for item in items for k in ("image", "label") if k in item for p in [item[k]] if not os.path.exists(p)]
    if missing:
        raise BundleInputError(f"datalist {datalist_file} ({key}) names {len(missing)} missing files: {missing[:5]}")
    return items


def list_images(pattern: str | Sequence[str]) -> list[dict]:
    """``[{"image": path}, ...]`` for a glob pattern, a list of paths, or a datalist JSON (its ``test`` list).

    DICOM series are given as their folder. Raises :class:`BundleInputError` when nothing matches.
    """
    if isinstance(pattern, str) and pattern.endswith(".json") and os.path.isfile(pattern):
        items = load_datalist(pattern, "test")
        return [{"image": item["image"]} for item in items]
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    paths = sorted({p for pat in patterns for p in (glob.glob(pat) or ([pat] if os.path.exists(pat) else []))})
    if not paths:
        raise BundleInputError(f"no input images match {patterns}")
    return [{"image": p} for p in paths]


def output_path(image: str, output_dir: str, postfix: str = "seg", ext: str = ".nii.gz") -> str:
    """Where ``SaveImaged(separate_folder=False)`` writes the prediction for input ``image``."""
    name = os.path.basename(os.path.normpath(image))
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".dcm", ".h5"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return os.path.join(output_dir, f"{name}_{postfix}{ext}")


def skip_existing_outputs(items: list[dict], output_dir: str, overwrite: bool = False, postfix: str = "seg") -> list[dict]:
    """Drops inputs whose prediction already exists in ``output_dir`` (unless ``overwrite``), logging each."""
    if overwrite:
        return items
    keep = []
    for item in items:
        out = output_path(item["image"], output_dir, postfix)
        if os.path.exists(out):
            logger.warning(f"{out} exists: skipping {item['image']} (set overwrite=true to redo it)")
        else:
            keep.append(item)
    return keep


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """``"sgd"`` (TransUNet: momentum 0.9, wd 1e-4), ``"adam"`` (as the LeViT-UNet paper states) or ``"adamw"``.

    ``fused`` (default: wherever every parameter is a floating-point CPU or CUDA tensor) runs PyTorch's fused
    update, one kernel over all parameters instead of a loop of small ones: the same arithmetic (to float
    rounding, tested); on the 2-core CPU it shortens the ACDC cpu profile's epoch of 35 AdamW steps by about
    0.3 s (``docs/results/acdc_experiments.md``).
    """
    def as_list(tensors: Any) -> list:  # a group's params may be one tensor or a one-shot iterator
        return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)

    params = [dict(p, params=as_list(p["params"])) if isinstance(p, dict) else p for p in as_list(params)]
    if fused is None:
        flat = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
        fused = bool(flat) and all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in flat)
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    raise ValueError(f"optimizer must be sgd, adam or adamw, got {name!r}")


def weight_decay_groups(network: torch.nn.Module, no_decay: Sequence[str] = ("attention_biases",)) -> list:
    """The network's parameters as two optimizer groups: weights that take weight decay, and the rest.

    Decayed: every parameter of two or more dimensions (convolution and linear weights) whose name does not end
    in one of ``no_decay``. Not decayed (the group sets ``weight_decay`` 0): normalisation scales and shifts,
    biases, and LeViT's per-head attention bias tables, which are biases of the attention logits (DeiT's and
    timm's ``no_weight_decay`` convention, which LeViT's own training follows). The first group inherits the
    optimizer's ``weight_decay``. Empty groups are left out. Every parameter is listed, frozen ones too, as
    ``network.parameters()`` would be (the optimizer skips those without gradients).
    """
    decay, keep = [], []
    for name, param in network.named_parameters():
        (keep if param.ndim < 2 or name.endswith(tuple(no_decay)) else decay).append(param)
    groups = [{"params": decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_scheduler(
    name: str, optimizer: torch.optim.Optimizer, max_iterations: int, power: float = 0.9, warmup_iterations: int = 0
):
    """Per-iteration schedule: ``"poly"`` (TransUNet: lr * (1 - it / max) ** 0.9), ``"cosine"`` or ``"constant"``.

    ``warmup_iterations`` > 0 first raises the lr linearly from lr / warmup_iterations to lr over that many
    iterations; the decay then runs over the remaining ``max_iterations - warmup_iterations`` and still ends at
    ``max_iterations``.
    """
    name = name.lower()
    max_iterations = max(int(max_iterations), 1)
    warmup = int(warmup_iterations)
    if not 0 <= warmup < max_iterations:
        raise ValueError(f"warmup_iterations must be in [0, {max_iterations}), got {warmup_iterations}")
    span = max_iterations - warmup
    if name == "poly":
        decay = lambda it: max(1.0 - it / span, 0.0) ** power  # noqa: E731
    elif name == "cosine":
        decay = lambda it: 0.5 * (1.0 + math.cos(math.pi * min(it, span) / span))  # noqa: E731
    elif name == "constant":
        decay = lambda it: 1.0  # noqa: E731
    else:
        raise ValueError(f"lr schedule must be poly, cosine or constant, got {name!r}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: (it + 1) / warmup if it < warmup else decay(it - warmup)
    )


class ClassMetricsLogger:
    """Splits a per-class metric (``reduction="mean_batch"``) into scalars ``<name>_<class>`` in
    ``engine.state.metrics`` so that StatsHandler, TensorBoard and MLflow handlers record each class.

    Attach it before those handlers (list it first in ``val_handlers``).
    """

    def __init__(self, metric_name: str, class_names: Sequence[str]) -> None:
        self.metric_name = metric_name
        self.class_names = list(class_names)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        value = engine.state.metrics.pop(self.metric_name, None)
        if value is None:
            return
        values = torch.as_tensor(value).flatten().tolist()
        for name, v in zip(self.class_names, values):
            engine.state.metrics[f"{self.metric_name}_{name}"] = float(v)


def prepare_network(
    network: torch.nn.Module, device: torch.device | str, pretrained: str | None = None, channels_last: bool = False
) -> torch.nn.Module:
    """Moves ``network`` to ``device``, first loading ImageNet LeViT weights into its encoder if ``pretrained``.

    ``channels_last`` stores the convolution weights in channels_last layout, which oneDNN / cuDNN run fastest
    under bf16 / fp16 autocast (the trainer's inferer feeds channels_last input then). In the ACDC cpu profile
    (LeViT-UNet-128s, 128 px, batch 8, bf16, 2-core CPU) the trainer took about 1.07 s per iteration with
    contiguous weights and 0.83 s with channels_last ones (timestamps of the train.log that
    ``python -m scripts.reproduce_acdc --profile cpu`` writes; 2026-11-29).

    ``pretrained`` is a facebookresearch / timm LeViT checkpoint (``.pth`` or ``.safetensors``) of the same
    variant; it is converted (classifier dropped, first conv adapted to ``in_channels``, attention biases
    resampled to ``img_size``) and loaded strictly into ``network.encoder``.

    On the CPU it also makes the process keep freed memory for the next step
    (:func:`scripts.inferer.retain_freed_memory`): each step then reuses the pages of the last one instead
    of page-faulting its activations in again.
    """
    if pretrained:
        from scripts.networks.convert import convert_checkpoint, load_checkpoint_file

        enc = network.encoder
        sd = convert_checkpoint(load_checkpoint_file(pretrained), enc.variant, enc.in_channels, enc.img_size)
        enc.load_state_dict(sd)
        logger.info(f"encoder initialised from {pretrained}")
    if torch.device(device).type == "cpu":
        from scripts.inferer import retain_freed_memory

        retain_freed_memory()
    network = network.to(device)
    return network.to(memory_format=torch.channels_last) if channels_last else network
