"""Fill the measured parts of the model cards and metadata from the results files: ``python -m scripts.model_card``.

    python -m scripts.model_card            # rewrite what differs (atomically), list the files written
    python -m scripts.model_card --check    # exit 1, listing the files, when a committed file differs

Figures in a model card are never typed by hand. For each task's bundle (the root's Synapse one and the
ACDC one that ``python -m scripts.make_bundle acdc`` writes) this tool writes:

- the card's "Performance" block (between ``<!-- BEGIN generated: performance ... -->`` and
  ``<!-- END generated: performance -->``) from ``docs/results/<task>_<profile>.json`` (written by
  ``python -m scripts.reproduce_acdc --profile <profile>``; schema: ``reproduce_acdc.make_results``): one row
  per profile run, the paper's rows beside them (``PAPER_TABLES``: the published figures, with their
  citation), the evaluation protocol, the settings, hardware, command, commit and date of each run, and
  whether weights are published (the bundle's large-files list). A task without a results file says so;
- the card's "Speed" block from the newest (by its recorded date) of ``docs/results/benchmark_cpu.json``
  and ``docs/results/benchmark_cpu_levit.json`` (``python -m scripts.benchmark ... --json``), and whole-volume
  timings from every ``docs/results/benchmark_volume_cpu*.json`` (``python -m scripts.benchmark --volume
  ... --json``);
- the metadata's ``eval_metrics`` from the same results file as the card (the ``gpu`` profile's when
  present, else the ``cpu`` one's; smoke runs made with ``--limit`` never count), ``{}`` without one:
  ``configs/metadata.json`` for the root's task, the ``"metadata"`` overrides of ``configs/<task>_bundle.json``
  for the others (``make_bundle`` carries them into the bundle).

Only the generated blocks and the ``eval_metrics`` value change; every other byte of the files is kept.
``tests/test_model_card.py`` runs ``--check``, so the committed cards cannot drift from the results files,
and ``make_bundle`` refuses to write a bundle whose card or metadata is stale.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from scripts.atomic import atomic_output
from scripts.make_bundle import (
    REPO,
    ROOT_TASK,
    TASKS,
    BundleError,
    bundle_network,
    load_preset,
    load_task_data,
    set_values,
    task_large_files,
)
from scripts.reproduce_acdc import PAPER_ACDC

__all__ = ["ModelCardError", "PAPER_TABLES", "generate", "stale_files", "main"]

RESULTS_DIR = Path("docs") / "results"
BENCHMARK_FILES = ("benchmark_cpu.json", "benchmark_cpu_levit.json")  # the newest (by its date) is used
VOLUME_FILES = "benchmark_volume_cpu*.json"  # every one is tabulated, by volume depth
SECTIONS = ("performance", "speed")
PROFILE_ORDER = ("gpu", "cpu")  # rows and eval_metrics: the paper's setting first
BEGIN = "<!-- BEGIN generated: {name} (python -m scripts.model_card writes this block from docs/results/) -->"
END = "<!-- END generated: {name} -->"

# Column names of the per-class Dice.
SHORT_NAMES = {
    "aorta": "aorta", "gallbladder": "gallbladder", "kidney_left": "kidney L", "kidney_right": "kidney R",
    "liver": "liver", "pancreas": "pancreas", "spleen": "spleen", "stomach": "stomach",
    "right_ventricle": "RV", "myocardium": "Myo", "left_ventricle": "LV",
}
PROTOCOL_TEXT = {
    "transunet": "TransUNet's, as the paper evaluates (`eval_protocol` transunet of `configs/evaluate.json`): per "
                 "volume and class, 3D Dice and HD95 as medpy computes them, HD95 in voxels; every slice resized "
                 "to the network's size and the prediction brought back with nearest neighbour; a class predicted "
                 "but absent from the label scores Dice 1 / HD95 0, an empty prediction 0 / 0; means over the "
                 "volumes",
    "strict": "`eval_protocol` strict of `configs/evaluate.json`: per volume and class, 3D Dice and HD95 (voxels); "
              "a class empty in both prediction and label is left out of the means, HD95 to an empty mask is "
              "undefined",
}
FORM_TEXT = {
    "eager_fp32": "the plain network in fp32",
    "fused": "BatchNorm folded",
    "fused_cl": "BatchNorm folded, channels_last",
    "fused_cl_bf16": "BatchNorm folded, channels_last, bf16 autocast, conv/linear weights cast to bf16 once",
    "cl": "channels_last",
    "cl_bf16": "channels_last, bf16 autocast",
}


class ModelCardError(RuntimeError):
    """A card or results file cannot be read or lacks what the generated sections need."""


@dataclass(frozen=True)
class PaperTable:
    """A results table of the paper: Dice % per method (``mean``, each class, ``hd95`` when reported)."""

    citation: str
    evaluated_on: str
    protocol: str
    rows: Mapping[str, Mapping[str, float]]


# The paper's figures (Xu et al., "LeViT-UNet: Make Faster Encoders with Transformer for Medical Image
# Segmentation", arXiv 2107.08623, PRCV 2023; transcribed in ../shared/reference/paper.md, "Reported results",
# and checked against it by tests/test_model_card.py). They are the paper's, never this project's.
PAPER_TABLES = {
    "synapse": PaperTable(
        citation="Xu et al. 2021, arXiv 2107.08623, Synapse multi-organ CT table",
        evaluated_on="test, 12 cases",
        protocol="Synapse test set of TransUNet's split (12 of the 30 BTCV cases), TransUNet's protocol: Dice % and "
                 "HD95, means over the cases",
        rows={
            "LeViT-UNet-384": {"mean": 78.53, "hd95": 16.84, "aorta": 87.33, "gallbladder": 62.23, "kidney_left": 84.61,
                               "kidney_right": 80.25, "liver": 93.11, "pancreas": 59.07, "spleen": 88.86,
                               "stomach": 72.76},
            "TransUNet": {"mean": 77.48, "hd95": 31.69, "aorta": 87.23, "gallbladder": 63.13, "kidney_left": 81.87,
                          "kidney_right": 77.02, "liver": 94.08, "pancreas": 55.86, "spleen": 85.08, "stomach": 75.62},
            "Swin-Unet": {"mean": 79.13, "hd95": 21.55, "aorta": 85.47, "gallbladder": 66.53, "kidney_left": 83.28,
                          "kidney_right": 79.61, "liver": 94.29, "pancreas": 56.58, "spleen": 90.66, "stomach": 76.60},
            "U-Net": {"mean": 76.85, "hd95": 39.70, "aorta": 89.07, "gallbladder": 69.72, "kidney_left": 77.77,
                      "kidney_right": 68.60, "liver": 93.43, "pancreas": 53.98, "spleen": 86.67, "stomach": 75.58},
            "Att-UNet": {"mean": 77.77, "hd95": 36.02, "aorta": 89.55, "gallbladder": 68.88, "kidney_left": 77.98,
                         "kidney_right": 71.11, "liver": 93.57, "pancreas": 58.04, "spleen": 87.30, "stomach": 75.75},
        },
    ),
    "acdc": PaperTable(
        citation="Xu et al. 2021, arXiv 2107.08623, ACDC table",
        evaluated_on="test, 20 patients",
        protocol="the 20 test patients of the paper's 70/10/20 split of the 100 ACDC training patients: Dice %, "
                 "the mean over the three structures; no HD95 reported",
        rows=PAPER_ACDC,  # the same dict scripts/reproduce_acdc.py writes into its results files
    ),
}


# ------------------------------------------------------------------------------------------------ reading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelCardError(f"cannot read {path}: {e}") from e


def _profile_key(path: Path, task: str) -> tuple[int, str]:
    profile = path.stem[len(task) + 1 :]
    return (PROFILE_ORDER.index(profile) if profile in PROFILE_ORDER else len(PROFILE_ORDER), profile)


def load_results(task: str, repo: Path = REPO) -> list[tuple[Path, dict[str, Any]]]:
    """``docs/results/<task>_<profile>.json`` files (``gpu`` first, then ``cpu``, then the others), checked."""
    classes = load_preset(task, repo)["label_names"][1:]
    found = []
    for path in sorted((repo / RESULTS_DIR).glob(f"{task}_*.json"), key=lambda p: _profile_key(p, task)):
        results = _read_json(path)
        try:
            per_class = results["metrics"]["per_class"]
            missing = [c for c in classes if c not in per_class]
            for key in ("profile", "settings", "hardware", "commands", "timings_s", "evaluation_set", "num_cases"):
                results[key]
        except (KeyError, TypeError) as e:
            raise ModelCardError(f"{path} is not a results file of scripts/reproduce_acdc.py (no {e})") from e
        if missing:
            raise ModelCardError(f"{path} has no figures for the classes {missing} of configs/{task}.json")
        found.append((path, results))
    return found


def load_volume_benchmarks(repo: Path = REPO) -> list[tuple[Path, dict[str, Any]]]:
    """Every whole-volume benchmark file (``scripts.benchmark --volume --json``), the shallowest volume first."""
    found = []
    for path in sorted((repo / RESULTS_DIR).glob(VOLUME_FILES)):
        data = _read_json(path)
        if not isinstance(data.get("models"), dict) or "shape" not in data.get("volume", {}):
            raise ModelCardError(f"{path} is not a --volume results file of scripts/benchmark.py")
        found.append((path, data))
    return sorted(found, key=lambda pd: (pd[1]["volume"]["shape"][2], pd[0].name))


def load_benchmark(repo: Path = REPO) -> tuple[Path, dict[str, Any]] | None:
    """The newest benchmark results file with per-model figures (its ``environment.date``), or None."""
    candidates = []
    for name in BENCHMARK_FILES:
        path = repo / RESULTS_DIR / name
        if path.is_file():
            data = _read_json(path)
            if isinstance(data.get("models"), dict) and data["models"]:
                date = data.get("environment", {}).get("date", "1970-01-01T00:00:00+00:00")
                candidates.append((datetime.datetime.fromisoformat(date), path, data))
    if not candidates:
        return None
    _, path, data = max(candidates, key=lambda c: c[0])
    return path, data


# ------------------------------------------------------------------------------------------------ formatting


def _f(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _wrap(text: str, bullet: bool = False) -> str:
    """A paragraph (or a ``- `` bullet) wrapped at 110 characters, as the hand-written parts of the cards are."""
    return textwrap.fill(text, width=110, initial_indent="- " if bullet else "",
                         subsequent_indent="  " if bullet else "", break_long_words=False, break_on_hyphens=False)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def _results_ref(path: Path, repo_card: bool, suffix: str = ".md") -> str:
    """A link from a card in docs/ (root) or the path in the source repository (a generated bundle's card)."""
    name = path.with_suffix(suffix).name
    if repo_card:
        return f"[results/{name}](results/{name})"
    return f"`docs/results/{name}` of the source repository"


def _python_command(command: str) -> str:
    """A recorded command line with its interpreter's path shown as ``python``."""
    head, sep, tail = command.partition(" -m ")
    return "python -m " + tail if sep and "/" in head and " " not in head.strip() else command


def _minutes(seconds: Any) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def _label(results: Mapping[str, Any]) -> str:
    s = results["settings"]
    epochs = s.get("epochs")
    label = (f"LeViT-UNet-{s.get('variant')}, {s.get('img_size')} px, {epochs} epoch{'s' if epochs != 1 else ''}, "
             f"profile `{results['profile']}` (this project)")
    if results.get("limit"):
        label += f", smoke run (`--limit {results['limit']}`): not a result"
    return label


def _overrides_note(settings: Mapping[str, Any], network: Mapping[str, Any]) -> str:
    """How to run the bundle with weights trained at other settings than its configs' (empty when the same)."""
    differ = [k for k in ("variant", "img_size") if str(settings.get(k)) != str(network[k])]
    if not differ:
        return ""
    flags = " ".join(f"--{k} {settings.get(k)}" for k in differ)
    defaults = ", ".join(f"{k} {network[k]}" for k in differ)
    return f" Its weights need `{flags}` with the bundle's commands (the configs' defaults: {defaults})."


def _augmentation(settings: Mapping[str, Any]) -> str:
    """The orientation augmentations' probabilities, when the results file records them."""
    probs = [f"{what} p {settings[k]}" for k, what in (("rot90_prob", "90-degree rotation"), ("flip_prob", "flip"))
             if k in settings]
    return f", augmentation: rotation within +-20 degrees, {', '.join(probs)}" if probs else ""


def _machine(hw: Mapping[str, Any]) -> str:
    """The hardware of a results file in words: the GPU (if one was used), the CPU and its threads."""
    where = f"{hw.get('cpu', 'unknown CPU')} ({hw.get('cpus_usable', hw.get('cpu_count'))} CPUs, " \
            f"{hw.get('torch_threads')} torch threads)"
    return f"{hw['gpu']} and {where}" if hw.get("gpu") else where


def _run_details(path: Path, results: Mapping[str, Any], repo_card: bool, network: Mapping[str, Any]) -> str:
    s, hw, t = results["settings"], results["hardware"], results["timings_s"]
    protocol = results.get("metrics_summary", {}).get("protocol", "transunet")
    commit = results.get("git_commit")
    commit_text = f"git commit `{commit[:12]}`" if commit else "unknown git commit"
    if results.get("git_dirty"):
        commit_text += " with uncommitted changes"
    precision = "CUDA AMP" if s.get("amp") else s.get("train_precision")
    warmup_epochs = s.get("warmup_epochs") or 0
    warmup = f"{warmup_epochs}-epoch linear warm-up, then " if warmup_epochs else ""
    return _wrap(" ".join([
        f"Profile `{results['profile']}` ({_results_ref(path, repo_card)}, curves and per-class spread there): "
        f"{results.get('evaluation_note', '')}",
        f"Training: LeViT-UNet-{s.get('variant')}, {s.get('img_size')} x {s.get('img_size')} slices, "
        f"{s.get('epochs')} epoch{'s' if s.get('epochs') != 1 else ''} of {s.get('samples_per_volume')} "
        f"random slices per training volume, batches of {s.get('batch_size')} slices, {s.get('optimizer')} "
        f"(lr {s.get('lr')}, {warmup}{s.get('lr_schedule')} schedule, weight decay {s.get('weight_decay')}), "
        f"{precision} training precision{_augmentation(s)}, seed {s.get('seed')}.{_overrides_note(s, network)}",
        f"Protocol: {PROTOCOL_TEXT.get(protocol, f'`eval_protocol` {protocol}')}.",
        f"Run on {_machine(hw)}, torch {hw.get('torch')}, MONAI {hw.get('monai')}, Python {hw.get('python')}: "
        f"{_minutes(t.get('total'))} in all, of which training {_minutes(t.get('train'))}; "
        f"{str(results.get('date', ''))[:10]}, {commit_text}.",
        f"Command: `{results['commands']['reproduce']}`.",
    ]), bullet=True)


def _weights_text(large_files: Sequence[Mapping[str, str]], runs: Sequence[Mapping[str, Any]]) -> str:
    """Where the weights come from: the published list, else the training (and how long the last profile took)."""
    if large_files:
        listed = ", ".join(f"`{e['path']}` (sha256 `{e['hash_val'][:16]}...`)" for e in large_files)
        return (f"Published weights: {listed}, listed in `large_files.yml`; fetch them with "
                "`python -m monai.bundle download_large_files --bundle_path BUNDLE_DIR`.")
    text = "No trained weights are published yet: `models/model.pt` comes from running the training"
    timed = [r for r in runs if not r.get("limit") and r["timings_s"].get("total")]
    if timed:
        r = timed[-1]
        text += (f"; the `{r['profile']}` profile above took {_minutes(r['timings_s']['total'])} end to end on "
                 f"{_machine(r['hardware'])}")
    return text + ". Every command that needs weights stops with a message naming the missing file."


def performance_block(task: str, runs: Sequence[tuple[Path, Mapping[str, Any]]],
                      large_files: Sequence[Mapping[str, str]], repo_card: bool, repo: Path = REPO) -> str:
    """The "Performance" section's text: this project's rows (if any), the paper's, how each was measured."""
    classes = load_preset(task, repo)["label_names"][1:]
    paper = PAPER_TABLES[task]
    header = ["model", "mean Dice", *(SHORT_NAMES.get(c, c) for c in classes), "mean HD95", "evaluated on"]
    rows = []
    for _, r in runs:
        m = r["metrics"]
        rows.append([_label(r), _f(m.get("mean_dice_pct")), *(_f(m["per_class"][c].get("dice_pct")) for c in classes),
                     f"{_f(m.get('mean_hd95_voxels'))} voxels", f"{r['evaluation_set']}, {r['num_cases']} volumes"])
    for method, row in paper.rows.items():
        hd95 = f"{row['hd95']:.2f}" if "hd95" in row else "not reported"
        rows.append([f"{method} (paper)", f"{row['mean']:.2f}", *(f"{row[c]:.2f}" for c in classes), hd95,
                     paper.evaluated_on])
    lines = []
    if runs:
        files = ", ".join(f"`{RESULTS_DIR.as_posix()}/{p.name}`" for p, _ in runs)
        lines += [_wrap(f"Dice (%) and HD95 measured by this project's own runs ({files}), beside the paper's rows. "
                  "The two are not the same evaluation: see \"evaluated on\" and the notes below."), ""]
    else:
        lines += [_wrap("This project has no results of its own for this task yet "
                  f"(no `{RESULTS_DIR.as_posix()}/{task}_*.json`), so this card reports no accuracy of its own. "
                  "`configs/evaluate.json` writes this project's table in the same layout (`eval/metrics_summary.md`). "
                  "The paper's rows, for reference:"), ""]
    lines += _table(header, rows)
    lines += [""]
    network = bundle_network(task, repo)
    lines += [_run_details(path, r, repo_card, network) for path, r in runs]
    lines += [_wrap(f"The paper's rows ({paper.citation}): {paper.protocol}.", bullet=True), ""]
    lines += [_wrap(_weights_text(large_files, [r for _, r in runs]))]
    return "\n".join(lines)


def _throughput(model: Mapping[str, Any], form: str | None, batch: int, kind: str = "inference") -> str:
    per_batch = model.get(kind, {}).get(form or "", {})
    if "error" in per_batch:
        return "failed"
    return _f(per_batch.get(str(batch), {}).get("img_s"), 1 if kind == "inference" else 2)


def speed_block(task: str, benchmark: tuple[Path, Mapping[str, Any]] | None, repo_card: bool) -> str:
    """The "Speed" section's text from a ``scripts/benchmark.py`` results file."""
    if benchmark is None:
        return (f"No benchmark results file (`{RESULTS_DIR.as_posix()}/{BENCHMARK_FILES[0]}` or "
                f"`{BENCHMARK_FILES[1]}`) yet: `python -m scripts.benchmark --train --json FILE` measures the speed.")
    path, data = benchmark
    env, settings, models = data.get("environment", {}), data.get("settings", {}), data["models"]
    size = settings.get("img_size")
    batches = sorted(int(b) for b in settings.get("batch_sizes", []))
    cpu = env.get("cpu") if env.get("device", "cpu") == "cpu" else env.get("device")
    extras = "; native bf16: AVX512-BF16" if env.get("avx512_bf16") else ""
    commit = env.get("git_commit")
    lines = [
        f"Images ({size} x {size} slices) per second on {cpu} ({env.get('threads')} threads{extras}), torch "
        f"{env.get('torch')}, MONAI {env.get('monai')}; from {_results_ref(path, repo_card)}, measured by "
        f"`{_python_command(env.get('command', 'n/a'))}`"
        + (f" at git commit `{commit[:12]}`" if commit else "") + f", {str(env.get('date', ''))[:10]}. Each model "
        "runs the plain network in fp32 (\"eager\") and its fastest measured form (LeViT-UNet: "
        f"{FORM_TEXT['fused_cl_bf16']}, the form this bundle's inference builds from the weights, bf16 where "
        "the CPU has it natively; MONAI peers: channels_last forms). Throughput at each batch size is the median "
        "of repeated timed iterations after warm-up.",
    ]
    if task != "synapse":
        lines[0] += (" Measured with 9 output classes (the Synapse head); the network is the same here, only its "
                     "last 3x3 convolution has fewer output channels.")
    lines = [_wrap(lines[0]), ""]
    header = ["model", "params (M)", "GMac / image", *(f"eager fp32, batch {b}" for b in batches), "fastest form",
              *(f"fastest, batch {b}" for b in batches)]
    rows = []
    for name, model in models.items():
        if "error" in model:
            failed = ["failed"] * len(batches)
            rows.append([name, "n/a", "n/a", *failed, model["error"], *failed])
            continue
        best = model.get("best_inference_form")
        rows.append([name, _f(model.get("params_m"), 3), _f(model.get("gmac")),
                     *(_throughput(model, "eager_fp32", b) for b in batches), f"`{best}`" if best else "n/a",
                     *(_throughput(model, best, b) for b in batches)])
    lines += _table(header, rows)
    trained = {name: m for name, m in models.items() if m.get("train")}
    if trained:
        train_batch = settings.get("train_batch")
        lines += ["", _wrap(f"Training, batch {train_batch} (forward + cross-entropy + backward + Adam step), "
                            "images per second:"), ""]
        lines += _table(["model", "form", "img/s"], [[name, f"`{form}`", _throughput(m, form, train_batch, "train")]
                                                     for name, m in trained.items() for form in m["train"]])
    return "\n".join(lines)


def volume_block(volumes: Sequence[tuple[Path, Mapping[str, Any]]], repo_card: bool) -> str:
    """Whole-volume inference through ``configs/inference.json`` (``scripts.benchmark --volume``), one row per
    (volume, model); empty text without results files."""
    if not volumes:
        return ""
    rows, sources = [], []
    for path, data in volumes:
        env, vol = data.get("environment", {}), data["volume"]
        shape = " x ".join(str(s) for s in vol["shape"])
        for name, m in data["models"].items():
            st = m.get("stages_s", {})
            rows.append([shape, name, _f(m.get("total_s"), 1), _f(st.get("inference"), 1),
                         _f(sum(v for k, v in st.items() if k != "inference"), 1), _f(m.get("peak_rss_mb"), 0)])
        commit = env.get("git_commit")
        sources.append(f"{_results_ref(path, repo_card)}: `{_python_command(env.get('command', 'n/a'))}`"
                       + (f" at git commit `{commit[:12]}`" if commit else "") + f", {str(env.get('date', ''))[:10]}")
    env = volumes[0][1].get("environment", {})
    text = ("Whole CT-like volumes (int16 HU, 0.75 x 0.75 x 2.5 mm, LPS) segmented by `python -m monai.bundle run` "
            "with `configs/inference.json` and the Synapse preset (224 px slices; load, orientation, intensity window, "
            f"slice resize + network + argmax, inversion, save) on {env.get('cpu')} ({env.get('threads')} threads), random weights (speed does not "
            "depend on them). \"total\" is the wall time of the whole command (interpreter start and imports "
            "included), \"network\" the slice inferer's call (resize, network, argmax), \"other stages\" the rest "
            "of the workflow (config, weights, reading, transforms, inversion, saving); peak RSS is that process's "
            "peak resident memory. From " + "; ".join(sources) + ".")
    lines = ["", _wrap(text), ""]
    lines += _table(["volume (voxels)", "model", "total s", "network s", "other stages s", "peak RSS MB"], rows)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ eval_metrics


def _round(x: Any) -> Any:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 4)


