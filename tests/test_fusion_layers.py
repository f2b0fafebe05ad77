"""MGIPS-CL's and ESPVR's layers, each against a computation written out here on hand-set inputs
(issue 18): mutual attention, MGE (eq. 5-8), the Interweave Encoder (eq. 9-11), the pre-post gate
(eq. 12-13), the CLIP crop encoder on every transformers version, the ESPVR cross-modal layers
(eq. 3-6), its gate (eq. 7-8) and ``span_membership``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.fusion import build, layer_norm, set_single_head, single_head_attention

# ------------------------------------------------------------------------------ MGIPS-CL


def test_mutual_attention_without_visual_tokens_is_the_text_encoder_itself(tiny_bert):
    """eq. 2-4: the text's keys/values are [vision ; text]; with no attendable vision token the
    mutual-attention encoder must compute exactly what the pretrained BERT computes."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model, batch, _ = build("mgipscl", tiny_bert, np.random.default_rng(0), dropout=0.0)
    model.eval()
    reference = AutoModel.from_pretrained(tiny_bert).eval()
    text_mask = batch["attention_mask"].bool()
    keys_values, _, vision_mask = model.vision(batch["visual"])
    with torch.no_grad():
        expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        hidden = model.text_encoder.embeddings(input_ids=batch["input_ids"])
        no_vision = torch.zeros_like(vision_mask)
        with_vision = hidden
        for layer, index in zip(model.mutual_layers, model.vision_for_layer):
            hidden = layer(hidden, text_mask, keys_values[index], no_vision)
            with_vision = layer(with_vision, text_mask, keys_values[index], vision_mask)
    torch.testing.assert_close(hidden[text_mask], expected[text_mask], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_vision[0][text_mask[0]], expected[0][text_mask[0]], atol=1e-3)  # crops count


def test_mutual_attention_one_softmax_over_vision_and_text_keys(tiny_bert):
    """eq. 2: for one query the attention weights are one softmax over [K^v ; H^t W^k]: computed here
    term by term, heads split by hand, then BERT's own output / FFN applied to the context."""
    torch.manual_seed(0)
    model, _, _ = build("mgipscl", tiny_bert, np.random.default_rng(0), dropout=0.0)
    layer = model.mutual_layers[0].eval()
    generator = torch.Generator().manual_seed(3)
    text = torch.randn(1, 3, 32, generator=generator)
    vision = (torch.randn(1, 2, 32, generator=generator), torch.randn(1, 2, 32, generator=generator))
    text_mask, vision_mask = torch.tensor([[True, True, False]]), torch.tensor([[True, False]])
    with torch.no_grad():
        got = layer(text, text_mask, vision, vision_mask)
        heads, head_width = layer.num_heads, 32 // layer.num_heads
        q = layer.query(text)[0]
        keys = torch.cat([vision[0][0], layer.key(text)[0]])  # (2 + 3, 32)
        values = torch.cat([vision[1][0], layer.value(text)[0]])
        attendable = [True, False, True, True, False]
        context = torch.zeros(3, 32)
        for i in range(3):
            for h in range(heads):
                part = slice(h * head_width, (h + 1) * head_width)
                scores = [float(q[i, part] @ keys[j, part]) / math.sqrt(head_width) for j in range(5)]
                exp = [math.exp(s) if ok else 0.0 for s, ok in zip(scores, attendable)]
                context[i, part] = sum(e / sum(exp) * values[j, part] for j, e in enumerate(exp))
        attended = layer.attention_output(context[None], text)
        expected = layer.output(layer.intermediate(attended), attended)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def mge_with_interaction(width, interaction, subject_enc, **kwargs):
    """An MGE whose eq. 5 output (M_im, f1(Linear1(subject))) is hand-set, and its f3 input recorded."""
    from mner.trainer.models.mgipscl import MultiGranularityExcavator

    mge = MultiGranularityExcavator(width, num_heads=1, dropout=0.0, **kwargs).eval()
    mge.interaction = lambda guide, guide_mask, subject: (interaction, subject_enc)
    seen = {}
    mge.out.register_forward_hook(lambda module, args, out: seen.__setitem__("f3_input", args[0]))
    return mge, seen


