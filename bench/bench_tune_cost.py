"""What one trial of each bundled search space (grids/tune/<model>.toml) costs on this CPU, measured on
the bundled sample (36 training / 12 dev posts), through ``mner-train tune`` itself.

Every space runs one trial of one epoch with the offline MiniLM-L6 encoder (the papers' BERT/RoBERTa
weights cannot be downloaded here) over a cache with stage 1's shapes filled with random values
(bench_step_time.write_synthetic_cache: ResNet-152, CLIP ViT-B-32, prompt sets, grounding crops, Swin
grid, captions), since the sample's images carry no features offline. Prints one Markdown row per space:
the seconds of the trial (model build, one epoch, dev decode) and of its epoch (train + dev).

    OMP_NUM_THREADS=1 python bench/bench_tune_cost.py --out bench/out/tune-cost
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample" / "twitter_sample"
# per-model options the offline bench needs: mgipscl's paper mode fine-tunes a CLIP tower (random ViT-B/32 here)
EXTRA_SETS = {"mgipscl": ["clip_model=random-vit-b-32"]}


def synthetic_cache(path: Path) -> Path:
    spec = importlib.util.spec_from_file_location("bench_step_time", ROOT / "bench" / "bench_step_time.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ids = sorted({line[6:].strip() for f in SAMPLE.glob("*.txt") for line in f.read_text().splitlines()
                  if line.startswith("IMGID:")})
    module.write_synthetic_cache(path, ids, max_objects=5, seed=0)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/tune-cost"))
    parser.add_argument("--text-encoder", default="minilm-l6")
    parser.add_argument("--models", nargs="*", default=None, help="default: every grids/tune/<model>.toml")
    args = parser.parse_args(argv)

    from mner.trainer.experiments.tune import tune
    from mner.trainer.models import available_models

    args.out.mkdir(parents=True, exist_ok=True)
    cache = synthetic_cache(args.out / "sample-synthetic.h5")
    rows = []
    for model in args.models or available_models():
        space = ROOT / "grids" / "tune" / f"{model}.toml"
        study = args.out / model
        shutil.rmtree(study, ignore_errors=True)  # a fresh study each time: one trial to time
        started = time.time()
        code = tune(space, out=study, trials=1, data=[f"t15={SAMPLE}"], features=[f"t15={cache}"], device="cpu",
                    sets=["epochs=1", f"text_encoder={args.text_encoder}", "stage1_mismatch=warn",
                          *EXTRA_SETS.get(model, [])])
        seconds = time.time() - started
        (run,) = sorted((study / "trials").iterdir())
        history = json.loads((run / "metrics.json").read_text())["history"] if code == 0 else []
        epoch = history[0]["train_seconds"] + history[0]["eval_seconds"] if history else float("nan")
        rows.append((model, code, seconds, epoch))
        print(f"{model}: exit {code}, trial {seconds:.1f} s, epoch {epoch:.1f} s", file=sys.stderr, flush=True)
    print("| space | trial on the sample (s) | of which one epoch, train + dev (s) |")
    print("|---|---|---|")
    for model, code, seconds, epoch in rows:
        print(f"| `grids/tune/{model}.toml` | {seconds:.1f} | {epoch:.1f} |" + ("" if code == 0 else " (failed)"))


if __name__ == "__main__":
    main()
