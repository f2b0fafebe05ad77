"""The papers' evaluation protocols as small pure functions: low-resource subsets and seed statistics.

Cross-domain runs need no function of their own: a model trained on one dataset is scored on the
other with ``evaluate_run(..., data=OTHER)``; both datasets load through ``mner.pipeline.data``,
which renames Twitter-2015's ``OTHER`` to ``MISC``, so the four types line up.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

LOW_RESOURCE_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 1.0)  # MGIPS-CL sec. 4.7 (after TMR)


def train_subset(num_posts: int, fraction: float, seed: int) -> list[int]:
    """Indices (ascending) of the training posts a low-resource run keeps.

    The subset is a prefix of one seeded permutation, so for a fixed seed the 10% subset lies
    inside the 20% subset, which lies inside the 30% one, and so on: curves over fractions then
    measure more data, not different data. The permutation depends on the seed only (not on the
    fraction), and a string seed makes it identical across Python versions and platforms.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train fraction {fraction} is outside (0, 1]; e.g. 0.1 keeps 10% of the posts")
    order = list(range(num_posts))
    random.Random(f"mner-low-resource-{seed}").shuffle(order)
    keep = max(1, round(fraction * num_posts)) if num_posts else 0
    return sorted(order[:keep])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0.0 for a single value), as papers report seeds."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
