"""A user's own candidate boxes (``--import-objects NAME=FILE``): per-image boxes, scores, optional class names and
features from a JSON or NPZ file, checked before anything is written (each problem names the file, the
image id and the field).

Lets a GMNER model train on the same candidates as a published system (e.g. the VinVL boxes the
Twitter-GMNER code expects) instead of re-running a detector.

- JSON: ``{"<image id>": {"boxes": [[x1, y1, x2, y2], ...], "scores": [...], "class_names": [...],
  "features": [[...], ...]}, ...}``; ``class_names`` and ``features`` are optional.
- NPZ: arrays named ``<image id>/boxes``, ``<image id>/scores`` and optionally ``<image id>/class_names``
  (strings) and ``<image id>/features`` (``np.savez(path, **{"71044/boxes": ..., ...})``).

Boxes are xyxy in the original image's pixels. An image may have zero boxes; every image that lists
features must list them with the same width. The file's sha256 goes into the group's provenance.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mner.pipeline.data import DataFormatError, read_json

FIELDS = ("boxes", "scores", "class_names", "features")


@dataclass
class ImportedObjects:
    path: str
    sha256: str
    boxes: dict[str, np.ndarray]  # image id -> (k, 4) float32, sorted by descending score
    scores: dict[str, np.ndarray]  # image id -> (k,) float32
    class_names: dict[str, list[str]] | None  # None when the file gives none
    features: dict[str, np.ndarray] | None  # image id -> (k, D) float32; None when the file gives none
    unknown_ids: list[str] = field(default_factory=list)  # ids that are no image of the cache (skipped)

    @property
    def feature_width(self) -> int | None:
        if not self.features:
            return None
        return int(next(iter(self.features.values())).shape[1])


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _read_entries(path: Path) -> dict[str, dict]:
    if path.suffix == ".json":
        raw = read_json(path, '{"<image id>": {"boxes": [[x1, y1, x2, y2]], "scores": [0.9]}, ...}')
        if not isinstance(raw, dict):
            raise DataFormatError(path, None, "the top level is not an object keyed by image id",
                                  'write {"<image id>": {"boxes": [...], "scores": [...]}, ...}')
        return {str(k): v for k, v in raw.items()}
    if path.suffix == ".npz":
        entries: dict[str, dict] = {}
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                image_id, _, name = key.rpartition("/")
                if not image_id or name not in FIELDS:
                    raise DataFormatError(path, None, f"array {key!r} is not <image id>/<field>",
                                          f"name arrays <image id>/{{{', '.join(FIELDS)}}}")
                entries.setdefault(image_id, {})[name] = archive[key]
        return entries
    raise DataFormatError(path, None, f"unknown suffix {path.suffix!r}", "give a .json or .npz file")


def _entry(path: Path, image_id: str, entry) -> tuple[np.ndarray, np.ndarray, list[str] | None, np.ndarray | None]:
    def fail(problem: str, fix: str):
        raise DataFormatError(path, None, f"image {image_id!r}: {problem}", fix)

    if not isinstance(entry, dict) or "boxes" not in entry or "scores" not in entry:
        fail("needs boxes and scores", 'give {"boxes": [[x1, y1, x2, y2], ...], "scores": [...]}')
    unknown = sorted(set(entry) - set(FIELDS))
    if unknown:
        fail(f"unknown fields {unknown}", f"valid fields: {', '.join(FIELDS)}")
    try:
        boxes = np.asarray(entry["boxes"], dtype=np.float64).reshape(-1, 4) if len(entry["boxes"]) else \
            np.zeros((0, 4))
        scores = np.asarray(entry["scores"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        fail("boxes must be a list of [x1, y1, x2, y2] numbers and scores a list of numbers", "fix the entry")
    if len(boxes) != len(scores):
        fail(f"{len(boxes)} boxes but {len(scores)} scores", "give one score per box")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        fail("boxes or scores hold NaN or infinity", "write finite pixel coordinates and scores")
    bad = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if len(bad):
        fail(f"box {int(bad[0])} {boxes[bad[0]].tolist()} is empty (x2 <= x1 or y2 <= y1)",
             "boxes are xyxy in pixels: [x1, y1, x2, y2] with x2 > x1, y2 > y1")
    names = None
    if "class_names" in entry:
        names = [str(n) for n in np.asarray(entry["class_names"]).reshape(-1).tolist()]
        if len(names) != len(boxes):
            fail(f"{len(names)} class names for {len(boxes)} boxes", "give one class name per box")
    features = None
    if "features" in entry:
        features = np.asarray(entry["features"], dtype=np.float32)
        if len(boxes) == 0 and features.size == 0:
            features = features.reshape(0, features.shape[-1] if features.ndim == 2 else 0)  # width set later
        if features.ndim != 2 or len(features) != len(boxes):
            fail(f"features of shape {features.shape} for {len(boxes)} boxes", "give one feature vector per box (k, D)")
        if not np.isfinite(features).all():
            fail("features hold NaN or infinity", "write finite numbers")
    order = np.argsort(-scores, kind="stable")  # stored objects are in descending score, like a detector's
    return (boxes[order].astype(np.float32), scores[order].astype(np.float32),
            [names[i] for i in order] if names is not None else None,
            features[order] if features is not None else None)


def load_objects_file(path: str | Path, image_ids) -> ImportedObjects:
    """Read and check the whole file; ids not in ``image_ids`` are listed in ``unknown_ids`` and skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, None, "file not found", "check the --import-objects NAME=FILE path")
    entries = _read_entries(path)
    known = set(image_ids)
    result = ImportedObjects(str(path.resolve()), _file_sha256(path), {}, {}, None, None)
    with_names = with_features = 0
    widths: dict[int, str] = {}
    for image_id, entry in entries.items():
        if image_id not in known:
            result.unknown_ids.append(image_id)
            continue
        boxes, scores, names, features = _entry(path, image_id, entry)
        result.boxes[image_id], result.scores[image_id] = boxes, scores
        if names is not None:
            result.class_names = result.class_names or {}
            result.class_names[image_id] = names
            with_names += 1
        if features is not None:
            result.features = result.features or {}
            result.features[image_id] = features
            with_features += 1
            if len(features):
                widths.setdefault(features.shape[1], image_id)
    if len(widths) > 1:
        (w1, id1), (w2, id2) = list(widths.items())[:2]
        raise DataFormatError(path, None, f"features of width {w1} (image {id1!r}) and {w2} (image {id2!r})",
                              "give every image's features the same width")
    for what, count in (("class_names", with_names), ("features", with_features)):
        if count and count != len(result.boxes):
            raise DataFormatError(path, None, f"{what} given for {count} of {len(result.boxes)} images",
                                  f"give {what} for every image or for none")
    if result.features is not None and widths:  # zero-box images: features of the common width
        width = next(iter(widths))
        for image_id, features in result.features.items():
            if features.size == 0:
                result.features[image_id] = np.zeros((0, width), np.float32)
    return result


