"""Write a complete, standalone MONAI bundle for one of the paper's tasks: ``python -m scripts.make_bundle``.

A MONAI bundle has one ``metadata.json`` (one set of output channels and label names) and MONAI Label reads
one ``inference.json``, so the dataset presets (``configs/synapse.json``, ``configs/acdc.json``) cannot make
this repository serve both tasks by themselves. This tool writes a bundle per task::

    python -m scripts.make_bundle synapse OUT_DIR            # the repository root's bundle, reproduced
    python -m scripts.make_bundle acdc OUT_DIR [--force]     # the ACDC cardiac MRI bundle

Sources, so that the two bundles cannot drift apart:

- the repository root is the Synapse bundle and the only hand-written set of configs;
- ``configs/<task>.json`` (the preset) is merged INTO each config that defines its keys (``num_classes``,
  ``label_names``, ``intensity``, ``dataset_dir``): the value's text is replaced in place, rendered in the
  style of the text it replaces (one line stays one line, indented blocks stay 4-space indented), every
  other byte of the file is kept, so key order and formatting are the root's. The written bundle needs no
  preset file;
- ``configs/metadata.json`` gets the preset's output channels (``num_channels``, ``channel_def`` of each
  segmentation output) and, for ACDC, the overrides of ``configs/acdc_bundle.json`` (``"metadata"``: keys
  in MONAI's ``a#b#c`` path form; each must already exist in the Synapse metadata);
- the model card is ``docs/README.md`` (Synapse) or the file ``configs/<task>_bundle.json`` names
  (``docs/acdc_README.md``), where the line ``<!-- make_bundle: architecture diagram from docs/README.md -->``
  becomes the Synapse card's architecture diagram. Its "Performance" and "Speed" sections and the metadata's
  ``eval_metrics`` are generated from ``docs/results/`` by ``python -m scripts.model_card``; a card or metadata
  that differs from what that tool would write is refused (run it first), so no bundle carries stale figures;
- ``large_files.yml`` (where published weights download from, the model zoo's format) is the root's file for
  Synapse; for another task it is written from the ``"large_files"`` list of ``configs/<task>_bundle.json``
  (empty: no weights published), never the root's, whose weights belong to another network.
  ``python -m scripts.release_weights`` fills either list.

Merging the Synapse preset into the root's files changes nothing, so ``synapse`` writes the root's
``configs/*.json``, ``configs/logging.conf``, ``docs/README.md``, ``LICENSE`` and ``large_files.yml`` byte
for byte (``tests/test_make_bundle.py`` checks it).

Every bundle also holds ``scripts/`` (without ``__pycache__``, without the repository tools ``make_bundle.py``,
``model_card.py`` and ``release_weights.py``, and without
what ``exclude_scripts`` of ``configs/<task>_bundle.json`` lists: ACDC drops ``demo.py``, whose synthetic data
is Synapse-like CT), ``docs/data_license.txt``, an empty ``models/``, a short ``README.md`` and a relative
``metadata.json`` link to ``configs/metadata.json``. The bundle is written into a temporary sibling folder
and renamed into place, so a failure leaves no half bundle; a non-empty OUT_DIR is refused unless
``--force`` (which replaces only a previous bundle: a folder holding ``configs/metadata.json``, never the
repository itself nor a folder inside its configs/, docs/, models/ or scripts/).

Publishing the ACDC bundle in a release::

    python -m scripts.make_bundle acdc dist/levit_unet_acdc --force
    (cd dist && zip -ry levit_unet_acdc_v0.1.0.zip levit_unet_acdc)   # v: the "version" of its metadata.json

then attach the zip to the release. Weights are published apart from the zip: upload ``model.pt``, then
``python -m scripts.release_weights --task acdc --file PATH/model.pt --path models/model.pt --url URL`` (checks
it is a bare, unfused state_dict of the bundle's network and records its URL and sha256), regenerate the cards
(``python -m scripts.model_card``) and the bundle; users fetch the weights with
``python -m monai.bundle download_large_files --bundle_path levit_unet_acdc``. MONAI Label serves the folder as
it is: link ``dist/levit_unet_acdc`` under the ``monaibundle`` app's ``model/`` folder. Raise the ACDC
``version`` / ``changelog`` in ``configs/acdc_bundle.json`` for each published change.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
TASKS = ("acdc", "synapse")
ROOT_TASK = "synapse"  # the task whose bundle the repository root is
CONFIG_FILES = ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json")
COPIED_FILES = ("configs/logging.conf", "LICENSE", "docs/data_license.txt")
LARGE_FILES = "large_files.yml"
LARGE_FILE_KEYS = ("path", "url", "hash_type", "hash_val")  # the model zoo's entries, in this order
# tools of this repository (they edit its docs/ and configs/), meaningless inside a bundle
REPO_ONLY_SCRIPTS = ("make_bundle.py", "model_card.py", "release_weights.py")
DIAGRAM_MARKER = "<!-- make_bundle: architecture diagram from docs/README.md -->"
ID = "#"  # MONAI's key-path separator

# How each task's data is prepared (the generated README's commands).
PREPARE = {
    "synapse": [
        ("Synapse / BTCV as downloaded (RawData/Training/img, label)", "synapse-raw --input /data/BTCV/RawData"),
        ("Synapse as preprocessed by TransUNet (train_npz/, test_vol_h5/)", "synapse-transunet --input /data/Synapse"),
    ],
    "acdc": [
        ("ACDC as downloaded (patientNNN/...frameFF.nii.gz + _gt)", "acdc-raw --input /data/ACDC/training"),
        ("ACDC in the SSL4MIS HDF5 form (no test patients: evaluate with --eval_key validation)",
         "acdc-ssl4mis --input /data/ACDC_ssl4mis"),
    ],
}


class BundleError(RuntimeError):
    """The bundle cannot be written (bad source files, refused output folder)."""


# ------------------------------------------------------------------------ formatting-preserving JSON edits


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def value_span(text: str, path: Sequence[str]) -> tuple[int, int] | None:
    """``(start, end)`` of the text of the value at the key ``path`` in the JSON object ``text``; None if absent."""
    decoder = json.JSONDecoder()
    i = _skip_ws(text, 0)
    for depth, key in enumerate(path):
        if i >= len(text) or text[i] != "{":
            return None
        i = _skip_ws(text, i + 1)
        found = None
        while i < len(text) and text[i] != "}":
            name, i = json.decoder.scanstring(text, i + 1)  # text[i] is the opening quote
            i = _skip_ws(text, i)
            if text[i] != ":":
                raise BundleError(f"malformed JSON at character {i}")
            start = _skip_ws(text, i + 1)
            _, end = decoder.raw_decode(text, start)
            if name == key:
                found = (start, end)  # the last duplicate wins, as in json.loads
            i = _skip_ws(text, end)
            if i < len(text) and text[i] == ",":
                i = _skip_ws(text, i + 1)
        if found is None:
            return None
        if depth == len(path) - 1:
            return found
        i = found[0]
    return None


def _render_like(old: str, value: Any, indent: str) -> str:
    """``value`` as JSON in the style of ``old``: one line if ``old`` is one line, else 4-space indented."""
    if "\n" not in old:
        return json.dumps(value)
    return json.dumps(value, indent=4).replace("\n", "\n" + indent)


def _get(obj: Any, path: Sequence[str]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def set_values(text: str, updates: dict[str, Any], what: str) -> str:
    """``text`` (a JSON object) with the value at each ``a#b#c`` key path of ``updates`` replaced in place.

    Every path must exist. A value equal to the current one (same JSON) leaves its text untouched; any
    other byte outside the replaced values is kept. The result is checked to parse to the expected object.
    """
    expected = json.loads(text)
    spans = []
    for key, value in updates.items():
        path = key.split(ID)
        span = value_span(text, path)
        if span is None:
            raise BundleError(f"{what} has no key {key!r} to set")
        old_value = _get(expected, path)
        if json.dumps(old_value) == json.dumps(value):
            continue
        parent = _get(expected, path[:-1])
        parent[path[-1]] = copy.deepcopy(value)
        spans.append((span, value))
    for (start, end), value in sorted(spans, key=lambda s: s[0][0], reverse=True):
        line = text[text.rfind("\n", 0, start) + 1 : start]
        indent = line[: len(line) - len(line.lstrip(" "))]
        text = text[:start] + _render_like(text[start:end], value, indent) + text[end:]
    if json.dumps(json.loads(text)) != json.dumps(expected):
        raise BundleError(f"editing {what} did not give the expected JSON (overlapping keys in {sorted(updates)}?)")
    return text


def merge_preset(text: str, preset: dict[str, Any], what: str) -> str:
    """A config's text with each top-level key it shares with ``preset`` set to the preset's value."""
    config = json.loads(text)
    return set_values(text, {k: v for k, v in preset.items() if k in config}, what)


# ------------------------------------------------------------------------------------------ task sources


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {path}: {e}") from e


def load_preset(task: str, repo: Path = REPO) -> dict[str, Any]:
    preset = _read_json(repo / "configs" / f"{task}.json")
    names = preset.get("label_names")
    if not isinstance(names, list) or preset.get("num_classes") != len(names):
        raise BundleError(f"configs/{task}.json: num_classes must equal the number of label_names")
    return preset


def load_task_data(task: str, repo: Path = REPO) -> dict[str, Any]:
    """``configs/<task>_bundle.json`` (metadata overrides, model card, scripts to leave out); {} if absent."""
    path = repo / "configs" / f"{task}_bundle.json"
    data = _read_json(path) if path.exists() else {}
    unknown = set(data) - {"metadata", "model_card", "exclude_scripts", "large_files", "_comment"}
    if unknown:
        raise BundleError(f"{path}: unknown keys {sorted(unknown)}")
    return data


def build_configs(task: str, repo: Path = REPO) -> dict[str, str]:
    """``configs/<name>`` -> text: the root's configs with the task's preset merged in."""
    preset = load_preset(task, repo)
    texts, used = {}, set()
    for name in CONFIG_FILES:
        text = (repo / "configs" / name).read_text()
        used |= set(preset) & set(json.loads(text))
        texts[name] = merge_preset(text, preset, f"configs/{name}")
    if set(preset) - used:
        raise BundleError(f"configs/{task}.json keys {sorted(set(preset) - used)} are defined by no config")
    return texts


def bundle_network(task: str, repo: Path = REPO) -> dict[str, Any]:
    """``variant``, ``img_size`` and ``num_classes`` of the network the ``task`` bundle's inference config builds
    (what its ``models/model.pt`` must fit)."""
    config = json.loads(build_configs(task, repo)["inference.json"])
    return {k: config[k] for k in ("variant", "img_size", "num_classes")}


def build_metadata(task: str, repo: Path = REPO) -> str:
    """The root's metadata with the preset's output channels and the task's overrides."""
    text = (repo / "configs" / "metadata.json").read_text()
    meta = json.loads(text)
    preset = load_preset(task, repo)
    updates: dict[str, Any] = {}
    for fmt_key, fmt in meta.items():
        if not fmt_key.endswith("_data_format"):
            continue
        for out_key, out in fmt.get("outputs", {}).items():
            if isinstance(out, dict) and out.get("format") == "segmentation":
                base = ID.join((fmt_key, "outputs", out_key))
                updates[base + ID + "num_channels"] = preset["num_classes"]
                updates[base + ID + "channel_def"] = {str(i): n for i, n in enumerate(preset["label_names"])}
    if not updates:
        raise BundleError("configs/metadata.json describes no segmentation output")
    overrides = load_task_data(task, repo).get("metadata", {})
    clash = set(overrides) & set(updates)
    if clash:
        raise BundleError(f"configs/{task}_bundle.json sets {sorted(clash)}, which come from configs/{task}.json")
    text = set_values(text, {**updates, **overrides}, f"configs/metadata.json for {task}")
    meta = json.loads(text)
    if meta["version"] not in meta.get("changelog", {}):
        raise BundleError(f"{task} metadata: version {meta['version']} has no changelog entry")
    return text


