"""P-MNER (Wang et al., CCL 2023), one file, top to bottom as the paper's section 3.

Sec. 3.1, text: BERT states R, then self-attention (eq. 2) -> T.
Sec. 3.2, FRR visual features: Faster R-CNN objects with score > 0.95, top 5, each crop through
ResNet-152 (cached ``encoders/resnet152/crop_pooled`` (K, 2048)), projected to the text width,
then visual self-attention (eq. 3) -> V (m rows). Without FRR ("T+V" rows) the m regions are the
cached 7x7 ResNet-152 grid of the whole image (``encoders/resnet152/grid``).
Sec. 3.3, TCFM: visual queries over text (eq. 4-5) + LN/FFN (eq. 6-7) -> P (m rows, "text
features based on visual objects"); "similar to the description above", text queries over V -> q
and re-fusion, text queries over P -> C, each through the same eq. 4-7 block; ``H = T + V + C`` (eq. 8).
Sec. 3.1 + 3.4, prompt learning: each word w is wrapped as "<sentence>, the word of <w> is <mask>."
(template mode, the paper's reading), encoded and fused; the encoder's MLM head at <mask> and a
verbalizer turn vocabulary scores into BIO tag scores (eq. 9-10); cross-entropy over tags (eq. 11)
and argmax, or the same scores through a BIO CRF (``decoder``).

How we read the places the paper leaves open (see docs/models/pmner.md):

- eq. 8 adds V (m rows) to T (n rows). We take the "cross-modal visual features" to be q, the
  text-query attention over V, which has one row per text piece: ``H = T + q + C``.
- the cached 2048-d vectors are standardised per channel before the projection, with the mean and
  variance of the training regions (``RegionStandardizer``: exact running statistics over real
  regions only, used in training and eval alike, unlike BatchNorm's per-batch statistics).
  The paper projects ResNet outputs directly; cached vectors of different images share a large
  common component (random-init ResNet-152 once saturated fp16 in ~98% of its channels), and neither
  the raw vectors nor a per-row LayerNorm let the fusion see what tells images apart.
- eq. 2/3 write the attention output alone; we keep a residual + LayerNorm around both
  self-attentions (as TCFM's eq. 6 does), so T starts as the encoder's R.
- The template's <entity> is read as every word of the sentence in turn (one wrapped input per
  word, template <= 20 pieces, input <= 256 pieces as sec. 4.1 states). ``prompt_mode="word"`` is a
  cheaper variant (the default): one pass per post, the MLM head on each word's fused state h_i,
  as if that position were the <mask>.
- Verbalizer: O -> "none"; B-X -> mean of the scores of "begin" and X's word; I-X -> "inside" and
  X's word (PER "person", LOC "location", ORG "organization", MISC "other"; other types their
  lower-cased name). A word the vocabulary splits is the mean of its pieces; a word with an
  unknown piece falls back to a learned label embedding (with a warning).
- Posts without visual features (missing image, zero objects): the attention terms of q and C are
  zeroed and the rest of their blocks runs on T, so H does not depend on padded slots.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mner.pipeline.tags import repair_bio
from mner.trainer.inputs.text_encoder import load_encoder, load_pretrained, load_tokenizer
from mner.trainer.models import default_parameter_groups, register_model
from mner.trainer.models.layers import (
    BIOConstrainedCRF,
    crf_loss_and_decode,
    gather_first_pieces,
    init_linear,
    record_decoding,
)
from mner.trainer.models.stage1 import Stage1Setting

OBJECT_MASK = "objects/mask"
IMAGE_OK = "images/ok"

# Verbalizer label words (sec. 3.4): one word per tag part, averaged.
OUTSIDE_WORDS = ("none",)
BEGIN_WORD, INSIDE_WORD = "begin", "inside"
TYPE_WORDS = {"PER": "person", "LOC": "location", "ORG": "organization", "MISC": "other"}


@dataclass
class PMNERConfig:
    use_frr: bool = True  # FRR object features (crop_pooled of the top-5 objects); False = whole-image ResNet grid
    use_tcfm: bool = True  # text correction fusion module (eq. 4-8); False = concatenate [t_i; mean(V)] ("T+V")
    use_prompt: bool = True  # MLM head + verbalizer (eq. 9-11); False = linear emissions per word
    # template (sec. 3.1/3.4: one wrapped input per word, MLM at <mask>) | word (MLM head on each word's h_i)
    prompt_mode: str = "word"
    # crf (tag scores as BIO-CRF emissions) | argmax (eq. 11: cross-entropy per word, BIO-repaired argmax)
    decoder: str = "crf"
    template_max_length: int = 20  # pieces of ", the word of <entity> is <mask> ." (sec. 4.1: 20)
    encoded_max_length: int = 256  # pieces of one wrapped input, [CLS] and [SEP] included (sec. 4.1: 256)
    template_chunk: int = 64  # wrapped inputs per encoder pass in template mode (memory bound, no effect on results)
    max_objects: int = 5  # m: objects per image (sec. 4.1: first five with score > 0.95, selected in stage 1)
    num_heads: int = 12  # heads of every cross-modal / self-attention (sec. 4.1: 12)
    ffn_mult: int = 4  # FFN inner width of eq. 7 = ffn_mult * text width
    dropout: float = 0.1  # dropout in the attentions, the FFN and on the word states
    resnet_group: str = "resnet152"  # cache group encoders/<resnet_group> holding crop_pooled and grid


def visual_path(config: PMNERConfig) -> str:
    """FRR reads the objects' pooled vectors (K, 2048); without FRR, the whole image's 7x7 grid."""
    return f"encoders/{config.resnet_group}/{'crop_pooled' if config.use_frr else 'grid'}"


PROMPT_MODES = ("template", "word")
DECODERS = ("crf", "argmax")
TEMPLATE_PREFIX, TEMPLATE_SUFFIX = ", the word of", "is"  # "<sentence>, the word of <entity> is <mask>."


class FusionBlock(nn.Module):
    """Eq. 4-7: multi-head cross-modal attention, then LN(x + att) and LN(x + FFN(x)).

    Used for P (visual queries over the text) and, "similar to the description above", for q (text
    queries over V) and C (text queries over P). ``keep`` (B, 1, 1) zeroes the attention term of
    posts with no visual features, so their rows go through the same residual / LN / FFN path
    (same scale in H) without reading the padded slots.
    """

    def __init__(self, width: int, *, num_heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(width)  # eq. 6
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * width, width)
        )
        self.ffn_norm = nn.LayerNorm(width)  # eq. 7
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, key_pad: torch.Tensor, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        # queries: (B, Nq, H); keys: (B, Nk, H); key_pad: (B, Nk) True = padding
        attended, _ = self.attention(queries, keys, keys, key_padding_mask=key_pad, need_weights=False)  # (B, Nq, H)
        if keep is not None:
            attended = attended * keep  # (B, Nq, H)
        fused = self.attention_norm(queries + self.dropout(attended))  # eq. 6 (B, Nq, H)
        return self.ffn_norm(fused + self.dropout(self.ffn(fused)))  # eq. 7 (B, Nq, H)


@register_model("pmner")
class PMNER(nn.Module):
    Config = PMNERConfig

    # Sec. 4.1: BERT, max length 128, batch 8, "learning attenuation rate" 0.01 (read here as weight
    # decay); the model with the best dev F1 is reported, so the paper rows train every epoch
    # (patience 0) and keep the best dev checkpoint. Sec. 3.4's loss is cross-entropy per word (eq. 11)
    # with no CRF, so the paper rows decode by argmax; the rows without prompt learning put linear
    # emissions where the verbalizer was and keep the same loss and decoding, so "OURS" and
    # "T+FRR+TCFM" differ only in the prompt-learning module, as Table 3 says.
    # The printed lr 0.005 diverges when fine-tuning a BERT encoder (docs/models/pmner.md records the
    # run); it is kept behind its own name ("full lr 0.005"); the paper rows use 5e-5 / 1e-3.
    _PAPER_TRAINING: ClassVar[dict] = {
        "text_encoder": "bert-base-cased",
        "encoder_lr": 5e-5,
        "head_lr": 1e-3,
        "weight_decay": 0.01,
        "batch_size": 8,
        "max_length": 128,
        "patience": 0,
        "prompt_mode": "template",
        "decoder": "argmax",
    }
    PRESETS: ClassVar[dict[str, dict]] = {
        "full": {**_PAPER_TRAINING},  # OURS 79.43 / 91.31
        "paper": {**_PAPER_TRAINING},  # alias of "full"
        "full lr 0.005": {**_PAPER_TRAINING, "encoder_lr": 5e-3, "head_lr": 5e-3},  # sec. 4.1's printed rate
        "T+V": {**_PAPER_TRAINING, "use_frr": False, "use_tcfm": False, "use_prompt": False},  # 72.31 / 84.33
        "T+V+TCFM": {**_PAPER_TRAINING, "use_frr": False, "use_prompt": False},  # 73.35 / 85.41
        "T+FRR+TCFM": {**_PAPER_TRAINING, "use_prompt": False},  # 75.14 / 86.02
    }

    @staticmethod
    def required_features(config: PMNERConfig) -> list[str]:
        return [visual_path(config)]

    @staticmethod
    def stage1_settings(config: PMNERConfig) -> list[Stage1Setting]:
        """Sec. 3.2 / 4.1: Faster R-CNN objects with score > 0.95, the first five, ResNet-152 features."""
        resnet = Stage1Setting(f"encoders/{config.resnet_group}", "model", "torchvision/resnet152",
                               "--encoder resnet152", "P-MNER sec. 3.2: pre-trained 152-layer ResNet")
        if not config.use_frr:
            return [resnet]
        return [
            Stage1Setting("objects", "detector", "fasterrcnn", "--detector fasterrcnn",
                          "P-MNER sec. 3.2: Faster R-CNN"),
            Stage1Setting("objects", "thresholds.score_threshold", 0.95, "--score-threshold 0.95",
                          "P-MNER sec. 4.1: objects with a probability above 0.95", match="at_least"),
            Stage1Setting("objects", "thresholds.top_k", config.max_objects, f"--top-k {config.max_objects}",
                          "P-MNER sec. 4.1: the first five objects", match="at_least"),
            resnet,
        ]

    def __init__(
        self, config: PMNERConfig, *, labels: list[str], text_encoder: str, tokenizer=None, features=None
    ):
        super().__init__()
        if features is None:
            raise ValueError("pmner reads cached ResNet-152 features: pass --features <cache.h5>")
        if config.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"pmner: prompt_mode={config.prompt_mode!r}; valid values: {', '.join(PROMPT_MODES)}")
        if config.decoder not in DECODERS:
            raise ValueError(f"pmner: decoder={config.decoder!r}; valid values: {', '.join(DECODERS)}")
        self.config = config
        self.labels = list(labels)
        self.visual_path = visual_path(config)

        # -- sec. 3.1 text encoder (with its MLM head when prompt learning needs it)
        mlm_head = decoder = None
        if config.use_prompt:
            self.text_encoder, mlm_head, decoder = _load_encoder_with_mlm_head(text_encoder)
        else:
            self.text_encoder = load_encoder(text_encoder)
        hidden = self.text_encoder.config.hidden_size
        heads = _heads_for(hidden, config.num_heads)
        self.text_attention = nn.MultiheadAttention(hidden, heads, dropout=config.dropout, batch_first=True)
        self.text_norm = nn.LayerNorm(hidden)

        # -- sec. 3.2 visual features: project the cached ResNet-152 vectors, then self-attention
        visual_width = int(features.shapes[self.visual_path][-1])  # 2048 for ResNet-152
        # per-channel standardisation of the cached vectors over the dataset's real regions (see docstring)
        self.region_norm = RegionStandardizer(visual_width)
        self.visual_projection = nn.Linear(visual_width, hidden)
        self.visual_attention = nn.MultiheadAttention(hidden, heads, dropout=config.dropout, batch_first=True)
        self.visual_norm = nn.LayerNorm(hidden)

        # -- sec. 3.3 TCFM (or the T+V concatenation baseline)
        if config.use_tcfm:
            block = dict(num_heads=heads, ffn_mult=config.ffn_mult, dropout=config.dropout)
            self.visual_to_text = FusionBlock(hidden, **block)  # P (eq. 4-7)
            self.text_to_visual = FusionBlock(hidden, **block)  # q
            self.refusion = FusionBlock(hidden, **block)  # C
        else:
            self.concat_projection = nn.Linear(2 * hidden, hidden)
        self.dropout = nn.Dropout(config.dropout)

        # -- sec. 3.4 prompt learning (or linear emissions in the rows without it)
        if tokenizer is None:
            tokenizer = load_tokenizer(text_encoder)
        if config.use_prompt:
            self.mlm_head = mlm_head if mlm_head is not None else nn.Identity()
            self.verbalizer = Verbalizer(self.labels, tokenizer, self.text_encoder, decoder, hidden)
            if config.prompt_mode == "template":
                self.template = PromptTemplate(tokenizer, config.template_max_length, config.encoded_max_length)
        else:
            self.emissions = nn.Linear(hidden, len(self.labels))
        if config.decoder == "crf":
            self.crf = BIOConstrainedCRF(self.labels)
        for module in self.children():
            if module is not self.text_encoder and module is not getattr(self, "mlm_head", None):
                init_linear(module)

    # -- sec. 3.2 ---------------------------------------------------------------------------------

    def visual_regions(self, visual: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached vectors -> (B, m, 2048) standardised per channel and their mask (B, m): FRR objects or
        the 7x7 grid. Once per batch (template mode fuses in chunks whose count differs per process)."""
        features = visual[self.visual_path].float()
        if self.config.use_frr:
            features = features[:, : self.config.max_objects]  # (B, m, 2048)
            mask = visual[OBJECT_MASK][:, : self.config.max_objects].bool()  # (B, m)
        else:
            features = features.flatten(1, -2)  # (B, 7 * 7, 2048)
            ok = visual.get(IMAGE_OK, torch.ones(features.size(0), dtype=torch.bool, device=features.device))
            mask = ok.bool()[:, None].expand(-1, features.size(1))  # (B, 49)
        return self.region_norm(features, mask), mask  # (B, m, 2048) standardised, (B, m)

    # -- sec. 3.1 - 3.3 ---------------------------------------------------------------------------

    def fused_states(self, batch: dict) -> torch.Tensor:
        """H of eq. 8 at every text piece. (B, L, H)"""
        regions, region_mask = self.visual_regions(batch["visual"])  # (B, m, 2048) standardised, (B, m)
        return self.fuse(batch["input_ids"], batch["attention_mask"], regions, region_mask)

    def fuse(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor
    ) -> torch.Tensor:
        """Sec. 3.1-3.3 on one batch of (possibly wrapped) inputs and their posts' standardised regions. (B, L, H)"""
        text_pad = ~attention_mask.bool()  # (B, L)
        encoded = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        states = encoded.last_hidden_state  # R (B, L, H)
        attended, _ = self.text_attention(
            states, states, states, key_padding_mask=text_pad, need_weights=False
        )
        text = self.text_norm(states + self.dropout(attended))  # T (B, L, H), eq. 2

        has_visual = region_mask.any(dim=1)  # (B,)
        region_pad = ~region_mask
        region_pad[~has_visual, 0] = (
            False  # a post without regions attends to one zero slot (its attention term is zeroed below)
        )
        projected = self.dropout(self.visual_projection(regions))  # (B, m, H)
        attended, _ = self.visual_attention(
            projected, projected, projected, key_padding_mask=region_pad, need_weights=False
        )
        visual = self.visual_norm(projected + self.dropout(attended))  # V (B, m, H), eq. 3
        keep = has_visual[:, None, None].to(text.dtype)  # (B, 1, 1) posts without visual features

        if not self.config.use_tcfm:  # "T+V": splice text with the pooled image
            weights = (~region_pad).to(visual.dtype)[:, :, None]  # (B, m, 1)
            pooled = (visual * weights).sum(1) / weights.sum(1)  # (B, H)
            pooled = (pooled[:, None] * keep).expand_as(text)  # (B, L, H)
            return self.concat_projection(torch.cat([text, pooled], dim=-1))  # (B, L, H)

        fused = self.visual_to_text(visual, text, text_pad)  # P (B, m, H), eq. 4-7
        text_visual = self.text_to_visual(text, visual, region_pad, keep)  # q (B, L, H)
        corrected = self.refusion(text, fused, region_pad, keep)  # C (B, L, H)
        return text + text_visual + corrected  # H = T + q + C (B, L, H), eq. 8

    # -- sec. 3.4 ---------------------------------------------------------------------------------

    def tag_scores(self, batch: dict) -> torch.Tensor:
        """Per-word tag scores: verbalizer(MLM(h)) (eq. 9-10) or linear emissions. (B, W, T)"""
        if self.config.use_prompt and self.config.prompt_mode == "template":
            return self.template_tag_scores(batch)
        words = self.dropout(gather_first_pieces(self.fused_states(batch), batch["word_index"]))  # (B, W, H)
        if self.config.use_prompt:
            return self.verbalizer(self.mlm_head(words), self.text_encoder)  # (B, W, T)
        return self.emissions(words)  # (B, W, T)

    def template_tag_scores(self, batch: dict) -> torch.Tensor:
        """Paper mode: each kept word wrapped as "<sentence>, the word of <word> is <mask>.", fused
        with its post's regions, and tagged from the MLM distribution at <mask>. (B, W, T)"""
        word_mask = batch["word_mask"].bool()  # (B, W)
        # standardised once per post, before the per-word copies: each region enters the running
        # statistics once, not once per word of its post
        regions, region_mask = self.visual_regions(batch["visual"])  # (B, m, 2048), (B, m)
        wrapped = self.template.wrap(batch)  # post index, word index, ids, mask position per kept word
        scores = regions.new_zeros(*word_mask.shape, len(self.labels))  # (B, W, T)
        for start in range(0, len(wrapped.posts), self.config.template_chunk):
            part = slice(start, start + self.config.template_chunk)
            posts = wrapped.posts[part].to(regions.device)  # (N,)
            input_ids = wrapped.input_ids[part].to(regions.device)  # (N, S)
            attention_mask = wrapped.attention_mask[part].to(regions.device)  # (N, S)
            states = self.fuse(input_ids, attention_mask, regions[posts], region_mask[posts])  # (N, S, H)
            rows = torch.arange(len(posts), device=states.device)  # (N,)
            at_mask = states[rows, wrapped.mask_at[part].to(states.device)]  # (N, H)
            tag_scores = self.verbalizer(self.mlm_head(self.dropout(at_mask)), self.text_encoder)  # (N, T)
            scores = scores.index_put((posts, wrapped.words[part].to(regions.device)), tag_scores)
        return scores

    def forward(self, batch: dict) -> dict:
        scores = self.tag_scores(batch)  # (B, W, T)
        out = {"emissions": scores}
        labels = batch.get("labels")
        if labels is None:
            return out
        word_mask = batch["word_mask"].bool()  # (B, W)
        if self.config.decoder == "crf":
            out["loss"], _ = crf_loss_and_decode(self.crf, scores, word_mask, labels)
        elif word_mask.any():
            out["loss"] = F.cross_entropy(scores[word_mask], labels[word_mask])  # eq. 11
        else:
            out["loss"] = scores.sum() * 0.0
        return out

    def parameter_groups(self, train_config) -> list[dict]:
        return default_parameter_groups(self, train_config)  # encoder / head / CRF rates

    @torch.no_grad()
    def decode(self, batch: dict) -> list[list[int]]:
        scores = self.tag_scores(batch)  # (B, W, T)
        word_mask = batch["word_mask"].bool()
        if self.config.decoder == "crf":
            return crf_loss_and_decode(self.crf, scores, word_mask, decode=True)[1]
        record_decoding("softmax", scores=scores.detach(), word_mask=word_mask)
        best, word_mask = scores.argmax(dim=-1).cpu(), word_mask.cpu()  # (B, W): one copy to the host
        return [repair_bio_ids(row[keep].tolist(), self.labels) for row, keep in zip(best, word_mask)]


