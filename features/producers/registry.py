"""Producers: one per feature group, called by the generic chunked loop in ``extract.py``.

A producer turns one chunk of images into the rows of its group. The loop owns everything else:
decoding, placeholders, resume, shards, the lock, streaming assembly and provenance common to all
groups. Adding a group (grounding crops, captions, ...) is its spec plus one producer class here or
in its own module, registered with ``@register_producer``; nothing in the loop changes.

The contract, in the order the loop uses it:

- ``group``: the cache group written ("objects", "encoders/clip", "prompts/vcrmner").
- ``datasets() -> {key: Layout}``: what ``produce`` returns per chunk: row kind ("image" or a ragged
  kind such as "object"), dtype and per-row shape; ``Layout.ragged_bytes`` for a list of bytes per row.
- ``owns``: the ragged row kind whose per-image counts this producer decides ("object" for the
  detector; grounding crops would own "grounding"); its ``produce`` returns ``counts`` (n,) int64.
- ``reads``: datasets of other groups it needs, per image (e.g. "encoders/clip/image_embed"): taken
  from this run's chunk when the group is computed now, from the cache otherwise.
- ``needs_pixels`` / ``needs_crops``: whether the chunk must carry decoded images / object crops.
- ``every_image``: rows that do not depend on the picture (a user's crop or caption files) are
  produced for every image of the chunk, whatever its status, with no placeholder copying;
  ``input_fingerprint``: a hash of such input files, part of the chunk files' resume key.
- ``pixels``: "pil" (``batch.images`` are PIL images) or "tensors" (``batch.decoded`` are the loader's
  uint8 tensors, already resized in its workers for the inputs ``pixel_inputs()`` asks for).
- ``load()``: build models; called once, only when the run has rows to compute.
- ``produce(batch) -> {key: array or list[bytes]}``: rows for ``batch``'s images, which are all
  usable (ok, or the one placeholder image: the loop computes placeholders once and copies them).
  ``batch.shared`` is one dict for all producers of a chunk: what one computes for the same images
  (decoded crops, device tensors, a crop bank) the next one reuses.
- ``global_datasets()``, ``attrs()``, ``provenance()``: written once when the group is assembled.
  ``provenance()`` returns model, pretrained (tag | "sha256:..." | "random"), preprocessing,
  thresholds and any extra fields.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Layout:
    """One dataset a producer returns per chunk."""

    rows: str  # "image" or a ragged kind ("object", "grounding")
    dtype: str = "float16"  # stored dtype ("float16" features, "float32" boxes, "int32" class ids)
    shape: tuple = ()  # per-row shape
    ragged_bytes: bool = False  # a list of bytes per row (JPEG crops), stored flat + offsets


def inside(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """xyxy boxes in original pixels clipped to the image (width, height): a downscaled 60000x1 image's
    one-pixel rows must not map back to y = 29 (no size known: unchanged)."""
    width, height = size
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if width <= 0 or height <= 0:
        return boxes
    return np.clip(boxes, 0, np.array([width, height, width, height], np.float32))


@dataclass
class ChunkBatch:
    """The images one ``produce`` call sees (a sub-list of a chunk, or the placeholder image alone)."""

    image_ids: list[str]
    images: list  # RGB PIL images (``needs_pixels``), else Nones
    scales: list[float]  # original pixels per loaded pixel (boxes are stored in original pixels)
    crops: list[list[bytes]] | None = None  # JPEG crops per image (``needs_crops``)
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # ``reads`` path -> value per image
    shared: dict = field(default_factory=dict)  # scratch shared by all producers of one chunk (same images)
    decoded: list | None = None  # loader.DecodedImage per image (producers with pixels = "tensors")

    def __len__(self) -> int:
        return len(self.image_ids)


class Producer:
    group = ""
    owns: str | None = None
    reads: tuple[str, ...] = ()
    needs_pixels = True
    needs_crops = False
    every_image = False  # rows that do not depend on the picture (user files): produced for every image
    input_fingerprint: str | None = None  # hash of the producer's own input files: part of the resume key
    pixels = "pil"  # "pil": batch.images | "tensors": batch.decoded (resized in the loader's workers)

    def pixel_inputs(self) -> dict:
        """What the loader's workers must prepare: {"detector": ResizeSpec} and/or {"encoder": InputSpec}."""
        return {}

    def datasets(self) -> dict[str, Layout]:
        raise NotImplementedError

    def load(self) -> None:
        """Build the models (only called when there is something to compute)."""

    def produce(self, batch: ChunkBatch) -> dict[str, np.ndarray | list[bytes]]:
        raise NotImplementedError

    def global_datasets(self) -> dict[str, tuple[np.ndarray | list, str]]:
        return {}

    def attrs(self) -> dict:
        return {}

    def provenance(self) -> dict:
        raise NotImplementedError


