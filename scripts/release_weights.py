"""Record published weight files in a bundle's ``large_files.yml``: ``python -m scripts.release_weights``.

Weights are never committed. To publish them, upload the files (a GitHub release asset, Zenodo, ...), then
record where each one downloads from::

    # the root (Synapse) bundle: writes large_files.yml
    python -m scripts.release_weights --file models/model.pt --url https://example.org/levit_unet_synapse/model.pt
    # the ACDC bundle: writes the "large_files" list of configs/acdc_bundle.json, which make_bundle turns into
    # the ACDC bundle's large_files.yml; --path is where the file goes in the bundle (default models/<name>)
    python -m scripts.release_weights --task acdc --file runs/acdc_gpu/bundle/models/model_final.pt \\
        --path models/model.pt --url https://example.org/levit_unet_acdc/model.pt
    # withdraw an entry
    python -m scripts.release_weights --task acdc --remove models/model.pt

then regenerate the model cards (``python -m scripts.model_card``: their weights sentence comes from this list)
and the bundle. Users fetch and check the files with ``python -m monai.bundle download_large_files
--bundle_path BUNDLE_DIR`` (MONAI's reader of the model zoo's format: entries of ``path``, ``url``,
``hash_type``, ``hash_val``; this tool writes sha256).

Each file is checked before it is listed, and the whole call is refused on the first fault:

- ``.pt`` / ``.pth``: a bare state_dict (``torch.load(..., weights_only=True)`` gives a mapping of names to
  tensors, no optimiser or trainer state), unfused (BatchNorm layers present: a ``LeViTUNet.fuse()`` copy
  cannot be trained further nor loaded by the bundle's ``network_def``), finite, and matching, key for key and
  shape for shape, the network the bundle's ``configs/inference.json`` builds (its ``variant``, ``img_size``
  and, from the task's preset, ``num_classes``). A checkpoint of another variant, size or class count is named
  in the message, with the configs to change;
- ``.ts``: loads with ``torch.jit.load``; ``.onnx``: passes ``onnx.checker``;
- the URL is ``https://`` or ``http://``; the path is relative, inside the bundle.

``large_files.yml`` (or ``configs/<task>_bundle.json``) is written atomically; an entry for a path already
listed is replaced.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import torch

from scripts.atomic import atomic_output
from scripts.make_bundle import (
    LARGE_FILES,
    REPO,
    ROOT_TASK,
    TASKS,
    BundleError,
    bundle_network,
    check_large_files,
    render_large_files,
    set_values,
    task_large_files,
)

__all__ = ["ReleaseError", "sha256_file", "check_state_dict", "check_file", "large_file_entry", "release", "main"]

STATE_DICT_SUFFIXES = (".pt", ".pth")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


class ReleaseError(RuntimeError):
    """A file cannot be published as given; the message names the file and the fault."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ checks


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file's state_dict, loaded with ``weights_only=True``; refuses anything but names -> tensors."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling fault means the same: not a plain weights file
        raise ReleaseError(f"{path} is not a file torch.load(weights_only=True) reads ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}); publish the state_dict training "
                           "wrote") from e
    if not isinstance(obj, Mapping) or not obj:
        raise ReleaseError(f"{path} holds a {type(obj).__name__}, not a state_dict (names -> tensors)")
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ReleaseError(f"{path} is not a bare state_dict: {not_tensors[:5]} are not tensors (a training "
                           "checkpoint with optimiser / trainer state?); publish models/model.pt as training writes it")
    return dict(obj)


@functools.lru_cache(maxsize=16)
def _network_state(variant: str, img_size: int, num_classes: int, fused: bool = False) -> dict[str, torch.Size]:
    """Parameter / buffer name -> shape of a LeViTUNet (built once per setting; only the shapes are kept)."""
    from scripts.networks import LeViTUNet

    net = LeViTUNet(out_channels=num_classes, variant=variant, img_size=img_size)
    net = net.fuse() if fused else net
    return {k: v.shape for k, v in net.state_dict().items()}


