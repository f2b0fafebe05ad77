"""BERT-CRF: the text-only baseline every MNER paper compares against (Twitter-2015 F1 71.81).

Encoder -> dropout -> linear emissions on each word's first piece -> BIO-constrained CRF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from mner.trainer.inputs.text_encoder import load_encoder
from mner.trainer.models import default_parameter_groups, register_model
from mner.trainer.models.layers import BIOConstrainedCRF, crf_loss_and_decode, gather_first_pieces, init_linear


@register_model("bert_crf")
class BertCRF(nn.Module):
    @dataclass
    class Config:
        dropout: float = 0.1  # dropout on the encoder's word states before the emission layer

    # The baseline as the papers run it: BERT-base, lr 5e-5, batch 16, max length 128.
    PRESETS: ClassVar[dict[str, dict]] = {"default": {}}

    @staticmethod
    def required_features(config: BertCRF.Config) -> list[str]:
        return []

    @staticmethod
    def stage1_settings(config: BertCRF.Config) -> list:
        return []  # text only: no stage-1 assumption

    def __init__(self, config: BertCRF.Config, *, labels: list[str], text_encoder: str, tokenizer=None,
                 features=None):
        super().__init__()
        self.config = config
        self.labels = list(labels)
        self.text_encoder = load_encoder(text_encoder)
        hidden = self.text_encoder.config.hidden_size
        self.dropout = nn.Dropout(config.dropout)
        self.emissions = nn.Linear(hidden, len(self.labels))
        init_linear(self.emissions)
        self.crf = BIOConstrainedCRF(self.labels)

    def word_emissions(self, batch: dict) -> torch.Tensor:
        hidden = self.text_encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state  # (B, L, H)
        words = gather_first_pieces(hidden, batch["word_index"])  # (B, W, H)
        return self.emissions(self.dropout(words))  # (B, W, T)

    def forward(self, batch: dict) -> dict:
        emissions = self.word_emissions(batch)
        loss, _ = crf_loss_and_decode(self.crf, emissions, batch["word_mask"], batch.get("labels"))
        return {"loss": loss, "emissions": emissions}

    def parameter_groups(self, train_config) -> list[dict]:
        return default_parameter_groups(self, train_config)  # encoder / head / CRF rates

    @torch.no_grad()
    def decode(self, batch: dict) -> list[list[int]]:
        emissions = self.word_emissions(batch)
        _, paths = crf_loss_and_decode(self.crf, emissions, batch["word_mask"], decode=True)
        return paths
