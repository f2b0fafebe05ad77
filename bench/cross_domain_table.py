"""Tables of bench/cross_domain_t15_t17.sh: in-domain and cross-domain test scores per model.

A run trained on dataset S keeps its in-domain test scores in ``metrics.json`` (best dev epoch); its
scores on the other dataset's test split are the ``eval/test-*.json`` that ``mner-train evaluate``
wrote with that dataset's ``data_source`` path.

The last table is the real-text convergence of every model trained on Twitter-2015 against bert_crf
(docs/models/README.md): test F1 at the best dev epoch and dev F1 after each epoch.

Usage: python bench/cross_domain_table.py WORK_DIR T15_DIR T17_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODELS = ("bert_crf", "vcrmner", "espvr", "mgipscl")
TYPES = ("PER", "LOC", "ORG", "MISC")


def scores_row(label: str, scores: dict) -> str:
    per_type = scores.get("per_type", {})
    cells = [f"{100 * per_type[t]['f1']:.2f}" if t in per_type else "-" for t in TYPES]
    micro = scores["micro"]
    return (f"| {label} | " + " | ".join(cells)
            + f" | {100 * micro['precision']:.2f} | {100 * micro['recall']:.2f} | **{100 * micro['f1']:.2f}** |")


def cross_scores(run: Path, target_data: Path) -> dict | None:
    for path in sorted((run / "eval").glob("test-*.json")):
        result = json.loads(path.read_text())
        source = result.get("data_source", {}).get("path", "")
        if Path(source).resolve() == target_data.resolve() or Path(source).resolve().parent == target_data.resolve():
            return result
    return None


def main(argv: list[str]) -> None:
    work, data = Path(argv[0]), {"t15": Path(argv[1]), "t17": Path(argv[2])}
    names = {"t15": "Twitter-2015", "t17": "Twitter-2017"}
    header = "| model | PER | LOC | ORG | MISC | P | R | F1 |\n|---|---|---|---|---|---|---|---|"
    for source, target in (("t15", "t15"), ("t17", "t17"), ("t15", "t17"), ("t17", "t15")):
        title = f"{names[source]} (in-domain)" if source == target else f"{names[source]} -> {names[target]}"
        rows = []
        for model in MODELS:
            run = work / source / model
            if not (run / "metrics.json").is_file():
                continue
            metrics = json.loads((run / "metrics.json").read_text())
            scores = metrics["test"] if source == target else cross_scores(run, data[target])
            if scores is not None:
                best = max(metrics["history"], key=lambda h: h["dev_f1"])
                rows.append(scores_row(f"{model} (best dev epoch {best['epoch']})", scores))
        if rows:
            print(f"\n{title}, test split\n\n{header}")
            print("\n".join(rows))
    convergence(work)


def convergence(work: Path) -> None:
    runs = {model: work / "t15" / model / "metrics.json" for model in MODELS}
    runs = {model: json.loads(path.read_text()) for model, path in runs.items() if path.is_file()}
    if "bert_crf" not in runs:
        return
    baseline = 100 * runs["bert_crf"]["test"]["micro"]["f1"]
    print("\nTwitter-2015, convergence against bert_crf\n")
    print("| model | test F1 | vs bert_crf | dev F1 after epochs 1 / 2 | s per epoch (train + dev) |")
    print("|---|---|---|---|---|")
    for model, metrics in runs.items():
        f1 = 100 * metrics["test"]["micro"]["f1"]
        dev = " / ".join(f"{100 * h['dev_f1']:.2f}" for h in metrics["history"])
        seconds = " / ".join(f"{h['train_seconds'] + h.get('eval_seconds', 0):.0f}" for h in metrics["history"])
        delta = "-" if model == "bert_crf" else f"{f1 - baseline:+.2f}"
        print(f"| {model} | **{f1:.2f}** | {delta} | {dev} | {seconds} |")


if __name__ == "__main__":
    main(sys.argv[1:])