def _found_settings(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``num_classes`` and ``img_size`` the state_dict was made for, read from its head and attention biases."""
    found: dict[str, Any] = {}
    if "head.weight" in sd:
        found["num_classes"] = int(sd["head.weight"].shape[0])
    bias = sd.get("encoder.stages.0.blocks.0.attn.attention_biases")
    if bias is not None and bias.ndim == 2:
        grid = math.isqrt(int(bias.shape[1]))
        if grid * grid == bias.shape[1]:
            found["img_size"] = grid * 16  # four stride-2 stem convolutions
    return found


def check_state_dict(path: Path, network: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Refuses ``path`` unless it is a bare, unfused, finite state_dict of ``network`` (variant, img_size,
    num_classes), key for key and shape for shape; the message names what the file holds instead."""
    from scripts.networks.levit import LEVIT_VARIANTS

    sd = load_state_dict(path)
    prefixed = [p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)]
    if prefixed:
        raise ReleaseError(f"{path}: every key starts with {prefixed[0]!r} (a wrapped model's state_dict); save the "
                           "unwrapped network's state_dict")
    variant, img_size, num_classes = network["variant"], int(network["img_size"]), int(network["num_classes"])
    expected = _network_state(variant, img_size, num_classes)
    shapes = {k: v.shape for k, v in sd.items()}
    wanted = f"LeViT-UNet-{variant} with {num_classes} classes at {img_size} px"
    if shapes != expected:
        keys = set(shapes)
        for other in LEVIT_VARIANTS:
            if keys == set(_network_state(other, img_size, num_classes, fused=True)):
                raise ReleaseError(f"{path} is a fused LeViT-UNet-{other} (BatchNorm folded into the layers, as "
                                   "LeViTUNet.fuse() makes it for inference): publish the unfused state_dict training "
                                   "wrote; the bundle fuses it itself when it loads it")
        found = _found_settings(sd)
        for other in LEVIT_VARIANTS:
            if keys != set(_network_state(other, img_size, num_classes)):
                continue
            have = {"variant": other, **found}
            mine = {"variant": variant, "img_size": img_size, "num_classes": num_classes}
            differ = {k: v for k, v in have.items() if str(v) != str(mine[k])}
            if "num_classes" in differ:
                raise ReleaseError(f"{path} is a LeViT-UNet state_dict for {differ['num_classes']} classes, but "
                                   f"this bundle segments {num_classes} (its preset's label_names): weights of "
                                   "another task?")
            raise ReleaseError(
                f"{path} is a LeViT-UNet state_dict for {', '.join(f'{k} {v}' for k, v in have.items())}, but the "
                f"bundle's configs build a {wanted}: set "
                + ", ".join(f'"{k}": {json.dumps(v)}' for k, v in differ.items())
                + " in its configs (the task's preset, e.g. configs/acdc.json), so that its network_def loads it"
                if differ else f"{path} has the keys of a {wanted} but other tensor shapes"
            )
        missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
        raise ReleaseError(f"{path} is not a LeViT-UNet state_dict of this bundle ({len(missing)} keys missing, e.g. "
                           f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); convert official or "
                           "ImageNet checkpoints first with `python -m scripts.networks.convert`")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ReleaseError(f"{path} has non-finite values in {bad[:5]} (a diverged training?)")
    return sd


def check_file(path: Path, bundle_path: str, network: Mapping[str, Any]) -> None:
    """Checks the local ``path`` published as ``bundle_path`` (its suffix says what the bundle expects there)."""
    if not path.is_file():
        raise ReleaseError(f"{path} does not exist (or is not a file): nothing to publish")
    suffix = Path(bundle_path).suffix
    if suffix in STATE_DICT_SUFFIXES:
        check_state_dict(path, network)
    elif suffix == ".ts":
        try:
            torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise ReleaseError(f"{path} is not a TorchScript file ({type(e).__name__}: {e})") from e
    elif suffix == ".onnx":
        import onnx

        try:
            onnx.checker.check_model(str(path))
        except Exception as e:  # noqa: BLE001
            raise ReleaseError(f"{path} is not a valid ONNX model ({type(e).__name__}: {e})") from e
    else:
        raise ReleaseError(f"{bundle_path}: only weights are published this way (.pt / .pth state_dict, .ts, .onnx)")


