"""`mner-train sweep`: grid files, run folders, skip/resume, failures, task selection, protocols."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from experiment_helpers import SAMPLE, sample_image_ids, write_dataset, write_random_cache

from mner.trainer.cli import main
from mner.trainer.core.config import ConfigError
from mner.trainer.experiments import sweep as sweep_module
from mner.trainer.experiments.grid import load_grid, select_task
from mner.trainer.experiments.protocols import mean_std, train_subset

FAST = {"epochs": 1, "batch_size": 8, "max_length": 32, "patience": 0, "device": "cpu", "eval_batch_size": 32}


def write_grid(path: Path, body: str, *, tiny_bert: Path, extra_train: str = "") -> Path:
    train = "\n".join(f"{k} = {json.dumps(v)}" for k, v in FAST.items())
    path.write_text(f'{body}\n[train]\ntext_encoder = "{tiny_bert}"\n{train}\n{extra_train}\n', encoding="utf-8")
    return path


def test_grid_expands_models_presets_switches_seeds_and_protocols(tmp_path, tiny_bert):
    grid_file = write_grid(tmp_path / "g.toml", """
seeds = [1, 2]
[datasets.t15]
data = "d15"
[datasets.t17]
data = "d17"
[[experiments]]
model = "vcrmner"
presets = ["paper", "w/o ev"]
switches = {full = [], single = ["num_blocks=1"]}
datasets = ["t15"]
cross_domain = [["t15", "t17"]]
[[experiments]]
model = "bert_crf"
datasets = ["t15"]
fractions = [0.1, 1.0]
""", tiny_bert=tiny_bert)
    grid = load_grid(grid_file, out=tmp_path / "runs")
    ids = [spec.run_id for spec in grid.runs]
    assert len(ids) == len(set(ids)) == 2 * 2 * 2 * 2 + 2 * 2  # vcrmner: presets x switches x 2 protocols x seeds
    assert "t15/vcrmner/paper+full/s1" in ids and "t15/vcrmner/wo-ev+single/s2" in ids
    assert "t15-to-t17/vcrmner/paper+single/s1" in ids
    assert "t15-frac0.10/bert_crf/default/s2" in ids and "t15/bert_crf/default/s1" in ids
    spec = next(s for s in grid.runs if s.run_id == "t15/vcrmner/wo-ev+single/s2")
    assert spec.preset == "w/o ev" and spec.sets[-1] == "num_blocks=1" and f"text_encoder={tiny_bert}" in spec.sets
    # --task i/n partitions the run list: every run exactly once over the n tasks
    parts = [select_task(grid.runs, f"{i}/3") for i in range(3)]
    assert sorted(s.run_id for part in parts for s in part) == sorted(ids)
    with pytest.raises(ConfigError, match="0 <= i < n"):
        select_task(grid.runs, "3/3")


def test_grid_errors_are_one_line_and_name_the_fix(tmp_path, tiny_bert, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[experiments]]\nmodel = "bert_crf"\ndatasets = ["t15"]\nepochs = 3\n')
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) epochs" in err and "valid keys:" in err and "Traceback" not in err
    bad.write_text('[[experiments]]\nmodel = "bert_crf"\ndatasets = ["t99"]\n[datasets.t15]\ndata = "x"\n')
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    assert "unknown dataset 't99'; defined: t15" in capsys.readouterr().err
    bad.write_text('seeds = [1,\n')
    assert main(["sweep", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    bad.write_text('[[experiments]]\nmodel = "bert_crf"\ndatasets = ["t15"]\n[datasets.t15]\ndata = "nowhere"\n')
    assert main(["sweep", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "missing inputs: t15: data nowhere" in capsys.readouterr().err


ACCEPTANCE_GRID = """
seeds = [1, 2]
[datasets.sample]
data = "{data}"
features = "{cache}"
[[experiments]]
model = "bert_crf"
switches = {{d0 = ["dropout=0.0"], d3 = ["dropout=0.3"]}}
datasets = ["sample"]
[[experiments]]
model = "vcrmner"
switches = {{full = [], wo-ev = ["use_visual_evaluation=false"]}}
sets = ["num_blocks=1", "num_heads=2", "max_objects=2", "epochs=2"]
datasets = ["sample"]
"""


@pytest.fixture(scope="module")
def sample_cache(tmp_path_factory) -> Path:
    return write_random_cache(tmp_path_factory.mktemp("cache") / "sample.h5", sample_image_ids(),
                              placeholder_every=3)


def test_sweep_killed_halfway_reruns_only_the_missing_runs(tmp_path, tiny_bert, sample_cache, monkeypatch, capsys):
    """Acceptance: 2 models x 2 switches x 2 seeds on the bundled sample, interrupted after 4 runs."""
    grid_file = write_grid(tmp_path / "accept.toml", ACCEPTANCE_GRID.format(data=SAMPLE, cache=sample_cache),
                           tiny_bert=tiny_bert)
    out = tmp_path / "runs"
    real_launch = sweep_module.launch_training
    launched: list[str] = []

    def killed_in_the_fifth(spec, run_dir, datasets, *, state, device):  # the 5th run: vcrmner's first (2 epochs)
        launched.append(spec.run_id)
        if len(launched) == 5:  # Ctrl-C / kill in epoch 2 of the fifth run, after epoch 1's checkpoint
            import mner.trainer.core.epochs as epochs_module

            real_score, calls = epochs_module.score_split, []

            def interrupted(*args):
                calls.append(1)
                if len(calls) == 2:
                    raise KeyboardInterrupt
                return real_score(*args)

            monkeypatch.setattr(epochs_module, "score_split", interrupted)
        real_launch(spec, run_dir, datasets, state=state, device=device)

    monkeypatch.setattr(sweep_module, "launch_training", killed_in_the_fifth)
    assert main(["sweep", str(grid_file), "--out", str(out)]) != 0  # interrupted
    monkeypatch.undo()
    first = launched[:4]
    interrupted_run = launched[4]
    stamps = {run_id: (out / run_id / "metrics.json").stat().st_mtime_ns for run_id in first}
    capsys.readouterr()
    assert main(["sweep", str(grid_file), "--out", str(out), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert listing.count(" done ") == 4 and listing.count(" unfinished ") == 1 and listing.count(" todo ") == 3

    launched.clear()
    states: list[str] = []

    def record(spec, run_dir, datasets, *, state, device):
        launched.append(spec.run_id)
        states.append(state)
        real_launch(spec, run_dir, datasets, state=state, device=device)

    monkeypatch.setattr(sweep_module, "launch_training", record)
    assert main(["sweep", str(grid_file), "--out", str(out)]) == 0
    assert len(launched) == 4 and not set(launched) & set(first)  # only the missing runs
    assert launched[0] == interrupted_run and states == ["unfinished", "todo", "todo", "todo"]
    resumes = json.loads((out / interrupted_run / "metrics.json").read_text())["run"]["resumes"]
    assert [r["after_epoch"] for r in resumes] == [1]  # continued after its first epoch, not restarted
    assert all((out / run_id / "metrics.json").stat().st_mtime_ns == stamp for run_id, stamp in stamps.items())
    done = sorted(str(p.parent.relative_to(out)) for p in out.rglob("sweep.json"))
    assert done == sorted(f"sample/{m}/default+{s}/s{seed}" for m, switches in
                          (("bert_crf", ("d0", "d3")), ("vcrmner", ("full", "wo-ev")))
                          for s in switches for seed in (1, 2))
    record_ = json.loads((out / "sample/vcrmner/default+wo-ev/s2/sweep.json").read_text())
    assert record_["spec"]["seed"] == 2 and "use_visual_evaluation=false" in record_["spec"]["sets"]
    config = json.loads((out / "sample/vcrmner/default+wo-ev/s2/config.json").read_text())
    assert config["model_config"]["use_visual_evaluation"] is False and config["train_config"]["seed"] == 2
    assert "ETA" in capsys.readouterr().err

    # the report: mean +/- std over the 2 seeds, paper columns, flags, PNGs, paired bootstrap
    report_dir = tmp_path / "report"
    assert main(["report", str(out), "--out", str(report_dir), "--bootstrap", "200",
                 "--compare", "sample/vcrmner/default+full", "--compare", "sample/vcrmner/default+wo-ev"]) == 0
    results = report_dir / "results.md"
    text = results.read_text()
    clean, flagged = text.split("## Flagged configurations")
    assert "paper P / R / F1" in clean and "`sample/bert_crf/default+d0` | in-domain | 2 |" in clean
    assert "vcrmner" not in clean  # random-init / low-coverage runs never sit beside real ones
    assert "random-init features" in flagged and "low image coverage (75% < 90%)" in flagged
    import pyarrow.parquet as pq
    from PIL import Image

    rows = pq.read_table(report_dir / "results.parquet").to_pylist()
    assert len(rows) == 4 and all(r["n_seeds"] == 2 for r in rows)
    row = next(r for r in rows if r["config"] == "sample/bert_crf/default+d3")
    f1s = [100 * json.loads((out / f"sample/bert_crf/default+d3/s{s}/metrics.json").read_text())["test"]["micro"]["f1"]
           for s in (1, 2)]
    assert row["F1_mean"] == pytest.approx(sum(f1s) / 2)
    assert row["F1_std"] == pytest.approx(abs(f1s[0] - f1s[1]) / 2 ** 0.5)
    assert (report_dir / "results.csv").read_text().splitlines()[0].startswith('"config","model"')
    for name in ("dev_f1.png", "per_type_f1.png"):
        with Image.open(report_dir / name) as image:
            assert image.format == "PNG" and image.size[0] > 400
    significance = json.loads((report_dir / "significance.json").read_text())
    assert significance["seeds_a"] == 2 and 0.0 <= significance["p_value"] <= 1.0

    launched.clear()  # a third call has nothing to do
    assert main(["sweep", str(grid_file), "--out", str(out)]) == 0 and launched == []
    # a finished folder made with other settings is never silently reused
    assert main(["sweep", str(grid_file), "--out", str(out), "--set", "dropout=0.5"]) == 1
    assert "holds a run with other settings" in capsys.readouterr().err
    assert main(["sweep", str(grid_file), "--out", str(out), "--set", "dropout=0.5", "--dry-run"]) == 0
    assert capsys.readouterr().out.count(" changed ") == 8  # the listing says so too, not "done"


def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, tiny_bert, capsys):
    data = write_dataset(tmp_path / "data", seed=1)
    grid_file = write_grid(tmp_path / "g.toml", f"""
