"""P-MNER test inputs: posts, a tiny model and its batches."""

from __future__ import annotations

import dataclasses

import torch

from helpers.models import text_batch
from mner.pipeline.cache import FeatureSpec
from mner.trainer.models import get_model_class

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]


RESNET_WIDTH = 24


CROPS, GRID = "crops/fasterrcnn/resnet/resnet152/crop_pooled", "encoders/resnet/resnet152/grid"
SCORES = "objects/fasterrcnn/scores"
SPEC = FeatureSpec(shapes={CROPS: (RESNET_WIDTH,), GRID: (3, 3, RESNET_WIDTH), SCORES: ()})


# post 0: two objects; post 1: ok image, zero objects; post 2: missing image
POSTS = [
    (["john", "smith", "visit", "paris"], ["B-PER", "I-PER", "O", "B-LOC"]),
    (["meet", "apple", "today"], ["O", "B-ORG", "O"]),
    (["love", "london", "game"], ["O", "B-LOC", "B-MISC"]),
]


OBJECTS = [2, 0, 0]


IMAGE_OK = [True, True, False]


def make_batch(tokenizer) -> dict:
    text, _ = text_batch(tokenizer, max_length=64, posts=POSTS)  # posts fit the tiny encoder's 64 positions
    generator = torch.Generator().manual_seed(0)
    mask = torch.arange(max(OBJECTS))[None] < torch.tensor(OBJECTS)[:, None]  # (B, K)
    ok = torch.tensor(IMAGE_OK)
    visual = {
        "images/ok": ok,
        "objects/fasterrcnn/mask": mask,
        SCORES: mask.float(),  # every object above P-MNER's 0.95
        CROPS: torch.rand(len(POSTS), max(OBJECTS), RESNET_WIDTH, generator=generator) * mask[:, :, None],
        GRID: torch.rand(len(POSTS), 3, 3, RESNET_WIDTH, generator=generator) * ok[:, None, None, None],
    }
    return {**text, "visual": visual}


def build(tiny_bert, **overrides):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    cls = get_model_class("pmner")
    config = dataclasses.replace(cls.Config(num_heads=2), **overrides)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    return cls(
        config, labels=LABELS, text_encoder=str(tiny_bert), tokenizer=tokenizer, features=SPEC
    ), tokenizer