def _architecture_diagram(card: str) -> str:
    """The first fenced block of the ``## Model architecture`` section of the Synapse model card."""
    section = card.split("\n## Model architecture\n", 1)
    if len(section) != 2 or "```" not in section[1].split("\n## ", 1)[0]:
        raise BundleError("docs/README.md has no '## Model architecture' section with a diagram")
    start = section[1].index("```")
    end = section[1].index("```", start + 3) + 3
    return section[1][start:end]


def build_model_card(task: str, repo: Path = REPO) -> str:
    card = (repo / "docs" / "README.md").read_text()
    name = load_task_data(task, repo).get("model_card")
    if not name:
        return card
    template = (repo / name).read_text()
    if template.count(DIAGRAM_MARKER) > 1:
        raise BundleError(f"{name}: {DIAGRAM_MARKER} appears more than once")
    return template.replace(DIAGRAM_MARKER, _architecture_diagram(card))


LARGE_FILES_HEADER = """\
# Weights are never committed. A release lists here where each file downloads from, in the MONAI model
# zoo's format: path (in the bundle), url, hash_type (sha256), hash_val; written by
# `python -m scripts.release_weights` in the source repository. Fetch and check them with
# `python -m monai.bundle download_large_files --bundle_path BUNDLE_DIR`.
"""
NO_WEIGHTS = "# No trained weights are published yet: models/model.pt comes from running the training profiles.\n"