def check_layouts(producer: Producer) -> None:
    """A producer's layouts must agree with its group's declared spec (checked before any chunk runs)."""
    from mner.pipeline.cache import get_group

    spec = get_group(producer.group)
    layouts = producer.datasets()
    for key, layout in layouts.items():
        declared = spec.dataset(key)
        if (declared.per_image_kind, declared.dtype, declared.ragged_values) != \
                (layout.rows, layout.dtype, layout.ragged_bytes):
            raise ValueError(f"producer of {producer.group}/{key}: rows {layout.rows}, dtype {layout.dtype}, "
                             f"ragged {layout.ragged_bytes} disagree with the declared spec ({declared.rows}, "
                             f"{declared.dtype}, encoding {declared.encoding})")
    missing = [d.name for d in spec.datasets if d.required and d.rows not in ("global", "index")
               and d.name not in layouts and d.name not in producer.global_datasets()]
    if missing:
        raise ValueError(f"producer of {producer.group} makes no {', '.join(missing)}, which its spec requires")


PRODUCERS: dict[str, Callable[..., Producer]] = {}


def register_producer(kind: str):
    """``kind`` is the group root a producer class serves ("objects", "encoders", "prompts", ...)."""
    def decorator(cls):
        PRODUCERS[kind] = cls
        return cls
    return decorator


# --------------------------------------------------------------------------------------------- objects


@register_producer("objects")
class ObjectsProducer(Producer):
    """Detector boxes, scores, classes, and each object's crop as JPEG (encoded by the background writer).

    Detection runs batched on the device (``stages.ImageStages.detect``); the crops the encoders read
    are cut from the decoded image at these boxes, on the device, not from the stored JPEG."""

    group = "objects"
    owns = "object"
    pixels = "tensors"

    def __init__(self, build_detector: Callable, *, stages, crop_max_side: int, crop_quality: int, extra: dict):
        self._build, self.extra = build_detector, extra
        self.crop_max_side, self.crop_quality = crop_max_side, crop_quality
        self.stages = stages
        self.detector = None

    def datasets(self) -> dict[str, Layout]:
        return {"boxes": Layout("object", "float32", (4,)), "scores": Layout("object", "float32"),
                "class_ids": Layout("object", "int32"), "crop_jpeg": Layout("object", "uint8", ragged_bytes=True)}

    def load(self) -> None:
        self.detector = self._build()

    def pixel_inputs(self) -> dict:
        return {"detector": self.detector.resize_spec}

    def produce(self, batch):
        found = self.stages.detect(self.detector, batch.decoded)  # boxes in decoded-image pixels
        jpegs = self.stages.jpeg_crops(batch.decoded, [f[0] for f in found], max_side=self.crop_max_side,
                                       quality=self.crop_quality)
        sizes = [(d.width, d.height) for d in batch.decoded] if batch.decoded else [(0, 0)] * len(found)
        return {"counts": np.array([len(f[1]) for f in found], np.int64),
                "boxes": np.concatenate([inside(f[0] * np.float32(scale), size)
                                         for f, scale, size in zip(found, batch.scales, sizes)]
                                        ).reshape(-1, 4).astype(np.float32),
                "scores": np.concatenate([f[1] for f in found]).astype(np.float32),
                "class_ids": np.concatenate([f[2] for f in found]).astype(np.int32),
                "crop_jpeg": [PendingCrop(future, j) for future, f in zip(jpegs, found) for j in range(len(f[1]))]}

    def attrs(self) -> dict:
        return {"class_names": list(self.detector.class_names)}

    def provenance(self) -> dict:
        fields = dict(self.detector.provenance_fields())
        fields.update(self.extra, crops={"format": "JPEG", "max_side": self.crop_max_side,
                                         "quality": self.crop_quality})
        return fields


class PendingCrop:
    """Crop ``index`` of an image whose JPEG crops the background writer is still encoding."""

    __slots__ = ("future", "index")

    def __init__(self, future, index: int):
        self.future, self.index = future, index

    def result(self) -> bytes:
        return self.future.result()[self.index]


def resolved(values: list) -> list[bytes]:
    """Ragged bytes with any PendingCrop replaced by its bytes (waits for the writer)."""
    return [v.result() if isinstance(v, PendingCrop) else v for v in values]


# -------------------------------------------------------------------------------------------- encoders


