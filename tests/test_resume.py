"""Resumable runs: SIGKILL mid-epoch then --resume gives the uninterrupted run's metrics; Ctrl-C leaves a
resumable run; unfinished runs are named; --overwrite replaces only mner run folders; two-process DDP."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from helpers.data import write_generated_splits
from helpers.events import scalar_events
from helpers.forked import recorded_posts, run_forked

from mner.trainer.cli import main

TIMING_KEYS = ("train_seconds", "eval_seconds", "seconds", "checkpoint_seconds", "cpu_seconds")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return write_generated_splits(tmp_path_factory.mktemp("resume-data"), seed=5, sizes=(32, 8, 8))


def train_args(data: Path, encoder: Path, out: Path, epochs: int = 3) -> list[str]:
    # batch 8 over 32 posts: 4 steps per epoch; dropout on, so the RNG state matters
    return ["--data", str(data), "--text-encoder", str(encoder), "--epochs", str(epochs), "--batch-size", "8",
            "--max-length", "24", "--device", "cpu", "--seed", "7", "--set", "dropout=0.3", "--set", "head_lr=5e-3",
            "--out", str(out)]


def comparable(run: Path) -> dict:
    """metrics.json without what legitimately differs between two runs: timings and the run record."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("run")
    for entry in metrics["history"]:
        for key in TIMING_KEYS:
            entry.pop(key)
    return metrics


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(small_data, tiny_bert, tmp_path, capsys):
    reference = tmp_path / "reference"  # every run in a forked process with one thread: same arithmetic
    assert run_forked([train_args(small_data, tiny_bert, reference)], tmp_path)[0] == [0]

    killed = tmp_path / "killed"
    # a random step of epoch 3 (4 steps per epoch): epoch 1's checkpoint is on disk by then (epoch 2's
    # snapshot waited for it); epoch 2's may still be in the background writer when the kill lands
    kill_at = random.Random(os.getpid()).randint(9, 11)
    (code,), (log,) = run_forked([train_args(small_data, tiny_bert, killed)], tmp_path,
                                 MNER_TEST_SIGKILL_AT_STEP=str(kill_at))
    assert code == -9, log[-2000:]  # the process died of SIGKILL mid-run
    marker = json.loads((killed / "mner-run.json").read_text())
    assert marker["status"] == "unfinished" and marker["epochs_done"] in (1, 2)
    assert not (killed / "metrics.json").exists()

    # a rerun without --resume names the unfinished run and both ways on
    assert main(train_args(small_data, tiny_bert, killed)) == 2
    err = capsys.readouterr().err
    assert "unfinished run" in err and "--resume" in err and "--overwrite" in err and str(killed) in err
    assert main(["evaluate", str(killed)]) == 2  # not a finished run yet: says how to finish it
    assert f"mner-train --out {killed} --resume" in capsys.readouterr().err
    assert main(["--out", str(killed), "--resume", "--epochs", "5"]) == 2  # other options: refused, named
    assert "was started with other options: epochs (run: 3, now: 5)" in capsys.readouterr().err

    codes, logs = run_forked([["--out", str(killed), "--resume"]], tmp_path)
    assert codes == [0], logs
    assert comparable(killed) == comparable(reference)
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["run"]["resumes"][0]["after_epoch"] == marker["epochs_done"]
    assert not (killed / "checkpoint").exists()  # the optimiser state goes when the run finishes
    assert json.loads((killed / "mner-run.json").read_text())["status"] == "finished"


