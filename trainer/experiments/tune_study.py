"""The study behind ``mner-train tune``: its storage (journal file or SQL, shared by every worker), sampler
and pruner, the trial budget, and the recovery of trials whose worker died (trainer/experiments/tune.py
runs the trials).

A trial whose worker died stays ``RUNNING`` in the storage. The next worker to start a trial finds it
(same host: its pid is dead; other hosts: no heartbeat for ``stale_after_s``), marks it ``FAIL`` with
``not_counted`` (an atomic state change: of two workers only one wins) and queues a retry with the same
values and the same run folder, which the retry resumes from its last checkpoint.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mner.trainer.core.config import ConfigError
from mner.trainer.experiments.tune_space import Space

TUNE_FILE = "tune.json"  # <out>/tune.json: the space, the storage and the study name (report reads it)
JOURNAL_FILE = "study.journal"
HEARTBEAT_S = 30.0  # a running trial's worker writes a heartbeat this often


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


# ----------------------------------------------------------------------------- storage and study


def storage_url(out: Path, storage: str | None) -> str:
    """``--storage``: None -> the journal file in the study folder; a path -> a journal file there
    (``*.db`` / ``*.sqlite``: SQLite); a URL (``sqlite:///x.db``, ``postgresql://...``) as given."""
    if storage is None:
        return str((out / JOURNAL_FILE).resolve())
    if "://" in storage:
        return storage
    path = Path(storage).resolve()
    return f"sqlite:///{path}" if path.suffix in (".db", ".sqlite", ".sqlite3") else str(path)


def open_storage(url: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" in url:
        return optuna.storages.RDBStorage(url)
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(url))


def make_pruner(space: Space):
    """median: after epoch e a trial stops when its best dev F1 so far is below the median of the other
    trials' dev F1 at epoch e (once ``startup_trials`` trials have finished, and after
    ``warmup_epochs``). asha: successive halving (ASHA's asynchronous rule) with rungs at epochs 1, 3,
    9, ...: a trial goes on past a rung only in the top third of the trials that reached it."""
    import optuna

    if space.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=space.startup_trials, n_warmup_steps=space.warmup_epochs)
    if space.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def make_sampler(space: Space):
    import optuna

    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=space.sampler_seed)
    return optuna.samplers.TPESampler(n_startup_trials=space.startup_trials, seed=space.sampler_seed,
                                      constant_liar=True)  # workers in parallel do not all draw the same point


def tune_record(space: Space, url: str) -> dict:
    """What tune.json holds: enough for ``report`` to open the study and write the best configuration."""
    return {"space": str(space.path), "study": space.study, "storage": url, "fingerprint": space.fingerprint,
            "trials": space.trials, "pruner": space.pruner, "sampler": space.sampler,
            "base": space.base.as_dict(), "seeds": space.seeds,
            "params": {k: repr(v) for k, v in space.params.items()},
            "datasets": {name: {"data": e.data, "features": e.features, "paper": e.paper}
                         for name, e in space.grid.datasets.items()
                         if name in (space.base.train_on, space.base.test_on)},
            "best_out": str(space.out / "best")}


def open_study(space: Space, *, storage: str | None = None):
    """Create or load the study, refusing one that was started from another space."""
    import optuna

    from mner.trainer.core.run_folder import write_json_atomic

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(space.out, storage)
    study = optuna.create_study(study_name=space.study, storage=open_storage(url), direction="maximize",
                                sampler=make_sampler(space), pruner=make_pruner(space), load_if_exists=True)
    known = study.user_attrs.get("fingerprint")
    if known is None:
        study.set_user_attr("fingerprint", space.fingerprint)
        study.set_user_attr("space", str(space.path))
    elif known != space.fingerprint:
        raise ConfigError(f"the study {space.study!r} in {url} was started from another space (the configuration "
                          f"or the distributions differ from {space.path}); give this space another --out, "
                          "or [search] study = another name")
    space.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(space.out / TUNE_FILE, tune_record(space, url))
    return study


# ----------------------------------------------------------------------------- trials


def counted(trial) -> bool:
    """A trial that uses the budget: all but stale trials that were retried and surplus ones."""
    from optuna.trial import TrialState

    return not (trial.state == TrialState.FAIL and trial.user_attrs.get("not_counted"))


def worker_record() -> dict:
    from mner.pipeline.cache.lock import host_name

    return {"host": host_name(), "pid": os.getpid(), "started": time.time()}


def is_stale(trial, stale_after_s: float, now: float) -> bool:
    """A RUNNING trial whose worker is gone: on this host its pid is dead (or it is this process, which is
    between trials); elsewhere its heartbeat is older than ``stale_after_s``."""
    from mner.pipeline.cache.lock import host_name
    from mner.trainer.experiments.sweep import _pid_alive

    worker = trial.user_attrs.get("worker")
    beat = trial.user_attrs.get("heartbeat") or (worker or {}).get("started")
    if beat is None:
        beat = trial.datetime_start.timestamp() if trial.datetime_start else now
    if worker and worker.get("host") == host_name():
        pid = worker.get("pid")
        if pid == os.getpid() or not _pid_alive(pid):
            return True
    return now - beat > stale_after_s


def recover_stale_trials(study, space: Space) -> list[int]:
    """Mark the running trials of dead workers FAIL (not counted) and queue their retries; returns their numbers."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    retried = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not is_stale(trial, space.stale_after_s, now):
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "not_counted", "its worker died; retried")
            study.tell(trial.number, state=TrialState.FAIL)  # one state change wins: the retry is queued once
        except (UpdateFinishedTrialError, RuntimeError, ValueError):
            continue  # another worker recovered it first, or it finished meanwhile
        run_dir = trial.user_attrs.get("run_dir")
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, **({"run_dir": run_dir} if run_dir
                                                                                   else {})})
        _log(f"trial {trial.number}: its worker {trial.user_attrs.get('worker')} is gone; queued a retry"
             + (f" that resumes {run_dir}" if run_dir else ""))
        retried.append(trial.number)
    return retried


def over_budget(study, trial, budget: int) -> bool:
    """True when ``budget`` counted trials with smaller numbers exist (two workers asked at once)."""
    before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and counted(t)]
    return len(before) >= budget


class Heartbeat:
    """Writes ``heartbeat`` into the trial every HEARTBEAT_S while it trains (workers on other hosts read it)."""

    def __init__(self, study, trial):
        self.study, self.trial, self.stop = study, trial, threading.Event()
        self.thread = threading.Thread(target=self._run, name="mner-tune-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.study._storage.set_trial_user_attr(self.trial._trial_id, "heartbeat", time.time())
            except Exception:  # the trial finished meanwhile: nothing to keep alive
                return

    def __enter__(self):
        self.trial.set_user_attr("heartbeat", time.time())
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def trial_table(study) -> list[dict[str, Any]]:
    """One row per trial of the study (what ``report`` tabulates)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else None
        rows.append({"number": t.number, "state": t.state.name.lower(), "dev_f1": t.value,
                     "last_epoch": max(t.intermediate_values, default=None),
                     "intermediate": dict(t.intermediate_values), "params": dict(t.params),
                     "run_dir": t.user_attrs.get("run_dir"), "retry_of": t.user_attrs.get("retry_of"),
                     "counted": counted(t), "note": t.user_attrs.get("not_counted") or t.user_attrs.get("error"),
                     "seconds": seconds})
    return rows
