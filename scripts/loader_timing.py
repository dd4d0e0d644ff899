"""How long the bundle's training loader takes per batch, alone (no network): the data side of a training step.

Builds ``train#dataloader`` from ``configs/train.json`` + a preset with the given overrides, exactly as training
does (CacheDataset of the deterministic transforms, the random ones per batch), and times whole epochs of it after
the first few batches. The random part runs untracked already (``train#random_chain``, an
``scripts.transforms.UntrackedCompose``); ``--no-meta`` turns MONAI's meta-data tracking off everywhere once the
cache is built (collation included): what tracking still costs. Before the random chain ran untracked, the cpu
profile's loader took 47.4 ms per batch (21.8 with ``--no-meta``); 21.7 ms since.

    python -m scripts.loader_timing --preset configs/acdc.json --datalist runs/acdc_cpu5/data/datalist.json \\
        --set img_size=128 samples_per_volume=2 batch_size=8 rot90_prob=0.0 flip_prob=0.0 num_workers=0 [--no-meta]

prints milliseconds per batch. Run it on an otherwise idle machine (it uses ``--threads`` torch threads).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]


def _value(text: str) -> Any:
    """``--set`` values as JSON where they parse (numbers, true/false), else as strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def time_loader(preset: Optional[str], datalist: Path, overrides: Dict[str, Any], epochs: int = 3, skip: int = 4,
                track_meta: bool = True, threads: int = 2, seed: int = 0) -> Dict[str, Any]:
    """Milliseconds per batch of the training loader over ``epochs`` epochs, the first ``skip`` batches untimed."""
    import monai
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO / "configs" / "train.json")] + ([preset] if preset else []))
    settings = {"datalist_file": str(datalist), "dataset_dir": str(datalist.parent), "bundle_root": str(REPO),
                **overrides}
    for key, value in settings.items():
        parser[key] = value
    torch.set_num_threads(threads)
    monai.utils.set_determinism(seed=seed)
    loader = parser.get_parsed_content("train#dataloader")  # builds the cache, with meta data, as training does
    previous = monai.data.get_track_meta()
    monai.data.set_track_meta(track_meta)
    try:
        n, t0, shape = 0, None, None
        for _ in range(epochs):
            for batch in loader:
                n += 1
                shape = tuple(batch["image"].shape)
                if n == skip:
                    t0 = time.perf_counter()
        seconds = time.perf_counter() - t0 if t0 is not None else 0.0
    finally:
        monai.data.set_track_meta(previous)
    timed = n - skip
    if timed < 1:
        raise ValueError(f"only {n} batches in {epochs} epochs: nothing left to time after skipping {skip}")
    return {"ms_per_batch": 1000 * seconds / timed, "batches_timed": timed, "batch_shape": shape,
            "track_meta": track_meta, "settings": settings}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datalist", type=Path, required=True, help="a prepared datalist.json")
    p.add_argument("--preset", default=None, help="a preset merged after configs/train.json, e.g. configs/acdc.json")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. img_size=128")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--skip", type=int, default=4, help="untimed batches at the start")
    p.add_argument("--no-meta", action="store_true", help="random transforms without MONAI meta-data tracking")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key] = _value(value)
    r = time_loader(args.preset, args.datalist, overrides, args.epochs, args.skip, not args.no_meta, args.threads)
    print(f"{args.datalist}: {r['ms_per_batch']:.1f} ms per batch of {r['batch_shape']} "
          f"(meta tracking {'on' if r['track_meta'] else 'off'}, {r['batches_timed']} batches timed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
