"""GMNER inputs of a run: gold boxes, candidates and targets per post, the batch part ``batch["gmner"]``,
grounded prediction, scoring and the prediction files. :class:`GmnerTask` is the one object the
training loop and ``evaluate`` talk to (``--boxes``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from mner.pipeline.data import Post
from mner.trainer.gmner.candidates import CandidateSource, entity_targets, geometry, scale_boxes, size_relation
from mner.trainer.gmner.config import GroundingConfig
from mner.trainer.gmner.gold import BoxReport, PostGold, gold_entities, read_gold
from mner.trainer.gmner.metrics import GoldRegion, PredRegion, gmner_scores


@dataclass
class PostGrounding:
    """One post's candidates (boxes only; features are read per batch) and gold regions with targets."""

    image_id: str | None
    boxes: np.ndarray  # (k, 4) candidate boxes in the cached image's pixels
    scores: np.ndarray  # (k,)
    size: tuple[int, int] | None  # cached image (width, height)
    gold: list[GoldRegion]  # every gold entity, boxes scaled to the cached image
    targets: np.ndarray  # (E, 1+k) training target of every gold entity
    xml_size: str  # the XML's <size> against the cached image's: same | scaled | transposed


def prepare_posts(posts: Sequence[Post], golds: Sequence[PostGold], source: CandidateSource | None,
                  config: GroundingConfig) -> list[PostGrounding]:
    prepared = []
    for post, gold in zip(posts, golds):
        if source is not None:
            candidates = source.post_candidates(post.image_id, with_features=False)
            boxes, scores, size = candidates.boxes, candidates.scores, candidates.size
        else:
            boxes, scores, size = np.zeros((0, 4), np.float32), np.zeros(0, np.float32), None
        regions, targets = [], []
        for entity in gold.entities:
            gold_boxes, _ = scale_boxes(entity.boxes, gold.xml_size, size)
            target, covered = entity_targets(gold_boxes, boxes, style=config.gmner_targets,
                                             threshold=config.gmner_iou, compare=config.gmner_iou_compare)
            regions.append(GoldRegion(entity.start, entity.end, entity.type, gold_boxes, covered))
            targets.append(target)
        prepared.append(PostGrounding(post.image_id, boxes, scores, size, regions,
                                      np.stack(targets) if targets else np.zeros((0, 1 + len(boxes)), np.float32),
                                      size_relation(gold.xml_size, size)))
    return prepared


class GroundedPostDataset(TorchDataset):
    """A PostDataset whose items also carry ``"gmner"`` (candidates with features, gold spans, targets)."""

    def __init__(self, base, prepared: list[PostGrounding], source: CandidateSource | None):
        self.base, self.prepared, self.source = base, prepared, source

    def __getattr__(self, name):  # posts, aligned, report, repaired ... of the wrapped PostDataset
        if name in ("base", "prepared", "source"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.base[index])
        grounding = self.prepared[index]
        k = len(grounding.scores)
        width = self.source.feature_width if self.source is not None else 0
        features = np.zeros((k, width), np.float32)
        if k and width:
            features = self.source.post_candidates(grounding.image_id).features
        kept = item["word_mask"]
        spans = [(g.start, g.end) for g in grounding.gold]
        usable = [g.end < len(kept) and bool(kept[g.start]) and bool(kept[g.end]) for g in grounding.gold]
        item["gmner"] = {"boxes": grounding.boxes, "scores": grounding.scores, "features": features,
                         "geometry": geometry(grounding.boxes, grounding.size), "spans": spans, "usable": usable,
                         "targets": grounding.targets}
        return item


