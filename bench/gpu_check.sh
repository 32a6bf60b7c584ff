#!/usr/bin/env bash
# One prepared device check (the GPU machine has no network), sized for a 15-minute device budget with its
# start-up (a few minutes): build and install (~1 min), the GPU test suite against the compiled kernels
# WITHOUT -x, so one run reports every failure (<= 4 min: Triton k-NN/retrieval, GPU persistence, the sync
# detector around RETA steps, recover engines incl. torch.compile with CUDA graphs, overlapped PTA), then
# the quick benchmarks (<= 3 min) and the recover-engine benchmark (<= 3 min). Every stage has its own
# timeout; the whole script stays under 12 minutes.
# Logs and results go to ${OUT:-bench/out/gpu}: gpu.txt, gpu_tests.log, bench.log, results.json/.csv,
# recover_engine.log, recover_engine/results.json; commit them under bench/results/<gpu>/.
# gudhi is not on that machine: carry its wheel in .whl/ (see the device README) before calling.
# Usage: run(command="OUT=$OUT bash bench/gpu_check.sh", carry=[".whl"], timeout_s=780)
set -uo pipefail
OUT="${OUT:-bench/out/gpu}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
timeout 150 python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | tail -3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
(cd tests && timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -rf test_gpu.py 2>&1) \
  | tee "$OUT/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-180}" python3 bench/run.py --quick --out "$OUT" --budget "${BENCH_BUDGET:-0.3}" \
  ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
timeout "${ENGINE_TIMEOUT:-180}" python3 bench/run.py --only recover_step --out "$OUT/recover_engine" \
  --budget "${BENCH_BUDGET:-0.3}" 2>&1 | tee "$OUT/recover_engine.log"
echo "gpu_check done: results in $OUT"
