"""Per-image text (e.g. captions) as the encoder's second segment: ``[CLS] text [SEP] caption [SEP]``.

ESPVR (sec. 3.2) feeds BERT the post and its image caption as a sentence pair. The post's pieces,
``word_index`` and ``word_mask`` stay exactly those of the post alone: the caption is appended after
the post's closing special token and is truncated first (it gets what ``max_length`` leaves; the
post is never shortened for it). An empty caption appends nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class SecondSegment:
    """Appends the texts at ``batch["visual"][path]`` to already tokenised posts.

    Returns padded ``input_ids``, ``attention_mask`` and ``token_type_ids`` (B, L): 0 on the post's
    ``[CLS] text [SEP]``, 1 on ``caption [SEP]``, 0 on padding. The pair template comes from the
    tokenizer itself, so RoBERTa's ``</s></s>`` between segments is honoured too.
    """

    def __init__(self, tokenizer, *, path: str, max_length: int):
        self.tokenizer = tokenizer
        self.path = path
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id or 0
        a, b = _two_plain_words(tokenizer)
        single = tokenizer(a)["input_ids"]
        pair = tokenizer(a, b)["input_ids"]
        a, b = (tokenizer(a, add_special_tokens=False)["input_ids"][0],
                tokenizer(b, add_special_tokens=False)["input_ids"][0])
        if pair[: len(single)] != single or pair.count(b) != 1:
            raise ValueError(f"{type(tokenizer).__name__}: cannot read its sentence-pair template {pair}")
        self.between = pair[len(single) : pair.index(b)]  # [] for BERT, [</s>] for RoBERTa
        self.closing = pair[pair.index(b) + 1 :]  # [SEP]

    def __call__(self, text_ids: Sequence[Sequence[int]], texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if len(text_ids) != len(texts):
            raise ValueError(f"{len(text_ids)} posts but {len(texts)} second-segment texts")
        encoded = self.tokenizer([t or "" for t in texts], add_special_tokens=False)["input_ids"]
        rows, types = [], []
        for ids, extra in zip(text_ids, encoded):
            ids = list(ids)
            room = self.max_length - len(ids) - len(self.between) - len(self.closing)
            extra = list(extra[: max(room, 0)])
            if extra:
                tail = self.between + extra + self.closing
                rows.append(ids + tail)
                types.append([0] * len(ids) + [1] * len(tail))
            else:
                rows.append(ids)
                types.append([0] * len(ids))
        width = max(1, max(len(r) for r in rows))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
        token_type_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L)
        for i, (row, kind) in enumerate(zip(rows, types)):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
            token_type_ids[i, : len(row)] = torch.tensor(kind, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}

    def apply(self, batch: dict) -> dict:
        """The batch with its text ids re-built as pairs (posts' own ids recovered from the attention mask)."""
        lengths = batch["attention_mask"].sum(1).tolist()
        text_ids = [batch["input_ids"][i, :n].tolist() for i, n in enumerate(lengths)]
        return {**batch, **self(text_ids, batch["visual"][self.path])}


def _two_plain_words(tokenizer) -> tuple[str, str]:
    """Two different words that each tokenise to exactly one ordinary piece (to read the pair template)."""
    found = []
    for word in ("a", "b", "x", "the", "and", "i", "o", "e"):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] not in tokenizer.all_special_ids and ids not in [f[1] for f in found]:
            found.append((word, ids))
        if len(found) == 2:
            return found[0][0], found[1][0]
    raise ValueError(f"{type(tokenizer).__name__}: found no single-piece words to read its pair template")


def second_segment_for(model_cls, model_config, tokenizer, max_length: int) -> SecondSegment | None:
    """The collator's second segment for a model that declares ``second_segment(config) -> cache path``."""
    declared = getattr(model_cls, "second_segment", None)
    path = declared(model_config) if declared is not None else None
    return SecondSegment(tokenizer, path=path, max_length=max_length) if path else None
