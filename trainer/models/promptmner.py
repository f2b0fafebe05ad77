"""PromptMNER (Wang et al., DASFAA 2022), one file, top to bottom as the paper's section 2.

Sec. 2.3, prompt-based visual clues: CLIP scores the image against entity-related prompts
``P_i = "an image of [w_i]"``, ``p(P_i|I) = softmax_i(logit_scale * cos(s_i, v))`` (eq. 1), and each
clue token is the weighted prompt embedding ``w_hat_i = p(P_i|I) * s_i``. Discrete prompt sets ran
once in ``mner-features`` (cached ``prompts/<set>/image_relevance`` (N, Q) and ``prompt_embed``
(Q, D)); continuous prompts are learned vectors here, scored against the cached CLIP image
embedding ``encoders/clip/image_embed`` with CLIP's logit scale.

Sec. 2.4, integration: ``[CLS] w_1..w_N [SEP] w_hat_1..w_hat_Q [SEP]`` with position and segment
embeddings + LayerNorm (eq. 2), then K layers of modality-aware self-attention (MAS, eq. 3-4): one
query projection per (query modality, key modality) pair, shared keys and values, one softmax over
all keys. The K layers are the pretrained encoder's own layers (K = 12 for roberta-base), each
query projection initialised from the layer's query weights.

Sec. 2.5, prediction: every span of up to ``max_span_width`` words gets ``MLP([h_i; h_j])`` ->
{entity types, not_entity} (eq. 5), cross-entropy over all spans (eq. 6); decoding keeps the
highest-scoring non-overlapping entity spans and writes them as BIO tags.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mner.pipeline.tags import extract_entities
from mner.trainer.inputs.text_encoder import load_encoder
from mner.trainer.models import default_parameter_groups, register_model
from mner.trainer.models.layers import gather_first_pieces, init_linear, record_decoding
from mner.trainer.models.stage1 import Stage1Setting

CLIP_IMAGE_EMBED = "encoders/clip/image_embed"
IMAGE_OK = "images/ok"
DISCRETE_PROMPT_SETS = {"task": "promptmner_task", "kb": "promptmner_kb", "expert": "promptmner_expert"}
PROMPT_CHOICES = (*DISCRETE_PROMPT_SETS, "continuous")
NOT_ENTITY = 0  # span class 0; entity types follow in label-list order


@dataclass
class PromptMNERConfig:
    prompts: str = "continuous"  # task | kb | expert (cached CLIP prompt sets) | continuous (learned prompts)
    num_continuous_prompts: int = (
        100  # learned prompt vectors when prompts="continuous" (paper: 30 / 50 / 100)
    )
    use_mas: bool = True  # modality-aware query projections (eq. 3); False = "w/o MAS", plain self-attention
    max_span_width: int = (
        8  # longest enumerated span in words (not stated in the paper; Twitter entities are short)
    )
    # dropout on the word states before the span MLP and inside it; the paper's 0.5 (sec. 3.1) is in its
    # presets; the default is the other models' 0.1 (0.5 learns ~3x slower in the first epochs: model doc)
    dropout: float = 0.1
    span_loss: str = "sum"  # sum: eq. 6, summed over a post's spans, averaged over posts | mean: over all spans
    clip_logit_scale: float | None = (
        None  # CLIP's 1/tau for continuous prompts; None = the cache's attr (else 100)
    )


# ----------------------------------------------------------------------------------------------
# Span enumeration and decoding (sec. 2.5)
# ----------------------------------------------------------------------------------------------


def enumerate_spans(num_words: int, max_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All (start, end) word spans with ``end - start < max_width``, ordered by start then width."""
    starts, ends = [], []
    for start in range(num_words):
        for end in range(start, min(num_words, start + max_width)):
            starts.append(start)
            ends.append(end)
    return torch.tensor(starts, dtype=torch.long), torch.tensor(ends, dtype=torch.long)


