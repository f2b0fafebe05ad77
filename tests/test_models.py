"""Every registered model x every preset (ablation rows included) on a tiny text encoder and tiny
visual tensors: finite loss, gradients reach the fusion layers, Viterbi output is valid BIO.

Models join automatically through the registry; the cache layout they may ask for is described
once in ``TINY_SCHEMA`` (per-row shapes kept tiny; models size themselves from the FeatureSpec).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers.models import LABELS, POSTS, text_batch, tiny_feature_spec, tiny_visual

from mner.trainer.models import available_models, get_model_class


def assert_valid_bio(tags: list[str]) -> None:
    previous = "O"
    for tag in tags:
        if tag.startswith("I-"):
            assert previous in (f"B-{tag[2:]}", f"I-{tag[2:]}"), f"invalid BIO: {tags}"
        previous = tag


def model_cases() -> list:
    cases = []
    for name in available_models():
        presets = list(getattr(get_model_class(name), "PRESETS", {}) or {}) or [None]
        cases += [pytest.param(name, preset, id=f"{name}-{preset}") for preset in [None, *presets]]
    return cases


@pytest.mark.parametrize("name,preset", model_cases())
def test_model_forward_backward_decode(name, preset, tiny_bert):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cls = get_model_class(name)
    values = dict(cls.PRESETS[preset]) if preset else {}
    model_fields = {f.name for f in dataclasses.fields(cls.Config)}
    config = cls.Config(**{k: v for k, v in values.items() if k in model_fields})
    for field in ("num_heads", "heads"):  # keep the paper's 8 heads only where the tiny width allows
        if hasattr(config, field) and 32 % getattr(config, field):
            setattr(config, field, 2)
    for field, value in getattr(cls, "TINY_OVERRIDES", {}).items():  # the model's own tiny test variant
        setattr(config, field, value)
    paths = list(cls.required_features(config))
    spec = tiny_feature_spec(paths, rng) if paths else None
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = cls(config, labels=LABELS, text_encoder=str(tiny_bert), tokenizer=tokenizer, features=spec)

    batch, kept_words = text_batch(tokenizer)
    assert kept_words[3] < len(POSTS[3][0]), "the fixture must truncate post 3"
    if paths:
        batch["visual"] = tiny_visual(paths, spec, rng)

    model.train()
    loss = model(batch)["loss"]
    assert torch.isfinite(loss), f"{name}/{preset}: loss {loss}"
    loss.backward()
    fusion = {
        n: p for n, p in model.named_parameters() if not n.startswith(("text_encoder.", "crf.")) and p.requires_grad
    }
    assert fusion, f"{name} has no head/fusion parameters"
    no_grad = [
        n for n, p in fusion.items()
        if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0
    ]
    assert not no_grad, f"{name}/{preset}: no (finite, non-zero) gradient reaches {no_grad}"

    model.eval()
    predictions = model.decode(batch)
    assert [len(p) for p in predictions] == kept_words
    for prediction in predictions:
        assert all(0 <= i < len(LABELS) for i in prediction)
        assert_valid_bio([LABELS[i] for i in prediction])


def test_registry_has_the_paper_models():
    assert {"vcrmner"} <= set(available_models())


def test_vcrmner_ablation_switches_change_what_is_read_and_built(tiny_bert):
    cls = get_model_class("vcrmner")
    paper = cls.Config(**{k: v for k, v in cls.PRESETS["paper"].items() if k in cls.Config.__dataclass_fields__})
    assert "prompts/vcrmner/crop_weights" in cls.required_features(paper)
    words = dataclasses.replace(paper, prompt_set="vcrmner_words")
    assert "prompts/vcrmner_words/crop_weights" in cls.required_features(words)
    no_ev = dataclasses.replace(paper, use_visual_evaluation=False)
    assert not any(p.endswith("crop_weights") for p in cls.required_features(no_ev))
    assert set(cls.PRESETS) == {"paper", "w/o inter-former", "w/o ev", "w/o prompt"}
    assert cls.PRESETS["paper"]["num_blocks"] == 3 and cls.PRESETS["paper"]["max_length"] == 70


def test_vcrmner_zero_object_posts_are_not_nan_and_see_no_cue(tiny_bert):
    """A post with no objects attends only to the learned null cue: its states ignore the crops."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cls = get_model_class("vcrmner")
    config = cls.Config(num_heads=2, num_blocks=2, dropout=0.0)
    paths = cls.required_features(config)
    spec = tiny_feature_spec(paths, rng)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = cls(config, labels=LABELS, text_encoder=str(tiny_bert), tokenizer=tokenizer, features=spec).eval()
    batch, _ = text_batch(tokenizer)
    batch["visual"] = tiny_visual(paths, spec, rng)
    with torch.no_grad():
        states = model.fused_word_states(batch)
        batch["visual"]["encoders/clip/crop_embed"][1:3] = 5.0  # padding slots of the object-less posts
        changed = model.fused_word_states(batch)
    assert torch.isfinite(states).all()
    torch.testing.assert_close(states[1:3], changed[1:3])
    assert not torch.allclose(states[0], model.fused_word_states({**batch, "visual": tiny_visual(paths, spec, rng)})[0])


