"""`mner-train tune`: spaces, a study killed in its 4th trial and rerun, two workers on one study, pruning,
and the report of a study folder (trials, importances, plot, the best configuration's grid)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from experiment_helpers import SAMPLE
from helpers.forked import run_forked
from optuna.trial import TrialState

from mner.trainer.cli import main
from mner.trainer.experiments.grid import load_grid
from mner.trainer.experiments.tune_space import load_space

# 36 training posts, batch 8: 5 steps per epoch
SPACE = """
out = "{out}"
seeds = [1, 2]
[datasets.sample]
data = "{data}"
[train]
text_encoder = "{encoder}"
epochs = {epochs}
batch_size = 8
max_length = 32
patience = 0
device = "cpu"
[[experiments]]
model = "bert_crf"
datasets = ["sample"]
[search]
trials = {trials}
pruner = "median"
startup_trials = 2
[search.params]
head_lr = {{low = 1e-4, high = 1e-1, log = true}}
dropout = [0.0, 0.3]
"""


def write_space(path: Path, tiny_bert: Path, *, out: Path, trials: int = 6, epochs: int = 2, extra: str = "") -> Path:
    path.write_text(SPACE.format(out=out, data=SAMPLE, encoder=tiny_bert, epochs=epochs, trials=trials) + extra,
                    encoding="utf-8")
    return path


def study_of(out: Path, name: str):
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))


def test_space_errors_are_one_line_and_name_the_fix(tmp_path, tiny_bert, capsys):
    space = write_space(tmp_path / "s.toml", tiny_bert, out=tmp_path / "o")
    loaded = load_space(space)
    assert set(loaded.params) == {"head_lr", "dropout"} and loaded.trials == 6 and loaded.base.seed == 1
    assert loaded.trial_spec({"dropout": 0.3}).sets[-2:] == ("dropout=0.3", "score_test=false")
    text = space.read_text()
    cases = [
        (text.replace("dropout = [0.0, 0.3]", "dropuot = [0.0, 0.3]"), "not a --set key of bert_crf; valid model keys"),
        (text.replace("dropout = [0.0, 0.3]", "dropout = [0.0, 1.5]"), "the value 1.5 is refused: --set dropout=1.5"),
        (text.replace("dropout = [0.0, 0.3]", "seed = [1, 2]"), "search.params.seed: cannot be searched"),
        (text.replace("dropout = [0.0, 0.3]", "epochs = {low = 1.5, high = 3.0}"), "epochs is an integer"),
        (text.replace("log = true", "log = true, step = 2"), "cannot be combined with log = true"),
        (text.replace('pruner = "median"', 'pruner = "hyperband"'), "valid values: median, asha, none"),
        (text.replace('datasets = ["sample"]', 'datasets = ["sample"]\nswitches = {a = [], b = ["dropout=0.2"]}'),
         "a space searches one configuration, this file defines 2"),
        (text.split("[search]")[0], "a space file needs a [search] table"),
    ]
    for body, message in cases:
        space.write_text(body, encoding="utf-8")
        assert main(["tune", str(space), "--dry-run"]) == 2, body
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (message, err)


def test_study_killed_in_its_fourth_trial_then_rerun_counts_each_trial_once(tmp_path, tiny_bert, capsys):
    """Acceptance: 6 trials of 3 epochs, pruning on; SIGKILL in trial 4 (number 3) at step 12, in its third epoch
    (epoch 1's checkpoint is on disk by then: epoch 2's snapshot waited for it); the rerun resumes it."""
    out = tmp_path / "study"
    space = write_space(tmp_path / "space.toml", tiny_bert, out=out, epochs=3)
    (code,), (log,) = run_forked([["tune", str(space)]], tmp_path, MNER_TEST_TUNE_SIGKILL="3:12")
    assert code == -9, log[-3000:]
    study = study_of(out, "space")
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials[:3])
    assert study.trials[3].state == TrialState.RUNNING and len(study.trials) == 4  # killed inside trial 4
    killed_params = study.trials[3].params
    from mner.trainer.core.run_folder import STATE_FILE, latest_checkpoint

    checkpoint = latest_checkpoint(out / "trials" / "0003")  # the last complete one (the marker may lag it)
    epochs_done = json.loads((checkpoint / STATE_FILE).read_text())["epoch"]
    assert epochs_done in (1, 2)

    (code,), (log,) = run_forked([["tune", str(space)]], tmp_path)
    assert code == 0, log[-3000:]
    assert "trial 3: its worker" in log and "queued a retry that resumes" in log
    trials = study_of(out, "space").trials
    counted = [t for t in trials if not t.user_attrs.get("not_counted")]
    assert len(counted) == 6 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in counted)
    assert trials[3].state == TrialState.FAIL and "retried" in trials[3].user_attrs["not_counted"]
    run_dirs = [t.user_attrs["run_dir"] for t in counted]
    assert len(set(run_dirs)) == 6  # no trial twice
    (retry,) = [t for t in counted if t.user_attrs.get("retry_of") == 3]
    assert retry.params == killed_params and retry.user_attrs["run_dir"] == str(out / "trials" / "0003")
    metrics = json.loads((out / "trials" / "0003" / "metrics.json").read_text())
    assert [r["after_epoch"] for r in metrics["run"]["resumes"]] == [epochs_done]  # resumed, not restarted
    assert "test" not in metrics  # a trial never decodes test
    for trial in counted:  # the pruner saw every epoch (the retry reports epoch 1 from the folder's history)
        reported = sorted(trial.intermediate_values)  # a pruned trial stops before its last epoch
        assert reported == [1, 2, 3] if trial.state == TrialState.COMPLETE else reported in ([1], [1, 2])
        history = json.loads((Path(trial.user_attrs["run_dir"]) / "trial.json").read_text())
        assert history["number"] == trial.number and history["state"] in ("complete", "pruned")
    assert retry.intermediate_values[1] == pytest.approx(metrics["history"][0]["dev_f1"])
    assert run_forked([["tune", str(space)]], tmp_path)[0] == [0]  # a third run has nothing to do
    assert len(study_of(out, "space").trials) == 7

    # the report: trials best first, importances, the plot, and the best configuration as a sweep grid
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "space-trials.md").read_text()
    assert "| 3 | fail (not counted) |" in table and "retry of 3" in table and "Parameter importances" in table
    from PIL import Image

    with Image.open(tmp_path / "report" / "space-dev_f1.png") as image:
        assert image.format == "PNG"
    best = max((t for t in counted if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    grid = load_grid(tmp_path / "report" / "space-best-grid.toml")
    assert [spec.seed for spec in grid.runs] == [1, 2] and grid.out == out / "best"
    assert grid.runs[0].sets[-2:] == tuple(f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in best.params.items())
    assert not any("score_test" in pair for pair in grid.runs[0].sets)  # its seeds are scored on test


def test_two_workers_on_one_study_run_different_trials(tmp_path, tiny_bert):
    out = tmp_path / "study"
    space = write_space(tmp_path / "space.toml", tiny_bert, out=out, trials=4, epochs=1)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    codes, logs = run_forked([["tune", str(space)], ["tune", str(space)]], tmp_path, ddp=False,
                             MNER_TEST_TUNE_BARRIER=f"{barrier}:2")
    assert codes == [0, 0], logs
    trials = study_of(out, "space").trials
    counted = [t for t in trials if not t.user_attrs.get("not_counted")]
    assert len(counted) == 4 and all(t.state == TrialState.COMPLETE for t in counted)
    assert len({t.user_attrs["run_dir"] for t in counted}) == 4
    workers = {t.user_attrs["worker"]["pid"] for t in counted}
    assert len(workers) == 2  # both processes trained trials of the one study


def test_a_pruned_trial_stops_after_its_epoch_and_keeps_a_resumable_folder(tmp_path, tiny_bert):
    out = tmp_path / "study"
    space_file = write_space(tmp_path / "space.toml", tiny_bert, out=out, trials=3, epochs=2)
    space_file.write_text(space_file.read_text().replace("startup_trials = 2", "startup_trials = 1"))
    from mner.trainer.experiments.tune import run_tune
    from mner.trainer.experiments.tune_study import open_study

    space = load_space(space_file)
    study = open_study(space)
    # a finished trial that reached dev F1 0.9 at epoch 1: any trial of the tiny model is below that median
    study.add_trial(optuna.trial.create_trial(params={"head_lr": 1e-3, "dropout": 0.0},
                                              distributions=space.params, value=0.9,
                                              intermediate_values={1: 0.9, 2: 0.9}))
    result = run_tune(space, study, device="cpu")
    assert [state for _, state, _ in result.ran] == ["pruned", "pruned"]
    for number in (1, 2):
        folder = out / "trials" / f"{number:04d}"
        assert json.loads((folder / "trial.json").read_text())["state"] == "pruned"
        marker = json.loads((folder / "mner-run.json").read_text())
        assert marker["status"] == "unfinished" and marker["epochs_done"] == 1  # stopped after epoch 1
        assert not (folder / "metrics.json").exists()
    assert sorted(study.trials[1].intermediate_values) == [1]


BUNDLED = sorted((Path(__file__).resolve().parent.parent / "grids" / "tune").glob("*.toml"))


def test_bundled_spaces_cover_every_model_s_learning_rates_and_dropout():
    from mner.trainer.models import _MODEL_MODULES

    spaces = [load_space(path) for path in BUNDLED]  # each one parses and passes the option checks
    for model in _MODEL_MODULES:  # the bundled models (tests register stubs of their own)
        (space,) = [s for s in spaces if s.base.model == model and s.base.config_id.startswith("t15/")]
        assert {"encoder_lr", "head_lr", "dropout"} <= set(space.params), space.path
        assert space.pruner != "none" and space.trials >= 20
