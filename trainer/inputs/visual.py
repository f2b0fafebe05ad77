"""Cached features -> the padded tensors of the batch contract (docs/architecture.md), derived from the
group specs (``mner.pipeline.cache.specs``): each dataset's row kind says how it is padded, its
collation what it becomes.

Runs inside DataLoader workers for every batch, so it only slices rows that stage 1 already
computed; the only decoding is of stored JPEG crops for datasets declared ``collate="jpeg"``.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch

from mner.pipeline.cache import FeatureCache, dataset_spec, is_ragged

OBJECT_MASK = "objects/mask"
IMAGE_OK = "images/ok"
STATUS_OK = 0  # STATUS_NAMES[0]
STATUS_PLACEHOLDER = 3  # STATUS_NAMES[3]: features computed from the gray stand-in of a missing image


def mask_key(index_path: str) -> str:
    """``objects/offsets`` -> ``objects/mask``: the (B, K) mask of one ragged set."""
    return f"{index_path.rsplit('/', 1)[0]}/mask"


def decode_pixels(jpeg: bytes, side: int) -> np.ndarray:
    """Stored JPEG bytes -> (side, side, 3) uint8 RGB (squashed, like the stage-1 encoders do)."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC), dtype=np.uint8)


class VisualBatcher:
    """Turns the cache rows of a batch's images into ``batch["visual"]``.

    ``paths`` are cache dataset paths (``"crops/maskrcnn/clip/ViT-B-16/crop_embed"``...). Per image rows become (B, ...)
    tensors; rows of a ragged per-image set (any kind an index declares: ``object``, ``grounding``, ...)
    become (B, K, ...) padded to the batch's largest count (at least 1) with the set's mask
    (``objects/maskrcnn/mask`` (B, K), ...). Collation
    follows the spec: ``float`` -> float32, ``pixels`` / ``jpeg`` -> uint8 (..., S, S, 3), ``text`` -> a
    list of strings, or ``<path>/input_ids`` and ``<path>/attention_mask`` when a ``tokenizer`` is given.
    Posts without an image, or whose image is missing, unreadable or a placeholder, get zeros,
    ``images/ok`` False and no rows, unless ``use_placeholders`` feeds a placeholder's stand-in features
    like real ones. ``max_objects`` keeps each image's first m rows of the sets whose index declares
    ``cut_by="max_objects"`` (a detector's objects, stored in descending score); ``limits`` gives other
    such options by name.
    Index datasets and globals (which reach models through ``FeatureSpec.globals``) produce no tensor.
    """

    def __init__(
        self,
        cache: FeatureCache,
        paths: list[str],
        *,
        max_objects: int | None = None,
        limits: dict[str, int | None] | None = None,
        use_placeholders: bool = False,
        tokenizer: Callable | None = None,
        max_text_length: int = 64,
    ):
        if max_objects is not None and max_objects < 1:
            raise ValueError(f"max_objects must be >= 1 or None, got {max_objects}")
        self.cache = cache
        self.max_objects = max_objects
        cuts = {"max_objects": max_objects, **(limits or {})}  # cut_by option -> rows kept per image
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        wanted = [p.strip("/") for p in dict.fromkeys(paths)]
        cache.require(wanted)
        self.collate: dict[str, str] = {}
        self.pixels: dict[str, int] = {}
        self.image_paths: list[str] = []
        self.text_paths: list[str] = []
        self.ragged: dict[str, list[str]] = {}  # index path -> the paths it slices
        self.limit: dict[str, int | None] = {}  # index path -> rows kept per image
        for path in wanted:
            _, spec = dataset_spec(path)
            if spec.collate is None:
                continue
            self.collate[path] = spec.collate
            self.pixels[path] = spec.pixels or 0
            if is_ragged(spec.rows):
                index = cache.index_of(path)
                self.ragged.setdefault(index, []).append(path)
                self.limit[index] = cuts.get(dataset_spec(index)[1].cut_by)
            elif spec.rows == "text":
                self.text_paths.append(path)
            elif spec.rows == "image":
                self.image_paths.append(path)
            else:
                raise ValueError(f"VisualBatcher cannot batch {path} (rows {spec.rows!r})")
        self.row_shapes = {p: self._row_shape(p) for p in self.collate}
        status = np.asarray(cache.status)
        usable = (STATUS_OK, STATUS_PLACEHOLDER) if use_placeholders else (STATUS_OK,)
        self.image_ok = np.isin(status, usable)  # (N,) read once at open, pickles small

    @property
    def object_paths(self) -> list[str]:
        return [p for paths in self.ragged.values() for p in paths]

    def _row_shape(self, path: str) -> tuple:
        if self.collate[path] in ("jpeg",):
            return (self.pixels[path], self.pixels[path], 3)
        return tuple(self.cache.row_shape(path))

    def _empty(self, path: str, lead: tuple) -> np.ndarray:
        dtype = np.uint8 if self.collate[path] in ("jpeg", "pixels") else np.float32
        return np.zeros((*lead, *self.row_shapes[path]), dtype=dtype)

    def _convert(self, path: str, value) -> np.ndarray:
        if self.collate[path] == "jpeg":
            if isinstance(value, (bytes, bytearray)):
                return decode_pixels(value, self.pixels[path])
            return (
                np.stack([decode_pixels(v, self.pixels[path]) for v in value])
                if len(value)
                else self._empty(path, (0,))
            )
        return np.asarray(value)

    def __call__(self, image_rows: list[int | None]) -> dict:
        batch_size = len(image_rows)
        ok = np.array([row is not None and row >= 0 and self.image_ok[row] for row in image_rows], dtype=bool)
        visual: dict = {IMAGE_OK: torch.from_numpy(ok)}
        for path in self.image_paths:
            out = self._empty(path, (batch_size,))  # (B, ...)
            for b in np.flatnonzero(ok):
                out[b] = self._convert(path, self.cache.read(path, image_rows[b]))
            visual[path] = torch.from_numpy(out)
        for path in self.text_paths:
            texts = [self.cache.read(path, image_rows[b]) if ok[b] else "" for b in range(batch_size)]
            if self.tokenizer is None:
                visual[path] = texts
            else:
                encoded = self.tokenizer(
                    texts, padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
                )
                visual[f"{path}/input_ids"] = encoded["input_ids"]  # (B, L)
                visual[f"{path}/attention_mask"] = encoded["attention_mask"]  # (B, L)
        for index, paths in self.ragged.items():
            visual.update(self._ragged(index, paths, image_rows, ok))
        return visual

    def _ragged(self, index: str, paths: list[str], image_rows, ok) -> dict[str, torch.Tensor]:
        batch_size, limit = len(image_rows), self.limit[index]
        counts = np.zeros(batch_size, dtype=np.int64)
        for b in np.flatnonzero(ok):
            counts[b] = min(self.cache.count(index, image_rows[b]), limit or np.iinfo(np.int64).max)
        num_slots = max(1, int(counts.max(initial=0)))
        out = {mask_key(index): torch.from_numpy(np.arange(num_slots)[None, :] < counts[:, None])}  # (B, K)
        for path in paths:
            padded = self._empty(path, (batch_size, num_slots))  # (B, K, ...)
            for b in np.flatnonzero(counts):
                rows = self.cache.read(path, image_rows[b])[: counts[b]]  # (k_b, ...)
                padded[b, : counts[b]] = self._convert(path, rows)
            out[path] = torch.from_numpy(padded)
        return out
