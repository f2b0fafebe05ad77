"""The papers' equations against direct computations, the paper training protocol, and the CRF's
packed gold (issue 9). Tiny random models only; each test checks a number that can be wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.models import LABELS, text_batch, tiny_feature_spec, tiny_visual

from mner.trainer.core.config import resolve_configs
from mner.trainer.models import get_model_class
from mner.trainer.models.layers import BIOConstrainedCRF, crf_loss_and_decode


def tokenizer_of(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


# -- 1. paper protocol ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vcrmner", "promptmner", "pmner"])
def test_paper_presets_train_the_whole_schedule(name):
    """The papers report the best dev checkpoint of the full schedule: no early stop in any row."""
    cls = get_model_class(name)
    for preset in cls.PRESETS:
        _, train_config = resolve_configs(cls, preset=preset)
        assert train_config.patience == 0, f"{name}/{preset} stops early (patience {train_config.patience})"
    # early stopping stays an explicit option
    _, train_config = resolve_configs(cls, preset=next(iter(cls.PRESETS)), flags={"patience": 3})
    assert train_config.patience == 3


# -- VCRMNER eq. 4 / 6 ------------------------------------------------------------------------------


def vcrmner_model(tiny_bert, **overrides):
    cls = get_model_class("vcrmner")
    config = cls.Config(num_heads=2, num_blocks=1, dropout=0.0, **overrides)
    paths = cls.required_features(config)
    spec = tiny_feature_spec(paths, np.random.default_rng(0))
    torch.manual_seed(0)
    model = cls(config, labels=LABELS, text_encoder=str(tiny_bert), features=spec).eval()
    return model, paths, spec


@pytest.mark.parametrize("evaluation", [True, False])
def test_vcrmner_eq6_weights_the_normalised_crop_only_with_visual_evaluation(evaluation, tiny_bert):
    model, paths, spec = vcrmner_model(tiny_bert, use_visual_evaluation=evaluation)
    visual = tiny_visual(paths, spec, np.random.default_rng(1))
    crops = visual["encoders/clip/crop_embed"][:, :4]  # (B, K, D)
    expected = crops / crops.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # eq. 4: v_i
    if evaluation:
        expected = expected * visual["prompts/vcrmner/crop_weights"][:, :4].max(dim=-1).values[..., None]  # eq. 6
    with torch.no_grad():
        cues, mask = model.visual_cues(visual)
        torch.testing.assert_close(cues, model.cue_proj(expected))
        # a crop's raw CLIP norm does not change its cue (only its direction and relevance do)
        scaled = {**visual, "encoders/clip/crop_embed": visual["encoders/clip/crop_embed"] * 7.5}
        torch.testing.assert_close(model.visual_cues(scaled)[0], cues)
        if evaluation:  # w/o ev never reads the weights
            changed = {**visual, "prompts/vcrmner/crop_weights": visual["prompts/vcrmner/crop_weights"].flip(-1) ** 2}
            assert not torch.allclose(model.visual_cues(changed)[0][mask], cues[mask])
    assert ("prompts/vcrmner/crop_weights" in paths) == evaluation


# -- P-MNER eq. 8, the q / C blocks and the verbalizer ----------------------------------------------


def test_pmner_h_is_t_plus_q_plus_c_with_q_and_c_read_from_v_and_p(tiny_bert):
    """eq. 8 with the q and C blocks replaced by recording stand-ins that return hand-set values:
    H = T + q + C, q = block(T over V), C = block(T over P)."""
    from helpers.pmner import build, make_batch

    model, tokenizer = build(tiny_bert, dropout=0.0, use_prompt=False)
    model.eval()
    batch = make_batch(tokenizer)
    seen, calls = {}, {}
    for name in ("text_norm", "visual_norm", "visual_to_text"):
        getattr(model, name).register_forward_hook(lambda module, args, out, name=name: seen.__setitem__(name, out))

    class StandIn(torch.nn.Module):
        def __init__(self, name, value):
            super().__init__()
            self.name, self.value = name, value

        def forward(self, queries, keys, key_pad, keep=None):
            calls[self.name] = (queries, keys)
            return torch.full_like(queries, self.value)

    model.text_to_visual, model.refusion = StandIn("q", 0.25), StandIn("C", -2.0)
    with torch.no_grad():
        fused = model.fused_states(batch)
    text = seen["text_norm"]
    torch.testing.assert_close(fused, text + 0.25 - 2.0)  # eq. 8
    assert calls["q"][0] is text and calls["q"][1] is seen["visual_norm"]  # q: T over V
    assert calls["C"][0] is text and calls["C"][1] is seen["visual_to_text"]  # C: T over P


def test_pmner_fusion_block_eq_4_7_by_hand():
    """One head, hand-set projections: LN(x + softmax(x W_q (k W_k)^T / sqrt(d)) k W_v W_o), then
    LN(y + FFN(y)); ``keep`` = 0 drops the attention term."""
    from helpers.fusion import layer_norm, set_single_head, single_head_attention

    from mner.trainer.models.pmner import FusionBlock

    torch.manual_seed(0)
    block = FusionBlock(4, num_heads=1, ffn_mult=2, dropout=0.0).eval()
    generator = torch.Generator().manual_seed(2)
    w_q, w_k, w_v, w_o = set_single_head(block.attention, generator)
    queries, keys = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 2, 4, generator=generator)
    pad = torch.tensor([[False, True], [False, False]])
    keep = torch.tensor([1.0, 0.0])[:, None, None]
    with torch.no_grad():
        got = block(queries, keys, pad, keep)
        for post in range(2):
            attended = single_head_attention(queries[post], keys[post], keys[post], ~pad[post], w_q, w_k, w_v, w_o)
            first = layer_norm(queries[post] + attended * keep[post])
            torch.testing.assert_close(got[post], layer_norm(first + block.ffn(first)), rtol=1e-5, atol=1e-5)


def test_pmner_verbalizer_scores_are_the_full_mlm_logits_at_the_label_words(tiny_bert):
    from helpers.pmner import build

    model, tokenizer = build(tiny_bert)
    verbalizer = model.verbalizer
    with torch.no_grad():
        verbalizer.piece_bias.normal_()
        transformed = torch.randn(2, 3, model.text_encoder.config.hidden_size)  # (B, W, H) MLM head output
        scores = verbalizer(transformed, model.text_encoder)  # (B, W, T)
        vocabulary = model.text_encoder.get_input_embeddings().weight  # (V, H), tied decoder
        bias = torch.zeros(vocabulary.size(0))
        bias[verbalizer.piece_ids] = verbalizer.piece_bias
        logits = transformed @ vocabulary.T + bias  # (B, W, V) the whole MLM distribution's logits
        for t, tag in enumerate(LABELS):
            words = verbalizer.label_words[tag]
            word_logits = [logits[..., tokenizer(w, add_special_tokens=False)["input_ids"]].mean(-1) for w in words]
            torch.testing.assert_close(scores[..., t], torch.stack(word_logits).mean(0))


def test_pmner_template_mode_reads_the_mask_of_each_wrapped_word(tiny_bert):
    from helpers.pmner import POSTS, build, make_batch

    model, tokenizer = build(tiny_bert, dropout=0.0, prompt_mode="template", template_chunk=4)
    model.eval()
    batch = make_batch(tokenizer)
    wrapped = model.template.wrap(batch)
    assert len(wrapped.posts) == sum(len(words) for words, _ in POSTS)
    first = tokenizer.decode(wrapped.input_ids[0][wrapped.attention_mask[0].bool()])
    assert first == "[CLS] john smith visit paris, the word of john is [MASK]. [SEP]"
    assert tokenizer.decode(wrapped.input_ids[1][wrapped.attention_mask[1].bool()]).endswith(
        ", the word of smith is [MASK]. [SEP]")
    assert (wrapped.input_ids[torch.arange(len(wrapped.posts)), wrapped.mask_at] == tokenizer.mask_token_id).all()
    with torch.no_grad():
        scores = model.tag_scores(batch)  # (B, W, T)
        regions, region_mask = model.visual_regions(batch["visual"])
        i = 5  # one wrapped word, scored alone
        post, word = int(wrapped.posts[i]), int(wrapped.words[i])
        states = model.fuse(wrapped.input_ids[i : i + 1], wrapped.attention_mask[i : i + 1],
                            regions[post : post + 1], region_mask[post : post + 1])
        direct = model.verbalizer(model.mlm_head(states[:, int(wrapped.mask_at[i])]), model.text_encoder)
    torch.testing.assert_close(scores[post, word], direct[0])
    # the template's pieces fit the stated length: entity pieces are cut first
    short = type(model.template)(tokenizer, template_max_length=12, encoded_max_length=16)
    assert short.entity_room == 12 - len(short.prefix) - len(short.suffix) - 1 - len(short.end)
    cut = short.wrap(batch)
    assert cut.attention_mask.sum(1).max() <= 16  # the sentence is cut to fit the encoded length
    assert (cut.input_ids[torch.arange(len(cut.posts)), cut.mask_at] == tokenizer.mask_token_id).all()


def test_pmner_ablation_rows_differ_only_in_prompt_learning():
    presets = get_model_class("pmner").PRESETS
    full, without = presets["full"], presets["T+FRR+TCFM"]
    assert {k for k in {*full, *without} if full.get(k) != without.get(k)} == {"use_prompt"}
    assert full["decoder"] == "argmax" and full["prompt_mode"] == "template"
    assert presets["full lr 0.005"]["encoder_lr"] == 5e-3 and full["encoder_lr"] < 1e-3


# -- PromptMNER eq. 1, the weighted clue tokens and their position / segment ids --------------------


def promptmner_model(tiny_bert, **overrides):
    from helpers.promptmner import feature_spec

    cls = get_model_class("promptmner")
    config = cls.Config(num_continuous_prompts=4, dropout=0.0, **overrides)
    spec = feature_spec(config)
    torch.manual_seed(0)
    tokenizer = tokenizer_of(tiny_bert)
    return cls(config, labels=LABELS, text_encoder=str(tiny_bert), tokenizer=tokenizer, features=spec).eval(), spec


def test_promptmner_continuous_eq1_and_weighted_clue_tokens(tiny_bert):
    from helpers.promptmner import make_batch

    model, spec = promptmner_model(tiny_bert)
    visual = make_batch(tokenizer_of(tiny_bert), spec)["visual"]
    image = visual["encoders/clip/image_embed"]  # (B, D)
    prompts = model.continuous_prompts.detach()  # (Q, D)
    cosine = torch.stack([torch.stack([F.cosine_similarity(v, s, dim=0) for s in prompts]) for v in image])
    relevance = torch.softmax(100.0 * cosine, dim=-1) * visual["images/ok"][:, None]  # (B, Q) eq. 1
    expected = relevance[:, :, None] * prompts[None]  # w_hat_i = p(P_i | I) s_i
    with torch.no_grad():
        torch.testing.assert_close(model.visual_clues(visual), expected)


def test_promptmner_clue_positions_segments_and_masking(tiny_bert):
    from helpers.promptmner import make_batch

    model, spec = promptmner_model(tiny_bert)
    batch = make_batch(tokenizer_of(tiny_bert), spec)
    captured = {}
    embeddings = model.text_encoder["embeddings"]
    original = embeddings.forward

    def spy(*args, **kwargs):
        captured.update(kwargs)
        return original(*args, **kwargs)

    embeddings.forward = spy
    with torch.no_grad():
        clues = model.visual_clues(batch["visual"])
        _hidden, attention_mask, is_visual = model.embed(batch, clues)
    text_columns, num_clues = batch["input_ids"].size(1), clues.size(1)
    lengths = batch["attention_mask"].sum(1)
    for b in range(len(lengths)):  # text: 0..L-1; [clues..., SEP]: right after the post's own last piece
        positions = captured["position_ids"][b]
        assert positions[:text_columns].tolist() == list(range(text_columns))
        assert positions[text_columns:].tolist() == list(range(int(lengths[b]), int(lengths[b]) + num_clues + 1))
    assert (captured["token_type_ids"][:, :text_columns] == 0).all()
    assert (captured["token_type_ids"][:, text_columns:] == 1).all()  # segment B
    assert is_visual[:, text_columns:].all() and not is_visual[:, :text_columns].any()
    # the clue tokens of the post without a usable image (post 2) are no keys at all
    ok = batch["visual"]["images/ok"]
    assert (attention_mask[:, text_columns:] == ok[:, None]).all()
    with torch.no_grad():
        states = model.word_states(batch)
        alone = model.word_states({**{k: v[2:] for k, v in batch.items() if k != "visual"},
                                   "visual": {k: v[2:] for k, v in batch["visual"].items()}})
    torch.testing.assert_close(states[2:], alone)  # batched with image posts = computed with no clue at all


def test_promptmner_mas_blocks_equal_the_per_pair_selection():
    """The block-wise MAS equals choosing, for every (query, key), the projection of its modality pair."""
    from helpers.promptmner import tiny_layer

    layer = tiny_layer(use_mas=True)
    with torch.no_grad():
        for query in layer.queries.values():
            query.weight.add_(torch.randn_like(query.weight))
        x = torch.randn(2, 7, 16)
        mask = torch.tensor([[True] * 7, [True, True, False, True, True, True, True]])
        is_visual = torch.tensor([[False] * 4 + [True] * 3] * 2)
        heads = layer.split_heads
        score = {pair: heads(layer.queries[pair](x)) @ heads(layer.key(x)).transpose(-1, -2) / 8 ** 0.5
                 for pair in layer.PAIRS}
        key_visual, query_visual = is_visual[:, None, None, :], is_visual[:, None, :, None]
        scores = torch.where(query_visual, torch.where(key_visual, score["v2v"], score["v2w"]),
                             torch.where(key_visual, score["w2v"], score["w2w"]))
        weights = scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)
        context = (weights @ heads(layer.value(x))).transpose(1, 2).flatten(2)
        attended = layer.attention_output(context, x)
        expected = layer.output(layer.intermediate(attended), attended)
        torch.testing.assert_close(layer(x, mask, is_visual), expected)


# -- 9. the CRF's packed gold ------------------------------------------------------------------------


def test_zero_piece_begin_word_leaves_no_orphan_in_the_crf_gold():
    """[B-PER (zero pieces), I-PER, O]: packing drops the B- word; the I- must be scored as B-PER."""
    torch.manual_seed(0)
    crf = BIOConstrainedCRF(LABELS)
    emissions = torch.randn(1, 3, len(LABELS))
    labels = torch.tensor([[LABELS.index("B-PER"), LABELS.index("I-PER"), 0]])
    word_mask = torch.tensor([[False, True, True]])
    loss, _ = crf_loss_and_decode(crf, emissions, word_mask, labels)
    repaired = torch.tensor([[LABELS.index("B-PER"), 0]])
    expected = -crf(emissions[:, 1:], repaired, torch.ones(1, 2, dtype=torch.bool), reduction="sum")
    torch.testing.assert_close(loss, expected)
    assert loss < 100  # no -10000 transition penalty inside the logged loss
    # valid gold is left alone, and an I- after a different type is repaired too
    assert crf.repair_gold(torch.tensor([[1, 2, 0, 3, 4]]), torch.ones(1, 5)).tolist() == [[1, 2, 0, 3, 4]]
    assert crf.repair_gold(torch.tensor([[1, 4, 4, 2]]), torch.ones(1, 4)).tolist() == [[1, 3, 4, 1]]
    assert crf.repair_gold(torch.tensor([[2, 0]]), torch.ones(1, 2)).tolist() == [[1, 0]]


def test_every_model_trains_on_a_zero_piece_begin_word(tiny_bert):
    """End to end through the aligner: the fixture's post 3 has a zero-piece word; make it a B-."""
    from helpers.models import POSTS

    tokenizer = tokenizer_of(tiny_bert)
    posts = list(POSTS)
    posts[3] = (posts[3][0], ["O", "O", "B-MISC", "I-MISC"] + ["O"] * 28)  # '\u200b' (no piece) is the B-
    batch, _ = text_batch(tokenizer, posts=posts)
    assert not batch["word_mask"][3, 2] and batch["word_mask"][3, 3]
    cls = get_model_class("bert_crf")
    torch.manual_seed(0)
    model = cls(cls.Config(), labels=LABELS, text_encoder=str(tiny_bert))
    assert float(model(batch)["loss"]) < 1000


