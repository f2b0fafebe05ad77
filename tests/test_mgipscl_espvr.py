"""MGIPS-CL and ESPVR specifics: eq. 16-17 against a direct computation, VRP region choice on a
hand-worked 12x12 grid (ties, edges), the caption second segment, zero crops / missing images /
empty captions, and the CLIP tower's own parameter group."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.fusion import build

from mner.trainer.models import get_model_class

# ------------------------------------------------------------------------------ MGIPS-CL: eq. 16-17


def direct_losses(sim: list[list[float]], k: int, tau: float) -> tuple[float, float]:
    """eq. 16 and eq. 17 written out term by term."""
    n = len(sim)
    ips = cl = 0.0
    for i in range(n):
        denominator = sum(math.exp(sim[i][j] / tau) for j in range(n))
        top = sorted(range(n), key=lambda j: sim[i][j], reverse=True)[:k]  # V_K of eq. 15
        ips += -math.log(sum(math.exp(sim[i][j] / tau) for j in top) / denominator)
        cl += -math.log(math.exp(sim[i][i] / tau) / denominator)
    return ips / n, cl / n


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_ips_cl_and_standard_cl_match_eq_16_17(k):
    from mner.trainer.models.mgipscl import ips_contrastive_loss, standard_contrastive_loss

    sim = [[0.9, 0.1, -0.3, 0.4, 0.2], [0.2, 0.5, 0.7, -0.1, 0.0], [-0.4, 0.3, 0.1, 0.6, 0.8],
           [0.0, 0.0, 0.2, 0.3, -0.2], [0.5, -0.5, 0.25, 0.1, 0.05]]
    expected_ips, expected_cl = direct_losses(sim, k, tau=0.1)
    matrix = torch.tensor(sim, dtype=torch.float64)
    assert ips_contrastive_loss(matrix, k, 0.1).item() == pytest.approx(expected_ips, rel=1e-9)
    assert standard_contrastive_loss(matrix, 0.1).item() == pytest.approx(expected_cl, rel=1e-9)
    if k == 1:  # K = 1 picks each text's best image, which is not its own in rows 1, 2 and 4
        assert expected_ips < expected_cl


def test_mgipscl_contrastive_losses_on_hand_set_summaries(tiny_bert):
    """eq. 14-17 through the model's own projections f, g (set to the identity) on hand-set text and
    image summaries of 5 posts, 4 with an image: a 4 x 4 similarity matrix, so K = 3 leaves one
    negative per row and IPS-CL is not 0. The expected values are eq. 16-17 written out above."""
    torch.manual_seed(0)
    model, _, _ = build("mgipscl", tiny_bert, np.random.default_rng(0), contrastive_dim=32, top_k=3)
    with torch.no_grad():
        for projection in (model.image_projection, model.text_projection):
            projection.weight.copy_(torch.eye(32))
            projection.bias.zero_()
    generator = torch.Generator().manual_seed(5)
    texts, images = torch.randn(5, 32, generator=generator), torch.randn(5, 32, generator=generator)
    has_image = torch.tensor([True, True, False, True, True])  # post 2 has no image: it takes no part
    losses = model.contrastive_losses({"text_summary": texts, "image_summary": images, "has_image": has_image})
    kept = [0, 1, 3, 4]
    sim = [[float(F.cosine_similarity(texts[i], images[j], dim=0)) for j in kept] for i in kept]
    expected_ips, expected_cl = direct_losses(sim, k=3, tau=model.config.temperature)
    assert losses["ips_cl"].item() == pytest.approx(expected_ips, rel=1e-5) and expected_ips > 1e-3
    assert losses["cl"].item() == pytest.approx(expected_cl, rel=1e-5)
    one_image = model.contrastive_losses({"text_summary": texts, "image_summary": images,
                                          "has_image": torch.tensor([True, False, False, False, False])})
    assert one_image == {}  # a single image has nothing to be contrasted with


def test_mgipscl_total_loss_adds_both_contrastive_terms_and_ablation_drops_one(tiny_bert):
    torch.manual_seed(0)
    model, batch, _ = build("mgipscl", tiny_bert, np.random.default_rng(0), dropout=0.0)
    out = model.train()(batch)
    torch.testing.assert_close(out["loss"].detach(), out["loss_mner"] + out["loss_ips_cl"] + out["loss_cl"])
    no_ips = build("mgipscl", tiny_bert, np.random.default_rng(0), use_ips_cl=False)[0].train()(batch)
    assert "loss_ips_cl" not in no_ips and "loss_cl" in no_ips


@pytest.mark.parametrize("use_mgi", [True, False])
def test_mgipscl_image_side_is_the_posts_own_visual_tokens(use_mgi, tiny_bert):
    """eq. 14's v_j are image j's visual tokens: give post 0 post 3's crops and its image summary is
    post 3's (it no longer depends on post 0's text); with or without MGI (one change per ablation)."""
    torch.manual_seed(0)
    model, batch, _ = build("mgipscl", tiny_bert, np.random.default_rng(0), dropout=0.0, use_mgi=use_mgi)
    model.eval()
    swapped = {**batch, "visual": dict(batch["visual"])}
    for key in ("grounding/pixels", "grounding/mask", "images/ok"):
        values = batch["visual"][key].clone()
        values[0] = batch["visual"][key][3]
        swapped["visual"][key] = values
    with torch.no_grad():
        before = model.encode(batch)["image_summary"]
        after = model.encode(swapped)["image_summary"]
    torch.testing.assert_close(after[0], before[3])
    assert F.cosine_similarity(before[0], before[3], dim=0) < 0.99  # the two posts' images do differ


def test_mgipscl_post_without_crops_ignores_padding_pixels(tiny_bert):
    torch.manual_seed(0)
    model, batch, _ = build("mgipscl", tiny_bert, np.random.default_rng(0), dropout=0.0)
    model.eval()
    with torch.no_grad():
        fused = model.encode(batch)["fused"]
        batch["visual"]["grounding/pixels"][1:3] = 255  # the crop-less and the image-less post's padding
        changed = model.encode(batch)["fused"]
        batch["visual"]["grounding/pixels"][0] = 0  # post 0's real crops do matter
        post0 = model.encode(batch)["fused"]
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused[1:3], changed[1:3])
    assert not torch.allclose(fused[0], post0[0])


def test_mgipscl_clip_tower_has_its_own_parameter_group(tiny_bert):
    from mner.trainer.core.config import TrainConfig

    model = build("mgipscl", tiny_bert, np.random.default_rng(0), clip_lr=3e-5)[0]
    groups = model.parameter_groups(TrainConfig(encoder_lr=5e-5, head_lr=1e-3, crf_lr=1e-2, weight_decay=0.01))
    by_name = {g["name"]: g for g in groups}
    assert by_name["clip"]["lr"] == 3e-5 and by_name["text_encoder"]["lr"] == 5e-5 and by_name["head"]["lr"] == 1e-3
    assert by_name["clip/no_decay"]["weight_decay"] == 0.0
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)  # each exactly once
    clip_ids = {id(p) for p in model.clip.parameters()}
    assert clip_ids == {id(p) for g in groups if g["name"].startswith("clip") for p in g["params"]}
    query = model.mutual_layers[0].query.weight  # BERT's own layers, moved, stay at the encoder lr
    assert any(p is query for p in by_name["text_encoder"]["params"])


def test_mgipscl_frozen_mode_reads_cached_states_and_maps_layers(tiny_bert):
    from mner.trainer.models.mgipscl import vision_index_for_text_layer

    cls = get_model_class("mgipscl")
    assert cls.required_features(cls.Config()) == ["grounding/offsets", "grounding/pixels"]
    assert cls.required_features(cls.Config(vision_mode="frozen")) == ["grounding/offsets",
                                                                      "encoders/clip_grounding/states"]
    with pytest.raises(ValueError, match="vision_mode"):
        cls.required_features(cls.Config(vision_mode="fast"))
    # paper: BERT-base 12 layers x CLIP 12 layers -> text layer l+1 reads vision layer l (eq. 2)
    assert [vision_index_for_text_layer(t, 12, 12, list(range(13))) for t in range(1, 13)] == list(range(12))
    # MiniLM (6 layers) over ViT-B/32 (12): proportional
    assert [vision_index_for_text_layer(t, 6, 12, list(range(13))) for t in range(1, 7)] == [0, 2, 4, 6, 8, 10]
    # cached [4, 8, 12]: the last cached layer at or below the wanted one, else the first
    assert [vision_index_for_text_layer(t, 12, 12, [4, 8, 12]) for t in (1, 5, 6, 9, 12)] == [0, 0, 0, 1, 1]
    torch.manual_seed(0)
    model, batch, _ = build("mgipscl", tiny_bert, np.random.default_rng(0), vision_mode="frozen")
    assert not hasattr(model, "clip")
    loss = model.train()(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.cached.keys["0"].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ ESPVR: VRP on 12x12

G = 12


def rc(index: int) -> tuple[int, int]:
    return divmod(int(index), G)


def test_vrp_helpers_on_a_hand_worked_grid():
    from mner.trainer.models.espvr import block_indices, block_origin, neighbour_mask, pick_center

    relevance = torch.zeros(2, G * G)
    relevance[0, 2 * G + 7] = relevance[0, 8 * G + 1] = 0.5  # a tie: the first in row-major order wins
    relevance[1, 11 * G + 11] = 0.9  # bottom-right corner
    center = pick_center(relevance)
    assert [rc(c) for c in center] == [(2, 7), (11, 11)]

    near = neighbour_mask(center, G, alpha=3)  # row and column distance < 3, b_c excluded
    assert near[0].sum() == 24 and not near[0, 2 * G + 7] and near[0, 0 * G + 5] and near[0, 4 * G + 9]
    assert not near[0, 5 * G + 7] and not near[0, 2 * G + 4]
    assert near[1].sum() == 8  # the corner has only a 3x3 block minus itself
    assert [rc(i) for i in near[1].nonzero().flatten()] == [(9, 9), (9, 10), (9, 11), (10, 9), (10, 10), (10, 11),
                                                            (11, 9), (11, 10)]

    neighbour = torch.tensor([0 * G + 5, 10 * G + 10])
    top, left = block_origin(center, neighbour, G, alpha=3)
    # post 0: min rows/cols of (2, 7) and (0, 5) -> (0, 5); post 1: (10, 10) shifted inward to (9, 9)
    assert list(zip(top.tolist(), left.tolist())) == [(0, 5), (9, 9)]
    blocks = block_indices(top, left, G, alpha=3)
    assert [rc(i) for i in blocks[0]] == [(r, c) for r in range(0, 3) for c in range(5, 8)]
    assert [rc(i) for i in blocks[1]] == [(r, c) for r in range(9, 12) for c in range(9, 12)]
    # alpha = 11 around (6, 6) with the neighbour at (0, 11): columns shift left to fit 11 wide
    top, left = block_origin(torch.tensor([6 * G + 6]), torch.tensor([0 * G + 11]), G, alpha=11)
    assert (top.item(), left.item()) == (0, 1)
    # alpha = 1: no neighbour at all
    assert not neighbour_mask(torch.tensor([5 * G + 5]), G, alpha=1).any()


@pytest.mark.parametrize("straight_through", [False, True])
def test_vrp_module_selects_the_hand_worked_block_and_passes_gradient(straight_through):
    """The paper's hard choice gives W_q / W_k no gradient (they stay as initialised, not trained);
    the straight-through switch passes the chosen scores' gradient. The block is the same."""
    from mner.trainer.models.espvr import VisualRegionPositioning

    width = 4
    vrp = VisualRegionPositioning(width, width, width, alpha=3, straight_through=straight_through)
    with torch.no_grad():
        for linear in (vrp.entity_query, vrp.region_key, vrp.center_query, vrp.neighbour_key):
            linear.weight.copy_(torch.eye(width))
            linear.bias.zero_()
    regions = torch.zeros(2, G * G, width)
    regions[0, 2 * G + 7, 0] = regions[0, 8 * G + 1, 0] = 4.0  # tied most relevant: (2, 7) comes first
    regions[0, 0 * G + 5, 0] = regions[0, 4 * G + 9, 0] = 2.0  # tied best neighbours of (2, 7): (0, 5) first
    regions[0, 6 * G + 2, 0] = 3.0  # relevant but too far from b_c to be its neighbour
    regions[1, 11 * G + 11, 1] = 4.0  # post 1: corner region ...
    regions[1, 10 * G + 10, 1] = 2.0  # ... and its best neighbour: block shifted inward to rows/cols 9..11
    regions[1, 11 * G + 10, 1] = 1.0
    entities = torch.zeros(2, 2, width, requires_grad=True)
    with torch.no_grad():
        entities[0, 0, 0] = entities[0, 1, 0] = 1.0
        entities[1, 0, 1] = 1.0
    entity_mask = torch.tensor([[True, True], [True, False]])
    block, chosen = vrp(entities, entity_mask, regions)
    assert [rc(c) for c in chosen["center"]] == [(2, 7), (11, 11)]
    assert [rc(c) for c in chosen["neighbour"]] == [(0, 5), (10, 10)]
    assert list(zip(chosen["top"].tolist(), chosen["left"].tolist())) == [(0, 5), (9, 9)]
    expected = torch.stack([regions[0].view(G, G, width)[0:3, 5:8].reshape(9, width),
                            regions[1].view(G, G, width)[9:12, 9:12].reshape(9, width)])
    torch.testing.assert_close(block, expected)  # the values are the regions themselves
    if not straight_through:
        assert not block.requires_grad and not any(p.requires_grad for p in vrp.parameters())
        return
    block.sum().backward()
    assert vrp.region_key.weight.grad.abs().sum() > 0 and entities.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ ESPVR: captions