def check_large_files(entries: Any, what: str) -> list[dict[str, str]]:
    """``entries`` if it is a list of model-zoo large-file entries (exactly ``path``, ``url``, ``hash_type``,
    ``hash_val``, all non-empty strings; relative, distinct paths inside the bundle); raises otherwise."""
    if not isinstance(entries, list):
        raise BundleError(f"{what}: large_files must be a list, got {type(entries).__name__}")
    paths = set()
    for entry in entries:
        if not isinstance(entry, dict) or sorted(entry) != sorted(LARGE_FILE_KEYS):
            raise BundleError(f"{what}: a large_files entry must have exactly the keys {LARGE_FILE_KEYS}: {entry!r}")
        if not all(isinstance(entry[k], str) and entry[k] for k in LARGE_FILE_KEYS):
            raise BundleError(f"{what}: every value of a large_files entry must be a non-empty string: {entry!r}")
        path = Path(entry["path"])
        if path.is_absolute() or ".." in path.parts:
            raise BundleError(f"{what}: {entry['path']!r} must be a path inside the bundle")
        if entry["path"] in paths:
            raise BundleError(f"{what}: {entry['path']!r} is listed twice")
        paths.add(entry["path"])
    return entries


def render_large_files(entries: Sequence[dict[str, str]]) -> str:
    """``large_files.yml`` text (YAML; the strings JSON-quoted, which YAML reads as they are)."""
    entries = check_large_files(list(entries), LARGE_FILES)
    if not entries:
        return LARGE_FILES_HEADER + NO_WEIGHTS + "large_files: []\n"
    lines = ["large_files:"]
    for entry in entries:
        lines += [f"  - {LARGE_FILE_KEYS[0]}: {json.dumps(entry[LARGE_FILE_KEYS[0]])}"]
        lines += [f"    {k}: {json.dumps(entry[k])}" for k in LARGE_FILE_KEYS[1:]]
    return LARGE_FILES_HEADER + "\n".join(lines) + "\n"


