"""The GMNER evaluator against a hand-worked set (counts below worked out by hand, not by the code).

Post 0 ("a b c d e f"):
  e1 PER (0,0), two gold boxes [0,0,10,10] and [20,20,30,30], covered; predicted PER with [20,20,30,30]
     -> right (it matches the second box);
  e2 LOC (2,3), no box; predicted LOC with a box -> region wrong;
  e3 ORG (5,5), boxed, covered; predicted ORG with None -> region wrong.
Post 1:
  e4 PER (0,1), boxed but no candidate reaches it (uncovered); predicted PER with None
     -> wrong under H-Index, right under MQSPN;
  e5 MISC (3,3), box [0,0,10,10]; predicted [0,0,10,20]: IoU = 100 / 200 = 0.5 exactly
     -> right with IoU >= 0.5, wrong with IoU > 0.5;
  e6 LOC (6,6), no box; predicted as PER with None -> region right, type wrong (EEG only);
  a spurious prediction LOC (5,5) with None -> a false positive everywhere.
Gold 6, predicted 7. MNER hits: e1..e5 = 5.
GMNER hits: H-Index/>= : e1, e5 = 2;  MQSPN/>= : e1, e4, e5 = 3;  H-Index/> : e1 = 1;  MQSPN/> : e1, e4 = 2.
EEG hits (type ignored): add e6: 3, 4, 2, 3.
Coverage: 6 entities, 4 boxed (e1, e3, e4, e5), 3 covered -> 0.75.
"""

from __future__ import annotations

import numpy as np
import pytest

from mner.trainer.gmner.metrics import GmnerSettings, GoldRegion, PredRegion, gmner_scores


def hand_worked():
    box = [0, 0, 10, 10]
    gold = [
        [GoldRegion(0, 0, "PER", np.array([box, [20, 20, 30, 30]], float), True),
         GoldRegion(2, 3, "LOC", np.zeros((0, 4))),
         GoldRegion(5, 5, "ORG", np.array([box], float), True)],
        [GoldRegion(0, 1, "PER", np.array([box], float), False),
         GoldRegion(3, 3, "MISC", np.array([box], float), True),
         GoldRegion(6, 6, "LOC", np.zeros((0, 4)))],
    ]
    pred = [
        [PredRegion(0, 0, "PER", (20, 20, 30, 30)), PredRegion(2, 3, "LOC", (0, 0, 10, 10)),
         PredRegion(5, 5, "ORG", None)],
        [PredRegion(0, 1, "PER", None), PredRegion(3, 3, "MISC", (0, 0, 10, 20)), PredRegion(6, 6, "PER", None),
         PredRegion(5, 5, "LOC", None)],
    ]
    return gold, pred


def prf(correct: int, gold: int = 6, pred: int = 7) -> tuple[float, float, float]:
    p, r = correct / pred, correct / gold
    return p, r, 2 * p * r / (p + r) if p + r else 0.0


@pytest.mark.parametrize("uncovered,compare,gmner,eeg", [
    ("hindex", ">=", 2, 3), ("mqspn", ">=", 3, 4), ("hindex", ">", 1, 2), ("mqspn", ">", 2, 3)])
def test_evaluator_agrees_with_the_hand_count(uncovered, compare, gmner, eeg):
    gold, pred = hand_worked()
    scores = gmner_scores(gold, pred, GmnerSettings(iou=0.5, compare=compare, uncovered=uncovered))
    for key, correct in (("gmner", gmner), ("mner", 5), ("eeg", eeg)):
        got = scores[key]
        assert (got["gold"], got["pred"], got["correct"]) == (6, 7, correct), key
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(prf(correct)), key
    assert scores["box_coverage"] == {"entities": 6, "boxed": 4, "covered": 3, "share": 0.75}
    assert scores["settings"] == {"iou": 0.5, "compare": compare, "uncovered": uncovered}


def test_defaults_are_hindex_and_iou_at_least_half():
    gold, pred = hand_worked()
    assert gmner_scores(gold, pred)["gmner"]["correct"] == 2
    with pytest.raises(ValueError, match="valid values: hindex, mqspn"):
        gmner_scores(gold, pred, GmnerSettings(uncovered="strict"))


def test_gold_entities_are_counted_as_seqeval_does():
    """An orphan I- starts an entity (seqeval's default mode): the GMNER denominator is the MNER one."""
    from mner.pipeline.data import Post
    from mner.trainer.gmner.gold import gold_entities

    post = Post("test-0", ("rt", "john", "smith", "in", "paris", "now"),
                ("O", "I-PER", "I-PER", "O", "I-LOC", "B-LOC"), "71044", "test", "x:1")
    assert [(e.start, e.end, e.type) for e in gold_entities(post)] == [(1, 2, "PER"), (4, 4, "LOC"), (5, 5, "LOC")]
