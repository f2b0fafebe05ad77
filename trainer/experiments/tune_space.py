"""Search spaces for ``mner-train tune``: a grid file (trainer/experiments/grid.py) whose runs form one
configuration, plus a ``[search]`` table with distributions over ``--set`` keys.

::

    out = "runs/tune/pmner-lr"            # the study's folder (trials/, study.journal, tune.json)
    seeds = [1, 2, 3]                     # trials train with the first; the best configuration's grid with all
    [datasets.t15]
    data = "data/twitter2015"
    features = "cache/t15.h5"
    [train]
    epochs = 4
    [[experiments]]
    model = "pmner"
    presets = ["full"]
    datasets = ["t15"]

    [search]
    trials = 20                           # finished + pruned trials of the study, over all workers
    pruner = "median"                     # median | asha | none
    sampler = "tpe"                       # tpe | random
    startup_trials = 4                    # trials before the pruner and TPE act
    [search.params]
    encoder_lr = {low = 1e-5, high = 1e-4, log = true}    # float; log = log-uniform
    head_lr = {low = 1e-4, high = 1e-2, log = true}
    dropout = [0.0, 0.1, 0.3]                             # choices (or {choices = [...]})
    num_blocks = {low = 1, high = 3}                      # int: both bounds integers
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mner.trainer.core.config import (
    ConfigError,
    TrainConfig,
    convert_value,
    field_names,
    resolve_configs,
    validate_model_config,
)
from mner.trainer.experiments.grid import Grid, RunSpec, load_grid

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SEARCH_KEYS = {"trials", "params", "pruner", "sampler", "startup_trials", "warmup_epochs", "seed",
               "stale_after_s", "sampler_seed", "study"}
PRUNERS = ("median", "asha", "none")
SAMPLERS = ("tpe", "random")
# keys a trial may not vary: they define the protocol (seed, data share), where it runs, or what it scores
RESERVED = {"seed": "the trials' seed is [search] seed (default: the first of `seeds`)",
            "train_fraction": "the training share is the grid's `fractions`",
            "device": "pass --device to mner-train tune", "score_test": "trials never score test",
            "track": "set it in [train]"}
TRIAL_SETS = ("score_test=false",)  # added to every trial: the objective is dev F1, test is never decoded


@dataclass
class Space:
    path: Path
    grid: Grid  # the file read as a grid (datasets, out, the one configuration's runs)
    base: RunSpec  # the configuration every trial varies, with the trials' seed
    params: dict  # name -> optuna distribution
    trials: int  # finished + pruned trials the study should hold
    pruner: str  # median | asha | none
    sampler: str  # tpe | random
    startup_trials: int  # trials that finish before the pruner / TPE act
    warmup_epochs: int  # epochs a trial always trains before it can be pruned (median)
    stale_after_s: float  # a running trial on another host without a heartbeat this long is retried
    sampler_seed: int | None  # seeds the sampler (leave unset with several workers: they would repeat draws)
    study: str  # the study's name in the storage
    seeds: list[int]  # the best configuration's grid runs these seeds
    raw: dict  # the file's tables (for the best configuration's grid file)

    @property
    def out(self) -> Path:
        return self.grid.out

    @property
    def fingerprint(self) -> str:
        """What makes two spaces one study: the configuration and the distributions (not the trial count)."""
        base = {k: v for k, v in self.base.as_dict().items() if k not in ("seed", "run_id")}
        payload = {"base": base, "seed": self.base.seed,
                   "params": {name: repr(dist) for name, dist in sorted(self.params.items())}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def trial_spec(self, params: dict[str, Any]) -> RunSpec:
        """The run a trial trains: the configuration with the trial's values as its last ``--set`` pairs."""
        pairs = tuple(f"{name}={set_value(value)}" for name, value in params.items())
        return dataclasses.replace(self.base, sets=(*self.base.sets, *pairs, *TRIAL_SETS))