def task_large_files(task: str, repo: Path = REPO) -> list[dict[str, str]]:
    """The published files of the ``task`` bundle: the root's ``large_files.yml`` for the root task, else the
    ``"large_files"`` list of ``configs/<task>_bundle.json`` (absent: none)."""
    if task == ROOT_TASK:
        import yaml

        path = repo / LARGE_FILES
        try:
            content = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise BundleError(f"cannot read {path}: {e}") from e
        if not isinstance(content, dict) or "large_files" not in content:
            raise BundleError(f"{path}: expected a mapping with a 'large_files' list")
        return check_large_files(content["large_files"], str(path))
    return check_large_files(load_task_data(task, repo).get("large_files", []), f"configs/{task}_bundle.json")


def build_large_files(task: str, repo: Path = REPO) -> str:
    """The bundle's ``large_files.yml``: the root's file as it is for the root task, else rendered."""
    if task == ROOT_TASK:
        task_large_files(task, repo)  # checked
        return (repo / LARGE_FILES).read_text()
    return render_large_files(task_large_files(task, repo))


def check_generated(task: str, repo: Path = REPO) -> None:
    """Refuses a model card or metadata that ``python -m scripts.model_card`` would change (stale figures)."""
    from scripts.model_card import ModelCardError, stale_files

    try:
        stale = stale_files(repo, tasks=[task])
    except ModelCardError as e:
        raise BundleError(str(e)) from e
    if stale:
        raise BundleError(f"{', '.join(stale)} differ from what docs/results/ and the weights list give: "
                          "run `python -m scripts.model_card` first")


def build_readme(task: str, metadata: dict[str, Any], preset: dict[str, Any],
                 large_files: Sequence[dict[str, str]] = ()) -> str:
    """The bundle's short README: what it is, where the model card is, the commands."""
    data = f"/data/{task}"
    if large_files:
        listed = ", ".join(f"`{e['path']}`" for e in large_files)
        weights = (f"Published weights ({listed}) are listed in `large_files.yml`: fetch them with\n"
                   "`python -m monai.bundle download_large_files --bundle_path .`.")
    else:
        weights = ("No trained weights are published yet:\n`models/model.pt` comes from the training below "
                   "(or pass `--checkpoint PATH`).")
    prepare = "\n".join(
        f"# {what}\npython -m scripts.prepare_data {cmd} --output {data}" for what, cmd in PREPARE[task]
    )
    labels = ", ".join(f"{i} {n}" for i, n in enumerate(preset["label_names"]))
    return f"""# {metadata['name']}

{metadata['description']}

Bundle version {metadata['version']}. The model card, with data licence, training setup and published
accuracy, is [docs/README.md](docs/README.md). Labels: {labels}.

This folder was generated by `python -m scripts.make_bundle {task} OUT_DIR` in the LeViT-UNet bundle
repository; regenerate it there rather than editing it. {weights}

Commands (from this folder; Python with the packages of `configs/metadata.json`):

```bash
{prepare}
# train (best checkpoint by validation mean Dice -> models/model.pt; TensorBoard logs in eval/)
python -m monai.bundle run training --meta_file configs/metadata.json --config_file configs/train.json \\
    --logging_file configs/logging.conf --dataset_dir {data}
# evaluate (Dice, HD95 per case and class -> eval/metrics_summary.md)
python -m monai.bundle run evaluating --meta_file configs/metadata.json \\
    --config_file "['configs/train.json','configs/evaluate.json']" --logging_file configs/logging.conf \\
    --dataset_dir {data} --eval_key test
# segment volumes (NIfTI, NRRD / MHA, DICOM series folder) -> <name>_seg.nii.gz on the input's grid
python -m monai.bundle run --meta_file configs/metadata.json --config_file configs/inference.json \\
    --logging_file configs/logging.conf --input "/data/new/*.nii.gz" --output_dir /data/new_seg
# TorchScript export
python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.json
```

Research only, not for clinical use. Code: Apache-2.0 ([LICENSE](LICENSE)); data:
[docs/data_license.txt](docs/data_license.txt).
"""


