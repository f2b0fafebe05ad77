"""Fast ablation mode: run the frozen text encoder once per distinct post, then train heads only.

Head-only ablations (fusion switches, prompt sets, seeds of the head) spend most of an epoch in
the text encoder's forward and backward passes. With the encoder frozen its output for a post
never changes, so it is computed once, before epoch 1, and every later call is a table lookup.

This is NOT the papers' protocol: they fine-tune the encoder. Differences, all documented in
docs/experiments.md and flagged in every report row (``fast-ablation``):

- the encoder's weights stay at their pretrained values (no encoder learning rate);
- no dropout inside the encoder (outputs are computed in eval mode);
- the model's own layers after the encoder train as usual, with their dropout.

It applies to models whose ``text_encoder`` is a Hugging Face encoder called on the post's
``input_ids`` alone (bert_crf, vcrmner, pmner). A model that feeds extra inputs through the encoder
(PromptMNER's continuous prompts) cannot reuse outputs and gets a clear error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mner.trainer.core.config import ConfigError


def _encoder_of(model: torch.nn.Module):
    from transformers import PreTrainedModel

    encoder = getattr(model, "text_encoder", None)
    if not isinstance(encoder, PreTrainedModel):
        name = getattr(model, "model_name", type(model).__name__)
        raise ConfigError(
            f"fast_ablation: model {name!r} does not run a Hugging Face encoder on the post alone (its "
            "text_encoder mixes in other inputs), so encoder outputs cannot be cached; use it without "
            "--set fast_ablation=true (supported: bert_crf, vcrmner, pmner)"
        )
    return encoder


@torch.no_grad()
def encode_posts(encoder, id_rows: Sequence[tuple[int, ...]], *, device: torch.device,
                 batch_size: int) -> dict[tuple[int, ...], torch.Tensor]:
    """``{input ids: last hidden states (len, H)}`` for every distinct id row, longest first."""
    distinct = sorted(set(id_rows), key=len, reverse=True)
    table: dict[tuple[int, ...], torch.Tensor] = {}
    for start in range(0, len(distinct), batch_size):
        chunk = distinct[start:start + batch_size]
        width = len(chunk[0])
        ids = torch.zeros(len(chunk), width, dtype=torch.long)  # (b, L) padded with 0; masked below
        mask = torch.zeros(len(chunk), width, dtype=torch.long)  # (b, L)
        for row, piece_ids in enumerate(chunk):
            ids[row, : len(piece_ids)] = torch.tensor(piece_ids)
            mask[row, : len(piece_ids)] = 1
        hidden = encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # (b, L, H)
        hidden = hidden.float().cpu()  # host memory: the table outlives the run (see _SHARED_TABLES)
        for row, piece_ids in enumerate(chunk):
            table[piece_ids] = hidden[row, : len(piece_ids)].clone()  # (len, H)
    return table


# Outputs already computed in this process, per encoder identity: the runs of one sweep process
# (seeds, switches, training fractions) encode every post once in all. Held in host memory: on a GPU
# they would pin device memory for the life of the sweep process, after every run has finished.
_SHARED_TABLES: dict[str, dict[tuple[int, ...], torch.Tensor]] = {}


@torch.no_grad()
def encoder_identity(encoder, device: torch.device) -> str:
    """Name, device and a checksum of the weights: two loads of the same frozen encoder share outputs."""
    checksum = sum(float(p.double().sum()) for p in encoder.parameters())
    return f"{encoder.config._name_or_path}|{device}|{sum(p.numel() for p in encoder.parameters())}|{checksum!r}"


def use_cached_text_encoder(model: torch.nn.Module, datasets: Sequence, *, device: torch.device,
                            batch_size: int = 64) -> int:
    """Freeze ``model.text_encoder``, encode every post of ``datasets`` once, and make the encoder's
    forward a lookup. Returns the number of distinct posts encoded now (earlier runs of the same
    encoder in this process already hold the rest)."""
    encoder = _encoder_of(model)
    encoder.requires_grad_(False)  # no optimiser group, no gradient: the weights stay pretrained
    encoder.eval()
    id_rows = [tuple(aligned.input_ids) for dataset in datasets for aligned in dataset.aligned]
    table = _SHARED_TABLES.setdefault(encoder_identity(encoder, device), {})
    missing = list(dict.fromkeys(ids for ids in id_rows if ids not in table))
    table.update(encode_posts(encoder, missing, device=device, batch_size=max(1, batch_size)))
    config = encoder.config

    def cached_forward(input_ids=None, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        extra = sorted(k for k, v in kwargs.items() if v is not None and k not in ("return_dict", "token_type_ids"))
        if input_ids is None or extra:
            raise RuntimeError(f"fast_ablation: the cached encoder only takes input_ids/attention_mask, got {extra}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch, width = input_ids.shape
        hidden = torch.zeros(batch, width, config.hidden_size)  # (B, L, H) assembled on the host
        for row, (piece_ids, keep) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            key = tuple(i for i, k in zip(piece_ids, keep) if k)
            cached = table.get(key)
            if cached is None:  # a post that was not encoded up front (e.g. predict on new data)
                raise RuntimeError("fast_ablation: a post outside the train/dev/test sets reached the cached encoder")
            hidden[row, : cached.size(0)] = cached
        return BaseModelOutput(last_hidden_state=hidden.to(input_ids.device))  # one copy per batch

    encoder.forward = cached_forward  # instance attribute: nn.Module.__call__ dispatches to it
    return len(missing)
