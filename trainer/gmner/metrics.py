"""GMNER evaluation as the field computes it: micro P/R/F1 over (span, type, region) triples, plus MNER
(span, type) and EEG (span, region; type ignored), and the candidate coverage.

A predicted entity is a GMNER hit when a gold entity has its span and type and the region is right:

- gold entity with boxes: the predicted box has IoU >= ``iou`` (or > with ``compare=">"``) with any
  of its gold boxes;
- gold entity without a box: the prediction is None;
- gold entity with boxes that no candidate reaches (uncovered), by ``uncovered``:
  ``"hindex"`` (H-Index, Yu et al. 2023, the Twitter-GMNER benchmark): it stays boxed and cannot be
  right with any candidate, so it costs recall and the detector's misses show in the score;
  ``"mqspn"`` (MQSPN and later work): it counts as unboxed, so None is right.

Gold and predicted entities are chunked as seqeval does (an orphan ``I-`` starts an entity), so the
MNER numbers here equal the tagger metrics' micro scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mner.trainer.evaluation.evaluate import Scores
from mner.trainer.gmner.candidates import box_iou, passes

UNCOVERED = ("hindex", "mqspn")
COMPARES = (">=", ">")


@dataclass
class GoldRegion:
    """One gold entity as the evaluator sees it (boxes in the same pixels as the predictions)."""

    start: int
    end: int
    type: str
    boxes: np.ndarray  # (g, 4); g = 0: no box
    covered: bool = False  # some candidate reaches a gold box (only meaningful when boxed)


@dataclass
class PredRegion:
    start: int
    end: int
    type: str
    box: tuple[float, float, float, float] | None  # None: the model says the entity is not in the image


@dataclass
class GmnerSettings:
    iou: float = 0.5  # IoU a predicted box needs with a gold box
    compare: str = ">="  # ">=" (default) or ">"
    uncovered: str = "hindex"  # hindex | mqspn: how boxed entities no candidate reaches count

    def check(self) -> None:
        if self.uncovered not in UNCOVERED:
            raise ValueError(f"uncovered convention {self.uncovered!r}; valid values: {', '.join(UNCOVERED)}")
        if self.compare not in COMPARES:
            raise ValueError(f"IoU comparison {self.compare!r}; valid values: {', '.join(COMPARES)}")
        if not 0 < self.iou <= 1:
            raise ValueError(f"IoU threshold {self.iou}: must be in (0, 1]")

    def as_dict(self) -> dict:
        return {"iou": self.iou, "compare": self.compare, "uncovered": self.uncovered}


def region_correct(gold: GoldRegion, box, settings: GmnerSettings) -> bool:
    boxed = len(gold.boxes) > 0
    if boxed and not gold.covered and settings.uncovered == "mqspn":
        boxed = False  # MQSPN: an entity no candidate reaches is scored as one without a box
    elif boxed and not gold.covered:
        return False  # H-Index: cannot be right
    if not boxed:
        return box is None
    if box is None:
        return False
    best = float(box_iou(np.asarray(box, np.float64)[None], gold.boxes).max())
    return bool(passes(best, settings.iou, settings.compare))


@dataclass
class GmnerCounts:
    gold: int = 0
    pred: int = 0
    gmner: int = 0
    mner: int = 0
    eeg: int = 0
    coverage: dict = field(default_factory=lambda: {"entities": 0, "boxed": 0, "covered": 0})


def gmner_scores(gold: Sequence[Sequence[GoldRegion]], pred: Sequence[Sequence[PredRegion]],
                 settings: GmnerSettings | None = None) -> dict:
    """``{"gmner", "mner", "eeg": {precision, recall, f1, gold, pred, correct}, "box_coverage": {...},
    "settings": {...}}`` over all posts (micro)."""
    settings = settings or GmnerSettings()
    settings.check()
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold posts but {len(pred)} predicted")
    counts = GmnerCounts()
    for gold_post, pred_post in zip(gold, pred):
        by_span = {(g.start, g.end): g for g in gold_post}
        counts.gold += len(gold_post)
        counts.pred += len(pred_post)
        for g in gold_post:
            counts.coverage["entities"] += 1
            if len(g.boxes):
                counts.coverage["boxed"] += 1
                counts.coverage["covered"] += bool(g.covered)
        for p in pred_post:
            g = by_span.get((p.start, p.end))
            if g is None:
                continue
            region = region_correct(g, p.box, settings)
            counts.mner += g.type == p.type
            counts.eeg += region
            counts.gmner += region and g.type == p.type
    coverage = dict(counts.coverage)
    coverage["share"] = coverage["covered"] / coverage["boxed"] if coverage["boxed"] else 0.0
    return {
        "gmner": Scores.from_counts(counts.gold, counts.pred, counts.gmner).as_dict(),
        "mner": Scores.from_counts(counts.gold, counts.pred, counts.mner).as_dict(),
        "eeg": Scores.from_counts(counts.gold, counts.pred, counts.eeg).as_dict(),
        "box_coverage": coverage,
        "settings": settings.as_dict(),
    }
