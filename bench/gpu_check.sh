#!/usr/bin/env bash
# ../shared/GPU.md's checklist in one call of the device tool (each call starts a machine, and a
# session's device time is short): the figures first, so that a run cut short keeps them, then the
# CUDA paths against the reference. Writes under $OUT (the device tool's folder; else /tmp/gpu_check).
#
#   bash bench/gpu_check.sh                 # BENCH_S / TEST_S: seconds for each part
set -o pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"
timeout "${BENCH_S:-240}" python3 bench/gpu.py --out "$OUT/gpu.md" 2>&1 | tee "$OUT/gpu.log" | grep -v "^|"
cat "$OUT/gpu.md"
# -v and a per-test timeout (pytest-timeout is on the GPU image): a slow or stuck test is named
timeout "${TEST_S:-200}" python3 -m pytest -v -p no:cacheprovider --timeout 90 --durations 15 -rfE \
  tests/test_kernels.py tests/test_triton_backend.py tests/test_sdpa_attention.py 2>&1 | tee "$OUT/pytest.log" \
  | grep -E "PASSED|FAILED|ERROR|Timeout|passed|failed|s call|s setup" | tail -80
