"""scripts/reproduce_acdc.py: the log parser, the profiles' plans, and the gpu profile end to end on CPU (tiny)."""

from __future__ import annotations

import json

import nibabel as nib
import pytest
from conftest import shared_path
from PIL import Image

from scripts import reproduce_acdc as ra

LOG = """\
2026-11-29 06:49:19,100 - INFO - Epoch: 1/2, Iter: 1/3 -- train_loss: 1.2000 
Epoch [1/2]: [1/3]  33%|###3      , loss=1.2 [00:01<00:02]\rEpoch [1/2]: [2/3]  67%|######6   , loss=1.1
2026-11-29 06:49:19,200 - INFO - Epoch: 1/2, Iter: 2/3 -- train_loss: 1.0000 
2026-11-29 06:49:19,300 - INFO - Epoch: 1/2, Iter: 3/3 -- train_loss: 0.8000 
2026-11-29 06:49:20,502 - INFO - Epoch[1] Metrics -- val_class_dice_left_ventricle: 0.5000 \
val_class_dice_myocardium: 0.2000 val_class_dice_right_ventricle: 0.1000 val_mean_dice: 0.2667 
2026-11-29 06:49:20,567 - INFO - Epoch[1] Metrics -- train_mean_dice: 0.0203 
2026-11-29 06:49:21,000 - INFO - Epoch: 2/2, Iter: 1/3 -- train_loss: 0.6000 
2026-11-29 06:49:21,100 - INFO - Epoch: 2/2, Iter: 2/3 -- train_loss: 0.5000 
2026-11-29 06:49:21,200 - INFO - Epoch: 2/2, Iter: 3/3 -- train_loss: 0.4000 
2026-11-29 06:49:22,000 - INFO - Epoch[2] Metrics -- val_mean_dice: 0.6066 val_class_dice_myocardium: 0.5500
"""


def test_parse_train_log():
    c = ra.parse_train_log(LOG)
    assert [i[0] for i in c["iterations"]] == [1, 2, 3, 4, 5, 6]
    assert [i[2] for i in c["iterations"]] == [1.2, 1.0, 0.8, 0.6, 0.5, 0.4]
    assert c["epoch_loss"] == [[1, pytest.approx(1.0)], [2, pytest.approx(0.5)]]
    assert c["val"] == [[1, 0.2667], [2, 0.6066]]
    assert c["metrics"][1] == {"val_class_dice_left_ventricle": 0.5, "val_class_dice_myocardium": 0.2,
                               "val_class_dice_right_ventricle": 0.1, "val_mean_dice": 0.2667,
                               "train_mean_dice": 0.0203}
    assert c["metrics"][2]["val_class_dice_myocardium"] == 0.55
    empty = ra.parse_train_log("nothing to see\n")
    assert empty["iterations"] == [] and empty["val"] == [] and empty["epoch_loss"] == []


# what ignite prints at the end of each epoch; the evaluator's run (validation) falls inside the trainer's epoch
TIMED = """\
2026-11-30 00:00:01,000 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch[1] Complete. Time taken: 00:00:18.500
2026-11-30 00:00:12,000 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch[2] Complete. Time taken: 00:00:11.000
2026-11-30 00:00:20,000 - ignite.engine.engine.SupervisedEvaluator - INFO - Epoch[1] Complete. Time taken: 00:00:06.000
2026-11-30 00:00:20,000 - ignite.engine.engine.SupervisedEvaluator - INFO - Engine run finished. Time taken: 00:00:06.100
2026-11-30 00:00:20,100 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch[3] Complete. Time taken: 00:01:16.500
"""


def test_parse_train_log_epoch_times():
    c = ra.parse_train_log(TIMED)
    assert c["epoch_seconds"] == [[1, 18.5], [2, 11.0], [3, pytest.approx(70.5)]]  # 76.5 s less the 6 s validation
    assert c["validation_seconds"] == [6.0]
    assert ra.parse_train_log(LOG)["epoch_seconds"] == []


def test_plan_epochs_fits_the_budget():
    # later epochs at most 70.5 s (the first, with warm-up, ignored), validations 6 s each
    epochs, interval = ra.plan_epochs(TIMED, budget_s=1000, validations=4)
    assert (epochs, interval) == (13, 4)  # (1000 - 4 * 6) // 70.5 = 13, validated at 4, 8, 12
    assert epochs * 70.5 + 4 * 6 <= 1000 < (epochs + 1) * 70.5 + 4 * 6
    assert ra.plan_epochs(TIMED, budget_s=10**6) == (400, 100)  # never more than the paper's 400
    only_first = TIMED.splitlines()[0]
    assert ra.plan_epochs(only_first, budget_s=185, validations=0) == (10, 10)  # the warm-up epoch, if it is all
    with pytest.raises(ValueError, match="does not fit one epoch"):
        ra.plan_epochs(TIMED, budget_s=60)
    with pytest.raises(ValueError, match="no 'Epoch\\[N\\] Complete"):
        ra.plan_epochs(LOG, budget_s=1000)


