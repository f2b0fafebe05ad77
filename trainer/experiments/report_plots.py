"""The report's PNG plots (matplotlib, headless): dev F1 per epoch, per-type F1 bars, low-resource curve.

Flagged configurations stay visible as such: dashed lines, hatched bars and ``[FLAGGED]`` in the legend.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from mner.trainer.experiments.paper_results import TYPES


def _label(row_or_id: str, flags: str) -> str:
    return row_or_id + (" [FLAGGED]" if flags else "")


def plot_dev_curves(records: list, rows: list[dict], path: Path) -> Path:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flags = {r["config"]: r["flags"] for r in rows}
    curves: dict[str, list[list[float]]] = defaultdict(list)
    for rec in records:
        curves[rec.config_id].append([100 * h["dev_f1"] for h in rec.history if "dev_f1" in h])
    fig, ax = plt.subplots(figsize=(8, 4.8 + 0.15 * len(curves)))
    for config_id, runs in sorted(curves.items()):
        length = max((len(r) for r in runs), default=0)
        if not length:
            continue
        epochs = np.arange(1, length + 1)
        values = [[r[e] for r in runs if len(r) > e] for e in range(length)]
        mean = np.array([np.mean(v) for v in values])
        std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
        (line,) = ax.plot(epochs, mean, marker="o", ms=3, label=_label(config_id, flags.get(config_id, "")),
                          linestyle="--" if flags.get(config_id) else "-")
        ax.fill_between(epochs, np.clip(mean - std, 0, 100), np.clip(mean + std, 0, 100), color=line.get_color(),
                        alpha=0.15)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("dev F1 (%)")
    ax.set_title("Dev F1 per epoch (mean ± std over seeds; dashed = flagged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_type(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["protocol"] != "low-resource"][:12]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(TYPES) + 0.5 * len(shown)), 5.2 + 0.18 * len(shown)))
    width = 0.8 / max(1, len(shown))
    x = np.arange(len(TYPES))
    for n, row in enumerate(shown):
        offset = x - 0.4 + width * (n + 0.5)
        means = [row[f"{t}_F1_mean"] for t in TYPES]
        stds = [row[f"{t}_F1_std"] for t in TYPES]
        ax.bar(offset, means, width, yerr=stds, capsize=2, label=_label(row["config"], row["flags"]),
               hatch="//" if row["flags"] else None, edgecolor="black", linewidth=0.4)
        papers = [row[f"paper_{t}_F1"] for t in TYPES]
        if any(p is not None for p in papers):
            ax.scatter(offset, [p if p is not None else np.nan for p in papers], marker="_", s=200, color="black",
                       zorder=3, label="paper" if n == 0 else None)
    ax.set_xticks(x, TYPES)
    ax.set_ylabel("test F1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Per-type test F1 (mean ± std over seeds; black bars = paper; hatched = flagged)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def low_resource_curves(rows: list[dict]) -> dict[str, list[dict]]:
    """(dataset, model, setting) -> rows by fraction; the in-domain full-data row is the 100% point."""
    curves: dict[str, list[dict]] = defaultdict(list)
    has_fractions = {(r["train_on"], r["config"].split("/", 1)[1]) for r in rows if r["protocol"] == "low-resource"}
    for row in rows:
        key = (row["train_on"], row["config"].split("/", 1)[1])
        if key in has_fractions and row["protocol"] in ("low-resource", "in-domain"):
            curves[f"{key[0]}/{key[1]}"].append(row)
    return {k: sorted(v, key=lambda r: r["fraction"]) for k, v in curves.items()}


def plot_low_resource(rows: list[dict], path: Path) -> Path | None:
    curves = low_resource_curves(rows)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(curves.items()):
        flagged = any(p["flags"] for p in points)
        ax.errorbar([100 * p["fraction"] for p in points], [p["F1_mean"] for p in points],
                    yerr=[p["F1_std"] for p in points], marker="o", capsize=3, label=_label(name, flagged),
                    linestyle="--" if flagged else "-")
    ax.set_xlabel("training data used (%)")
    ax.set_ylabel("test F1 (%)")
    ax.set_xticks([10, 20, 30, 40, 50, 100])
    ax.set_title("Low-resource: test F1 vs training fraction (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