def write_tiny_cache(path, *, object_counts: list[int], status: list[str], clip_width: int = 16) -> None:
    from mner.pipeline.cache import CacheWriter, make_provenance

    ids = [f"img{i}" for i in range(len(object_counts))]
    offsets = np.concatenate([[0], np.cumsum(object_counts)]).astype(np.int64)
    num_objects = int(offsets[-1])
    object_values = np.arange(num_objects, dtype=np.float32)  # object i's features all equal i
    provenance = make_provenance(
        "test", model="tiny", pretrained="random", preprocessing={}, thresholds={}, image_ids=ids
    )
    with CacheWriter(path, overwrite=True, partial=True) as writer:
        writer.write_images(ids, status)
        writer.write_group(
            "objects", {"offsets": (offsets, "offsets"), "scores": (1 - object_values / 100, "object")}, provenance
        )
        writer.write_group("encoders/clip", {
            "crop_embed": (np.repeat(object_values[:, None], clip_width, 1), "object"),
            "image_embed": (np.arange(len(ids), dtype=np.float32)[:, None].repeat(clip_width, 1) + 1, "image"),
        }, provenance)
        writer.write_group("prompts/vcrmner", {
            "crop_weights": (np.full((num_objects, 4), 0.25, np.float32), "object"),
            "centroids": (np.ones((4, clip_width), np.float32), "global"),
        }, provenance)


def test_visual_batcher_pads_masks_and_zeroes_unusable_images(tmp_path):
    import pickle

    from mner.pipeline.cache import FeatureCache
    from mner.trainer.inputs.visual import VisualBatcher

    path = tmp_path / "tiny.h5"
    write_tiny_cache(path, object_counts=[3, 0, 2, 6, 1], status=["ok", "ok", "missing", "ok", "placeholder"])
    paths = ["objects/offsets", "encoders/clip/crop_embed", "encoders/clip/image_embed",
             "prompts/vcrmner/crop_weights", "prompts/vcrmner/centroids"]
    batcher = pickle.loads(pickle.dumps(VisualBatcher(FeatureCache(path), paths, max_objects=4)))  # as in workers
    visual = batcher([0, 1, None, 2, 3, 4])

    assert set(visual) == {"images/ok", "objects/mask", "encoders/clip/crop_embed", "encoders/clip/image_embed",
                           "prompts/vcrmner/crop_weights"}
    assert visual["images/ok"].tolist() == [True, True, False, False, True, False]
    assert visual["objects/mask"].sum(1).tolist() == [3, 0, 0, 0, 4, 0]  # m = 4 keeps the first 4 of 6
    crops = visual["encoders/clip/crop_embed"]
    assert crops.shape == (6, 4, 16) and crops.dtype == torch.float32
    assert crops[0, :3, 0].tolist() == [0, 1, 2] and crops[4, :, 0].tolist() == [5, 6, 7, 8]
    assert (crops[~visual["objects/mask"]] == 0).all()
    assert visual["encoders/clip/image_embed"][:, 0].tolist() == [1, 2, 0, 0, 4, 0]

    none_have_objects = batcher([1, None, 4])
    assert none_have_objects["objects/mask"].shape == (3, 1) and not none_have_objects["objects/mask"].any()
    assert none_have_objects["encoders/clip/crop_embed"].shape == (3, 1, 16)


def test_visual_batcher_feeds_placeholders_only_when_asked(tmp_path):
    from mner.pipeline.cache import FeatureCache
    from mner.trainer.inputs.visual import VisualBatcher

    path = tmp_path / "tiny.h5"
    write_tiny_cache(path, object_counts=[1, 2, 1], status=["ok", "placeholder", "missing"])
    paths = ["objects/offsets", "encoders/clip/crop_embed"]
    masked = VisualBatcher(FeatureCache(path), paths)([0, 1, 2])
    used = VisualBatcher(FeatureCache(path), paths, use_placeholders=True)([0, 1, 2])
    assert masked["images/ok"].tolist() == [True, False, False]
    assert used["images/ok"].tolist() == [True, True, False]  # missing images stay masked either way
    assert used["objects/mask"].sum(1).tolist() == [1, 2, 0]
    assert used["encoders/clip/crop_embed"][1].abs().sum() > 0
    assert masked["encoders/clip/crop_embed"][1].abs().sum() == 0