def test_mge_row_weight_is_one_softmax_over_positions_and_column_weight_one_over_features():
    """eq. 6-7 on hand-set M_im: M_C = softmax over the n positions of M_im M_3 (n x 1);
    M_F = softmax over the d features of m_4 (.) mean_i M_im (1 x d); f3 reads M_C s + M_F s."""
    interaction = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, -1.0]]])  # M_im (1, n=3, d=2)
    subject_enc = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])  # s (1, 3, 2)
    subject_mask = torch.tensor([[True, True, False]])  # position 2 is padding
    mge, seen = mge_with_interaction(2, interaction, subject_enc, use_row=True, use_column=True)
    with torch.no_grad():
        mge.row_weight.copy_(torch.tensor([[0.5], [1.0]]))  # M_3 (d, 1)
        mge.column_weight.copy_(torch.tensor([2.0, -1.0]))  # m_4 (d,)
        mge(torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), subject_enc, subject_mask)
    # rows: scores 0.5*1 + 1*0 = 0.5 and 0.5*0 + 1*2 = 2 over the 2 valid positions
    row = [math.exp(0.5) / (math.exp(0.5) + math.exp(2.0)), math.exp(2.0) / (math.exp(0.5) + math.exp(2.0)), 0.0]
    # columns: mean of the valid rows (0.5, 1.0), times m_4 -> (1.0, -1.0)
    column = [math.exp(1.0) / (math.exp(1.0) + math.exp(-1.0)), math.exp(-1.0) / (math.exp(1.0) + math.exp(-1.0))]
    expected = torch.tensor([[[(row[i] + column[k]) * float(subject_enc[0, i, k]) for k in range(2)]
                              for i in range(3)]])
    torch.testing.assert_close(seen["f3_input"], expected)
    assert mge.row_weights(interaction, subject_mask).shape == (1, 3, 1)  # one weight per position
    assert mge.column_weights(interaction, subject_mask).shape == (1, 1, 2)  # one weight per feature


@pytest.mark.parametrize("use_row, use_column", [(True, False), (False, True)])
def test_mge_ablations_drop_exactly_one_weighted_term(use_row, use_column):
    interaction = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    subject_enc = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    mge, seen = mge_with_interaction(2, interaction, subject_enc, use_row=use_row, use_column=use_column)
    with torch.no_grad():
        if use_row:
            mge.row_weight.copy_(torch.tensor([[0.0], [0.0]]))  # equal scores: 1/2 per position
        else:
            mge.column_weight.copy_(torch.tensor([0.0, 0.0]))  # equal scores: 1/2 per feature
        mge(torch.zeros(1, 1, 2), torch.ones(1, 1, dtype=torch.bool), subject_enc, mask)
    torch.testing.assert_close(seen["f3_input"], 0.5 * subject_enc)


def test_mge_rescaling_is_a_named_switch_off_in_the_paper_presets():
    from mner.trainer.models import get_model_class

    interaction = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, -1.0]]])
    mask = torch.tensor([[True, True, False]])
    plain, _ = mge_with_interaction(2, interaction, interaction, use_row=True, use_column=True)
    scaled, _ = mge_with_interaction(2, interaction, interaction, use_row=True, use_column=True, rescale=True)
    scaled.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain.row_weights(interaction, mask).sum(), torch.tensor(1.0))
        torch.testing.assert_close(plain.column_weights(interaction, mask).sum(), torch.tensor(1.0))
        torch.testing.assert_close(scaled.row_weights(interaction, mask), 2 * plain.row_weights(interaction, mask))
        torch.testing.assert_close(scaled.column_weights(interaction, mask),
                                   2 * plain.column_weights(interaction, mask))
    cls = get_model_class("mgipscl")
    assert cls.Config().rescale_mge_weights is False
    assert all(preset.get("rescale_mge_weights", False) is False for preset in cls.PRESETS.values())


