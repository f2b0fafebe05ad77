#!/usr/bin/env bash
# Real-text convergence of every model (issue 9): bert_crf, vcrmner, promptmner and pmner on the real
# Twitter-2015 text, offline MiniLM-L6 encoder, same epochs / seed / batch, default configs. The images
# are not available offline, so the cache holds placeholders for all 8,257 ids; the trainer masks
# placeholder images like missing ones (its default), so the images carry no information and the
# fusion models must match the text-only baseline. Results: docs/models/README.md.
# Usage: [MODELS="bert_crf vcrmner"] bench/train_models_t15.sh [DATA_DIR] [WORK_DIR] [EPOCHS]
# MODELS picks a subset, so two lanes of one thread each can share a 2-core machine; the table at the
# end lists every model whose run in WORK_DIR has finished.
set -euo pipefail
DATA=${1:-../shared/data/twitter2015}
WORK=${2:-runs/t15-models}
EPOCHS=${3:-3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p "$WORK"
CACHE="$WORK/t15-placeholder.h5"
[ -f "$CACHE" ] || mner-features extract --data "$DATA" --no-images --out "$CACHE" \
    --random-init --missing-image placeholder --detector maskrcnn --detector-min-size 320 \
    --score-threshold 0 --top-k 4 --encoder clip --encoder resnet152 --prompts vcrmner --no-progress
COMMON=(--data "$DATA" --text-encoder minilm-l6 --epochs "$EPOCHS" --batch-size 16 --seed 1 --device cpu --overwrite)
# A random-init smoke cache is not the papers' stage 1 (maskrcnn, ViT-B-32 for every model):
# stage1_mismatch=warn trains anyway and records the differences in each run's metrics.json.
for model in ${MODELS:-bert_crf vcrmner promptmner pmner}; do
    if [ "$model" = bert_crf ]; then
        mner-train --model bert_crf "${COMMON[@]}" --out "$WORK/bert_crf"
    else
        mner-train --model "$model" --features "$CACHE" --set stage1_mismatch=warn "${COMMON[@]}" --out "$WORK/$model"
    fi
done
python - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
print("| model | test F1 | best dev F1 (epoch) | epochs | s per epoch (train + dev) |")
print("|---|---|---|---|---|")
for model in ("bert_crf", "vcrmner", "promptmner", "pmner"):
    if not (Path(sys.argv[1]) / model / "metrics.json").is_file():
        continue
    metrics = json.loads((Path(sys.argv[1]) / model / "metrics.json").read_text())
    history = metrics["history"]
    best = max(history, key=lambda h: h["dev_f1"])
    seconds = "-".join(f"{h['train_seconds'] + h.get('eval_seconds', 0):.0f}" for h in history)
    print(f"| {model} | {100 * metrics['test']['micro']['f1']:.2f} | {100 * best['dev_f1']:.2f} ({best['epoch']}) "
          f"| {len(history)} | {seconds} |")
EOF