# ----------------------------------------------------------------------------- objects/<name> producer


def parse_import(value: str) -> tuple[str, str]:
    """``--import-objects NAME=FILE`` -> (NAME, FILE); NAME becomes the instance ``objects/NAME``."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path or "/" in name:
        raise ValueError(f"--import-objects {value!r}: must be NAME=FILE.json|FILE.npz (NAME: the objects "
                         "instance to write, objects/NAME; no '/')")
    return name, path


def imported_objects_class():
    """The producer of an ``objects/<name>`` instance read from a file (registered lazily: it subclasses the
    detector producer only to share its crop cutting, so it lives next to the reader)."""
    from mner.features.producers.registry import ObjectsProducer, PendingCrop, inside

    class ImportedObjectsProducer(ObjectsProducer):
        """Boxes, scores and class ids of ``objects/<name>`` from ``--import-objects NAME=FILE``; the crops
        are cut from the decoded images like a detector's, so encoders run on them. Images that are not ok
        get no candidates (as for a detector). Per-box ``features`` in the file are not stored (the objects
        group declares no feature dataset): provenance says so."""

        pixels = "tensors"

        def __init__(self, run, group: str, *, detector: str):
            super().__init__(run, group, detector=detector)
            # checked against all of --data's ids, not this shard's: every shard records the same provenance
            self.file = load_objects_file(run.opts.imported_objects()[detector], run.dataset.image_ids())
            self.input_fingerprint = self.file.sha256  # a changed file never resumes old chunks
            names = sorted({n for per_image in (self.file.class_names or {}).values() for n in per_image})
            self.class_names = names
            self.class_index = {n: i for i, n in enumerate(names)}

        def load(self) -> None:
            pass

        def pixel_inputs(self) -> dict:
            return {}

        def produce(self, batch):
            opts = self.run.opts
            sizes = [(d.width, d.height) for d in batch.decoded] if batch.decoded else [(0, 0)] * len(batch)
            original, found = [], []
            for image_id, size in zip(batch.image_ids, sizes):
                boxes = inside(self.file.boxes.get(image_id, np.zeros((0, 4), np.float32)), size)  # original px
                scores = self.file.scores.get(image_id, np.zeros(0, np.float32))
                names = (self.file.class_names or {}).get(image_id, [])
                ids = np.array([self.class_index[n] for n in names] if names else [-1] * len(scores), np.int32)
                original.append(boxes)
                found.append((boxes, scores, ids))
            decoded = [b / np.float32(s or 1.0) for b, s in zip(original, batch.scales)]  # decoded-image pixels
            jpegs = self.run.stages.jpeg_crops(batch.decoded, decoded, max_side=opts.crop_max_side,
                                               quality=opts.crop_quality)
            batch.shared[("boxes", self.group)] = decoded  # for the crop encoders
            return {"counts": np.array([len(f[1]) for f in found], np.int64),
                    "boxes": np.concatenate([np.zeros((0, 4), np.float32), *original]).astype(np.float32),
                    "scores": np.concatenate([np.zeros(0, np.float32), *(f[1] for f in found)]).astype(np.float32),
                    "class_ids": np.concatenate([np.zeros(0, np.int32), *(f[2] for f in found)]).astype(np.int32),
                    "crop_jpeg": [PendingCrop(future, j) for future, f in zip(jpegs, found)
                                  for j in range(len(f[1]))]}

        def attrs(self) -> dict:
            return {"class_names": list(self.class_names)}

        def provenance(self) -> dict:
            opts = self.run.opts
            width = self.file.feature_width
            return {"model": "imported", "pretrained": self.file.sha256, "detector": self.slots["detector"],
                    "imported_from": {"file": Path(self.file.path).name, "sha256": self.file.sha256,
                                      "images_in_file": len(self.file.boxes),
                                      "unknown_ids": len(self.file.unknown_ids),
                                      "features": "none in the file" if width is None else
                                      f"width {width} in the file, not stored (objects has no feature dataset)"},
                    "preprocessing": {"boxes": "xyxy in original pixels from the file, clipped to the image; "
                                               "images not ok get none",
                                      "class_ids": "index into attr class_names (-1: the file names no class)"},
                    "thresholds": {},
                    "crops": {"format": "JPEG", "max_side": opts.crop_max_side, "quality": opts.crop_quality}}

    return ImportedObjectsProducer
