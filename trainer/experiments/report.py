"""``mner-train report RUNS...``: finished run folders -> tables (mean +/- std over seeds) and plots.

Runs that differ only by seed form one *configuration* (the sweep's folder name without
``/s<seed>``). Every configuration is shown beside the paper's number for the same model, preset
and setting (trainer/experiments/paper_results.py). A configuration whose runs read random-init features,
whose test posts mostly lack an image row, or that used the fast ablation mode carries a flag, and
the Markdown report lists flagged configurations in their own table: they never sit silently
beside real results.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mner.trainer.core.config import ConfigError
from mner.trainer.experiments.grid import slug
from mner.trainer.experiments.paper_results import TYPES, paper_result
from mner.trainer.experiments.protocols import mean_std

FAST_FLAG = "fast-ablation (frozen, cached text encoder: not the papers' protocol)"


@dataclass
class RunRecord:
    path: Path
    config_id: str  # runs with the same config_id differ only by seed
    seed: int
    model: str
    preset: str | None
    protocol: str  # in-domain | cross-domain | low-resource
    train_on: str
    test_on: str
    fraction: float
    paper_setting: str  # t15 / t17 / t15-to-t17 ... (key into the papers' numbers)
    test: dict  # {"micro": {...}, "per_type": {...}}
    test_predictions: Path | None  # CoNLL token/gold/pred of the scored test posts
    history: list[dict]
    flags: list[str] = field(default_factory=list)
    test_hash: str | None = None  # sha256 of the data files the test scores came from
    dev: dict | None = None  # metrics.json's dev entry (GMNER runs: its gmner / mner / eeg scores)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable ({err}); is the run folder complete?") from None


def find_runs(paths: list[Path], *, required: bool = True) -> list[Path]:
    """Finished run folders (with metrics.json) given as such or anywhere below the given folders."""
    found: list[Path] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path} does not exist; give run folders or folders that hold them")
        if (path / "metrics.json").is_file():
            candidates = [path]
        else:
            candidates = sorted(p.parent for p in path.rglob("metrics.json"))
        found += [c for c in candidates if not any(".tmp-" in part for part in c.parts)]
    if not found and required:
        raise ConfigError(f"no finished runs (folders with metrics.json) under {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def _coverage_share(counts: dict | None) -> float | None:
    return counts["ok"] / counts["total"] if counts and counts.get("total") else None


def image_coverage(scores: dict, predictions: Path | None, cache_path: str | None) -> float | None:
    """Share of scored test posts whose image has a usable (status ok) row in the cache; None when
    the run read no cache. Placeholder, missing and unreadable images do not count.

    The training engine records per-split coverage counts (``image_coverage: {split: {ok, total, ...}}``
    in metrics.json and eval files); for runs without that record it is recomputed from the cache and
    the scored posts' image ids (predictions/*.parquet)."""
    if not cache_path or predictions is None:
        return None
    recorded = scores.get("image_coverage")
    if isinstance(recorded, dict):
        share = _coverage_share(recorded.get("test") if "test" in recorded else recorded)
        if share is not None:
            return share
    import pyarrow.parquet as pq

    from mner.pipeline.cache import CacheError, FeatureCache

    parquet = predictions.with_suffix(".parquet")
    if not parquet.is_file() or not Path(cache_path).is_file():
        return math.nan
    table = pq.read_table(parquet, columns=["post_id", "image_id"]).to_pydict()
    images = list(dict(zip(table["post_id"], table["image_id"])).values())  # one image id per post
    try:
        share = _coverage_share(FeatureCache(cache_path).image_coverage(images))
    except CacheError:  # a schema-2 cache (rebuilt since) or a damaged one: coverage unknown, flagged
        return math.nan
    return math.nan if share is None else share


