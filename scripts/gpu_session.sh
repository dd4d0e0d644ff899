#!/usr/bin/env bash
# One prepared GPU session for a short lease (e.g. 10 minutes on one GPU): the GPU halves of the reproduction and
# speed work, in order, each stage bounded so that a slow one cannot take the others' time.
#
#   1. setup: installs carried wheels (.whl/, e.g. monai, nibabel, pytorch-ignite) where the machine lacks them;
#   2. benchmark: `scripts.benchmark --device cuda` table (LeViT-UNet 128s/192/384 and the MONAI peers, inference
#      at batch 1 and 8, training of 128s, 384 and the peers; eager fp32, bf16 and bf16 as a CUDA graph)
#      -> benchmark_gpu.md/.json, rewritten after each model (a run cut short by BENCH_S keeps what it measured);
#   3. calibration: the ACDC `gpu` profile for 3 epochs (end to end: training, validation, evaluation, report), which
#      also proves the pipeline runs on this GPU before the long run;
#   4. the ACDC `gpu` profile with a FIXED schedule sized to the time left (scripts.reproduce_acdc.plan_epochs: from
#      the calibration's epoch and validation times, at most the paper's 400 epochs; chosen from speed alone,
#      before training) -> acdc_gpu.md/.json/_curves.png;
#   5. precision check on this GPU: bf16 AMP fast form vs plain fp32, trained weights, the 20 validation volumes
#      -> precision_acdc_gpu.json.
#
# Usage, from the repository root, with the compact data prepared here and carried (`python -m
# scripts.reproduce_acdc --profile gpu --compact --prepare-only` writes runs/acdc_gpu/data, about 50 MiB):
#
#   OUT=runs/gpu_session BUDGET_S=560 bash scripts/gpu_session.sh
#
# Everything lands in $OUT (at most 8 files: the results above, session.log and extras.tgz with the training and
# calibration logs, evaluation metrics and Markdown of the precision check). VARIANT, CUDA_GRAPHS (true: the
# training step captured as CUDA graphs, falling back to eager if the capture fails), BENCH_S, EXTRA_ARGS (appended
# to both reproduce_acdc runs), BENCH_ARGS and BENCH24_ARGS (the two benchmark runs) adjust it; a CPU smoke run of the
# plumbing: `OUT=/tmp/gs BUDGET_S=400 BENCH_S=60 EXTRA_ARGS="--device cpu --variant 128s --img-size 64
# --num-workers 0" BENCH_ARGS="--device cpu --variants 128s --peers BasicUNet --img-size 64 --iters 1 --warmup 1
# --repeats 1 --threads 2" BENCH24_ARGS="--device cpu --img-size 64 --iters 1 --warmup 1 --repeats 1 --threads 2"
# bash scripts/gpu_session.sh`.
set -u -o pipefail
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-560}
BENCH_S=${BENCH_S:-100}
VARIANT=${VARIANT:-384}
CUDA_GRAPHS=${CUDA_GRAPHS:-true}
OUT=${OUT:-runs/gpu_session}
EXTRA_ARGS=${EXTRA_ARGS:-}
BENCH_ARGS=${BENCH_ARGS:---device cuda --variants 128s 192 384 --peers --train --train-variants 128s 384 --warmup 3 --iters 10}
BENCH24_ARGS=${BENCH24_ARGS:---device cuda --warmup 3 --iters 10}
WORK=runs/acdc_gpu
PY=${PYTHON:-python3}
mkdir -p "$OUT"
EXTRA=$(mktemp -d)
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1

left() { echo $((T0 + BUDGET_S - $(date +%s))); }
stage() { echo "== [$(($(date +%s) - T0)) s, $(left) s left] $*"; }
pack() {
    cp -f "$WORK/train.log" "$EXTRA/train.log" 2>/dev/null
    cp -rf "$WORK/eval" "$EXTRA/eval" 2>/dev/null
    tar -czf "$OUT/extras.tgz" -C "$EXTRA" . 2>/dev/null
}
trap pack EXIT

stage setup
if [ -d .whl ] && ! "$PY" -c "import monai, nibabel, ignite, fire" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
"$PY" -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__,
      'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" || exit 1
