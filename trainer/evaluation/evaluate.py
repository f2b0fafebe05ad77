"""Entity-level metrics identical to seqeval's default (conlleval-style) mode, and prediction writers.

Entities are chunked by :func:`mner.pipeline.tags.extract_entities` (the rule is stated there).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mner.pipeline.tags import extract_entities


@dataclass
class Scores:
    precision: float
    recall: float
    f1: float
    gold: int  # gold entities
    pred: int  # predicted entities
    correct: int  # predicted entities with exact type and span match

    @classmethod
    def from_counts(cls, gold: int, pred: int, correct: int) -> Scores:
        precision = correct / pred if pred else 0.0
        recall = correct / gold if gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return cls(precision, recall, f1, gold, pred, correct)

    def as_dict(self) -> dict:
        return {
            "precision": self.precision, "recall": self.recall, "f1": self.f1,
            "gold": self.gold, "pred": self.pred, "correct": self.correct,
        }


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Micro P/R/F1 over all entities plus per-type scores: ``{"micro": {...}, "per_type": {T: {...}}}``."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sequences but {len(pred)} predicted")
    gold_set: set[tuple[int, str, int, int]] = set()
    pred_set: set[tuple[int, str, int, int]] = set()
    for n, (gold_tags, pred_tags) in enumerate(zip(gold, pred)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sequence {n}: {len(gold_tags)} gold tags but {len(pred_tags)} predicted")
        gold_set.update((n, *entity) for entity in extract_entities(gold_tags))
        pred_set.update((n, *entity) for entity in extract_entities(pred_tags))
    correct = gold_set & pred_set
    types = sorted({e[1] for e in gold_set} | {e[1] for e in pred_set})

    def count(entities: set, entity_type: str) -> int:
        return sum(1 for e in entities if e[1] == entity_type)

    per_type = {
        t: Scores.from_counts(count(gold_set, t), count(pred_set, t), count(correct, t)).as_dict()
        for t in types
    }
    micro = Scores.from_counts(len(gold_set), len(pred_set), len(correct)).as_dict()
    return {"micro": micro, "per_type": per_type}


def format_scores(scores: dict, title: str = "") -> str:
    """A small table like seqeval's classification report."""
    lines = [title] if title else []
    lines.append(f"{'type':<8}{'P':>8}{'R':>8}{'F1':>8}{'gold':>7}{'pred':>7}")
    rows = [*scores["per_type"].items(), ("micro", scores["micro"])]
    for name, s in rows:
        lines.append(
            f"{name:<8}{100 * s['precision']:>8.2f}{100 * s['recall']:>8.2f}{100 * s['f1']:>8.2f}"
            f"{s['gold']:>7}{s['pred']:>7}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- writers


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_conll(path: Path, posts, predictions: Sequence[Sequence[str]]) -> None:
    """``token gold pred`` per line (``token pred`` when the posts have no tags), blank line between
    posts, and an ``IMGID:<id>`` line before each post that has an image, like the input files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for post, pred_tags in zip(posts, predictions):
            if post.image_id is not None:
                out.write(f"IMGID:{post.image_id}\n")
            for i, (token, pred_tag) in enumerate(zip(post.tokens, pred_tags)):
                fields = [token, post.tags[i], pred_tag] if post.tags is not None else [token, pred_tag]
                out.write("\t".join(fields) + "\n")
            out.write("\n")


def write_parquet(path: Path, posts, predictions: Sequence[Sequence[str]]) -> None:
    """One row per word: post_id, image_id, token_index, token, gold (null when unlabelled), pred."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {k: [] for k in ("post_id", "image_id", "token_index", "token", "gold", "pred")}
    for post, pred_tags in zip(posts, predictions):
        for i, (token, pred_tag) in enumerate(zip(post.tokens, pred_tags)):
            columns["post_id"].append(post.post_id)
            columns["image_id"].append(post.image_id)
            columns["token_index"].append(i)
            columns["token"].append(token)
            columns["gold"].append(post.tags[i] if post.tags is not None else None)
            columns["pred"].append(pred_tag)
    schema = pa.schema([
        ("post_id", pa.string()), ("image_id", pa.string()), ("token_index", pa.int32()),
        ("token", pa.string()), ("gold", pa.string()), ("pred", pa.string()),
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)


def read_conll_predictions(path: Path) -> tuple[list[list[str]], list[list[str]]]:
    """Gold and predicted tag sequences back from a ``token gold pred`` file (for checks)."""
    gold: list[list[str]] = []
    pred: list[list[str]] = []
    post_gold: list[str] = []
    post_pred: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("IMGID:"):
            continue
        if not line.strip():
            if post_gold:
                gold.append(post_gold)
                pred.append(post_pred)
            post_gold, post_pred = [], []
            continue
        fields = line.split("\t")
        post_gold.append(fields[-2])
        post_pred.append(fields[-1])
    if post_gold:
        gold.append(post_gold)
        pred.append(post_pred)
    return gold, pred


# ----------------------------------------------------------------------------- finished runs


def choose_cache(run_dir: Path, run_config: dict, *, features, data, posts, allow_missing_images: bool = False):
    """The cache evaluate/predict read images from, and the warnings to print and record.

    ``--features`` wins; otherwise the training run's cache. Either way the cache is named, compared
    with the one the run trained on (path and fingerprint), and its coverage of ``posts`` checked like
    at training time. Returns ``(path or None, record or None, warnings)``."""
    from mner.pipeline.cache import FeatureCache
    from mner.trainer.core.run_record import cache_record, check_coverage, same_image_rows
    from mner.trainer.core.schema2_runs import current_fields
    from mner.trainer.models import get_model_class

    model_cls = get_model_class(run_config["model"])
    if not model_cls.required_features(model_cls.Config(**current_fields(run_config["model_config"]))):
        return None, None, []  # text-only: images are never read
    trained = run_config.get("features") or {}
    warnings: list[str] = []
    if features is None:
        features = trained.get("path")
        if features is None or not Path(features).exists():
            from mner.trainer.core.config import ConfigError

            raise ConfigError(f"the cache {run_dir} was trained with ({features}) is gone; pass --features CACHE.h5")
        if data is not None:
            warnings.append(f"--data {data} without --features: its images are looked up in the training cache "
                            f"{features}; pass --features with the cache built for that data")
    cache = FeatureCache(features)
    record = cache_record(cache, {"posts": posts})
    grown, how = False, ""
    if trained.get("fingerprint") and record["fingerprint"] != trained["fingerprint"] \
            and set(record["groups"]) == set(trained.get("groups") or {}):  # same groups, more images?
        grown, how = same_image_rows(trained.get("image_fingerprints"), cache)
    if grown:  # a superset of the training cache whose old rows are unchanged (per-image fingerprints)
        record["grown_from"] = {"path": trained.get("path"), "fingerprint": trained["fingerprint"], "note": how}
        from mner.trainer.core.console import log

        log(f"the cache {record['path']} is not the one the run trained with, but {how}")
    elif trained.get("path") and record["path"] != trained["path"]:
        warnings.append(f"this cache ({record['path']}) is not the one the run trained with ({trained['path']})")
    elif trained.get("fingerprint") and record["fingerprint"] != trained["fingerprint"]:
        changed = sorted(g for g in set(record["groups"]) | set(trained.get("groups", {}))
                         if record["groups"].get(g) != trained.get("groups", {}).get(g))
        warnings.append(f"the cache {record['path']} changed since the run trained on it (fingerprint "
                        f"{trained['fingerprint'][:12]} -> {record['fingerprint'][:12]}; groups {changed})")
    max_share = 1.0 if allow_missing_images else run_config["train_config"].get("max_missing_images", 0.05)
    check_coverage(record["coverage"], cache_path=record["path"], max_share=max_share, what="evaluate/predict")
    return features, record, warnings


def _announce(record: dict | None, warnings: list[str]) -> None:
    from mner.trainer.core.console import log, warn_loudly

    if record is not None:
        log(f"feature cache: {record['path']} (fingerprint {record['fingerprint'][:12]}, image coverage "
            f"{record['coverage']['posts']})")
    for warning in warnings:
        warn_loudly(warning)


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    data: str | Path | None = None,
    features: str | Path | None = None,
    device: str = "auto",
    allow_missing_images: bool = False,
    boxes: str | Path | None = None,
    gmner_sets: dict | None = None,
) -> dict:
    """Score a trained run on one split of its own data or of ``data`` (e.g. cross-domain 15 -> 17).

    Writes ``eval/<split>-<data hash[:8]>[-cache<fingerprint[:8]>].json`` plus CoNLL and Parquet
    predictions into the run; the JSON names the cache used and any warning about it. With ``boxes``
    (or a run trained with ``--boxes``, on its own data) it also scores GMNER / MNER / EEG and writes
    the grounded predictions (``.jsonl``, ``.entities.parquet``); ``gmner_sets`` overrides the metric
    conventions (``gmner_uncovered``, ``gmner_iou``, ``gmner_iou_compare``).
    """
    from mner.trainer.core.console import log, warn_loudly
    from mner.trainer.core.finished_run import load_run
    from mner.trainer.core.labels import describe_unseen, unseen_types
    from mner.trainer.core.run_folder import read_run_config, require_finished
    from mner.trainer.core.run_record import short_fingerprint
    from mner.trainer.evaluation.decode import DECODE_PRECISION, predict_tags
    from mner.trainer.inputs.batching import Collator
    from mner.trainer.inputs.posts import load_posts, make_post_dataset
    from mner.trainer.inputs.segments import second_segment_for

    run_dir = Path(run_dir)
    require_finished(run_dir)
    run_config = read_run_config(run_dir)
    posts_data, posts_features = data, None
    if data is None:
        source = run_config["data"]
        posts_data, posts_features = (source["path"], None) if source["source"] == "data" else (None, source["path"])
    dataset, data_info = load_posts(posts_data, posts_features)
    posts = dataset.splits.get(split) or []
    if not posts:
        from mner.trainer.core.config import ConfigError

        raise ConfigError(f"{data_info['path']}: no {split!r} posts; splits present: {sorted(dataset.splits)}")
    cache_path, cache, warnings = choose_cache(run_dir, run_config, features=features, data=data, posts=posts,
                                               allow_missing_images=allow_missing_images)
    _announce(cache, warnings)
    model, run_config, tokenizer, visual, torch_device = load_run(run_dir, features=cache_path, device=device)
    labels = run_config["labels"]
    unseen = unseen_types(posts, labels)
    if unseen:
        warn_loudly(describe_unseen(split, unseen))
    post_set = make_post_dataset(posts, tokenizer, label_to_id=None,
                                 max_length=run_config["train_config"]["max_length"], visual=visual, split=split)
    collator = Collator(pad_token_id=tokenizer.pad_token_id or 0, visual_batcher=visual.batcher if visual else None,
                        second_segment=second_segment_for(type(model), model.config, tokenizer,
                                                          run_config["train_config"]["max_length"]))
    stem = f"{split}-{dataset.data_hash[:8]}" + (f"-cache{short_fingerprint(cache['fingerprint'])}" if cache else "")
    trained_gmner = run_config.get("gmner")
    if boxes is None and trained_gmner and data is None:
        boxes = trained_gmner["boxes"]
    if gmner_sets and boxes is None:
        from mner.trainer.core.config import ConfigError

        raise ConfigError("the GMNER conventions (--uncovered, --iou, --iou-compare) need the gold boxes: add --boxes")
    gmner_result = None
    if boxes is None:
        predictions = predict_tags(model, post_set, collator, labels=labels, device=torch_device,
                                   batch_size=run_config["train_config"]["eval_batch_size"], desc=split)
    else:
        from mner.trainer.gmner.data import evaluate_grounded

        predictions, gmner_result, grounded_stem = evaluate_grounded(
            run_dir, run_config, model, post_set, collator, split=split, posts=posts, boxes=boxes,
            cache_path=cache_path, features=features, gmner_sets=gmner_sets or {}, device=torch_device)
        stem += grounded_stem
    scores = entity_scores([list(p.tags) for p in posts], predictions)
    if gmner_result is not None:
        scores.update(gmner_result.pop("scores"))
    result = {"split": split, "data_hash": dataset.data_hash, "data_source": data_info,
              "orphan_i": dataset.orphan_i, "unseen_types": unseen, "cache": cache, "warnings": warnings,
              "decode_precision": DECODE_PRECISION, **scores}
    if gmner_result is not None:
        result["boxes"] = gmner_result["record"]  # reader counts, settings, candidates (scores are above)
        gmner_result["write"](run_dir / "eval" / stem)
    write_json(run_dir / "eval" / f"{stem}.json", result)
    write_conll(run_dir / "eval" / f"{stem}.conll", posts, predictions)
    write_parquet(run_dir / "eval" / f"{stem}.parquet", posts, predictions)
    log(format_scores(scores, f"{run_dir} on {data_info['path']} [{split}]"))
    return result


def predict_run(run_dir, **kwargs):
    """Moved to :func:`mner.trainer.inference.predict.predict_run` (the Tagger's code path); kept here so
    existing imports keep working."""
    from mner.trainer.inference.predict import predict_run as tagger_predict_run

    return tagger_predict_run(run_dir, **kwargs)
