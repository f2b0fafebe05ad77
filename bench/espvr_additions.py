"""Does each of ESPVR's three additions help? (issue 18; docs/models/espvr.md, Measurements)

The additions (named switches, off in the paper presets): ``vrp_training_spans=gold``,
``straight_through=true``, ``global_token=true``. Each is switched on alone, and all three together,
against the paper reading, on the synthetic image-decides-the-type data of
``tests/test_synthetic_visual.py`` (the same sentences are PER or LOC depending on the picture) with

- ``images``: the generated pictures through the tiny random Swin (``swin-test``) -- the image decides;
- ``no-info``: the same posts over a ``--no-images`` cache fed as features
  (``use_placeholder_features=true``: every post carries the same placeholder grid) -- the images carry
  no information, so an addition must not make the model worse than the text alone.

Tiny random BERT, the test's training settings, test F1 per seed. Prints a markdown table.
Usage: python bench/espvr_additions.py [--seeds 13 1] [--work bench/out/espvr_additions]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

VARIANTS = {
    "paper reading (all off)": [],
    "+ gold spans in training": ["--set", "vrp_training_spans=gold"],
    "+ straight-through": ["--set", "straight_through=true"],
    "+ b_0 token": ["--set", "global_token=true"],
    "all three": ["--set", "vrp_training_spans=gold", "--set", "straight_through=true", "--set", "global_token=true"],
}


def main(argv: list[str] | None = None) -> None:
    from conftest import write_tiny_bert
    from test_synthetic_visual import COMMON, MULTIMODAL, build_cache, read_test_f1, write_dataset

    from mner.features.cli import main as features_main
    from mner.trainer.cli import main as train_main

    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[13, 1])
    parser.add_argument("--work", default="bench/out/espvr_additions")
    args = parser.parse_args(argv)
    work = Path(args.work)
    data, images, cache = work / "data", work / "images", work / "synthetic.h5"
    no_info = work / "no-info.h5"
    bert = work / "tiny-bert"
    if not (bert / "config.json").is_file():
        write_tiny_bert(bert)
    if not cache.is_file():
        write_dataset(data, images)
        build_cache(data, images, cache)
    if not no_info.is_file():
        status = features_main(["extract", "--data", str(data), "--no-images", "--out", str(no_info), "--random-init",
                                "--missing-image", "placeholder", "--detector", "fasterrcnn-test", "--score-threshold",
                                "0", "--top-k", "2", "--detector-min-size", "64", "--encoder", "swin-test",
                                "--captions", "blip", "--device", "cpu", "--no-progress"])
        assert status in (0, None)
    common = list(COMMON)
    del common[common.index("--seed") : common.index("--seed") + 2]  # the seed is set per run
    rows: dict[str, dict[str, list[float]]] = {}
    conditions = (("images", cache, []), ("no-info", no_info, ["--set", "use_placeholder_features=true"]))
    for condition, features, extra in conditions:
        for name, switches in {"bert_crf (text only)": None, **VARIANTS}.items():
            for seed in args.seeds:
                run = work / "runs" / condition / name.replace(" ", "_").replace("(", "").replace(")", "") / str(seed)
                if not (run / "metrics.json").is_file():
                    model = ["--model", "bert_crf"] if switches is None else ["--model", "espvr", *MULTIMODAL["espvr"],
                                                                               *switches]
                    argv = ["--features", str(features), "--data", str(data), "--text-encoder", str(bert),
                            "--out", str(run), "--overwrite", "--seed", str(seed), *common, *model, *extra]
                    assert train_main(argv) == 0, f"mner-train {' '.join(argv)} failed"
                rows.setdefault(name, {}).setdefault(condition, []).append(read_test_f1(run))
    print("| variant | image decides: test F1 per seed (mean) | no-information cache: test F1 per seed (mean) |")
    print("|---|---|---|")
    for name, by_condition in rows.items():
        cells = [" / ".join(f"{100 * f:.1f}" for f in by_condition[c])
                 + f" ({100 * statistics.mean(by_condition[c]):.1f})" for c in ("images", "no-info")]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    (work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
