#!/usr/bin/env bash
# Every GPU figure of bench/RESULTS.md in one prepared run (issue 7), sized for a 15-minute device lease: the steps'
# limits add up to 530 s (120 + 100 + 60 + 150 + 100); on an H200 they took ≈ 5 minutes. ONLY="compression state"
# runs some of them. Each step has its own time limit, so one that hangs or runs out of memory does not cost the
# others; the output goes to $OUT/bench.txt.
#
# The GPU machine's python has torch, transformers, safetensors, numpy, pyarrow and pyyaml, not openskill (which
# templar_lib.ratings imports, and so bench/state.py). Carry it as a wheel, prepared here once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl openskill==6.2.0
# then run `bash bench/gpu.sh` there with `.whl` carried. A dry run of the plumbing on a CPU:
#   DEVICE=cpu PRESET=tiny OUT=/tmp/gpu-dry bash bench/gpu.sh
set -u
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-1b}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/templar-gpu-bench}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # templar_lib from this checkout (not installed there)
if ls .whl/*.whl >/dev/null 2>&1; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

step() {  # step SECONDS SCRIPT ARGS...: run one bench with a time limit, keep going whatever happens
    local limit=$1
    shift
    echo "== $* (limit ${limit}s)" | tee -a "$OUT/bench.txt"
    timeout "$limit" $PYTHON "$@" 2>&1 | tee -a "$OUT/bench.txt"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$OUT/bench.txt"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>/dev/null \
    || echo "no nvidia-smi"; nproc; free -g | head -2
  $PYTHON -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  $PYTHON -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1; } | tee "$OUT/bench.txt"
wanted() { case " ${ONLY:-compression miner window aggregation state} " in *" $1 "*) return 0;; esac; return 1; }
if [ "$DEVICE" = cpu ]; then
    wanted compression && step 100 bench/compression.py --preset "$PRESET" --device cpu --repeats 10
    wanted miner && step 120 bench/miner_step.py --preset "$PRESET" --device cpu
else  # the kernels' launch settings side by side on one 8192 × 8192 parameter, then the whole-model round trip
    wanted compression && step "${COMPRESSION_LIMIT:-120}" bench/compression_kernels.py --device "$DEVICE" \
        --preset "$PRESET" --repeats 10
    wanted miner && step "${MINER_LIMIT:-100}" bench/miner_step.py --preset "$PRESET" --device "$DEVICE" --seq 2048 \
        --batch 4 --batch 8 --peak-tflops 989 --compile
fi
wanted window && step "${WINDOW_LIMIT:-60}" bench/miner_window.py --preset "$PRESET" --device "$DEVICE" \
    $([ "$DEVICE" = cpu ] || echo --sequence-length 2048 --pages 4 --batch 4)
wanted aggregation && step "${AGGREGATION_LIMIT:-150}" bench/aggregation.py --preset "$PRESET" --device "$DEVICE" --peers 20
wanted state && step "${STATE_LIMIT:-100}" bench/state.py --preset "$PRESET" --repeats 1 --resident-only
# issue 16 (not in the default list: the five above fill a lease): ONLY=sparseloco bash bench/gpu.sh
wanted sparseloco && step "${SPARSELOCO_LIMIT:-240}" bench/sparseloco_device.py --preset "$PRESET" --device "$DEVICE" \
    $([ "$DEVICE" = cpu ] || echo --peak-tflops 989 --rows 4 --compile)
# the tolerance a spot check's replay needs on this hardware (a GPU miner's file replayed on the GPU again and on
# the CPU): ONLY=replay bash bench/gpu.sh
wanted replay && step "${REPLAY_LIMIT:-200}" bench/replay_tolerance.py --presets small --device "$DEVICE"
echo "done: $OUT/bench.txt"
