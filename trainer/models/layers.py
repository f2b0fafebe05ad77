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

    # pytorch-crf checks its mask with a Python ``if`` on a device tensor and backtracks Viterbi with one
    # ``.item()`` per word: on a GPU that is one host sync per call and one per decoded word. The two
    # methods below compute the same quantities (tests/test_gpu_readiness.py compares them) with no
    # host sync in the likelihood and a single copy to the host per decoded batch. Both read fp32
    # emissions, whatever autocast produced upstream.

    def log_likelihood(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log p(tags | emissions) per sequence. emissions (B, W, T); tags, mask (B, W), mask[:, 0] True,
        each row's True positions first. Returns (B,) float32."""
        emissions, mask = emissions.float(), mask.bool()
        transitions, start, end = self.transitions.float(), self.start_transitions.float(), self.end_transitions.float()
        emitted = emissions.gather(2, tags.unsqueeze(-1)).squeeze(-1)  # (B, W)
        moves = transitions[tags[:, :-1], tags[:, 1:]]  # (B, W-1)
        last = tags.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0)).squeeze(1)  # (B,)
        gold = start[tags[:, 0]] + emitted[:, 0] + ((emitted[:, 1:] + moves) * mask[:, 1:]).sum(1) + end[last]  # (B,)
        alpha = start + emissions[:, 0]  # (B, T)
        for i in range(1, emissions.size(1)):
            step = torch.logsumexp(alpha.unsqueeze(2) + transitions + emissions[:, i].unsqueeze(1), dim=1)  # (B, T)
            alpha = torch.where(mask[:, i : i + 1], step, alpha)
        return gold - torch.logsumexp(alpha + end, dim=1)  # (B,)

    @torch.no_grad()
    def viterbi(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """Best tag path per sequence (as pytorch-crf's ``decode``). emissions (B, W, T); mask (B, W)."""
        emissions, mask = emissions.float(), mask.bool()
        transitions = self.transitions.float()
        score = self.start_transitions.float() + emissions[:, 0]  # (B, T)
        history = []
        for i in range(1, emissions.size(1)):
            best, came_from = (score.unsqueeze(2) + transitions + emissions[:, i].unsqueeze(1)).max(dim=1)  # (B, T)
            score = torch.where(mask[:, i : i + 1], best, score)
            history.append(came_from)
        last = (score + self.end_transitions.float()).argmax(dim=1)  # (B,)
        lengths = mask.sum(1)  # (B,)
        steps = torch.stack(history) if history else last.new_zeros(0, *score.shape)  # (W-1, B, T)
        host = torch.cat([last, lengths, steps.flatten()]).cpu()  # the one copy to the host
        batch = emissions.size(0)
        last, lengths = host[:batch].tolist(), host[batch : 2 * batch].tolist()
        steps = host[2 * batch :].view(-1, batch, emissions.size(2)).numpy()
        paths = []
        for row in range(batch):
            path = [last[row]]
            for position in range(lengths[row] - 1, 0, -1):
                path.append(int(steps[position - 1, row, path[-1]]))
            paths.append(path[::-1])
        return paths


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
    packed_emissions, packed_mask, packed_labels = pack_kept_words(emissions.float(), word_mask, labels)
    has_words = packed_mask[:, 0]  # (B,)
    # a post without kept words runs through the CRF on one dummy step and is then weighted 0: no host
    # sync on ``has_words`` (the CRF needs every sequence to start with a kept step)
    runnable_mask = packed_mask.clone()
    runnable_mask[:, 0] = True  # (B, W)
    loss = None
    if packed_labels is not None:
        packed_labels = crf.repair_gold(packed_labels, packed_mask)  # (B, W) no orphan I- left by packing
        log_likelihood = crf.log_likelihood(packed_emissions, packed_labels, runnable_mask)  # (B,)
        loss = -(log_likelihood * has_words).sum() / emissions.size(0)
    paths = None
    if decode:
        record_decoding("crf", crf=crf, emissions=packed_emissions.detach(), mask=packed_mask)
        decoded = crf.viterbi(packed_emissions, runnable_mask)
        paths = [path if kept else [] for path, kept in zip(decoded, has_words.tolist())]
    return loss, paths