def decode_spans(
    probs: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, num_words: int, types: list[str]
) -> list[str]:
    """Greedy non-overlapping decoding: most confident entity spans first, then BIO tags.

    probs: (S, 1 + len(types)) span class probabilities (class 0 = not_entity).
    """
    best_prob, best_class = probs.max(dim=-1)  # (S,), (S,)
    tags = ["O"] * num_words
    taken = [False] * num_words
    candidates = (best_class != NOT_ENTITY) & (ends < num_words)
    for span in sorted(candidates.nonzero().flatten().tolist(), key=lambda s: -float(best_prob[s])):
        start, end = int(starts[span]), int(ends[span])
        if any(taken[start : end + 1]):
            continue
        kind = types[int(best_class[span]) - 1]
        tags[start] = f"B-{kind}"
        for i in range(start + 1, end + 1):
            tags[i] = f"I-{kind}"
        for i in range(start, end + 1):
            taken[i] = True
    return tags


# ----------------------------------------------------------------------------------------------
# Modality-aware self-attention (sec. 2.4, eq. 3-4)
# ----------------------------------------------------------------------------------------------


class ModalityAwareLayer(nn.Module):
    """A pretrained BERT/RoBERTa layer whose query projection depends on (query, key) modality.

    Keys, values, the attention output projection, FFN and LayerNorms are the pretrained layer's
    modules (moved here, not copied). With ``use_mas`` the query weights are copied into four
    projections ``q_w2w, q_w2v, q_v2w, q_v2v``; the score of query i and key j uses the one of
    (modality(i), modality(j)), and the softmax runs over all keys jointly. Without it, one query.
    The scale is 1/sqrt(head_dim) as in pretraining (eq. 3's sqrt(N + |V*|) reads as a typo).
    """

    PAIRS = ("w2w", "w2v", "v2w", "v2v")

    def __init__(self, pretrained_layer: nn.Module, *, num_heads: int, use_mas: bool):
        super().__init__()
        try:
            self_attention = pretrained_layer.attention.self
            self.key, self.value = self_attention.key, self_attention.value
            self.attention_dropout = self_attention.dropout
            self.attention_output = pretrained_layer.attention.output  # dense + dropout + LN(x + input)
            self.intermediate = pretrained_layer.intermediate  # dense + activation
            self.output = pretrained_layer.output  # dense + dropout + LN(x + input)
            query = self_attention.query
        except AttributeError as err:
            raise ValueError(
                f"promptmner reuses BERT/RoBERTa-style encoder layers (attention.self.query/key/value, "
                f"intermediate, output); this text encoder's layer has no {err.name!r}. "
                "Use a BERT or RoBERTa encoder (e.g. --text-encoder roberta-base)."
            ) from None
        self.num_heads = num_heads
        self.use_mas = use_mas
        names = self.PAIRS if use_mas else ("shared",)
        self.queries = nn.ModuleDict({name: _copy_linear(query) for name in names})

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)  # (B, h, S, d)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor, is_visual: torch.Tensor,
                text_columns: int | None = None) -> torch.Tensor:
        # x: (B, S, H); attention_mask: (B, S) bool keys to attend; is_visual: (B, S) bool modality,
        # laid out as eq. 2 builds the input: the text's N_t columns first, then the clue columns.
        # ``text_columns`` is N_t when the caller knows it (the model does): reading it from
        # ``is_visual`` costs four host syncs per layer on a GPU.
        keys = self.split_heads(self.key(x))  # (B, h, S, d)
        values = self.split_heads(self.value(x))  # (B, h, S, d)
        scale = 1.0 / math.sqrt(keys.size(-1))
        if self.use_mas:
            # Each query block meets each key block with its own projection: every (query, key)
            # score is computed once, as in plain attention (not four full S x S score maps).
            split = _text_columns(is_visual) if text_columns is None else text_columns  # N_t
            text, clues = x[:, :split], x[:, split:]  # (B, N_t, H), (B, N_v, H)
            text_keys, clue_keys = keys[:, :, :split], keys[:, :, split:]  # (B, h, N_t, d), (B, h, N_v, d)

            def block(pair: str, queries: torch.Tensor, block_keys: torch.Tensor) -> torch.Tensor:
                return self.split_heads(self.queries[pair](queries)) @ block_keys.transpose(-1, -2)

            from_text = torch.cat([block("w2w", text, text_keys), block("w2v", text, clue_keys)],
                                  dim=-1)  # (B, h, N_t, S)
            from_clues = torch.cat([block("v2w", clues, text_keys), block("v2v", clues, clue_keys)],
                                   dim=-1)  # (B, h, N_v, S)
            scores = torch.cat([from_text, from_clues], dim=2) * scale  # (B, h, S, S)
        else:
            scores = (
                self.split_heads(self.queries["shared"](x)) @ keys.transpose(-1, -2) * scale
            )  # (B, h, S, S)
        scores = scores.masked_fill(~attention_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = self.attention_dropout(scores.softmax(dim=-1))  # (B, h, S, S)
        context = (weights @ values).transpose(1, 2).flatten(2)  # (B, S, H)
        attended = self.attention_output(context, x)  # (B, S, H)
        return self.output(self.intermediate(attended), attended)  # (B, S, H)


def _text_columns(is_visual: torch.Tensor) -> int:
    """N_t of a [text | clues] layout; any other layout is a caller bug (MAS blocks assume it)."""
    columns = is_visual[0]  # (S,)
    split = int((~columns).sum())
    if bool(columns[:split].any()) or not bool(columns[split:].all()) or bool((is_visual != columns).any()):
        raise ValueError("ModalityAwareLayer expects every row laid out as [text pieces | clue tokens]")
    return split


def _copy_linear(linear: nn.Linear) -> nn.Linear:
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    copy.load_state_dict(linear.state_dict())
    return copy


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


@register_model("promptmner")
class PromptMNER(nn.Module):
    Config = PromptMNERConfig

    # Table 1 rows. Sec. 3.1: RoBERTa, K = 12, AdamW lr 1e-4 with linear warmup, batch 32, dropout 0.5.
    # The whole schedule is trained and the best dev checkpoint kept (patience 0: no early stop).
    _PAPER_TRAINING: ClassVar[dict] = {
        "text_encoder": "roberta-base",
        "encoder_lr": 1e-4,
        "head_lr": 1e-4,
        "batch_size": 32,
        "patience": 0,
        "dropout": 0.5,
    }
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": {**_PAPER_TRAINING, "prompts": "continuous", "num_continuous_prompts": 100},  # 78.60 / 90.27
        "best": {**_PAPER_TRAINING, "prompts": "continuous", "num_continuous_prompts": 100},  # 78.60 / 90.27
        "task labels": {**_PAPER_TRAINING, "prompts": "task"},  # 77.66 / 89.53
        "KB": {**_PAPER_TRAINING, "prompts": "kb"},  # 78.19 / 89.74
        "expert": {**_PAPER_TRAINING, "prompts": "expert"},  # 78.30 / 90.02
        "30 CPrompts": {
            **_PAPER_TRAINING,
            "prompts": "continuous",
            "num_continuous_prompts": 30,
        },  # 78.37 / 90.14
        "50 CPrompts": {
            **_PAPER_TRAINING,
            "prompts": "continuous",
            "num_continuous_prompts": 50,
        },  # 78.54 / 90.13
        "w/o MAS": {
            **_PAPER_TRAINING,
            "prompts": "continuous",
            "num_continuous_prompts": 100,
            "use_mas": False,
        },  # 78.04 / 89.59
    }

    @staticmethod
    def required_features(config: PromptMNERConfig) -> list[str]:
        _check_prompts(config.prompts)
        if config.prompts == "continuous":
            return [CLIP_IMAGE_EMBED]
        group = f"prompts/{DISCRETE_PROMPT_SETS[config.prompts]}"
        return [f"{group}/image_relevance", f"{group}/prompt_embed"]

    @staticmethod
    def stage1_settings(config: PromptMNERConfig) -> list[Stage1Setting]:
        """Sec. 2.3: "the convolutional neural network-based image encoder of CLIP" (a ResNet CLIP;
        the paper does not say which, RN50 is the smallest)."""
        _check_prompts(config.prompts)
        group = "encoders/clip" if config.prompts == "continuous" else f"prompts/{DISCRETE_PROMPT_SETS[config.prompts]}"
        return [Stage1Setting(group, "model", r"open_clip/RN[\w-]*", "--clip-model RN50",
                              "PromptMNER sec. 2.3: CLIP's CNN image encoder", match="pattern")]

    def __init__(
        self, config: PromptMNERConfig, *, labels: list[str], text_encoder: str, tokenizer=None, features=None
    ):
        super().__init__()
        _check_prompts(config.prompts)
        if config.span_loss not in ("sum", "mean"):
            raise ValueError(f"promptmner: span_loss={config.span_loss!r}; valid values: sum, mean")
        if features is None:
            raise ValueError("promptmner reads cached CLIP features: pass --features <cache.h5>")
        self.config = config
        self.labels = list(labels)
        self.entity_types = [label[2:] for label in self.labels if label.startswith("B-")]
        self.label_id = {label: i for i, label in enumerate(self.labels)}

        # -- the language model: its embeddings, then its layers turned into MAS layers (sec. 2.4)
        encoder = load_encoder(text_encoder)
        encoder_config = encoder.config
        hidden = encoder_config.hidden_size
        layers = [
            ModalityAwareLayer(layer, num_heads=encoder_config.num_attention_heads, use_mas=config.use_mas)
            for layer in encoder.encoder.layer
        ]
        self.text_encoder = nn.ModuleDict({"embeddings": encoder.embeddings, "layers": nn.ModuleList(layers)})
        self.position_offset = (
            encoder.embeddings.padding_idx + 1 if hasattr(encoder.embeddings, "padding_idx") else 0
        )
        self.max_positions = encoder_config.max_position_embeddings
        self.has_segment_b = (
            encoder_config.type_vocab_size >= 2
        )  # BERT: token type 1; RoBERTa: learned vector
        if not self.has_segment_b:
            self.visual_segment = nn.Parameter(
                torch.zeros(hidden)
            )  # (H,) segment embedding of the clue tokens
        self.sep_token_id = _sep_token_id(tokenizer, encoder_config)
        self._warned_positions = False

        # -- visual clues (sec. 2.3): prompt embeddings s_i, cached (discrete) or learned (continuous)
        if config.prompts == "continuous":
            clip_width = int(features.shapes[CLIP_IMAGE_EMBED][-1])
            prompts = torch.randn(config.num_continuous_prompts, clip_width) / math.sqrt(clip_width)
            self.continuous_prompts = nn.Parameter(prompts)  # (Q, D)
            scale = config.clip_logit_scale or _clip_logit_scale(features)
            self.register_buffer("logit_scale", torch.tensor(float(scale)), persistent=False)
        else:
            group = f"prompts/{DISCRETE_PROMPT_SETS[config.prompts]}"
            self.relevance_path = f"{group}/image_relevance"
            embed_path = f"{group}/prompt_embed"
            if embed_path not in features.globals:
                raise ValueError(
                    f"the feature spec has no global array {embed_path!r}: build the cache with "
                    f"`mner-features extract ... --encoder clip --prompts {DISCRETE_PROMPT_SETS[config.prompts]}`"
                )
            prompt_embed = torch.as_tensor(features.globals[embed_path], dtype=torch.float32)  # (Q, D)
            self.register_buffer("prompt_embed", prompt_embed, persistent=False)
            clip_width = prompt_embed.size(-1)
        self.clue_projection = nn.Linear(clip_width, hidden)  # CLIP space -> LM word-embedding width

        # -- span classifier (sec. 2.5, eq. 5)
        self.dropout = nn.Dropout(config.dropout)
        self.span_mlp = nn.Sequential(
            nn.Linear(2 * hidden, hidden),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(hidden, 1 + len(self.entity_types)),
        )
        init_linear(self.clue_projection)
        init_linear(self.span_mlp)

    # -- sec. 2.3 ---------------------------------------------------------------------------------

    def visual_clues(self, visual: dict[str, torch.Tensor]) -> torch.Tensor:
        """w_hat_i = p(P_i|I) * s_i for every prompt, zero for posts without a usable image."""
        if self.config.prompts == "continuous":
            image = F.normalize(visual[CLIP_IMAGE_EMBED].float(), dim=-1)  # (B, D)
            prompts = self.continuous_prompts  # (Q, D)
            relevance = (self.logit_scale * image @ F.normalize(prompts, dim=-1).T).softmax(
                dim=-1
            )  # (B, Q) eq. 1
        else:
            prompts = self.prompt_embed  # (Q, D)
            relevance = visual[self.relevance_path].float()  # (B, Q) eq. 1, computed in stage 1
        if IMAGE_OK in visual:
            relevance = relevance * visual[IMAGE_OK].to(relevance.dtype)[:, None]  # (B, Q)
        return relevance[:, :, None] * prompts[None]  # (B, Q, D)

    # -- sec. 2.4 ---------------------------------------------------------------------------------

    def embed(
        self, batch: dict, clues: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 2: [CLS] w_1..w_N [SEP] w_hat_1..w_hat_Q [SEP] + positions + segments, LayerNorm.

        ``clues`` (B, Q, D) or None when no post of the batch has a usable image: then the input is
        the text alone. The clue tokens of a post without a usable image are masked out as keys, so
        its words see exactly what they would see in a text-only model.
        """
        input_ids, text_mask = batch["input_ids"], batch["attention_mask"].bool()  # (B, L)
        batch_size, text_columns = input_ids.shape
        embeddings = self.text_encoder["embeddings"]
        tokens = embeddings.word_embeddings(input_ids)  # (B, L, H)
        positions = torch.arange(text_columns, device=input_ids.device)[None].expand(batch_size, -1)  # (B, L)
        attention_mask = text_mask  # (B, L)
        if clues is not None:
            num_clues = clues.size(1)
            sep = embeddings.word_embeddings.weight[self.sep_token_id].expand(batch_size, 1, -1)  # (B, 1, H)
            visual = torch.cat([self.clue_projection(clues), sep], dim=1)  # (B, Q + 1, H)
            if not self.has_segment_b:
                visual = visual + self.visual_segment
            tokens = torch.cat([tokens, visual], dim=1)  # (B, S, H), S = L + Q + 1
            text_length = text_mask.sum(dim=1, keepdim=True)  # (B, 1) clue positions follow the real text
            clue_positions = text_length + torch.arange(num_clues + 1, device=input_ids.device)[None]  # (B, Q + 1)
            positions = torch.cat([positions, clue_positions], dim=1)  # (B, S)
            has_image = _image_ok(batch["visual"], batch_size, input_ids.device)  # (B,)
            attention_mask = torch.cat([text_mask, has_image[:, None].expand(-1, num_clues + 1)], dim=1)  # (B, S)
        positions = positions + self.position_offset  # (B, S)
        # the collator pads to the batch's longest post, so the largest position is known on the host
        # (text_columns - 1, or text_columns + Q with the clues and their [SEP]): no sync on positions.max()
        largest = text_columns - 1 + (clues.size(1) + 1 if clues is not None else 0) + self.position_offset
        if largest >= self.max_positions:
            if not self._warned_positions:
                warnings.warn(
                    f"promptmner: {text_columns} text pieces + {tokens.size(1) - text_columns} clue tokens exceed "
                    f"the encoder's {self.max_positions} positions; the last positions are shared "
                    "(lower max_length or prompts)",
                    stacklevel=2,
                )
                self._warned_positions = True
            positions = positions.clamp(max=self.max_positions - 1)

        is_visual = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (B, S)
        is_visual[:, text_columns:] = True
        segments = is_visual.long() if self.has_segment_b else torch.zeros_like(is_visual, dtype=torch.long)
        hidden = embeddings(
            inputs_embeds=tokens, position_ids=positions, token_type_ids=segments
        )  # (B, S, H)
        return hidden, attention_mask, is_visual

    def word_states(self, batch: dict) -> torch.Tensor:
        """Last MAS layer's states at each word's first piece (the h_i of sec. 2.4). (B, W, H)"""
        has_image = _image_ok(batch["visual"], batch["input_ids"].size(0), batch["input_ids"].device)
        clues = self.visual_clues(batch["visual"]) if bool(has_image.any()) else None  # (B, Q, D) or None
        hidden, attention_mask, is_visual = self.embed(batch, clues)
        text_columns = batch["input_ids"].size(1)  # N_t: embed lays every row out as [text | clues]
        for layer in self.text_encoder["layers"]:
            hidden = layer(hidden, attention_mask, is_visual, text_columns)  # (B, S, H)
        return gather_first_pieces(hidden, batch["word_index"])  # (B, W, H)

    # -- sec. 2.5 ---------------------------------------------------------------------------------

    def span_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 5 over the kept words (packed to the front, in order).

        Returns logits (B, S, C), span starts (S,), ends (S,) and the kept-word count per post (B,).
        """
        word_mask = batch["word_mask"].bool()  # (B, W)
        words = self.dropout(self.word_states(batch))  # (B, W, H)
        order = torch.sort((~word_mask).to(torch.uint8), dim=1, stable=True).indices  # (B, W) kept first
        words = words.gather(1, order[:, :, None].expand_as(words))  # (B, W, H)
        num_words = word_mask.sum(dim=1)  # (B,)
        # spans over the padded word width (no host sync on num_words.max()); spans past a post's
        # kept words are masked out of the loss and never decoded
        starts, ends = enumerate_spans(max(1, word_mask.size(1)), self.config.max_span_width)
        starts, ends = starts.to(words.device), ends.to(words.device)
        pairs = torch.cat([words[:, starts], words[:, ends]], dim=-1)  # (B, S, 2H)
        return self.span_mlp(pairs), starts, ends, num_words

    def span_targets(self, batch: dict, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Gold class of every enumerated span (0 = not_entity). (B, S)"""
        word_mask = batch["word_mask"].bool()
        position = {(int(s), int(e)): i for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist()))}
        targets = torch.zeros(word_mask.size(0), starts.numel(), dtype=torch.long, device=starts.device)
        for row, (label_ids, keep) in enumerate(zip(batch["labels"].tolist(), word_mask.tolist())):
            tags = [self.labels[i] for i, kept in zip(label_ids, keep) if kept]
            for kind, start, end in extract_entities(tags):
                if (start, end) in position and kind in self.entity_types:  # longer spans cannot be predicted
                    targets[row, position[(start, end)]] = 1 + self.entity_types.index(kind)
        return targets

    def forward(self, batch: dict) -> dict:
        logits, starts, ends, num_words = self.span_logits(batch)
        out = {"span_logits": logits}
        if batch.get("labels") is not None:
            valid = ends[None, :] < num_words[:, None]  # (B, S) span lies inside the post
            targets = self.span_targets(batch, starts, ends)  # (B, S)
            per_span = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")  # (B * S,) eq. 6
            per_span = (per_span * valid.flatten()).sum()  # spans outside their post weigh 0: no host sync
            if self.config.span_loss == "sum":
                out["loss"] = per_span / logits.size(0)  # eq. 6 per post, averaged as the CRF NLL
            else:
                out["loss"] = per_span / valid.sum().clamp(min=1)
        return out

    def parameter_groups(self, train_config) -> list[dict]:
        return default_parameter_groups(self, train_config)  # encoder / head / CRF rates

    @torch.no_grad()
    def decode(self, batch: dict) -> list[list[int]]:
        logits, starts, ends, num_words = self.span_logits(batch)
        probs = logits.float().softmax(dim=-1).cpu()  # (B, S, C)
        starts, ends = starts.cpu(), ends.cpu()
        record_decoding("spans", probs=probs, starts=starts, ends=ends, types=list(self.entity_types))
        paths = []
        for row, count in enumerate(num_words.tolist()):
            tags = decode_spans(probs[row], starts, ends, count, self.entity_types)
            paths.append([self.label_id.get(tag, self.label_id.get("O", 0)) for tag in tags])
        return paths


def _image_ok(visual: dict[str, torch.Tensor], batch_size: int, device) -> torch.Tensor:
    """(B,) bool: the post has a usable image (all True when the batch carries no ``images/ok``)."""
    if IMAGE_OK in visual:
        return visual[IMAGE_OK].bool().to(device)
    return torch.ones(batch_size, dtype=torch.bool, device=device)


def _check_prompts(prompts: str) -> None:
    if prompts not in PROMPT_CHOICES:
        raise ValueError(
            f"promptmner: unknown prompts={prompts!r}; valid values: {', '.join(PROMPT_CHOICES)}"
        )


def _sep_token_id(tokenizer, encoder_config) -> int:
    for source in (tokenizer, encoder_config):
        token_id = getattr(source, "sep_token_id", None) if source is not None else None
        if token_id is not None:
            return int(token_id)
    token_id = getattr(encoder_config, "eos_token_id", None)
    if token_id is None:
        raise ValueError("promptmner needs the tokenizer's [SEP] id: pass tokenizer= to the model")
    return int(token_id)


def _clip_logit_scale(features) -> float:
    """CLIP's 1/tau from the cache attrs; open_clip stores it as log (4.6052 for 100)."""
    for key in (CLIP_IMAGE_EMBED, "encoders/clip"):
        value = (getattr(features, "attrs", None) or {}).get(key, {}).get("logit_scale")
        if value is not None:
            value = float(value)
            return math.exp(value) if value < math.log(1000.0) else value  # log-form when small
    warnings.warn(
        "promptmner: the cache has no CLIP logit_scale attr; using CLIP's trained value 100", stacklevel=3
    )
    return 100.0
