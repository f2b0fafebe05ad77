"""Candidate regions of a post (the cached objects of one detector instance) and the training targets.

Everything that knows where candidates live in the cache is :meth:`CandidateSource.post_candidates`
and :func:`objects_paths`: the boxes, scores and one per-object feature dataset of one objects group.
Objects of an image whose status is not ``ok`` are never candidates (a placeholder's detections are
boxes on a gray stand-in picture, not on the post's image), and an image absent from the cache has
none. Gold boxes are compared with candidates in the cached image's pixels: where the XML's
``<size>`` differs from the cached width/height, the gold boxes are scaled (and the image counted);
where it is the cached size transposed (a picture whose EXIF orientation stage 1 applied but the
annotation tool did not), the boxes cannot be mapped without the orientation: they are kept as
written and the image is counted apart (``transposed_images``) and warned about.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mner.pipeline.gmner import Box

STATUS_OK = 0
GEOMETRY_WIDTH = 7  # x1/W, y1/H, x2/W, y2/H, w/W, h/H, area share
# per-object feature datasets tried, in order, when gmner_features=auto
AUTO_FEATURES = ("crop_embed", "crop_pooled")


@dataclass
class Candidates:
    boxes: np.ndarray  # (k, 4) float32 xyxy in the cached image's pixels
    scores: np.ndarray  # (k,) float32 detector scores
    features: np.ndarray | None  # (k, D) float32 per-object features, None when not asked for
    size: tuple[int, int] | None  # cached (width, height); None: no usable image

    def __len__(self) -> int:
        return len(self.scores)


def objects_paths(instance: str) -> dict[str, str]:
    """Cache paths of one detector instance's objects (``objects`` today; a named instance such as
    ``objects/maskrcnn`` keeps the same dataset names under its group)."""
    group = instance.strip("/")
    return {"offsets": f"{group}/offsets", "boxes": f"{group}/boxes", "scores": f"{group}/scores"}


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4) with every box of ``b`` (k, 4): (n, k)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    left = np.maximum(a[:, None, 0], b[None, :, 0])  # (n, k)
    top = np.maximum(a[:, None, 1], b[None, :, 1])
    right = np.minimum(a[:, None, 2], b[None, :, 2])
    bottom = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)  # (n, k)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])  # (n,)
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # (k,)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def passes(iou: np.ndarray | float, threshold: float, compare: str) -> np.ndarray | bool:
    """IoU >= threshold (``compare=">="``, the default) or IoU > threshold (``">"``)."""
    return iou >= threshold if compare == ">=" else iou > threshold


class CandidateSource:
    """Reads candidates from a feature cache: one detector instance and (optionally) one feature dataset."""

    def __init__(self, cache, *, instance: str = "auto", features: str = "auto", max_candidates: int = 0):
        self.cache = cache
        self.instance = instance = self._instance(instance)
        self.paths = objects_paths(instance)
        self.max_candidates = max_candidates
        self.warnings: list[str] = []
        self.available = all(cache.has(p) for p in self.paths.values())
        if not self.available:
            self.warnings.append(f"{cache.path} has no detector objects ({self.paths['boxes']}): no post has a "
                                 "candidate region, every boxed entity is uncovered")
        self.feature_path = self._feature_path(features) if self.available else None
        self.feature_width = int(cache.row_shape(self.feature_path)[-1]) if self.feature_path else 0
        self.status = np.asarray(cache.status)
        self.widths = np.asarray(cache.read_global("images/width")) if cache.has("images/width") else None
        self.heights = np.asarray(cache.read_global("images/height")) if cache.has("images/height") else None

    def _instance(self, instance: str) -> str:
        """``auto``: the cache's one detector instance (a group with boxes and offsets under ``objects``)."""
        found = sorted(g for g in self.cache.groups() if g.split("/")[0] == "objects"
                       and all(self.cache.has(p) for p in objects_paths(g).values()))
        if instance != "auto":
            if found and instance.strip("/") not in found:
                from mner.trainer.core.config import ConfigError

                raise ConfigError(f"--set gmner_objects={instance}: {self.cache.path} has no such detector instance; "
                                  f"valid values: auto, {', '.join(found)}")
            return instance.strip("/")
        if len(found) > 1:
            from mner.trainer.core.config import ConfigError

            raise ConfigError(f"{self.cache.path} holds several detector instances ({', '.join(found)}): choose the "
                              f"candidates with --set gmner_objects={found[0]}")
        return found[0] if found else "objects"

    def _feature_path(self, features: str) -> str | None:
        if features == "none":
            return None
        if features != "auto":
            if not self.cache.has(features):
                from mner.trainer.core.config import ConfigError

                raise ConfigError(f"--set gmner_features={features}: {self.cache.path} has no such dataset; use "
                                  "auto, none or a per-object dataset such as encoders/clip/crop_embed")
            if self.cache.index_of(features) != self.paths["offsets"]:
                from mner.trainer.core.config import ConfigError

                raise ConfigError(f"--set gmner_features={features}: its rows are not the objects of "
                                  f"{self.instance} (index {self.cache.index_of(features)})")
            return features
        for group in sorted(self.cache.groups()):
            for name in AUTO_FEATURES:
                path = f"{group}/{name}"
                if self.cache.has(path) and self.cache.index_of(path) == self.paths["offsets"]:
                    return path
        return None

    def row_of(self, image_id: str | None) -> int | None:
        if not image_id:
            return None
        try:
            return self.cache.row_of(image_id)
        except KeyError:
            return None

    def image_size(self, image_id: str | None) -> tuple[int, int] | None:
        row = self.row_of(image_id)
        if row is None or self.widths is None or int(self.status[row]) != STATUS_OK:
            return None
        return int(self.widths[row]), int(self.heights[row])

    def post_candidates(self, image_id: str | None, *, with_features: bool = True) -> Candidates:
        """THE place candidates come from: the ok image's cached objects (first ``max_candidates`` by score)."""
        row = self.row_of(image_id)
        empty = Candidates(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                           np.zeros((0, self.feature_width), np.float32) if with_features else None, None)
        if row is None or int(self.status[row]) != STATUS_OK:
            return empty
        empty.size = self.image_size(image_id)
        if not self.available:
            return empty
        limit = self.max_candidates or None
        boxes = np.asarray(self.cache.read(self.paths["boxes"], row), np.float32)[:limit]  # (k, 4)
        scores = np.asarray(self.cache.read(self.paths["scores"], row), np.float32)[:limit]  # (k,)
        features = None
        if with_features:
            features = (np.asarray(self.cache.read(self.feature_path, row), np.float32)[:limit] if self.feature_path
                        else np.zeros((len(scores), 0), np.float32))  # (k, D)
        return Candidates(boxes, scores, features, empty.size)


