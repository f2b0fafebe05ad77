"""``mner-train sweep GRID.toml``: models x presets x switches x seeds x datasets/protocols.

One extraction serves every ablation and seed; this module turns a grid file into a list of runs
and trains the missing ones. Each run gets its own folder named from its settings::

    <out>/<data>/<model>/<preset>[+<switch>]/s<seed>
    data = t15 (in-domain) | t15-to-t17 (cross-domain) | t15-frac0.10 (low-resource)

A run is *done* when its folder holds ``sweep.json`` (written after training and, for
cross-domain runs, after scoring on the other dataset). Done runs are skipped, unfinished ones are
resumed (or restarted where the training engine cannot resume), a failing run is recorded in
``<out>/sweep-log.jsonl`` and the sweep goes on. Several sweep processes may split one grid with
``--task i/n`` (SLURM arrays, one process per GPU): see docs/experiments.md.

Grid file (TOML), every key but ``experiments`` optional::

    out = "runs/vcrmner"                  # root of the run folders (--out overrides)
    seeds = [1, 2, 3, 4, 5]
    [datasets.t15]                        # name -> data folder and feature cache
    data = "data/twitter2015"
    features = "cache/t15.h5"
    [train]                               # --set values for every run (override the presets)
    epochs = 40
    [[experiments]]
    model = "vcrmner"                     # or models = [...]
    presets = ["paper", "w/o ev"]         # named paper rows (default: the model's defaults)
    switches = {full = [], no-null = ["use_inter_former=false"]}   # named --set lists, crossed with presets
    datasets = ["t15", "t17"]             # in-domain runs
    cross_domain = [["t15", "t17"]]       # train on the first, test on the second
    fractions = [0.1, 0.5, 1.0]           # low-resource runs on `datasets`
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mner.trainer.config import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

GRID_KEYS = {"name", "out", "seeds", "datasets", "train", "experiments", "description"}
EXPERIMENT_KEYS = {"name", "model", "models", "presets", "switches", "sets", "seeds", "datasets",
                   "cross_domain", "fractions", "train"}
DATASET_KEYS = {"data", "features", "paper"}
SPEC_FILE = "sweep.json"  # written into a run folder when every step of the run is done
LOG_FILE = "sweep-log.jsonl"  # one line per run attempt (done / failed) in the sweep's root


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    data: str | None  # folder with train/valid/test files (None: posts stored in the cache)
    features: str | None  # HDF5 feature cache (None: text-only models only)
    paper: str  # which papers' column this dataset is compared with (t15 / t17)


@dataclass(frozen=True)
class RunSpec:
    """Everything that makes one run differ from another; its folder name derives from it."""

    model: str
    preset: str | None
    switch: str  # name of the switch ("" for none)
    sets: tuple[str, ...]  # --set pairs, in precedence order (grid [train], experiment, switch, CLI)
    seed: int
    train_on: str  # dataset name
    test_on: str  # dataset name; differs from train_on for cross-domain runs
    fraction: float = 1.0  # share of training posts (low-resource protocol)

    @property
    def protocol(self) -> str:
        if self.train_on != self.test_on:
            return "cross-domain"
        return "low-resource" if self.fraction < 1.0 else "in-domain"

    @property
    def config_id(self) -> str:
        """The run's id without its seed: runs that differ only by seed share it (mean +/- std)."""
        if self.protocol == "cross-domain":
            data = f"{self.train_on}-to-{self.test_on}"
        elif self.protocol == "low-resource":
            data = f"{self.train_on}-frac{self.fraction:.2f}"
        else:
            data = self.train_on
        setting = slug(self.preset or "default") + (f"+{slug(self.switch)}" if self.switch else "")
        return f"{data}/{self.model}/{setting}"

    @property
    def run_id(self) -> str:
        return f"{self.config_id}/s{self.seed}"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "sets": list(self.sets), "protocol": self.protocol,
                "config_id": self.config_id, "run_id": self.run_id}


def slug(text: str) -> str:
    """``"w/o inter-former"`` -> ``"wo-inter-former"``: safe as a folder name, still readable."""
    text = text.replace("w/o", "wo").replace("+", "-plus-")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "x"


