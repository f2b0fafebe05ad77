"""Generated data and a tiny feature cache for the sweep / report / protocol tests (nothing downloaded)."""

from __future__ import annotations

import random
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "twitter_sample"
NAMES = {"PER": ["john", "smith"], "LOC": ["paris", "london"], "ORG": ["apple", "google"]}
FILLER = ["the", "a", "in", "at", "of", "to", "and", "is", "rt", "with", "new", "city", "visit", "love"]


def write_dataset(folder: Path, *, seed: int, misc_tag: str = "MISC", sizes=(40, 12, 12), image_prefix="") -> Path:
    """train/valid/test files in the Twitter format; the fourth type is spelt ``misc_tag``
    (Twitter-2015 says OTHER, Twitter-2017 MISC)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "valid", "test"), sizes):
        lines = []
        for n in range(count):
            lines.append(f"IMGID:{image_prefix}{split}{n}")
            lines += [f"{w}\tO" for w in rng.sample(FILLER, 3)]
            entity_type = rng.choice(["PER", "LOC", "ORG", "MISC"])
            word = "game" if entity_type == "MISC" else rng.choice(NAMES[entity_type])
            lines.append(f"{word}\tB-{misc_tag if entity_type == 'MISC' else entity_type}")
            lines += [f"{w}\tO" for w in rng.sample(FILLER, 2)]
            lines.append("")
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def sample_image_ids(folder: Path = SAMPLE) -> list[str]:
    return sorted({line[6:].strip() for f in folder.glob("*.txt") for line in f.read_text().splitlines()
                   if line.startswith("IMGID:")})


VCRMNER_GROUPS = ("objects/maskrcnn-test", "crops/maskrcnn-test/clip/ViT-B-16-test",
                  "crops/maskrcnn-test/prompts/ViT-B-16-test/vcrmner")  # tiny variants of the paper's models


def write_random_cache(path: Path, image_ids: list[str], *, clip_width: int = 16, objects: int = 2,
                       placeholder_every: int = 0) -> Path:
    """A cache with what vcrmner's paper preset reads (objects, CLIP crop embeddings, prompt weights), from
    the specs alone (``tiny.py``): tiny instances standing for Mask R-CNN and CLIP ViT-B-16, random values
    (provenance pretrained=random, so the trainer and the report flag it)."""
    from mner.pipeline.cache.tiny import write_tiny_cache

    ids = sorted(image_ids)
    status = ["placeholder" if placeholder_every and i % placeholder_every == 0 else "ok" for i in range(len(ids))]
    stands_for = {"detector": "maskrcnn", "clip_model": "ViT-B-16"}
    write_tiny_cache(path, list(VCRMNER_GROUPS), image_ids=ids, status=status, dims={"D": clip_width, "C": 4},
                     counts=[objects] * len(ids), provenance={g: {"stands_for": stands_for} for g in VCRMNER_GROUPS})
    return path
