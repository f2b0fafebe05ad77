"""Batch-contract inputs for model-level tests: labels, posts, text batches, tiny feature specs and visual tensors."""

from __future__ import annotations

import re

import numpy as np
import torch

from mner.pipeline.cache import FeatureSpec

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]


CATEGORIES = ["PER", "LOC", "ORG", "MISC"]


NUM_PROMPTS = 6


# regex over cache paths -> (rows kind, per-row shape, extra attrs); "global" rows land in FeatureSpec.globals
TINY_SCHEMA: list[tuple[str, str, tuple, dict]] = [
    (r"objects/offsets", "offsets", (), {}),
    (r"objects/boxes", "object", (4,), {}),
    (r"objects/scores", "object", (), {}),
    (r"objects/class_ids", "object", (), {}),
    (r"encoders/clip/image_embed", "image", (16,), {"logit_scale": 100.0}),
    (r"encoders/clip/patch_tokens", "image", (5, 12), {}),
    (r"encoders/clip/crop_embed", "object", (16,), {}),
    (r"encoders/resnet152/grid", "image", (3, 3, 24), {}),
    (r"encoders/resnet152/crop_pooled", "object", (24,), {}),
    (r"encoders/swin/grid", "image", (12, 12, 8), {}),  # ESPVR's VRP needs the real 12x12 grid
    (r"grounding/offsets", "offsets", (), {}),
    (r"grounding/pixels", "grounding", (3, 32, 32), {}),
    (r"encoders/clip_grounding/states", "grounding", (2, 5, 16), {"layers": [1, 2]}),
    (r"captions/text", "text", (), {}),
    (r"prompts/[^/]+/prompt_embed", "global", (NUM_PROMPTS, 16), {}),
    (r"prompts/[^/]+/prompt_category", "global", (NUM_PROMPTS,), {"category_names": CATEGORIES}),
    (r"prompts/[^/]+/centroids", "global", (len(CATEGORIES), 16), {"category_names": CATEGORIES}),
    (r"prompts/[^/]+/crop_weights", "object", (len(CATEGORIES),), {"category_names": CATEGORIES}),
    (r"prompts/[^/]+/image_relevance", "image", (NUM_PROMPTS,), {}),
]


def schema_entry(path: str) -> tuple[str, tuple, dict]:
    for pattern, kind, shape, attrs in TINY_SCHEMA:
        if re.fullmatch(pattern, path):
            return kind, shape, attrs
    raise KeyError(f"tests/helpers/models.py TINY_SCHEMA has no entry for cache path {path!r}: add one")


def tiny_feature_spec(paths: list[str], rng: np.random.Generator) -> FeatureSpec:
    shapes, globals_, attrs = {}, {}, {}
    for path in paths:
        kind, shape, extra = schema_entry(path)
        attrs.setdefault(path.rsplit("/", 1)[0], {}).update(extra)  # FeatureSpec.attrs is keyed by group
        shapes[path] = shape
        if kind == "global":
            if path.endswith("prompt_category"):
                globals_[path] = np.arange(NUM_PROMPTS, dtype=np.int16) % len(CATEGORIES)
            else:
                globals_[path] = rng.standard_normal(shape).astype(np.float32)
    return FeatureSpec(shapes=shapes, globals=globals_, attrs=attrs)


# post 0: image with 3 objects; post 1: ok image, zero objects; post 2: missing image; post 3: long
# post whose last words fall past max_length and with a zero-piece word in the middle.
OBJECT_COUNTS = [3, 0, 0, 2]


IMAGE_OK = [True, True, False, True]


GROUNDING_COUNTS = [3, 0, 0, 1]  # grounding crops per image (post 1: an ok image without any crop)


CAPTIONS = ["a man in paris", "", "", "a game"]


POSTS = [
    (["john", "smith", "visit", "paris"], ["B-PER", "I-PER", "O", "B-LOC"]),
    (["meet", "apple", "today"], ["O", "B-ORG", "O"]),
    (["love", "london"], ["O", "B-LOC"]),
    (["rt", "google", "\u200b", "game"] + ["the", "city"] * 14, ["O", "B-ORG", "O", "B-MISC"] + ["O"] * 28),
]


def tiny_visual(paths: list[str], spec: FeatureSpec, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    batch_size, num_slots = len(OBJECT_COUNTS), max(OBJECT_COUNTS)
    mask = torch.arange(num_slots)[None, :] < torch.tensor(OBJECT_COUNTS)[:, None]  # (B, K)
    ok = torch.tensor(IMAGE_OK)
    grounding_mask = torch.arange(3)[None, :] < torch.tensor(GROUNDING_COUNTS)[:, None]  # (B, 3)
    visual = {"objects/mask": mask, "images/ok": ok, "grounding/mask": grounding_mask}
    for path in paths:
        kind = schema_entry(path)[0]
        if kind in ("global", "offsets"):
            continue
        if kind == "text":
            visual[path] = list(CAPTIONS)
            continue
        lead = {"image": (batch_size,), "object": (batch_size, num_slots), "grounding": (batch_size, 3)}[kind]
        values = torch.from_numpy(rng.standard_normal(lead + tuple(spec.shapes[path])).astype(np.float32))
        if path.endswith("crop_weights"):
            values = values.softmax(-1)
        if path.endswith("pixels"):  # uint8 crop pixels, as the batcher delivers them
            values = torch.from_numpy(rng.integers(0, 256, lead + tuple(spec.shapes[path]), dtype=np.uint8))
        valid = {"image": ok, "object": mask, "grounding": grounding_mask}[kind]
        visual[path] = values * valid.reshape(valid.shape + (1,) * (values.dim() - valid.dim()))
    return visual


def text_batch(tokenizer, max_length: int = 24, posts=None) -> tuple[dict, list[int]]:
    """Batch-contract text tensors built directly from the tokenizer (first piece of each word);
    ``posts`` (word and tag lists) default to POSTS."""
    posts = POSTS if posts is None else posts
    label_id = {label: i for i, label in enumerate(LABELS)}
    encoded = tokenizer(
        [words for words, _ in posts], is_split_into_words=True, truncation=True, max_length=max_length,
        padding=True, return_tensors="pt",
    )
    num_words = max(len(words) for words, _ in posts)
    word_index = torch.zeros(len(posts), num_words, dtype=torch.long)
    labels = torch.zeros(len(posts), num_words, dtype=torch.long)
    for b, (_words, tags) in enumerate(posts):
        labels[b, : len(tags)] = torch.tensor([label_id[t] for t in tags])
        for position, word in enumerate(encoded.word_ids(b)):
            if word is not None and word_index[b, word] == 0:
                word_index[b, word] = position
    word_mask = word_index > 0
    batch = {
        "input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
        "word_index": word_index, "word_mask": word_mask, "labels": labels,
    }
    return batch, word_mask.sum(1).tolist()
