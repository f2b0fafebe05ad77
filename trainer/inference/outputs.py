"""What tagging writes: JSONL, CoNLL, Parquet, and with gold tags an error table and a type confusion matrix.

Every writer takes the tagger's :class:`mner.trainer.inference.tagger.TaggedPost` list. Files are
written to a temporary name and renamed, so a fault leaves the previous file intact. Whether ``--out``
may be written at all is the one output rule of :mod:`mner.pipeline.outputs` (kind "predictions").
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from mner.pipeline.outputs import OutputError, predictions_record
from mner.pipeline.tags import extract_entities

FORMATS = {".conll": "conll", ".txt": "conll", ".jsonl": "jsonl", ".parquet": "parquet"}
NONE = "(none)"  # the row / column of the confusion matrix for "no entity with this span"


def output_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise OutputError(f"--out {path}: unknown format {path.suffix!r}; valid suffixes: {', '.join(FORMATS)}")
    return fmt


def record_path(out: Path) -> Path:
    return predictions_record(out)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------- one format each


def entity_dict(entity) -> dict:
    return {"type": entity.type, "text": entity.text, "token_start": entity.token_start,
            "token_end": entity.token_end, "char_start": entity.char_start, "char_end": entity.char_end,
            "score": None if entity.score != entity.score else round(entity.score, 6)}  # NaN -> null


def post_dict(post) -> dict:
    out = {"post_id": post.post_id, "image_id": post.image_id, "image_status": post.image_status,
           "text": post.text, "tokens": list(post.tokens), "tags": list(post.tags),
           "entities": [entity_dict(e) for e in post.entities]}
    if post.gold is not None:
        out["gold"] = list(post.gold)
    return out


def write_jsonl(path: Path, posts: Sequence) -> None:
    """One post per line: id, image, text, tokens, predicted tags, entities (with offsets and score), gold."""
    text = "".join(json.dumps(post_dict(post), ensure_ascii=False) + "\n" for post in posts)
    write_text_atomic(path, text)


def write_conll(path: Path, posts: Sequence) -> None:
    """``token gold pred`` per line (``token pred`` without gold), ``IMGID:`` lines, blank line between posts."""
    lines = []
    for post in posts:
        if post.image_id is not None:
            lines.append(f"IMGID:{post.image_id}")
        for i, (token, tag) in enumerate(zip(post.tokens, post.tags)):
            lines.append("\t".join([token, post.gold[i], tag] if post.gold is not None else [token, tag]))
        lines.append("")
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_parquet(path: Path, posts: Sequence) -> None:
    """One row per word: post_id, image_id, token_index, token, gold (null without tags), pred, and
    score (the score of the predicted entity the word belongs to; null outside entities)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ("post_id", "image_id", "token_index", "token", "gold", "pred", "score")
    columns: dict[str, list] = {k: [] for k in names}
    for post in posts:
        word_score: dict[int, float] = {}
        for entity in post.entities:
            for i in range(entity.token_start, entity.token_end):
                word_score[i] = None if entity.score != entity.score else entity.score
        for i, (token, tag) in enumerate(zip(post.tokens, post.tags)):
            columns["post_id"].append(post.post_id)
            columns["image_id"].append(post.image_id)
            columns["token_index"].append(i)
            columns["token"].append(token)
            columns["gold"].append(post.gold[i] if post.gold is not None else None)
            columns["pred"].append(tag)
            columns["score"].append(word_score.get(i))
    schema = pa.schema([("post_id", pa.string()), ("image_id", pa.string()), ("token_index", pa.int32()),
                        ("token", pa.string()), ("gold", pa.string()), ("pred", pa.string()),
                        ("score", pa.float64())])
    _atomic_write(path, lambda tmp: pq.write_table(pa.table(columns, schema=schema), tmp))


WRITERS = {"conll": write_conll, "jsonl": write_jsonl, "parquet": write_parquet}


# ----------------------------------------------------------------------------- error analysis