def test_caption_is_the_second_segment_truncated_first(tiny_bert):
    from transformers import AutoTokenizer

    from mner.pipeline.data import Post
    from mner.trainer.inputs.batching import Collator, PostDataset
    from mner.trainer.inputs.segments import SecondSegment

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    posts = [
        Post(post_id=str(i), tokens=words, tags=["O"] * len(words), image_id=f"img{i}", split="train", source=f"t:{i}")
        for i, words in enumerate([["meet", "john"], ["love", "london", "today"], ["rt"] * 9])
    ]
    dataset = PostDataset(posts, tokenizer, label_to_id={"O": 0}, max_length=9, image_rows=[0, 1, 2])
    captions = ["a photo of the city", "", "the game"]
    pairing = SecondSegment(tokenizer, path="captions/text", max_length=9)
    collator = Collator(pad_token_id=0, visual_batcher=lambda rows: {"captions/text": [captions[r] for r in rows]},
                        second_segment=pairing)
    plain = Collator(pad_token_id=0)([dataset[i] for i in range(3)])
    batch = collator([dataset[i] for i in range(3)])
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    text = dataset[0]["input_ids"]
    assert first[: len(text)] == text and first[len(text) - 1] == sep_id and text[0] == cls_id
    assert len(first) == 9 and first[-1] == sep_id  # caption cut to what max_length leaves, then [SEP]
    assert tokenizer.decode(first[len(text) : -1]) == "a photo of the"
    assert batch["token_type_ids"][0].tolist() == [0] * len(text) + [1] * (9 - len(text))
    assert batch["attention_mask"][1].sum() == len(dataset[1]["input_ids"])  # empty caption: nothing appended
    assert batch["token_type_ids"][1].sum() == 0 and batch["token_type_ids"][2].sum() == 0  # post 2 fills max_length
    for key in ("word_index", "word_mask", "labels"):  # the post's own word positions are untouched
        assert torch.equal(batch[key], plain[key])