@register_producer("encoders")
class EncoderProducer(Producer):
    """A registered image encoder: per-image arrays from the resized image, per-object arrays from crops
    cut on the device at the objects' boxes (this run's or the cache's), shared with same-size encoders."""

    pixels = "tensors"

    def __init__(self, name: str, build_encoder: Callable, *, stages, batch_size: int, options: dict | None = None):
        self.group, self.name, self._build, self.batch_size = f"encoders/{name}", name, build_encoder, batch_size
        self.stages = stages
        self.encoder = None
        self.options = options or {}  # the options that select the model (recorded: a later run can match them)

    def load(self) -> None:
        self.encoder = self._build()
        self.reads = ("objects/boxes",) if self.encoder.crop_datasets else ()

    def pixel_inputs(self) -> dict:
        return {"encoder": self.encoder.image_input}

    def datasets(self) -> dict[str, Layout]:
        encoder = self.encoder
        out = {key: Layout("image", "float16", tuple(shape)) for key, shape in encoder.image_datasets.items()}
        out |= {key: Layout("object", "float16", tuple(shape)) for key, shape in encoder.crop_datasets.items()}
        return out

    def produce(self, batch):
        arrays = self.stages.image_features(self.encoder, batch.decoded, batch.shared, self.name)
        if self.encoder.crop_datasets:
            boxes = [np.asarray(b, np.float32).reshape(-1, 4) / np.float32(scale)  # original -> decoded pixels
                     for b, scale in zip(batch.inputs["objects/boxes"], batch.scales)]
            arrays |= self.stages.crop_features(self.encoder, batch.decoded, boxes, batch.shared, self.name)
        return arrays

    def attrs(self) -> dict:
        return self.encoder.attrs()

    def provenance(self) -> dict:
        return dict(self.encoder.provenance_fields(), encoder=self.name,
                    crop_source="roi_align of the decoded image at objects/boxes", **self.options)


# --------------------------------------------------------------------------------------------- prompts


@register_producer("prompts")
class PromptsProducer(Producer):
    """CLIP prompt sets from the cached (float16) CLIP embeddings: no pixels, one text forward per set."""

    needs_pixels = False
    reads = ("encoders/clip/image_embed", "encoders/clip/crop_embed")

    def __init__(self, prompt_set, clip_encoder: Callable, logit_scale: Callable[[], float]):
        self.prompt_set, self.group = prompt_set, f"prompts/{prompt_set.name}"
        self._clip, self._logit_scale = clip_encoder, logit_scale
        self.prompt_embed = None

    def datasets(self) -> dict[str, Layout]:
        count = len(self.prompt_set.categories)
        return {"crop_weights": Layout("object", "float16", (count,)),
                "image_relevance": Layout("image", "float16", (len(self.prompt_set.texts),))}

    def load(self) -> None:
        from mner.features.producers.prompts import prompt_features

        self.clip, self.logit_scale = self._clip(), float(self._logit_scale())
        embed = self.clip.encode_text(self.prompt_set.texts)  # (Q, D)
        empty = np.zeros((0, embed.shape[1]), np.float32)
        self.globals = prompt_features(self.prompt_set, embed, empty, empty, self.logit_scale, np.zeros(0, bool))

    def produce(self, batch):
        from mner.features.producers.prompts import prompt_features

        image_embed = np.stack(batch.inputs["encoders/clip/image_embed"])  # (n, D)
        crop_embed = np.concatenate(batch.inputs["encoders/clip/crop_embed"])  # (m, D)
        arrays = prompt_features(self.prompt_set, self.globals["prompt_embed"].astype(np.float32), image_embed,
                                 crop_embed, self.logit_scale, np.ones(len(batch), bool))
        return {"crop_weights": arrays["crop_weights"], "image_relevance": arrays["image_relevance"]}

    def global_datasets(self):
        return {"prompt_text": (self.prompt_set.texts, "global"),
                "prompt_category": (self.prompt_set.prompt_category, "global"),
                "prompt_embed": (self.globals["prompt_embed"], "global"),
                "centroids": (self.globals["centroids"], "global")}

    def attrs(self) -> dict:
        return {"category_names": self.prompt_set.category_names, "logit_scale": self.logit_scale}

    def provenance(self) -> dict:
        prompt_set = self.prompt_set
        return {"model": self.clip.model_name, "pretrained": self.clip.pretrained(),
                "preprocessing": {"template": prompt_set.template, "normalise": "unit length before cos"},
                "thresholds": {"logit_scale": self.logit_scale}, "prompt_set": prompt_set.name,
                "description": prompt_set.description,
                "formulas": {"centroids": "mean of the category's prompt_embed (VCRMNER eq. 2)",
                             "crop_weights": "softmax_j(logit_scale * cos(crop_embed_i, centroid_j)) (VCRMNER eq. 4-5)",
                             "image_relevance": "softmax_i(logit_scale * cos(prompt_embed_i, image_embed)) "
                                                "(PromptMNER eq. 1); 0 for images without features"}}