def test_interweave_order_counts_and_residuals():
    """eq. 9-11 (Figure 3's order) with recording stand-ins for the two shared MGEs, MGE(guide, subject)
    as the paper writes its arguments: X_0 = IG(H^v, H^t); per layer T_l = T_{l-1} + TG(T_{l-1}, X_{l-1}),
    X_l = X_{l-1} + IG(X_{l-1}, T_l)."""
    from mner.trainer.models.mgipscl import InterweaveEncoder

    class Recorder(torch.nn.Module):
        def __init__(self, name, calls):
            super().__init__()
            self.name, self.calls = name, calls

        def forward(self, guide, guide_mask, subject, subject_mask):
            self.calls.append((self.name, guide.clone(), subject.clone()))
            return 2 * subject + guide.mean(dim=1, keepdim=True)  # a known function of both inputs

    calls: list = []
    encoder = InterweaveEncoder(2, num_layers=2, num_heads=1, dropout=0.0, use_row=True, use_column=True)
    encoder.image_guided, encoder.text_guided = Recorder("IG", calls), Recorder("TG", calls)
    text, vision = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[4.0, 2.0]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    text_out, vision_out = encoder(text, mask, vision, torch.ones(1, 1, dtype=torch.bool))

    def mge(guide, subject):
        return 2 * subject + guide.mean(dim=1, keepdim=True)

    x = mge(vision, text)  # X_0 = MGE(H^v, H^t), eq. 9
    t = text  # T_0 = H^t
    for _ in range(2):
        t = t + mge(t, x)  # eq. 11
        x = x + mge(x, t)  # eq. 10
    torch.testing.assert_close(text_out, t)
    torch.testing.assert_close(vision_out, x)
    assert [name for name, _, _ in calls] == ["IG", "TG", "IG", "TG", "IG"]  # one more image-guided MGE


def test_pre_post_gate_eq_12_13_by_hand():
    from mner.trainer.models.mgipscl import PrePostGate

    gate = PrePostGate(2)
    with torch.no_grad():
        gate.post.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.5]]))  # W_1
        gate.pre.weight.copy_(torch.tensor([[0.0, -1.0], [2.0, 0.0]]))  # W_2
        gate.pre.bias.copy_(torch.tensor([0.25, -0.5]))  # b
        pre, post = torch.tensor([[[1.0, 2.0]]]), torch.tensor([[[3.0, -4.0]]])  # H^t, T^t
        got = gate(pre, post)
    logits = [1.0 * 3 + 0.0 * -4 + 0.0 * 1 + -1.0 * 2 + 0.25, 0.0 * 3 + 0.5 * -4 + 2.0 * 1 + 0.0 * 2 - 0.5]
    sigma = [1 / (1 + math.exp(-v)) for v in logits]  # I, eq. 12
    expected = [sigma[0] * 1.0 + (1 - sigma[0]) * 3.0, sigma[1] * 2.0 + (1 - sigma[1]) * -4.0]  # z, eq. 13
    torch.testing.assert_close(got, torch.tensor([[expected]]))


