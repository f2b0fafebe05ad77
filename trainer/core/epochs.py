"""The epoch loop: train, score dev, keep the best, checkpoint after each epoch (resumable)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from mner.trainer.core.config import ConfigError, TrainConfig
from mner.trainer.core.console import log, warn_loudly
from mner.trainer.core.engine import Engine, NonFiniteLoss
from mner.trainer.core.run_folder import (
    STATE_FILE,
    RunFolderError,
    checkpoint_candidates,
    checkpoint_files,
    checkpoint_problem,
    checkpoint_staging,
    commit_checkpoint,
    latest_checkpoint,
    link_or_copy,
    write_json_atomic,
    write_marker,
)
from mner.trainer.core.tracking import Tracker
from mner.trainer.evaluation.decode import predict_tags, score_split
from mner.trainer.inputs.batching import Collator, PostDataset


@dataclasses.dataclass
class TrainerState:
    """Everything the loop itself carries from epoch to epoch (saved in every checkpoint)."""

    epoch: int = 0  # epochs finished
    history: list = dataclasses.field(default_factory=list)
    best_f1: float = -1.0
    best_epoch: int = 0
    epochs_without_gain: int = 0
    stopped_early: bool = False
    resumes: list = dataclasses.field(default_factory=list)  # when and at which epoch the run was resumed


def run_epochs(engine: Engine, state: TrainerState, net, optimizer, scheduler, train_loader, sampler, *,
               config: TrainConfig, out: Path, eval_set: PostDataset, collator: Collator, labels: list[str],
               tracker: Tracker, dev_score=None) -> None:
    """Epochs ``state.epoch + 1 ..`` with a checkpoint after each, until ``config.epochs`` or early stop;
    ``tracker`` gets each step and each finished epoch. ``dev_score(model) -> scores`` replaces the dev
    entity scores as the selection score (GMNER runs: dev GMNER P/R/F1 as ``micro``)."""
    epoch_bar = tqdm(range(state.epoch + 1, config.epochs + 1), desc="epochs", dynamic_ncols=True, file=sys.stderr,
                     disable=not engine.is_main)
    for epoch in epoch_bar:
        if state.stopped_early:
            break
        epoch_start, cpu_start = time.time(), time.process_time()
        sampler.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        loss = engine.train_epoch(net, train_loader, optimizer, scheduler, max_grad_norm=config.max_grad_norm,
                                  desc=f"epoch {epoch}", tracker=tracker)
        train_seconds = time.time() - epoch_start
        if dev_score is not None:
            dev_scores = dev_score(engine.unwrap(net))
        else:
            dev_pred = predict_tags(engine.unwrap(net), eval_set, collator, labels=labels, device=engine.device,
                                    batch_size=config.eval_batch_size, num_workers=config.num_workers, desc="dev")
            dev_scores = score_split(eval_set.posts, dev_pred)
        dev_f1, agreement = engine.agree(net, dev_scores["micro"]["f1"])
        if agreement and not agreement["replicas_agree"]:
            warn_loudly(f"epoch {epoch}: the {engine.world_size} processes disagree (dev F1 by rank "
                        f"{agreement['dev_f1_by_rank']}, or their weights / buffers differ); process 0's "
                        "dev F1 decides; recorded in metrics.json history")
        improved = dev_f1 > state.best_f1
        if improved:
            state.best_f1, state.best_epoch, state.epochs_without_gain = dev_f1, epoch, 0
        else:
            state.epochs_without_gain += 1
        state.epoch = epoch
        state.stopped_early = bool(config.patience and state.epochs_without_gain >= config.patience)
        eval_seconds = time.time() - epoch_start - train_seconds

        checkpoint_start = time.time()
        state.history.append({"epoch": epoch, "loss": loss, "dev_f1": dev_f1, "train_seconds": round(train_seconds, 2),
                              "eval_seconds": round(eval_seconds, 2), "seconds": None, "checkpoint_seconds": None,
                              "cpu_seconds": None, **agreement})
        snapshot = engine.snapshot(net, optimizer, scheduler)  # the write overlaps the next epoch
        if engine.is_main:
            engine.writer.submit(functools.partial(
                write_checkpoint, out, snapshot, copy.deepcopy(dataclasses.asdict(state)), improved, config.epochs))
        state.history[-1].update(checkpoint_seconds=round(time.time() - checkpoint_start, 2),
                                 seconds=round(time.time() - epoch_start, 2),
                                 cpu_seconds=round(time.process_time() - cpu_start, 2))  # all threads
        epoch_bar.set_postfix(loss=f"{loss:.3f}", dev_f1=f"{100 * dev_f1:.2f}",
                              best=f"{100 * state.best_f1:.2f}@{state.best_epoch}")
        log(f"epoch {epoch}: loss {loss:.4f}  dev F1 {100 * dev_f1:.2f}{'  (best)' if improved else ''}  "
            f"{time.time() - epoch_start:.0f}s")
        if state.stopped_early:
            log(f"early stop: no better dev F1 for {config.patience} epochs")
        tracker.epoch(epoch, engine.global_step, dev_scores=dev_scores, entry=state.history[-1],
                      memory=engine.peak_memory_mb())
    epoch_bar.close()


def describe_divergence(err: NonFiniteLoss, train_set: PostDataset, state: TrainerState, out: Path) -> str:
    """One message: the step, the batch's posts (and those with non-finite features), the likely cause."""
    posts = [train_set.posts[i] for i in err.post_indices if 0 <= i < len(train_set.posts)]
    shown = ", ".join(f"{p.post_id} ({p.source})" for p in posts[:8]) + (" ..." if len(posts) > 8 else "")
    bad = [posts[row] for row in err.bad_rows if row < len(posts)]
    images = ("; posts whose cached features are not finite: "
              + ", ".join(f"{p.post_id} (image {p.image_id})" for p in bad[:8])) if bad else ""
    return (f"training stopped: the loss is {err.loss} at step {err.step} (epoch {state.epoch + 1}); batch posts "
            f"{shown}{images}. Likely cause: {err.cause}. {out} keeps {state.epoch} finished epoch(s) and is not "
            "a finished run")


