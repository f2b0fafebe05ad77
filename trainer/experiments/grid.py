"""Grid files (TOML) -> the list of runs a sweep trains: models x presets x switches x seeds x
datasets/protocols, each run with a folder name derived from its settings.

Grid file, every key but ``experiments`` optional::

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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mner.trainer.core.config import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

GRID_KEYS = {"name", "out", "seeds", "datasets", "train", "experiments", "description"}
EXPERIMENT_KEYS = {"name", "model", "models", "presets", "switches", "sets", "seeds", "datasets",
                   "cross_domain", "fractions", "train"}
DATASET_KEYS = {"data", "features", "paper", "boxes"}


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    data: str | None  # folder with train/valid/test files (None: posts stored in the cache)
    features: str | None  # HDF5 feature cache (None: text-only models only)
    paper: str  # which papers' column this dataset is compared with (t15 / t17)
    boxes: str | None = None  # GMNER: folder of <image id>.xml gold boxes (runs get --boxes: the grounding head)


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
    only_datasets: list[str] | None = None, seeds: list[int] | None = None, extra_keys: set[str] | None = None,
    box_overrides: dict[str, str] | None = None,
) -> Grid:
    """Parse a grid file into its run list (deterministic order; duplicates merged). ``extra_keys``: top-level
    tables another reader handles (``search`` in tune spaces)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"grid file {path} not found; bundled grids are in grids/ (e.g. grids/vcrmner.toml)"
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    _check_keys(raw, GRID_KEYS | (extra_keys or set()), path, "top level")

    datasets: dict[str, DatasetEntry] = {}
    for name, entry in (raw.get("datasets") or {}).items():
        if not isinstance(entry, dict):
            raise _fail(path, f"datasets.{name}", "expected a table with data = ... and/or features = ...")
        _check_keys(entry, DATASET_KEYS, path, f"datasets.{name}")
        data = (data_overrides or {}).get(name, entry.get("data"))
        features = (feature_overrides or {}).get(name, entry.get("features"))
        if data is None and features is None:
            raise _fail(path, f"datasets.{name}", "needs data = FOLDER or features = CACHE.h5")
        boxes = (box_overrides or {}).get(name, entry.get("boxes"))
        datasets[name] = DatasetEntry(name, data, features, entry.get("paper", name), boxes)
    for name in [*(data_overrides or {}), *(feature_overrides or {}), *(box_overrides or {}), *(only_datasets or [])]:
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
        two_names = isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
        if not two_names or pair[0] == pair[1]:
            raise _fail(path, f"{where}: cross_domain",
                        f'expected pairs of two dataset names like ["t15", "t17"], got {pair!r}')
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
