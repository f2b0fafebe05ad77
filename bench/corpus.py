"""Generated benchmark data: 640x480 JPEGs and one post per image (shared by the extraction benchmarks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_corpus(root: Path, count: int, size=(640, 480), noise: bool = False) -> tuple[Path, Path]:
    """``noise``: per-pixel random (large JPEGs, slow to decode); else smooth random pictures."""
    images, data = root / "images", root / "data"
    images.mkdir(parents=True)
    data.mkdir()
    rng = np.random.default_rng(0)
    posts = []
    for i in range(count):
        if noise:
            picture = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        else:
            small = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
            picture = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        picture.save(images / f"{i}.jpg", quality=90)
        posts.append(f"IMGID:{i}\nJohn\tB-PER\nin\tO\nParis\tB-LOC\n")
    (data / "test.txt").write_text("\n".join(posts) + "\n")
    return data, images
