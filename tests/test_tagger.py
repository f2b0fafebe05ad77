"""The Tagger API, entity scores per decoder, and the prediction outputs (JSONL, CoNLL, Parquet, error table)."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from helpers.data import write_generated_splits

from mner.trainer.cli import main
from mner.trainer.evaluation.evaluate import extract_entities
from mner.trainer.inference.scores import crf_span_marginal, entity_score
from mner.trainer.models.layers import BIOConstrainedCRF

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


# ----------------------------------------------------------------------------- scores


@torch.no_grad()
def brute_force_entity_probability(crf, emissions, entity) -> float:
    """Sum of the probabilities of every tag path whose entities (seqeval chunking) include ``entity``."""
    n, num_tags = emissions.shape
    weights, hits = [], []
    for path in itertools.product(range(num_tags), repeat=n):
        score = crf.start_transitions[path[0]] + emissions[0, path[0]] + crf.end_transitions[path[-1]]
        for t in range(1, n):
            score = score + crf.transitions[path[t - 1], path[t]] + emissions[t, path[t]]
        weights.append(float(score))
        hits.append(entity in extract_entities([LABELS[i] for i in path]))
    log_z = torch.logsumexp(torch.tensor(weights, dtype=torch.float64), 0)
    return sum(math.exp(w - float(log_z)) for w, hit in zip(weights, hits) if hit)


@pytest.mark.parametrize("seed", range(3))
def test_crf_span_marginal_is_the_entity_probability(seed):
    torch.manual_seed(seed)
    crf = BIOConstrainedCRF(LABELS)
    for name in ("start_transitions", "end_transitions", "transitions"):
        torch.nn.init.normal_(crf._parameters[name], std=1.0)
    emissions = torch.randn(4, len(LABELS), dtype=torch.float64) * 2
    total = 0.0
    for entity_type, (start, end) in itertools.product(("PER", "LOC"), [(0, 0), (1, 2), (0, 3), (3, 3), (2, 3)]):
        tags = [LABELS.index(f"B-{entity_type}")] + [LABELS.index(f"I-{entity_type}")] * (end - start)
        continues = [LABELS.index(f"I-{entity_type}")]
        got = crf_span_marginal(crf, emissions, tags, start, continues)
        want = brute_force_entity_probability(crf, emissions, (entity_type, start, end))
        assert got == pytest.approx(want, abs=1e-9)
        total += got
    assert total > 0  # the spans checked carry probability mass


def test_span_classifier_and_word_softmax_scores():
    probs = torch.tensor([[[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.05, 0.15, 0.8]]])  # (B=1, S=3, 1 + 2 types)
    record = {"kind": "spans", "probs": probs, "starts": torch.tensor([0, 1, 0]), "ends": torch.tensor([0, 1, 1]),
              "types": ["PER", "LOC"]}
    assert entity_score(record, 0, 0, 1, [1, 2], "LOC", LABELS) == pytest.approx(0.8)
    assert entity_score(record, 0, 0, 0, [1], "PER", LABELS) == pytest.approx(0.7)
    assert math.isnan(entity_score(record, 0, 2, 3, [1, 2], "PER", LABELS))  # wider than any scored span
    scores = torch.log(torch.tensor([[[0.1, 0.6, 0.1, 0.1, 0.1], [0.2, 0.0, 0.5, 0.2, 0.1]]]))  # (1, W=2, T)
    record = {"kind": "softmax", "scores": scores, "word_mask": torch.ones(1, 2, dtype=torch.bool)}
    assert entity_score(record, 0, 0, 1, [1, 2], "PER", LABELS) == pytest.approx(0.6 * 0.5)


# ----------------------------------------------------------------------------- the Tagger on a trained run


@pytest.fixture(scope="module")
def crf_run(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("tagger")
    (root / "data").mkdir()
    data = write_generated_splits(root / "data", seed=5, sizes=(40, 10, 10))
    out = root / "run"
    assert main(["--data", str(data), "--model", "bert_crf", "--text-encoder", str(tiny_bert), "--epochs", "3",
                 "--batch-size", "8", "--max-length", "32", "--device", "cpu", "--seed", "1", "--out", str(out),
                 "--set", "dropout=0.0", "--set", "head_lr=5e-3", "--set", "crf_lr=5e-2"]) == 0
    return out, data


def test_tagger_strings_tokens_offsets_and_batch_independence(crf_run):
    import mner

    run, _ = crf_run
    tagger = mner.Tagger.from_run(run, device="cpu", batch_size=3)
    texts = ["rt  john smith visit   paris", "apple and google in london", "", "love the game at paris today",
             "the city of london", "john smith is new"]
    batch = tagger(texts)
    assert [p.text for p in batch] == texts and batch[2].tokens == () and batch[2].entities == []
    assert sum(len(p.entities) for p in batch) > 0  # the checks below see entities
    for post in batch:
        assert len(post.tags) == len(post.tokens) == len(post.text.split())
        assert [(e.type, e.token_start, e.token_end - 1) for e in post.entities] == extract_entities(post.tags)
        for entity in post.entities:
            assert post.text[entity.char_start:entity.char_end] == entity.text  # offsets into the input string
            assert 0.0 <= entity.score <= 1.0
    for text, together in zip(texts, batch):  # one at a time = in a batch: no batch-mate effect
        alone = tagger(text)
        assert alone.tags == together.tags
        assert [e.score for e in alone.entities] == pytest.approx([e.score for e in together.entities], abs=1e-5)
    tokens = tagger([["john", "smith", "in", "paris"]])[0]  # tokens as given; offsets into the joined text
    assert tokens.text == "john smith in paris"
    assert tokens.tags == tagger("john smith in paris").tags


def test_predict_cli_is_the_tagger_path_and_writes_every_format(crf_run, tmp_path):
    import pyarrow.parquet as pq

    from mner.pipeline.data import load_dataset
    from mner.trainer.inference.tagger import Tagger

    run, data = crf_run
    test_file = data / "test.txt"
    outputs = {suffix: tmp_path / f"tagged{suffix}" for suffix in (".conll", ".jsonl", ".parquet")}
    for out in outputs.values():
        assert main(["predict", str(run), "--data", str(test_file), "--out", str(out), "--device", "cpu"]) == 0
    posts = load_dataset(test_file).splits["test"]
    expected = Tagger.from_run(run, device="cpu").tag_posts(posts)
    lines = [json.loads(line) for line in outputs[".jsonl"].read_text().splitlines()]
    assert [line["tags"] for line in lines] == [p.tags for p in expected]
    assert [line["gold"] for line in lines] == [list(p.tags) for p in posts]
    conll = [line.split("\t") for line in outputs[".conll"].read_text().splitlines() if "\t" in line]
    assert all(len(fields) == 3 for fields in conll)  # token gold pred
    assert [f[2] for f in conll] == [t for p in expected for t in p.tags]
    table = pq.read_table(outputs[".parquet"]).to_pydict()
    assert table["pred"] == [t for p in expected for t in p.tags]
    assert [s is not None for s in table["score"]] == [t != "O" for t in table["pred"]]
    record = json.loads((tmp_path / "tagged.jsonl.json").read_text())
    assert record["score"] == "crf_span_marginal" and record["posts"] == len(posts)
    assert record["image_status"] == {"no_image": len(posts)}  # text-only model: images never read
    assert set(record["files"]) == {"errors_csv", "confusion_csv", "confusion_png"}
    assert (tmp_path / "tagged.confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_never_replaces_its_input_or_a_foreign_file(crf_run, tmp_path, capsys):
    run, data = crf_run
    gold = tmp_path / "gold.txt"
    gold.write_text((data / "test.txt").read_text())
    before = gold.read_text()
    assert main(["predict", str(run), "--data", str(gold), "--out", str(gold), "--device", "cpu"]) == 2
    assert "is also an input" in capsys.readouterr().err and gold.read_text() == before
    foreign = tmp_path / "notes.conll"
    foreign.write_text("mine\n")
    assert main(["predict", str(run), "--data", str(gold), "--out", str(foreign), "--device", "cpu",
                 "--overwrite"]) == 2
    assert "is not an mner prediction file" in capsys.readouterr().err and foreign.read_text() == "mine\n"
    ours = tmp_path / "tagged.jsonl"  # our own output: replaced only with --overwrite
    assert main(["predict", str(run), "--data", str(gold), "--out", str(ours), "--device", "cpu"]) == 0
    assert main(["predict", str(run), "--data", str(gold), "--out", str(ours), "--device", "cpu"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["predict", str(run), "--data", str(gold), "--out", str(ours), "--device", "cpu", "--overwrite"]) == 0
    assert main(["predict", str(run), "--data", str(gold), "--out", str(tmp_path / "x.csv"), "--device", "cpu"]) == 2
    assert "valid suffixes" in capsys.readouterr().err


# ----------------------------------------------------------------------------- error analysis


def test_error_table_and_confusion_matrix(tmp_path):
    import csv

    from mner.trainer.inference.outputs import confusion_counts, post_errors, write_error_table
    from mner.trainer.inference.tagger import TaggedPost

    tokens = ("john", "smith", "in", "paris", "and", "apple", "rocks")
    gold = ["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "O"]
    pred = ["B-PER", "O", "O", "B-PER", "O", "O", "B-MISC"]
    errors = post_errors(tokens, gold, pred)
    assert errors["wrong_type"] == [("LOC", "PER", "paris", (3, 3))]
    assert [(t, w) for t, w, _ in errors["missed"]] == [("PER", "john smith"), ("ORG", "apple")]
    assert [(t, w) for t, w, _ in errors["spurious"]] == [("PER", "john"), ("MISC", "rocks")]
    post = TaggedPost(" ".join(tokens), tokens, pred, [], gold, "p1", "17", "ok")
    types, counts = confusion_counts([post])
    assert types == ["LOC", "MISC", "ORG", "PER"]
    assert counts[("LOC", "PER")] == 1 and counts[("PER", "(none)")] == 1 and counts[("(none)", "MISC")] == 1
    files = write_error_table(tmp_path / "out", [post])
    with open(files["errors_csv"], encoding="utf-8") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["wrong_type"] == "paris [LOC->PER]" and row["errors"] == "5" and row["correct"] == "0"
    with open(files["confusion_csv"], encoding="utf-8") as handle:
        matrix = list(csv.reader(handle))
    assert matrix[0] == ["gold \\ pred", "LOC", "MISC", "ORG", "PER", "(none)"]
    assert matrix[1] == ["LOC", "0", "0", "0", "1", "0"]
