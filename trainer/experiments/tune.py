"""``mner-train tune SPACE.toml``: hyper-parameter search on Optuna, each trial an ordinary run folder.

The space (trainer/experiments/tune_space.py) is a grid file of one configuration plus distributions.
Every trial is trained by the sweep's own entry point (``sweep.launch_training``) into
``<out>/trials/<number>``, with ``score_test=false``: the objective is the best epoch's dev F1 and a
trial never decodes test. After each epoch the trial reports its dev F1 to the pruner.

The study lives in a storage every worker shares: by default Optuna's journal file
``<out>/study.journal`` (append-only, file-locked; works on NFS), or ``--storage sqlite:///x.db`` /
any SQLAlchemy URL. Any number of ``tune`` processes (several GPUs, hosts, a SLURM array) may work on
one study at once; each asks the storage for the next trial. The budget (``[search] trials``) counts
the study's finished, pruned, running and queued trials, and genuine failures, so workers stop
together.

Kills: a trial whose worker died stays ``RUNNING`` in the storage. The next worker to start a trial
finds it (same host: its pid is dead; other hosts: no heartbeat for ``stale_after_s``), marks it
``FAIL`` (an atomic state change: of two workers only one wins) with ``not_counted``, and queues a
retry with the same values and the same run folder; the retry resumes that folder from its last
checkpoint. So a killed trial is resumed, and counted once.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mner.trainer.core.config import ConfigError
from mner.trainer.core.tracking import RunObserver
from mner.trainer.experiments.tune_space import Space, load_space

TUNE_FILE = "tune.json"  # <out>/tune.json: the space, the storage and the study name (report reads it)
JOURNAL_FILE = "study.journal"
TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"  # <trial folder>/trial.json: the trial's number, state, value and values
LOG_FILE = "tune-log.jsonl"
HEARTBEAT_S = 30.0  # a running trial's worker writes a heartbeat this often
# Test-only hooks (tests/test_tune.py): "N:S" SIGKILLs this process at step S of trial number N;
# "DIR:N" makes each worker wait, after opening the study, until N workers have registered in DIR.
KILL_IN_TRIAL_ENV = "MNER_TEST_TUNE_SIGKILL"
BARRIER_ENV = "MNER_TEST_TUNE_BARRIER"


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


class PruneOnDev(RunObserver):
    """Reports each epoch's dev F1 to the trial and stops the run when the pruner says so (never after the
    last epoch: a trial that trained to the end is scored)."""

    def __init__(self, trial):
        self.trial = trial
        self.epochs = 0
        self.reported: dict[int, float] = {}

    def on_start(self, *, out, epochs, epochs_done, history) -> None:
        self.epochs = epochs
        for entry in history:  # a retry resuming a killed trial's folder reports the epochs it keeps
            self._report(int(entry["epoch"]), float(entry["dev_f1"]))

    def _report(self, epoch: int, dev_f1: float) -> None:
        if epoch not in self.reported:
            self.trial.report(dev_f1, epoch)
            self.reported[epoch] = dev_f1

    def on_epoch(self, epoch: int, values: dict[str, float]) -> None:
        import optuna

        self._report(epoch, values["dev/f1"])
        if epoch < self.epochs and self.trial.should_prune():
            raise optuna.TrialPruned(f"dev F1 {100 * values['dev/f1']:.2f} after epoch {epoch}")


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


def write_trial_file(run_dir: Path, trial, *, state: str, value: float | None, extra: dict | None = None) -> None:
    from mner.trainer.core.run_folder import write_json_atomic

    if not run_dir.is_dir():
        return
    write_json_atomic(run_dir / TRIAL_FILE, {
        "number": trial.number, "state": state, "dev_f1": value, "params": trial.params,
        "retry_of": trial.user_attrs.get("retry_of"), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {})})


def _set_test_kill(trial_number: int) -> None:
    from mner.trainer.core.engine import KILL_AT_STEP_ENV

    hook = os.environ.get(KILL_IN_TRIAL_ENV, "")
    number, _, step = hook.partition(":")
    if hook and int(number) == trial_number:
        os.environ[KILL_AT_STEP_ENV] = step
    else:
        os.environ.pop(KILL_AT_STEP_ENV, None)


def run_trial(study, trial, space: Space, *, device: str | None) -> tuple[str, float | None]:
    """Train one trial's run folder (or resume the folder of the killed trial it retries); returns
    (state, dev F1) and tells the study."""
    import optuna
    from optuna.trial import TrialState

    from mner.trainer.core.train import TrainingDiverged
    from mner.trainer.experiments.sweep import launch_training, run_state

    run_dir = Path(trial.user_attrs.get("run_dir") or space.out / TRIALS_DIR / f"{trial.number:04d}")
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker", worker_record())
    spec = space.trial_spec(trial.params)
    state = run_state(run_dir)
    retry = trial.user_attrs.get("retry_of")
    values = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    _log(f"trial {trial.number}" + (f" (retry of {retry}, {state})" if retry is not None else "") + f": {values}")
    if state in ("running", "foreign", "done"):
        raise ConfigError(f"{run_dir} is {state}: " + {"running": "a live process trains it",
                                                       "foreign": "mner did not write it",
                                                       "done": "it holds a sweep run"}[state])
    pruner = PruneOnDev(trial)
    _set_test_kill(trial.number)
    with Heartbeat(study, trial):
        try:
            if state != "trained":
                launch_training(spec, run_dir, space.grid.datasets, state=state, device=device, observers=[pruner])
        except optuna.TrialPruned as pruned:
            value = max(pruner.reported.values()) if pruner.reported else None
            study.tell(trial, state=TrialState.PRUNED)
            write_trial_file(run_dir, trial, state="pruned", value=value, extra={"reason": str(pruned)})
            return "pruned", value
        except TrainingDiverged as diverged:  # a NaN/Inf loss: these values are bad, not broken (stopped like a prune)
            value = max(pruner.reported.values()) if pruner.reported else None
            trial.set_user_attr("diverged", str(diverged).splitlines()[0][:500])
            study.tell(trial, state=TrialState.PRUNED)
            write_trial_file(run_dir, trial, state="diverged", value=value, extra={"reason": str(diverged)[:2000]})
            return "diverged", value
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    value = float(metrics["dev"]["micro"]["f1"])
    study.tell(trial, value)
    write_trial_file(run_dir, trial, state="complete", value=value,
                     extra={"best_epoch": metrics.get("best_epoch"), "epochs_run": metrics.get("epochs_run")})
    return "complete", value


# ----------------------------------------------------------------------------- the worker loop


@dataclass
class TuneResult:
    ran: list[tuple[int, str, float | None]] = field(default_factory=list)  # (trial, state, dev F1) by this worker
    failed: list[tuple[int, str]] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)  # stale trials this worker queued again

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _wait_at_barrier() -> None:
    hook = os.environ.get(BARRIER_ENV)
    if not hook:
        return
    folder, _, count = hook.rpartition(":")
    Path(folder, str(os.getpid())).touch()
    deadline = time.time() + 120
    while len(list(Path(folder).iterdir())) < int(count) and time.time() < deadline:
        time.sleep(0.05)


def run_tune(space: Space, study, *, device: str | None = None) -> TuneResult:
    """Ask, train and tell trials until the study holds its budget of counted trials."""
    from optuna.trial import TrialState

    from mner.trainer.core.train import RunInterrupted

    result = TuneResult()
    _wait_at_barrier()
    while True:
        result.retried += recover_stale_trials(study, space)
        used = sum(1 for t in study.get_trials(deepcopy=False) if counted(t))
        if used >= space.trials:
            break
        trial = study.ask(space.params)
        if over_budget(study, trial, space.trials):
            trial.set_user_attr("not_counted", "surplus: the study had its trials when this one was asked")
            study.tell(trial, state=TrialState.FAIL)
            break
        started = time.time()
        try:
            state, value = run_trial(study, trial, space, device=device)
        except (KeyboardInterrupt, RunInterrupted):
            _log(f"tune interrupted in trial {trial.number}; rerun the same command to resume it and go on")
            raise
        except Exception as err:
            message = f"{type(err).__name__}: {err}"
            trial.set_user_attr("error", message[:2000])
            study.tell(trial, state=TrialState.FAIL)
            result.failed.append((trial.number, message))
            _append_log(space.out, {"trial": trial.number, "state": "fail", "error": message,
                                    "traceback": traceback.format_exc(limit=8)})
            _log(f"trial {trial.number} FAILED: {message}")
            continue
        result.ran.append((trial.number, state, value))
        _append_log(space.out, {"trial": trial.number, "state": state, "dev_f1": value,
                                "seconds": round(time.time() - started, 1)})
        _log(f"trial {trial.number}: {state}, dev F1 {100 * (value or 0):.2f} ({time.time() - started:.0f}s); "
             + best_line(study))
    _log(summary(study, space, result))
    return result


def _append_log(out: Path, entry: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOG_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({**entry, "pid": os.getpid(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                  time.gmtime())}) + "\n")


def best_line(study) -> str:
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return "no finished trial yet"
    best = max(complete, key=lambda t: t.value)
    return f"best so far: trial {best.number}, dev F1 {100 * best.value:.2f}"


def summary(study, space: Space, result: TuneResult) -> str:
    from collections import Counter

    states = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False) if counted(t))
    lines = [f"tune {space.study}: this worker ran {len(result.ran)} trial(s); the study holds "
             + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + f" (budget {space.trials}); "
             + best_line(study)]
    if result.failed:
        lines.append("failed trials (errors in tune-log.jsonl; they use the budget, raise --trials to replace them):")
        lines += [f"  trial {n}: {error.splitlines()[0]}" for n, error in result.failed]
    lines.append(f"next: mner-train report {space.out} --out report/{space.study}")
    return "\n".join(lines)


def parse_name_values(pairs: list[str] | None, option: str) -> dict[str, str]:
    from mner.trainer.experiments.sweep import parse_name_values as parse

    return parse(pairs, option)


def tune(space_file: str | Path, *, out: str | Path | None = None, trials: int | None = None,
         storage: str | None = None, sets: list[str] | None = None, data: list[str] | None = None,
         features: list[str] | None = None, device: str | None = None, dry: bool = False) -> int:
    """The ``tune`` command: load the space, open the study, run trials; returns the exit status."""
    try:
        import optuna  # noqa: F401
    except ModuleNotFoundError:
        raise ConfigError("mner-train tune needs optuna: pip install optuna") from None
    space = load_space(space_file, out=out, sets=sets, data_overrides=parse_name_values(data, "--data"),
                       feature_overrides=parse_name_values(features, "--features"), trials=trials)
    from mner.trainer.experiments.sweep import check_inputs

    missing = check_inputs(space.grid, [space.base])
    if dry:
        print(describe(space, storage) + (f"\nmissing inputs (trials would fail): {'; '.join(missing)}" if missing
                                          else ""))
        return 0
    if missing:
        raise ConfigError(f"{space.path}: missing inputs: {'; '.join(missing)}. Pass --data NAME=FOLDER / "
                          "--features NAME=CACHE.h5")
    study = open_study(space, storage=storage)
    _log(f"tune {space.study}: {space.base.config_id}, {len(space.params)} parameter(s), budget {space.trials} "
         f"trials, pruner {space.pruner}, storage {storage_url(space.out, storage)}")
    return run_tune(space, study, device=device).exit_code


def describe(space: Space, storage: str | None) -> str:
    lines = [f"{space.path}: study {space.study!r}, configuration {space.base.config_id} (seed {space.base.seed}), "
             f"{space.trials} trials, pruner {space.pruner}, sampler {space.sampler}",
             f"storage: {storage_url(space.out, storage)}; trial folders: {space.out / TRIALS_DIR}/NNNN"]
    lines += [f"  {name}: {dist!r}" for name, dist in space.params.items()]
    lines.append("every trial: " + " ".join(f"--set {pair}" for pair in space.trial_spec({}).sets))
    return "\n".join(lines)


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
