"""Paired bootstrap significance test between two configurations over the same test posts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mner.trainer.core.config import ConfigError


def post_counts(predictions: Path) -> tuple[np.ndarray, list[list[str]]]:
    """Per test post: (gold entities, predicted entities, correct ones) as an int array (posts, 3)."""
    from mner.pipeline.tags import extract_entities
    from mner.trainer.evaluation.evaluate import read_conll_predictions

    gold, pred = read_conll_predictions(predictions)
    counts = np.zeros((len(gold), 3), dtype=np.int64)
    for n, (gold_tags, pred_tags) in enumerate(zip(gold, pred)):
        gold_set, pred_set = set(extract_entities(gold_tags)), set(extract_entities(pred_tags))
        counts[n] = (len(gold_set), len(pred_set), len(gold_set & pred_set))
    return counts, gold


def _f1(sums: np.ndarray) -> np.ndarray:
    """Micro F1 from summed (gold, pred, correct) counts: 2c / (g + p)."""
    denominator = sums[..., 0] + sums[..., 1]
    return np.where(denominator > 0, 2 * sums[..., 2] / np.maximum(denominator, 1), 0.0)


def paired_bootstrap(records: list, config_a: str, config_b: str, *, samples: int = 1000,
                     seed: int = 0) -> dict:
    """Paired bootstrap over test posts (Koehn 2004; Berg-Kirkpatrick et al. 2012).

    Each sample draws test posts with replacement, the same draw for both configurations, and
    computes each configuration's F1 averaged over its seeds. ``p`` is the share of samples in
    which the configuration that is better on the full test set is not better.
    """
    runs = {c: [r for r in records if r.config_id == c] for c in (config_a, config_b)}
    known = sorted({r.config_id for r in records})
    counts = {}
    reference = None
    for config_id, config_runs in runs.items():
        if not config_runs:
            raise ConfigError(f"--compare {config_id!r}: no such configuration; valid values: {', '.join(known)}")
        per_seed = []
        for rec in config_runs:
            if rec.test_predictions is None or not rec.test_predictions.is_file():
                raise ConfigError(f"{rec.path}: no test predictions ({rec.test_predictions}) for the bootstrap")
            seed_counts, gold = post_counts(rec.test_predictions)
            if reference is None:
                reference = gold
            elif gold != reference:
                raise ConfigError(f"{rec.path}: scored on other test posts than {config_a}; a paired test "
                                  "needs the same test set")
            per_seed.append(seed_counts)
        counts[config_id] = np.stack(per_seed)  # (seeds, posts, 3)
    posts = counts[config_a].shape[1]
    rng = np.random.default_rng(seed)
    weights = np.stack([np.bincount(rng.integers(0, posts, posts), minlength=posts) for _ in range(samples)])  # (S, P)

    def sample_f1(c: np.ndarray) -> np.ndarray:
        sums = np.einsum("sp,rpk->rsk", weights, c)  # (seeds, S, 3)
        return _f1(sums).mean(axis=0)  # (S,) mean over seeds

    observed = 100 * (_f1(counts[config_a].sum(1)).mean() - _f1(counts[config_b].sum(1)).mean())
    deltas = 100 * (sample_f1(counts[config_a]) - sample_f1(counts[config_b]))
    p_value = float(np.mean(deltas <= 0) if observed > 0 else np.mean(deltas >= 0))
    low, high = np.percentile(deltas, [2.5, 97.5])
    return {"a": config_a, "b": config_b, "seeds_a": len(runs[config_a]), "seeds_b": len(runs[config_b]),
            "test_posts": posts, "samples": samples, "delta_f1": float(observed),
            "ci95": [float(low), float(high)], "p_value": p_value}
