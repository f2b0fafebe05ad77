#!/usr/bin/env bash
# One extraction with the tiny random models into a fresh cache, removed afterwards: a unit for timing
# one checkout of mner against another with farm-bench (docs/features.md, "Parts are caches").
#   bench/extract_tiny.sh CHECKOUT DATA IMAGES      (CHECKOUT has its own .venv with mner installed)
set -euo pipefail
checkout=$1 data=$2 images=$3
out=$(mktemp -u /tmp/mner-extract-tiny-XXXXXX.h5)
trap 'rm -rf "$out" "$out.parts" "$out.lock"' EXIT
OMP_NUM_THREADS=1 "$checkout/.venv/bin/mner-features" extract --data "$data" --images "$images" --out "$out" \
  --random-init --detector fasterrcnn-test --score-threshold 0 --top-k 10 --detector-min-size 96 \
  --clip-model clip-test --chunk-size 16 --batch-size 16 --num-workers 1 --no-progress > /dev/null
