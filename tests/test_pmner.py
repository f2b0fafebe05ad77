"""P-MNER: every Table 3 row end to end, the verbalizer, BIO repair and the no-visual fallback."""

from __future__ import annotations

import pytest
import torch
from helpers.pmner import LABELS, POSTS, SPEC, build, make_batch

from mner.trainer.models import get_model_class
from mner.trainer.models.pmner import RegionStandardizer, repair_bio_ids


def assert_valid_bio(tags: list[str]) -> None:
    previous = "O"
    for tag in tags:
        if tag.startswith("I-"):
            assert previous in (f"B-{tag[2:]}", f"I-{tag[2:]}"), tags
        previous = tag


def test_presets_are_table_3_rows_and_name_their_cache_groups():
    cls = get_model_class("pmner")
    assert {"full", "T+V", "T+V+TCFM", "T+FRR+TCFM"} <= set(cls.PRESETS)
    configs = {
        name: cls.Config(**{k: v for k, v in values.items() if k in cls.Config.__dataclass_fields__})
        for name, values in cls.PRESETS.items()
    }
    assert cls.required_features(configs["full"]) == ["encoders/resnet152/crop_pooled"]
    assert cls.required_features(configs["T+FRR+TCFM"]) == ["encoders/resnet152/crop_pooled"]
    assert cls.required_features(configs["T+V"]) == ["encoders/resnet152/grid"]
    assert (configs["T+V"].use_tcfm, configs["T+V+TCFM"].use_tcfm, configs["T+FRR+TCFM"].use_prompt) == (
        False,
        True,
        False,
    )
    assert cls.PRESETS["full lr 0.005"]["encoder_lr"] == 5e-3 and cls.PRESETS["full"]["batch_size"] == 8


@pytest.mark.parametrize("preset", ["full", "T+V", "T+V+TCFM", "T+FRR+TCFM"])
def test_every_row_trains_and_decodes_valid_bio(preset, tiny_bert):
    cls = get_model_class("pmner")
    switches = {k: v for k, v in cls.PRESETS[preset].items() if k in cls.Config.__dataclass_fields__}
    model, tokenizer = build(tiny_bert, **switches)
    batch = make_batch(tokenizer)

    loss = model(batch)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "visual_projection.weight" in reached and "text_attention.in_proj_weight" in reached
    if model.config.use_tcfm:
        assert {
            "visual_to_text.attention.in_proj_weight",
            "text_to_visual.attention.in_proj_weight",
            "refusion.attention.in_proj_weight",
            "text_to_visual.ffn.0.weight",
            "refusion.ffn_norm.weight",
        } <= reached
    if model.config.use_prompt:
        assert "verbalizer.piece_bias" in reached and any(n.startswith("mlm_head.") for n in reached)
    else:
        assert "emissions.weight" in reached

    model.eval()
    paths = model.decode(batch)
    assert [len(p) for p in paths] == [len(words) for words, _ in POSTS]
    for path in paths:
        assert_valid_bio([LABELS[i] for i in path])


def test_verbalizer_keeps_b_and_i_distinct_and_uses_vocabulary_words(tiny_bert):
    model, _ = build(tiny_bert)
    verbalizer = model.verbalizer
    assert verbalizer.label_words["O"] == ("none",)
    assert verbalizer.label_words["B-PER"] == ("begin", "person")
    assert verbalizer.label_words["I-MISC"] == ("inside", "other")
    assert not verbalizer.is_fallback.any() and verbalizer.tied
    rows = verbalizer.averaging  # (T, P)
    assert len({tuple(r.tolist()) for r in rows}) == len(LABELS)  # every tag scores a different mixture
    torch.testing.assert_close(rows.sum(1), torch.ones(len(LABELS)))