class GroundedCollator:
    """The model's Collator, plus ``batch["gmner"]``: candidates padded to the batch's largest count K (at
    least 1) with ``mask`` (B, K), gold ``spans`` (B, E, 2) with ``span_mask`` (B, E) and ``targets``
    (B, E, 1+K) over [None, candidates]."""

    def __init__(self, collator, feature_width: int):
        self.collator, self.feature_width = collator, feature_width

    def __call__(self, items: list[dict]) -> dict:
        batch = self.collator(items)
        parts = [it["gmner"] for it in items]
        size = len(parts)
        k = max(1, max(len(p["scores"]) for p in parts))
        e = max(1, max(len(p["spans"]) for p in parts))
        boxes = torch.zeros(size, k, 4)  # (B, K, 4)
        scores = torch.zeros(size, k)  # (B, K)
        features = torch.zeros(size, k, self.feature_width)  # (B, K, D)
        geometry_ = torch.zeros(size, k, 7)  # (B, K, 7)
        mask = torch.zeros(size, k, dtype=torch.bool)  # (B, K)
        spans = torch.zeros(size, e, 2, dtype=torch.long)  # (B, E, 2)
        span_mask = torch.zeros(size, e, dtype=torch.bool)  # (B, E)
        targets = torch.zeros(size, e, 1 + k)  # (B, E, 1+K)
        for b, p in enumerate(parts):
            n = len(p["scores"])
            if n:
                boxes[b, :n] = torch.from_numpy(np.asarray(p["boxes"], np.float32))
                scores[b, :n] = torch.from_numpy(np.asarray(p["scores"], np.float32))
                geometry_[b, :n] = torch.from_numpy(p["geometry"])
                if self.feature_width:
                    features[b, :n] = torch.from_numpy(np.asarray(p["features"], np.float32))
                mask[b, :n] = True
            for i, ((start, end), usable) in enumerate(zip(p["spans"], p["usable"])):
                spans[b, i, 0], spans[b, i, 1] = start, end
                span_mask[b, i] = usable
                targets[b, i, : 1 + n] = torch.from_numpy(p["targets"][i])
        batch["gmner"] = {"boxes": boxes, "scores": scores, "features": features, "geometry": geometry_,
                          "mask": mask, "spans": spans, "span_mask": span_mask, "targets": targets}
        return batch


def _log(message: str) -> None:
    from mner.trainer.core.console import log

    log(message)


