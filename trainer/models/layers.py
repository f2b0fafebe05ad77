"""Small layers every tagging model here uses: BIO-constrained CRF and word pooling."""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn
from torchcrf import CRF

FORBIDDEN = -10000.0

# ----------------------------------------------------------------------------- decode trace

_DECODE_TRACE: contextvars.ContextVar[list | None] = contextvars.ContextVar("mner_decode_trace", default=None)


@contextlib.contextmanager
def trace_decoding():
    """Collect what the decoders of ``model.decode`` saw (CRF emissions, span probabilities, tag scores).

    Entity scores (``mner.trainer.inference.scores``) are computed from the very tensors that produced
    the tags, so a model needs no second decode method; outside this context nothing is recorded."""
    records: list[dict] = []
    token = _DECODE_TRACE.set(records)
    try:
        yield records
    finally:
        _DECODE_TRACE.reset(token)


def record_decoding(kind: str, **tensors) -> None:
    """One decoder's inputs, kept only while :func:`trace_decoding` is active (kind: crf | spans | softmax)."""
    records = _DECODE_TRACE.get()
    if records is not None:
        records.append({"kind": kind, **tensors})


def bio_transition_penalties(labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Penalties that make I-X reachable only from B-X or I-X (and never as the first tag)."""
    n = len(labels)
    transition = torch.zeros(n, n)
    start = torch.zeros(n)
    for j, to_tag in enumerate(labels):
        if not to_tag.startswith("I-"):
            continue
        entity_type = to_tag[2:]
        start[j] = FORBIDDEN
        for i, from_tag in enumerate(labels):
            if from_tag not in (f"B-{entity_type}", f"I-{entity_type}"):
                transition[i, j] = FORBIDDEN
    return transition, start


class BIOConstrainedCRF(CRF):
    """pytorch-crf's CRF with BIO transitions enforced in training and Viterbi decoding.

    The learnable scores stay in ``_parameters``; reading ``self.transitions`` or
    ``self.start_transitions`` (as pytorch-crf does internally) adds the fixed penalties,
    so an invalid path can never be decoded. Gold sequences must be valid BIO: repair
    orphan I- tags to B- before training (``mner.pipeline.data.repair_bio``).
    """

    def __init__(self, labels: list[str]):
        super().__init__(len(labels), batch_first=True)
        transition_penalty, start_penalty = bio_transition_penalties(labels)
        self.register_buffer("transition_penalty", transition_penalty, persistent=False)
        self.register_buffer("start_penalty", start_penalty, persistent=False)
        index = {label: i for i, label in enumerate(labels)}
        begin_of = [index.get(f"B-{label[2:]}", i) if label.startswith("I-") else i for i, label in enumerate(labels)]
        self.register_buffer("begin_of", torch.tensor(begin_of, dtype=torch.long), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name in ("start_transitions", "end_transitions", "transitions"):
            nn.init.uniform_(self._parameters[name], -0.1, 0.1)

    def repair_gold(self, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Packed gold (B, W) -> the same tags with every forbidden I-X (first tag, or after a tag
        other than B-X / I-X) turned into B-X. A B- word that tokenised to zero pieces is dropped by
        packing and leaves such an orphan; scored as is, it would add the -10000 penalty to the loss.
        """
        begin_of = self._buffers["begin_of"]  # (T,) I-X -> B-X, others -> themselves
        previous = torch.cat([labels.new_full((labels.size(0), 1), -1), labels[:, :-1]], dim=1)  # (B, W)
        forbidden_start = self._buffers["start_penalty"][labels] < 0  # (B, W)
        forbidden_step = self._buffers["transition_penalty"][previous.clamp(min=0), labels] < 0  # (B, W)
        orphan = torch.where(previous < 0, forbidden_start, forbidden_step) & mask.bool()  # (B, W)
        return torch.where(orphan, begin_of[labels], labels)

    def _penalised(self, name: str, penalty: str) -> torch.Tensor:
        if name not in self._parameters or penalty not in self._buffers:
            raise AttributeError(name)  # still inside CRF.__init__: let nn.Module register it
        return self._parameters[name] + self._buffers[penalty]

    @property
    def transitions(self) -> torch.Tensor:  # (num_tags, num_tags)
        return self._penalised("transitions", "transition_penalty")

    @property
    def start_transitions(self) -> torch.Tensor:  # (num_tags,)
        return self._penalised("start_transitions", "start_penalty")


def gather_first_pieces(hidden: torch.Tensor, word_index: torch.Tensor) -> torch.Tensor:
    """Pick the hidden state of each word's first sub-word piece.

    hidden: (B, L, H) sub-word states; word_index: (B, W) position of each word's first piece
    (any valid position, e.g. 0, for padded or truncated words: mask them downstream).
    Returns (B, W, H).
    """
    index = word_index.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.size(-1))  # (B, W, H)
    return hidden.gather(1, index)


def init_linear(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def pack_kept_words(
    emissions: torch.Tensor, word_mask: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Move each post's kept words (``word_mask`` True) to the front, in order, for the CRF.

    pytorch-crf needs every sequence to start with an unmasked step; a zero-piece or truncated
    word can sit anywhere, so the kept words are packed left before the CRF sees them.
    emissions: (B, W, T); word_mask: (B, W) bool; labels: (B, W) or None.
    Returns packed emissions (B, W, T), packed mask (B, W) and packed labels (B, W) or None.
    """
    order = torch.sort((~word_mask).to(torch.uint8), dim=1, stable=True).indices  # (B, W) kept first
    packed_emissions = emissions.gather(1, order.unsqueeze(-1).expand_as(emissions))  # (B, W, T)
    lengths = word_mask.sum(dim=1, keepdim=True)  # (B, 1)
    packed_mask = torch.arange(word_mask.size(1), device=word_mask.device).unsqueeze(0) < lengths  # (B, W)
    packed_labels = labels.gather(1, order) if labels is not None else None  # (B, W)
    return packed_emissions, packed_mask, packed_labels


def crf_loss_and_decode(
    crf: BIOConstrainedCRF,
    emissions: torch.Tensor,
    word_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    decode: bool = False,
) -> tuple[torch.Tensor | None, list[list[int]] | None]:
    """Mean negative log-likelihood over posts and/or Viterbi paths (one id per kept word).

    Posts with no kept word (all words truncated or zero-piece) add no loss and decode to ``[]``.
    """
    packed_emissions, packed_mask, packed_labels = pack_kept_words(emissions, word_mask, labels)
    has_words = packed_mask[:, 0]  # (B,)
    loss = None
    if packed_labels is not None:
        packed_labels = crf.repair_gold(packed_labels, packed_mask)  # (B, W) no orphan I- left by packing
        if has_words.any():
            log_likelihood = crf(
                packed_emissions[has_words], packed_labels[has_words], packed_mask[has_words], reduction="sum"
            )
            loss = -log_likelihood / emissions.size(0)
        else:
            loss = emissions.sum() * 0.0
    paths = None
    if decode:
        record_decoding("crf", crf=crf, emissions=packed_emissions.detach(), mask=packed_mask)
        paths = [[] for _ in range(emissions.size(0))]
        if has_words.any():
            decoded = crf.decode(packed_emissions[has_words], packed_mask[has_words])
            for row, path in zip(has_words.nonzero().flatten().tolist(), decoded):
                paths[row] = path
    return loss, paths