[datasets.d]
data = "{data}"
[[experiments]]
model = "bert_crf"
switches = {{bad = ["max_length=100"], good = []}}
datasets = ["d"]
""", tiny_bert=tiny_bert)  # settings are valid (checked before the first run); the tiny encoder has 64 positions
    out = tmp_path / "runs"
    assert main(["sweep", str(grid_file), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "failed runs" in err and "d/bert_crf/default+bad/s1: ConfigError" in err
    assert (out / "d/bert_crf/default+good/s1/sweep.json").is_file()  # the sweep went on
    log = [json.loads(line) for line in (out / "sweep-log.jsonl").read_text().splitlines()]
    assert [(e["run"], e["status"]) for e in log] == [("d/bert_crf/default+bad/s1", "failed"),
                                                      ("d/bert_crf/default+good/s1", "done")]
    assert "--max-length 100" in log[0]["error"]


def test_cross_domain_scores_the_other_dataset_with_misc_normalised(tmp_path, tiny_bert):
    t15 = write_dataset(tmp_path / "t15", seed=1, misc_tag="OTHER")  # Twitter-2015 spelling
    t17 = write_dataset(tmp_path / "t17", seed=2, misc_tag="MISC", sizes=(10, 5, 9))
    grid_file = write_grid(tmp_path / "g.toml", f"""
