"""A complete hand-written feature cache and its ids, for the cache and cache-CLI tests."""

from __future__ import annotations

import hashlib

import numpy as np

from mner.pipeline.cache import CacheWriter, make_provenance, shard_record
from mner.pipeline.data import Dataset, Post

PROMPT_TEXTS = [f"a photo of {w}" for w in ("a person", "a place", "a company", "a thing", "ümlaut", "x")]

CLIP_DIM, PATCHES, CATEGORIES, PROMPTS = 8, 5, 4, 6  # widths of the hand-written cache


def make_ids(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return sorted({str(rng.integers(10**5, 10**6)) for _ in range(count * 2)})[:count]


def image_record(image_id: str) -> dict:
    """Deterministic per-image arrays (from the id alone), so shards and a single write agree."""
    rng = np.random.default_rng(int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16))
    status = int(rng.choice([0, 0, 0, 1, 2, 3]))
    objects = 0 if status else int(rng.integers(0, 4))  # 0..3, zero-object images included
    return {
        "status": status,
        "detail": "" if status == 0 else f"{image_id}.jpg: cannot decode ({status})",
        "width": 0 if status else int(rng.integers(50, 500)),
        "boxes": rng.random((objects, 4)).astype(np.float32),
        "scores": rng.random(objects).astype(np.float32),
        "class_ids": rng.integers(0, 80, objects).astype(np.int32),
        "crops": [rng.bytes(int(rng.integers(1, 40))) for _ in range(objects)],
        "image_embed": rng.standard_normal(CLIP_DIM),
        "patch_tokens": rng.standard_normal((PATCHES, CLIP_DIM)),
        "crop_embed": rng.standard_normal((objects, CLIP_DIM)),
        "crop_weights": rng.random((objects, CATEGORIES)),
        "image_relevance": rng.random(PROMPTS),
    }


def make_posts(ids: list[str]) -> Dataset:
    posts = {"train": [], "dev": [], "test": []}
    for i, image_id in enumerate(ids):
        split = ("train", "dev", "test")[i % 3]
        tokens = ("RT", "@user", "visit", "Paris", "ünïcode")[: 2 + i % 4]
        tags = ("O", "O", "O", "B-LOC", "O")[: len(tokens)] if i % 7 else None
        posts[split].append(
            Post(post_id=f"{split}-{len(posts[split])}", tokens=tokens, tags=tags,
                 image_id=image_id if i % 5 else None, split=split, source=f"data/{split}.txt:{4 * i + 1}")
        )
    return Dataset(splits=posts, data_hash="abc123", files={"train": "data/train.txt", "test": "data/test.txt"},
                   orphan_i={"train": 1}, notes=["renamed 2 OTHER tags to MISC"])


GROUP_FIELDS = {"detector": {"detector": "maskrcnn", "crops": {"format": "JPEG"}}, "encoder": {"encoder": "x"},
                "prompts": {"prompt_set": "vcrmner"}}


def provenance(component: str, model: str, ids: list[str], pretrained: str = "random", shard=None) -> dict:
    return make_provenance(component, model=model, pretrained=pretrained, preprocessing={"size": 224},
                           thresholds={"score": 0.5, "top_k": 3}, image_ids=ids, shard=shard,
                           extra=GROUP_FIELDS.get(component))


def write_cache(path, ids: list[str], posts_ids: list[str], *, groups=("objects", "clip", "vcrmner"),
                overwrite: bool = False, shard: tuple[int, int] = (0, 1)) -> None:
    record = shard_record(*shard, posts_ids)  # every group records which shard of the id list it is

    records = [image_record(i) for i in ids]
    counts = [len(r["scores"]) for r in records]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def stack(key, shape):
        return np.concatenate([r[key] for r in records]) if records else np.zeros(shape)

    with CacheWriter(path, overwrite=overwrite) as writer:
        writer.write_images(ids, [r["status"] for r in records], [r["detail"] for r in records],
                            [r["width"] for r in records], [r["width"] // 2 for r in records])
        writer.write_posts(make_posts(posts_ids))
        if "objects" in groups:
            writer.write_group("objects", {
                "offsets": (offsets, "offsets"),
                "boxes": (stack("boxes", (0, 4)), "object"),
                "scores": (stack("scores", (0,)), "object"),
                "class_ids": (stack("class_ids", (0,)).astype(np.int32), "object"),
                "crop_jpeg": ([c for r in records for c in r["crops"]], "object"),
            }, provenance("detector", "maskrcnn", ids, "torchvision:COCO_V1", shard=record))
        if "clip" in groups:
            writer.write_group("encoders/clip", {
                "image_embed": (np.stack([r["image_embed"] for r in records]), "image"),
                "patch_tokens": (np.stack([r["patch_tokens"] for r in records]), "image"),
                "crop_embed": (stack("crop_embed", (0, CLIP_DIM)), "object"),
            }, provenance("encoder", "ViT-B-32", ids, shard=record), attrs={"logit_scale": 100.0})
        if "vcrmner" in groups:
            rng = np.random.default_rng(7)
            writer.write_group("prompts/vcrmner", {
                "prompt_text": (PROMPT_TEXTS, "global"),
                "prompt_category": (np.arange(PROMPTS, dtype=np.int16) % CATEGORIES, "global"),
                "prompt_embed": (rng.standard_normal((PROMPTS, CLIP_DIM)), "global"),
                "centroids": (rng.standard_normal((CATEGORIES, CLIP_DIM)), "global"),
                "crop_weights": (stack("crop_weights", (0, CATEGORIES)), "object"),
                "image_relevance": (np.stack([r["image_relevance"] for r in records]), "image"),
            }, provenance("prompts", "ViT-B-32", ids, shard=record),
                attrs={"category_names": ["PER", "LOC", "ORG", "MISC"], "logit_scale": 100.0})
        if "resnet" in groups:
            writer.write_group("encoders/resnet152", {
                "grid": (np.ones((len(ids), 2, 2, 16)), "image"),
                "crop_pooled": (np.ones((int(offsets[-1]), 16)), "object"),
            }, provenance("encoder", "resnet152", ids, shard=record))


IDS = make_ids(40)


def _shard_ids(count: int) -> list[list[str]]:
    return [IDS[i::count] for i in range(count)]  # interleaved, as a hash-based assignment gives
