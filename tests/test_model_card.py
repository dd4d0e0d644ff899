"""scripts/model_card.py: the cards' Performance / Speed blocks and eval_metrics come from docs/results/."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import verify_metadata

from conftest import REPO, copy_repo, shared_path
from scripts import model_card as mc
from scripts import reproduce_acdc as ra
from scripts.make_bundle import BundleError, make_bundle

ACDC_CLASSES = ["right_ventricle", "myocardium", "left_ventricle"]


@pytest.fixture
def fake_repo(tmp_path) -> Path:
    """A copy of what the tool reads and writes, without any ACDC / Synapse results file, cards regenerated."""
    repo = copy_repo(tmp_path / "repo")
    for path in (repo / "docs" / "results").glob("*"):
        if path.name.startswith(("acdc_", "synapse_")):
            path.unlink()
    assert mc.main(["--repo", str(repo)]) == 0
    return repo


def write_run(repo: Path, profile: str, dice: dict[str, float], hd95: float = 3.5, limit: int | None = None,
              commit: str = "0123456789abcdef0123456789abcdef01234567") -> dict:
    """A results file as ``reproduce_acdc`` writes it, from an evaluation summary with the given Dice per class."""
    argv = ["--profile", profile, "--workdir", str(repo / "runs" / profile)]
    argv += ["--limit", str(limit)] if limit else []
    plan = ra.build_plan(ra.parse_args(argv))
    summary = {
        "protocol": "transunet", "num_cases": 20, "mean_dice": sum(dice.values()) / len(dice), "dice_std": 0.05,
        "mean_hd95": hd95, "hd95_std": 1.0,
        "per_class": {c: {"dice_mean": d, "dice_std": 0.04, "hd95_mean": hd95, "hd95_std": 1.0}
                      for c, d in dice.items()},
    }
    hw = {"cpu": "Test CPU 9000", "cpu_count": 2, "cpus_usable": 2, "torch_threads": 2, "python": "3.11.7",
          "torch": "2.13.0+cpu", "monai": "1.6.1", "gpu": None}
    timings = {"prepare": 7.0, "train": 2400.0, "evaluate": 30.0, "total": 2437.0}
    results = ra.make_results(plan, summary, {}, timings, hw, {"commit": commit, "dirty": True}, argv)
    ra.write_results(results, repo / "docs" / "results")
    return results


def block(card: str, name: str) -> str:
    return card.split(mc.BEGIN.format(name=name), 1)[1].split(mc.END.format(name=name), 1)[0]


def acdc_card(repo: Path) -> str:
    return (repo / "docs" / "acdc_README.md").read_text()


def acdc_eval_metrics(repo: Path) -> dict:
    return json.loads((repo / "configs" / "acdc_bundle.json").read_text())["metadata"]["eval_metrics"]


def check(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.model_card", "--check", "--repo", str(repo)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------------- the committed files


def test_committed_cards_and_metadata_match_the_results_files():
    """The committed cards cannot drift from docs/results/: regenerate them with `python -m scripts.model_card`."""
    res = check(REPO)
    assert res.returncode == 0, res.stdout + res.stderr


def test_committed_cards_have_the_generated_blocks_once():
    for rel in ("docs/README.md", "docs/acdc_README.md"):
        card = (REPO / rel).read_text()
        for name in mc.SECTIONS:
            assert card.count(mc.BEGIN.format(name=name)) == 1 and card.count(mc.END.format(name=name)) == 1, rel
        assert "Research only, not for clinical use" in card


def test_paper_tables_are_the_papers():
    """PAPER_TABLES (data in code, with their citation) equal paper.md's tables, and the cards print them."""
    paper = shared_path("reference", "paper.md").read_text()
    tables = {"synapse": paper.split("Synapse multi-organ CT (30 BTCV", 1)[1],
              "acdc": paper.split("ACDC cardiac cine MRI", 1)[1]}
    cards = {"synapse": (REPO / "docs" / "README.md").read_text(), "acdc": acdc_card(REPO)}
    for task, text in tables.items():
        table = text.split("\n\n", 2)[1]
        header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
        assert [r[0] for r in rows] == list(mc.PAPER_TABLES[task].rows)
        classes = ["right_ventricle", "myocardium", "left_ventricle"] if task == "acdc" else [
            "aorta", "gallbladder", "kidney_left", "kidney_right", "liver", "pancreas", "spleen", "stomach"]
        names = ["mean"] + (["hd95"] if "HD95" in header else []) + classes
        for method, *numbers in rows:
            assert {k: float(v) for k, v in zip(names, numbers)} == dict(mc.PAPER_TABLES[task].rows[method])
            row = mc.PAPER_TABLES[task].rows[method]
            cells = [f"{row[k]:.2f}" for k in ["mean", *classes]]
            assert f"| {method} (paper) | {' | '.join(cells)} |" in block(cards[task], "performance")