@dataclass
class Grid:
    path: Path
    out: Path
    datasets: dict[str, DatasetEntry]
    runs: list[RunSpec]
    name: str = ""


# ----------------------------------------------------------------------------- grid files


def _fail(path: Path, where: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {where}: {problem}")


def _set_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _sets_from_table(table: Any, path: Path, where: str) -> list[str]:
    if not isinstance(table, dict):
        raise _fail(path, where, "expected a table of key = value")
    return [f"{key}={_set_value(value)}" for key, value in table.items()]


def _string_list(value: Any, path: Path, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, where, f"expected a list of strings, got {value!r}")
    return value


def _check_keys(table: dict, valid: set[str], path: Path, where: str) -> None:
    unknown = sorted(set(table) - valid)
    if unknown:
        raise _fail(path, where, f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}")


def load_grid(
    path: str | Path, *, out: str | Path | None = None, sets: list[str] | None = None,
    data_overrides: dict[str, str] | None = None, feature_overrides: dict[str, str] | None = None,
    only_datasets: list[str] | None = None, seeds: list[int] | None = None,
) -> Grid:
    """Parse a grid file into its run list (deterministic order; duplicates merged)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"grid file {path} not found; bundled grids are in grids/ (e.g. grids/vcrmner.toml)") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    _check_keys(raw, GRID_KEYS, path, "top level")

    datasets: dict[str, DatasetEntry] = {}
    for name, entry in (raw.get("datasets") or {}).items():
        if not isinstance(entry, dict):
            raise _fail(path, f"datasets.{name}", "expected a table with data = ... and/or features = ...")
        _check_keys(entry, DATASET_KEYS, path, f"datasets.{name}")
        data = (data_overrides or {}).get(name, entry.get("data"))
        features = (feature_overrides or {}).get(name, entry.get("features"))
        if data is None and features is None:
            raise _fail(path, f"datasets.{name}", "needs data = FOLDER or features = CACHE.h5")
        datasets[name] = DatasetEntry(name, data, features, entry.get("paper", name))
    for name in [*(data_overrides or {}), *(feature_overrides or {}), *(only_datasets or [])]:
        if name not in datasets:
            raise ConfigError(f"dataset {name!r} is not in {path}; valid values: {', '.join(datasets) or '(none)'}")

    grid_seeds = seeds or raw.get("seeds", [1])
    grid_sets = _sets_from_table(raw.get("train", {}), path, "train")
    experiments = raw.get("experiments")
    if not isinstance(experiments, list) or not experiments:
        raise _fail(path, "experiments", "add at least one [[experiments]] table with model = ... and datasets = [...]")

    runs: dict[str, RunSpec] = {}
    for number, experiment in enumerate(experiments, 1):
        where = f"experiment {number}" + (f" ({experiment['name']})" if "name" in experiment else "")
        _check_keys(experiment, EXPERIMENT_KEYS, path, where)
        for spec in _experiment_runs(experiment, path, where, datasets, grid_sets, list(sets or []),
                                     seeds or experiment.get("seeds", grid_seeds)):
            if only_datasets and not {spec.train_on, spec.test_on} <= set(only_datasets):
                continue
            previous = runs.get(spec.run_id)
            if previous is not None and previous != spec:
                raise _fail(path, where, f"run {spec.run_id} is defined twice with different settings "
                                         f"({previous.sets} vs {spec.sets}); give one switch another name")
            runs[spec.run_id] = spec
    root = Path(out) if out is not None else Path(raw.get("out", f"runs/{path.stem}"))
    return Grid(path=path, out=root, datasets=datasets, runs=list(runs.values()), name=raw.get("name", path.stem))


def _experiment_runs(experiment: dict, path: Path, where: str, datasets: dict[str, DatasetEntry],
                     grid_sets: list[str], cli_sets: list[str], seeds: Any) -> list[RunSpec]:
    models = _string_list(experiment.get("models", experiment.get("model")), path, f"{where}: model")
    presets: list[str | None] = list(_string_list(experiment["presets"], path, f"{where}: presets")) \
        if "presets" in experiment else [None]
    switches = experiment.get("switches", {"": []})
    if not isinstance(switches, dict) or not switches:
        raise _fail(path, f"{where}: switches", 'expected a table name = ["key=value", ...], e.g. {full = []}')
    switch_sets = {name: _string_list(pairs, path, f"{where}: switches.{name}") for name, pairs in switches.items()}
    experiment_sets = _sets_from_table(experiment.get("train", {}), path, f"{where}: train") + \
        _string_list(experiment.get("sets", []), path, f"{where}: sets")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise _fail(path, f"{where}: seeds", f"expected a list of integers, got {seeds!r}")

    pairs: list[tuple[str, str, float]] = []
    fractions = experiment.get("fractions", [1.0])
    if not isinstance(fractions, list) or not all(isinstance(f, (int, float)) and 0 < f <= 1 for f in fractions):
        raise _fail(path, f"{where}: fractions", f"expected fractions in (0, 1], got {fractions!r}")
    for name in _string_list(experiment.get("datasets", []), path, f"{where}: datasets"):
        pairs += [(name, name, float(f)) for f in fractions]
    for pair in experiment.get("cross_domain", []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)) or pair[0] == pair[1]:
            raise _fail(path, f"{where}: cross_domain", f'expected pairs of two dataset names like ["t15", "t17"], got {pair!r}')
        pairs.append((pair[0], pair[1], 1.0))
    if not pairs:
        raise _fail(path, where, "no runs: give datasets = [...] and/or cross_domain = [[TRAIN, TEST], ...]")
    for train_on, test_on, _ in pairs:
        for name in (train_on, test_on):
            if name not in datasets:
                raise _fail(path, where, f"unknown dataset {name!r}; defined: {', '.join(datasets) or '(none)'}")

    return [
        RunSpec(model=model, preset=preset, switch=switch,
                sets=tuple(grid_sets + experiment_sets + switch_sets[switch] + cli_sets), seed=seed,
                train_on=train_on, test_on=test_on, fraction=fraction)
        for model in models for preset in presets for switch in switch_sets
        for train_on, test_on, fraction in pairs for seed in seeds
    ]


def select_task(runs: list[RunSpec], task: str | None) -> list[RunSpec]:
    """``--task i/n``: every n-th run starting at i (0-based), over the grid's fixed run order."""
    if not task:
        return runs
    match = re.fullmatch(r"(\d+)/(\d+)", task.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise ConfigError(f"--task {task!r}: expected i/n with 0 <= i < n, e.g. --task 0/4 "
                          "(under SLURM: --task $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    index, count = int(match[1]), int(match[2])
    return runs[index::count]


# ----------------------------------------------------------------------------- run folders


def _pid_alive(pid: int) -> bool:
    """True for a running process; a killed process that its parent has not reaped yet (a zombie) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill()
    return "\nState:\tZ" not in status and "\nState:\tX" not in status


def _temp_dirs(run_dir: Path) -> list[Path]:
    return sorted(run_dir.parent.glob(f"{run_dir.name}.tmp-*")) if run_dir.parent.is_dir() else []


def run_state(run_dir: Path) -> str:
    """done | trained (post-training steps missing) | running (a live process) | unfinished | todo."""
    if (run_dir / SPEC_FILE).is_file() and (run_dir / "metrics.json").is_file():
        return "done"
    if (run_dir / "metrics.json").is_file():
        return "trained"
    for temp in _temp_dirs(run_dir):
        pid = temp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            return "running"
    if run_dir.exists() or _temp_dirs(run_dir):
        return "unfinished"
    return "todo"


def engine_can_resume() -> bool:
    """Whether the training engine continues an unfinished run (``train(..., resume=True)``)."""
    from mner.trainer.train import train

    return "resume" in inspect.signature(train).parameters


def launch_training(spec: RunSpec, run_dir: Path, datasets: dict[str, DatasetEntry], *, resume: bool,
                    device: str | None) -> None:
    """Train one run through the ordinary ``train`` entry point: the one place a sweep starts training.

    With an engine whose ``train`` takes ``resume``, an unfinished run continues from its last
    epoch; otherwise its leftovers (from a killed process) are removed and it starts again.
    """
    from mner.trainer.train import train

    source = datasets[spec.train_on]
    flags: dict[str, Any] = {"seed": spec.seed, "train_fraction": spec.fraction, "device": device}
    kwargs: dict[str, Any] = {}
    if engine_can_resume():
        kwargs["resume"] = resume
    elif resume:
        import shutil

        for temp in _temp_dirs(run_dir):  # dead processes' half-written runs (run_state checked liveness)
            shutil.rmtree(temp, ignore_errors=True)
        if run_dir.exists() and not (run_dir / "metrics.json").exists():
            shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    train(out=run_dir, model=spec.model, data=source.data, features=source.features, preset=spec.preset,
          sets=list(spec.sets), flags=flags, **kwargs)


def finish_run(spec: RunSpec, run_dir: Path, datasets: dict[str, DatasetEntry], *, device: str | None,
               grid_path: Path) -> dict:
    """Post-training steps (cross-domain scoring), then ``sweep.json``: the run is done."""
    record: dict[str, Any] = {"spec": spec.as_dict(), "grid": str(grid_path),
                              "datasets": {name: dataclasses.asdict(datasets[name])
                                           for name in dict.fromkeys((spec.train_on, spec.test_on))},
                              "test_scores": "metrics.json#test"}
    if spec.protocol == "cross-domain":
        from mner.trainer.evaluate import evaluate_run

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
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def check_inputs(grid: Grid, runs: list[RunSpec]) -> list[str]:
    """Data folders and caches that the selected runs need but that do not exist."""
    missing = []
    for name in dict.fromkeys(n for spec in runs for n in (spec.train_on, spec.test_on)):
        entry = grid.datasets[name]
        for kind, value in (("data", entry.data), ("features", entry.features)):
            if value is not None and not Path(value).exists():
                missing.append(f"{name}: {kind} {value}")
    return missing


def dry_run(grid: Grid, runs: list[RunSpec]) -> str:
    lines = [f"{grid.path}: {len(runs)} runs under {grid.out}"]
    for number, spec in enumerate(runs, 1):
        state = run_state(grid.out / spec.run_id)
        lines.append(f"{number:>4}  {state:<10} {spec.run_id:<60} {spec.protocol}"
                     + (f"  --preset {spec.preset!r}" if spec.preset else "")
                     + "".join(f" --set {pair}" for pair in spec.sets))
    missing = check_inputs(grid, runs)
    if missing:
        lines.append("missing inputs (these runs would fail): " + "; ".join(missing))
    return "\n".join(lines)


def run_sweep(grid: Grid, runs: list[RunSpec], *, device: str | None = None) -> SweepResult:
    """Train every run of ``runs`` that is not done; record failures and go on."""
    from tqdm.auto import tqdm

    missing = check_inputs(grid, runs)
    if missing:
        raise ConfigError(f"{grid.path}: missing inputs: {'; '.join(missing)}. Pass --data NAME=FOLDER / "
                          "--features NAME=CACHE.h5, or restrict the sweep with --datasets NAME")
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
        how = {"todo": "", "trained": " (trained: finishing)",
               "unfinished": " (unfinished: resuming)" if engine_can_resume() else " (unfinished: restarting)"}
        _log(f"[{number}/{len(todo)}] {spec.run_id}{how[state]}")
        try:
            if state != "trained":
                launch_training(spec, run_dir, grid.datasets, resume=state == "unfinished", device=device)
            finish_run(spec, run_dir, grid.datasets, device=device, grid_path=grid.path)
        except KeyboardInterrupt:
            _log(f"sweep interrupted during {spec.run_id}; rerun the same command to finish the missing runs")
            raise
        except Exception as err:  # noqa: BLE001 -- a failing run must not stop the sweep
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
    lines = [f"sweep: {len(result.ran)} run now, {len(result.skipped)} skipped (done), "
             f"{len(result.busy)} running elsewhere, {len(result.failed)} failed"]
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
          datasets: list[str] | None = None, seeds: list[int] | None = None, device: str | None = None) -> int:
    """The ``sweep`` command: load, select, then list (``dry``) or run; returns the exit status."""
    grid = load_grid(grid_file, out=out, sets=sets, data_overrides=parse_name_values(data, "--data"),
                     feature_overrides=parse_name_values(features, "--features"), only_datasets=datasets,
                     seeds=seeds)
    runs = select_task(grid.runs, task)
    if dry:
        print(dry_run(grid, runs))
        return 0
    return run_sweep(grid, runs, device=device).exit_code