def eval_metrics(task: str, runs: Sequence[tuple[Path, Mapping[str, Any]]], repo: Path = REPO) -> dict[str, Any]:
    """The metadata's ``eval_metrics`` (Dice as a fraction, as the model zoo writes it) of the first real run."""
    real = [(p, r) for p, r in runs if not r.get("limit")]
    if not real:
        return {}
    path, r = real[0]
    m = r["metrics"]
    protocol = r.get("metrics_summary", {}).get("protocol", "transunet")
    classes = load_preset(task, repo)["label_names"][1:]
    return {
        "mean_dice": _round(m.get("mean_dice")),
        "mean_hd95_voxels": _round(m.get("mean_hd95_voxels")),
        "class_dice": {c: _round(m["per_class"][c].get("dice")) for c in classes},
        "evaluation": f"{r['evaluation_set']} set, {r['num_cases']} volumes, {protocol} protocol; "
                      f"LeViT-UNet-{r['settings'].get('variant')} of the '{r['profile']}' profile, "
                      f"{r.get('checkpoint', 'n/a')}; {RESULTS_DIR.as_posix()}/{path.name}",
    }


# ------------------------------------------------------------------------------------------------ files


def card_path(task: str, repo: Path = REPO) -> str:
    return load_task_data(task, repo).get("model_card") or "docs/README.md"