[datasets.t15]
data = "{t15}"
[datasets.t17]
data = "{t17}"
[[experiments]]
model = "bert_crf"
cross_domain = [["t15", "t17"]]
""", tiny_bert=tiny_bert)
    out = tmp_path / "runs"
    assert main(["sweep", str(grid_file), "--out", str(out)]) == 0
    run = out / "t15-to-t17/bert_crf/default/s1"
    record = json.loads((run / "sweep.json").read_text())
    assert record["spec"]["protocol"] == "cross-domain" and record["test_scores"].startswith("eval/test-")
    scores = json.loads((run / record["test_scores"]).read_text())
    assert scores["micro"]["gold"] == 9  # t17's test split (one entity per post), not t15's 12
    assert not any("OTHER" in label for label in json.loads((run / "config.json").read_text())["labels"])
    assert "OTHER" not in scores["per_type"]
    from mner.trainer.experiments.report import aggregate, find_runs, load_run

    (row,) = aggregate([load_run(r, min_coverage=0.9) for r in find_runs([out])])
    assert (row["config"], row["protocol"], row["setting"]) == (
        "t15-to-t17/bert_crf/default", "cross-domain", "t15-to-t17"
    )
    assert row["F1_mean"] == pytest.approx(100 * scores["micro"]["f1"])  # the other dataset's scores, not t15's


def test_low_resource_subsets_are_nested_per_seed_and_deterministic():
    fractions = (0.1, 0.2, 0.3, 0.4, 0.5, 1.0)
    for seed in range(1, 6):
        subsets = [set(train_subset(4000, f, seed)) for f in fractions]
        assert [len(s) for s in subsets] == [400, 800, 1200, 1600, 2000, 4000]
        assert all(small < large for small, large in itertools.pairwise(subsets))  # 10% inside 20% inside ...
    assert train_subset(4000, 0.1, 1) == train_subset(4000, 0.1, 1)
    assert train_subset(4000, 0.1, 1) != train_subset(4000, 0.1, 2)
    assert train_subset(10, 0.3, 7) == [0, 3, 5]  # fixed across runs and platforms (string-seeded)
    with pytest.raises(ValueError, match="outside"):
        train_subset(10, 0.0, 1)
    mean, std = mean_std([70.0, 72.0, 74.0])
    assert mean == 72.0 and std == pytest.approx(2.0)


def test_low_resource_run_trains_on_the_nested_subset(tmp_path, tiny_bert, monkeypatch):
    from mner.trainer.experiments import protocols

    calls = []
    real_subset = protocols.train_subset
    monkeypatch.setattr(protocols, "train_subset", lambda *args: calls.append(args) or real_subset(*args))
    data = write_dataset(tmp_path / "data", seed=3, sizes=(40, 6, 6))
    grid_file = write_grid(tmp_path / "g.toml", f"""
