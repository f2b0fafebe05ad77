"""The grounding head and the wrapper that lets any registered model carry it.

Design (default, deliberately simple; docs/gmner.md):

- span vector ``s = W_s [h_first ; h_last]`` from the tagger's own word states at the entity's first
  and last word. For the multimodal models these are their fused states, so the model's visual
  fusion reaches the head through them;
- candidate vector ``c_k = W_c [crop feature (L2-normalised) ; box geometry (7) ; detector score]``;
- additive scoring ``logit_k = v . tanh(s + c_k)``, and for "no region" ``logit_0 = v . tanh(s + n)``
  with a learned ``n``; a softmax over [None, the post's candidates] (padding masked);
- loss: ``-log sum_{k in T} p_k`` for index-set targets (any candidate in the IoU set is right) or the
  cross-entropy with the normalised-IoU distribution (soft targets), summed over the gold entities
  of the batch and divided by the number of posts, like the CRF's loss; it is added to the tagger's
  loss with weight ``gmner_loss_weight``. Training reads gold spans; prediction reads the tagger's
  own predicted entities, and picks the arg-max (None or one candidate).

Word states are read without touching the model files: a forward pre-hook on the layer that turns
word states into tag scores (``emissions``; PMNER's ``mlm_head``; PromptMNER's ``dropout`` before its
span scorer) records its (B, W, H) input during the model's own forward or decode, so grounding at
prediction time costs no second pass. A model may name another layer with ``word_states_module``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mner.pipeline.tags import extract_entities
from mner.trainer.gmner.candidates import GEOMETRY_WIDTH
from mner.trainer.models import default_parameter_groups
from mner.trainer.models.layers import init_linear

WORD_STATE_MODULES = ("emissions", "mlm_head", "dropout")


class GroundingHead(nn.Module):
    def __init__(self, *, word_width: int, feature_width: int, dim: int, dropout: float):
        super().__init__()
        self.feature_width = feature_width
        self.span_proj = nn.Linear(2 * word_width, dim)
        self.candidate_proj = nn.Linear(feature_width + GEOMETRY_WIDTH + 1, dim)
        self.no_region = nn.Parameter(torch.zeros(dim))
        self.score = nn.Linear(dim, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        init_linear(self)
        nn.init.normal_(self.no_region, std=0.02)

    def span_vectors(self, word_states: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        """word_states (B, W, H), spans (B, E, 2) word indices -> (B, E, dim)."""
        index = spans.clamp(min=0, max=word_states.size(1) - 1)  # (B, E, 2)
        first = word_states.gather(1, index[..., :1].expand(-1, -1, word_states.size(-1)))  # (B, E, H)
        last = word_states.gather(1, index[..., 1:].expand(-1, -1, word_states.size(-1)))  # (B, E, H)
        return self.span_proj(self.dropout(torch.cat([first, last], dim=-1)))  # (B, E, dim)

    def candidate_vectors(self, gmner: dict) -> torch.Tensor:
        parts = []
        if self.feature_width:
            parts.append(F.normalize(gmner["features"].float(), dim=-1))  # (B, K, D)
        parts += [gmner["geometry"].float(), gmner["scores"].float().unsqueeze(-1)]  # (B, K, 7), (B, K, 1)
        return self.candidate_proj(self.dropout(torch.cat(parts, dim=-1)))  # (B, K, dim)

    def forward(self, word_states: torch.Tensor, spans: torch.Tensor, gmner: dict) -> torch.Tensor:
        """Logits over [None, candidates] for every span: (B, E, 1+K); padded candidates get -inf."""
        span = self.span_vectors(word_states, spans)  # (B, E, dim)
        candidates = self.candidate_vectors(gmner)  # (B, K, dim)
        options = torch.cat([self.no_region.expand(candidates.size(0), 1, -1).to(candidates.dtype), candidates],
                            dim=1)  # (B, 1+K, dim)
        logits = self.score(torch.tanh(span.unsqueeze(2) + options.unsqueeze(1))).squeeze(-1)  # (B, E, 1+K)
        valid = torch.cat([gmner["mask"].new_ones(gmner["mask"].size(0), 1), gmner["mask"]], dim=1)  # (B, 1+K)
        return logits.float().masked_fill(~valid.bool().unsqueeze(1), float("-inf"))


def grounding_loss(logits: torch.Tensor, targets: torch.Tensor, span_mask: torch.Tensor, style: str) -> torch.Tensor:
    """logits, targets (B, E, 1+K), span_mask (B, E): summed over entities, divided by posts."""
    log_probs = logits.log_softmax(dim=-1)  # (B, E, 1+K)
    safe = log_probs.masked_fill(torch.isinf(log_probs), -1e4)
    if style == "soft":
        per_entity = -(targets * safe).sum(-1)  # (B, E) cross-entropy with the IoU distribution
    else:
        per_entity = -torch.logsumexp(safe.masked_fill(targets <= 0, -1e4), dim=-1)  # (B, E) -log sum_{k in T} p_k
    return (per_entity * span_mask.float()).sum() / logits.size(0)


class _WordStates:
    """Records the (B, W, H) input of one submodule during the model's forward or decode."""

    def __init__(self, model: nn.Module):
        names = [getattr(model, "word_states_module", None), *WORD_STATE_MODULES]
        self.module_name = next((n for n in names if n and isinstance(getattr(model, n, None), nn.Module)), None)
        if self.module_name is None:
            raise ValueError(f"{type(model).__name__} has none of the layers {WORD_STATE_MODULES} whose input are "
                             "its word states; give the class a word_states_module attribute")
        self.seen: list[torch.Tensor] = []
        getattr(model, self.module_name).register_forward_pre_hook(self._record)

    def _record(self, module, args):
        if args and torch.is_tensor(args[0]) and args[0].dim() == 3:
            self.seen.append(args[0])

    def take(self, batch_size: int, num_words: int) -> torch.Tensor:
        found = [s for s in self.seen if s.shape[:2] == (batch_size, num_words)]
        self.seen = []
        if not found:
            raise ValueError(f"no (B, W, H) word states reached layer {self.module_name!r} (the model tags words "
                             "some other way, e.g. PMNER's template mode); the grounding head needs per-word states")
        return found[-1]