@dataclass
class WrappedWords:
    posts: torch.Tensor  # (N,) post of each wrapped input
    words: torch.Tensor  # (N,) word (column of word_index) it tags
    input_ids: torch.Tensor  # (N, S) "[CLS] <sentence>, the word of <word> is [MASK] . [SEP]", padded
    attention_mask: torch.Tensor  # (N, S) 1 on real pieces
    mask_at: torch.Tensor  # (N,) position of [MASK]


class PromptTemplate:
    """Sec. 3.1's wrapper: "<sentence>, the word of <entity> is <mask>." for every kept word.

    The template part (from "," to ".") is at most ``template_max_length`` pieces (the entity's
    pieces are cut to fit); the whole input at most ``encoded_max_length`` (the sentence is cut).
    """

    def __init__(self, tokenizer, template_max_length: int, encoded_max_length: int):
        def ids(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        if tokenizer.mask_token_id is None:
            raise ValueError("pmner prompt_mode=template needs a tokenizer with a mask token")
        self.prefix, self.suffix = ids(TEMPLATE_PREFIX), ids(TEMPLATE_SUFFIX)
        self.mask_id, self.end = tokenizer.mask_token_id, ids(".")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        fixed = len(self.prefix) + len(self.suffix) + 1 + len(self.end)
        if template_max_length <= fixed:
            raise ValueError(f"template_max_length must exceed the template's {fixed} fixed pieces")
        self.entity_room = template_max_length - fixed
        self.sentence_room = encoded_max_length - template_max_length - 2  # [CLS] ... [SEP]

    def wrap(self, batch: dict) -> WrappedWords:
        # the collator's host copies (batch["host"]) when present: no device-to-host copy per forward
        host = batch.get("host") or {key: batch[key].cpu() for key in ("input_ids", "attention_mask", "word_index",
                                                                         "word_mask")}
        input_ids = host["input_ids"]  # (B, L) [CLS] pieces [SEP] pad
        lengths = host["attention_mask"].sum(dim=1).tolist()  # (B,)
        word_index, word_mask = host["word_index"], host["word_mask"].bool()  # (B, W)
        posts, words, rows, mask_at = [], [], [], []
        for b, length in enumerate(lengths):
            ids = input_ids[b, :length].tolist()
            cls_id, sep_id, sentence = ids[0], ids[-1], ids[1:-1]
            kept = word_mask[b].nonzero().flatten().tolist()
            firsts = [int(word_index[b, w]) for w in kept]
            for w, first, following in zip(kept, firsts, [*firsts[1:], length - 1]):
                entity = ids[first:following][: self.entity_room]
                template = self.prefix + entity + self.suffix + [self.mask_id] + self.end
                row = [cls_id, *sentence[: self.sentence_room], *template, sep_id]
                posts.append(b)
                words.append(w)
                mask_at.append(len(row) - 2 - len(self.end))
                rows.append(row)
        width = max((len(r) for r in rows), default=1)
        padded = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (N, S)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, S)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        return WrappedWords(torch.tensor(posts, dtype=torch.long), torch.tensor(words, dtype=torch.long),
                            padded, attention_mask, torch.tensor(mask_at, dtype=torch.long))


