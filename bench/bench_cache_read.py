"""Random-access read speed of one image's features from a Twitter-2015-shaped cache.

Builds a synthetic cache in a temp dir (VCRMNER + P-MNER features: objects, CLIP image embed,
49x768 patch tokens, 512-d crop embeds, ResNet 2048-d pooled crops, prompt weights), then reads
every feature of one random image at a time: single process (h5py), DataLoader with 2 workers
(second, warm pass) and in_memory=True. Target: 5,000 images/s.

    OMP_NUM_THREADS=1 python bench/bench_cache_read.py [--images 8000] [--reads 4000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from mner.pipeline.cache import CacheWriter, FeatureCache

TARGET = 5000.0
PATHS = (  # what VCRMNER + P-MNER + PromptMNER read per image
    "images/status",
    "objects/maskrcnn/boxes",
    "encoders/clip/ViT-B-16/image_embed",
    "encoders/clip/ViT-B-16/patch_tokens",
    "crops/maskrcnn/clip/ViT-B-16/crop_embed",
    "crops/maskrcnn/resnet/resnet152/crop_pooled",
    "crops/maskrcnn/prompts/ViT-B-16/vcrmner/crop_weights",
    "prompts/RN50/promptmner_task/image_relevance",
)
DIMS = {"D": 512, "P": 49, "Dp": 768, "C": 4, "Q": 3}  # CLIP ViT-B-32-shaped tokens, as the figures below


def build(path: str, num_images: int, seed: int = 0) -> None:
    """The groups of PATHS with real widths, from the specs alone (``tiny.tiny_group``): 0..10 objects per image."""
    from mner.pipeline.cache.tiny import tiny_group

    rng = np.random.default_rng(seed)
    ids = sorted({f"{i:07d}" for i in rng.choice(10**7, num_images, replace=False)})
    groups = {"objects/maskrcnn": {}, "encoders/clip/ViT-B-16": {}, "crops/maskrcnn/clip/ViT-B-16": {},
              "crops/maskrcnn/resnet/resnet152": {"C": 2048}, "crops/maskrcnn/prompts/ViT-B-16/vcrmner": {},
              "prompts/RN50/promptmner_task": {}}
    with CacheWriter(path, overwrite=True) as writer:
        writer.write_images(ids)
        for k, (group, dims) in enumerate(groups.items()):
            counts = rng.integers(0, 11, num_images).tolist() if group.startswith("objects/") else None
            tiny_group(writer, group, seed=seed + k, dims={**DIMS, **dims}, counts=counts)


class ImageFeatures:
    """Map-style dataset: row -> every feature of that image (what the trainer's batcher does)."""

    def __init__(self, cache: FeatureCache):
        self.cache = cache

    def __len__(self) -> int:
        return self.cache.num_images

    def __getitem__(self, row: int) -> dict:
        return {path: self.cache.read(path, row) for path in PATHS}


def rate_single(cache: FeatureCache, rows: np.ndarray) -> float:
    dataset = ImageFeatures(cache)
    for row in rows[:200]:  # warm the handle and offsets
        dataset[int(row)]
    start = time.perf_counter()
    for row in rows:
        dataset[int(row)]
    return len(rows) / (time.perf_counter() - start)


def pad_collate(items: list[dict]) -> dict:
    """Per-image rows stacked to (B, ...), per-object rows padded to (B, K, ...): tensors cross processes
    through shared memory, a few per batch, as in the trainer's visual batcher."""
    import torch

    batch = {}
    for path in PATHS:
        arrays = [item[path] for item in items]
        if path.split("/")[0] == "objects" or path.endswith(("crop_embed", "crop_pooled", "crop_weights")):
            k = max(1, max(len(a) for a in arrays))
            padded = np.zeros((len(arrays), k, *arrays[0].shape[1:]), dtype=arrays[0].dtype)
            for i, a in enumerate(arrays):
                padded[i, : len(a)] = a
            batch[path] = torch.from_numpy(padded)  # (B, K, ...)
        else:
            batch[path] = torch.from_numpy(np.stack(arrays))  # (B, ...)
    return batch


def rate_loader(cache: FeatureCache, rows: np.ndarray, workers: int) -> float:
    import torch.utils.data

    loader = torch.utils.data.DataLoader(
        ImageFeatures(cache), batch_size=64, sampler=[int(r) for r in rows], num_workers=workers,
        collate_fn=pad_collate, persistent_workers=True, prefetch_factor=4,
    )
    for _ in loader:  # first pass: workers start, open their own handle, page cache warms
        pass
    start = time.perf_counter()
    for _ in loader:
        pass
    return len(rows) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8000, help="images in the synthetic cache")
    parser.add_argument("--reads", type=int, default=4000, help="random image reads per measurement")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mner-bench-") as folder:
        path = os.path.join(folder, "t15-synthetic.h5")
        start = time.perf_counter()
        build(path, args.images)
        size = os.path.getsize(path) / 2**20
        print(f"built {path}: {args.images} images, {size:.0f} MiB in {time.perf_counter() - start:.1f} s")
        rows = np.random.default_rng(1).integers(0, args.images, args.reads)
        results = {
            "single process (h5py)": rate_single(FeatureCache(path), rows),
            f"DataLoader, {args.workers} workers (warm)": rate_loader(FeatureCache(path), rows, args.workers),
            "in_memory=True": rate_single(FeatureCache(path, in_memory=True), rows),
        }
    print(f"random reads of all {len(PATHS)} feature paths of one image ({args.reads} reads):")
    for name, rate in results.items():
        print(f"  {name:<32} {rate:>9,.0f} images/s   {rate / TARGET:5.2f}x target ({TARGET:,.0f}/s)")


if __name__ == "__main__":
    main()