def large_file_entry(file: Path, bundle_path: str, url: str, network: Mapping[str, Any]) -> dict[str, str]:
    """One model-zoo ``large_files`` entry for ``file``, after checking it and ``url``."""
    parsed = urlparse(url)
    if parsed.scheme not in ("https", "http") or not parsed.netloc:
        raise ReleaseError(f"{url!r} is not an http(s) URL the file downloads from")
    check_file(file, bundle_path, network)
    entry = {"path": bundle_path, "url": url, "hash_type": "sha256", "hash_val": sha256_file(file)}
    try:
        check_large_files([entry], LARGE_FILES)
    except BundleError as e:
        raise ReleaseError(str(e)) from e
    return entry


# ------------------------------------------------------------------------------------------------ writing


def default_bundle_path(file: Path, task: str, repo: Path = REPO) -> str:
    """Where ``file`` goes in the bundle: its own path if it lies in the root bundle, else ``models/<name>``."""
    resolved = file.resolve()
    if task == ROOT_TASK and repo.resolve() in resolved.parents:
        return resolved.relative_to(repo.resolve()).as_posix()
    return f"models/{file.name}"


def write_entries(task: str, entries: Sequence[Mapping[str, str]], repo: Path = REPO) -> Path:
    """The task's list, written atomically: ``large_files.yml`` (root task) or ``configs/<task>_bundle.json``."""
    if task == ROOT_TASK:
        target, text = repo / LARGE_FILES, render_large_files(list(entries))
    else:
        target = repo / "configs" / f"{task}_bundle.json"
        try:
            text = set_values(target.read_text(), {"large_files": list(entries)}, str(target))
        except BundleError as e:
            raise ReleaseError(f"{e} (add \"large_files\": [] to it)") from e
    with atomic_output(target) as tmp:
        tmp.write_text(text)
    return target


def release(task: str, files: Sequence[str | Path], urls: Sequence[str], paths: Sequence[str] | None = None,
            remove: Sequence[str] = (), repo: Path = REPO) -> tuple[Path, list[dict[str, str]]]:
    """Checks every file, then writes the task's list with their entries added (or replaced) and ``remove``
    dropped; returns (the file written, the entries)."""
    if task not in TASKS:
        raise ReleaseError(f"unknown task {task!r}: one of {', '.join(TASKS)}")
    if len(files) != len(urls) or (paths and len(paths) != len(files)):
        raise ReleaseError("give one --url (and, if any, one --path) per --file, in the same order")
    try:
        entries = [dict(e) for e in task_large_files(task, repo)]
        network = bundle_network(task, repo) if files else {}
    except BundleError as e:
        raise ReleaseError(str(e)) from e
    unknown = sorted(set(remove) - {e["path"] for e in entries})
    if unknown:
        raise ReleaseError(f"--remove {unknown}: not listed for the {task} bundle")
    entries = [e for e in entries if e["path"] not in set(remove)]
    targets = list(paths) if paths else [default_bundle_path(Path(f), task, repo) for f in files]
    new = [large_file_entry(Path(f), target, url, network) for f, target, url in zip(files, targets, urls)]
    if len({e["path"] for e in new}) != len(new):
        raise ReleaseError("two --file arguments go to the same path in the bundle")
    for entry in new:
        at = [i for i, e in enumerate(entries) if e["path"] == entry["path"]]
        if at:
            entries[at[0]] = entry
        else:
            entries.append(entry)
    return write_entries(task, entries, repo), entries


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.release_weights", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default=ROOT_TASK,
                        help=f"which bundle (default {ROOT_TASK}, the repository root)")
    parser.add_argument("--file", action="append", default=[], help="a local copy of a published file (repeatable)")
    parser.add_argument("--url", action="append", default=[], help="where that file downloads from (one per --file)")
    parser.add_argument("--path", action="append", default=[],
                        help="where that file goes in the bundle (one per --file; default models/<file name>)")
    parser.add_argument("--remove", action="append", default=[], help="drop the entry of this bundle path")
    parser.add_argument("--repo", type=Path, default=REPO, help="the repository (default: this one)")
    args = parser.parse_args(argv)
    if not args.file and not args.remove:
        parser.error("nothing to do: give --file FILE --url URL, or --remove PATH")
    try:
        target, entries = release(args.task, args.file, args.url, args.path or None, args.remove, args.repo.resolve())
    except ReleaseError as e:
        print(f"release_weights: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {target}:")
    for e in entries:
        print(f"  {e['path']}  {e['hash_type']} {e['hash_val']}  {e['url']}")
    print("now regenerate the model cards (python -m scripts.model_card) and the bundle "
          "(python -m scripts.make_bundle)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
