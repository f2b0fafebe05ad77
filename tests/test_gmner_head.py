"""The grounding head on every registered model x preset: the tagger's word states reach it (hook on
the layer that scores words), the loss is finite, gradients reach the head and the tagger, decoding
returns one choice (None or a candidate) per predicted entity; without ``batch["gmner"]`` the wrapped
model decodes exactly like the bare model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers.models import LABELS, POSTS, text_batch, tiny_feature_spec, tiny_visual

from mner.trainer.gmner.config import GroundingConfig
from mner.trainer.gmner.head import GroundedModel, grounding_loss
from mner.trainer.models import available_models, get_model_class

K, D = 3, 16  # candidates per post (post 1: none), feature width


def gmner_part(batch_size: int, style: str) -> dict:
    rng = np.random.default_rng(1)
    counts = [3, 0, 2, 1]
    mask = torch.arange(K)[None, :] < torch.tensor(counts)[:, None]  # (B, K)
    spans = torch.tensor([[[0, 1], [3, 3]], [[1, 1], [0, 0]], [[1, 1], [0, 0]], [[1, 1], [3, 3]]])  # (B, 2, 2)
    span_mask = torch.tensor([[True, True], [True, False], [True, False], [True, True]])
    targets = torch.zeros(batch_size, 2, 1 + K)
    targets[0, 0, 2] = 1.0  # post 0: PER is candidate 2 (index 1 + 1)
    targets[0, 1, 0] = 1.0  # LOC has no box
    targets[1, 0, 0] = targets[2, 0, 0] = targets[3, :, 0] = 1.0
    if style == "soft":
        targets[0, 0, 1:3] = torch.tensor([0.4, 0.6])
    return {"boxes": torch.from_numpy(rng.uniform(0, 50, (batch_size, K, 4)).astype(np.float32)),
            "scores": torch.rand(batch_size, K) * mask, "features": torch.randn(batch_size, K, D) * mask[..., None],
            "geometry": torch.rand(batch_size, K, 7) * mask[..., None], "mask": mask, "spans": spans,
            "span_mask": span_mask, "targets": targets}


def build(name, preset, tiny_bert):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cls = get_model_class(name)
    values = dict(cls.PRESETS[preset]) if preset else {}
    config = cls.Config(**{k: v for k, v in values.items() if k in {f.name for f in dataclasses.fields(cls.Config)}})
    for field in ("num_heads", "heads"):
        if hasattr(config, field) and 32 % getattr(config, field):
            setattr(config, field, 2)
    for field, value in getattr(cls, "TINY_OVERRIDES", {}).items():
        setattr(config, field, value)
    paths = list(cls.required_features(config))
    spec = tiny_feature_spec(paths, rng) if paths else None
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = cls(config, labels=LABELS, text_encoder=str(tiny_bert), tokenizer=tokenizer, features=spec)
    batch, kept = text_batch(tokenizer)
    if paths:
        batch["visual"] = tiny_visual(paths, spec, rng)
    return model, batch, kept


def head_cases() -> list:
    """What grids/gmner.toml runs: each model's "paper" preset where it has one (else its defaults; the
    suite stays fast: tests/test_models.py runs every preset bare), and PMNER's template mode, which has
    no per-word states and must say so."""
    cases = []
    for name in available_models():
        preset = "paper" if name != "pmner" and "paper" in (get_model_class(name).PRESETS or {}) else None
        cases.append(pytest.param(name, preset, id=f"{name}-{preset or 'default'}"))
    template = next(p for p, v in get_model_class("pmner").PRESETS.items() if v.get("prompt_mode") == "template")
    return [*cases, pytest.param("pmner", template, id="pmner-template")]


@pytest.mark.parametrize("name,preset", head_cases())
def test_every_model_carries_the_grounding_head(name, preset, tiny_bert):
    base, batch, kept = build(name, preset, tiny_bert)
    base.eval()
    with torch.no_grad():
        bare = base.decode(batch)
    try:
        model = GroundedModel(base, grounding_config=GroundingConfig(gmner_dropout=0.0), feature_width=D,
                              labels=LABELS)
        model.eval()
        with torch.no_grad():
            assert model.decode(batch) == bare  # no gmner part: the tagger alone
        batch["gmner"] = gmner_part(len(POSTS), "index")
        model.train()
        out = model(batch)
    except ValueError as err:  # PMNER's template mode tags each word from its own prompt: no word states
        assert "per-word states" in str(err) and name == "pmner", err
        return
    assert torch.isfinite(out["loss"]) and out["grounding_loss"] > 0
    out["loss"].backward()
    head = [n for n, p in model.grounding.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not head, f"no gradient reaches {head}"
    tagger = [p for n, p in model.base.named_parameters() if p.requires_grad and p.grad is not None]
    assert tagger, "the grounding loss must also train the tagger's states"
    model.eval()
    paths, grounded = model.decode_grounded(batch)
    assert [len(p) for p in paths] == kept
    for row, entities in enumerate(grounded):
        for _, _, _, choice in entities:
            assert -1 <= choice < int(batch["gmner"]["mask"][row].sum())
    groups = model.parameter_groups(type("T", (), {"encoder_lr": 1e-5, "head_lr": 1e-3, "crf_lr": 1e-2,
                                                   "weight_decay": 0.01})())
    from mner.trainer.models import check_parameter_groups

    check_parameter_groups(model, groups)
    assert any(g["name"].startswith("grounding") for g in groups)


def test_loss_styles_match_a_direct_computation():
    logits = torch.tensor([[[0.0, 1.0, 2.0, float("-inf")]]])  # None, c1, c2, padding
    probs = torch.tensor([1.0, np.e, np.e ** 2]) / (1 + np.e + np.e ** 2)
    index = torch.tensor([[[0.0, 1.0, 1.0, 0.0]]])
    expected = -torch.log(probs[1] + probs[2])
    torch.testing.assert_close(grounding_loss(logits, index, torch.tensor([[True]]), "index"), expected)
    soft = torch.tensor([[[0.0, 0.25, 0.75, 0.0]]])
    expected = -(0.25 * torch.log(probs[1]) + 0.75 * torch.log(probs[2]))
    torch.testing.assert_close(grounding_loss(logits, soft, torch.tensor([[True]]), "soft"), expected)
    assert grounding_loss(logits, soft, torch.tensor([[False]]), "soft") == 0
