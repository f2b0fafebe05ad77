"""Entity-level metrics must equal seqeval's default mode, orphan I- tags and odd transitions included."""

from __future__ import annotations

import random

import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from mner.pipeline.tags import extract_entities
from mner.trainer.evaluation.evaluate import entity_scores, read_conll_predictions, write_conll

TAGS = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]


def random_sequences(rng: random.Random, n: int) -> list[list[str]]:
    return [[rng.choice(TAGS) for _ in range(rng.randint(1, 12))] for _ in range(n)]


def test_chunking_rules():
    assert extract_entities(["I-PER", "I-PER", "O"]) == [("PER", 0, 1)]  # orphan I- starts an entity
    assert extract_entities(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]  # I-X after B-Y
    assert extract_entities(["B-PER", "B-PER"]) == [("PER", 0, 0), ("PER", 1, 1)]
    assert extract_entities(["O", "I-ORG", "B-ORG", "I-ORG"]) == [("ORG", 1, 1), ("ORG", 2, 3)]
    assert extract_entities(["B-MISC", "I-MISC", "I-MISC"]) == [("MISC", 0, 2)]
    assert extract_entities([]) == []
    assert extract_entities(["O", "O"]) == []
    # the spans PromptMNER trains on come from the same chunker: orphans and type changes open entities
    tags = ["B-PER", "I-PER", "I-LOC", "O", "I-ORG", "B-ORG", "I-ORG"]
    assert extract_entities(tags) == [("PER", 0, 1), ("LOC", 2, 2), ("ORG", 4, 4), ("ORG", 5, 6)]
    with pytest.raises(ValueError, match="not BIO"):
        extract_entities(["X-PER"])


@pytest.mark.parametrize("seed", range(5))
def test_matches_seqeval_on_random_sequences(seed):
    rng = random.Random(seed)
    gold = random_sequences(rng, 200)
    # predictions: gold with some tags changed, so there are hits and misses of every kind
    pred = [[t if rng.random() < 0.7 else rng.choice(TAGS) for t in seq] for seq in gold]
    scores = entity_scores(gold, pred)
    assert round(scores["micro"]["precision"], 4) == round(precision_score(gold, pred), 4)
    assert round(scores["micro"]["recall"], 4) == round(recall_score(gold, pred), 4)
    assert round(scores["micro"]["f1"], 4) == round(f1_score(gold, pred), 4)
    report = classification_report(gold, pred, output_dict=True)
    for entity_type, s in scores["per_type"].items():
        assert round(s["precision"], 4) == round(report[entity_type]["precision"], 4)
        assert round(s["recall"], 4) == round(report[entity_type]["recall"], 4)
        assert round(s["f1"], 4) == round(report[entity_type]["f1-score"], 4)
        assert s["gold"] == report[entity_type]["support"]
    assert scores["micro"]["gold"] == report["micro avg"]["support"]


def test_orphan_counts_as_entity_like_conlleval():
    gold = [["I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "O", "B-LOC"]]  # a repaired orphan predicts the same span
    scores = entity_scores(gold, pred)
    assert scores["micro"]["gold"] == 2 and scores["micro"]["correct"] == 2
    assert scores["micro"]["f1"] == pytest.approx(f1_score(gold, pred)) == 1.0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="sequence 0"):
        entity_scores([["O", "B-PER"]], [["O"]])


def test_conll_round_trip(tmp_path):
    from mner.pipeline.data import Post

    posts = [
        Post("test-0", ("RT", "John"), ("O", "B-PER"), "17", "test", "x:1"),
        Post("test-1", ("Paris",), ("B-LOC",), None, "test", "x:5"),
    ]
    pred = [["O", "B-PER"], ["O"]]
    write_conll(tmp_path / "p.conll", posts, pred)
    text = (tmp_path / "p.conll").read_text()
    assert text.startswith("IMGID:17\nRT\tO\tO\nJohn\tB-PER\tB-PER\n\nParis\tB-LOC\tO\n")
    gold, back = read_conll_predictions(tmp_path / "p.conll")
    assert gold == [["O", "B-PER"], ["B-LOC"]] and back == pred
