#!/usr/bin/env bash
# spa3d's GPU check on a machine whose python3 already holds a CUDA build of torch (and numpy, scipy, pandas,
# matplotlib, scikit-image): installs spa3d's other dependencies from wheels in .whl/ (no network needed), builds
# the C kernels, runs benchmarks/gpu_tutorial.py small (a smoke test of every job on the GPU) and, when that
# passed, at the tutorial's scale. Output: $OUT/gpu_log.txt, $OUT/gpu_small.json, $OUT/gpu_full.json, $OUT/logs.tgz.
#
#   OUT=/tmp/out bash benchmarks/gpu_run.sh [STAGE_TIMEOUT_S]
set -u
OUT=${OUT:-/tmp/spa3d_gpu_out}
mkdir -p "$OUT"
STAGE=${1:-120}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
    timeout 120 python3 setup.py -q build_ext --inplace >/tmp/build.log 2>&1 \
        && echo "C kernels built" || { echo "C kernels not built (torch fallbacks):"; tail -3 /tmp/build.log; }
    python3 -c "import spa3d.kernels as k; print('compiled kernels:', k.have_compiled_kernels())"
    echo "== small (smoke test of each job on the GPU)"
    python3 benchmarks/gpu_tutorial.py --device cuda --workdir /tmp/gpu_small --n 1000 --n128 1000 --iter128 1 \
        --n-refine 1000 --stage-timeout "$STAGE"
    cp /tmp/gpu_small/gpu_tutorial.json "$OUT/gpu_small.json"
    if grep -q '"error"' /tmp/gpu_small/gpu_tutorial.json; then
        echo "small run failed: the tutorial-scale run is skipped"
    else
        echo "== tutorial scale"
        python3 benchmarks/gpu_tutorial.py --device cuda --workdir /tmp/gpu_full --n 5000 --n128 5000 --iter128 3 \
            --n-refine 5000 --stage-timeout "$STAGE"
        cp /tmp/gpu_full/gpu_tutorial.json "$OUT/gpu_full.json"
    fi
} 2>&1 | tee "$OUT/gpu_log.txt"
tar czf "$OUT/logs.tgz" /tmp/gpu_small/*.out /tmp/gpu_small/*/run.log /tmp/gpu_full/*.out /tmp/gpu_full/*/run.log \
    2>/dev/null
exit 0