# -- 6. stage-1 settings declared by the models ------------------------------------------------------


def test_models_declare_the_stage1_settings_of_their_papers():
    from mner.trainer.models.stage1 import extract_command, stage1_mismatches

    def provenance(detector="maskrcnn", score=0.0, top_k=4, clip="open_clip/ViT-B-32"):
        groups = {
            "objects": {"detector": detector, "thresholds": {"score_threshold": score, "top_k": top_k}},
            "encoders/resnet152": {"model": "torchvision/resnet152"},
            "encoders/clip": {"model": clip},
            "prompts/vcrmner": {"model": clip},
            "prompts/promptmner_kb": {"model": clip},
        }
        return groups.get

    def settings(name, **config):
        cls = get_model_class(name)
        return cls.stage1_settings(cls.Config(**config))

    pmner = settings("pmner")
    lines = stage1_mismatches(pmner, provenance())
    assert len(lines) == 3 and "fasterrcnn" in lines[0] and "0.95" in lines[1] and ">= 5" in lines[2]
    assert stage1_mismatches(pmner, provenance("fasterrcnn", 0.95, 10)) == []
    assert stage1_mismatches(settings("pmner", use_frr=False), provenance()) == []  # grid rows: no detector
    assert len(stage1_mismatches(settings("vcrmner"), provenance())) == 2  # crop and prompt CLIP
    assert stage1_mismatches(settings("vcrmner"), provenance(clip="open_clip/ViT-B-16")) == []
    assert stage1_mismatches(settings("vcrmner", use_visual_evaluation=False),
                             provenance(clip="open_clip/ViT-B-16")) == []
    assert stage1_mismatches(settings("promptmner", prompts="kb"), provenance(clip="open_clip/RN50")) == []
    assert len(stage1_mismatches(settings("promptmner"), provenance())) == 1
    assert settings("bert_crf") == []
    # the hint's command carries the paper's settings
    base = "mner-features extract --data d --images i --out c.h5 --detector maskrcnn --encoder resnet152"
    assert extract_command(base, pmner) == (
        "mner-features extract --data d --images i --out c.h5 --detector fasterrcnn --encoder resnet152 "
        "--score-threshold 0.95 --top-k 5")
