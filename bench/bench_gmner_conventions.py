"""How the GMNER metric conventions move the numbers (docs/gmner.md, "Conventions and their effect").

Generated Twitter-GMNER data (tests/helpers/gmner.py: the entity is the red one of three drawn
rectangles), a detector that keeps only its top ``--top-k`` objects (so some boxed entities have no
candidate: coverage < 1), then one run with the grounding head and one text-only tagger, both scored
under the four conventions (uncovered: hindex | mqspn) x (IoU >= 0.5 | IoU > 0.5). Prints a markdown
table of test GMNER / EEG F1 and the coverage. CPU, about a minute on a quiet 2-core machine:

    OMP_NUM_THREADS=1 python bench/bench_gmner_conventions.py --top-k 2 --out /tmp/gmner-bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CONVENTIONS = [("hindex", ">="), ("hindex", ">"), ("mqspn", ">="), ("mqspn", ">")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (replaced)")
    parser.add_argument("--top-k", type=int, default=2, help="objects the detector keeps per picture (3 are drawn)")
    parser.add_argument("--test-posts", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args(argv)

    from conftest import write_tiny_bert
    from helpers.gmner import register_blob_detector, write_gmner_dataset

    from mner.features.cli import main as features_main
    from mner.trainer.cli import main as train_main

    if args.out.exists():
        shutil.rmtree(args.out)
    data, images, xml, cache = args.out / "data", args.out / "images", args.out / "xml", args.out / "gmner.h5"
    truth = write_gmner_dataset(data, images, xml, posts={"train": 48, "dev": 16, "test": args.test_posts})
    register_blob_detector()
    assert features_main(["extract", "--data", str(data), "--images", str(images), "--out", str(cache),
                          "--random-init", "--detector", "blobs-test", "--score-threshold", "0", "--top-k",
                          str(args.top_k), "--detector-min-size", "64", "--encoder", "clip", "--clip-model",
                          "clip-test", "--batch-size", "32", "--device", "cpu", "--no-progress"]) in (0, None)
    bert = write_tiny_bert(args.out / "tiny-bert")
    common = ["--features", str(cache), "--data", str(data), "--model", "bert_crf", "--text-encoder", str(bert),
              "--epochs", str(args.epochs), "--batch-size", "8", "--encoder-lr", "1e-3", "--head-lr", "3e-3",
              "--crf-lr", "5e-2", "--patience", "0", "--seed", str(args.seed), "--device", "cpu",
              "--max-length", "24"]
    runs = {"grounding head": args.out / "head", "text only (None for every entity)": args.out / "text"}
    assert train_main([*common, "--out", str(runs["grounding head"]), "--boxes", str(xml)]) == 0
    assert train_main([*common, "--out", str(runs["text only (None for every entity)"])]) == 0

    rows = []
    for name, run in runs.items():
        for uncovered, compare in CONVENTIONS:
            assert train_main(["evaluate", str(run), "--split", "test", "--device", "cpu", "--boxes", str(xml),
                               "--uncovered", uncovered, "--iou-compare", compare]) == 0
            tag = f"gmner-{uncovered}-iou{'ge' if compare == '>=' else 'gt'}0.5"
            (result,) = (run / "eval").glob(f"test-*-{tag}.json")
            scores = json.loads(result.read_text())
            rows.append((name, uncovered, compare, scores))
    coverage = rows[0][3]["box_coverage"]
    print(f"test: {coverage['entities']} entities, {coverage['boxed']} boxed (generator: "
          f"{truth['test']['boxed']}), {coverage['covered']} covered by the top-{args.top_k} detector "
          f"({100 * coverage['share']:.1f}%)\n")
    print("| run | uncovered | IoU | GMNER F1 | EEG F1 | MNER F1 |")
    print("|---|---|---|---|---|---|")
    for name, uncovered, compare, scores in rows:
        print(f"| {name} | {uncovered} | {compare} 0.5 | {100 * scores['gmner']['f1']:.2f} | "
              f"{100 * scores['eeg']['f1']:.2f} | {100 * scores['mner']['f1']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
