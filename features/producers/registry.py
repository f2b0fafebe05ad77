"""Producers: one per feature group spec, registered by the spec's name, called by the generic loop in
``features/run/extract.py``.

A producer turns one chunk of images into the rows of one **instance** of its group
(``objects/fasterrcnn``, ``crops/maskrcnn/clip/ViT-B-16``). The loop owns everything else: decoding,
placeholders, resume, shards, the lock, assembly and the provenance common to all groups. What a
producer's rows look like (row kinds, dtypes, shapes, which index slices them) comes from its group's
``GroupSpec`` alone; the producer only says what it reads and the values of the spec's symbolic dims.

Adding a group = a spec (``mner.pipeline.cache.register_group``) + a producer class registered with
``@register_producer(spec)`` (tests/test_throwaway_group.py does both from a test). The contract:

- ``__init__(run, group, **slots)``: ``run`` is the extraction (``run.opts``, ``run.stages``,
  ``run.dataset``, ``run.cache`` (None for a new cache), ``run.shared_model(key, build)``), ``group``
  the instance path, ``slots`` its slot values (``detector="maskrcnn"``). Builds nothing heavy.
- ``reads``: dataset paths of other groups it needs per image (``objects/maskrcnn/boxes``): taken from
  this run's chunk when that group is computed now, from the cache otherwise. The plan adds the groups
  they belong to.
- ``needs_pixels`` / ``pixels`` ("pil": ``batch.images``; "tensors": ``batch.decoded``, resized in the
  loader's workers for what ``pixel_inputs()`` asks); ``every_image``: rows that do not depend on the
  picture (user files) are produced for every image whatever its status; ``input_fingerprint``: a hash
  of such input files (part of the resume key).
- ``load()``: build models (once, only when the run has rows to compute); ``dims()``: the values of the
  spec's symbolic dims (known after ``load``); ``row_datasets()``: the per-chunk datasets it makes (default:
  every row dataset of the spec).
- ``produce(batch) -> {dataset: rows}`` for ``batch``'s usable images; a group that owns a ragged index
  (its spec declares an ``index`` dataset) also returns ``counts`` (n,) per image. ``batch.shared`` is one
  dict for all producers of a chunk (decoded crops, device tensors).
- ``global_datasets()``, ``attrs()``, ``provenance()`` (model, pretrained, preprocessing, thresholds and
  its spec's provenance fields; ``stands_for`` {slot: real model} for tiny test variants).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mner.pipeline.cache.groups import CLIP, CLIP_CROPS, OBJECTS, PROMPT_CROPS, PROMPTS, RESNET, RESNET_CROPS, SWIN
from mner.pipeline.cache.specs import GroupSpec, get_group


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
    images: list  # RGB PIL images (``needs_pixels`` with pixels "pil"), else Nones
    scales: list[float]  # original pixels per loaded pixel (boxes are stored in original pixels)
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)  # ``reads`` path -> value per image
    shared: dict = field(default_factory=dict)  # scratch shared by all producers of one chunk (same images)
    decoded: list | None = None  # loader.DecodedImage per image (producers with pixels = "tensors")

    def __len__(self) -> int:
        return len(self.image_ids)


class Producer:
    spec: GroupSpec  # set by @register_producer
    reads: tuple[str, ...] = ()
    needs_pixels = True
    every_image = False  # rows that do not depend on the picture (user files): produced for every image
    input_fingerprint: str | None = None  # hash of the producer's own input files: part of the resume key
    pixels = "pil"  # "pil": batch.images | "tensors": batch.decoded (resized in the loader's workers)

    def __init__(self, run, group: str, **slots: str):
        self.run, self.group, self.slots = run, group, slots

    def pixel_inputs(self) -> dict:
        """What the loader's workers must prepare: {"detector": ResizeSpec} and/or {"encoder": InputSpec}."""
        return {}

    def load(self) -> None:
        """Build the models (only called when there is something to compute)."""

    def dims(self) -> dict[str, int]:
        return {}

    def row_datasets(self) -> list[str]:
        return [d.name for d in self.spec.datasets if d.rows not in ("index", "global")]

    def produce(self, batch: ChunkBatch) -> dict[str, np.ndarray | list[bytes]]:
        raise NotImplementedError

    def global_datasets(self) -> dict[str, np.ndarray | list]:
        return {}

    def attrs(self) -> dict:
        return {}

    def provenance(self) -> dict:
        raise NotImplementedError

    # derived from the spec -------------------------------------------------------------------------
    @property
    def owned_index(self) -> str | None:
        """The index dataset this group defines (``objects/maskrcnn/offsets``), if any."""
        own = next((d for d in self.spec.datasets if d.rows == "index"), None)
        return f"{self.group}/{own.name}" if own else None

    def row_shape(self, key: str) -> tuple:
        dims = self.dims()
        return tuple(dims[d] if isinstance(d, str) else d for d in self.spec.dataset(key).shape)


