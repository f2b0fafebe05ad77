"""ESPVR: Entity Spans Position Visual Regions (section 3), one file, top to bottom.

- 3.2 feature extraction: BERT over ``[CLS] text [SEP] caption [SEP]`` (the collator appends the
  cached caption, ``captions/text``, as the second segment; mner.trainer.inputs.segments) and the cached
  Swin grid ``encoders/swin/grid`` (12 x 12 regions b_1..b_144; b_0 = their mean, Swin's own pooled
  feature);
- 3.3 the ESPVR module: a self-attention transformer over the text's states (T), the ESI span CRF
  over type-less B/I/O, and VRP (eq. 1-2): entity features from the spans, attention of every entity
  over the 144 regions, the most relevant region b_c, its most relevant neighbour b_l (row and column
  distance < alpha) and the alpha x alpha block spanned from their top-left corner;
- 3.4 three cross-modal transformer layers (eq. 3-6) and the gate (eq. 7-8);
- 3.5 the CRF; loss = L_MNER + lambda * L_ESI (eq. 10), lambda = 0.08.

The defaults and every paper preset compute what the paper writes: VRP reads the ESI's predicted
(Viterbi) spans, the region choice is a hard argmax through which no gradient flows, and the visual
tokens are the alpha x alpha block alone. Three additions of ours are named switches, off unless
set (docs/models/espvr.md has what each one measured):

- ``vrp_training_spans="gold"``: while training, VRP reads the gold spans (the labels, types removed);
- ``straight_through=True``: the chosen block is multiplied by ``s_c / stop_grad(s_c)`` (and
  ``p_l / stop_grad(p_l)`` for the neighbour), 1 in value, so the relevance projections and the
  entity features receive the gradient of the chosen region's score;
- ``global_token=True``: b_0 joins the block as an always-present visual token.

Evaluation and prediction never read a gold span, whatever the switches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mner.trainer.inputs.segments import SecondSegment
from mner.trainer.inputs.text_encoder import load_encoder
from mner.trainer.models import default_parameter_groups, register_model
from mner.trainer.models.layers import BIOConstrainedCRF, crf_loss_and_decode, gather_first_pieces, init_linear

CAPTIONS = "captions/text"
IMAGE_OK = "images/ok"
SPAN_LABELS = ["O", "B-ENT", "I-ENT"]  # ESI's type-less tag set (sec. 3.3)
SPAN_MODES = ("gold", "predicted")


@dataclass
class ESPVRConfig:
    use_captions: bool = True  # False = "w/o IC": BERT reads the post alone
    use_espvr: bool = True  # False = "w/o ESPVR": no ESI, no VRP, no regions: transformer states -> CRF
    alpha: int = 4  # edge of the visual region block, 1..grid-1 (sec. 3.3; the paper's value is not stated)
    span_loss_weight: float = 0.08  # lambda of eq. 10
    num_heads: int = 8  # heads of the text self-attention layers (sec. 4.1: 8)
    num_text_layers: int = 4  # self-attention layers over the text (sec. 4.1: 4)
    cross_width: int = 512  # width of VRP attention and the cross-modal layers (sec. 4.1: 512)
    cross_heads: int = 8  # heads of the cross-modal layers (not stated; 8 as the text layers)
    dropout: float = 0.4  # dropout everywhere in the head (sec. 4.1: 0.4)
    # spans VRP reads while training: predicted (paper sec. 3.3: the ESI's Viterbi spans) | gold (ours: the labels')
    vrp_training_spans: str = "predicted"
    straight_through: bool = False  # ours: the chosen block carries its scores' gradient (paper: a hard argmax)
    global_token: bool = False  # ours: b_0 is an always-present visual token (paper: no equation uses b_0)
    swin_group: str = "swin"  # cache group encoders/<swin_group> holding the 12x12 grid


# ----------------------------------------------------------------------------------------------
# 3.3  Entity spans and Visual Regions Positioning
# ----------------------------------------------------------------------------------------------


def span_membership(span_tags: list[list[int]], num_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Type-less B/I/O tags (0/1/2) of each post's kept words -> (B, M, W) word-membership of every
    entity span (M = most spans of a post, at least 1) and the span mask (B, M). An I after O starts a span."""
    spans_per_post = []
    for tags in span_tags:
        spans, current = [], None
        for w, tag in enumerate(tags):
            if tag == 1 or (tag == 2 and current is None):
                current = [w]
                spans.append(current)
            elif tag == 2:
                current.append(w)
            else:
                current = None
        spans_per_post.append(spans)
    num_spans = max(1, max((len(s) for s in spans_per_post), default=0))
    membership = torch.zeros(len(span_tags), num_spans, num_words)
    for b, spans in enumerate(spans_per_post):
        for m, words in enumerate(spans):
            membership[b, m, words] = 1.0
    span_mask = membership.sum(-1) > 0  # (B, M)
    return membership, span_mask


