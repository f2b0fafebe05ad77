"""Faults on the trainer side (docs/reliability.md): outputs replaced only when mner wrote them, one
writer per run folder, weights verified, damaged checkpoints skipped, a non-finite loss stops the run,
sweeps validated before they start. Issue 17, observations 3, 4, 5, 7, 13, 14."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from experiment_helpers import write_dataset, write_random_cache

from mner.trainer.cli import main

FAST = ["--model", "bert_crf", "--batch-size", "8", "--max-length", "24", "--device", "cpu", "--seed", "1",
        "--patience", "0", "--set", "eval_batch_size=32"]


def train_args(data: Path, encoder: Path, out: Path, *, epochs: int = 1) -> list[str]:
    return ["--data", str(data), "--text-encoder", str(encoder), "--out", str(out), "--epochs", str(epochs), *FAST]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), seed=5, sizes=(16, 8, 8))


@pytest.fixture(scope="module")
def finished_run(small_data, tiny_bert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "crf"
    assert main(train_args(small_data, tiny_bert, out)) == 0
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------- observation 3: predict --out


def test_predict_never_writes_over_its_input_or_a_foreign_file(finished_run, small_data, tmp_path, capsys):
    gold = tmp_path / "gold.txt"
    gold.write_bytes((small_data / "test.txt").read_bytes())
    before = gold.read_bytes()
    args = ["predict", str(finished_run), "--data", str(gold), "--device", "cpu"]
    for extra in ([], ["--overwrite"]):
        assert main([*args, "--out", str(gold), *extra]) == 2
        assert "also an input" in one_line_error(capsys) and gold.read_bytes() == before
    readme = tmp_path / "README.md"
    readme.write_text("notes\n")
    assert main([*args, "--out", str(readme), "--overwrite"]) == 2  # not mner's: refused even with --overwrite
    assert "not an mner prediction file" in one_line_error(capsys) and readme.read_text() == "notes\n"
    tagged = tmp_path / "tagged.conll"
    assert main([*args, "--out", str(tagged)]) == 0
    assert json.loads((tmp_path / "tagged.conll.json").read_text())["mner_predictions"] == 1
    assert main([*args, "--out", str(tagged)]) == 2  # its own output: only with --overwrite
    assert "--overwrite" in one_line_error(capsys)
    assert main([*args, "--out", str(tagged), "--overwrite"]) == 0


# ----------------------------------------------------------------------------- observation 4: one trainer per run


def test_a_second_trainer_on_a_live_run_folder_is_refused_naming_the_holder(small_data, tiny_bert, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from mner.pipeline.cache.lock import CacheLock
        CacheLock({str(out)!r}).acquire()  # <out>.lock, as a live trainer holds it
        print("held", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--overwrite"]):
            assert main([*train_args(small_data, tiny_bert, out), *extra]) == 2
            err = one_line_error(capsys)
            assert f"pid {holder.pid}" in err and "one writer per run folder" in err
        assert not out.exists()
        from mner.trainer.experiments.sweep import run_state

        assert run_state(out) == "running"  # a sweep skips it instead of failing on the lock
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead: its lock is stale on this host and the next trainer takes it over
    assert main(train_args(small_data, tiny_bert, out)) == 0
    assert not Path(f"{out}.lock").exists()


# ----------------------------------------------------------------------------- observations 7 and 13: run integrity


def test_damaged_weights_or_config_are_refused_in_one_line(finished_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    marker = json.loads((run / "mner-run.json").read_text())
    assert len(marker["weights_sha256"]) == 64
    weights = run / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4096:] = bytes(4096)  # 4 KiB zeroed, same size: the numbers would change silently
    weights.write_bytes(bytes(data))
    assert main(["evaluate", str(run), "--device", "cpu"]) == 2
    assert "does not match the sha256 recorded" in one_line_error(capsys)
    weights.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    assert main(["evaluate", str(run), "--device", "cpu"]) == 2
    assert "model.safetensors" in one_line_error(capsys)
    shutil.copy2(finished_run / "model.safetensors", weights)
    config = run / "config.json"
    config.write_text(config.read_text()[:100])
    assert main(["evaluate", str(run), "--device", "cpu"]) == 2
    assert "config.json is damaged" in one_line_error(capsys)


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_damaged(
        small_data, tiny_bert, tmp_path, monkeypatch, capsys):
    import mner.trainer.core.epochs as epochs_module

    out = tmp_path / "run"
    real_score, calls = epochs_module.score_split, []

    def interrupted(*args):  # Ctrl-C during epoch 3's dev scoring: epochs 1 and 2 are checkpointed
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_score(*args)

    monkeypatch.setattr(epochs_module, "score_split", interrupted)
    assert main(train_args(small_data, tiny_bert, out, epochs=3)) == 130
    monkeypatch.undo()
    newest = out / "checkpoint" / "model.safetensors"
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["epoch"] == 2
    assert (out / "checkpoint.old" / "trainer_state.json").is_file()
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated newest weights
    capsys.readouterr()
    assert main(["--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming from the previous good checkpoint" in err and "Traceback" not in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["resumes"][0]["after_epoch"] == 1  # epoch 2 was trained again
    assert "damaged" in metrics["run"]["resumes"][0]["damaged_checkpoints"][0]
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]


# ----------------------------------------------------------------------------- observation 5: non-finite loss


def test_nan_features_stop_training_naming_the_step_posts_and_cause(tmp_path, tiny_bert, capsys):
    from mner.pipeline.cache import cache_fingerprint, group_fingerprint
    from mner.pipeline.cache.base import stored_groups

    data = write_dataset(tmp_path / "data", seed=2, sizes=(8, 4, 4))
    ids = sorted({line[6:] for f in data.glob("*.txt") for line in f.read_text().splitlines()
                  if line.startswith("IMGID:")})
    cache = write_random_cache(tmp_path / "c.h5", ids)
    with h5py.File(cache, "r+") as handle:  # what an older mner let through: NaN rows, fingerprinted
        row = ids.index("train3")
        handle["crops/maskrcnn-test/clip/ViT-B-16-test/crop_embed"][2 * row: 2 * row + 2] = np.nan
        prints = {}
        for name in stored_groups(handle):
            handle[name].attrs["fingerprint"] = prints[name] = group_fingerprint(handle[name])
        handle.attrs["fingerprint"] = cache_fingerprint(prints)
    out = tmp_path / "run"
    code = main(["--data", str(data), "--features", str(cache), "--model", "vcrmner", "--text-encoder",
                 str(tiny_bert), "--out", str(out), "--epochs", "2", "--batch-size", "4", "--max-length", "24",
                 "--device", "cpu", "--set", "num_blocks=1", "--set", "num_heads=2", "--set", "max_objects=2"])
    err = one_line_error(capsys)
    assert code == 1
    assert "the loss is nan at step" in err and "image train3" in err and "mner-features verify" in err
    assert "run written" not in err and not (out / "metrics.json").exists()
    assert json.loads((out / "mner-run.json").read_text())["status"] == "unfinished"


# ----------------------------------------------------------------------------- observation 14: sweeps


def test_sweep_dry_run_and_start_validate_every_run(tmp_path, tiny_bert, small_data, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text(textwrap.dedent(f"""
        [datasets.d]
        data = "{small_data}"
        [train]
        text_encoder = "{tiny_bert}"
        epochs = "two"
        [[experiments]]
        model = "bert_crf"
        datasets = ["d"]
        [[experiments]]
        model = "no_such_model"
        datasets = ["d"]
        [[experiments]]
        model = "vcrmner"
        presets = ["no-such-preset"]
        datasets = ["d"]
        [[experiments]]
        model = "pmner"
        switches = {{typo = ["dropuot=0.1"]}}
        datasets = ["d"]
    """))
    out = tmp_path / "runs"
    assert main(["sweep", str(grid), "--out", str(out), "--dry-run"]) == 2
    captured = capsys.readouterr()
    listing = captured.out
    assert "Traceback" not in captured.err, captured
    assert "todo" not in listing and listing.count("invalid") >= 4, captured
    assert "epochs=two" in listing and "no_such_model" in listing and "no-such-preset" in listing
    assert "dropuot" in listing
    assert main(["sweep", str(grid), "--out", str(out)]) == 2
    assert "cannot start" in one_line_error(capsys) and not out.exists()  # nothing was started


def test_train_into_a_read_only_or_missing_parent_is_one_line(small_data, tiny_bert, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(train_args(small_data, tiny_bert, blocker / "run")) == 2
    assert "is a file, not a folder" in one_line_error(capsys)
    if os.geteuid() == 0:
        return  # root writes into a chmod-ed folder anyway; the read-only mount test covers EROFS
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    assert main(train_args(small_data, tiny_bert, locked / "run")) == 2
    assert "permission denied" in one_line_error(capsys)


def test_report_figures_follow_the_output_rule(finished_run, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(finished_run), "--out", str(out), "--bootstrap", "10"]) == 0
    assert (out / "mner-report.json").is_file() and (out / "results.csv").is_file()
    assert main(["report", str(finished_run), "--out", str(out)]) == 2  # mner's, but only with --overwrite
    assert "--overwrite" in one_line_error(capsys)
    assert main(["report", str(finished_run), "--out", str(out), "--overwrite"]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("my numbers\n")
    assert main(["report", str(finished_run), "--out", str(mine), "--overwrite"]) == 2
    assert "not an mner report folder" in one_line_error(capsys)
    assert (mine / "results.csv").read_text() == "my numbers\n"
    assert main(["report", str(finished_run), "--out", str(finished_run), "--overwrite"]) == 2  # its input
    assert "also an input" in one_line_error(capsys)
