"""Checkpoints that survive interruption: atomic model files, resume state with random states, best metric.

The bundle writes three kinds of file to ``models/``, each atomically (a temporary file beside the target,
renamed into place once complete: a killed write never leaves a truncated file under the real name):

- ``model.pt``: bare state_dict of the best validation so far (:class:`BestModelSaver`);
- ``model_final.pt``: bare state_dict at the end of the schedule (:class:`FinalModelSaver`);
- ``resume_checkpoint_epoch=N.pt``: everything needed to continue (:class:`ResumeCheckpointing`): network,
  optimiser, schedule, trainer counters, best metric and every random state (:class:`RandomStates`), saved
  after each epoch's validation; the previous one is deleted only once the new one is in place.

Everything saved is tensors, numbers, strings, lists and dicts, so MONAI's ``CheckpointLoader`` (which loads with
``torch.load(..., weights_only=True)``) restores it; MONAI's own ``CheckpointSaver`` is not used because it
deletes the previous file before writing the new one, in place.
"""

from __future__ import annotations

import glob
import logging
import os
import random
from typing import Any, Iterator

import numpy as np
import torch

from scripts.atomic import atomic_output

__all__ = [
    "RandomStates",
    "BestModelSaver",
    "FinalModelSaver",
    "ResumeCheckpointing",
    "latest_checkpoint",
    "save_state_dict",
]

logger = logging.getLogger(__name__)


def _unwrap(module: Any) -> Any:
    """The module inside DataParallel / DistributedDataParallel (whose ``module.`` prefix is not saved)."""
    return module.module if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) else module


def save_state_dict(obj: Any, path: str) -> None:
    """``torch.save`` of ``obj`` (a module is saved as its bare state_dict) to ``path``, atomically."""
    state = _unwrap(obj).state_dict() if isinstance(obj, torch.nn.Module) else obj
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def _numpy_state(state: tuple) -> dict:
    kind, keys, pos, has_gauss, cached = state
    return {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_tuple(state: dict) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["kind"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]


def _random_generators(obj: Any, path: str = "", seen: set | None = None) -> Iterator[tuple[str, np.random.RandomState]]:
    """``(path, generator)`` for every ``np.random.RandomState`` attribute ``R`` of the MONAI transforms in ``obj``.

    Walks attributes, lists, tuples and dicts as ``monai.data.utils.set_rnd`` does (``Compose`` -> each transform ->
    the array transforms a dictionary transform wraps), so every generator ``set_rnd`` seeds is found.
    """
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, torch.Tensor, np.ndarray)) or obj is None:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif type(obj).__module__.startswith(("monai.", "scripts.")) and hasattr(obj, "__dict__"):
        generator = getattr(obj, "R", None)
        if isinstance(generator, np.random.RandomState):
            yield path or ".", generator
        items = ((k, v) for k, v in vars(obj).items() if k != "R" and not k.startswith("__"))
    else:
        return
    for key, value in items:
        yield from _random_generators(value, f"{path}.{key}" if path else str(key), seen)


class RandomStates:
    """The random states a training run draws from, as a stateful object for checkpoints.

    ``state_dict()`` holds torch's CPU (and, where initialised, CUDA) generators, numpy's and Python's global
    generators and the own generator (``R``) of every random transform reachable from ``transforms`` (with no
    loader workers the random transforms run in the main process and keep drawing from these; with workers their
    per-epoch seeds derive from torch's generator). Everything is kept as tensors and plain numbers, so the state
    loads with ``torch.load(weights_only=True)``. Saved after an epoch and restored before the next, it makes a
    resumed run draw the same numbers as an uninterrupted one.

    Args:
        transforms: the training transform chain (or a dataset holding it), e.g. ``@train#preprocessing``.
    """

    def __init__(self, transforms: Any = None) -> None:
        self.transforms = transforms

    def state_dict(self) -> dict:
        version, internal, gauss_next = random.getstate()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(np.random.get_state()),
            "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
            "transforms": {path: _numpy_state(g.get_state()) for path, g in _random_generators(self.transforms)},
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(_numpy_tuple(state["numpy"]))
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        generators = dict(_random_generators(self.transforms))
        if set(generators) != set(state["transforms"]):
            missing, extra = sorted(set(state["transforms"]) - set(generators)), sorted(set(generators) - set(state["transforms"]))
            raise ValueError(
                "the resume checkpoint's random transforms differ from this run's (were the training transforms "
                f"changed?): only in the checkpoint {missing}, only in this run {extra}"
            )
        for path, generator in generators.items():
            generator.set_state(_numpy_tuple(state["transforms"][path]))


