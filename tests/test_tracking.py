"""`--track tensorboard`: event files whose per-epoch dev F1 is metrics.json's history, per-step loss /
learning rates / gradient norm, the config as hyper-parameters, a resumed run without duplicate steps;
a tracker whose package is missing is a one-line error."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from experiment_helpers import SAMPLE
from helpers.events import scalar_events

from mner.trainer.cli import main

STEPS_PER_EPOCH = 5  # 36 sample posts, batch 8


def train_args(encoder: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(SAMPLE), "--text-encoder", str(encoder), "--epochs", "2", "--batch-size", "8",
            "--max-length", "32", "--device", "cpu", "--seed", "3", "--patience", "0", "--out", str(out), *extra]


def test_tensorboard_events_match_metrics_history(tmp_path, tiny_bert):
    out = tmp_path / "run"
    assert main(train_args(tiny_bert, out, "--track", "tensorboard")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    events = scalar_events(out / "tracking")
    dev_f1 = [(step, value) for tag, step, value in events if tag == "dev/f1"]
    assert [v for _, v in dev_f1] == pytest.approx([h["dev_f1"] for h in metrics["history"]], abs=1e-6)
    assert [s for s, _ in dev_f1] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]  # logged at each epoch's last step
    steps = {tag: sorted(step for t, step, _ in events if t == tag) for tag in
             ("train/loss", "train/grad_norm", "train/lr/text_encoder", "train/lr/head", "train/lr/crf")}
    assert all(s == list(range(1, 2 * STEPS_PER_EPOCH + 1)) for s in steps.values()), steps
    tags = {tag for tag, _, _ in events}
    assert {"dev/precision", "dev/recall", "time/epoch_seconds", "memory/process_rss_mb", "train/epoch_loss"} <= tags
    assert any(tag.startswith("dev/PER/") for tag in tags)  # per-type scores
    hparams = list((out / "tracking").rglob("hparams.yml"))  # config.json and the run record as hyper-parameters
    assert hparams and "config.train_config.encoder_lr" in hparams[0].read_text()
    assert json.loads((out / "tracking.json").read_text())["kind"] == "tensorboard"
    config = json.loads((out / "config.json").read_text())
    assert config["train_config"]["track"] == "tensorboard"


def test_resumed_run_continues_the_event_files_without_duplicate_steps(tmp_path, tiny_bert, monkeypatch, capsys):
    import mner.trainer.core.epochs as epochs_module

    out = tmp_path / "run"
    real_score, calls = epochs_module.score_split, []

    def interrupted(*args):  # Ctrl-C while decoding dev after epoch 2: its 5 training steps are already logged
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_score(*args)

    monkeypatch.setattr(epochs_module, "score_split", interrupted)
    assert main(train_args(tiny_bert, out, "--track", "tensorboard")) == 130
    monkeypatch.undo()
    before = Counter(step for tag, step, _ in scalar_events(out / "tracking") if tag == "train/loss")
    assert sorted(before) == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # epoch 2's steps were logged, then lost

    assert main(["--out", str(out), "--resume"]) == 0
    events = scalar_events(out / "tracking")
    duplicates = [key for key, n in Counter((tag, step) for tag, step, _ in events).items() if n > 1]
    assert duplicates == []
    assert sorted(step for tag, step, _ in events if tag == "train/loss") == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["resumes"][0]["after_epoch"] == 1
    dev_f1 = [value for tag, _, value in sorted(events, key=lambda e: e[1]) if tag == "dev/f1"]
    assert dev_f1 == pytest.approx([h["dev_f1"] for h in metrics["history"]], abs=1e-6)


def test_missing_tracker_package_is_a_one_line_error(tmp_path, tiny_bert, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else
                        real_find_spec(name, *a))
    assert main(train_args(tiny_bert, tmp_path / "run", "--track", "wandb")) == 2
    err = capsys.readouterr().err
    assert "--track wandb needs the wandb package" in err and "pip install" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert main(train_args(tiny_bert, tmp_path / "run", "--track", "neptune")) == 2
    assert "--track neptune: must be one of none, tensorboard, wandb, mlflow" in capsys.readouterr().err


def test_a_grid_turns_tracking_on_for_every_run(tmp_path):
    from mner.trainer.core.config import resolve_configs
    from mner.trainer.experiments.grid import load_grid
    from mner.trainer.models import get_model_class

    grid_file = tmp_path / "g.toml"
    grid_file.write_text('[datasets.d]\ndata = "d"\n[train]\ntrack = "tensorboard"\n'
                         '[[experiments]]\nmodel = "bert_crf"\ndatasets = ["d"]\n', encoding="utf-8")
    (spec,) = load_grid(grid_file).runs
    _, config = resolve_configs(get_model_class("bert_crf"), sets=list(spec.sets))
    assert config.track == "tensorboard"