def post_errors(tokens: Sequence[str], gold: Sequence[str], pred: Sequence[str]) -> dict[str, list]:
    """Entities of one post by outcome (exact spans, seqeval's chunking):

    correct (same span and type), wrong_type (same span, other type: ``(gold, pred, span)``), missed (a
    gold span no prediction has), spurious (a predicted span no gold entity has). A boundary error
    is one missed plus one spurious entity."""
    gold_spans = {(s, e): t for t, s, e in extract_entities(list(gold))}
    pred_spans = {(s, e): t for t, s, e in extract_entities(list(pred))}

    def words(span):
        return " ".join(tokens[span[0]:span[1] + 1])

    out: dict[str, list] = {"correct": [], "wrong_type": [], "missed": [], "spurious": []}
    for span, gold_type in gold_spans.items():
        if span not in pred_spans:
            out["missed"].append((gold_type, words(span), span))
        elif pred_spans[span] == gold_type:
            out["correct"].append((gold_type, words(span), span))
        else:
            out["wrong_type"].append((gold_type, pred_spans[span], words(span), span))
    for span, pred_type in pred_spans.items():
        if span not in gold_spans:
            out["spurious"].append((pred_type, words(span), span))
    return out


def confusion_counts(posts: Sequence) -> tuple[list[str], Counter]:
    """Type confusion over exact spans: (gold type, predicted type) counts; ``(none)`` for missed
    (gold, none) and spurious (none, pred) entities. Returns the sorted types and the counter."""
    counts: Counter = Counter()
    for post in posts:
        errors = post_errors(post.tokens, post.gold, post.tags)
        for entity_type, _, _ in errors["correct"]:
            counts[(entity_type, entity_type)] += 1
        for gold_type, pred_type, _, _ in errors["wrong_type"]:
            counts[(gold_type, pred_type)] += 1
        for entity_type, _, _ in errors["missed"]:
            counts[(entity_type, NONE)] += 1
        for entity_type, _, _ in errors["spurious"]:
            counts[(NONE, entity_type)] += 1
    types = sorted({t for pair in counts for t in pair} - {NONE})
    return types, counts


def write_error_table(stem: Path, posts: Sequence) -> dict[str, str]:
    """``<stem>.errors.csv`` (one row per post with gold tags), ``<stem>.confusion.csv`` and
    ``<stem>.confusion.png``. Returns the paths written by kind."""
    labelled = [post for post in posts if post.gold is not None]
    rows = []
    for post in labelled:
        errors = post_errors(post.tokens, post.gold, post.tags)

        def show(items, kind):
            if kind == "wrong_type":
                return "; ".join(f"{text} [{g}->{p}]" for g, p, text, _ in items)
            return "; ".join(f"{text} [{t}]" for t, text, _ in items)

        rows.append({"post_id": post.post_id, "image_id": post.image_id or "", "text": post.text,
                     "gold": len(extract_entities(list(post.gold))), "pred": len(post.entities),
                     "correct": len(errors["correct"]), "missed": show(errors["missed"], "missed"),
                     "spurious": show(errors["spurious"], "spurious"),
                     "wrong_type": show(errors["wrong_type"], "wrong_type"),
                     "errors": len(errors["missed"]) + len(errors["spurious"]) + len(errors["wrong_type"])})
    paths = {"errors_csv": Path(f"{stem}.errors.csv"), "confusion_csv": Path(f"{stem}.confusion.csv"),
             "confusion_png": Path(f"{stem}.confusion.png")}

    def write_rows(tmp: Path, header: list[str], table: list[list]) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(table)

    header = ["post_id", "image_id", "text", "gold", "pred", "correct", "errors", "missed", "spurious", "wrong_type"]
    _atomic_write(paths["errors_csv"], lambda tmp: write_rows(tmp, header, [[r[k] for k in header] for r in rows]))
    types, counts = confusion_counts(labelled)
    axis = [*types, NONE]
    matrix = [[counts.get((g, p), 0) for p in axis] for g in axis]
    _atomic_write(paths["confusion_csv"], lambda tmp: write_rows(
        tmp, ["gold \\ pred", *axis], [[g, *row] for g, row in zip(axis, matrix)]))
    _atomic_write(paths["confusion_png"], lambda tmp: plot_confusion(tmp, axis, matrix))
    return {kind: str(path) for kind, path in paths.items()}


def plot_confusion(path: Path, axis: list[str], matrix: list[list[int]]) -> None:
    """Heat map of the type confusion matrix, counts in the cells (gold rows, predicted columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 1.2 + 0.7 * len(axis)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(axis)), axis, rotation=45, ha="right")
    ax.set_yticks(range(len(axis)), axis)
    ax.set_xlabel("predicted type")
    ax.set_ylabel("gold type")
    ax.set_title("entity type confusion (exact spans)")
    peak = max((v for row in matrix for v in row), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