def load_run(run: Path, *, min_coverage: float) -> RunRecord:
    metrics = _read_json(run / "metrics.json")
    config = _read_json(run / "config.json")
    sweep_file = run / "sweep.json"
    train_config = config.get("train_config", {})
    if sweep_file.is_file():
        record = _read_json(sweep_file)
        spec = record["spec"]
        scores_ref = record.get("test_scores", "metrics.json#test")
        if scores_ref.startswith("metrics.json"):
            test, predictions = metrics.get("test"), run / "predictions" / "test.conll"
        else:
            test, predictions = _read_json(run / scores_ref), run / Path(scores_ref).with_suffix(".conll")
        papers = {name: entry.get("paper", name) for name, entry in record.get("datasets", {}).items()}
        train_on, test_on = spec["train_on"], spec["test_on"]
        setting = papers.get(train_on, train_on) if train_on == test_on else \
            f"{papers.get(train_on, train_on)}-to-{papers.get(test_on, test_on)}"
        test_cache = record.get("datasets", {}).get(test_on, {}).get("features")
        rec = RunRecord(run, spec["config_id"], spec["seed"], spec["model"], spec["preset"], spec["protocol"],
                        train_on, test_on, spec["fraction"], setting, test, predictions, metrics.get("history", []))
    else:  # a run trained by hand: its id comes from its config
        data_name = Path(config.get("data", {}).get("path", "data")).stem
        fraction = float(train_config.get("train_fraction", 1.0))
        protocol = "low-resource" if fraction < 1.0 else "in-domain"
        data = data_name if fraction >= 1.0 else f"{data_name}-frac{fraction:.2f}"
        setting = slug(config.get("preset") or "default") + \
            (f"+{slug(','.join(config['sets']))}" if config.get("sets") else "")
        test_cache = (config.get("features") or {}).get("path")
        rec = RunRecord(run, f"{data}/{config['model']}/{setting}", int(train_config.get("seed", 0)), config["model"],
                        config.get("preset"), protocol, data_name, data_name, fraction, data_name,
                        metrics.get("test"), run / "predictions" / "test.conll", metrics.get("history", []))
    rec.test_hash = rec.test.get("data_hash") or metrics.get("data_hash")
    rec.dev = metrics.get("dev")
    if not rec.test:
        raise ConfigError(f"{run}: metrics.json has no test scores; the run had no test split")
    random_init = metrics.get("random_init_features") or []
    if random_init:
        rec.flags.append(f"random-init features ({', '.join(random_init)})")
    reads_images = bool((config.get("features") or {}).get("required"))  # text-only models read no image rows
    scored_by = metrics if rec.test is metrics.get("test") else rec.test  # cross-domain: the eval file
    coverage = image_coverage(scored_by, rec.test_predictions, test_cache) if reads_images else None
    if coverage is not None and math.isnan(coverage):
        rec.flags.append("image coverage unknown (cache or predictions not found)")
    elif coverage is not None and coverage < min_coverage:
        rec.flags.append(f"low image coverage ({100 * coverage:.0f}% < {100 * min_coverage:.0f}%)")
    if train_config.get("fast_ablation"):
        rec.flags.append(FAST_FLAG)
    micro = rec.test.get("micro", rec.test)
    if micro.get("gold", 0) and not micro.get("pred", 1):  # F1 0 from a model that never fired, not a score
        rec.flags.append("predicted no entity on test (check learning rates and epochs)")
    return rec


# ----------------------------------------------------------------------------- the table