def write_checkpoint(out: Path, snapshot: dict, state: dict, improved: bool, epochs: int) -> None:
    """Stage, complete and swap in one epoch's checkpoint (runs in the engine's background writer).
    The best-so-far weights are this epoch's model when it improved, else the previous checkpoint's
    best (hard links: no rewrite); the trainer state goes last and marks the checkpoint complete."""
    previous = latest_checkpoint(out)
    staging = checkpoint_staging(out)
    Engine.write_snapshot(snapshot, staging)
    best = staging / "best_model.safetensors"
    link_or_copy(staging / "model.safetensors" if improved or previous is None
                 else previous / "best_model.safetensors", best)
    state = {**state, "files": checkpoint_files(staging)}  # verified on --resume (a damaged one is skipped)
    write_json_atomic(staging / STATE_FILE, state)
    commit_checkpoint(out)
    write_marker(out, status="unfinished", epochs=epochs, epochs_done=state["epoch"])


def load_good_checkpoint(engine: Engine, out: Path, net, optimizer, scheduler) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match their recorded hashes and load; a damaged newest one
    falls back to the previous epoch's (``checkpoint.old``). Returns it (None: no epoch had finished)
    and what was wrong with the ones skipped (warned about and recorded in the run)."""
    candidates = checkpoint_candidates(out)
    damaged: list[str] = []
    for checkpoint in candidates:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            try:
                engine.load_checkpoint(checkpoint, net, optimizer, scheduler)
            except ConfigError:
                raise
            except Exception as err:  # a truncated safetensors / pickle: try the previous epoch's
                problem = f"{checkpoint} does not load ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
        if problem is None:
            if damaged:
                warn_loudly(f"{'; '.join(damaged)}: resuming from the previous good checkpoint {checkpoint}")
            return checkpoint, damaged
        damaged.append(problem)
    if damaged:
        raise RunFolderError(f"no intact checkpoint in {out} ({'; '.join(damaged)}); start the run again with "
                             "--overwrite")
    return None, damaged
