"""``mner-train report`` on a study folder of ``mner-train tune``: the trials (best first), Optuna's
parameter importances, a plot of dev F1 over the trials, and the best configuration as a grid file
whose seeds ``mner-train sweep`` trains and scores on test (the search itself never decodes test).

Files, per study ``<name>``: ``<name>-trials.md`` / ``.csv``, ``<name>-dev_f1.png``,
``<name>-best-grid.toml``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mner.trainer.core.config import ConfigError
from mner.trainer.experiments.tune import TRIALS_DIR
from mner.trainer.experiments.tune_space import best_grid_text, set_value
from mner.trainer.experiments.tune_study import TUNE_FILE, open_storage, trial_table

TUNE_REPORT_FILES = ("*-trials.md", "*-trials.csv", "*-dev_f1.png", "*-best-grid.toml")  # per study, in the report


def find_tune_folders(paths: list[Path]) -> list[Path]:
    """Study folders (holding tune.json) given as such or anywhere below the given folders."""
    found = []
    for path in map(Path, paths):
        if (path / TUNE_FILE).is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p.parent for p in path.rglob(TUNE_FILE))
    return list(dict.fromkeys(found))


def is_trial_folder(run: Path, tune_folders: list[Path]) -> bool:
    """Trial folders hold dev scores only: they never enter the test tables."""
    return any(run.resolve().is_relative_to((folder / TRIALS_DIR).resolve()) for folder in tune_folders)


def load_study(folder: Path):
    import optuna

    record = json.loads((folder / TUNE_FILE).read_text(encoding="utf-8"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=record["study"], storage=open_storage(record["storage"]))
    except KeyError:
        raise ConfigError(f"{folder / TUNE_FILE}: the study {record['study']!r} is not in "
                          f"{record['storage']}") from None
    return record, study


def importances(study) -> tuple[dict[str, float] | None, str]:
    """Optuna's fANOVA importances over the finished trials, or None and why not."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"importances need at least 2 finished trials ({len(complete)} so far)"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), ""
    except (RuntimeError, ValueError) as err:
        return None, f"importances could not be computed: {err}"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown(record: dict, rows: list[dict], imp: dict | None, why: str, best: dict | None, files: dict) -> str:
    counted = [r for r in rows if r["counted"]]
    states = {s: sum(1 for r in counted if r["state"] == s) for s in ("complete", "pruned", "fail", "running")}
    names = list(record["params"])
    lines = [f"# Study `{record['study']}`", "",
             f"Space `{record['space']}`, configuration `{record['base']['config_id']}` "
             f"(seed {record['base']['seed']}), "
             f"pruner {record['pruner']}, sampler {record['sampler']}, budget {record['trials']} trials. "
             f"Objective: the best epoch's dev F1 (test is never decoded by a trial).", "",
             "Trials: " + ", ".join(f"{n} {s}" for s, n in states.items() if n)
             + (f"; {len(rows) - len(counted)} not counted (killed and retried, or surplus)"
                if len(rows) > len(counted) else ""), ""]
    if best:
        lines += [f"**Best: trial {best['number']}, dev F1 {100 * best['dev_f1']:.2f}** with "
                  + ", ".join(f"`{k}={set_value(v)}`" for k, v in best["params"].items())
                  + f". Its seeds on test: `mner-train sweep {files['grid']}` then "
                  f"`mner-train report {record['best_out']}`.", ""]
    header = "| trial | state | dev F1 | dev F1 per epoch | " + " | ".join(names) + " | seconds | run folder |"
    lines += ["## Trials (best first)", "", header, "|" + "---|" * (6 + len(names))]
    order = sorted(rows, key=lambda r: (r["dev_f1"] is None, -(r["dev_f1"] or 0), r["number"]))
    for r in order:
        curve = " / ".join(f"{100 * v:.2f}" for _, v in sorted(r["intermediate"].items()))
        state = r["state"] + ("" if r["counted"] else " (not counted)") + \
            (f", retry of {r['retry_of']}" if r["retry_of"] is not None else "")
        cells = [str(r["number"]), state, "—" if r["dev_f1"] is None else f"{100 * r['dev_f1']:.2f}", curve or "—",
                 *(_fmt(r["params"].get(n, "—")) for n in names),
                 "—" if r["seconds"] is None else f"{r['seconds']:.0f}", f"`{r['run_dir'] or '—'}`"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Parameter importances (Optuna, fANOVA over the finished trials)", ""]
    if imp:
        lines += ["| parameter | importance |", "|---|---|", *(f"| `{k}` | {v:.3f} |" for k, v in imp.items())]
    else:
        lines.append(f"_{why}_")
    lines += ["", f"![dev F1 over trials]({Path(files['plot']).name})", ""]
    return "\n".join(lines)


def plot_trials(rows: list[dict], path: Path, title: str) -> Path:
    """Dev F1 of every trial in the order they were asked: finished (dot), pruned (x at its last
    reported epoch), and the best so far (line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    done = [r for r in rows if r["state"] == "complete"]
    pruned = [r for r in rows if r["state"] == "pruned" and r["intermediate"]]
    ax.scatter([r["number"] for r in done], [100 * r["dev_f1"] for r in done], label="finished", zorder=3)
    ax.scatter([r["number"] for r in pruned], [100 * max(r["intermediate"].values()) for r in pruned], marker="x",
               color="tab:red", label="pruned (best reported epoch)", zorder=3)
    best, xs, ys = -math.inf, [], []
    for r in sorted(done, key=lambda r: r["number"]):
        best = max(best, 100 * r["dev_f1"])
        xs.append(r["number"])
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="gray", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("dev F1 (%)")
    ax.set_title(title)
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tune_report(folder: Path, out: Path) -> dict:
    """The study's tables, importances, plot and best-configuration grid under ``out``."""
    from optuna.trial import TrialState

    record, study = load_study(folder)
    rows = trial_table(study)
    out.mkdir(parents=True, exist_ok=True)
    name = record["study"]
    files = {"md": out / f"{name}-trials.md", "csv": out / f"{name}-trials.csv", "plot": out / f"{name}-dev_f1.png",
             "grid": out / f"{name}-best-grid.toml"}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = None
    if complete:
        trial = max(complete, key=lambda t: t.value)
        best = {"number": trial.number, "dev_f1": trial.value, "params": dict(trial.params)}
        files["grid"].write_text(best_grid_text(record, trial.params, value=trial.value, trial=trial.number,
                                                path=files["grid"]), encoding="utf-8")
    else:
        files.pop("grid")
    imp, why = importances(study)
    plot_trials(rows, files["plot"], f"{name}: dev F1 over trials")
    files["md"].write_text(markdown(record, rows, imp, why, best, {k: str(v) for k, v in files.items()}) + "\n",
                           encoding="utf-8")
    import csv

    names = list(record["params"])
    with open(files["csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "state", "counted", "dev_f1", *names, "epochs_reported", "seconds", "run_dir",
                         "retry_of"])
        for r in rows:
            writer.writerow([r["number"], r["state"], r["counted"], r["dev_f1"], *(r["params"].get(n) for n in names),
                             len(r["intermediate"]), r["seconds"], r["run_dir"], r["retry_of"]])
    return {"study": name, "best": best, "importances": imp, "rows": rows, "files": [str(p) for p in files.values()]}
