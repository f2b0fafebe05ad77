"""The stage-2 training run: ``train(...) -> run directory``.

Options are checked, the data, labels, text encoder and feature cache are read, and the model runs
once on the longest post of every split, all before the run folder is created (see
:mod:`mner.trainer.core.run_folder` for its layout, :mod:`mner.trainer.core.engine` for the loop's engine).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from mner.trainer.core.config import ConfigError
from mner.trainer.core.console import log
from mner.trainer.core.engine import NonFiniteLoss
from mner.trainer.core.epochs import TrainerState, describe_divergence, load_good_checkpoint, run_epochs
from mner.trainer.core.request import RunData, RunRequest, load_data_and_labels, resolve_request
from mner.trainer.core.run_folder import (
    STATE_FILE,
    latest_checkpoint,
    remove_checkpoints,
    resume_differences,
    sha256_file,
    write_json_atomic,
    write_marker,
)
from mner.trainer.core.run_record import software_versions
from mner.trainer.core.training import Training, build_training, rank_seed
from mner.trainer.evaluation.decode import DECODE_PRECISION, predict_tags, score_split
from mner.trainer.evaluation.evaluate import format_scores, write_conll, write_parquet
from mner.trainer.inputs.run_inputs import RunInputs, build_inputs
from mner.trainer.inputs.text_encoder import resolve_text_encoder, save_encoder_skeleton, weights_fingerprint


class RunInterrupted(Exception):
    """Ctrl-C during training; the message says how to resume."""


class TrainingDiverged(Exception):
    """The training loss became NaN/Inf: the run stops (it never finishes "successfully" on NaN weights)."""


def train(*, out: str | Path, **options) -> Path:
    """Train one model and return its finished run directory (see :func:`train_locked` for the options).

    One writer per run folder: the first process holds ``<out>.lock`` (host, pid, start time,
    heartbeat; a dead holder's lock is taken over) for the whole run, so a second trainer on the same
    ``--out`` is refused with the holder's name instead of both writing into one folder."""
    from mner.pipeline.cache.lock import CacheLock

    out = Path(out)
    if os.environ.get("RANK", "0") != "0":  # torchrun: process 0 holds the lock for all of them
        return train_locked(out=out, **options)
    if not out.parent.is_dir():
        from mner.pipeline.outputs import check_writable_folder

        check_writable_folder(out.parent, create=True)
    with CacheLock(out, what="run folder"):
        return train_locked(out=out, **options)


def train_locked(
    *,
    out: str | Path,
    model: str | None = None,
    data: str | Path | None = None,
    features: str | Path | None = None,
    preset: str | None = None,
    sets: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    labels: str | list[str] | None = None,
    allow_missing_images: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    boxes: str | Path | None = None,
    observers: list | None = None,
) -> Path:
    """Train one model and return its finished run directory (the caller holds the run folder's lock).

    ``flags`` holds explicit command-line values for TrainConfig fields (None = not given); they
    override the preset and ``--set`` (see :mod:`mner.trainer.core.config`). ``resume`` continues the
    unfinished run in ``out`` with its stored options; options given again must agree with them.
    Every step up to :func:`open_run_folder` only reads and checks, so a refused run writes nothing.
    ``observers`` (:class:`~mner.trainer.core.tracking.RunObserver`) watch the epochs: tune's pruner.
    """
    started = time.time()
    request = resolve_request(out, model=model, data=data, features=features, preset=preset, sets=sets,
                              flags=flags, labels=labels, allow_missing_images=allow_missing_images,
                              overwrite=overwrite, resume=resume, boxes=boxes, observers=observers)
    data_and_labels = load_data_and_labels(request)
    inputs = build_inputs(request, data_and_labels)
    training = build_training(request, data_and_labels, inputs)
    run_config = describe_run(request, data_and_labels, inputs)
    state = open_run_folder(request, training, run_config, inputs.tokenizer)
    start_tracking(request, training, inputs, run_config, state)
    fit(request, training, data_and_labels, inputs, state)
    finish(request, training, data_and_labels, inputs, state, started=started)
    return request.out


def describe_run(request: RunRequest, data: RunData, inputs: RunInputs) -> dict:
    """config.json: everything that decides the run's result (a resume must match it)."""
    return {
        "model": request.model, "preset": request.invocation["preset"], "sets": request.invocation["sets"],
        "model_config": dataclasses.asdict(request.model_config),
        "train_config": dataclasses.asdict(request.config),
        "labels": data.labels, "label_map": data.label_to_id,
        "text_encoder": {"name": request.config.text_encoder,
                         "path": resolve_text_encoder(request.config.text_encoder), "positions": inputs.positions},
        "data": {**data.source, "hash": data.dataset.data_hash, "files": data.dataset.files,
                 "notes": data.dataset.notes},
        "features": inputs.cache_info, "invocation": request.invocation,
    } | ({"gmner": {**inputs.gmner.record(), "feature_width": inputs.gmner.feature_width}} if inputs.gmner else {})


def open_run_folder(request: RunRequest, training: Training, run_config: dict, tokenizer) -> TrainerState:
    """A fresh run folder, or the unfinished one resumed from its last checkpoint (its state returned)."""
    out, engine, config = request.out, training.engine, request.config
    state = TrainerState()
    if request.mode == "resume":
        stored = json.loads((out / "config.json").read_text(encoding="utf-8"))
        differ = resume_differences(stored, run_config)
        if differ:
            raise ConfigError(f"--resume: {out} was started with other options: {'; '.join(differ)}; resume with "
                              "the run's own options (`mner-train --out RUN --resume` is enough) or start a new run")
        checkpoint, damaged = load_good_checkpoint(engine, out, training.net, training.optimizer, training.scheduler)
        if checkpoint is None:
            log(f"{out}: no epoch had finished; starting it from epoch 1")
        else:
            saved = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
            state = TrainerState(**{k: v for k, v in saved.items() if k in TrainerState.__dataclass_fields__})
            engine.global_step = state.epoch * len(training.train_loader)
            log(f"resuming {out} after epoch {state.epoch} of {config.epochs} (best dev F1 "
                f"{100 * state.best_f1:.2f} at epoch {state.best_epoch})")
        state.resumes.append({"after_epoch": state.epoch, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              **({"damaged_checkpoints": damaged} if damaged else {})})
    elif engine.is_main:
        if out.exists():
            shutil.rmtree(out)  # check_out allowed it: --overwrite of a marked mner run
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, status="unfinished", epochs=config.epochs, epochs_done=0)
        write_json_atomic(out / "config.json", run_config)
        write_json_atomic(out / "labels.json", {"labels": run_config["labels"]})
        save_encoder_skeleton(config.text_encoder, tokenizer, out / "text_encoder")
    engine.wait()
    return state