def test_ctrl_c_leaves_a_resumable_run(small_data, tiny_bert, tmp_path, monkeypatch, capsys):
    from mner.trainer.core.engine import Engine

    encoder = shutil.copytree(tiny_bert, tmp_path / "encoder")  # moved away after training
    out = tmp_path / "run"
    original = Engine.train_epoch
    calls = []

    def interrupted_in_epoch_2(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "train_epoch", interrupted_in_epoch_2)
    assert main(train_args(small_data, encoder, out, epochs=2)) == 130
    err = capsys.readouterr().err
    assert f"mner-train --out {out} --resume" in err and "Traceback" not in err
    monkeypatch.setattr(Engine, "train_epoch", original)
    assert main(["--out", str(out), "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 2

    # the run no longer needs the encoder folder it started from
    shutil.rmtree(encoder)
    assert main(["evaluate", str(out), "--split", "dev", "--device", "cpu"]) == 0, capsys.readouterr().err

    # --resume of a finished run is refused with the fix
    assert main(["--out", str(out), "--resume"]) == 2
    assert "already finished" in capsys.readouterr().err


def test_overwrite_replaces_only_mner_run_folders(small_data, tiny_bert, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me too")
    for out in (precious, a_file):
        assert main([*train_args(small_data, tiny_bert, out, epochs=1), "--overwrite"]) == 2
        assert "choose another --out" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "keep me" and a_file.read_text() == "keep me too"

    run = tmp_path / "run"
    assert main(train_args(small_data, tiny_bert, run, epochs=1)) == 0
    (run / "stale.txt").write_text("from the first run")
    assert main(train_args(small_data, tiny_bert, run, epochs=1)) == 2  # no silent replacement
    assert "--overwrite" in capsys.readouterr().err
    # the replacement also runs bf16 autocast on CPU with gradient accumulation over 2 of the 4 batches
    assert main([*train_args(small_data, tiny_bert, run, epochs=1), "--overwrite", "--precision", "bf16",
                 "--grad-accum", "2"]) == 0
    assert not (run / "stale.txt").exists() and (run / "metrics.json").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    record = metrics["run"]
    assert record["precision"] == "bf16" and record["optimizer_steps_per_epoch"] == 2 and record["world_size"] == 1
    # trained under bf16 autocast, decoded in fp32 like `evaluate` (issue 19, point 3): the same scores
    assert record["decode_precision"] == "fp32"
    assert main(["evaluate", str(run), "--split", "dev", "--device", "cpu"]) == 0
    (evaluated,) = (run / "eval").glob("dev-*.json")
    result = json.loads(evaluated.read_text())
    assert result["decode_precision"] == "fp32" and result["micro"] == metrics["dev"]["micro"]


DDP_TRAIN_POSTS = 21  # batch 4 over 2 processes: 6 batches of which the last is short


@pytest.fixture(scope="module")
def ddp_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """Posts with their own image ids (one image missing) and a tiny cache with what every model reads."""
    from mner.pipeline.cache.tiny import write_tiny_training_inputs

    data, cache = write_tiny_training_inputs(tmp_path_factory.mktemp("ddp"), train_posts=DDP_TRAIN_POSTS)
    return Path(data), Path(cache)


def test_two_process_ddp_every_model_sees_every_post_once_and_ranks_agree(ddp_inputs, tiny_bert, tmp_path):
    """Two processes train one DDP model over gloo (what `torchrun --nproc_per_node 2` starts), every
    registered model in turn, 21 posts in batches of 4 (a short batch), early stopping on (patience 1):
    each epoch the two processes together read every training post exactly once, they agree on
    weights, buffers and dev F1 every epoch, and nothing hangs (a hang is killed and fails the test)."""
    from mner.pipeline.cache.tiny import EVERY_MODEL_FLAGS as DDP_MODELS

    data, cache = ddp_inputs
    runs = [["--features", str(cache), "--data", str(data), "--model", model, "--text-encoder", str(tiny_bert),
             "--epochs", "3", "--patience", "1", "--batch-size", "4", "--max-length", "24", "--device", "cpu",
             "--seed", "3", "--set", "stage1_mismatch=warn", "--max-missing-images", "1",
             "--out", str(tmp_path / model), *flags, *(["--track", "tensorboard"] if model == "bert_crf" else [])]
            for model, flags in DDP_MODELS.items()]
    codes, logs = run_forked([runs, runs], tmp_path, timeout=180, record=True)
    assert codes == [0, 0], [log[-3000:] for log in logs]
    seen = recorded_posts(tmp_path, 2)
    for index, model in enumerate(DDP_MODELS):
        metrics = json.loads((tmp_path / model / "metrics.json").read_text())
        assert metrics["run"]["world_size"] == 2, model
        epochs = [(first, second) for first, second in zip(seen[0][index], seen[1][index], strict=True)]
        assert len(epochs) == metrics["epochs_run"] >= 2, model
        for epoch, (first, second) in enumerate(epochs, 1):
            assert sorted(first + second) == list(range(DDP_TRAIN_POSTS)), (model, epoch, first, second)
            assert len(first) > 0 and len(second) > 0
        for entry in metrics["history"]:
            assert entry["replicas_agree"] is True, (model, entry)
            assert entry["dev_f1_by_rank"] == [entry["dev_f1"]] * 2, (model, entry)
    assert "3 steps/epoch" in logs[0] and "2 process(es)" in logs[0]  # 6 batches shared by two processes
    epochs_run = json.loads((tmp_path / "bert_crf" / "metrics.json").read_text())["epochs_run"]
    steps = sorted(step for tag, step, _ in scalar_events(tmp_path / "bert_crf" / "tracking") if tag == "train/loss")
    assert steps == list(range(1, 3 * epochs_run + 1))  # --track: only process 0 logs, each of its steps once
    assert "training bert_crf" not in logs[1]  # only process 0 reports
