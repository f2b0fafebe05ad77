#!/usr/bin/env bash
# The first-GPU check (issue 19): every check of bench/gpu_check.py, one JSON of figures and pass/fail
# lines, under 8 minutes on one GPU. What each check proves and what only a GPU can: docs/gpu.md.
#
#   bash bench/gpu_check.sh                       # GPU mode: writes gpu_check-<gpu name>.json
#   bash bench/gpu_check.sh --mode cpu            # CPU mode: the tiny variants, GPU-only checks skipped
#   bash bench/gpu_check.sh --out results.json    # any option of bench/gpu_check.py passes through
set -euo pipefail
cd "$(dirname "$0")/.."
mode=gpu
for arg in "$@"; do [[ "$arg" == cpu ]] && mode=cpu; done
if [[ "$mode" == cpu ]]; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
  default_out="gpu_check-cpu.json"
else
  name=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))" 2>/dev/null || echo unknown)
  default_out="gpu_check-${name}.json"
fi
out_given=no
for arg in "$@"; do [[ "$arg" == --out ]] && out_given=yes; done
extra=()
[[ "$out_given" == no ]] && extra=(--out "$default_out")
exec timeout 900 python bench/gpu_check.py "$@" "${extra[@]}"