class RegionStandardizer(nn.Module):
    """Per-channel standardisation of cached CNN vectors with the training regions' statistics.

    Cached ResNet vectors of different images share a large common component (random-init
    ResNet-152 once saturated fp16 in most channels) that a per-row LayerNorm keeps: images then
    differ by a fraction of a percent and the fusion cannot see them. Subtracting each channel's
    mean and dividing by its spread keeps only what tells images apart. The inputs are fixed
    cached features, so the statistics are the exact running mean / variance over every training
    region seen so far, and training normalises with them too: unlike BatchNorm's per-batch
    statistics, an image's standardised vector then does not depend on which posts share its
    batch. Padded slots and posts without an image are left out and stay zero.
    """

    def __init__(self, width: int, *, eps: float = 1e-5):
        super().__init__()
        self.eps = eps  # variance floor, relative to the mean channel variance
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(width, dtype=torch.float64))  # (C,)
        self.register_buffer("var", torch.zeros(width, dtype=torch.float64))  # (C,)

    @torch.no_grad()
    def update(self, real: torch.Tensor) -> None:
        """Merge a batch of rows (n, C) into the running statistics (Chan et al.'s pairwise update).

        Under data parallelism every process merges every process's rows, in rank order, so the
        statistics stay identical across processes (DDP only broadcasts process 0's buffers before
        each forward: each process would otherwise keep its own last update, evaluate with it, and
        disagree on dev F1 and on when to stop). Every process calls this on every training forward,
        with or without real rows, so the collective calls line up."""
        rows = real.double()  # (n, C)
        n = torch.full((1,), rows.size(0), dtype=torch.float64, device=rows.device)  # (1,)
        if rows.size(0):
            moments = torch.cat([n, rows.mean(0), rows.var(0, unbiased=False)])  # (1 + 2C,)
        else:
            moments = torch.zeros(1 + 2 * self.mean.numel(), dtype=torch.float64, device=rows.device)
        for part in _gather_from_every_process(moments):  # rank order: same arithmetic everywhere
            self._merge(part[0], part[1 : 1 + self.mean.numel()], part[1 + self.mean.numel() :])

    def _merge(self, n: torch.Tensor, batch_mean: torch.Tensor, batch_var: torch.Tensor) -> None:
        # n: () rows in the part (0: nothing to merge); batch_mean, batch_var: (C,). No host sync.
        total = self.count + n  # ()
        share = torch.where(total > 0, n / total.clamp(min=1), torch.zeros_like(n))  # () weight of the new rows
        delta = batch_mean - self.mean  # (C,)
        self.var.copy_(self.var * (1 - share) + batch_var * share + delta.square() * share * (1 - share))
        self.mean.add_(delta * share)
        self.count.copy_(total)

    def forward(self, regions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # regions: (B, m, C); mask: (B, m) bool real regions
        real = regions[mask]  # (n, C)
        if self.training:
            self.update(real)
        floor = self.eps * self.var.mean() + 1e-12
        scale = (self.var + floor).rsqrt().to(real.dtype)  # (C,)
        standardised = (real - self.mean.to(real.dtype)) * scale  # (n, C)
        # an untrained model has no statistics yet: pass the vectors on (a where, not a host sync)
        standardised = torch.where(self.count > 0, standardised, real)  # (n, C)
        return torch.zeros_like(regions).masked_scatter(mask[..., None], standardised)  # (B, m, C)


def _gather_from_every_process(values: torch.Tensor) -> list[torch.Tensor]:
    """``values`` of every data-parallel process in rank order (just ``[values]`` in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [values]
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, values.contiguous())
    return parts


class Verbalizer(nn.Module):
    """Vocabulary scores -> tag scores: each tag is the mean MLM logit of its label words' pieces.

    Only the rows of the label-word pieces are scored: with tied embeddings (BERT) they are read
    from the encoder's word embeddings at run time (so they train with the encoder); otherwise the
    decoder rows are copied here. ``transformed`` is the MLM head's output before its decoder.
    """

    def __init__(
        self, labels: list[str], tokenizer, text_encoder: nn.Module, decoder: nn.Linear, hidden: int
    ):
        super().__init__()
        pieces: list[int] = []
        tag_words: list[list[list[int]] | None] = []
        fallback_tags: list[str] = []
        for tag in labels:
            words = _label_words(tag)
            word_pieces = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in words]
            if any(not ids or tokenizer.unk_token_id in ids for ids in word_pieces):
                fallback_tags.append(tag)
                tag_words.append(None)
                continue
            tag_words.append(word_pieces)
            pieces += [piece for ids in word_pieces for piece in ids if piece not in pieces]
        if fallback_tags:
            warnings.warn(
                f"pmner verbalizer: label words of {', '.join(fallback_tags)} are not in the tokenizer's "
                "vocabulary; those tags use a learned label embedding instead",
                stacklevel=3,
            )
        averaging = torch.zeros(len(labels), max(1, len(pieces)))  # (T, P)
        for t, word_pieces in enumerate(tag_words):
            for ids in word_pieces or []:
                for piece in ids:
                    averaging[t, pieces.index(piece)] += 1.0 / (len(word_pieces) * len(ids))
        self.register_buffer("piece_ids", torch.tensor(pieces or [0], dtype=torch.long), persistent=False)
        self.register_buffer("averaging", averaging, persistent=False)
        self.register_buffer(
            "is_fallback", torch.tensor([words is None for words in tag_words]), persistent=False
        )
        self.label_words = {tag: _label_words(tag) for tag in labels}

        input_embeddings = text_encoder.get_input_embeddings()
        self.tied = decoder is not None and decoder.weight is input_embeddings.weight
        if decoder is not None and not self.tied:
            self.piece_weight = nn.Parameter(decoder.weight.detach()[self.piece_ids].clone())  # (P, H)
        if decoder is not None and decoder.bias is not None:
            self.piece_bias = nn.Parameter(decoder.bias.detach()[self.piece_ids].clone())  # (P,)
        else:
            self.piece_bias = nn.Parameter(torch.zeros(len(self.piece_ids)))
        if fallback_tags or decoder is None:
            self.fallback = nn.Parameter(
                torch.randn(len(labels), hidden) * 0.02
            )  # (T, H) learned label embeddings

    def forward(self, transformed: torch.Tensor, text_encoder: nn.Module) -> torch.Tensor:
        # transformed: (B, W, H) MLM head output before the vocabulary projection
        if self.tied:
            weight = text_encoder.get_input_embeddings().weight[self.piece_ids]  # (P, H)
        else:
            weight = getattr(self, "piece_weight", None)
        if weight is None:  # no MLM decoder at all: every tag is a learned label embedding
            return transformed @ self.fallback.T  # (B, W, T)
        piece_logits = transformed @ weight.T + self.piece_bias  # (B, W, P), eq. 9 on the label-word columns
        scores = piece_logits @ self.averaging.T  # (B, W, T), eq. 10
        if hasattr(self, "fallback"):
            scores = torch.where(self.is_fallback, transformed @ self.fallback.T, scores)  # (B, W, T)
        return scores


def _label_words(tag: str) -> tuple[str, ...]:
    if tag == "O" or "-" not in tag:
        return OUTSIDE_WORDS
    prefix, _, kind = tag.partition("-")
    return (BEGIN_WORD if prefix == "B" else INSIDE_WORD, TYPE_WORDS.get(kind, kind.lower()))


def repair_bio_ids(path: list[int], labels: list[str]) -> list[int]:
    """Argmax tag ids -> valid BIO (:func:`mner.pipeline.tags.repair_bio`); an I-X stays when there is no B-X."""
    index = {label: i for i, label in enumerate(labels)}
    repaired, _ = repair_bio(labels[label_id] for label_id in path)
    return [index.get(tag, label_id) for tag, label_id in zip(repaired, path)]


def _load_encoder_with_mlm_head(name: str) -> tuple[nn.Module, nn.Module | None, nn.Linear | None]:
    """The encoder and its pretrained MLM head, the head's vocabulary decoder split off.

    The decoder (a vocab-size Linear, usually tied to the word embeddings) is replaced by Identity
    so the head returns its transformed states; the Verbalizer scores only the label-word rows.
    """
    from transformers import AutoModelForMaskedLM

    try:
        mlm = load_pretrained(AutoModelForMaskedLM, name)
    except (ValueError, KeyError, OSError) as err:
        warnings.warn(
            f"pmner: {name!r} has no masked-LM head ({err}); the verbalizer uses learned label embeddings",
            stacklevel=3,
        )
        return load_encoder(name), None, None
    encoder = mlm.base_model
    decoder = mlm.get_output_embeddings()
    head = next(module for child_name, module in mlm.named_children() if child_name != mlm.base_model_prefix)
    for parent in head.modules():
        for child_name, child in list(parent.named_children()):
            if child is decoder:
                setattr(parent, child_name, nn.Identity())
    for parent in head.modules():  # BERT keeps a second handle on the decoder bias; it is unused now
        if isinstance(parent.__dict__.get("_parameters", {}).get("bias"), nn.Parameter) and not isinstance(
            parent, (nn.Linear, nn.LayerNorm)
        ):
            parent.bias = None
    return encoder, head, decoder


def _heads_for(width: int, wanted: int) -> int:
    """``wanted`` heads, or the largest divisor of ``width`` below it (tiny test encoders)."""
    heads = max(h for h in range(1, wanted + 1) if width % h == 0)
    if heads != wanted:
        warnings.warn(f"pmner: width {width} is not divisible by {wanted} heads; using {heads}", stacklevel=3)
    return heads