def test_espvr_reads_the_caption_and_its_ablations_drop_inputs(tiny_bert):
    torch.manual_seed(0)
    cls = get_model_class("espvr")
    assert cls.required_features(cls.Config()) == ["encoders/swin/grid", "captions/text"]
    assert cls.required_features(cls.Config(use_captions=False)) == ["encoders/swin/grid"]
    assert cls.required_features(cls.Config(use_espvr=False)) == ["captions/text"]
    assert cls.required_features(cls.Config(use_captions=False, use_espvr=False)) == []
    assert cls.PRESETS["paper"]["span_loss_weight"] == 0.08 and cls.PRESETS["paper"]["cross_width"] == 512
    model, batch, _ = build("espvr", tiny_bert, np.random.default_rng(0), dropout=0.0)
    model.eval()
    with torch.no_grad():
        states = model.encode(batch)["_text"]
        batch["visual"]["captions/text"][0] = "london game today"
        other = model.encode(batch)["_text"]
    assert not torch.allclose(states[0], other[0])  # the caption reaches the post's states
    torch.testing.assert_close(states[1:3], other[1:3])  # posts with empty captions are untouched
    with pytest.raises(ValueError, match="alpha"):
        build("espvr", tiny_bert, np.random.default_rng(0), alpha=12)
    out = model.train()(batch)
    assert "loss_esi" in out