# ---------------------------------------------------------------------------------- generation from results


def test_performance_block_and_eval_metrics_follow_the_results_file(fake_repo):
    synapse_card = (fake_repo / "docs" / "README.md").read_text()
    assert "no results of its own" in block(acdc_card(fake_repo), "performance")
    assert acdc_eval_metrics(fake_repo) == {}

    run = write_run(fake_repo, "cpu", {"right_ventricle": 0.8111, "myocardium": 0.7922, "left_ventricle": 0.9033},
                    hd95=4.25)
    s = run["settings"]
    res = check(fake_repo)
    assert res.returncode == 1 and "docs/acdc_README.md" in res.stderr and "configs/acdc_bundle.json" in res.stderr
    assert mc.main(["--repo", str(fake_repo)]) == 0
    assert check(fake_repo).returncode == 0

    perf = block(acdc_card(fake_repo), "performance")
    row = next(line for line in perf.splitlines() if "profile `cpu` (this project)" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0].startswith(f"LeViT-UNet-{s['variant']}, {s['img_size']} px, {s['epochs']} epochs")
    assert cells[1:] == ["83.55", "81.11", "79.22", "90.33", "4.25 voxels", "validation, 20 volumes"]
    assert "| LeViT-UNet-384 (paper) | 90.32 | 89.55 | 87.64 | 93.76 | not reported | test, 20 patients |" in perf
    flat = " ".join(perf.split())
    assert "Protocol: TransUNet's" in flat and "VALIDATION figure" in flat
    assert "`0123456789ab` with uncommitted changes" in flat and "Test CPU 9000" in flat
    assert "`python -m scripts.reproduce_acdc --profile cpu --workdir" in flat
    configured = json.loads((REPO / "configs" / "acdc.json").read_text()).get("img_size", 224)
    note = f"Its weights need `--img_size {s['img_size']}`"
    assert (note in flat) == (s["img_size"] != configured)  # only when the run's size is not the configs'
    assert "No trained weights are published yet" in flat
    assert "40.6 min end to end on Test CPU 9000 (2 CPUs, 2 torch threads)" in flat

    metrics = acdc_eval_metrics(fake_repo)
    assert metrics["mean_dice"] == round((0.8111 + 0.7922 + 0.9033) / 3, 4) and metrics["mean_hd95_voxels"] == 4.25
    assert metrics["class_dice"] == {"right_ventricle": 0.8111, "myocardium": 0.7922, "left_ventricle": 0.9033}
    assert "validation set, 20 volumes, transunet protocol" in metrics["evaluation"]
    assert (fake_repo / "docs" / "README.md").read_text() == synapse_card  # another task's results: untouched

    write_run(fake_repo, "cpu", {"right_ventricle": 0.5, "myocardium": 0.6, "left_ventricle": 0.7})
    assert check(fake_repo).returncode == 1
    assert mc.main(["--repo", str(fake_repo)]) == 0
    perf = block(acdc_card(fake_repo), "performance")
    assert "| 60.00 | 50.00 | 60.00 | 70.00 |" in perf and "83.55" not in perf
    assert acdc_eval_metrics(fake_repo)["mean_dice"] == 0.6


