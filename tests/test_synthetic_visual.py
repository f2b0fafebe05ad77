"""Acceptance: when only the image decides an entity's type, every multimodal model beats text-only.

The same sentences ("meet jordan today") tag the name B-PER when the post's image shows a person
(red upright figure on a dark background) and B-LOC when it shows a place (blue sky over a green
horizon). Text alone can at best guess the type, so bert_crf sits near 50% F1; a model that reads
the cached visual features can be right every time. Runs the real pipeline end to end:
generated images -> ``mner-features extract --random-init`` (the tiny ``*-test`` towers) -> ``mner-train``
for each model.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["jordan", "paris", "sydney", "victoria", "chelsea", "florence", "dallas", "austin"]
TEMPLATES = [
    ["meet", "{}", "today"], ["{}", "is", "new"], ["love", "{}"], ["rt", "{}", "photo"],
    ["photo", "of", "{}", "today"], ["the", "game", "with", "{}"],
]
# posts per split with their own images (ids may not repeat inside a split); dev re-uses training
# images (its posts are copies of training posts: it only picks the best epoch), so stage 1 runs
# on train + test images only, and the test pictures are unseen in training
SPLITS = {"train": 48, "test": 32}
IMAGE_SIZE = (96, 72)
MULTIMODAL = {
    "vcrmner": ["--set", "num_heads=2", "--set", "num_blocks=1", "--set", "dropout=0.0"],
    # promptmner fuses inside the encoder's own layers (MAS), which train at --encoder-lr; the tiny random
    # BERT's attention starts near zero (std-0.02 weights), so the clues reach the words at ~0.1% of their
    # norm: with 1e-3, dropout 0.1 and 20 epochs it often never opened that path (test F1 0.41-0.81)
    "promptmner": ["--set", "num_continuous_prompts=8", "--set", "dropout=0.0", "--epochs", "40", "--head-lr", "1e-2",
                   "--encoder-lr", "3e-3"],
    "pmner": ["--set", "num_heads=2", "--set", "dropout=0.0", "--epochs", "20", "--head-lr", "1e-2"],
    # paper mode: a tiny random CLIP tower fine-tuned over the cached OWLv2 crops (its own lr group)
    "mgipscl": ["--set", "clip_model=tiny-random", "--set", "num_heads=2", "--set", "dropout=0.0",
                "--set", "clip_lr=1e-3", "--epochs", "8"],
    # swin-test grid (12x12x256) + random BLIP captions as BERT's second segment
    "espvr": ["--set", "cross_width=32", "--set", "cross_heads=2",
              "--set", "dropout=0.0", "--epochs", "8"],
}
COMMON = ["--epochs", "15", "--batch-size", "8", "--encoder-lr", "1e-3", "--head-lr", "3e-3", "--crf-lr", "5e-2",
          "--patience", "0", "--seed", "13", "--device", "cpu", "--max-length", "24"]
MIN_GAP = 0.2  # F1 points (0..1) a multimodal model must be ahead of bert_crf


def load_make_images():
    spec = importlib.util.spec_from_file_location("make_images", ROOT / "sample" / "make_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_dataset(folder: Path, images: Path) -> None:
    """Twitter-format split files + one JPEG per image id; the type of each name follows its image."""
    make_images = load_make_images()
    rng = random.Random(7)
    images.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    for split_index, (split, num_posts) in enumerate(SPLITS.items()):
        posts = []
        for p in range(num_posts):
            (kind, code), entity_type = ((("person", 1), "PER"), (("place", 2), "LOC"))[p % 2]
            image_id = f"{code}{split_index}{p:03d}"
            make_images.make_image(kind, int(image_id), size=IMAGE_SIZE).save(images / f"{image_id}.jpg", quality=90)
            name = NAMES[(p // 2) % len(NAMES)]  # every name appears with both types
            words = [f"{name}\tB-{entity_type}" if w == "{}" else f"{w}\tO" for w in rng.choice(TEMPLATES)]
            posts.append("\n".join([f"IMGID:{image_id}", *words]))
        (folder / f"{split}.txt").write_text("\n\n".join(posts) + "\n\n", encoding="utf-8")
        if split == "train":
            (folder / "valid.txt").write_text("\n\n".join(posts[::3]) + "\n\n", encoding="utf-8")


def build_cache(data: Path, images: Path, out: Path) -> None:
    from mner.features.cli import main as features_main

    # one pass for every paper, by the registered tiny variants of their towers (same output layouts, a
    # fraction of the cost; each records the model it stands for): the generated pictures differ in colour
    # and layout, which any random conv / ViT features separate
    argv = [
        "extract", "--data", str(data), "--images", str(images), "--out", str(out), "--for", "all", "--tiny",
        "--top-k", "5", "--detector-min-size", "64", "--batch-size", "32", "--device", "cpu", "--no-progress",
    ]
    status = features_main(argv)
    assert status in (0, None), f"mner-features {' '.join(argv)} exited with {status}"


def read_test_f1(run: Path) -> float:
    test = json.loads((run / "metrics.json").read_text())["test"]
    return float(test["micro"]["f1"] if "micro" in test else test["f1"])


@pytest.mark.slow
def test_visual_content_decides_the_type(tmp_path, tiny_bert):
    from mner.trainer.cli import main as train_main
    from mner.trainer.models import available_models

    data, images, cache = tmp_path / "data", tmp_path / "images", tmp_path / "synthetic.h5"
    write_dataset(data, images)
    build_cache(data, images, cache)

    assert {"bert_crf", *MULTIMODAL} <= set(available_models())
    scores = {}
    for model, extra in {"bert_crf": [], **MULTIMODAL}.items():
        run = tmp_path / f"run-{model}"
        argv = ["--features", str(cache), "--data", str(data), "--model", model, "--text-encoder", str(tiny_bert),
                "--out", str(run), *COMMON, *extra]
        assert train_main(argv) == 0, f"mner-train {' '.join(argv)} failed"
        scores[model] = read_test_f1(run)

    print("test F1:", scores)
    assert scores["bert_crf"] < 0.75, f"text alone should not know the type: {scores}"
    behind = [model for model in MULTIMODAL if scores[model] < scores["bert_crf"] + MIN_GAP]
    assert not behind, f"{behind} did not use the image (need bert_crf + {MIN_GAP}): {scores}"
