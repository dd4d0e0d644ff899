#!/usr/bin/env bash
# Creates .venv-monailabel/: MONAI Label 0.8.5 beside the bundle's runtime (torch 2.13.0 CPU, monai 1.6.1, ...),
# for tests/test_monailabel.py. Kept apart from the main environment because monailabel 0.8.5 (through
# pydicom-seg) forces numpy < 2. Idempotent: a venv that imports everything and was made from the present
# setup_monailabel.sh and requirements.txt is left as it is (a few seconds); otherwise pip brings it up to date.
#
# What is installed how, and why:
#   torch==2.13.0 first: pip takes the local CPU wheel (a bare `torch` requirement pulls a multi-GB CUDA build);
#     a constraints file then pins it, numpy<2 and pydicom<3 for every later step.
#   monai==1.6.1 and requirements.txt: the bundle's own runtime (nibabel, itk, pytorch-ignite, h5py, scipy, ...).
#   monailabel==0.8.5 --no-deps: its requirement `monai[...,torchvision,...]>=1.4` and `sam2` would pull a CUDA
#     torch; its other dependencies are listed below explicitly (sam2, mlflow, openslide, lmdb, gdown are left
#     out: MONAI Label treats SAM2 as optional, the rest serve features the bundle does not use).
#   torchvision==0.28.0 --no-deps: monailabel.transform.post imports torchvision.utils at import time. The PyPI
#     wheel is a CUDA build whose C++ ops cannot load beside the CPU torch, and its import then stops at
#     `register_fake("torchvision::nms")` ("operator torchvision::nms does not exist"). A small start-up hook
#     (_levit_torchvision_compat.pth) declares the schemas of the ops that import needs, only when the ops
#     library does not load, so the pure-Python parts (torchvision.utils, transforms) work; the C++ ops
#     (nms, roi_align, ...) stay unavailable, which neither MONAI Label's bundle tasks nor this bundle use.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MONAILABEL_VENV:-.venv-monailabel}
PY="$VENV/bin/python"

check() {
    "$PY" - <<'EOF'
import monai, numpy, torch, torchvision.utils, nibabel, itk, ignite, h5py, scipy
import monailabel
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.datastore.local import LocalDatastore
import monailabel.interfaces.app  # what `monailabel start_server` imports (pydicom-seg, fastapi, ...)
assert monailabel.__version__ == "0.8.5", monailabel.__version__
assert monai.__version__ == "1.6.1", monai.__version__
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert int(numpy.__version__.split(".")[0]) < 2, numpy.__version__
EOF
}

# Inputs of this set-up: a venv made from other ones (an edited requirements.txt) is brought up to date.
STAMP="$VENV/.setup-inputs"
INPUTS=$(cat setup_monailabel.sh requirements.txt | sha256sum | cut -d' ' -f1)
if [ -x "$PY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$INPUTS" ] && check >/dev/null 2>&1; then
    echo "$VENV: MONAI Label 0.8.5 environment ready"
    exit 0
fi

echo "$VENV: installing MONAI Label 0.8.5 beside the bundle's runtime"
[ -x "$PY" ] || python3 -m venv "$VENV"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
# pip warns about every missing folder of a local index, and (by design here) that monailabel's sam2 is not
# installed; keep the output to what matters.
quiet() {
    "$@" 2> >(grep -v -e "is ignored: it is neither a file nor a directory" -e "requires sam2" \
        -e "dependency resolver does not currently take into account" >&2)
}

quiet "${PIP[@]}" torch==2.13.0
# pydicom < 3: pydicom-seg 0.4.1 (imported by MONAI Label's server) uses a module pydicom 3 removed.
printf 'torch==2.13.0\nnumpy<2\npydicom<3\n' >"$VENV/constraints.txt"
C=(-c "$VENV/constraints.txt")
quiet "${PIP[@]}" "${C[@]}" monai==1.6.1 -r requirements.txt
quiet "${PIP[@]}" "${C[@]}" --no-deps monailabel==0.8.5 torchvision==0.28.0
# monailabel 0.8.5's own requirements, less monai / sam2 (above), plus the monai extras its code imports.
quiet "${PIP[@]}" "${C[@]}" \
    "uvicorn>=0.29.0" "pydantic>=2.7.0" "pydantic-settings>=2.2.1" "python-dotenv>=1.0.1" "fastapi>=0.110.2" \
    "python-multipart>=0.0.9" "httpx>=0.27.0" "schedule>=1.2.1" "dicomweb-client[gcp]>=0.59.1" "timeloop>=1.0.2" \
    "expiringdict>=1.2.2" "expiring_dict>=1.1.0" "cachetools>=5.3.3" "watchdog>=4.0.0" "pydicom>=2.4.4" \
    "pydicom-seg>=0.4.1" "pynetdicom>=2.0.2" "pynrrd>=1.0.0" "numpymaxflow>=0.0.7" "girder-client>=3.2.3" \
    "ninja>=1.11.1.1" "einops>=0.7.0" "pyyaml>=6.0.1" "filelock>=3.11.0" "passlib>=1.7.4" "pyjwt>=2.8.0" \
    "bcrypt>=4.1.2" "shapely>=2.0.4" "requests>=2.31.0" "requests-toolbelt>=1.0.0" "urllib3>=2.2.1" \
    scikit-learn scipy "google-auth>=2.29.0" \
    scikit-image pillow psutil

SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat >"$SITE/_levit_torchvision_compat.py" <<'EOF'
"""Lets the PyPI (CUDA) torchvision wheel import beside a CPU torch (installed by setup_monailabel.sh).

On the first `import torchvision`, and only if torchvision's C++ ops library does not load, declares the
schemas of the two ops that torchvision registers fake kernels for at import time (nms, qnms). The ops
themselves stay unavailable (calling them raises); torchvision.utils / transforms work.
"""

import importlib.abc
import importlib.util
import sys

_LIB = None  # keeps the schema definitions alive


def _declare_missing_ops():
    global _LIB
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    import glob
    import os

    import torch

    libs = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so"))
    try:
        if libs:
            torch.ops.load_library(libs[0])
            return
    except (OSError, ImportError):
        pass
    _LIB = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        try:
            _LIB.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already declared
            pass


class _Hook(importlib.abc.MetaPathFinder):
    done = False

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" and not self.done:
            self.done = True
            _declare_missing_ops()
        return None


sys.meta_path.insert(0, _Hook())
EOF
echo "import _levit_torchvision_compat" >"$SITE/_levit_torchvision_compat.pth"

if ! check; then
    echo "$VENV: the MONAI Label environment does not import (see above)" >&2
    exit 1
fi
echo "$INPUTS" >"$STAMP"
echo "$VENV: MONAI Label 0.8.5 environment ready"