def set_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _fail(path: Path, where: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {where}: {problem}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_distribution(name: str, value: Any, path: Path):
    """One ``[search.params]`` entry -> an optuna distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = f"search.params.{name}"
    if isinstance(value, dict) and "choices" in value:
        if set(value) != {"choices"}:
            raise _fail(path, where, "a choice takes only choices = [...]")
        value = value["choices"]
    if isinstance(value, list):
        if not value or not all(isinstance(v, (bool, int, float, str)) for v in value):
            raise _fail(path, where, f"choices must be a non-empty list of numbers, strings or booleans, got {value!r}")
        if len(set(map(repr, value))) != len(value):
            raise _fail(path, where, f"choices repeat a value: {value!r}")
        return CategoricalDistribution(value)
    if not isinstance(value, dict):
        raise _fail(path, where, 'expected {low = .., high = .., log = true}, {choices = [..]} or [choice, ...]')
    unknown = sorted(set(value) - {"low", "high", "log", "step"})
    if unknown:
        raise _fail(path, where, f"unknown key(s) {', '.join(unknown)}; valid keys: high, log, low, step (or choices)")
    low, high, log, step = value.get("low"), value.get("high"), value.get("log", False), value.get("step")
    if not (_number(low) and _number(high)) or not low < high:
        raise _fail(path, where, f"needs numbers low < high, got low = {low!r}, high = {high!r}")
    if not isinstance(log, bool):
        raise _fail(path, where, f"log must be true or false, got {log!r}")
    if log and low <= 0:
        raise _fail(path, where, f"log = true needs low > 0, got {low!r}")
    if step is not None and (not _number(step) or step <= 0 or log):
        raise _fail(path, where, "step must be a positive number, and cannot be combined with log = true")
    if isinstance(low, int) and isinstance(high, int) and (step is None or isinstance(step, int)):
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(float(low), float(high), log=log, step=step)


def _extremes(dist) -> list[Any]:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def check_params(model_name: str, preset: str | None, sets: tuple[str, ...], params: dict, path: Path) -> None:
    """Every searched key is a ``--set`` key of the model or the trainer, of the right type, and its extreme
    values (bounds, every choice) pass the same checks a run's options do."""
    from optuna.distributions import FloatDistribution

    from mner.trainer.models import get_model_class

    model_cls = get_model_class(model_name)
    model_fields, train_fields = field_names(model_cls.Config), field_names(TrainConfig)
    for name, dist in params.items():
        where = f"search.params.{name}"
        if name in RESERVED:
            raise _fail(path, where, f"cannot be searched: {RESERVED[name]}")
        if name not in model_fields and name not in train_fields:
            raise _fail(path, where, f"not a --set key of {model_name}; valid model keys: {', '.join(model_fields)}; "
                                     f"valid train keys: {', '.join(train_fields)}")
        cls = model_cls.Config if name in model_fields else TrainConfig
        if isinstance(dist, FloatDistribution) and typing.get_type_hints(cls)[name] is int:
            raise _fail(path, where, f"{name} is an integer: give integer bounds (low = 1, high = 4)")
        for value in _extremes(dist):
            try:
                convert_value(cls, name, set_value(value))
                model_config, _ = resolve_configs(model_cls, preset=preset, sets=[*sets, f"{name}={set_value(value)}"])
                validate_model_config(model_cls, model_config)
            except ConfigError as err:
                raise _fail(path, where, f"the value {value!r} is refused: {err}") from None


def load_space(path: str | Path, *, out: str | Path | None = None, sets: list[str] | None = None,
               data_overrides: dict[str, str] | None = None, feature_overrides: dict[str, str] | None = None,
               trials: int | None = None) -> Space:
    """Parse and check a space file: the grid part through the sweep's own loader, then ``[search]``."""
    path = Path(path)
    grid = load_grid(path, out=out, sets=sets, data_overrides=data_overrides, feature_overrides=feature_overrides,
                     extra_keys={"search"})
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    search = raw.get("search")
    if not isinstance(search, dict):
        raise _fail(path, "search", "a space file needs a [search] table with trials = N and [search.params]; "
                                    "see grids/tune/bert_crf.toml")
    unknown = sorted(set(search) - SEARCH_KEYS)
    if unknown:
        raise _fail(path, "search", f"unknown key(s) {', '.join(unknown)}; "
                                    f"valid keys: {', '.join(sorted(SEARCH_KEYS))}")
    configs = sorted({spec.config_id for spec in grid.runs})
    if len(configs) != 1:
        raise _fail(path, "experiments", f"a space searches one configuration, this file defines {len(configs)} "
                                         f"({', '.join(configs)}): keep one model, preset, switch and dataset")
    seeds = sorted({spec.seed for spec in grid.runs})
    seed = search.get("seed", seeds[0])
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _fail(path, "search.seed", f"expected an integer, got {seed!r}")
    base = dataclasses.replace(grid.runs[0], seed=seed)
    from mner.trainer.experiments.sweep import check_run_settings, describe_invalid

    invalid = check_run_settings([base])  # the sweep's own check: model, preset, --set keys and values
    if invalid:
        raise _fail(path, "experiments", describe_invalid(invalid))

    def integer(key: str, default: int, minimum: int) -> int:
        value = search.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise _fail(path, f"search.{key}", f"expected an integer >= {minimum}, got {value!r}")
        return value

    total = trials if trials is not None else integer("trials", 0, 1)
    if total < 1:
        raise ConfigError(f"--trials {total}: must be >= 1")
    choices = {"pruner": (search.get("pruner", "median"), PRUNERS), "sampler": (search.get("sampler", "tpe"), SAMPLERS)}
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise _fail(path, f"search.{key}", f"{value!r}; valid values: {', '.join(valid)}")
    params_table = search.get("params")
    if not isinstance(params_table, dict) or not params_table:
        raise _fail(path, "search.params", "add at least one distribution, e.g. encoder_lr = {low = 1e-5, "
                                           "high = 1e-4, log = true}")
    params = {name: parse_distribution(name, value, path) for name, value in params_table.items()}
    check_params(base.model, base.preset, base.sets, params, path)
    stale = search.get("stale_after_s", 600)
    if not _number(stale) or stale <= 0:
        raise _fail(path, "search.stale_after_s", f"expected seconds > 0, got {stale!r}")
    sampler_seed = search.get("sampler_seed")
    if sampler_seed is not None and (not isinstance(sampler_seed, int) or isinstance(sampler_seed, bool)):
        raise _fail(path, "search.sampler_seed", f"expected an integer, got {sampler_seed!r}")
    study = search.get("study", grid.name)
    if not isinstance(study, str) or not study:
        raise _fail(path, "search.study", f"expected a name, got {study!r}")
    return Space(path=path, grid=grid, base=base, params=params, trials=total, pruner=choices["pruner"][0],
                 sampler=choices["sampler"][0], startup_trials=integer("startup_trials", 4, 0),
                 warmup_epochs=integer("warmup_epochs", 0, 0), stale_after_s=float(stale), sampler_seed=sampler_seed,
                 study=study, seeds=seeds, raw=raw)


# ----------------------------------------------------------------------------- the best configuration as a grid


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def best_grid_text(tune_record: dict, params: dict[str, Any], *, value: float, trial: int, path: Path,
                   out: str | None = None) -> str:
    """A grid file (for ``mner-train sweep``) that trains the best trial's configuration with every seed
    of the space; ``tune_record`` is the study folder's tune.json."""
    spec = tune_record["base"]
    lines = [f"# The best configuration of the study {tune_record['study']!r} ({tune_record['space']}):",
             f"# trial {trial}, dev F1 {100 * value:.2f}. Its seeds, scored on test:",
             f"#   mner-train sweep {path} && mner-train report {out or tune_record['best_out']}",
             f"name = {toml_value(tune_record['study'] + '-best')}",
             f"out = {toml_value(out or tune_record['best_out'])}",
             f"seeds = {toml_value(tune_record['seeds'])}", ""]
    for name, entry in tune_record["datasets"].items():
        lines.append(f"[datasets.{json.dumps(name)}]")
        lines += [f"{key} = {toml_value(entry[key])}" for key in ("data", "features", "paper") if entry.get(key)]
        lines.append("")
    best_sets = [f"{name}={set_value(v)}" for name, v in params.items()]
    lines += ["[[experiments]]", f"model = {toml_value(spec['model'])}"]
    if spec.get("preset") is not None:
        lines.append(f"presets = [{toml_value(spec['preset'])}]")
    if spec["train_on"] != spec["test_on"]:
        lines.append(f"cross_domain = [[{toml_value(spec['train_on'])}, {toml_value(spec['test_on'])}]]")
    else:
        lines.append(f"datasets = [{toml_value(spec['train_on'])}]")
        if spec.get("fraction", 1.0) < 1.0:
            lines.append(f"fractions = [{spec['fraction']!r}]")
    lines.append("# the space's own settings, then the best trial's values")
    lines.append(f"sets = {toml_value([*spec['sets'], *best_sets])}")
    return "\n".join(lines) + "\n"
