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

Kills: a trial whose worker died is found by the next worker, marked ``FAIL`` (not counted) and retried
with the same values in the same run folder, which the retry resumes: resumed, and counted once
(trainer/experiments/tune_study.py holds the storage, the budget and this recovery).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from mner.trainer.core.config import ConfigError
from mner.trainer.core.tracking import RunObserver
from mner.trainer.experiments.tune_space import Space, load_space
from mner.trainer.experiments.tune_study import (
    Heartbeat,
    counted,
    open_study,
    over_budget,
    recover_stale_trials,
    storage_url,
    worker_record,
)

TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"  # <trial folder>/trial.json: the trial's number, state, value and values
LOG_FILE = "tune-log.jsonl"
# Test-only hooks (tests/test_tune.py): "N:S" SIGKILLs this process at step S of trial number N;
# "DIR:N" makes each worker wait, after opening the study, until N workers have registered in DIR.
KILL_IN_TRIAL_ENV = "MNER_TEST_TUNE_SIGKILL"
BARRIER_ENV = "MNER_TEST_TUNE_BARRIER"


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


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