PRODUCERS: dict[str, type[Producer]] = {}


def register_producer(spec: GroupSpec):
    """Register the producer of every instance of ``spec`` (keyed by the spec's name)."""
    def decorator(cls: type[Producer]) -> type[Producer]:
        cls.spec = spec
        PRODUCERS[spec.name] = cls
        return cls
    return decorator


def unregister_producer(spec: GroupSpec) -> None:
    PRODUCERS.pop(spec.name, None)


def producer_for(run, group: str) -> Producer:
    """The producer of one group instance (``objects/fasterrcnn``), from the registry."""
    import mner.features.producers.grounding_captions  # noqa: F401  (registers grounding, clip_grounding, captions)

    spec = get_group(group)
    cls = PRODUCERS.get(spec.name)
    if cls is None:
        raise ValueError(f"no producer is registered for {spec.name} (needed for {group}); registered: "
                         f"{', '.join(sorted(PRODUCERS))}")
    slots = spec.matches(group) or {}
    if spec is OBJECTS and slots.get("detector") in imported_names(run):  # --import-objects NAME=FILE
        from mner.features.producers.imported_objects import imported_objects_class

        cls = imported_objects_class()
    return cls(run, group, **slots)


def imported_names(run) -> set[str]:
    opts = getattr(run, "opts", None)
    return set(opts.imported_objects()) if hasattr(opts, "imported_objects") else set()


def tiny_stands_for(model: str) -> str | None:
    """The real model a ``<name>-test`` variant stands for (``maskrcnn-test`` -> ``maskrcnn``)."""
    if model == "clip-test":
        return "ViT-B-32"
    if model == "swin-test":
        from mner.pipeline.stage1 import ESPVR

        return ESPVR.slots["swin_model"]
    return model[: -len("-test")] if model.endswith("-test") else None


def stands_for(slots: dict[str, str]) -> dict:
    """``{"stands_for": {slot: real model}}`` for the tiny test variants among ``slots`` (else {})."""
    found = {slot: real for slot, value in slots.items() if (real := tiny_stands_for(value))}
    return {"stands_for": found} if found else {}


# --------------------------------------------------------------------------------------------- objects


@register_producer(OBJECTS)
class ObjectsProducer(Producer):
    """Detector boxes, scores, classes, and each object's crop as JPEG (encoded by the background writer).

    Detection runs batched on the device (``stages.ImageStages.detect``); the crops the encoders read
    are cut from the decoded image at these boxes, on the device, not from the stored JPEG."""

    pixels = "tensors"

    def __init__(self, run, group: str, *, detector: str):
        super().__init__(run, group, detector=detector)
        self.detector_name, self.detector = detector, None

    def load(self) -> None:
        from mner.features.run.plan import build_detector

        self.detector = self.run.shared_model(("detector", self.detector_name),
                                              lambda: build_detector(self.run.opts, self.detector_name))

    def pixel_inputs(self) -> dict:
        return {"detector": self.detector.resize_spec}

    def produce(self, batch):
        stages, opts = self.run.stages, self.run.opts
        found = stages.detect(self.detector, batch.decoded)  # boxes in decoded-image pixels
        jpegs = stages.jpeg_crops(batch.decoded, [f[0] for f in found], max_side=opts.crop_max_side,
                                  quality=opts.crop_quality)
        batch.shared[("boxes", self.group)] = [f[0] for f in found]  # decoded pixels, for the crop encoders
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
        opts = self.run.opts
        fields = dict(self.detector.provenance_fields(), detector=self.detector_name, **stands_for(self.slots))
        fields["crops"] = {"format": "JPEG", "max_side": opts.crop_max_side, "quality": opts.crop_quality}
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


