#!/usr/bin/env bash
# One prepared device check (the GPU machine has no network): build and install, run the GPU test
# suite against the compiled kernels, then the benchmarks; logs and results go to ${OUT:-bench/out}.
# gudhi is not on that machine: carry its wheel in .whl/ (see the device README) before calling.
set -uo pipefail
OUT="${OUT:-bench/out/gpu}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
(cd tests && python3 -m pytest -q -p no:cacheprovider test_gpu.py 2>&1) | tee "$OUT/gpu_tests.log"
python3 bench/run.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
