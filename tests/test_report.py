"""`mner-train report`: aggregation beside the papers, flags, low-resource curve, paired bootstrap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mner.trainer.cli import main
from mner.trainer.experiments.paper_results import PAPER_RESULTS, paper_result
from mner.trainer.experiments.report import FAST_FLAG, RunRecord, aggregate, markdown
from mner.trainer.experiments.significance import paired_bootstrap, post_counts


def scores(f1: float, per_type: dict[str, float]) -> dict:
    return {"micro": {"precision": f1, "recall": f1, "f1": f1},
            "per_type": {t: {"f1": v} for t, v in per_type.items()}}


def record(config_id: str, seed: int, f1: float, *, model="vcrmner", preset="paper", setting="t15",
           fraction=1.0, protocol="in-domain", flags=()) -> RunRecord:
    return RunRecord(Path("x"), config_id, seed, model, preset, protocol, setting, setting, fraction, setting,
                     scores(f1, {"PER": f1 + 0.1, "LOC": f1, "ORG": f1 - 0.1, "MISC": f1 - 0.3}), None,
                     [{"epoch": 1, "dev_f1": f1}], list(flags))


def test_rows_hold_mean_std_over_seeds_beside_the_paper_numbers():
    records = [record("t15/vcrmner/paper", seed, f1) for seed, f1 in ((1, 0.70), (2, 0.72), (3, 0.74))]
    records += [record("t15/vcrmner/wo-ev", 1, 0.69, preset="w/o ev", flags=[FAST_FLAG])]
    rows = {r["config"]: r for r in aggregate(records)}
    paper = rows["t15/vcrmner/paper"]
    assert paper["n_seeds"] == 3 and paper["F1_mean"] == pytest.approx(72.0) and paper["F1_std"] == pytest.approx(2.0)
    assert paper["PER_F1_mean"] == pytest.approx(82.0)
    assert (paper["paper_P"], paper["paper_R"], paper["paper_F1"]) == (75.48, 78.23, 76.83)  # VCRMNER Table 1
    assert paper["delta_F1"] == pytest.approx(72.0 - 76.83) and paper["flags"] == ""
    assert rows["t15/vcrmner/wo-ev"]["paper_F1"] == 75.42  # Table 3, w/o ev
    mixed = [record("t15/vcrmner/paper", s, 0.7) for s in (1, 2)]
    mixed[1].test_hash = "another release"
    assert "different test data" in aggregate(mixed)[0]["flags"]
    text = markdown(list(rows.values()))
    clean, flagged = text.split("## Flagged configurations")
    assert "| 72.00 ± 2.00 |" in clean and "75.48 / 78.23 / 76.83" in clean
    assert "wo-ev" not in clean and "fast-ablation" in flagged  # marked in its row, kept apart


def test_paper_table_covers_every_paper_and_per_type_where_printed():
    assert paper_result("mgipscl", "paper", "t17")["per_type"]["PER"] == 94.87
    assert paper_result("espvr", "paper", "t15-to-t17")["F1"] == 63.58
    assert paper_result("vcrmner", "paper", "t17-to-t15")["F1"] == 69.08
    assert paper_result("pmner", "full", "t15") == paper_result("pmner", "paper", "t15")
    assert {m for m, _, _ in PAPER_RESULTS} == {"bert_crf", "vcrmner", "promptmner", "pmner", "mgipscl", "espvr"}
    spec_f1 = {"bert_crf": (71.81, 83.44), "vcrmner": (76.83, 88.76), "promptmner": (78.60, 90.27),
               "pmner": (79.43, 91.31), "mgipscl": (76.86, 88.52), "espvr": (73.04, 86.52)}  # SPEC.md table
    for model, (f15, f17) in spec_f1.items():
        row = "default" if model == "bert_crf" else "paper"
        assert (paper_result(model, row, "t15")["F1"], paper_result(model, row, "t17")["F1"]) == (f15, f17)


def write_conll(path: Path, posts: list[list[tuple[str, str, str]]]) -> Path:
    path.write_text("".join("".join(f"{w}\t{g}\t{p}\n" for w, g, p in post) + "\n" for post in posts))
    return path


def test_paired_bootstrap_separates_a_better_system_and_not_an_identical_one(tmp_path):
    gold = [["B-PER", "O"], ["B-LOC", "I-LOC"], ["O", "B-ORG"]] * 20
    good = [[(f"w{i}", g, g) for i, g in enumerate(tags)] for tags in gold]
    bad = [[(f"w{i}", g, "O" if n % 3 else g) for i, g in enumerate(tags)] for n, tags in enumerate(gold)]
    a = write_conll(tmp_path / "a.conll", good)
    b = write_conll(tmp_path / "b.conll", bad)
    counts, _ = post_counts(a)
    assert counts.shape == (60, 3) and counts[:, 0].sum() == 60
    records = [record("A", 1, 1.0), record("B", 1, 0.5), record("B2", 1, 0.5)]
    for rec, path in zip(records, (a, b, b)):
        rec.test_predictions = path
    test = paired_bootstrap(records, "A", "B", samples=300)
    assert test["delta_f1"] == pytest.approx(100 * (1 - 2 * 20 / (60 + 20))) and test["p_value"] < 0.01
    assert test["ci95"][0] > 0
    same = paired_bootstrap(records, "B", "B2", samples=100)
    assert same["delta_f1"] == 0 and same["p_value"] == 1.0


def test_report_cli_errors_name_the_fix(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_low_resource_curve_plot(tmp_path):
    """Runs of several fractions (and the full-data run) become one curve with error bars."""
    from PIL import Image

    from mner.trainer.experiments.report_plots import low_resource_curves, plot_low_resource

    records = []
    for fraction, f1 in ((0.1, 0.40), (0.2, 0.50), (0.5, 0.60)):
        records += [record(f"t15-frac{fraction:.2f}/bert_crf/default", s, f1 + 0.01 * s, model="bert_crf",
                           preset=None, fraction=fraction, protocol="low-resource") for s in (1, 2)]
    records += [record("t15/bert_crf/default", s, 0.7, model="bert_crf", preset=None) for s in (1, 2)]
    rows = aggregate(records)
    curve = low_resource_curves(rows)["t15/bert_crf/default"]
    assert [p["fraction"] for p in curve] == [0.1, 0.2, 0.5, 1.0]
    assert curve[-1]["paper_F1"] == 71.81 and curve[0]["paper_F1"] is None  # no paper number for 10%
    path = plot_low_resource(rows, tmp_path / "low.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
    json.dumps(rows)  # rows are plain data (CSV / Parquet / JSON)


def test_coverage_comes_from_the_engines_record_when_present(tmp_path):
    from mner.trainer.experiments.report import image_coverage

    predictions = tmp_path / "test.conll"
    recorded = {"image_coverage": {"train": {"ok": 9, "total": 9}, "test": {"ok": 3, "total": 12, "placeholder": 9}}}
    assert image_coverage(recorded, predictions, "cache.h5") == 0.25
    assert image_coverage(recorded, predictions, None) is None  # the run read no cache
    import math

    assert math.isnan(image_coverage({}, predictions, str(tmp_path / "gone.h5")))  # unknown: flagged as such


def test_a_run_that_never_predicted_an_entity_is_flagged_not_scored_as_zero(tmp_path):
    from mner.trainer.experiments.report import load_run

    for name, predicted in (("silent", 0), ("tagging", 40)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"model": "bert_crf", "data": {"path": "data/t15"},
                                                     "train_config": {"seed": 1}}))
        test = {"micro": {"precision": 0.5 if predicted else 0.0, "recall": 0.4 if predicted else 0.0,
                          "f1": 0.44 if predicted else 0.0, "gold": 50, "pred": predicted}}
        (run / "metrics.json").write_text(json.dumps({"test": test, "history": []}))
        flags = load_run(run, min_coverage=0.9).flags
        assert any("predicted no entity" in flag for flag in flags) == (predicted == 0), (name, flags)
