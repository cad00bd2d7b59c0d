#!/usr/bin/env bash
# The GPU rehearsal in one command on the lent GPU machine (docs/gpu.md). It has torch but no Ray
# and no network: the wheels come along in .whl/ (python benchmarks/gpu/rebuild_ray_wheel.py).
#
#   device run, carry [".whl"], timeout_s 540:
#     bash benchmarks/gpu/run_on_device.sh
#
# Installs the wheels into /tmp/site, then runs benchmarks.gpu_rehearsal within BUDGET_S (default
# 420 s of stages, hard stop at 480 s): results in $OUT/gpu_rehearsal.json and $OUT/gpu_rehearsal.log.
# Extra arguments go to the rehearsal (e.g. --images 4000).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/odin-gpu-rehearsal}
BUDGET_S=${BUDGET_S:-420}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 PYTHONDONTWRITEBYTECODE=1
ls .whl/ray-*.whl >/dev/null 2>&1 || { echo "no .whl/ray-*.whl: run benchmarks/gpu/rebuild_ray_wheel.py and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "installing the carried wheels failed" >&2; exit 2; }
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="/tmp/site/bin:$PATH"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, torchvision, ray, ray.data; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'torchvision', torchvision.__version__, 'ray', ray.__version__)"
  nproc; uptime
} 2>&1 | tee "$OUT/environment.txt"
timeout -k 10 $((BUDGET_S + 60)) python3 -m benchmarks.gpu_rehearsal --device cuda --budget-s "$BUDGET_S" \
  --out "$OUT/gpu_rehearsal.json" "$@" 2>&1 | tee "$OUT/gpu_rehearsal.log"
rc=${PIPESTATUS[0]}
echo "gpu_rehearsal exit code: $rc"
exit "$rc"
