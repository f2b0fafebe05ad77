"""Cached visual features -> the padded float32 tensors of the batch contract (docs/architecture.md).

Runs inside DataLoader workers for every batch, so it only slices rows that stage 1 already
computed: no image is decoded and no network runs here.
"""

from __future__ import annotations

import numpy as np
import torch

from mner.pipeline.feature_cache import FeatureCache

OBJECT_MASK = "objects/mask"
IMAGE_OK = "images/ok"
STATUS_OK = 0  # STATUS_NAMES[0]
STATUS_PLACEHOLDER = 3  # STATUS_NAMES[3]: features of a gray stand-in image


class VisualBatcher:
    """Turns the cache rows of a batch's images into ``batch["visual"]``.

    ``paths`` are cache dataset paths (``"encoders/clip/crop_embed"``...). Per-image datasets become
    (B, ...) tensors, per-object datasets (B, K, ...) padded to the batch's largest object count
    (at least 1) with ``objects/mask`` (B, K). Posts without an image, or whose image is missing,
    unreadable or a placeholder, get zeros, ``images/ok`` False and no objects, unless
    ``use_placeholders`` feeds a placeholder's stand-in features like real ones. ``max_objects`` keeps
    each image's first m objects (stage 1 stores them in descending detector score).
    ``"objects/offsets"`` and global arrays (which reach models through ``FeatureSpec.globals``) are
    accepted in ``paths`` and produce no tensor.
    """

    def __init__(
        self, cache: FeatureCache, paths: list[str], *, max_objects: int | None = None, use_placeholders: bool = False
    ):
        if max_objects is not None and max_objects < 1:
            raise ValueError(f"max_objects must be >= 1 or None, got {max_objects}")
        self.cache = cache
        self.max_objects = max_objects
        wanted = [p.strip("/") for p in dict.fromkeys(paths)]
        cache.require(wanted)
        kinds = {p: cache.rows_kind(p) for p in wanted}
        bad = {p: k for p, k in kinds.items() if k not in ("image", "object", "offsets", "global")}
        if bad:
            raise ValueError(f"VisualBatcher batches per-image and per-object arrays; cannot batch {bad}")
        self.image_paths = [p for p in wanted if kinds[p] == "image"]
        self.object_paths = [p for p in wanted if kinds[p] == "object"]
        self.row_shapes = {p: tuple(cache.row_shape(p)) for p in self.image_paths + self.object_paths}
        status = np.asarray(cache.status)
        usable = (STATUS_OK, STATUS_PLACEHOLDER) if use_placeholders else (STATUS_OK,)
        self.image_ok = np.isin(status, usable)  # (N,) read once at open, pickles small

    def __call__(self, image_rows: list[int | None]) -> dict[str, torch.Tensor]:
        batch_size = len(image_rows)
        ok = np.array(
            [row is not None and row >= 0 and self.image_ok[row] for row in image_rows], dtype=bool
        )

        visual: dict[str, torch.Tensor] = {IMAGE_OK: torch.from_numpy(ok)}
        for path in self.image_paths:
            out = np.zeros((batch_size, *self.row_shapes[path]), dtype=np.float32)  # (B, ...)
            for b in np.flatnonzero(ok):
                out[b] = self.cache.read(path, image_rows[b])
            visual[path] = torch.from_numpy(out)

        if self.object_paths:
            per_post = {path: [None] * batch_size for path in self.object_paths}
            counts = np.zeros(batch_size, dtype=np.int64)
            for b in np.flatnonzero(ok):
                for path in self.object_paths:
                    rows = self.cache.read(path, image_rows[b])[: self.max_objects]  # (k_b, ...)
                    per_post[path][b] = rows
                    counts[b] = len(rows)
            num_slots = max(1, int(counts.max(initial=0)))
            mask = np.arange(num_slots)[None, :] < counts[:, None]  # (B, K)
            visual[OBJECT_MASK] = torch.from_numpy(mask)
            for path in self.object_paths:
                out = np.zeros((batch_size, num_slots, *self.row_shapes[path]), dtype=np.float32)  # (B, K, ...)
                for b, rows in enumerate(per_post[path]):
                    if rows is not None and len(rows):
                        out[b, : len(rows)] = rows
                visual[path] = torch.from_numpy(out)
        return visual