def metadata_target(task: str) -> tuple[str, str]:
    """(file, ``a#b`` key path) holding the task's ``eval_metrics``."""
    if task == ROOT_TASK:
        return "configs/metadata.json", "eval_metrics"
    return f"configs/{task}_bundle.json", "metadata#eval_metrics"


def replace_block(text: str, name: str, content: str, what: str) -> str:
    """``text`` with the generated block ``name`` holding ``content``; its markers must appear exactly once."""
    begin, end = BEGIN.format(name=name), END.format(name=name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ModelCardError(f"{what} must hold the lines\n{begin}\n...\n{end}\nonce each, in this order")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{content.strip()}\n{end}{tail}"


def generate(repo: Path = REPO, tasks: Sequence[str] = TASKS) -> dict[str, str]:
    """Relative path -> the text each generated-into file should have (only the files of ``tasks``)."""
    benchmark = load_benchmark(repo)
    volumes = load_volume_benchmarks(repo)
    out: dict[str, str] = {}
    for task in tasks:
        try:
            runs = load_results(task, repo)
            large_files = task_large_files(task, repo)
            card_rel = card_path(task, repo)
        except BundleError as e:
            raise ModelCardError(str(e)) from e
        repo_card = task == ROOT_TASK  # the root's card sits beside docs/results; a generated bundle's does not
        card = out.get(card_rel) or (repo / card_rel).read_text()
        card = replace_block(card, "performance", performance_block(task, runs, large_files, repo_card, repo), card_rel)
        speed = speed_block(task, benchmark, repo_card) + "\n" + volume_block(volumes, repo_card)
        card = replace_block(card, "speed", speed, card_rel)
        out[card_rel] = card
        meta_rel, key = metadata_target(task)
        meta = out.get(meta_rel) or (repo / meta_rel).read_text()
        try:
            out[meta_rel] = set_values(meta, {key: eval_metrics(task, runs, repo)}, meta_rel)
        except BundleError as e:
            raise ModelCardError(f"{meta_rel}: {e} (add \"eval_metrics\": {{}} there)") from e
    return out


def stale_files(repo: Path = REPO, tasks: Sequence[str] = TASKS) -> list[str]:
    """The files of ``tasks`` whose committed text differs from what :func:`generate` gives."""
    return [rel for rel, text in generate(repo, tasks).items() if (repo / rel).read_text() != text]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.model_card", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change")
    parser.add_argument("--task", choices=TASKS, action="append", help="only this task (repeatable; default all)")
    parser.add_argument("--repo", type=Path, default=REPO, help="the repository (default: this one)")
    args = parser.parse_args(argv)
    tasks, repo = args.task or list(TASKS), args.repo.resolve()
    try:
        texts = generate(repo, tasks)
    except ModelCardError as e:
        print(f"model_card: error: {e}", file=sys.stderr)
        return 2
    stale = [rel for rel, text in texts.items() if (repo / rel).read_text() != text]
    if args.check:
        if stale:
            print("model_card: out of date with docs/results/ (run `python -m scripts.model_card`): "
                  + ", ".join(stale), file=sys.stderr)
            return 1
        print("model_card: the model cards and metadata match docs/results/")
        return 0
    for rel in stale:
        with atomic_output(repo / rel) as tmp:
            tmp.write_text(texts[rel])
        print(f"wrote {rel}")
    if not stale:
        print("model_card: nothing to change")
    return 0


if __name__ == "__main__":
    sys.exit(main())