class GroundedModel(nn.Module):
    """``base`` (any registered model) + a :class:`GroundingHead`; the batch carries ``batch["gmner"]``."""

    def __init__(self, base: nn.Module, *, grounding_config, feature_width: int, labels: list[str]):
        super().__init__()
        self.base = base
        self.config = getattr(base, "config", None)
        self.grounding_config = grounding_config
        self.labels = list(labels)
        self._states = _WordStates(base)
        width = self._word_width()
        self.grounding = GroundingHead(word_width=width, feature_width=feature_width, dim=grounding_config.gmner_dim,
                                       dropout=grounding_config.gmner_dropout)

    def _word_width(self) -> int:
        layer = getattr(self.base, self._states.module_name)
        if isinstance(layer, nn.Linear):
            return layer.in_features
        width = getattr(self.base, "word_states_width", None)
        encoder = getattr(self.base, "text_encoder", None)
        width = width or getattr(getattr(encoder, "config", None), "hidden_size", None)
        if width is None:  # an encoder rebuilt from its parts (PromptMNER): the word-embedding width
            width = next((m.embedding_dim for n, m in self.base.named_modules()
                          if n.endswith("word_embeddings") and isinstance(m, nn.Embedding)), None)
        if width is None:
            raise ValueError(f"cannot tell the width of {type(self.base).__name__}'s word states")
        return int(width)

    def forward(self, batch: dict) -> dict:
        self._states.seen = []
        out = dict(self.base(batch))
        gmner = batch.get("gmner")
        if gmner is None or out.get("loss") is None:
            self._states.seen = []
            return out
        states = self._states.take(*batch["word_index"].shape)  # (B, W, H)
        logits = self.grounding(states, gmner["spans"], gmner)  # (B, E, 1+K)
        loss = grounding_loss(logits, gmner["targets"], gmner["span_mask"], self.grounding_config.gmner_targets)
        out["grounding_loss"] = loss.detach()
        out["loss"] = out["loss"] + self.grounding_config.gmner_loss_weight * loss
        return out

    @torch.no_grad()
    def decode(self, batch: dict) -> list[list[int]]:
        return self.decode_grounded(batch)[0]

    @torch.no_grad()
    def decode_grounded(self, batch: dict) -> tuple[list[list[int]], list[list[tuple[int, int, str, int]]]]:
        """Tag paths, and per post its predicted entities (first word, last word, type, choice) where
        choice is -1 for None or the candidate's index."""
        self._states.seen = []
        paths = self.base.decode(batch)
        word_mask = batch["word_mask"].bool()
        entities = []
        for row, path in enumerate(paths):
            kept = word_mask[row].nonzero().flatten().tolist()
            tags = ["O"] * word_mask.size(1)
            for position, label in zip(kept, path):
                tags[position] = self.labels[label]
            entities.append([(start, end, kind) for kind, start, end in extract_entities(tags)])
        gmner = batch.get("gmner")
        if gmner is None or not any(entities):
            self._states.seen = []
            return paths, [[(s, e, t, -1) for s, e, t in post] for post in entities]
        states = self._states.take(*batch["word_index"].shape)  # (B, W, H)
        num = max(len(post) for post in entities)
        spans = torch.zeros(len(entities), num, 2, dtype=torch.long, device=states.device)  # (B, E, 2)
        for row, post in enumerate(entities):
            for i, (start, end, _) in enumerate(post):
                spans[row, i, 0], spans[row, i, 1] = start, end
        choice = self.grounding(states, spans, gmner).argmax(dim=-1) - 1  # (B, E): -1 None, else candidate
        grounded = [[(s, e, t, int(choice[row, i])) for i, (s, e, t) in enumerate(post)]
                    for row, post in enumerate(entities)]
        return paths, grounded

    def parameter_groups(self, train_config) -> list[dict]:
        """The base model's own groups (encoder / head / CRF / towers) and the grounding head at head_lr."""
        if hasattr(self.base, "parameter_groups"):
            groups = self.base.parameter_groups(train_config)
        else:
            groups = default_parameter_groups(self.base, train_config)
        for group in default_parameter_groups(self.grounding, train_config):
            group["name"] = "grounding" + group["name"][len("head"):]
            groups.append(group)
        return groups


def rebuild_grounded(base: nn.Module, run_config: dict) -> GroundedModel:
    """A finished GMNER run's model (before its weights are loaded), sized as config.json recorded it."""
    from mner.trainer.gmner.config import GroundingConfig

    record = run_config["gmner"]
    return GroundedModel(base, grounding_config=GroundingConfig(**record["config"]),
                         feature_width=record["feature_width"], labels=run_config["labels"])