def start_tracking(request: RunRequest, training: Training, inputs: RunInputs, run_config: dict,
                   state: TrainerState) -> None:
    """Open the tracker run (or continue the run folder's own) with config.json and the run record."""
    request.tracker.start(training.engine.accelerator, out=request.out, run_config=run_config,
                          record=process_record(request, training, inputs.cache_info), epochs=request.config.epochs,
                          epochs_done=state.epoch, steps_done=training.engine.global_step, history=state.history)


def fit(request: RunRequest, training: Training, data: RunData, inputs: RunInputs, state: TrainerState) -> None:
    """The epochs; Ctrl-C leaves the last finished epoch's checkpoint complete and says how to resume."""
    engine, out = training.engine, request.out
    log(f"training {request.model} on {len(inputs.train_set)} posts, {len(training.train_loader)} steps/epoch, "
        f"device {engine.device}, {engine.precision}, {engine.world_size} process(es)")
    try:
        run_epochs(engine, state, training.net, training.optimizer, training.scheduler, training.train_loader,
                   training.sampler, config=request.config, out=out, eval_set=inputs.eval_sets["dev"],
                   collator=inputs.collator, labels=data.labels, tracker=request.tracker,
                   dev_score=inputs.gmner.dev_score(inputs.eval_sets["dev"], inputs.collator, labels=data.labels,
                                                    device=engine.device, config=request.config)
                   if inputs.gmner else None)
    except KeyboardInterrupt:
        engine.writer.wait()  # the last finished epoch's checkpoint is complete on disk
        engine.end()
        raise RunInterrupted(
            f"interrupted in epoch {state.epoch + 1}; {out} keeps {state.epoch} finished epoch(s) and is resumable: "
            f"mner-train --out {out} --resume"
        ) from None
    except NonFiniteLoss as err:
        engine.writer.wait()
        raise TrainingDiverged(describe_divergence(err, inputs.train_set, state, out)) from None
    except Exception:  # an observer stopped the run (tune's pruner): its checkpoints stay complete, resumable
        engine.writer.wait()
        engine.end()
        raise