def pick_center(relevance: torch.Tensor) -> torch.Tensor:
    """eq. 2: b_c = argmax_j of the summed relevance (B, G*G); ties go to the first region in row-major order."""
    return relevance.argmax(dim=-1)  # (B,)


def neighbour_mask(center: torch.Tensor, grid: int, alpha: int) -> torch.Tensor:
    """Regions whose row and column distances to b_c are both < alpha, b_c itself excluded. (B, G*G) bool"""
    rows = torch.arange(grid * grid, device=center.device) // grid  # (G*G,)
    cols = torch.arange(grid * grid, device=center.device) % grid
    center_row, center_col = (center // grid)[:, None], (center % grid)[:, None]  # (B, 1)
    near = ((rows[None] - center_row).abs() < alpha) & ((cols[None] - center_col).abs() < alpha)  # (B, G*G)
    return near & (torch.arange(grid * grid, device=center.device)[None] != center[:, None])


def block_origin(
    center: torch.Tensor, neighbour: torch.Tensor, grid: int, alpha: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left region b_t of the alpha x alpha block: the smaller row and the smaller column of b_c and
    b_l. At the grid's bottom/right edge the block is shifted inward (start <= grid - alpha) so that it
    stays alpha x alpha and still holds both b_c and b_l. Returns (top, left), each (B,)."""
    top = torch.minimum(center // grid, neighbour // grid).clamp(max=grid - alpha)
    left = torch.minimum(center % grid, neighbour % grid).clamp(max=grid - alpha)
    return top, left


def _straight_through(score: torch.Tensor) -> torch.Tensor:
    """score / stop_grad(score): exactly 1 forward, d(log score) backward; 1 where the score is 0
    (posts without an entity, whose block is masked anyway)."""
    positive = score.detach() > 0
    return torch.where(positive, score / score.detach().clamp(min=1e-12), torch.ones_like(score))


def block_indices(top: torch.Tensor, left: torch.Tensor, grid: int, alpha: int) -> torch.Tensor:
    """Row-major region indices of the block (B, alpha*alpha)."""
    offsets = torch.arange(alpha, device=top.device)
    rows = top[:, None, None] + offsets[None, :, None]  # (B, a, 1)
    cols = left[:, None, None] + offsets[None, None, :]  # (B, 1, a)
    return (rows * grid + cols).flatten(1)  # (B, a*a)


class VisualRegionPositioning(nn.Module):
    """VRP (eq. 1-2 and the block rule of sec. 3.3). The choice is a hard argmax: the block holds the
    chosen regions' features and, as written, no gradient reaches W_q / W_k; ``straight_through``
    (ours) scales the block by its scores over their stopped values (1 in value, the scores' gradient)."""

    def __init__(self, text_width: int, region_width: int, width: int, alpha: int, *, straight_through: bool = False):
        super().__init__()
        self.alpha = alpha
        self.straight_through = straight_through
        self.entity_query = nn.Linear(text_width, width)  # Q of eq. 1
        self.region_key = nn.Linear(region_width, width)  # K of eq. 1
        if alpha > 1:  # alpha = 1: the block is b_c alone, no neighbour to choose
            self.center_query = nn.Linear(region_width, width)  # b_c as Q for the neighbour choice
            self.neighbour_key = nn.Linear(region_width, width)  # neighbours as K
        init_linear(self)
        if not straight_through:  # as written, no gradient reaches these projections: they stay as initialised
            self.requires_grad_(False)

    def forward(
        self, entities: torch.Tensor, entity_mask: torch.Tensor, regions: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        # entities: (B, M, d) span features; entity_mask: (B, M); regions: (B, G*G, D) b_1..b_144
        batch_size, num_regions, _ = regions.shape
        grid = math.isqrt(num_regions)
        queries, keys = self.entity_query(entities), self.region_key(regions)  # (B, M, w), (B, G*G, w)
        relevance = (queries @ keys.transpose(1, 2) / math.sqrt(keys.size(-1))).softmax(dim=-1)  # F (B, M, G*G), eq. 1
        relevance = (relevance * entity_mask[..., None]).sum(1)  # summed over entities (B, G*G)
        center = pick_center(relevance)  # c (B,), eq. 2
        rows = torch.arange(batch_size, device=regions.device)
        scale = _straight_through(relevance[rows, center])  # (B,) 1 in value, the score's gradient

        neighbour = center
        if self.alpha > 1:
            near = neighbour_mask(center, grid, self.alpha)  # (B, G*G)
            center_query = self.center_query(regions[rows, center])  # (B, w)
            scores = (self.neighbour_key(regions) @ center_query[:, :, None]).squeeze(-1) / math.sqrt(keys.size(-1))
            scores = scores.masked_fill(~near, torch.finfo(scores.dtype).min).softmax(dim=-1)  # (B, G*G)
            neighbour = scores.argmax(dim=-1)  # b_l (B,), first of ties
            neighbour_score = scores[rows, neighbour]
            scale = scale * _straight_through(neighbour_score)
        top, left = block_origin(center, neighbour, grid, self.alpha)
        index = block_indices(top, left, grid, self.alpha)  # (B, a*a)
        block = regions.gather(1, index[..., None].expand(-1, -1, regions.size(-1)))  # v (B, a*a, D)
        if self.straight_through:
            block = block * scale[:, None, None]
        return block, {"center": center, "neighbour": neighbour, "top": top, "left": left}


# ----------------------------------------------------------------------------------------------
# 3.4  Multimodal interaction
# ----------------------------------------------------------------------------------------------


class CrossModalLayer(nn.Module):
    """A cross-modality transformer layer (eq. 3-6): P' = LN(q + MA(q, kv)), P = LN(P' + FFN(P'))."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width)
        )
        self.ffn_norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        # query: (B, Lq, w); context: (B, Lc, w); context_mask: (B, Lc) bool. A row with nothing to attend
        # (no block: no entity span or no image) gets no attention term: P' = LN(query).
        empty = ~context_mask.any(dim=1)  # (B,)
        padding = ~context_mask
        padding[empty, 0] = False  # attend to one slot, then zero the result (a softmax over nothing is NaN)
        attended, _ = self.attention(query, context, context, key_padding_mask=padding, need_weights=False)
        attended = attended * (~empty)[:, None, None].to(attended.dtype)  # (B, Lq, w)
        hidden = self.norm(query + self.dropout(attended))  # P', eq. 5
        return self.ffn_norm(hidden + self.dropout(self.ffn(hidden)))  # P, eq. 6


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


@register_model("espvr")
class ESPVR(nn.Module):
    Config = ESPVRConfig
    # Sec. 4.1. Fields that are not ESPVRConfig fields belong to TrainConfig. The paper states ONE
    # learning rate (1e-4), used here for BERT, the head and the CRF. Each value it does not state is
    # marked "NOT STATED" with where ours comes from (also listed in docs/models/espvr.md).
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": dict(
            text_encoder="bert-base-uncased", encoder_lr=1e-4, head_lr=1e-4, crf_lr=1e-4, dropout=0.4,
            span_loss_weight=0.08, batch_size=32, max_length=128, num_heads=8, num_text_layers=4, cross_width=512,
            vrp_training_spans="predicted", straight_through=False, global_token=False,  # sec. 3.3 as written
            cross_heads=8,  # NOT STATED: the text layers' 8 heads
            alpha=4,  # NOT STATED: the paper gives only the range 1..11; 4 is our pick
            warmup_ratio=0.1,  # NOT STATED: the trainer's default
            weight_decay=0.01,  # NOT STATED: the trainer's default
            epochs=30,  # NOT STATED: ours
            patience=0,  # the full schedule, best dev epoch (as the other papers)
        ),
    }
    PRESETS["w/o IC"] = {**PRESETS["paper"], "use_captions": False}
    PRESETS["w/o ESPVR"] = {**PRESETS["paper"], "use_espvr": False}
    PRESETS["w/o IC + ESPVR"] = {**PRESETS["paper"], "use_captions": False, "use_espvr": False}
    for _alpha in range(1, 12):
        PRESETS[f"alpha={_alpha}"] = {**PRESETS["paper"], "alpha": _alpha}
    del _alpha
    # tiny test variant: what tests and smoke runs override (timm-style, beside the real settings)
    TINY_OVERRIDES: ClassVar[dict] = {"cross_width": 32, "cross_heads": 2}

    @staticmethod
    def required_features(config: ESPVRConfig) -> list[str]:
        paths = [f"encoders/{config.swin_group}/grid"] if config.use_espvr else []
        return paths + ([CAPTIONS] if config.use_captions else [])

    @staticmethod
    def second_segment(config: ESPVRConfig) -> str | None:
        """The per-image text the collator appends as BERT's second segment (CONTRACT-10)."""
        return CAPTIONS if config.use_captions else None

    def __init__(self, config: ESPVRConfig, *, labels: list[str], text_encoder: str, tokenizer=None, features=None):
        super().__init__()
        if config.vrp_training_spans not in SPAN_MODES:
            raise ValueError(
                f"espvr: vrp_training_spans={config.vrp_training_spans!r}; valid values: {', '.join(SPAN_MODES)}"
            )
        paths = self.required_features(config)
        if paths and features is None:
            raise ValueError(f"espvr reads {', '.join(paths)} from the feature cache: pass --features <cache.h5>")
        self.config = config
        self.labels = list(labels)
        self.text_encoder = load_encoder(text_encoder)
        width = self.text_encoder.config.hidden_size  # d
        if width % config.num_heads:
            raise ValueError(f"espvr: text width {width} is not divisible by num_heads={config.num_heads}")
        self.uses_token_types = getattr(self.text_encoder.config, "type_vocab_size", 1) > 1
        # the collator normally builds the pair; a batch built without it (tests, other callers) is paired here
        if config.use_captions and tokenizer is not None:
            limit = min(self.text_encoder.config.max_position_embeddings, tokenizer.model_max_length)
            self.pairing = SecondSegment(tokenizer, path=CAPTIONS, max_length=limit)
        else:
            self.pairing = None
        layer = nn.TransformerEncoderLayer(width, config.num_heads, 4 * width, config.dropout, activation="gelu",
                                           batch_first=True)
        self.text_layers = nn.TransformerEncoder(layer, config.num_text_layers, enable_nested_tensor=False)  # T
        self.dropout = nn.Dropout(config.dropout)

        if config.use_espvr:
            self.grid_path = f"encoders/{config.swin_group}/grid"
            grid_h, grid_w, region_width = features.shapes[self.grid_path]
            if grid_h != grid_w or not 1 <= config.alpha <= grid_h - 1:
                raise ValueError(f"espvr: alpha={config.alpha} needs a square grid with alpha in 1..side-1; "
                                 f"{self.grid_path} is {grid_h}x{grid_w}")
            self.span_emissions = nn.Linear(width, len(SPAN_LABELS))  # ESI
            self.span_crf = BIOConstrainedCRF(SPAN_LABELS)
            self.span_of_label = torch.tensor(
                [0 if label == "O" else 1 if label.startswith("B-") else 2 for label in self.labels]
            )
            self.vrp = VisualRegionPositioning(width, region_width, config.cross_width, config.alpha,
                                               straight_through=config.straight_through)
            self.text_in = nn.Linear(width, config.cross_width)
            self.region_in = nn.Linear(region_width, config.cross_width)
            cross = dict(width=config.cross_width, heads=config.cross_heads, dropout=config.dropout)
            self.visual_over_text = CrossModalLayer(**cross)  # P: v attends T
            self.text_over_visual = CrossModalLayer(**cross)  # A: T attends P (image-aware words)
            self.text_over_regions = CrossModalLayer(**cross)  # Q: T attends v (word-aware visual)
            self.gate_a = nn.Linear(config.cross_width, config.cross_width, bias=False)  # W_a
            self.gate_q = nn.Linear(config.cross_width, config.cross_width, bias=False)  # W_q
            emission_in = 2 * config.cross_width  # H = [A ; g . Q], eq. 8
            for module in (self.span_emissions, self.text_in, self.region_in, self.gate_a, self.gate_q):
                init_linear(module)
        else:
            emission_in = width
        self.emissions = nn.Linear(emission_in, len(self.labels))
        self.crf = BIOConstrainedCRF(self.labels)
        init_linear(self.emissions)

    def text_states(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT over the pair (sec. 3.2), then the self-attention layers over the post's own pieces: T (B, L, d)."""
        if self.config.use_captions and "token_type_ids" not in batch:
            if self.pairing is None:
                raise ValueError("espvr with captions needs the caption segment: build batches with the trainer's "
                                 "collator (second_segment) or pass the tokenizer")
            batch = self.pairing.apply(batch)
        token_types = batch.get("token_type_ids")
        attention = batch["attention_mask"].bool()  # (B, L)
        encoded = self.text_encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            token_type_ids=token_types if self.uses_token_types else None,
        ).last_hidden_state  # C (B, L, d)
        text_mask = attention & (token_types == 0) if token_types is not None else attention  # the post's pieces
        states = self.text_layers(encoded, src_key_padding_mask=~text_mask)  # T (B, L, d)
        return states * text_mask[..., None], text_mask

    def region_features(self, visual: dict, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = visual[self.grid_path]  # (B, G, G, D)
        ok = visual.get(IMAGE_OK, torch.ones(batch_size, dtype=torch.bool, device=grid.device)).bool()  # (B,)
        regions = grid.flatten(1, 2)  # b_1..b_144 (B, G*G, D)
        return regions, regions.mean(dim=1), ok  # b_0 = Swin's pooled feature (B, D)

    def fused_states(self, batch: dict, span_tags: list[list[int]]) -> torch.Tensor:
        """VRP + eq. 3-8 given each post's type-less span tags over its kept words. (B, L, 2w)"""
        text, text_mask = batch["_text"], batch["_text_mask"]
        words = batch["_words"]  # (B, W, d) first-piece states of the words
        membership, span_mask = span_membership(span_tags, words.size(1))
        membership = membership.to(words)
        entities = membership @ words / membership.sum(-1, keepdim=True).clamp(min=1.0)  # e_i (B, M, d)
        regions, global_feature, ok = self.region_features(batch["visual"], text.size(0))
        block, _ = self.vrp(entities, span_mask.to(words.device), regions)  # v (B, a*a, D)
        # a post without a span (or without an image) has no block: its words attend to no visual token
        visual_mask = (span_mask.any(1).to(ok.device) & ok)[:, None].expand(-1, block.size(1))  # (B, a*a)
        if self.config.global_token:  # ours: b_0 as an always-present token (posts without a block see only it)
            block = torch.cat([global_feature[:, None], block], dim=1)  # (B, 1+a*a, D)
            visual_mask = torch.cat([torch.ones_like(visual_mask[:, :1]), visual_mask], dim=1)  # (B, 1+a*a)
        visual = self.region_in(block)  # v in the cross-modal width (B, [1+]a*a, w)
        text_cross = self.text_in(text)  # T in the cross-modal width (B, L, w)
        attended_visual = self.visual_over_text(visual, text_cross, text_mask)  # P, eq. 3-6
        image_aware = self.text_over_visual(text_cross, attended_visual, visual_mask)  # A
        word_aware = self.text_over_regions(text_cross, visual, visual_mask)  # Q
        gate = torch.sigmoid(self.gate_a(image_aware) + self.gate_q(word_aware))  # g, eq. 7
        return torch.cat([image_aware, gate * word_aware], dim=-1)  # H, eq. 8

    def encode(self, batch: dict) -> dict:
        text, text_mask = self.text_states(batch)
        out = {**batch, "_text": text, "_text_mask": text_mask,
               "_words": gather_first_pieces(text, batch["word_index"])}
        return out

    def span_outputs(self, encoded: dict, labels: torch.Tensor | None):
        """ESI emissions, the gold span tags (when labels are known) and the span tags VRP reads: the
        ESI's Viterbi spans (paper), or the gold ones while training with ``vrp_training_spans="gold"``.
        Outside training the labels are never read for VRP."""
        span_emissions = self.span_emissions(self.dropout(encoded["_words"]))  # (B, W, 3)
        word_mask = encoded["word_mask"].bool()
        span_gold = self.span_of_label.to(word_mask.device)[labels] if labels is not None else None  # (B, W)
        host_mask = word_mask.cpu()  # (B, W) one copy to the host, not one per row
        if span_gold is not None and self.training and self.config.vrp_training_spans == "gold":
            tags = [row[mask].tolist() for row, mask in zip(span_gold.cpu(), host_mask)]
        else:
            with torch.no_grad():
                _, paths = crf_loss_and_decode(self.span_crf, span_emissions, word_mask, decode=True)
            tags = paths
        # kept words are packed left in the CRF paths; map back to word positions
        num_words = word_mask.size(1)
        full = []
        for row_tags, mask in zip(tags, host_mask):
            positions = mask.nonzero().flatten().tolist()
            row = [0] * num_words
            for position, tag in zip(positions, row_tags):
                row[position] = int(tag)
            full.append(row)
        return span_emissions, span_gold, full

    def word_emissions(self, encoded: dict, span_tags: list[list[int]] | None) -> torch.Tensor:
        states = self.fused_states(encoded, span_tags) if self.config.use_espvr else encoded["_text"]  # (B, L, .)
        words = gather_first_pieces(states, encoded["word_index"])  # (B, W, .)
        return self.emissions(self.dropout(words))  # (B, W, num_labels)

    def forward(self, batch: dict) -> dict:
        encoded = self.encode(batch)
        labels = batch.get("labels")
        word_mask = batch["word_mask"].bool()
        span_loss = span_tags = None
        if self.config.use_espvr:
            span_emissions, span_gold, span_tags = self.span_outputs(encoded, labels)
            if span_gold is not None:
                span_loss, _ = crf_loss_and_decode(self.span_crf, span_emissions, word_mask, span_gold)
        emissions = self.word_emissions(encoded, span_tags)
        loss, _ = crf_loss_and_decode(self.crf, emissions, word_mask, labels)
        out = {"emissions": emissions}
        if loss is not None:
            out["loss_mner"] = loss.detach()
            if span_loss is not None:
                out["loss_esi"] = span_loss.detach()
                loss = loss + self.config.span_loss_weight * span_loss  # eq. 10
            out["loss"] = loss
        return out

    def parameter_groups(self, train_config) -> list[dict]:
        return default_parameter_groups(self, train_config)  # encoder / head / CRF rates

    @torch.no_grad()
    def decode(self, batch: dict) -> list[list[int]]:
        encoded = self.encode(batch)
        span_tags = self.span_outputs(encoded, None)[2] if self.config.use_espvr else None
        emissions = self.word_emissions(encoded, span_tags)
        _, paths = crf_loss_and_decode(self.crf, emissions, batch["word_mask"].bool(), decode=True)
        return paths
