"""The pre-flight check on the longest posts changes nothing (issue 18): for every registered model the
state dict (parameters and buffers, e.g. P-MNER's region statistics) and the random states are the
same before and after it. P-MNER's template mode counts each region once per post."""

from __future__ import annotations

import copy
import dataclasses
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.models import LABELS, POSTS, text_batch, tiny_feature_spec, tiny_visual

from mner.trainer.models import available_models, get_model_class


def tiny_model(name, tiny_bert, **overrides):
    from transformers import AutoTokenizer

    cls = get_model_class(name)
    config = cls.Config()
    for field in ("num_heads", "heads"):
        if hasattr(config, field) and 32 % getattr(config, field):
            setattr(config, field, 2)
    config = dataclasses.replace(config, **{**getattr(cls, "TINY_OVERRIDES", {}), **overrides})
    paths = list(cls.required_features(config))
    rng = np.random.default_rng(0)
    spec = tiny_feature_spec(paths, rng) if paths else None
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = cls(config, labels=LABELS, text_encoder=str(tiny_bert), tokenizer=tokenizer, features=spec)
    batch, _ = text_batch(tokenizer)
    if paths:
        batch["visual"] = tiny_visual(paths, spec, rng)
    return model, batch


class OnePostSplit:
    """What check_longest_posts reads of a PostDataset, over post 0 of the tiny batch (an image with crops
    and objects); the collator hands back that post's batch row."""

    def __init__(self, batch: dict):
        words, tags = POSTS[0]
        kept = int(batch["word_mask"][0].sum())
        self.posts = [SimpleNamespace(tokens=words, tags=tags, source="test.txt:1")]
        self.aligned = [SimpleNamespace(input_ids=batch["input_ids"][0].tolist())]
        self.item = {"input_ids": batch["input_ids"][0].tolist(), "word_mask": [1] * kept}
        self.batch = batch

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return dict(self.item)

    def collate(self, items):
        row = {k: v[:1].clone() for k, v in self.batch.items() if k not in ("visual", "labels")}
        if items[0]["labels"] is not None:
            row["labels"] = self.batch["labels"][:1].clone()
        if "visual" in self.batch:
            row["visual"] = {k: copy.deepcopy(v[:1]) for k, v in self.batch["visual"].items()}
        return row


@pytest.mark.parametrize("name", available_models())
def test_preflight_check_changes_no_parameter_buffer_or_random_state(name, tiny_bert):
    from mner.trainer.core.preflight import check_longest_posts

    torch.manual_seed(0)
    model, batch = tiny_model(name, tiny_bert)
    model.train()
    split = OnePostSplit(batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    random.seed(1)
    np.random.seed(1)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    check_longest_posts(model, {"train": split, "dev": split, "test": split}, split.collate,
                        label_to_id={label: i for i, label in enumerate(LABELS)}, device=torch.device("cpu"),
                        autocast=lambda: torch.autocast("cpu", enabled=False))
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{name}: the pre-flight check changed {changed}"
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), states[2]) if isinstance(a, np.ndarray))
    assert model.training  # the mode it came in


def test_pmner_template_mode_counts_each_region_once_per_post(tiny_bert):
    """Each wrapped word used to re-enter its post's regions into the running statistics: a region of a
    12-word post weighed 12 times one of a 2-word post."""
    from helpers.pmner import OBJECTS, build, make_batch

    torch.manual_seed(0)
    model, tokenizer = build(tiny_bert, prompt_mode="template", dropout=0.0)
    batch = make_batch(tokenizer)
    model.train()(batch)
    assert float(model.region_norm.count) == sum(OBJECTS)  # real regions of the batch, once each