class BestModelSaver:
    """Saves ``network``'s bare state_dict to ``save_dir/filename`` (atomically) when the evaluator's key metric
    improves on the best so far (greater is better); stateful, so a resumed run keeps the best of the earlier part.

    Attach it to the evaluator (as a validation handler). On rank > 0 of a multi-process run leave it out of the
    handlers: it is the only writer of ``model.pt``.

    Args:
        save_dir: folder of ``filename`` (created if needed).
        network: the network (DataParallel / DDP wrappers are unwrapped).
        filename: ``model.pt`` by default.
        metric_name: the metric to compare; default the evaluator's key metric.
    """

    def __init__(self, save_dir: str, network: torch.nn.Module, filename: str = "model.pt", metric_name: str | None = None):
        self.path = os.path.join(save_dir, filename)
        self.network = network
        self.metric_name = metric_name
        self.best_metric = -float("inf")
        self.best_epoch = -1
        self._engine: Any = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        self._engine = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        name = self.metric_name or engine.state.key_metric_name
        value = float(engine.state.metrics[name])
        if value > self.best_metric:
            save_state_dict(self.network, self.path)
            self.best_metric, self.best_epoch = value, int(engine.state.epoch)
            logger.info(f"{self.path}: new best {name} {value:.4f} at epoch {self.best_epoch}")

    def state_dict(self) -> dict:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best_metric, self.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        if self._engine is not None and self.best_epoch >= 0:  # the evaluator's own record, shown in its logs
            self._engine.state.best_metric, self._engine.state.best_metric_epoch = self.best_metric, self.best_epoch


class FinalModelSaver:
    """Saves ``network``'s bare state_dict to ``save_dir/filename`` (atomically) when training completes its
    schedule (``epoch == max_epochs``): the last epoch's weights, not the best validation's. An interrupted or
    terminated run does not write it (its state is in the resume checkpoint).
    """

    def __init__(self, save_dir: str, network: torch.nn.Module, filename: str = "model_final.pt"):
        self.path = os.path.join(save_dir, filename)
        self.network = network

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        if engine.state.epoch >= engine.state.max_epochs:
            save_state_dict(self.network, self.path)
            logger.info(f"saved the final weights (epoch {engine.state.epoch}) to {self.path}")


def latest_checkpoint(ckpt_dir: str, prefix: str = "resume") -> str | None:
    """The newest ``<prefix>_checkpoint_epoch=N.pt`` in ``ckpt_dir`` (highest N), or None."""
    paths = glob.glob(os.path.join(ckpt_dir, f"{prefix}_checkpoint_epoch=*.pt"))
    epoch = lambda p: int(os.path.basename(p).rsplit("=", 1)[1].split(".")[0])  # noqa: E731
    return max(paths, key=epoch) if paths else None


class ResumeCheckpointing:
    """Resume state for training: saved after every epoch and, when ``resume``, restored from the newest.

    The state of ``objects`` goes to ``<ckpt_dir>/resume_checkpoint_epoch=N.pt`` after epoch N's validation
    (written atomically; older resume files are deleted once it is in place). Restoring goes through MONAI's
    ``CheckpointLoader`` (``weights_only=True``) when the trainer starts, after the data loaders exist, so the
    random states it restores are the ones the next epoch draws from. Attach it to the trainer after every other
    handler (the bundle's ``initialize`` does), since the trainer is itself one of the saved objects and the
    state must be taken after the validation of the epoch.

    Args:
        ckpt_dir: folder of the checkpoints.
        objects: ``{"model": net, "optimizer": opt, "lr_scheduler": sched, "trainer": trainer,
            "best_model": BestModelSaver, "random_states": RandomStates}``; each needs ``state_dict`` /
            ``load_state_dict``.
        resume: restore the newest resume checkpoint before training (a warning, not an error, if none).
        save: write resume checkpoints (False on all but rank 0 in multi-process training).
        map_location: where loaded tensors go.
    """

    def __init__(self, ckpt_dir: str, objects: dict, resume: bool = False, save: bool = True, map_location: Any = "cpu"):
        self.ckpt_dir = ckpt_dir
        self.objects = objects
        self.resume = resume
        self.save = save
        self.map_location = map_location

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events
        from monai.handlers import CheckpointLoader

        if self.resume:
            path = latest_checkpoint(self.ckpt_dir)
            if path is None:
                logger.warning(f"resume requested but no resume checkpoint in {self.ckpt_dir}: training from scratch")
            else:
                logger.info(f"resuming from {path}")
                CheckpointLoader(load_path=path, load_dict=self.objects, map_location=self.map_location).attach(engine)
        if self.save:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_state)

    def state_dict(self) -> dict:
        return {name: _unwrap(obj).state_dict() for name, obj in self.objects.items()}

    def save_state(self, engine: Any) -> str:
        """Writes ``resume_checkpoint_epoch=<epoch>.pt`` atomically, then deletes the older ones."""
        path = os.path.join(self.ckpt_dir, f"resume_checkpoint_epoch={engine.state.epoch}.pt")
        save_state_dict(self.state_dict(), path)
        for old in glob.glob(os.path.join(self.ckpt_dir, "resume_checkpoint_epoch=*.pt")):
            if old != path:
                os.remove(old)
        return path
