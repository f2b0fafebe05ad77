#!/usr/bin/env bash
# The worked example of docs/experiments.md: a search for P-MNER's learning rates on the real
# Twitter-2015 text with MiniLM-L6 (grids/tune/t15_pmner_minilm.toml: 10% of the training posts,
# 2 epochs, 6 trials, median pruning), then the best values' seeds through `sweep`, scored on test.
# The images are not available offline: the cache holds every id with no picture (--no-images,
# random-init vision models), so P-MNER takes its no-image path (every run is flagged in the report).
# Usage: bench/tune_pmner_t15.sh [DATA_DIR] [CACHE]       e.g. bench/tune_pmner_t15.sh ../shared/data/twitter2015
set -euo pipefail
DATA=${1:-../shared/data/twitter2015}
CACHE=${2:-cache/t15-placeholder.h5}
SPACE=grids/tune/t15_pmner_minilm.toml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
[ -f "$CACHE" ] || mner-features extract --data "$DATA" --no-images --out "$CACHE" --random-init \
    --missing-image placeholder --detector fasterrcnn --detector-min-size 320 --score-threshold 0 --top-k 5 \
    --encoder resnet152 --no-progress
mner-train tune "$SPACE" --data t15="$DATA" --features t15="$CACHE"        # rerun it to resume after a kill
mner-train report runs/tune/t15_pmner_minilm --out report/tune-t15-pmner    # trials, importances, best grid
mner-train sweep report/tune-t15-pmner/t15_pmner_minilm-best-grid.toml      # seeds 1 and 2, scored on test
mner-train report runs/tune/t15_pmner_minilm/best --out report/t15-pmner-best