class GmnerTask:
    """``--boxes XML_DIR`` for one run or evaluation: reads the gold once, prepares splits, wraps the
    datasets, collator and model, predicts regions and scores them."""

    def __init__(self, boxes: str | Path, splits: dict[str, Sequence[Post]], cache, config: GroundingConfig):
        self.boxes = str(Path(boxes).resolve())
        self.config = config
        self.golds, self.reports = read_gold(splits, boxes)
        self.posts = {split: list(posts) for split, posts in splits.items()}
        self.source = (CandidateSource(cache, instance=config.gmner_objects, features=config.gmner_features,
                                       max_candidates=config.gmner_max_candidates) if cache is not None else None)
        self.warnings = list(self.source.warnings) if self.source is not None else [
            "no feature cache: no post has a candidate region, every boxed entity is uncovered"]
        self.scaled: dict[str, int] = {}
        self.transposed: dict[str, int] = {}
        for split, report in self.reports.items():
            _log(f"--boxes {report.message(split)}")
            if report.problems:
                self.warnings.append(f"{split}: {report.problems} malformed XML parts skipped, e.g. "
                                     f"{report.problem_examples[0]}")

    @property
    def feature_width(self) -> int:
        return self.source.feature_width if self.source is not None else 0

    def prepare(self, split: str, posts: Sequence[Post]) -> list[PostGrounding]:
        """Posts of ``split`` (all of them, or a subset such as a low-resource training fraction)."""
        index = {id(post): i for i, post in enumerate(self.posts[split])}
        golds = [self.golds[split][index[id(post)]] if id(post) in index else
                 PostGold(gold_entities(post), None, False) for post in posts]
        prepared = prepare_posts(posts, golds, self.source, self.config)
        self.scaled[split] = sum(p.xml_size == "scaled" for p in prepared)
        self.transposed[split] = sum(p.xml_size == "transposed" for p in prepared)
        if self.transposed[split]:
            message = (f"{split}: {self.transposed[split]} XML files give the cached picture's size transposed "
                       "(EXIF orientation applied in stage 1, not by the annotation tool?): their boxes are used "
                       "as written and may be misplaced")
            self.warnings.append(message)
            _log(f"WARNING {message}")
        return prepared

    def wrap_dataset(self, split: str, dataset) -> GroundedPostDataset:
        return GroundedPostDataset(dataset, self.prepare(split, dataset.posts), self.source)

    def wrap_collator(self, collator) -> GroundedCollator:
        return GroundedCollator(collator, self.feature_width)

    def wrap_model(self, net, labels: list[str]):
        from mner.trainer.gmner.head import GroundedModel

        return GroundedModel(net, grounding_config=self.config, feature_width=self.feature_width, labels=labels)

    def dev_score(self, dev_set: GroundedPostDataset, collator, *, labels, device, config):
        """The selection scores of a GMNER run: dev GMNER P/R/F1 as ``micro`` (the tagger's F1 alone would
        keep an epoch whose head has not learned yet)."""

        def score(model) -> float:
            _, regions = predict_grounded(model, dev_set, collator, labels=labels, device=device,
                                          batch_size=config.eval_batch_size, num_workers=config.num_workers,
                                          desc="dev")
            grounded = score_grounded(dev_set.prepared, regions, self.config)
            return {"micro": grounded["gmner"], "per_type": {}}  # the tracker logs it as dev/f1

        return score

    def finish_split(self, split: str, dataset: GroundedPostDataset, regions, out: Path | None) -> dict:
        """Score one split's grounded predictions, write them under ``out/predictions`` (when given) and
        return the keys its metrics.json entry gets."""
        grounded = score_grounded(dataset.prepared, regions, self.config)
        if out is not None:
            write_grounded(Path(out) / "predictions" / split, dataset.posts, dataset.prepared, regions)
        _log(format_grounded(grounded, f"{split} GMNER"))
        return split_metrics(grounded)

    def record(self, train_set: GroundedPostDataset | None = None) -> dict:
        """What metrics.json / config.json keep about the boxes (reader counts per split, settings, source)."""
        extra = {}
        if train_set is not None:  # the training posts' coverage (their gold boxes, this detector)
            extra["train_coverage"] = score_grounded(train_set.prepared, [[] for _ in train_set.prepared],
                                                     self.config)["box_coverage"]
        return extra | {
            "boxes": self.boxes, "config": {k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
            "settings": self.config.settings().as_dict(), "selection": "dev GMNER F1",
            "candidates": None if self.source is None else {
                "objects": self.source.instance, "features": self.source.feature_path,
                "max_candidates": self.config.gmner_max_candidates},
            "reader": {split: {**report.as_dict(), "scaled_images": self.scaled.get(split),
                               "transposed_images": self.transposed.get(split)}
                       for split, report in self.reports.items()},
            "warnings": self.warnings,
        }

    def report_of(self, split: str) -> BoxReport:
        return self.reports[split]


@torch.no_grad()
def predict_grounded(model, dataset: GroundedPostDataset, collator, *, labels: list[str], device, batch_size: int,
                     num_workers: int = 0, desc: str = "decode") -> tuple[list[list[str]], list[list[PredRegion]]]:
    """Tags per word (words the model cannot see are ``O``) and predicted entities with their region, in
    full precision like the tagger's own decoding. A model without a grounding head predicts every
    entity with no region."""
    from tqdm.auto import tqdm

    from mner.pipeline.tags import extract_entities
    from mner.trainer.evaluation.decode import to_device
    from mner.trainer.inputs.posts import make_loader

    model.eval()
    loader = make_loader(dataset, collator, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    tags_out: list[list[str]] = []
    regions_out: list[list[PredRegion]] = []
    grounded = hasattr(model, "decode_grounded")
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr):
        word_mask = batch["word_mask"]
        moved = to_device(batch, device)
        if grounded:
            paths, entities = model.decode_grounded(moved)
        else:
            paths, entities = model.decode(moved), None
        for row, path in enumerate(paths):
            index = len(tags_out)
            n_words = len(dataset.posts[index].tokens)
            kept = word_mask[row, :n_words].tolist()
            if sum(kept) != len(path):
                raise RuntimeError(f"model decoded {len(path)} tags for a post with {sum(kept)} kept words")
            it = iter(labels[i] for i in path)
            tags = [next(it) if keep else "O" for keep in kept]
            tags_out.append(tags)
            boxes = dataset.prepared[index].boxes
            if entities is None:
                regions = [PredRegion(s, e, t, None) for t, s, e in extract_entities(tags)]
            else:
                regions = [PredRegion(s, e, t, None if c < 0 else tuple(float(v) for v in boxes[c]))
                           for s, e, t, c in entities[row] if e < n_words]
            regions_out.append(regions)
    return tags_out, regions_out


def score_grounded(prepared: Sequence[PostGrounding], regions: Sequence[Sequence[PredRegion]], config) -> dict:
    return gmner_scores([p.gold for p in prepared], regions, config.settings())


def _box(box) -> list[float] | None:
    return None if box is None else [round(float(v), 2) for v in box]


def write_grounded(stem: Path, posts: Sequence[Post], prepared: Sequence[PostGrounding],
                   regions: Sequence[Sequence[PredRegion]]) -> None:
    """``<stem>.jsonl`` (one post per line: predicted entities with box or null, gold entities with
    boxes and coverage) and ``<stem>.entities.parquet`` (one row per predicted entity)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {k: [] for k in ("post_id", "image_id", "start", "end", "type", "text", "box")}
    with open(stem.with_name(stem.name + ".jsonl"), "w", encoding="utf-8") as out:
        for post, grounding, pred in zip(posts, prepared, regions):
            record = {
                "post_id": post.post_id, "image_id": post.image_id, "image_size": grounding.size,
                "pred": [{"start": p.start, "end": p.end, "type": p.type,
                          "text": " ".join(post.tokens[p.start:p.end + 1]), "box": _box(p.box)} for p in pred],
                "gold": [{"start": g.start, "end": g.end, "type": g.type,
                          "text": " ".join(post.tokens[g.start:g.end + 1]),
                          "boxes": [_box(b) for b in g.boxes], "covered": g.covered} for g in grounding.gold],
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            for p in pred:
                rows["post_id"].append(post.post_id)
                rows["image_id"].append(post.image_id)
                rows["start"].append(p.start)
                rows["end"].append(p.end)
                rows["type"].append(p.type)
                rows["text"].append(" ".join(post.tokens[p.start:p.end + 1]))
                rows["box"].append(_box(p.box))
    schema = pa.schema([("post_id", pa.string()), ("image_id", pa.string()), ("start", pa.int32()),
                        ("end", pa.int32()), ("type", pa.string()), ("text", pa.string()),
                        ("box", pa.list_(pa.float32()))])
    pq.write_table(pa.table(rows, schema=schema), stem.with_name(stem.name + ".entities.parquet"))


def split_metrics(scores: dict) -> dict:
    """The keys a split's metrics.json entry gets beside the tagger's scores."""
    picked = {key: scores[key] for key in ("gmner", "mner", "eeg", "box_coverage")}
    return picked | {"gmner_settings": scores["settings"]}


def format_grounded(scores: dict, title: str) -> str:
    lines = [title, f"{'':<8}{'P':>8}{'R':>8}{'F1':>8}"]
    for key in ("gmner", "mner", "eeg"):
        s = scores[key]
        lines.append(f"{key.upper():<8}{100 * s['precision']:>8.2f}{100 * s['recall']:>8.2f}{100 * s['f1']:>8.2f}")
    c = scores["box_coverage"]
    lines.append(f"coverage: {c['covered']} of {c['boxed']} boxed entities ({100 * c['share']:.1f}%), "
                 f"{c['entities']} entities; uncovered={scores['settings']['uncovered']}, IoU "
                 f"{scores['settings']['compare']} {scores['settings']['iou']}")
    return "\n".join(lines)


def evaluate_grounded(run_dir, run_config: dict, model, post_set, collator, *, split: str, posts: Sequence[Post],
                      boxes, cache_path, gmner_sets: dict, device, features=None) -> tuple[list[list[str]], dict, str]:
    """``mner-train evaluate --boxes``: tags, the GMNER result and the file-name suffix of its settings.
    A run trained without the head is scored with every entity predicted without a region."""
    import dataclasses

    from mner.pipeline.cache import FeatureCache
    from mner.trainer.core.config import ConfigError, convert_value

    trained = run_config.get("gmner") or {}
    config = GroundingConfig(**trained["config"]) if trained else GroundingConfig()
    try:
        given = {k: convert_value(GroundingConfig, k, v) for k, v in gmner_sets.items() if v is not None}
        config = dataclasses.replace(config, **given)
    except TypeError as err:
        raise ConfigError(f"GMNER option: {err}") from None
    config.check()
    path = cache_path or features or (run_config.get("features") or {}).get("path")
    cache = FeatureCache(path) if path and Path(path).exists() else None
    if trained and cache is None:
        raise ConfigError(f"{run_dir} grounds entities in the candidates of a feature cache: pass --features CACHE.h5")
    task = GmnerTask(boxes, {split: posts}, cache, config)
    if trained and task.feature_width != trained["feature_width"]:
        raise ConfigError(f"{run_dir} was trained on {trained['feature_width']}-wide candidate features; "
                          f"{cache.path} gives {task.feature_width} ({task.source.feature_path}): pass the run's cache")
    dataset = task.wrap_dataset(split, post_set)
    tags, regions = predict_grounded(model, dataset, task.wrap_collator(collator), labels=run_config["labels"],
                                     device=device, batch_size=run_config["train_config"]["eval_batch_size"],
                                     desc=split)
    grounded = score_grounded(dataset.prepared, regions, config)
    _log(format_grounded(grounded, f"{split} GMNER ({'grounding head' if trained else 'no grounding head: None'})"))
    compare = "ge" if config.gmner_iou_compare == ">=" else "gt"
    suffix = f"-gmner-{config.gmner_uncovered}-iou{compare}{config.gmner_iou:g}"
    if cache is not None and cache_path is None:  # a text-only tagger: name the candidates' cache in the file
        from mner.trainer.core.run_record import short_fingerprint

        suffix = f"-cache{short_fingerprint(cache.fingerprint)}{suffix}"
    return tags, {"scores": split_metrics(grounded), "record": task.record(),
                  "write": lambda stem: write_grounded(stem, posts, dataset.prepared, regions)}, suffix