# ------------------------------------------------------------------------------------------- writing


def _write_tree(task: str, dest: Path, repo: Path = REPO) -> None:
    """Every file of the ``task`` bundle under the (empty) folder ``dest``."""
    if task not in TASKS:
        raise BundleError(f"unknown task {task!r}: one of {', '.join(TASKS)}")
    preset = load_preset(task, repo)
    configs = build_configs(task, repo)
    metadata = build_metadata(task, repo)
    card = build_model_card(task, repo)
    large_files = build_large_files(task, repo)
    check_generated(task, repo)
    excluded = set(REPO_ONLY_SCRIPTS) | set(load_task_data(task, repo).get("exclude_scripts", []))

    (dest / "configs").mkdir()
    (dest / "docs").mkdir()
    (dest / "models").mkdir()
    for name, text in configs.items():
        (dest / "configs" / name).write_text(text)
    (dest / "configs" / "metadata.json").write_text(metadata)
    for rel in COPIED_FILES:
        shutil.copyfile(repo / rel, dest / rel)
    (dest / LARGE_FILES).write_text(large_files)
    (dest / "docs" / "README.md").write_text(card)
    (dest / "README.md").write_text(build_readme(task, json.loads(metadata), preset, task_large_files(task, repo)))

    scripts = repo / "scripts"

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))}
        if Path(folder) == scripts:
            skip |= excluded & set(names)
        return skip

    shutil.copytree(scripts, dest / "scripts", ignore=ignore)
    os.symlink(os.path.join("configs", "metadata.json"), dest / "metadata.json")


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def make_bundle(task: str, out_dir: str | Path, force: bool = False, repo: Path = REPO) -> Path:
    """Write the ``task`` bundle to ``out_dir`` (atomically: a temporary sibling folder renamed into place)."""
    out = Path(os.path.abspath(out_dir))
    real_out, real_repo = out.resolve(), repo.resolve()
    if _is_within(real_repo, real_out):
        raise BundleError(f"{out} is (or holds) the repository itself: choose another output folder")
    for source in ("configs", "docs", "models", "scripts"):
        if _is_within(real_out, real_repo / source):
            raise BundleError(f"{out} is inside the repository's {source}/: choose another output folder (dist/...)")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BundleError(f"{out} exists and is not a folder")
    replace = out.exists() and any(out.iterdir())
    if replace and not force:
        raise BundleError(f"{out} is not empty: pass --force to replace it")
    if replace and not (out / "configs" / "metadata.json").is_file():
        raise BundleError(f"{out} does not look like a bundle (no configs/metadata.json): refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(4)
    tmp = out.parent / f".{out.name}.{tag}.tmp"
    old = out.parent / f".{out.name}.{tag}.old.tmp"
    tmp.mkdir()
    try:
        _write_tree(task, tmp, repo)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.make_bundle",
        description="Write a complete standalone MONAI bundle for one task (the root's configs + the task's preset).",
    )
    parser.add_argument("task", choices=TASKS, help="acdc: cardiac cine MRI; synapse: the repository root's bundle")
    parser.add_argument("out_dir", help="the bundle folder to create (must be empty or absent)")
    parser.add_argument("--force", action="store_true", help="replace a previous bundle in OUT_DIR")
    args = parser.parse_args(argv)
    try:
        out = make_bundle(args.task, args.out_dir, force=args.force)
    except BundleError as e:
        print(f"make_bundle: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote the {args.task} bundle to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
