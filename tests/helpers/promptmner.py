"""PromptMNER test inputs: feature spec, batches and a tiny modality-aware layer."""

from __future__ import annotations

import numpy as np
import torch

from helpers.models import text_batch
from mner.pipeline.cache import FeatureSpec
from mner.trainer.models import get_model_class
from mner.trainer.models.promptmner import (
    ModalityAwareLayer,
)

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]

CLIP_WIDTH, NUM_PROMPTS = 12, 5


# post 0: image ok; post 1: image ok, zero objects (irrelevant here); post 2: missing image
POSTS = [
    (["john", "smith", "visit", "paris"], ["B-PER", "I-PER", "O", "B-LOC"]),
    (["meet", "apple", "today"], ["O", "B-ORG", "O"]),
    (["love", "london", "game"], ["O", "B-LOC", "B-MISC"]),
]


IMAGE_OK = [True, True, False]


def feature_spec(config) -> FeatureSpec:
    rng = np.random.default_rng(0)
    shapes, globals_, attrs = {}, {}, {"encoders/clip/RN50": {"logit_scale": 100.0}}
    for path in get_model_class("promptmner").required_features(config):
        if path.endswith("prompt_embed"):
            globals_[path] = rng.standard_normal((NUM_PROMPTS, CLIP_WIDTH)).astype(np.float32)
            shapes[path] = (NUM_PROMPTS, CLIP_WIDTH)
        else:
            shapes[path] = (NUM_PROMPTS,) if path.endswith("image_relevance") else (CLIP_WIDTH,)
    return FeatureSpec(shapes=shapes, globals=globals_, attrs=attrs)


def make_batch(tokenizer, spec: FeatureSpec) -> dict:
    text, _ = text_batch(tokenizer, max_length=64, posts=POSTS)  # posts fit the tiny encoder's 64 positions
    ok = torch.tensor(IMAGE_OK)
    visual = {"images/ok": ok}
    generator = torch.Generator().manual_seed(0)
    for path, shape in spec.shapes.items():
        if path in spec.globals:
            continue
        values = torch.rand((len(POSTS), *shape), generator=generator)
        if path.endswith("image_relevance"):
            values = values.softmax(-1)
        visual[path] = values * ok[:, None]  # missing image: zeros, as the VisualBatcher makes them
    return {**text, "visual": visual}


def tiny_layer(use_mas: bool) -> ModalityAwareLayer:
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ModalityAwareLayer(BertLayer(config), num_heads=2, use_mas=use_mas).eval()
