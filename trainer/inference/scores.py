"""A confidence score for every predicted entity, defined per decoder.

Scores come from the tensors the model's own ``decode`` used (recorded by
:func:`mner.trainer.models.layers.trace_decoding`), so they describe exactly the tags returned:

- **CRF** (bert_crf, vcrmner, mgipscl, espvr, pmner with ``decoder=crf``): the entity's *span marginal*,
  the probability under the CRF that words s..e carry the entity's tags and the next word does not
  continue it: ``P(y_s..y_e = B-X I-X .., y_{e+1} != I-X)`` by forward-backward. With the BIO
  constraints (``I-X`` only after ``B-X``/``I-X``) that is the probability that the entity exists
  with this type and these exact boundaries.
- **span classifier** (promptmner): the classifier's probability of the entity's type for that span.
- **per-word softmax** (pmner with ``decoder=argmax``): the product over the span's words of the
  probability of their tag, i.e. the probability of the span's tags under independent word decisions.

Positions are in the decoder's *kept-word* space (words with ``word_mask`` True, packed to the front);
the tagger maps its entities there before asking for a score.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def crf_log_tables(crf, emissions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward log-potentials of one sequence. emissions: (n, T), n >= 1.

    Returns alpha (n, T) (paths ending in tag j at t, emission t included), beta (n, T) (continuations
    after tag j at t, emission t excluded, end transition included) and log Z."""
    emissions = emissions.double()
    start = crf.start_transitions.double()  # (T,) BIO penalties included
    end = crf.end_transitions.double()  # (T,)
    trans = crf.transitions.double()  # (T, T) from -> to
    n = emissions.size(0)
    alpha = emissions.new_empty(emissions.shape)  # (n, T)
    beta = emissions.new_empty(emissions.shape)  # (n, T)
    alpha[0] = start + emissions[0]
    for t in range(1, n):
        alpha[t] = torch.logsumexp(alpha[t - 1][:, None] + trans, dim=0) + emissions[t]  # (T,)
    beta[n - 1] = end
    for t in range(n - 2, -1, -1):
        beta[t] = torch.logsumexp(trans + (emissions[t + 1] + beta[t + 1])[None, :], dim=1)  # (T,)
    log_z = torch.logsumexp(alpha[n - 1] + end, dim=0)
    return alpha, beta, log_z


@torch.no_grad()
def crf_span_marginal(crf, emissions: torch.Tensor, tags: list[int], start: int, continues: list[int],
                      tables: tuple | None = None) -> float:
    """P(y[start:start+len(tags)] = tags, and y after the span not in ``continues``) for one sequence.

    emissions: (n, T) of the kept words; ``continues``: tag ids that would extend the span (``I-X``);
    ``tables``: :func:`crf_log_tables` of the sequence when already computed."""
    alpha, beta, log_z = tables if tables is not None else crf_log_tables(crf, emissions)
    trans = crf.transitions.double()
    emissions = emissions.double()
    end = start + len(tags) - 1
    log_p = alpha[start, tags[0]]
    for offset in range(1, len(tags)):
        t = start + offset
        log_p = log_p + trans[tags[offset - 1], tags[offset]] + emissions[t, tags[offset]]
    if end == emissions.size(0) - 1:
        log_p = log_p + beta[end, tags[-1]]  # = the end transition
    else:
        after = trans[tags[-1]] + emissions[end + 1] + beta[end + 1]  # (T,) every tag of word end+1
        allowed = torch.ones_like(after, dtype=torch.bool)
        allowed[continues] = False
        log_p = log_p + torch.logsumexp(after[allowed], dim=0)
    return float(torch.exp(log_p - log_z).clamp(0.0, 1.0))


def entity_score(record: dict, row: int, start: int, end: int, tag_ids: list[int], entity_type: str,
                 labels: list[str], *, word_positions: list[int] | None = None) -> float:
    """Score of one predicted entity of post ``row`` from its decoder record.

    ``start``/``end`` (inclusive) are kept-word positions; ``tag_ids`` the entity's label ids;
    ``word_positions`` the entity's original word columns (only the per-word softmax reads them)."""
    kind = record["kind"]
    if kind == "crf":
        mask = record["mask"][row]  # (W,) packed: kept words first
        length = int(mask.sum())
        emissions = record["emissions"][row, :length].float().cpu()  # (n, T)
        continues = [i for i, label in enumerate(labels) if label == f"I-{entity_type}"]
        tables = record.setdefault("tables", {})  # per row: one forward-backward for all its entities
        if row not in tables:
            tables[row] = crf_log_tables(record["crf"], emissions)
        return crf_span_marginal(record["crf"], emissions, tag_ids, start, continues, tables[row])
    if kind == "spans":
        starts, ends = record["starts"], record["ends"]
        match = ((starts == start) & (ends == end)).nonzero().flatten()
        if match.numel() == 0:
            return float("nan")  # longer than the classifier's widest span: cannot come from it
        return float(record["probs"][row, int(match[0]), 1 + record["types"].index(entity_type)])
    if kind == "softmax":
        probs = record["scores"][row].float().softmax(dim=-1).cpu()  # (W, T)
        columns = word_positions if word_positions is not None else list(range(start, end + 1))
        return float(torch.prod(torch.stack([probs[c, t] for c, t in zip(columns, tag_ids)])))
    raise ValueError(f"unknown decoder record kind {kind!r}")


def pick_record(records: list[dict], model) -> dict | None:
    """The record of the decoder that produced the model's tags: the CRF that is ``model.crf`` (ESPVR also
    decodes a type-less span CRF first), else the last span or softmax record."""
    crf = getattr(model, "crf", None)
    for record in reversed(records):
        if record["kind"] == "crf" and record["crf"] is crf:
            return record
    for record in reversed(records):
        if record["kind"] in ("spans", "softmax"):
            return record
    return None


def decoder_kind(record: dict | None) -> str:
    """How this model's scores are defined (recorded in ``<out>.json``)."""
    return {"crf": "crf_span_marginal", "spans": "span_classifier_probability",
            "softmax": "word_softmax_product"}.get(record["kind"] if record else "", "none")
