"""P-MNER test inputs: posts, a tiny model and its batches."""

from __future__ import annotations

import dataclasses

import torch

from mner.pipeline.cache import FeatureSpec
from mner.trainer.models import get_model_class

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]


RESNET_WIDTH = 24


SPEC = FeatureSpec(
    shapes={
        "encoders/resnet152/crop_pooled": (RESNET_WIDTH,),
        "encoders/resnet152/grid": (3, 3, RESNET_WIDTH),
    }
)


# post 0: two objects; post 1: ok image, zero objects; post 2: missing image
POSTS = [
    (["john", "smith", "visit", "paris"], ["B-PER", "I-PER", "O", "B-LOC"]),
    (["meet", "apple", "today"], ["O", "B-ORG", "O"]),
    (["love", "london", "game"], ["O", "B-LOC", "B-MISC"]),
]


OBJECTS = [2, 0, 0]


IMAGE_OK = [True, True, False]


def make_batch(tokenizer) -> dict:
    encoded = tokenizer([w for w, _ in POSTS], is_split_into_words=True, padding=True, return_tensors="pt")
    num_words = max(len(w) for w, _ in POSTS)
    word_index = torch.zeros(len(POSTS), num_words, dtype=torch.long)
    labels = torch.zeros(len(POSTS), num_words, dtype=torch.long)
    for b, (_words, tags) in enumerate(POSTS):
        labels[b, : len(tags)] = torch.tensor([LABELS.index(t) for t in tags])
        for position, word in enumerate(encoded.word_ids(b)):
            if word is not None and word_index[b, word] == 0:
                word_index[b, word] = position
    generator = torch.Generator().manual_seed(0)
    mask = torch.arange(max(OBJECTS))[None] < torch.tensor(OBJECTS)[:, None]  # (B, K)
    ok = torch.tensor(IMAGE_OK)
    visual = {
        "images/ok": ok,
        "objects/mask": mask,
        "encoders/resnet152/crop_pooled": torch.rand(
            len(POSTS), max(OBJECTS), RESNET_WIDTH, generator=generator
        )
        * mask[:, :, None],
        "encoders/resnet152/grid": torch.rand(len(POSTS), 3, 3, RESNET_WIDTH, generator=generator)
        * ok[:, None, None, None],
    }
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "word_index": word_index,
        "word_mask": word_index > 0,
        "labels": labels,
        "visual": visual,
    }


def build(tiny_bert, **overrides):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    cls = get_model_class("pmner")
    config = dataclasses.replace(cls.Config(num_heads=2), **overrides)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    return cls(
        config, labels=LABELS, text_encoder=str(tiny_bert), tokenizer=tokenizer, features=SPEC
    ), tokenizer