def encoder_key(family: str, model: str) -> tuple[str, str]:
    """The registered encoder name and its model option for one instance (``("clip", "RN50")``)."""
    if family == "resnet":
        return model, ""  # resnet152 | resnet152-test
    if family == "swin" and model == "swin-test":
        return "swin-test", ""
    return family, model


class EncoderProducer(Producer):
    """A registered image encoder's per-image arrays from the resized image (one instance per model)."""

    pixels = "tensors"
    family = ""  # "clip" | "resnet" | "swin"

    def __init__(self, run, group: str, **slots: str):
        super().__init__(run, group, **slots)
        self.model = next(iter(slots.values()))
        self.encoder = None

    def load(self) -> None:
        self.encoder = self.run.encoder(self.family, self.model)

    def pixel_inputs(self) -> dict:
        return {"encoder": self.encoder.image_input}

    def row_datasets(self) -> list[str]:
        return list(self.encoder.image_datasets)

    def dims(self) -> dict[str, int]:
        return self.run.encoder_dims(self.spec, self.encoder)

    def produce(self, batch):
        return self.run.stages.image_features(self.encoder, batch.decoded, batch.shared, self.group)

    def attrs(self) -> dict:
        return self.encoder.attrs() if set(self.spec.attrs) else {}

    def provenance(self) -> dict:
        name, model = encoder_key(self.family, self.model)
        options = {"clip_model": model, "clip_pretrained": self.run.opts.clip_pretrained} if self.family == "clip" \
            else {}
        return dict(self.encoder.provenance_fields(), encoder=name, **options, **stands_for(self.slots))


class CropEncoderProducer(EncoderProducer):
    """The same encoder over one detector's objects: crops cut on the device from the decoded image at the
    boxes (this run's or the cache's), shared by the encoders of the same crop size."""

    def __init__(self, run, group: str, *, detector: str, **slots: str):
        super().__init__(run, group, **slots)
        self.slots = {"detector": detector, **slots}
        self.detector = detector
        self.reads = (f"objects/{detector}/boxes",)

    def row_datasets(self) -> list[str]:
        return list(self.encoder.crop_datasets)

    def produce(self, batch):
        boxes = batch.shared.get(("boxes", f"objects/{self.detector}"))
        if boxes is None:  # objects from the cache: original -> decoded pixels
            boxes = [np.asarray(b, np.float32).reshape(-1, 4) / np.float32(scale)
                     for b, scale in zip(batch.inputs[self.reads[0]], batch.scales)]
        return self.run.stages.crop_features(self.encoder, batch.decoded, boxes, batch.shared, self.group,
                                             boxes_key=self.detector)

    def attrs(self) -> dict:
        return {}

    def provenance(self) -> dict:
        source = f"roi_align of the decoded image at objects/{self.detector}/boxes"
        return dict(super().provenance(), crop_source=source)


@register_producer(CLIP)
class ClipProducer(EncoderProducer):
    family = "clip"


@register_producer(CLIP_CROPS)
class ClipCropsProducer(CropEncoderProducer):
    family = "clip"


@register_producer(RESNET)
class ResNetProducer(EncoderProducer):
    family = "resnet"


@register_producer(RESNET_CROPS)
class ResNetCropsProducer(CropEncoderProducer):
    family = "resnet"


@register_producer(SWIN)
class SwinProducer(EncoderProducer):
    family = "swin"


# --------------------------------------------------------------------------------------------- prompts


class PromptText:
    """One prompt set's text embeddings by one CLIP instance, computed once per run (shared by the
    image-level and the crop-level groups)."""

    def __init__(self, run, clip_model: str, prompt_set: str):
        from mner.features.producers.prompts import load_prompt_set, prompt_features

        self.prompt_set = load_prompt_set(run.prompt_source(prompt_set))
        self.clip = run.encoder("clip", clip_model)
        self.logit_scale = float(run.clip_logit_scale(clip_model, self.clip))
        embed = self.clip.encode_text(self.prompt_set.texts)  # (Q, D)
        empty = np.zeros((0, embed.shape[1]), np.float32)
        self.globals = prompt_features(self.prompt_set, embed, empty, empty, self.logit_scale, np.zeros(0, bool))