[datasets.d]
data = "{data}"
[[experiments]]
model = "bert_crf"
datasets = ["d"]
fractions = [0.25]
""", tiny_bert=tiny_bert)
    out = tmp_path / "runs"
    assert main(["sweep", str(grid_file), "--out", str(out)]) == 0
    metrics = json.loads((out / "d-frac0.25/bert_crf/default/s1/metrics.json").read_text())
    assert metrics["alignment"]["train"]["words"] == 10 * 6  # 10 of 40 posts, 6 words each
    assert calls == [(40, 0.25, 1)]  # the trainer draws the nested subset of protocols.train_subset


def test_a_killed_process_counts_as_dead_even_before_it_is_reaped():
    """A SIGKILLed trainer whose parent has not waited for it yet must not block its run as 'running'."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mner.trainer.experiments.sweep import _pid_alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _pid_alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        for _ in range(100):  # wait until the kernel has turned it into a zombie (not reaped: no wait())
            if not _pid_alive(child.pid):
                break
            time.sleep(0.02)
        assert not _pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()


def test_dry_run_lists_runs_the_cache_cannot_serve_with_the_extract_command(tmp_path, tiny_bert, sample_cache, capsys):
    """A P-MNER grid on a cache that holds VCRMNER's instances only: before any training, the dry run names the
    P-MNER runs it cannot serve and the extract command that adds what they need (``--for pmner``)."""
    grid_file = write_grid(tmp_path / "s.toml", f"""
seeds = [1]
[datasets.sample]
data = "{SAMPLE}"
features = "{sample_cache}"
[[experiments]]
model = "vcrmner"
sets = ["num_heads=2"]
datasets = ["sample"]
[[experiments]]
model = "pmner"
switches = {{frr = [], grid = ["use_frr=false"]}}
datasets = ["sample"]
""", tiny_bert=tiny_bert)
    assert main(["sweep", str(grid_file), "--out", str(tmp_path / "runs"), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert listing.count(" no-stage1 ") == 2 and listing.count(" todo ") == 1  # vcrmner is served
    assert "stage-1: 2 run(s) the cache cannot serve" in listing
    assert "detector 'fasterrcnn'" in listing and "it has maskrcnn-test" in listing  # FRR: another detector
    assert "lacks encoders/resnet/resnet152/grid" in listing  # the grid rows: no ResNet at all
    command = next(line for line in listing.splitlines() if "mner-features extract" in line)
    assert f"--out {sample_cache}" in command and command.endswith("--for pmner")
    assert not (tmp_path / "runs").exists()
