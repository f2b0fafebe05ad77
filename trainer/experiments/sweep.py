"""``mner-train sweep GRID.toml``: train every run of a grid (trainer/experiments/grid.py) that is not done.

One extraction serves every ablation and seed. Each run gets its own folder::

    <out>/<data>/<model>/<preset>[+<switch>]/s<seed>
    data = t15 (in-domain) | t15-to-t17 (cross-domain) | t15-frac0.10 (low-resource)

A run is *done* when its folder holds ``sweep.json`` (written after training and, for
cross-domain runs, after scoring on the other dataset). Done runs are skipped, unfinished ones are
resumed (or restarted where the training engine cannot resume), a failing run is recorded in
``<out>/sweep-log.jsonl`` and the sweep goes on. Several sweep processes may split one grid with
``--task i/n`` (SLURM arrays, one process per GPU): see docs/experiments.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mner.trainer.core.config import ConfigError
from mner.trainer.experiments.grid import DatasetEntry, Grid, RunSpec, load_grid, select_task

SPEC_FILE = "sweep.json"  # written into a run folder when every step of the run is done
LOG_FILE = "sweep-log.jsonl"  # one line per run attempt (done / failed) in the sweep's root


# ----------------------------------------------------------------------------- run folders


def _pid_alive(pid: int) -> bool:
    """True for a running process; a killed process that its parent has not reaped yet (a zombie) is dead."""
    from mner.pipeline.cache.lock import pid_alive

    if not pid_alive(pid):
        return False
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill()
    return "\nState:\tZ" not in status and "\nState:\tX" not in status


def _lock_held(run_dir: Path) -> bool:
    """``<run>.lock`` held by a live trainer: a live pid on this host, or a fresh heartbeat from another."""
    from mner.pipeline.cache.lock import STALE_AFTER_S, host_name, read_holder

    holder = read_holder(f"{run_dir}.lock")
    if holder is None:
        return False
    pid = holder.get("pid")
    if holder.get("host") == host_name() and isinstance(pid, int) and pid > 0:
        return pid != os.getpid() and _pid_alive(pid)
    return holder.get("age_s", 0.0) <= STALE_AFTER_S


def _temp_dirs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.parent.glob(f"{run_dir.name}.tmp-*")) if run_dir.parent.is_dir() else []


def run_state(run_dir: Path) -> str:
    """The state of a run folder, which decides what the sweep does with it:

    done (skip) | trained (finish the post-training steps) | running (a live process on this host
    trains it: skip) | unfinished (resume it) | restart (leftovers that cannot be resumed: start it
    again) | foreign (a folder mner did not write: the engine refuses it) | todo (start it).
    """
    from mner.pipeline.cache.lock import host_name
    from mner.trainer.core.run_folder import read_marker

    if (run_dir / SPEC_FILE).is_file() and (run_dir / "metrics.json").is_file():
        return "done"
    if (run_dir / "metrics.json").is_file():
        return "trained"
    if _lock_held(run_dir):  # another trainer (this host or another) holds the run folder's lock
        return "running"
    marker = read_marker(run_dir)
    if marker is not None:
        pid = marker.get("pid")
        if marker.get("host") == host_name() and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
            return "running"
        # killed before its options were written (its first second): nothing to resume from
        return "unfinished" if (run_dir / "config.json").is_file() else "restart"
    for temp in _temp_dirs(run_dir):  # <out>.tmp-<pid>: written by the engine before resumable runs
        pid = temp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            return "running"
    if _temp_dirs(run_dir):
        return "restart"
    if run_dir.exists() and any(run_dir.iterdir()):
        return "foreign"
    return "todo"


def launch_training(spec: RunSpec, run_dir: Path, datasets: dict[str, DatasetEntry], *, state: str,
                    device: str | None, observers: list | None = None) -> None:
    """Train one run through the ordinary ``train`` entry point: the one place a sweep starts training.

    ``unfinished`` runs continue from their last finished epoch (``--resume``); ``restart`` ones are
    started again (``--overwrite``, which the engine allows only on folders it marked as its own).
    ``observers`` watch the epochs (``mner-train tune``'s pruner).
    """
    from mner.trainer.core.train import train

    if state == "restart":
        import shutil

        for temp in _temp_dirs(run_dir):  # a dead process's half-written folder (run_state checked liveness)
            shutil.rmtree(temp, ignore_errors=True)
    source = datasets[spec.train_on]
    flags: dict[str, Any] = {"seed": spec.seed, "train_fraction": spec.fraction, "device": device}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    train(out=run_dir, model=spec.model, data=source.data, features=source.features, preset=spec.preset,
          sets=list(spec.sets), flags=flags, resume=state == "unfinished",
          overwrite=state == "restart" and run_dir.exists(), boxes=source.boxes, observers=observers)


def finish_run(spec: RunSpec, run_dir: Path, datasets: dict[str, DatasetEntry], *, device: str | None,
               grid_path: Path) -> dict:
    """Post-training steps (cross-domain scoring), then ``sweep.json``: the run is done."""
    record: dict[str, Any] = {"spec": spec.as_dict(), "grid": str(grid_path),
                              "datasets": {name: dataclasses.asdict(datasets[name])
                                           for name in dict.fromkeys((spec.train_on, spec.test_on))},
                              "test_scores": "metrics.json#test"}
    if spec.protocol == "cross-domain":
        from mner.trainer.evaluation.evaluate import evaluate_run

        target = datasets[spec.test_on]
        result = evaluate_run(run_dir, split="test", data=target.data, features=target.features,
                              device=device or "auto")
        record["test_scores"] = f"eval/test-{result['data_hash'][:8]}.json"
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    temp = run_dir / f"{SPEC_FILE}.tmp-{os.getpid()}"
    temp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(temp, run_dir / SPEC_FILE)
    return record


def check_recorded_spec(spec: RunSpec, run_dir: Path) -> None:
    """A done folder must hold the run the grid asks for, or its numbers would be silently wrong."""
    recorded = json.loads((run_dir / SPEC_FILE).read_text(encoding="utf-8")).get("spec", {})
    wanted = spec.as_dict()
    differ = sorted(k for k in wanted if recorded.get(k) != wanted[k])
    if differ:
        detail = "; ".join(f"{k}: folder has {recorded.get(k)!r}, grid asks {wanted[k]!r}" for k in differ)
        raise ConfigError(f"{run_dir} holds a run with other settings ({detail}); use another --out or remove it")


# ----------------------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    ran: list[str] = field(default_factory=list)  # run ids trained (or finished) by this call
    skipped: list[str] = field(default_factory=list)  # already done
    busy: list[str] = field(default_factory=list)  # being trained by another live process
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run id, error)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _append_log(root: Path, entry: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOG_FILE, "a", encoding="utf-8") as handle:  # one short line per write: safe to share
        handle.write(json.dumps(entry) + "\n")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def check_inputs(grid: Grid, runs: list[RunSpec]) -> list[str]:
    """Data folders and caches that the selected runs need but that do not exist."""
    missing = []
    for name in dict.fromkeys(n for spec in runs for n in (spec.train_on, spec.test_on)):
        entry = grid.datasets[name]
        for kind, value in (("data", entry.data), ("features", entry.features)):
            if value is not None and not Path(value).exists():
                missing.append(f"{name}: {kind} {value}")
    return missing


def check_run_settings(runs: list[RunSpec], *, device: str | None = None) -> dict[str, str]:
    """Run id -> why its model, preset or settings are invalid (empty when every run can start).

    The same resolution ``train`` does before reading any data (model registry, preset, ``--set``
    keys and values, option ranges, the model's own checks), so a sweep never lists a run as "todo"
    that would fail in its first second, and never starts a grid in which some runs cannot run."""
    from mner.trainer.core.config import resolve_configs, validate_model_config
    from mner.trainer.models import get_model_class

    problems: dict[str, str] = {}
    seen: dict[tuple, str | None] = {}
    for spec in runs:
        key = (spec.model, spec.preset, tuple(spec.sets), spec.fraction)
        if key not in seen:
            seen[key] = None
            try:
                model_cls = get_model_class(spec.model)
                flags = {"seed": spec.seed, "train_fraction": spec.fraction, "device": device}
                model_config, _ = resolve_configs(model_cls, preset=spec.preset, sets=list(spec.sets), flags=flags)
                validate_model_config(model_cls, model_config)
            except KeyError as err:
                seen[key] = str(err.args[0] if err.args else err)
            except ConfigError as err:
                seen[key] = str(err)
        if seen[key] is not None:
            problems[spec.run_id] = seen[key]
    return problems


def describe_invalid(problems: dict[str, str], limit: int = 10) -> str:
    shown = [f"{run_id}: {problem}" for run_id, problem in list(problems.items())[:limit]]
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return f"{len(problems)} run(s) cannot start: " + "; ".join(shown) + more


def dry_run(grid: Grid, runs: list[RunSpec], invalid: dict[str, str] | None = None) -> str:
    lines = [f"{grid.path}: {len(runs)} runs under {grid.out}"]
    invalid = invalid or {}
    for number, spec in enumerate(runs, 1):
        state = "invalid" if spec.run_id in invalid else run_state(grid.out / spec.run_id)
        if state == "done":
            try:
                check_recorded_spec(spec, grid.out / spec.run_id)
            except ConfigError:
                state = "changed"  # the folder holds other settings: the sweep will refuse it
        lines.append(f"{number:>4}  {state:<10} {spec.run_id:<60} {spec.protocol}"
                     + (f"  --preset {spec.preset!r}" if spec.preset else "")
                     + "".join(f" --set {pair}" for pair in spec.sets))
    missing = check_inputs(grid, runs)
    if missing:
        lines.append("missing inputs (these runs would fail): " + "; ".join(missing))
    if invalid:
        lines.append("invalid settings (the sweep refuses to start until they are fixed): " + describe_invalid(invalid))
    return "\n".join(lines)


def run_sweep(grid: Grid, runs: list[RunSpec], *, device: str | None = None) -> SweepResult:
    """Train every run of ``runs`` that is not done; record failures and go on."""
    from tqdm.auto import tqdm

    from mner.trainer.core.train import RunInterrupted

    missing = check_inputs(grid, runs)
    if missing:
        raise ConfigError(f"{grid.path}: missing inputs: {'; '.join(missing)}. Pass --data NAME=FOLDER / "
                          "--features NAME=CACHE.h5, or restrict the sweep with --datasets NAME")
    invalid = check_run_settings(runs, device=device)
    if invalid:
        raise ConfigError(f"{grid.path}: {describe_invalid(invalid)}. Fix the grid (nothing was started)")
    result = SweepResult()
    todo = []
    for spec in runs:
        state = run_state(grid.out / spec.run_id)
        if state == "running":
            result.busy.append(spec.run_id)
        elif state == "done":
            try:
                check_recorded_spec(spec, grid.out / spec.run_id)
                result.skipped.append(spec.run_id)
            except ConfigError as err:
                result.failed.append((spec.run_id, str(err)))
        else:
            todo.append((spec, state))
    _log(f"sweep {grid.name}: {len(runs)} runs, {len(result.skipped)} already done, {len(todo)} to run"
         + (f", {len(result.busy)} running elsewhere" if result.busy else "") + f" -> {grid.out}")
    spent = 0.0
    bar = tqdm(total=len(todo), desc="sweep", unit="run", dynamic_ncols=True, file=sys.stderr)
    for number, (spec, state) in enumerate(todo, 1):
        run_dir = grid.out / spec.run_id
        started = time.time()
        how = {"trained": " (trained: finishing)", "unfinished": " (unfinished: resuming)",
               "restart": " (leftovers of a killed run: restarting)"}
        _log(f"[{number}/{len(todo)}] {spec.run_id}{how.get(state, '')}")
        try:
            if state != "trained":
                launch_training(spec, run_dir, grid.datasets, state=state, device=device)
            finish_run(spec, run_dir, grid.datasets, device=device, grid_path=grid.path)
        except (KeyboardInterrupt, RunInterrupted):
            _log(f"sweep interrupted during {spec.run_id}; rerun the same command to finish the missing runs")
            raise
        except Exception as err:
            message = f"{type(err).__name__}: {err}"
            result.failed.append((spec.run_id, message))
            _append_log(grid.out, {"run": spec.run_id, "status": "failed", "error": message,
                                   "traceback": traceback.format_exc(limit=8),
                                   "seconds": round(time.time() - started, 1)})
            _log(f"FAILED {spec.run_id}: {message}")
        else:
            result.ran.append(spec.run_id)
            _append_log(grid.out, {"run": spec.run_id, "status": "done", "seconds": round(time.time() - started, 1)})
        spent += time.time() - started
        remaining = len(todo) - number
        bar.update(1)
        bar.set_postfix_str(f"ETA {_duration(spent / number * remaining)}" if remaining else "last run")
        _log(f"[{number}/{len(todo)}] {spec.run_id}: {_duration(time.time() - started)}; "
             f"{remaining} left, ETA {_duration(spent / number * remaining)}")
    bar.close()
    _log(summary(result))
    return result


def summary(result: SweepResult) -> str:
    lines = [(f"sweep: {len(result.ran)} run now, {len(result.skipped)} skipped (done), "
              f"{len(result.busy)} running elsewhere, {len(result.failed)} failed")]
    if result.failed:
        lines.append("failed runs (errors also in sweep-log.jsonl; rerun the sweep to retry them):")
        lines += [f"  {run_id}: {error.splitlines()[0] if error else ''}" for run_id, error in result.failed]
    return "\n".join(lines)


def parse_name_values(pairs: list[str] | None, option: str) -> dict[str, str]:
    parsed = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{option} {pair!r}: expected NAME=PATH, e.g. {option} t15=data/twitter2015")
        parsed[name] = value
    return parsed


def sweep(grid_file: str | Path, *, out: str | Path | None = None, dry: bool = False, task: str | None = None,
          sets: list[str] | None = None, data: list[str] | None = None, features: list[str] | None = None,
          datasets: list[str] | None = None, seeds: list[int] | None = None, device: str | None = None,
          boxes: list[str] | None = None) -> int:
    """The ``sweep`` command: load, select, then list (``dry``) or run; returns the exit status."""
    grid = load_grid(grid_file, out=out, sets=sets, data_overrides=parse_name_values(data, "--data"),
                     feature_overrides=parse_name_values(features, "--features"), only_datasets=datasets,
                     seeds=seeds, box_overrides=parse_name_values(boxes, "--boxes"))
    runs = select_task(grid.runs, task)
    if dry:
        invalid = check_run_settings(runs, device=device)
        print(dry_run(grid, runs, invalid))
        return 2 if invalid else 0
    return run_sweep(grid, runs, device=device).exit_code