def brute_force_crf_nll(crf, emissions: torch.Tensor, gold: list[int]) -> float:
    """-log P(gold | emissions) of a linear-chain CRF by enumerating every tag sequence (short posts)."""
    import itertools

    start, end, transitions = crf.start_transitions, crf.end_transitions, crf.transitions

    def score(tags):
        total = start[tags[0]] + emissions[0, tags[0]] + end[tags[-1]]
        for i in range(1, len(tags)):
            total = total + transitions[tags[i - 1], tags[i]] + emissions[i, tags[i]]
        return float(total.detach())

    every = [score(tags) for tags in itertools.product(range(emissions.size(1)), repeat=emissions.size(0))]
    top = max(every)
    return -(score(gold) - (top + math.log(sum(math.exp(s - top) for s in every))))


def test_espvr_eq_10_adds_lambda_times_the_span_crf_nll_of_the_type_less_gold(tiny_bert):
    """L = L_MNER + 0.08 L_ESI with L_ESI computed here: the gold tags with their types removed
    (B-X -> B, I-X -> I) and the span CRF's NLL by enumeration, averaged over the posts."""
    torch.manual_seed(0)
    model, batch, _ = build("espvr", tiny_bert, np.random.default_rng(0), dropout=0.0)
    model.eval()
    three = slice(0, 3)  # the three short posts (4, 3, 2 words): enumerable
    small = {k: v[three] for k, v in batch.items() if k != "visual"}
    small["visual"] = {k: v[three] for k, v in batch["visual"].items()}
    seen = {}
    model.span_emissions.register_forward_hook(lambda m, a, out: seen.__setitem__("span", out))
    with torch.no_grad():
        with_esi = model(small)["loss"]
        model.config.span_loss_weight = 0.0
        without = model(small)["loss"]
        model.config.span_loss_weight = 0.08
    gold_spans = [[1, 2, 0, 1], [0, 1, 0], [0, 1]]  # POSTS 0-2: B-PER I-PER O B-LOC / O B-ORG O / O B-LOC
    nll = [brute_force_crf_nll(model.span_crf, seen["span"][b, : len(tags)], tags)
           for b, tags in enumerate(gold_spans)]
    assert (with_esi - without).item() == pytest.approx(0.08 * sum(nll) / 3, rel=1e-4)


