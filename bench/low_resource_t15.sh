#!/usr/bin/env bash
# The low-resource protocol on the real Twitter-2015 text (grids/t15_low_resource_minilm.toml):
# bert_crf and vcrmner with the offline MiniLM-L6 encoder in FAST ABLATION MODE (frozen encoder,
# outputs cached once per process: not the papers' protocol, and the report flags it), training
# fractions 10..100% (nested subsets per seed), 2 epochs, vcrmner over a cache without pictures
# (built here if missing; flagged in the report). The sweep runs as TASKS processes (--task i/n), one
# thread each. Results: docs/experiments.md.
# Usage: bench/low_resource_t15.sh [DATA_DIR] [OUT_DIR] ["SEEDS"] [CACHE] [TASKS]   e.g. ... runs/t15-lowres "1 2"
set -euo pipefail
DATA=${1:-../shared/data/twitter2015}
OUT=${2:-runs/t15-lowres}
SEEDS=${3:-"1 2"}
CACHE=${4:-cache/t15-placeholder.h5}
TASKS=${5:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
[ -f "$CACHE" ] || mner-features extract --data "$DATA" --no-images --out "$CACHE" \
    --random-init --missing-image placeholder --detector maskrcnn --detector-min-size 320 \
    --score-threshold 0 --top-k 4 --encoder clip --encoder resnet152 --prompts vcrmner --no-progress
seed_flags=()
for seed in $SEEDS; do seed_flags+=(--seed "$seed"); done
for ((task = 0; task < TASKS; task++)); do
    mner-train sweep grids/t15_low_resource_minilm.toml --data t15="$DATA" --features t15="$CACHE" \
        --out "$OUT" "${seed_flags[@]}" --task "$task/$TASKS" &
done
wait
mner-train report "$OUT" --out "report/$(basename "$OUT")" --overwrite \
    --compare t15-frac0.10/vcrmner/default --compare t15/vcrmner/default