def test_unknown_label_word_falls_back_to_a_learned_embedding(tiny_bert):
    from transformers import AutoTokenizer

    cls = get_model_class("pmner")
    labels = [*LABELS, "B-QQXJ", "I-QQXJ"]  # "qqxj" splits into known letter pieces: averaged, no fallback
    model = cls(
        cls.Config(num_heads=2),
        labels=labels,
        text_encoder=str(tiny_bert),
        tokenizer=AutoTokenizer.from_pretrained(tiny_bert),
        features=SPEC,
    )
    assert not model.verbalizer.is_fallback.any()
    with pytest.warns(UserWarning, match="learned label embedding"):
        model = cls(
            cls.Config(num_heads=2),
            labels=[*LABELS, "B-ÆØ", "I-ÆØ"],
            text_encoder=str(tiny_bert),
            tokenizer=AutoTokenizer.from_pretrained(tiny_bert),
            features=SPEC,
        )
    assert model.verbalizer.is_fallback.tolist()[-2:] == [True, True]
    assert model.tag_scores(make_batch(AutoTokenizer.from_pretrained(tiny_bert))).shape[-1] == len(LABELS) + 2


def test_repair_bio_ids_turns_orphan_inside_tags_into_begin():
    ids = [LABELS.index(t) for t in ["I-PER", "I-PER", "O", "B-LOC", "I-ORG"]]
    assert [LABELS[i] for i in repair_bio_ids(ids, LABELS)] == ["B-PER", "I-PER", "O", "B-LOC", "B-ORG"]


@pytest.mark.parametrize("use_frr", [True, False])
def test_posts_without_visual_features_use_text_only(use_frr, tiny_bert):
    model, tokenizer = build(tiny_bert, use_frr=use_frr, use_prompt=False)
    model.eval()
    batch = make_batch(tokenizer)
    with torch.no_grad():
        before = model.fused_states(batch)
        changed = {**batch, "visual": {k: v.clone() for k, v in batch["visual"].items()}}
        path = "encoders/resnet152/crop_pooled" if use_frr else "encoders/resnet152/grid"
        changed["visual"][path][1:] = 7.0  # padding slots / zeros of the posts without visual features
        changed["visual"][path][0] += 1.0
        after = model.fused_states(changed)
    assert torch.isfinite(before).all()
    skip = 1 if use_frr else 2  # with the grid, post 1 (ok image) does have visual features
    torch.testing.assert_close(before[skip:], after[skip:])
    assert not torch.allclose(before[0], after[0])


def test_heads_fall_back_to_a_divisor_of_the_width(tiny_bert):
    with pytest.warns(UserWarning, match="using 8"):
        model, _ = build(tiny_bert, num_heads=12)  # tiny BERT width 32
    assert model.text_attention.num_heads == 8


def test_region_standardizer_uses_training_statistics_of_real_regions_only():
    torch.manual_seed(0)
    shared = torch.full((4,), 6.0e4)  # a large component common to every image hides the differences
    rows = shared + torch.randn(10, 4) * torch.tensor([1.0, 10.0, 100.0, 0.0])  # (10, 4), channel 3 constant
    regions = torch.zeros(5, 3, 4)  # (B, m, C): 10 real regions + padded slots full of junk
    mask = torch.zeros(5, 3, dtype=torch.bool)
    mask[:, :2] = True
    regions[mask] = rows
    regions[~mask] = -1.0e6
    norm = RegionStandardizer(4)
    norm.train()
    out = norm(regions[:3], mask[:3])  # two batches of the same epoch
    norm(regions[3:], mask[3:])
    torch.testing.assert_close(norm.mean.float(), rows.mean(0))
    torch.testing.assert_close(norm.var.float(), rows.var(0, unbiased=False), rtol=1e-4, atol=1e-4)
    assert (out[~mask[:3]] == 0).all()  # padded slots stay zero
    norm.eval()
    standardised = norm(regions, mask)[mask]  # (10, 4)
    torch.testing.assert_close(standardised[:, :3].std(0, unbiased=False), torch.ones(3), rtol=0.02, atol=0.02)
    assert standardised[:, 3].abs().max() == 0  # a channel that never varied carries nothing
    # training normalises with the running statistics, not the batch's (BatchNorm would zero a lone image)
    norm.train()
    alone = norm(regions[:1], mask[:1])[0, :2]  # (2, 4)
    norm.eval()
    torch.testing.assert_close(alone, norm(regions[:1], mask[:1])[0, :2])
    assert alone[:, :3].abs().min() > 0
