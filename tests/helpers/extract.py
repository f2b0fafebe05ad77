"""Stage-1 test inputs shared by the extraction tests: tiny-variant flags and noise images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Random-init tiny variants, every object kept, small chunks: a whole extraction in seconds.
TINY = ["--random-init", "--detector", "fasterrcnn-test", "--score-threshold", "0", "--top-k", "3",
        "--detector-min-size", "64", "--clip-model", "clip-test", "--chunk-size", "4", "--batch-size", "4",
        "--no-progress"]
IDS = ["a", "b", "c", "d"]


def noise(path: Path, seed: int, size=(96, 72)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def noise_corpus(root: Path, ids: list[str] = IDS, missing: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A dataset over ``ids`` and a folder with a noise picture for each id not in ``missing``: (data, images)."""
    from helpers.data import write_dataset

    images = root / "images"
    images.mkdir()
    for seed, image_id in enumerate(ids):
        if image_id not in missing:
            noise(images / f"{image_id}.jpg", seed)
    return write_dataset(root / "data", ids), images


def extract_tiny(data: Path, images: Path, out: Path, *extra: str) -> int:
    """``mner-features extract`` with the tiny flags (exit code)."""
    from mner.features.cli import main

    return main(["extract", "--data", str(data), "--images", str(images), "--out", str(out), *TINY, *extra])