def test_draw_curves(tmp_path):
    png = ra.draw_curves(ra.parse_train_log(LOG), tmp_path / "c.png", title="t")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 500
    empty = ra.draw_curves(ra.parse_train_log(""), tmp_path / "e.png")  # no data: still a picture
    assert empty.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cpu_profile_dry_run(capsys, tmp_path):
    assert ra.main(["--profile", "cpu", "--dry-run", "--workdir", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "--variant 128s" in out and "--train_precision bf16" in out
    assert "--infer_precision auto" in out and "model_final.pt" in out and "--eval_key validation" in out
    plan = ra.build_plan(ra.parse_args(["--profile", "cpu"]))
    s = plan["settings"]
    assert s["variant"] == "128s" and s["train_precision"] == "bf16" and s["amp"] is False
    assert s["epochs"] % s["val_interval"] == 0  # the last epoch is validated
    train = plan["commands"]["train"]
    assert train[train.index("--config_file") + 1] == "['configs/train.json','configs/acdc.json']"
    assert not (tmp_path / "w").exists()  # a dry run creates nothing


def test_gpu_profile_plan_and_overrides():
    plan = ra.build_plan(ra.parse_args(["--profile", "gpu"]))
    s = plan["settings"]
    assert (s["variant"], s["img_size"], s["batch_size"], s["train_precision"], s["num_workers"]) == ("384", 224, 24, "bf16", 8)
    small = ra.build_plan(ra.parse_args(["--profile", "gpu", "--variant", "128s", "--epochs", "3"]))
    assert small["settings"]["variant"] == "128s" and small["settings"]["val_interval"] == 3
    ev = small["commands"]["evaluate"]
    assert ev[ev.index("--variant") + 1] == "128s" and ev[ev.index("--img_size") + 1] == "224"
    assert "compact_dataset" not in plan["commands"]["prepare"]
    compact = ra.build_plan(ra.parse_args(["--profile", "gpu", "--compact", "--workdir", "/w"]))["commands"]["prepare"]
    assert "convert_acdc_ssl4mis(" in compact and "'/w/full')" in compact  # the dry run shows the real steps
    assert "compact_dataset('/w/full/datalist.json', '/w/data', 224)" in compact


def test_gpu_profile_end_to_end_on_cpu(tmp_path):
    data = shared_path("data", "acdc_ssl4mis")
    work, res = tmp_path / "work", tmp_path / "results"
    argv = ["--profile", "gpu", "--data", str(data), "--variant", "128s", "--img-size", "64", "--epochs", "1",
            "--samples-per-volume", "1", "--batch-size", "4", "--num-workers", "0", "--limit", "2",
            "--workdir", str(work), "--results-dir", str(res), "--quiet", "--compact"]
    assert ra.main(argv) == 0  # trains from the compact copy a GPU machine would be given
    md, js, png = res / "acdc_gpu.md", res / "acdc_gpu.json", res / "acdc_gpu_curves.png"
    assert md.is_file() and js.is_file() and png.is_file()
    r = json.loads(js.read_text())
    for key in ("metrics", "epochs", "timings_s", "hardware", "commands", "git_commit", "evaluation_set",
                "evaluation_note", "paper_acdc_test_dice_pct", "settings", "training_log"):
        assert key in r, key
    assert r["evaluation_set"] == "validation" and "VALIDATION" in r["evaluation_note"]
    assert r["epochs"] == 1 and r["settings"]["variant"] == "128s" and r["settings"]["train_precision"] == "bf16"
    assert r["num_cases"] == 2
    for name in ("right_ventricle", "myocardium", "left_ventricle"):
        c = r["metrics"]["per_class"][name]
        assert 0.0 <= c["dice"] <= 1.0 and c["hd95_voxels"] is not None
    assert 0.0 <= r["metrics"]["mean_dice"] <= 1.0
    assert set(r["timings_s"]) == {"prepare", "train", "evaluate", "total"}
    assert r["hardware"]["cpu_count"] and r["hardware"]["torch_threads"] >= 1
    assert "monai.bundle run training" in r["commands"]["train"]
    assert "model_final.pt" in r["commands"]["evaluate"]
    assert r["paper_acdc_test_dice_pct"]["LeViT-UNet-384"]["mean"] == 90.32
    assert r["training_log"]["iterations_logged"] >= 1 and r["training_log"]["last_val_epoch"] == 1
    text = md.read_text()
    assert "VALIDATION" in text and "90.32" in text and "| right_ventricle (RV) |" in text
    assert (work / "train.log").is_file() and (work / "bundle" / "models" / "model_final.pt").is_file()
    log = (work / "train.log").read_text()
    assert log.splitlines()[1].startswith("# started 20")  # when the command began, for the start-up cost
    assert ra.parse_train_log(log)["epoch_seconds"][0][0] == 1  # the trainer's epoch time, read back
    first = json.loads((work / "data" / "datalist.json").read_text())["training"][0]["image"]
    assert (work / "full" / "datalist.json").is_file() and nib.load(str(work / "data" / first)).shape[:2] == (64, 64)
    with Image.open(png) as im:
        assert im.format == "PNG"
    assert not [p for p in res.iterdir() if p.name.endswith(".tmp")]