def test_the_gpu_profile_leads_and_smoke_runs_never_count(fake_repo):
    write_run(fake_repo, "cpu", {"right_ventricle": 0.8, "myocardium": 0.7, "left_ventricle": 0.9})
    write_run(fake_repo, "gpu", {"right_ventricle": 0.2, "myocardium": 0.3, "left_ventricle": 0.4}, limit=2)
    assert mc.main(["--repo", str(fake_repo)]) == 0
    perf = block(acdc_card(fake_repo), "performance")
    rows = [line for line in perf.splitlines() if "(this project)" in line]
    assert len(rows) == 2 and "profile `gpu`" in rows[0] and "smoke run (`--limit 2`): not a result" in rows[0]
    assert acdc_eval_metrics(fake_repo)["mean_dice"] == 0.8  # the cpu run: the gpu one is a smoke run
    write_run(fake_repo, "gpu", {"right_ventricle": 0.9, "myocardium": 0.88, "left_ventricle": 0.95})
    assert mc.main(["--repo", str(fake_repo)]) == 0
    assert acdc_eval_metrics(fake_repo)["mean_dice"] == 0.91
    assert "'gpu' profile" in acdc_eval_metrics(fake_repo)["evaluation"]


def test_the_bundle_carries_the_generated_card_and_metadata(fake_repo, tmp_path):
    write_run(fake_repo, "cpu", {"right_ventricle": 0.8111, "myocardium": 0.7922, "left_ventricle": 0.9033})
    with pytest.raises(BundleError, match="run `python -m scripts.model_card` first"):
        make_bundle("acdc", tmp_path / "stale", repo=fake_repo)  # no bundle with figures the card does not show
    assert not (tmp_path / "stale").exists()
    assert mc.main(["--repo", str(fake_repo)]) == 0
    out = make_bundle("acdc", tmp_path / "levit_unet_acdc", repo=fake_repo)
    card = (out / "docs" / "README.md").read_text()
    assert block(card, "performance") == block(acdc_card(fake_repo), "performance")
    assert "| 83.55 | 81.11 | 79.22 | 90.33 |" in card
    assert "`docs/results/acdc_cpu.md` of the source repository" in card  # no link into a folder the bundle lacks
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["eval_metrics"] == acdc_eval_metrics(fake_repo)
    schema = tmp_path / "schema.json"
    shutil.copy(shared_path("reference", "monai", "meta_schema_20240725.json"), schema)
    verify_metadata(meta_file=str(out / "configs" / "metadata.json"), filepath=str(schema))
    synapse = make_bundle("synapse", tmp_path / "levit_unet_synapse", repo=fake_repo)
    assert json.loads((synapse / "configs" / "metadata.json").read_text())["eval_metrics"] == {}


def test_speed_block_uses_the_newest_benchmark_file(fake_repo):
    levit = json.loads((REPO / "docs" / "results" / "benchmark_cpu_levit.json").read_text())
    (fake_repo / "docs" / "results" / "benchmark_cpu.json").unlink(missing_ok=True)  # the LeViT-only file alone
    assert mc.main(["--repo", str(fake_repo)]) == 0
    before = block((fake_repo / "docs" / "README.md").read_text(), "speed")
    assert "results/benchmark_cpu_levit.md" in before
    newer = json.loads(json.dumps(levit))
    newer["environment"]["date"] = "2099-01-01T00:00:00+00:00"
    newer["models"]["LeViT-UNet-128s"]["inference"]["fused_cl_bf16"]["8"]["img_s"] = 123.456
    newer["models"]["BasicUNet"] = {"error": "ImportError: a peer that could not be built"}
    (fake_repo / "docs" / "results" / "benchmark_cpu.json").write_text(json.dumps(newer))
    assert mc.main(["--repo", str(fake_repo)]) == 0
    after = block((fake_repo / "docs" / "README.md").read_text(), "speed")
    assert "results/benchmark_cpu.md" in after and "2099-01-01" in after
    assert re.search(r"^\| LeViT-UNet-128s \|.*\| 123\.5 \|$", after, re.M)
    assert "| BasicUNet | n/a | n/a | failed | failed | ImportError: a peer that could not be built |" in after
    assert block(acdc_card(fake_repo), "speed").count("123.5") == 1
    newer["environment"]["date"] = "2000-01-01T00:00:00+00:00"  # older than the LeViT-only file: not used
    (fake_repo / "docs" / "results" / "benchmark_cpu.json").write_text(json.dumps(newer))
    assert mc.main(["--repo", str(fake_repo)]) == 0
    assert block((fake_repo / "docs" / "README.md").read_text(), "speed") == before


