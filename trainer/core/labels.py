"""The label set of a run: entity types of the training split (plus ``--labels``), never of dev or test.

A type seen only in dev/test cannot be predicted by the model; it is reported with its entity
counts, scored as misses (its gold entities stay in the denominators) and listed in metrics.json.
Types that differ only by case (``PER`` / ``per``) are an error naming where each spelling occurs:
mner does not guess whether they mean the same type.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from mner.pipeline.data import LABEL_TYPES, Post
from mner.pipeline.tags import extract_entities
from mner.trainer.core.config import ConfigError


def entity_type_counts(posts: Iterable[Post]) -> Counter:
    """Gold entities per type (chunked like the scorer)."""
    counts: Counter = Counter()
    for post in posts:
        counts.update(kind for kind, _, _ in extract_entities(post.tags or ()))
    return counts


def parse_label_types(raw: str | Sequence[str] | None) -> list[str]:
    """``--labels PER,LOC,EVENT`` -> ["PER", "LOC", "EVENT"]; types, not tags."""
    if raw is None:
        return []
    items = [x.strip() for x in (raw.split(",") if isinstance(raw, str) else raw) if x.strip()]
    bad = [
        x for x in items
        if x.startswith(("B-", "I-")) or x == "O" or not x.replace("_", "").replace("-", "").isalnum()
    ]
    if bad:
        raise ConfigError(
            f"--labels {','.join(items)}: {bad} are not entity types; give types, e.g. --labels PER,LOC,EVENT"
        )
    return list(dict.fromkeys(items))


def check_case_conflicts(splits: dict[str, Sequence[Post]], extra: Sequence[str] = ()) -> None:
    """Two spellings of one type differing only by case are an error naming where each occurs."""
    where: dict[str, str] = {kind: "--labels" for kind in extra}
    for posts in splits.values():
        for post in posts:
            for tag in post.tags or ():
                if tag != "O":
                    where.setdefault(tag[2:], post.source)
    by_upper: dict[str, list[str]] = {}
    for kind in where:
        by_upper.setdefault(kind.upper(), []).append(kind)
    for spellings in by_upper.values():
        if len(spellings) > 1:
            found = ", ".join(f"{kind!r} ({where[kind]})" for kind in sorted(spellings))
            raise ConfigError(f"entity types {found} differ only by case; write one spelling in every file "
                              "(mner does not merge them)")


def build_labels(train_posts: Sequence[Post], extra: Sequence[str] = ()) -> list[str]:
    """``O`` then B-/I- of every type of the training split and ``extra``: the standard types
    (PER, LOC, ORG, MISC) first in that order, then the others sorted."""
    found = set(entity_type_counts(train_posts)) | set(extra)
    types = [t for t in LABEL_TYPES if t in found] + sorted(found - set(LABEL_TYPES))
    if not types:
        raise ConfigError("the training split has no entity at all; check the tags of train.txt")
    return ["O"] + [f"{prefix}-{kind}" for kind in types for prefix in ("B", "I")]


def unseen_types(posts: Sequence[Post], labels: Sequence[str]) -> dict[str, int]:
    """Gold entity counts of types the label set lacks."""
    known = {label[2:] for label in labels if label != "O"}
    return {kind: n for kind, n in sorted(entity_type_counts(posts).items()) if kind not in known}


def describe_unseen(split: str, unseen: dict[str, int]) -> str:
    listed = ", ".join(f"{kind} ({n} entities)" for kind, n in unseen.items())
    return (f"{split}: entity types the model was not trained on: {listed}; they are scored as misses "
            "(add them with --labels TYPE,... to make them model labels)")