def test_clip_crop_encoder_matches_the_tower_on_the_installed_transformers():
    """The crop encoder runs the CLIP layers itself (``layer(hidden, None[, None])``): its final states
    must be the tower's own forward, whatever the transformers version (4.x needs causal_attention_mask)."""
    import warnings

    from mner.trainer.models.mgipscl import CLIPCropEncoder, clip_layer_takes_causal_mask

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder = CLIPCropEncoder("tiny-random").eval()
    layer_class = type(encoder.tower.encoder.layers[0])
    assert encoder.layer_takes_causal_mask == clip_layer_takes_causal_mask(layer_class)
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)  # the tiny tower's native 64 px
    with torch.no_grad():
        keys_values, final = encoder(pixels)
        images = (pixels.float() / 255 - encoder.mean) / encoder.std
        out = encoder.tower(pixel_values=images, output_hidden_states=True)
    torch.testing.assert_close(final, encoder.tower.post_layernorm(out.last_hidden_state), rtol=1e-5, atol=1e-5)
    first = encoder.tower.encoder.layers[0]  # keys of layer 1 read V^e = the tower's hidden state 0
    expected_keys = first.self_attn.k_proj(first.layer_norm1(out.hidden_states[0]))
    torch.testing.assert_close(keys_values[1][0], expected_keys, rtol=1e-5, atol=1e-5)
    assert len(keys_values) == encoder.depth + 1


# ------------------------------------------------------------------------------ ESPVR


def test_cross_modal_layer_eq_3_6_by_hand_and_without_context():
    """P' = LN(q + MA(q, kv)), P = LN(P' + FFN(P')); a row with nothing to attend gets no attention term."""
    from mner.trainer.models.espvr import CrossModalLayer

    torch.manual_seed(0)
    layer = CrossModalLayer(4, 1, 0.0).eval()
    generator = torch.Generator().manual_seed(1)
    w_q, w_k, w_v, w_o = set_single_head(layer.attention, generator)
    queries, context = torch.randn(2, 3, 4, generator=generator), torch.randn(2, 2, 4, generator=generator)
    mask = torch.tensor([[True, False], [False, False]])  # post 1: no visual token at all
    with torch.no_grad():
        got = layer(queries, context, mask)
        attended = single_head_attention(queries[0], context[0], context[0], mask[0], w_q, w_k, w_v, w_o)
        for post, term in ((0, attended), (1, torch.zeros(3, 4))):
            first = layer_norm(queries[post] + term)  # LayerNorm weights are 1, biases 0 at init
            expected = layer_norm(first + layer.ffn(first))
            torch.testing.assert_close(got[post], expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()


def test_espvr_gate_eq_7_8_with_hand_set_weights(tiny_bert):
    """H = [A ; g * Q], g = sigmoid(W_a A + W_q Q): A and Q taken from their layers' outputs."""
    torch.manual_seed(0)
    model, batch, _ = build("espvr", tiny_bert, np.random.default_rng(0), dropout=0.0, global_token=True)
    model.eval()
    width = model.config.cross_width
    seen = {}
    model.text_over_visual.register_forward_hook(lambda m, a, out: seen.__setitem__("A", out))
    model.text_over_regions.register_forward_hook(lambda m, a, out: seen.__setitem__("Q", out))
    with torch.no_grad():
        model.gate_a.weight.copy_(torch.eye(width) * 0.5)
        model.gate_q.weight.copy_(-torch.eye(width))
        encoded = model.encode(batch)
        span_tags = [[1] * len(row) for row in batch["word_mask"].tolist()]  # every word a span
        fused = model.fused_states(encoded, span_tags)
    a, q = seen["A"], seen["Q"]
    gate = 1 / (1 + torch.exp(-(0.5 * a - q)))  # element-wise, eq. 7
    torch.testing.assert_close(fused, torch.cat([a, gate * q], dim=-1))


def test_span_membership_on_hand_set_tags():
    from mner.trainer.models.espvr import span_membership

    # post 0: B I O B -> spans {0, 1}, {3}; post 1: I I O B B -> {0, 1} (I after O starts one), {3}, {4}
    membership, mask = span_membership([[1, 2, 0, 1], [2, 2, 0, 1, 1]], num_words=6)
    assert membership.shape == (2, 3, 6)
    assert membership[0].tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0] * 6]
    assert membership[1].tolist() == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    membership, mask = span_membership([[0, 0], []], num_words=2)  # no span anywhere: one empty slot
    assert membership.shape == (2, 1, 2) and not mask.any() and membership.sum() == 0
