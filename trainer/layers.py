"""Small layers every tagging model here uses: BIO-constrained CRF and word pooling."""

from __future__ import annotations

import torch
from torch import nn
from torchcrf import CRF

FORBIDDEN = -10000.0


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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name in ("start_transitions", "end_transitions", "transitions"):
            nn.init.uniform_(self._parameters[name], -0.1, 0.1)

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
