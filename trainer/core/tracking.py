"""Live tracking of a training run through accelerate's trackers (TensorBoard, W&B, MLflow), and the
observer hook that ``mner-train tune`` uses to prune trials.

The training loop holds one :class:`Tracker` and calls it once per optimiser step
(:meth:`Tracker.step`) and once per epoch (:meth:`Tracker.epoch`); everything else happens here.
What is logged:

- per step (x axis: the run's batch counter, the same on a resumed run): ``train/loss``,
  ``train/grad_norm`` (before clipping), ``train/lr/<part>`` for every parameter group;
- per epoch (at the epoch's last step): ``dev/precision``, ``dev/recall``, ``dev/f1``,
  ``dev/<TYPE>/f1`` (and P / R), ``train/epoch_loss``, ``time/epoch_seconds``, ``time/train_seconds``,
  ``time/eval_seconds``, ``memory/process_rss_mb`` (``memory/cuda_allocated_mb`` on a GPU), ``epoch``;
- once, as hyper-parameters: the run's ``config.json`` and its run record, flattened to dotted keys.

Only process 0 logs (accelerate's trackers run on the main process only). A resumed run continues
the same tracker run: its id is kept in ``<run>/tracking.json``; TensorBoard's event files are
rewritten without the steps logged after the last checkpoint (the resumed run logs them again, with
the same values, since it replays the same batches), W&B is resumed with its run id (it ignores steps
it has already seen), MLflow skips the steps its run already holds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from mner.trainer.core.config import TRACKERS, ConfigError

# tracker -> (module it needs, how to install it)
REQUIRES = {"tensorboard": ("tensorboard", "pip install 'mner[tensorboard]'  (or: pip install tensorboard)"),
            "wandb": ("wandb", "pip install 'mner[wandb]'  (or: pip install wandb)"),
            "mlflow": ("mlflow", "pip install 'mner[mlflow]'  (or: pip install mlflow)")}
TRACKING_FILE = "tracking.json"  # <run>/tracking.json: which tracker run this run folder logs to
LOG_DIR = "tracking"  # <run>/tracking/: TensorBoard event files (W&B / MLflow local files too)


def check_tracker(kind: str) -> None:
    """A valid ``--track`` value whose package is installed, or a one-line ConfigError naming the fix."""
    if kind not in TRACKERS:
        raise ConfigError(f"--track {kind}: valid values: {', '.join(TRACKERS)}")
    if kind != "none":
        module, install = REQUIRES[kind]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--track {kind} needs the {module} package, which is not installed: {install}")


class RunObserver:
    """Something that watches a run (tune's pruner). Methods run on every process; raising stops the run
    after the epoch's checkpoint is on disk (so a stopped run stays resumable)."""

    def on_start(self, *, out: Path, epochs: int, epochs_done: int, history: list[dict]) -> None:
        """Before the first (or, on a resumed run, the next) epoch; ``history`` holds the finished ones."""

    def on_epoch(self, epoch: int, values: dict[str, float]) -> None:
        """After epoch ``epoch`` (1-based) is evaluated on dev and checkpointed."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": scalar}``; lists and None become strings (what trackers accept)."""
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    key = prefix[:-1]
    if isinstance(tree, (bool, int, float, str)):
        return {key: tree}
    return {key: json.dumps(tree, default=str)}


def learning_rates(optimizer) -> dict[str, float]:
    """``{"train/lr/<part>": lr}`` per named parameter group (decayed and undecayed halves share a rate)."""
    rates: dict[str, float] = {}
    for number, group in enumerate(optimizer.param_groups):
        part = str(group.get("name", f"group{number}")).split("/")[0]
        rates.setdefault(f"train/lr/{part}", float(group["lr"]))
    return rates


def epoch_values(dev_scores: dict, entry: dict, memory: dict) -> dict[str, float]:
    """The per-epoch scalars: dev P/R/F1 (micro and per type), loss, seconds and peak memory."""
    micro = dev_scores["micro"]
    values = {f"dev/{k}": float(micro[k]) for k in ("precision", "recall", "f1")}
    for entity_type, scores in sorted(dev_scores.get("per_type", {}).items()):
        values.update({f"dev/{entity_type}/{k}": float(scores[k]) for k in ("precision", "recall", "f1")})
    values["train/epoch_loss"] = float(entry["loss"])
    for key in ("seconds", "train_seconds", "eval_seconds"):
        if entry.get(key) is not None:
            values[f"time/{'epoch_seconds' if key == 'seconds' else key}"] = float(entry[key])
    values.update({f"memory/{k}": float(v) for k, v in memory.items()})
    values["epoch"] = float(entry["epoch"])
    return values


# ----------------------------------------------------------------------------- TensorBoard resume


def compact_tensorboard(folder: Path, before_step: int) -> int:
    """Rewrite the event files under ``folder`` keeping each (tag, step) once and only steps below
    ``before_step``; returns how many scalar events were dropped. Idempotent: a compaction killed
    half-way (new file in place, old ones not yet removed) is finished by the next one."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    dropped = 0
    for log_dir in sorted({p.parent for p in folder.rglob("events.out.tfevents.*")}):
        files = sorted(log_dir.glob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime_ns, p.name))
        kept, seen = [], set()
        for path in files:
            for event in EventFileLoader(str(path)).Load():
                if event.HasField("file_version"):
                    continue  # the writer adds its own
                tags = tuple(value.tag for value in event.summary.value) if event.HasField("summary") else ()
                if tags and (event.step >= before_step or (tags, event.step) in seen):
                    dropped += 1
                    continue
                seen.add((tags, event.step))
                kept.append(event)
        staging = log_dir.parent / f".{log_dir.name}.compact-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        writer = EventFileWriter(str(staging), filename_suffix=".compacted")
        for event in kept:
            writer.add_event(event)
        writer.close()
        (new_file,) = staging.glob("events.out.tfevents.*")
        os.replace(new_file, log_dir / new_file.name)
        staging.rmdir()
        for path in files:
            path.unlink()
    return dropped


# ----------------------------------------------------------------------------- the tracker


class Tracker:
    """The run's tracker (``kind``: none | tensorboard | wandb | mlflow) plus its observers.

    ``log_with`` goes into the engine's ``Accelerator``; :meth:`start` opens (or continues) the
    tracker run; :meth:`step` and :meth:`epoch` are the loop's two calls."""

    def __init__(self, kind: str = "none", *, observers: list[RunObserver] | tuple = ()):
        check_tracker(kind)
        self.kind = kind
        self.observers = list(observers)
        self.accelerator = None
        self.skip_until_step = 0  # MLflow on resume: steps its run already holds

    @property
    def log_with(self) -> list[str] | None:
        return None if self.kind == "none" else [self.kind]

    @property
    def active(self) -> bool:
        return self.accelerator is not None

    def start(self, accelerator, *, out: Path, run_config: dict, record: dict, epochs: int, epochs_done: int,
              steps_done: int, history: list[dict]) -> None:
        """Open the tracker run (a fresh one, or the run folder's own on resume), log the hyper-parameters
        once, and tell the observers where the run starts."""
        for observer in self.observers:
            observer.on_start(out=out, epochs=epochs, epochs_done=epochs_done, history=history)
        if self.kind == "none":
            return
        self.accelerator = accelerator
        if not accelerator.is_main_process:
            return
        known_file = out / TRACKING_FILE
        known = json.loads(known_file.read_text(encoding="utf-8")) if known_file.is_file() else None
        if known is not None and known.get("kind") != self.kind:
            known = None  # another tracker before: this one starts its own run
        name = out.resolve().name
        init_kwargs: dict[str, dict] = {}
        if self.kind == "tensorboard" and known is not None:
            compact_tensorboard(out / LOG_DIR, before_step=steps_done + 1)
        elif self.kind == "wandb":
            run_id = known["id"] if known else _new_id()
            init_kwargs["wandb"] = {"id": run_id, "resume": "allow", "dir": str(out / LOG_DIR), "name": name}
        elif self.kind == "mlflow" and known is not None:
            init_kwargs["mlflow"] = {"run_id": known["id"]}
        elif self.kind == "mlflow":
            init_kwargs["mlflow"] = {"run_name": name}
        (out / LOG_DIR).mkdir(parents=True, exist_ok=True)
        config = None if known is not None else flatten({"config": run_config, "run": record})
        accelerator.init_trackers(name if self.kind != "wandb" else "mner", config=config, init_kwargs=init_kwargs)
        tracker_id = known["id"] if known else None
        if self.kind == "wandb":
            tracker_id = init_kwargs["wandb"]["id"]
        elif self.kind == "mlflow":
            active_run = accelerator.get_tracker("mlflow", unwrap=True)
            tracker_id = tracker_id or active_run.info.run_id
            if known is not None:
                self.skip_until_step = _mlflow_last_step(known["id"])
        if known is None:
            from mner.trainer.core.run_folder import write_json_atomic

            write_json_atomic(known_file, {"kind": self.kind, "id": tracker_id, "log_dir": LOG_DIR,
                                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    learning_rates = staticmethod(learning_rates)

    def steps(self, window: list[tuple[int, Any, dict]], tracked: list[tuple[dict, Any]]) -> None:
        """A window of batches, logged once its losses are on the host (the engine reads them per window):
        ``window`` holds (step, loss tensor, batch), ``tracked`` (learning rates, gradient norm tensor or None)."""
        if not self.active:
            return
        import torch

        losses = torch.stack([loss.float() for _, loss, _ in window]).tolist()
        for (step, _, _), loss, (rates, norm) in zip(window, losses, tracked):
            if step <= self.skip_until_step:
                continue
            values = {"train/loss": loss, **rates}
            if norm is not None:
                values["train/grad_norm"] = float(norm)
            self.accelerator.log(values, step=step)

    def epoch(self, epoch: int, step: int, *, dev_scores: dict, entry: dict, memory: dict) -> None:
        """One finished (checkpointed) epoch: log its scalars, then ask the observers (which may stop the run)."""
        values = epoch_values(dev_scores, entry, memory)
        if self.active and step > self.skip_until_step:
            self.accelerator.log(values, step=step)
            self.flush()
        for observer in self.observers:
            observer.on_epoch(epoch, values)

    def flush(self) -> None:
        if not self.active or not self.accelerator.is_main_process:
            return
        for tracker in self.accelerator.trackers:
            writer = getattr(tracker, "writer", None)
            if writer is not None:
                writer.flush()

    def end(self) -> None:
        if self.active:
            self.accelerator.end_training()
            self.accelerator = None


def _new_id() -> str:
    import uuid

    return uuid.uuid4().hex[:12]


def _mlflow_last_step(run_id: str) -> int:
    """The last step of ``train/loss`` an MLflow run holds (0 when none)."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(run_id, "train/loss")
    return max((m.step for m in history), default=0)