def size_relation(xml_size: tuple[int, int] | None, image_size: tuple[int, int] | None) -> str:
    """``same`` (or unknown), ``transposed`` (width and height swapped) or ``scaled``."""
    if xml_size is None or image_size is None or tuple(xml_size) == tuple(image_size):
        return "same"
    if tuple(xml_size) == (image_size[1], image_size[0]):
        return "transposed"
    return "scaled"


def scale_boxes(boxes: list[Box], xml_size: tuple[int, int] | None, image_size: tuple[int, int] | None
                ) -> tuple[np.ndarray, bool]:
    """Gold boxes in the cached image's pixels; True when they had to be scaled (a transposed size is
    left as written, see the module docstring)."""
    array = np.asarray(boxes, np.float64).reshape(-1, 4)
    if size_relation(xml_size, image_size) != "scaled":
        return array, False
    sx, sy = image_size[0] / xml_size[0], image_size[1] / xml_size[1]
    return array * np.array([sx, sy, sx, sy]), True


def geometry(boxes: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """(k, 7) box geometry relative to the image: corners, width, height, area share."""
    if size is None or len(boxes) == 0:
        return np.zeros((len(boxes), GEOMETRY_WIDTH), np.float32)
    width, height = float(size[0]), float(size[1])
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    w, h = (x2 - x1) / width, (y2 - y1) / height
    return np.stack([x1 / width, y1 / height, x2 / width, y2 / height, w, h, w * h], axis=1).astype(np.float32)


def entity_targets(gold_boxes: np.ndarray, candidate_boxes: np.ndarray, *, style: str, threshold: float,
                   compare: str) -> tuple[np.ndarray, bool]:
    """Training target over [None, candidate 1..k] for one gold entity, and whether it is covered.

    ``index``: 1 on every candidate whose IoU with some gold box passes (the set a model may pick
    from), or on None. ``soft``: those candidates' IoUs normalised to sum 1 (H-Index / MQSPN style).
    An unboxed entity, and a boxed one no candidate reaches (uncovered), target None.
    """
    k = len(candidate_boxes)
    target = np.zeros(1 + k, np.float32)
    if len(gold_boxes) == 0 or k == 0:
        target[0] = 1.0
        return target, False
    best = box_iou(gold_boxes, candidate_boxes).max(axis=0)  # (k,) best IoU of each candidate with any gold box
    hit = passes(best, threshold, compare)
    if not hit.any():
        target[0] = 1.0
        return target, False
    if style == "soft":
        kept = np.where(hit, best, 0.0)
        target[1:] = kept / kept.sum()
    else:
        target[1:] = hit.astype(np.float32)
    return target, True
