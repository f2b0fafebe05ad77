#!/usr/bin/env bash
# The low-resource protocol on the real Twitter-2015 text, small enough for a shared 2-core CPU:
# bert_crf with the offline MiniLM-L6 encoder in FAST ABLATION MODE (frozen encoder, outputs cached
# once per process: not the papers' protocol, and the report flags it), training fractions
# 10..100% (nested subsets per seed), a few seeds, few epochs. Results: docs/experiments.md.
# Usage: bench/low_resource_t15.sh [DATA_DIR] [OUT_DIR] [EPOCHS] ["SEEDS"]   e.g. ... 3 "1 2 3"
set -euo pipefail
DATA=${1:-../shared/data/twitter2015}
OUT=${2:-runs/t15-lowres-minilm-fast}
EPOCHS=${3:-3}
SEEDS=${4:-"1 2 3"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
seed_flags=()
for seed in $SEEDS; do seed_flags+=(--seed "$seed"); done
time mner-train sweep grids/bert_crf.toml --datasets t15 --data t15="$DATA" --out "$OUT" "${seed_flags[@]}" \
    --set text_encoder=minilm-l6 --set fast_ablation=true --set epochs="$EPOCHS" --set patience=0 \
    --set batch_size=16 --set head_lr=5e-3 --set crf_lr=1e-2 --device cpu
mner-train report "$OUT" --out "report/$(basename "$OUT")" \
    --compare t15-frac0.10/bert_crf/default --compare t15/bert_crf/default
