"""The bundle end to end on synthetic data, on any machine: ``python -m scripts.demo [--workdir runs/demo]``.

1. generates the demo phantoms (``scripts.prepare_data demo``),
2. trains LeViT-UNet-128s briefly with ``python -m monai.bundle run training`` (configs/train.json),
3. evaluates the best checkpoint on the validation cases (configs/evaluate.json: Dice, HD95),
4. segments the test volumes (configs/inference.json), predictions saved on the input grid,

each through the same ``monai.bundle`` command a user runs, then prints where everything is.
The settings are sized for a 2-core CPU (64 x 64 slices, 20 short epochs, a few minutes); they
show the workflow, not the paper's accuracy (see the README for the real profiles).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from scripts.prepare_data import generate_demo

REPO = Path(__file__).resolve().parents[1]


def bundle(run_id: str | None, configs: list[Path], *overrides: str) -> None:
    config = str(configs[0]) if len(configs) == 1 else "[" + ",".join(f"'{c}'" for c in configs) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", *([run_id] if run_id else []), "--config_file", config,
           "--meta_file", str(REPO / "configs" / "metadata.json"), "--logging_file", str(REPO / "configs" / "logging.conf"),
           *overrides]
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=str(REPO / "runs" / "demo"), help="where data, weights and outputs go")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--img-size", type=int, default=64)
    args = parser.parse_args(argv)
    work = Path(args.workdir).resolve()
    data, root = work / "data", work / "bundle"
    (root / "models").mkdir(parents=True, exist_ok=True)
    start = time.time()
    if not (data / "datalist.json").exists():
        generate_demo(data, num_train=8, num_val=2, num_test=2, size=(64, 64, 8), seed=0)
    common = ["--bundle_root", str(root), "--img_size", str(args.img_size), "--num_workers", "0"]
    configs = REPO / "configs"
    bundle("training", [configs / "train.json"], *common, "--dataset_dir", str(data), "--epochs", str(args.epochs),
           "--val_interval", "10", "--batch_size", "16", "--optimizer_name", "adam", "--learning_rate", "0.003",
           "--lr_schedule", "constant")
    bundle("evaluating", [configs / "train.json", configs / "evaluate.json"], *common, "--dataset_dir", str(data),
           "--output_dir", str(root / "eval"))
    bundle(None, [configs / "inference.json"], *common, "--input", str(data / "imagesTr" / "demo_01[01].nii.gz"),
           "--output_dir", str(root / "predictions"), "--overwrite", "true")
    summary = json.loads((root / "eval" / "metrics_summary.json").read_text())
    print(f"\nDemo finished in {time.time() - start:.0f} s.")
    print(f"  data (synthetic phantoms): {data}")
    print(f"  weights:                   {root / 'models' / 'model.pt'}")
    print(f"  evaluation (validation):   {root / 'eval' / 'metrics_summary.md'}  mean Dice {summary['mean_dice']:.3f}")
    print(f"  TensorBoard logs:          {root / 'eval'}")
    print(f"  predictions (test cases):  {root / 'predictions'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