def _pm(mean: float, std: float) -> str:
    return "—" if mean is None or math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def _num(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def aggregate(records: list[RunRecord]) -> list[dict]:
    """One row per configuration: mean and std (in %) over its seeds, the paper's numbers, flags."""
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for rec in records:
        groups[rec.config_id].append(rec)
    rows = []
    for config_id, runs in sorted(groups.items()):
        runs.sort(key=lambda r: r.seed)
        first = runs[0]
        row: dict = {"config": config_id, "model": first.model, "preset": first.preset or "default",
                     "protocol": first.protocol, "train_on": first.train_on, "test_on": first.test_on,
                     "fraction": first.fraction, "setting": first.paper_setting, "n_seeds": len(runs),
                     "seeds": ",".join(str(r.seed) for r in runs)}
        for key, name in (("precision", "P"), ("recall", "R"), ("f1", "F1")):
            row[f"{name}_mean"], row[f"{name}_std"] = mean_std([100 * r.test["micro"][key] for r in runs])
        for entity_type in TYPES:
            values = [100 * r.test["per_type"].get(entity_type, {}).get("f1", 0.0) for r in runs]
            row[f"{entity_type}_F1_mean"], row[f"{entity_type}_F1_std"] = mean_std(values)
        paper = paper_result(first.model, first.preset, first.paper_setting) if first.fraction >= 1.0 else None
        row["paper_P"], row["paper_R"], row["paper_F1"] = (
            (paper["P"], paper["R"], paper["F1"]) if paper else (None,) * 3
        )
        for entity_type in TYPES:
            row[f"paper_{entity_type}_F1"] = (paper or {}).get("per_type", {}).get(entity_type)
        row["paper_source"] = paper["source"] if paper else None
        row["delta_F1"] = row["F1_mean"] - paper["F1"] if paper else None
        row.update(gmner_columns(runs))
        flags = [flag for r in runs for flag in r.flags]
        if len({r.test_hash for r in runs}) > 1:  # e.g. a label-corrected release for some seeds
            flags.append("seeds scored on different test data (data hashes differ)")
        row["flags"] = "; ".join(dict.fromkeys(flags))
        rows.append(row)
    return rows


GMNER_KEYS = ("gmner", "mner", "eeg")


def gmner_columns(runs: list[RunRecord]) -> dict:
    """GMNER runs (``--boxes``): dev and test GMNER / MNER / EEG F1 (mean, std over seeds) and the test
    box coverage; empty for runs without boxes."""
    if not all("gmner" in (r.test or {}) for r in runs):
        return {}
    row: dict = {}
    for split in ("dev", "test"):
        for key in GMNER_KEYS:
            scored = [getattr(r, split) for r in runs]
            values = [100 * scores[key]["f1"] for scores in scored if scores and key in scores]
            row[f"{split}_{key.upper()}_F1_mean"], row[f"{split}_{key.upper()}_F1_std"] = \
                mean_std(values) if values else (None, None)
    row["test_box_coverage"] = 100 * sum(r.test["box_coverage"]["share"] for r in runs) / len(runs)
    row["gmner_uncovered"] = runs[0].test.get("gmner_settings", {}).get("uncovered")
    return row


def gmner_markdown(rows: list[dict]) -> list[str]:
    grounded = [r for r in rows if r.get("test_GMNER_F1_mean") is not None]
    if not grounded:
        return []
    lines = ["## GMNER (entity, type and region)", "",
             "Micro F1 in %, mean ± std over seeds; coverage: share of boxed test entities some candidate reaches "
             "(the ceiling of any candidate-selection model with this detector); docs/gmner.md.", "",
             "| configuration | uncovered | dev GMNER | dev MNER | dev EEG | test GMNER | test MNER | test EEG "
             "| test coverage |", "|" + "---|" * 9]
    for row in grounded:
        cells = [f"`{row['config']}`", str(row["gmner_uncovered"])]
        for split in ("dev", "test"):
            cells += [_pm(row[f"{split}_{k.upper()}_F1_mean"], row[f"{split}_{k.upper()}_F1_std"])
                      if row[f"{split}_{k.upper()}_F1_mean"] is not None else "—" for k in GMNER_KEYS]
        cells.append(f"{row['test_box_coverage']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(rows: list[dict]) -> str:
    header = ("| configuration | protocol | seeds | P | R | F1 | PER | LOC | ORG | MISC | paper P / R / F1 "
              "| paper PER / LOC / ORG / MISC | Δ F1 |")
    rule = "|" + "---|" * 13

    def line(row: dict) -> str:
        paper = " / ".join(_num(row[f"paper_{k}"]) for k in ("P", "R", "F1")) if row["paper_F1"] is not None else "—"
        paper_types = " / ".join(_num(row[f"paper_{t}_F1"]) for t in TYPES) \
            if row["paper_PER_F1"] is not None else "—"
        delta = f"{row['delta_F1']:+.2f}" if row["delta_F1"] is not None else "—"
        cells = [f"`{row['config']}`", row["protocol"], str(row["n_seeds"]),
                 *(_pm(row[f"{k}_mean"], row[f"{k}_std"]) for k in ("P", "R", "F1")),
                 *(_pm(row[f"{t}_F1_mean"], row[f"{t}_F1_std"]) for t in TYPES), paper, paper_types, delta]
        return "| " + " | ".join(cells) + " |"

    clean = [r for r in rows if not r["flags"]]
    flagged = [r for r in rows if r["flags"]]
    intro = ("Test scores in %, mean ± sample std over seeds (entity-level micro P/R/F1 and per-type F1, "
             "seqeval/conlleval chunking). Paper columns: the number the paper reports for the same model, "
             "preset and dataset (trainer/experiments/paper_results.py); Δ F1 = ours − paper.")
    parts = ["# Results", "", intro, ""]
    if clean:
        parts += [header, rule, *map(line, clean), ""]
    else:
        parts += ["_No configuration without flags._", ""]
    if flagged:
        parts += ["## Flagged configurations (not comparable with the paper columns)", "",
                  header.replace("| Δ F1 |", "| Δ F1 | flags |"), rule + "---|",
                  *(line(r)[:-1] + f"| {r['flags']} |" for r in flagged), ""]
    parts += gmner_markdown(rows)
    return "\n".join(parts)


def write_tables(rows: list[dict], out: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(c for r in rows for c in r))  # GMNER columns only where some run has boxes
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    pacsv.write_csv(table, out / "results.csv")
    pq.write_table(table, out / "results.parquet")
    (out / "results.md").write_text(markdown(rows) + "\n", encoding="utf-8")
    return [out / "results.csv", out / "results.parquet", out / "results.md"]


# ----------------------------------------------------------------------------- entry point


REPORT_FILES = ("results.csv", "results.parquet", "results.md", "dev_f1.png", "per_type_f1.png", "low_resource.png",
                "significance.json")


def report(runs: list[Path], *, out: Path, compare: list[str] | None = None, min_coverage: float = 0.9,
           bootstrap: int = 1000, overwrite: bool = False) -> dict:
    """The ``report`` command: collect, aggregate, write tables and plots (and the paired test).

    ``out`` follows the output rule (pipeline/outputs.py): a new or empty folder, or, with
    ``overwrite``, a folder an earlier report marked (``mner-report.json``); never a run folder."""
    from mner.pipeline.outputs import REPORT_MARKER, check_output
    from mner.trainer.core.console import log

    if compare and len(compare) != 2:
        raise ConfigError(f"--compare takes exactly two configuration ids (give it twice), got {len(compare)}")
    if not 0.0 <= min_coverage <= 1.0:
        raise ConfigError(f"--min-coverage {min_coverage}: expected a share in [0, 1], e.g. 0.9")
    from mner.trainer.experiments.tune_report import TUNE_REPORT_FILES, find_tune_folders, is_trial_folder, tune_report

    out = Path(out)
    studies = find_tune_folders(runs)  # mner-train tune folders: their trials are reported on their own (dev only)
    found = [run for run in find_runs(runs, required=not studies) if not is_trial_folder(run, studies)]
    records = [load_run(run, min_coverage=min_coverage) for run in found]
    check_output(out, kind="report", overwrite=overwrite, inputs=runs, create_folder=True)
    out.mkdir(parents=True, exist_ok=True)
    for name in REPORT_FILES:  # an earlier report's files go: a stale plot or test never sits beside new tables
        (out / name).unlink(missing_ok=True)
    for pattern in TUNE_REPORT_FILES:
        for stale in out.glob(pattern):
            stale.unlink()
    (out / REPORT_MARKER).write_text(json.dumps({"mner_report": 1, "runs": [str(Path(r).resolve()) for r in runs]})
                                     + "\n", encoding="utf-8")
    result: dict = {"studies": [tune_report(folder, out) for folder in studies]}
    for study in result["studies"]:
        log(f"study {study['study']}: " + ", ".join(study["files"]))
    if not records:
        return result
    rows = aggregate(records)
    written = write_tables(rows, out)
    from mner.trainer.experiments.report_plots import plot_dev_curves, plot_low_resource, plot_per_type
    from mner.trainer.experiments.significance import paired_bootstrap

    written.append(plot_dev_curves(records, rows, out / "dev_f1.png"))
    written.append(plot_per_type(rows, out / "per_type_f1.png"))
    low_resource = plot_low_resource(rows, out / "low_resource.png")
    if low_resource is not None:
        written.append(low_resource)
    result.update({"rows": rows, "files": [str(p) for p in written]})
    if compare:
        test = paired_bootstrap(records, compare[0], compare[1], samples=bootstrap)
        (out / "significance.json").write_text(json.dumps(test, indent=2) + "\n", encoding="utf-8")
        result["significance"] = test
        written.append(out / "significance.json")
        log(f"paired bootstrap over {test['test_posts']} test posts ({bootstrap} samples): "
            f"F1({test['a']}) - F1({test['b']}) = {test['delta_f1']:+.2f} points, "
            f"95% CI [{test['ci95'][0]:+.2f}, {test['ci95'][1]:+.2f}], p = {test['p_value']:.3f}")
    flagged = sum(1 for r in rows if r["flags"])
    log(f"{len(records)} runs in {len(rows)} configurations ({flagged} flagged) -> "
        + ", ".join(str(p) for p in written))
    print(markdown(rows))
    return result