def test_espvr_evaluation_reads_no_gold_span(tiny_bert):
    """Even with vrp_training_spans=gold, evaluation uses the ESI's own spans: removing or changing
    the labels changes nothing outside training (and in training, gold mode does read them)."""
    torch.manual_seed(0)
    model, batch, _ = build("espvr", tiny_bert, np.random.default_rng(0), dropout=0.0, vrp_training_spans="gold",
                            straight_through=True, global_token=True)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    relabelled = {**batch, "labels": torch.where(batch["labels"] > 0, 0, 1) * batch["word_mask"]}
    with torch.no_grad():
        model.eval()
        paths = model.decode(batch)
        assert model.decode(unlabelled) == paths and model.decode(relabelled) == paths
        emissions = model(batch)["emissions"]
        torch.testing.assert_close(model(relabelled)["emissions"], emissions)
        torch.testing.assert_close(model(unlabelled)["emissions"], emissions)
        model.train()
        trained = model(batch)["emissions"]
        assert not torch.allclose(model(relabelled)["emissions"], trained)  # training does read the gold spans


def test_espvr_paper_presets_follow_the_paper_and_mark_what_it_does_not_state():
    cls = get_model_class("espvr")
    assert (cls.Config().vrp_training_spans, cls.Config().straight_through, cls.Config().global_token) == (
        "predicted", False, False)
    for name, preset in cls.PRESETS.items():
        assert preset["vrp_training_spans"] == "predicted" and preset["straight_through"] is False, name
        assert preset["global_token"] is False and preset["crf_lr"] == preset["encoder_lr"] == 1e-4, name
    source = Path(inspect.getsourcefile(cls)).read_text()
    for field in ("alpha=4", "warmup_ratio=0.1", "weight_decay=0.01", "epochs=30", "cross_heads=8"):
        line = next(line for line in source.splitlines() if line.strip().startswith(field))
        assert "NOT STATED" in line, line


