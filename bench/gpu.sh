#!/usr/bin/env bash
# Every GPU figure of bench/RESULTS.md in one prepared run (issue 7), sized for a 15-minute device lease:
# ≈ 6–8 minutes on one H100 after the machine has started. Each step has its own time limit, so one that
# hangs or runs out of memory does not cost the others; the output goes to $OUT/bench.txt.
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
if ls .whl/*.whl >/dev/null 2>&1; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step SECONDS SCRIPT ARGS...: run one bench with a time limit, keep going whatever happens
    local limit=$1
    shift
    echo "== $* (limit ${limit}s)" | tee -a "$OUT/bench.txt"
    timeout "$limit" $PYTHON "$@" 2>&1 | tee -a "$OUT/bench.txt"
    echo "== exit ${PIPESTATUS[0]}" | tee -a "$OUT/bench.txt"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi";
  $PYTHON -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } \
    | tee "$OUT/bench.txt"
step 120 bench/compression.py --preset "$PRESET" --device "$DEVICE" --repeats 10
step 170 bench/aggregation.py --preset "$PRESET" --device "$DEVICE" --peers 20
if [ "$DEVICE" = cpu ]; then
    step 120 bench/miner_step.py --preset "$PRESET" --device cpu
else
    step 150 bench/miner_step.py --preset "$PRESET" --device "$DEVICE" --seq 2048 --batch 4 --peak-tflops 989
fi
step 150 bench/state.py --preset "$PRESET" --repeats 1
echo "done: $OUT/bench.txt"
