"""Throughput of mner-features extract per component, real architectures with random weights.

    OMP_NUM_THREADS=2 python bench/bench_extract.py --images 8 [--device cuda] [--detector-min-size 800]

Prints images/s for the detector, each encoder, the prompt sets and the whole run (one run, so the
ratios between components are comparable). Runs on CUDA too when available (--device cuda).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mner.features.extract import ExtractOptions, run_extraction


def make_corpus(root: Path, count: int) -> tuple[Path, Path]:
    images, data = root / "images", root / "data"
    images.mkdir(parents=True)
    data.mkdir()
    rng = np.random.default_rng(0)
    posts = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(images / f"{i}.jpg")
        posts.append(f"IMGID:{i}\nJohn\tB-PER\nin\tO\nParis\tB-LOC\n")
    (data / "test.txt").write_text("\n".join(posts) + "\n")
    return data, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--detector-min-size", type=int, default=800)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, images = make_corpus(Path(tmp), args.images)
        opts = ExtractOptions(data=str(data), images=str(images), out=str(Path(tmp) / "bench.h5"),
                              detector="maskrcnn", encoders=["clip", "resnet152", "swin"], prompts=["vcrmner"],
                              random_init=True, device=args.device, batch_size=args.batch_size, top_k=args.top_k,
                              score_threshold=0.0, detector_min_size=args.detector_min_size, progress=False)
        start = time.perf_counter()
        summary = run_extraction(opts)
        total = time.perf_counter() - start
    n = summary.num_images
    print(f"device {args.device}, {n} images 640x480, {summary.num_objects} objects "
          f"(top-k {args.top_k}), detector min size {args.detector_min_size}, batch {args.batch_size}")
    print(f"{'component':<26}{'seconds':>10}{'images/s':>12}")
    for name, seconds in summary.seconds.items():
        print(f"{name:<26}{seconds:>10.2f}{n / seconds if seconds else float('inf'):>12.2f}")
    print(f"{'whole run (incl. model build)':<26}{total:>10.2f}{n / total:>12.2f}")


if __name__ == "__main__":
    main()