def test_espvr_without_a_span_the_words_see_no_visual_token(tiny_bert):
    """Paper reading (no b_0 token): a post without a predicted entity gets no local visual
    information (Table 4.B), so its states do not depend on the image grid; with global_token they do."""
    torch.manual_seed(0)
    for global_token, depends in ((False, False), (True, True)):
        model, batch, _ = build("espvr", tiny_bert, np.random.default_rng(0), dropout=0.0, global_token=global_token)
        model.eval()
        no_spans = [[0] * len(row) for row in batch["word_mask"].tolist()]
        with torch.no_grad():
            encoded = model.encode(batch)
            fused = model.fused_states(encoded, no_spans)
            other = {**encoded, "visual": {**encoded["visual"]}}
            other["visual"]["encoders/swin/grid"] = encoded["visual"]["encoders/swin/grid"] * -3 + 1
            changed = model.fused_states(other, no_spans)
        assert torch.isfinite(fused).all()
        assert torch.allclose(fused[0], changed[0]) != depends, global_token


def test_mgipscl_default_clip_tower_offline_is_a_one_line_error(monkeypatch):
    """The default tower is a hub name: offline (the tests run with HF_HUB_OFFLINE=1) it must say how
    to go on in one line, not raise the hub's OSError."""
    from mner.trainer.models.mgipscl import build_clip_tower

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in (get_model_class("mgipscl").Config().clip_model, "./no-such-clip-folder"):
        with pytest.raises(ValueError, match="vision_mode=frozen") as err:
            build_clip_tower(name)
        assert "\n" not in str(err.value)


def test_mgipscl_paper_preset_marks_what_the_paper_does_not_state():
    cls = get_model_class("mgipscl")
    assert cls.PRESETS["paper"]["warmup_ratio"] == 0.06 and cls.PRESETS["paper"]["clip_lr"] == 3e-5  # sec. 4.3
    source = Path(inspect.getsourcefile(cls)).read_text()
    for field in ("crf_lr=", "head_lr=", "batch_size=", "temperature=", "contrastive_dim="):
        line = next(line for line in source.splitlines() if line.strip().startswith(field))
        assert "NOT STATED" in line, line


def test_espvr_gold_spans_and_straight_through_change_nothing_without_a_usable_image(tiny_bert):
    """On a cache without pictures (every image missing: the real-text runs) no post has a block, so
    reading gold spans or passing the block's gradient cannot change the loss or its gradients; only
    the b_0 token adds something (a constant token: the grid of a missing image is zeros)."""
    results = {}
    for name, switches in {"paper": {}, "gold": {"vrp_training_spans": "gold"}, "st": {"straight_through": True},
                           "b0": {"global_token": True}}.items():
        torch.manual_seed(0)
        model, batch, _ = build("espvr", tiny_bert, np.random.default_rng(0), dropout=0.0, **switches)
        batch["visual"]["images/ok"] = torch.zeros(len(batch["input_ids"]), dtype=torch.bool)
        loss = model.train()(batch)["loss"]
        loss.backward()
        results[name] = (loss.detach(), model.text_encoder.embeddings.word_embeddings.weight.grad.clone())
    for name in ("gold", "st"):
        torch.testing.assert_close(results[name][0], results["paper"][0])
        torch.testing.assert_close(results[name][1], results["paper"][1])
    assert not torch.allclose(results["b0"][0], results["paper"][0])