@register_producer(PROMPTS)
class PromptsProducer(Producer):
    """A prompt set embedded by one CLIP instance, and each image's prompt relevance from its cached
    (float16) embedding: no pixels, one text forward per set."""

    needs_pixels = False

    def __init__(self, run, group: str, *, clip_model: str, prompt_set: str):
        super().__init__(run, group, clip_model=clip_model, prompt_set=prompt_set)
        self.reads = (f"encoders/clip/{clip_model}/image_embed",)
        self.text: PromptText | None = None

    def load(self) -> None:
        self.text = self.run.shared_model(("prompts", *self.slots.values()),
                                          lambda: PromptText(self.run, **self.slots))

    def dims(self) -> dict[str, int]:
        return {"Q": len(self.text.prompt_set.texts), "C": len(self.text.prompt_set.categories)}

    def produce(self, batch):
        from mner.features.producers.prompts import prompt_features

        text = self.text
        image_embed = np.stack(batch.inputs[self.reads[0]]).reshape(len(batch), -1)  # (n, D)
        empty = np.zeros((0, image_embed.shape[1]), np.float32)
        arrays = prompt_features(text.prompt_set, text.globals["prompt_embed"].astype(np.float32), image_embed,
                                 empty, text.logit_scale, np.ones(len(batch), bool))
        return {"image_relevance": arrays["image_relevance"]}

    def global_datasets(self):
        text = self.text
        return {"prompt_text": text.prompt_set.texts, "prompt_category": text.prompt_set.prompt_category,
                "prompt_embed": text.globals["prompt_embed"], "centroids": text.globals["centroids"]}

    def attrs(self) -> dict:
        return {"category_names": self.text.prompt_set.category_names, "logit_scale": self.text.logit_scale}

    def provenance(self) -> dict:
        text, prompt_set = self.text, self.text.prompt_set
        return {"model": text.clip.model_name, "pretrained": text.clip.pretrained(),
                "preprocessing": {"template": prompt_set.template, "normalise": "unit length before cos"},
                "thresholds": {"logit_scale": text.logit_scale}, "prompt_set": prompt_set.name,
                "description": prompt_set.description, **stands_for({"clip_model": self.slots["clip_model"]}),
                "formulas": {"centroids": "mean of the category's prompt_embed (VCRMNER eq. 2)",
                             "image_relevance": "softmax_i(logit_scale * cos(prompt_embed_i, image_embed)) "
                                                "(PromptMNER eq. 1); 0 for images without features"}}


@register_producer(PROMPT_CROPS)
class PromptCropsProducer(PromptsProducer):
    """A prompt set's weights of one detector's crops, from their cached CLIP embeddings."""

    def __init__(self, run, group: str, *, detector: str, clip_model: str, prompt_set: str):
        Producer.__init__(self, run, group, clip_model=clip_model, prompt_set=prompt_set)
        self.slots = {"clip_model": clip_model, "prompt_set": prompt_set}
        self.detector = detector
        self.reads = (f"crops/{detector}/clip/{clip_model}/crop_embed",)
        self.text = None

    def dims(self) -> dict[str, int]:
        return {"C": len(self.text.prompt_set.categories)}

    def produce(self, batch):
        from mner.features.producers.prompts import prompt_features

        text = self.text
        crop_embed = np.concatenate([np.asarray(v).reshape(-1, text.globals["prompt_embed"].shape[1])
                                     for v in batch.inputs[self.reads[0]]])  # (m, D)
        empty = np.zeros((0, crop_embed.shape[1]), np.float32)
        arrays = prompt_features(text.prompt_set, text.globals["prompt_embed"].astype(np.float32), empty,
                                 crop_embed, text.logit_scale, np.zeros(0, bool))
        return {"crop_weights": arrays["crop_weights"]}

    def global_datasets(self):
        return {}

    def attrs(self) -> dict:
        return {}

    def provenance(self) -> dict:
        fields = super().provenance()
        fields["formulas"] = {"crop_weights": "softmax_j(logit_scale * cos(crop_embed_i, centroid_j)) (VCRMNER eq. "
                                              f"4-5), centroids of prompts/{self.slots['clip_model']}/"
                                              f"{self.slots['prompt_set']}"}
        fields.update(stands_for({"detector": self.detector, "clip_model": self.slots["clip_model"]}))
        return fields


ModelBuilder = Callable[[], object]
