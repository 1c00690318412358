#!/usr/bin/env bash
# ../shared/GPU.md's checklist in one call of the device tool (each call starts a machine, and a
# session's device time is short): the CUDA paths against the reference first (8 pytest workers:
# Triton compiles on the CPU), then the figures, each row written to $OUT as it comes, so that a run
# cut short keeps what it measured. Writes under $OUT (the device tool's folder; else /tmp/gpu_check).
#
#   bash bench/gpu_check.sh                 # TEST_S / BENCH_S: seconds for each part
#
# On an H200 (2026-12-04): the tests ~70 s, the whole bench/gpu.py plan ~6 min (give the device
# call 540 s, so that one call holds both).
set -o pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  lscpu | grep "Model name"
} 2>&1 | tee "$OUT/env.txt"
# -v and a per-test timeout (pytest-timeout and pytest-xdist are on the GPU image): a slow or stuck
# test is named; compile=True tests are left out (inductor's GPU compile alone would take minutes)
timeout "${TEST_S:-120}" python3 -m pytest -v -p no:cacheprovider -n 8 --timeout 120 --durations 10 -rfE --tb=short \
  -k "not compile" tests/test_kernels.py tests/test_triton_backend.py tests/test_fused_modules.py tests/test_sdpa_attention.py \
  tests/test_scorer_exactness.py tests/test_threads.py > "$OUT/pytest.log" 2>&1
echo "pytest exit $?"
grep -E "FAILED|ERROR|Timeout|passed|failed|s call|s setup" "$OUT/pytest.log" | tail -40
timeout "${BENCH_S:-400}" python3 bench/gpu.py --out "$OUT/gpu.md" > "$OUT/gpu.log" 2>&1
echo "gpu.py exit $?"
cat "$OUT/gpu.md"
grep -v "^|" "$OUT/gpu.log" | tail -20
