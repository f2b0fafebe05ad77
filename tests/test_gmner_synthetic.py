"""Acceptance: GMNER on generated data where only the picture says which region a name refers to.

Every post mentions one person by a name that says nothing about the picture; each picture holds three
drawn rectangles and the person is the red one (a quarter of the pictures have none: no box). Stage 1
runs for real (``mner-features extract`` with the ``blobs-test`` detector of tests/helpers/gmner.py and
the tiny CLIP), then ``mner-train --boxes``. Text alone cannot pick the region: a tagger without the
grounding head predicts every entity without a box and gets only the unboxed quarter right; with the
head, the cached crop embeddings decide. Also checks the reader's counts against the generator's truth,
the evaluation switches, and a ``--no-images`` cache (coverage 0, still trains and evaluates).
"""

from __future__ import annotations

import json

import pytest
from helpers.gmner import register_blob_detector, write_gmner_dataset

POSTS = {"train": 48, "dev": 16, "test": 32}
COMMON = ["--epochs", "6", "--batch-size", "8", "--encoder-lr", "1e-3", "--head-lr", "3e-3", "--crf-lr", "5e-2",
          "--patience", "0", "--seed", "13", "--device", "cpu", "--max-length", "24"]


def extract(data, out, *, images=None):
    from mner.features.cli import main as features_main

    register_blob_detector()
    source = ["--images", str(images)] if images is not None else ["--no-images"]
    argv = ["extract", "--data", str(data), *source, "--out", str(out), "--random-init", "--detector", "blobs-test",
            "--score-threshold", "0", "--top-k", "5", "--detector-min-size", "64", "--encoder", "clip",
            "--clip-model", "clip-test", "--batch-size", "32", "--device", "cpu", "--no-progress"]
    assert features_main(argv) in (0, None)


def train(run, data, cache, bert, *extra):
    from mner.trainer.cli import main as train_main

    argv = ["--features", str(cache), "--data", str(data), "--model", "bert_crf", "--text-encoder", str(bert),
            "--out", str(run), *COMMON, *extra]
    assert train_main(argv) == 0, " ".join(argv)
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_the_grounding_head_picks_the_region_the_picture_decides(tmp_path, tiny_bert):
    from mner.trainer.cli import main as train_main

    data, images, xml, cache = tmp_path / "data", tmp_path / "images", tmp_path / "xml", tmp_path / "gmner.h5"
    truth = write_gmner_dataset(data, images, xml, posts=POSTS)
    extract(data, cache, images=images)

    grounded = train(tmp_path / "head", data, cache, tiny_bert, "--boxes", str(xml))
    soft = train(tmp_path / "soft", data, cache, tiny_bert, "--boxes", str(xml), "--set", "gmner_targets=soft")
    text_only = train(tmp_path / "text", data, cache, tiny_bert, "--epochs", "4")  # no --boxes: no head
    assert train_main(["evaluate", str(tmp_path / "text"), "--split", "test", "--boxes", str(xml),
                       "--device", "cpu"]) == 0
    (baseline,) = [json.loads(p.read_text()) for p in (tmp_path / "text" / "eval").glob("test-*.json")]

    for split in ("train", "dev", "test"):  # the reader agrees with the generator
        counts = grounded["gmner"]["reader"][split]
        assert (counts["entities"], counts["boxed"], counts["scaled_images"]) == (
            truth[split]["entities"], truth[split]["boxed"], truth[split]["scaled"]), split
    test = grounded["test"]
    assert test["box_coverage"] == {"entities": 32, "boxed": truth["test"]["boxed"],
                                    "covered": truth["test"]["boxed"], "share": 1.0}  # the detector finds them all
    assert grounded["gmner"]["train_coverage"]["share"] == 1.0
    print("GMNER F1: head", test["gmner"]["f1"], "soft", soft["test"]["gmner"]["f1"], "text only",
          baseline["gmner"]["f1"])
    assert text_only["test"]["micro"]["f1"] >= 0.9, "the tagger alone finds the names"
    assert baseline["gmner"]["f1"] <= 0.3, "without the head only the unboxed quarter can be right"
    assert test["mner"]["f1"] >= 0.9 and test["mner"]["f1"] == test["micro"]["f1"]
    assert test["gmner"]["f1"] >= baseline["gmner"]["f1"] + 0.45, (test, baseline)
    assert soft["test"]["gmner"]["f1"] >= baseline["gmner"]["f1"] + 0.3
    assert test["gmner_settings"] == {"iou": 0.5, "compare": ">=", "uncovered": "hindex"}
    lines = (tmp_path / "head" / "predictions" / "test.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert {"pred", "gold", "image_id"} <= set(first) and all("box" in p for p in first["pred"])
    assert (tmp_path / "head" / "predictions" / "test.conll").read_text().splitlines()[1].count("\t") == 2

    # the report's GMNER columns; the figure of one post (and a clear note when its picture is gone)
    from mner.trainer.experiments.report import report
    from mner.trainer.gmner.figures import show_post

    rows = report([tmp_path / "head", tmp_path / "soft"], out=tmp_path / "report", bootstrap=10)["rows"]
    assert {round(r["test_GMNER_F1_mean"], 6) for r in rows} == {100 * test["gmner"]["f1"],
                                                                100 * soft["test"]["gmner"]["f1"]}
    assert all(r["test_box_coverage"] == 100.0 for r in rows)
    assert "## GMNER" in (tmp_path / "report" / "results.md").read_text()
    png, note = show_post(tmp_path / "head", "test-0")
    assert png.is_file() and note is None and png.stat().st_size > 0
    _, note = show_post(tmp_path / "head", first["image_id"], images=tmp_path / "nowhere", out=tmp_path / "x.png")
    assert "not available" in note

    # the evaluation switches are recorded; MQSPN and H-Index agree when every boxed entity is covered
    assert train_main(["evaluate", str(tmp_path / "head"), "--split", "test", "--uncovered", "mqspn",
                       "--iou-compare", ">", "--device", "cpu"]) == 0
    (mqspn,) = (tmp_path / "head" / "eval").glob("test-*-gmner-mqspn-iougt0.5.json")
    result = json.loads(mqspn.read_text())
    assert result["gmner_settings"] == {"iou": 0.5, "compare": ">", "uncovered": "mqspn"}
    assert result["mner"] == test["mner"]


@pytest.mark.slow
def test_a_no_images_cache_trains_and_evaluates_with_coverage_zero(tmp_path, tiny_bert):
    from mner.trainer.cli import main as train_main

    data, images, xml, cache = tmp_path / "data", tmp_path / "images", tmp_path / "xml", tmp_path / "blind.h5"
    truth = write_gmner_dataset(data, images, xml, posts={"train": 16, "dev": 8, "test": 8})
    extract(data, cache)
    metrics = train(tmp_path / "run", data, cache, tiny_bert, "--boxes", str(xml), "--epochs", "1",
                    "--allow-missing-images")
    coverage = metrics["test"]["box_coverage"]
    assert coverage == {"entities": 8, "boxed": truth["test"]["boxed"], "covered": 0, "share": 0.0}
    assert metrics["test"]["gmner"]["correct"] <= 8 - truth["test"]["boxed"]  # only unboxed entities can be right
    assert train_main(["evaluate", str(tmp_path / "run"), "--split", "test", "--device", "cpu",
                       "--uncovered", "mqspn"]) == 0
    (result,) = (tmp_path / "run" / "eval").glob("test-*mqspn*.json")
    assert json.loads(result.read_text())["box_coverage"]["covered"] == 0
