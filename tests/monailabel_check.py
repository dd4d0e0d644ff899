"""Runs the bundle through MONAI Label 0.8.5's bundle tasks; executed by tests/test_monailabel.py in .venv-monailabel.

Not a pytest module (the main environment has no MONAI Label): ``.venv-monailabel/bin/python
tests/monailabel_check.py --result R.json ...``. It does what the ``monaibundle`` app does with a bundle
folder (``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``):

* ``--infer-bundle B --images I [I ...]``: ``BundleInferTask(B, conf)`` segments each volume (CPU), as a
  MONAI Label infer request does, and the label file MONAI Label writes is kept as
  ``<out-dir>/<name>_monailabel.nii.gz``;
* ``--train-bundle B --studies S``: ``BundleTrainTask(B, conf)`` trains one epoch on the labelled images of the
  local datastore ``S`` (labels in ``S/labels/final``), with small overrides (``--train-overrides`` JSON,
  passed the way a derived app task passes them, through ``_update_overrides``).

Writes a JSON report to ``--result``: the task's label names, the label files, and ``models/model.pt``'s
mtime / sha256 before and after training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def infer(bundle: str, images: list[str], out_dir: str) -> dict:
    from monailabel.tasks.infer.bundle import BundleInferTask

    conf = {"models": os.path.basename(bundle), "preload": "false"}
    task = BundleInferTask(bundle, conf)
    if not task.is_valid():
        raise SystemExit(f"BundleInferTask rejected the bundle {bundle} (see the log above)")
    info = task.info()
    outputs = {}
    for image in images:
        start = time.time()
        label_file, result = task({"image": image, "device": "cpu"})
        if not isinstance(label_file, str) or not os.path.isfile(label_file):
            raise SystemExit(f"MONAI Label wrote no label file for {image}: {label_file!r}")
        name = os.path.basename(image).split(".")[0]
        kept = os.path.join(out_dir, f"{name}_monailabel.nii.gz")
        shutil.move(label_file, kept)
        outputs[image] = {"label_file": kept, "label_names": result.get("label_names"),
                          "seconds": round(time.time() - start, 2)}
    return {"labels": info["labels"], "type": str(info["type"]), "dimension": info["dimension"],
            "outputs": outputs}


def train(bundle: str, studies: str, overrides: dict, max_epochs: int) -> dict:
    from monailabel.datastore.local import LocalDatastore
    from monailabel.tasks.train.bundle import BundleTrainTask

    class Task(BundleTrainTask):
        def _update_overrides(self, o):
            o.update(overrides)
            return o

    model = os.path.join(bundle, "models", "model.pt")
    before = {"mtime_ns": os.stat(model).st_mtime_ns, "sha256": sha256(model)} if os.path.exists(model) else None
    datastore = LocalDatastore(studies, extensions=("*.nii.gz", "*.nii"), auto_reload=False)
    n = len(datastore.datalist())
    task = Task(bundle, {"models": os.path.basename(bundle), "preload": "false"})
    if not task.is_valid():
        raise SystemExit(f"BundleTrainTask rejected the bundle {bundle} (see the log above)")
    request = {"model": os.path.basename(bundle), "max_epochs": max_epochs, "device": "cpu", "multi_gpu": False,
               "val_split": 0.2, "pretrained": True}
    start = time.time()
    task(request, datastore)
    seconds = time.time() - start
    after = {"mtime_ns": os.stat(model).st_mtime_ns, "sha256": sha256(model)} if os.path.exists(model) else None
    return {"labelled_images": n, "before": before, "after": after, "seconds": round(seconds, 2),
            "models": sorted(os.listdir(os.path.join(bundle, "models")))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--result", required=True, help="JSON report to write")
    p.add_argument("--out-dir", required=True, help="where the MONAI Label label file is kept")
    p.add_argument("--infer-bundle")
    p.add_argument("--images", nargs="+", default=[])
    p.add_argument("--train-bundle")
    p.add_argument("--studies")
    p.add_argument("--train-overrides", default="{}", help="JSON dict of bundle config overrides for training")
    p.add_argument("--max-epochs", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] (%(name)s) %(message)s")
    import monai
    import monailabel
    import numpy
    import torch

    report: dict = {"versions": {"monailabel": monailabel.__version__, "monai": monai.__version__,
                                 "torch": torch.__version__, "numpy": numpy.__version__}}
    os.makedirs(args.out_dir, exist_ok=True)
    if args.infer_bundle:
        report["infer"] = infer(os.path.abspath(args.infer_bundle), [os.path.abspath(i) for i in args.images], args.out_dir)
    if args.train_bundle:
        report["train"] = train(os.path.abspath(args.train_bundle), os.path.abspath(args.studies),
                                json.loads(args.train_overrides), args.max_epochs)
    with open(args.result, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
