#!/usr/bin/env bash
# One prepared device check (the GPU machine has no network), sized for a 15-minute device budget with
# its start-up: build and install (~1 min), the GPU test suite against the compiled kernels (<= 4 min:
# Triton k-NN/retrieval, GPU persistence, recover engines incl. torch.compile with CUDA graphs,
# overlapped PTA), then the benchmarks with a short timing budget (<= 5 min). Logs and results go to
# ${OUT:-bench/out/gpu} (6 files: gpu.txt, gpu_tests.log, bench.log, results.json/.csv, table.md).
# gudhi is not on that machine: carry its wheel in .whl/ (see the device README) before calling.
# Usage: run(command="OUT=$OUT bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
OUT="${OUT:-bench/out/gpu}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
(cd tests && timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -x test_gpu.py 2>&1) \
  | tee "$OUT/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-300}" python3 bench/run.py --out "$OUT" --budget "${BENCH_BUDGET:-0.5}" ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench.log"