def finish(request: RunRequest, training: Training, data: RunData, inputs: RunInputs, state: TrainerState, *,
           started: float) -> None:
    """The best epoch's weights scored on dev and test; predictions, metrics.json and model.safetensors
    written, the checkpoints removed and the run marked finished."""
    out, engine, config, net = request.out, training.engine, request.config, training.net
    engine.writer.wait()
    engine.wait()
    final = latest_checkpoint(out)
    engine.load_weights(net, final / "best_model.safetensors")
    engine.wait()  # every process has read the best weights before process 0 moves them
    metrics: dict[str, Any] = {
        "model": request.model, "preset": request.invocation["preset"], "best_epoch": state.best_epoch,
        "epochs_run": state.epoch, "stopped_early": state.stopped_early, "data_hash": data.dataset.data_hash,
        "data_source": data.source, "orphan_i": data.dataset.orphan_i, "repaired_train_tags": inputs.train_set.repaired,
        "labels": data.labels, "unseen_types": data.unseen,
    }
    for split, eval_set in inputs.eval_sets.items():
        if inputs.gmner is not None:
            from mner.trainer.gmner.data import predict_grounded

            pred, regions = predict_grounded(engine.unwrap(net), eval_set, inputs.collator, labels=data.labels,
                                             device=engine.device, batch_size=config.eval_batch_size,
                                             num_workers=config.num_workers, desc=split)
        else:
            pred = predict_tags(engine.unwrap(net), eval_set, inputs.collator, labels=data.labels,
                                device=engine.device, batch_size=config.eval_batch_size,
                                num_workers=config.num_workers, desc=split)
        scores = score_split(eval_set.posts, pred)
        metrics[split] = scores
        if engine.is_main:
            write_conll(out / "predictions" / f"{split}.conll", eval_set.posts, pred)
            write_parquet(out / "predictions" / f"{split}.parquet", eval_set.posts, pred)
        log(format_scores(scores, f"{split} (best epoch {state.best_epoch})"))
        if inputs.gmner is not None:
            scores.update(inputs.gmner.finish_split(split, eval_set, regions, out if engine.is_main else None))
    metrics["alignment"] = {
        split: {"words": ds.report.words, "zero_piece": ds.report.zero_piece, "truncated": ds.report.truncated}
        for split, ds in [("train", inputs.train_set), *inputs.eval_sets.items()]
    }
    cache_info = inputs.cache_info
    if cache_info is not None:
        metrics["cache"] = {k: cache_info[k] for k in ("path", "fingerprint", "groups")}
        metrics["image_coverage"] = cache_info["coverage"]
    if inputs.visual is not None:
        metrics["random_init_features"] = inputs.visual.random_init
        metrics["stage1_mismatches"] = inputs.stage1_mismatches
    if inputs.gmner is not None:
        metrics["gmner"] = inputs.gmner.record(train_set=inputs.train_set)
    metrics["history"] = state.history
    metrics["run"] = {
        **process_record(request, training, cache_info), "resumes": state.resumes,
        "epoch_seconds": [h["seconds"] for h in state.history],
        "seconds_this_process": round(time.time() - started, 1), "peak_memory": engine.peak_memory_mb(),
    }
    if engine.is_main:
        os.replace(final / "best_model.safetensors", out / "model.safetensors")
        os.chmod(out / "model.safetensors", 0o644)
        weights_sha256 = sha256_file(out / "model.safetensors")  # evaluate / predict verify it
        metrics["run"]["weights_sha256"] = weights_sha256
        write_json_atomic(out / "metrics.json", metrics)
        remove_checkpoints(out)
        write_marker(out, status="finished", epochs=config.epochs, epochs_done=state.epoch,
                     weights_sha256=weights_sha256)
        log(f"run written to {out}")
    engine.wait()
    engine.end()


def process_record(request: RunRequest, training: Training, cache_info: dict | None) -> dict:
    """metrics.json's "run": software, seed, device and precision, and the weights the run read."""
    config, engine = request.config, training.engine
    return {
        "software": software_versions(), "seed": config.seed, "device": str(engine.device),
        "precision": engine.precision, "decode_precision": DECODE_PRECISION, "world_size": engine.world_size,
        "grad_accum": config.grad_accum,
        "rank_seeds": [rank_seed(config.seed, rank) for rank in range(engine.world_size)],
        "optimizer_steps_per_epoch": engine.optimizer_steps_per_epoch(training.train_loader),
        "text_encoder": {"name": config.text_encoder, "weights": weights_fingerprint(config.text_encoder)},
        "cache": None if cache_info is None else {k: cache_info[k] for k in ("path", "fingerprint", "groups")},
    }


