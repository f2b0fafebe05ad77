"""BIO tags, read one way everywhere: the scorer, the label counts, span models and training repair.

Chunking rule (seqeval's default, conlleval-style mode): an entity starts at ``B-X``, or at ``I-X``
when the previous tag is ``O`` or has another type (an orphan ``I-`` starts an entity); it ends before
``O``, before any ``B-``, and before a tag of another type. ``I-X`` after ``B-Y`` therefore closes ``Y``
and opens ``X``. Twitter-2015 test has 5207 gold entities under this rule (5072 counting ``B-`` tags only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Entity = tuple[str, int, int]  # (type, first word, last word), inclusive


def split_tag(tag: str) -> tuple[str, str]:
    """``B-PER`` -> ("B", "PER"), ``O`` -> ("O", ""); anything else is not BIO."""
    if tag == "O":
        return "O", ""
    prefix, _, entity_type = tag.partition("-")
    if prefix not in ("B", "I") or not entity_type:
        raise ValueError(f"tag {tag!r} is not BIO (expected O, B-TYPE or I-TYPE)")
    return prefix, entity_type


def extract_entities(tags: Sequence[str]) -> list[Entity]:
    """Entities of one tag sequence, chunked exactly like seqeval's default mode."""
    entities: list[Entity] = []
    start, current = -1, ""  # open entity: first word and type ("" when none is open)
    for i, tag in enumerate(tags):
        prefix, entity_type = split_tag(tag)
        continues = prefix == "I" and entity_type == current
        if current and not continues:
            entities.append((current, start, i - 1))
            current = ""
        if prefix != "O" and not continues:
            start, current = i, entity_type
    if current:
        entities.append((current, start, len(tags) - 1))
    return entities


def repair_bio(tags: Iterable[str]) -> tuple[list[str], int]:
    """Orphan I-X (not after B-X/I-X) -> B-X, so a BIO-constrained CRF can train on every post; also
    turns a model's argmax path into valid BIO. Returns the repaired tags and how many changed."""
    repaired, count, previous = [], 0, "O"
    for tag in tags:
        if tag.startswith("I-") and previous not in (f"B-{tag[2:]}", tag):
            tag, count = f"B-{tag[2:]}", count + 1
        repaired.append(tag)
        previous = tag
    return repaired, count