def test_speed_figures_are_the_benchmark_files():
    data = json.loads((REPO / "docs" / "results" / "benchmark_cpu_levit.json").read_text())
    path, newest = mc.load_benchmark(REPO)
    speed = block((REPO / "docs" / "README.md").read_text(), "speed")
    assert f"results/{path.with_suffix('.md').name}" in speed
    for name, model in newest["models"].items():
        if "error" in model:
            continue
        best = model["best_inference_form"]
        figures = [f"{model['inference'][form][str(b)]['img_s']:.1f}" for form in ("eager_fp32", best) for b in (1, 8)]
        assert f"| {name} | {model['params_m']:.3f} | {model['gmac']:.2f} | {figures[0]} | {figures[1]} | `{best}` | " \
               f"{figures[2]} | {figures[3]} |" in speed
    assert data["models"]  # the LeViT-only file is there in any case


def volume_report(depth: int, total: float, rss: float) -> dict:
    """A --volume results file as scripts/benchmark.py writes it (the fields the card reads)."""
    stages = {"setup": 1.0, "load_weights": 0.2, "read": 0.5, "preprocess": 0.3, "inference": total - 6.0,
              "invert": 0.4, "save": 0.6, "other": 0.1}
    return {"environment": {"date": "2099-01-01T00:00:00+00:00", "command": "python3 -m scripts.benchmark --volume",
                            "git_commit": "fedcba9876543210", "cpu": "Test CPU 9000", "threads": 2},
            "settings": {"img_size": 224, "threads": 2}, "weights": "random",
            "volume": {"shape": [512, 512, depth], "dtype": "int16", "orientation": "LPS"},
            "models": {"LeViT-UNet-128s": {"total_s": total, "workflow_s": total - 3, "stages_s": stages,
                                           "peak_rss_mb": rss}}}


def test_speed_block_tabulates_every_volume_benchmark(fake_repo):
    results = fake_repo / "docs" / "results"
    for path in results.glob("benchmark_volume_cpu*.json"):
        path.unlink()
    assert mc.main(["--repo", str(fake_repo)]) == 0
    assert "Whole CT-like volumes" not in block((fake_repo / "docs" / "README.md").read_text(), "speed")
    (results / "benchmark_volume_cpu_600.json").write_text(json.dumps(volume_report(600, 95.4, 5432.1)))
    (results / "benchmark_volume_cpu.json").write_text(json.dumps(volume_report(150, 24.5, 2100.0)))
    assert mc.main(["--repo", str(fake_repo)]) == 0
    for card in ((fake_repo / "docs" / "README.md").read_text(), acdc_card(fake_repo)):
        speed = block(card, "speed")
        rows = [ln for ln in speed.splitlines() if ln.startswith("| 512 x 512 x")]
        # the shallow volume first; total, network (inference stage), the other stages summed, peak RSS
        assert rows == ["| 512 x 512 x 150 | LeViT-UNet-128s | 24.5 | 18.5 | 3.1 | 2100 |",
                        "| 512 x 512 x 600 | LeViT-UNet-128s | 95.4 | 89.4 | 3.1 | 5432 |"]
        assert "benchmark_volume_cpu_600.md" in speed and "`fedcba987654`" in speed
    (results / "benchmark_volume_cpu_bad.json").write_text(json.dumps({"models": {}}))
    with pytest.raises(mc.ModelCardError, match="benchmark_volume_cpu_bad.json"):
        mc.generate(fake_repo)


def test_a_card_without_markers_is_refused(fake_repo):
    card = fake_repo / "docs" / "acdc_README.md"
    card.write_text(card.read_text().replace(mc.END.format(name="speed"), ""))
    with pytest.raises(mc.ModelCardError, match="generated: speed"):
        mc.generate(fake_repo)
    assert mc.main(["--repo", str(fake_repo), "--check"]) == 2