[ -f "$WORK/data/datalist.json" ] || { echo "no $WORK/data/datalist.json: prepare and carry it (see the header)"; exit 1; }

stage benchmark
# shellcheck disable=SC2086
timeout "$BENCH_S" "$PY" -m scripts.benchmark $BENCH_ARGS --forms eager_fp32 fused_cl_bf16 cl_bf16 \
    fused_cl_bf16_graph cl_bf16_graph --in-process \
    --json "$OUT/benchmark_gpu.json" --markdown "$OUT/benchmark_gpu.md" || echo "benchmark: exit status $?"

stage "training step of $VARIANT at the profile's batch of 24 (network alone, to compare with the pipeline's pace)"
# shellcheck disable=SC2086
timeout 45 "$PY" -m scripts.benchmark $BENCH24_ARGS --variants "$VARIANT" --no-inference --train --train-variants "$VARIANT" \
    --train-batch 24 --forms cl_bf16 cl_bf16_graph --in-process --json "$EXTRA/benchmark_train24.json" \
    || echo "benchmark at batch 24: exit status $?"

stage calibration
CAL=$EXTRA/calibration
mkdir -p "$CAL" && ln -sfn "$PWD/$WORK/data" "$CAL/data"
CAL_T0=$(date +%s)
# shellcheck disable=SC2086
timeout 200 "$PY" -m scripts.reproduce_acdc --profile gpu --variant "$VARIANT" --workdir "$CAL" --results-dir "$CAL" \
    --epochs 3 --val-interval 3 --cuda-graphs "$CUDA_GRAPHS" --quiet $EXTRA_ARGS || { echo "calibration failed: exit status $?"; exit 1; }
CAL_S=$(($(date +%s) - CAL_T0))
rm -rf "$CAL/bundle/models" "$CAL/data"

stage plan
# the main run's fixed costs (start-up, caching, final evaluation, report) are the calibration's wall time less its
# epochs and validation; the precision check (about 40 s) and a margin come on top
PLAN=$("$PY" -c "import sys; from scripts.reproduce_acdc import parse_train_log, plan_epochs
text, cal_s, left = open(sys.argv[1]).read(), float(sys.argv[2]), float(sys.argv[3])
log = parse_train_log(text)
fixed = cal_s - sum(t for _, t in log['epoch_seconds']) - sum(log['validation_seconds'])
e, v = plan_epochs(text, left - fixed - 60); print(e, v, round(fixed))" "$CAL/train.log" "$CAL_S" "$(left)") \
    || { echo "no schedule fits the time left"; exit 1; }
read -r EPOCHS VAL_INTERVAL FIXED <<<"$PLAN"
echo "calibration took ${CAL_S} s (${FIXED} s of it start-up, evaluation and report); schedule: $EPOCHS epochs," \
    "validation every $VAL_INTERVAL"

stage "train $VARIANT for $EPOCHS epochs"
# shellcheck disable=SC2086
timeout $(($(left) - 20)) "$PY" -m scripts.reproduce_acdc --profile gpu --variant "$VARIANT" --workdir "$WORK" \
    --results-dir "$OUT" --epochs "$EPOCHS" --val-interval "$VAL_INTERVAL" --cuda-graphs "$CUDA_GRAPHS" --quiet $EXTRA_ARGS \
    || echo "reproduce_acdc: exit status $?"

stage precision check
DEVICE=cuda
case " $EXTRA_ARGS " in *" --device cpu "*) DEVICE=cpu ;; esac
IMG=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['settings']['img_size'])" "$OUT/acdc_gpu.json" 2>/dev/null || echo 224)
if [ -f "$WORK/bundle/models/model_final.pt" ] && [ "$(left)" -gt 15 ]; then
    timeout $(($(left) - 5)) "$PY" -m scripts.precision_check --preset configs/acdc.json --device "$DEVICE" \
        --datalist "$WORK/data/datalist.json" --checkpoint "$WORK/bundle/models/model_final.pt" --variant "$VARIANT" \
        --img-size "$IMG" --json "$EXTRA/precision_acdc_gpu.json" && cp "$EXTRA/precision_acdc_gpu.json" "$OUT/"
fi
stage done
