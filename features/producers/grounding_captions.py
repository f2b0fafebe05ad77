"""Producers and planning of the groups MGIPS-CL and ESPVR read: ``grounding``, ``encoders/clip_grounding``,
``captions`` (their specs: mner.pipeline.cache.groups; the models: CONTRACT in docs/features.md).

The generic loop (``extract.py``) calls ``produce`` per chunk. Two rules differ from the image encoders:

- An image that is not ok gets **no** grounding crops and an empty caption from a model (reason
  ``no_image``): the gray placeholder has nothing to ground or describe, and a fake crop would look
  real to the model. The placeholder template rows are therefore empty.
- Rows that do not depend on the image (user crop files, user caption files, CLIP states over stored
  crops) are produced for **every** image, whatever its status (``every_image``): a user's crops and
  captions are kept even when the original picture is missing from ``--images``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mner.features.producers.captions import CAPTIONERS, CaptionConfig, create_captioner, is_caption_file
from mner.features.producers.captions import REASON_NAMES as CAPTION_REASONS
from mner.features.producers.grounding import (
    CROP_SIZE,
    FILL_RULES,
    GROUNDERS,
    QUERY_RULES,
    GroundingConfig,
    GroundingInput,
    GroundingRow,
    create_grounder,
    group_texts,
    stack_rows,
)
from mner.features.producers.grounding_clip import DEFAULT_LAYERS, ClipGroundingConfig, ClipGroundingStates
from mner.features.producers.registry import ChunkBatch, Producer, register_producer
from mner.features.run.images import LoadedImage
from mner.pipeline.cache.groups import CAPTIONS, CLIP_GROUNDING, GROUNDING

PLACEHOLDER_ID = "<placeholder>"  # the id the loop gives the gray image when it builds placeholder rows


@dataclass
class GroundingOptions:
    """``mner-features extract --grounding ...`` (None in ExtractOptions: no grounding group)."""

    method: str = "owlv2"  # owlv2 | detector | files
    model: str = "google/owlv2-base-patch16-ensemble"  # owlv2: hub name or local folder
    threshold: float = 0.1  # owlv2: query score cut
    fill: str = "objectness"  # owlv2: objectness | none
    queries: str = "spans"  # owlv2: spans | words
    maps: list[str] = field(default_factory=list)  # files: *_dict.pth / .json mappings
    crop_dirs: list[str] = field(default_factory=list)  # files: crop folders
    clip: bool = False  # also cache frozen CLIP states over the crops (encoders/clip_grounding)
    clip_model: str = "openai/clip-vit-base-patch32"
    clip_layers: tuple[int, ...] = DEFAULT_LAYERS
    detector: str = ""  # detector: the objects instance cropped ("": the first --detector, else the cache's)


@dataclass
class CaptionOptions:
    """``mner-features extract --captions ...`` (None in ExtractOptions: no captions group)."""

    source: str = "blip"  # blip | a .jsonl/.tsv file
    model: str = "Salesforce/blip-image-captioning-base"
    max_tokens: int = 30
    beams: int = 3
    prompt: str = ""


def grounding_options(method, model, threshold, fill, queries, maps, crop_dirs, clip, clip_model,
                      clip_layers: str) -> GroundingOptions | None:
    """The --grounding* flags as one value (None: no grounding group asked for)."""
    if method is None and not clip:
        if maps or crop_dirs:
            raise ValueError("--grounding-map / --grounding-crops-dir are read only with --grounding files")
        return None
    try:
        layers = tuple(int(part) for part in clip_layers.split(","))
    except ValueError:
        raise ValueError(f"--grounding-clip-layers {clip_layers!r}: expected comma-separated integers, e.g. 6,12") \
            from None
    return GroundingOptions(method=method or "", model=model, threshold=threshold, fill=fill, queries=queries,
                            maps=list(maps), crop_dirs=list(crop_dirs), clip=clip, clip_model=clip_model,
                            clip_layers=layers)


def caption_options(source, model, max_tokens, beams, prompt) -> CaptionOptions | None:
    """The --caption* flags as one value (None: no captions group asked for)."""
    if source is None:
        return None
    if max_tokens < 1 or beams < 1:
        raise ValueError(f"--caption-max-tokens {max_tokens} / --caption-beams {beams}: must be integers >= 1")
    return CaptionOptions(source=source, model=model, max_tokens=max_tokens, beams=beams, prompt=prompt)


def _as_loaded(batch: ChunkBatch, i: int) -> LoadedImage | None:
    if batch.images[i] is None:
        return None
    return LoadedImage(batch.image_ids[i], "ok", image=batch.images[i], scale=batch.scales[i])


@register_producer(GROUNDING)
class GroundingProducer(Producer):
    """Up to three grounding crops per image (--grounding owlv2 | detector | files)."""

    def __init__(self, run, group: str):
        from mner.features.run.extract import seed_random_init

        super().__init__(run, group)
        opts, grounding = run.opts, run.opts.grounding
        if grounding is None or not grounding.method:
            raise ValueError("grounding crops need --grounding owlv2 | detector | files (--grounding-clip encodes "
                             "grounding crops: add --grounding owlv2 | detector | files)")
        check_grounding_options(grounding)
        self.method = grounding.method
        detector = run.first_detector() if self.method == "detector" else None
        self.config = GroundingConfig(
            model=grounding.model, random_init=opts.random_init, threshold=grounding.threshold, fill=grounding.fill,
            query_rule=grounding.queries, maps=list(grounding.maps), crop_dirs=list(grounding.crop_dirs),
            batch_size=opts.batch_size, device=opts.device, detector_model=detector or "")
        self.texts = group_texts(run.dataset)
        self.needs_pixels = GROUNDERS[self.method].needs_image
        self.every_image = not self.needs_pixels
        self.reads = (f"objects/{detector}/boxes", f"objects/{detector}/scores") if detector else ()
        if self.method == "files":
            files = create_grounder("files", self.config)
            # every mapping problem fails here; checked against all of --data's ids, not this shard's,
            # so every shard records the same provenance (merge compares it)
            files.bind(run.dataset.image_ids())
            self.input_fingerprint = files.mapping.crops_sha256  # changed crop files never resume old chunks
            self._build = lambda: files
        else:
            def build():
                seed_random_init("grounding", opts.random_init)
                return create_grounder(self.method, self.config)
            self._build = build
        self.grounder = None

    def load(self) -> None:
        self.grounder = self._build()

    def produce(self, batch: ChunkBatch) -> dict:
        items, placeholder = [], []
        for i, image_id in enumerate(batch.image_ids):
            detections = None
            if self.reads:  # detector boxes are stored in original pixels; crops are cut from the loaded image
                scale = np.float32(batch.scales[i] or 1.0)
                detections = (np.asarray(batch.inputs[self.reads[0]][i]).reshape(-1, 4) / scale,
                              np.asarray(batch.inputs[self.reads[1]][i]))
            items.append(GroundingInput(image_id, _as_loaded(batch, i), self.texts.get(image_id, []), detections))
            placeholder.append(image_id == PLACEHOLDER_ID)
        real = [item for item, gray in zip(items, placeholder) if not gray]
        rows = self.grounder(real) if real else []
        size = self.grounder.config.crop_size
        it = iter(rows)
        full = [GroundingRow.empty("no_image", size) if gray else next(it) for gray in placeholder]
        return stack_rows(full)

    def provenance(self) -> dict:
        return dict(self.grounder.provenance_fields(), grounding=self.method)


@register_producer(CLIP_GROUNDING)
class ClipGroundingProducer(Producer):
    """Frozen CLIP hidden states of every stored crop (reads grounding/pixels: this run's or the cache's)."""

    needs_pixels = False
    every_image = True
    reads = ("grounding/pixels",)

    def __init__(self, run, group: str):
        super().__init__(run, group)
        opts, grounding = run.opts, run.opts.grounding
        if grounding is None:
            raise ValueError("encoders/clip_grounding needs --grounding-clip")
        self.config = ClipGroundingConfig(model=grounding.clip_model, layers=tuple(grounding.clip_layers),
                                          random_init=opts.random_init, batch_size=opts.batch_size,
                                          device=opts.device)
        self.crop_size, self.states = CROP_SIZE, None

    def load(self) -> None:
        from mner.features.run.extract import seed_random_init

        seed_random_init("clip_grounding", self.config.random_init)
        self.states = ClipGroundingStates(self.config)

    def dims(self) -> dict[str, int]:
        if self.states is None:
            self.load()
        return dict(zip(("L", "T", "D"), self.states.row_shape(self.crop_size)))

    def produce(self, batch: ChunkBatch) -> dict:
        shape = (-1, 3, self.crop_size, self.crop_size)
        pixels = [np.asarray(p).reshape(shape) for p in batch.inputs["grounding/pixels"]]  # per image (k, 3, S, S)
        flat = np.concatenate(pixels) if pixels else np.zeros((0, *shape[1:]), np.uint8)
        return {"states": self.states(flat)}

    def attrs(self) -> dict:
        return self.states.attrs(self.crop_size)

    def provenance(self) -> dict:
        return dict(self.states.provenance_fields(), encoder="clip_grounding", crop_source="grounding/pixels")


@register_producer(CAPTIONS)
class CaptionsProducer(Producer):
    """One caption per image: --captions blip, or a user JSONL/TSV file (read and checked here)."""

    def __init__(self, run, group: str):
        from mner.features.run.extract import seed_random_init

        super().__init__(run, group)
        opts, captions = run.opts, run.opts.captions
        if captions is None:
            raise ValueError("captions need --captions blip | FILE")
        config = CaptionConfig(model=captions.model, random_init=opts.random_init, max_new_tokens=captions.max_tokens,
                               num_beams=captions.beams, prompt=captions.prompt, batch_size=opts.batch_size,
                               device=opts.device)
        self.captioner = None
        if is_caption_file(captions.source):
            captioner = create_captioner(captions.source, config)  # malformed lines fail here
            captioner.bind(run.dataset.image_ids())  # all of --data: the same provenance in every shard
            self.input_fingerprint = captioner.file.sha256
            self._build, self.needs_pixels = (lambda: captioner), False
        elif captions.source not in CAPTIONERS:
            create_captioner(captions.source, config)  # raises: the valid values
        else:
            def build():
                seed_random_init("captions", opts.random_init)
                return create_captioner(captions.source, config)
            self._build, self.needs_pixels = build, True
        self.every_image = not self.needs_pixels

    def load(self) -> None:
        self.captioner = self._build()

    def produce(self, batch: ChunkBatch) -> dict:
        items = [(image_id, None if image_id == PLACEHOLDER_ID else _as_loaded(batch, i))
                 for i, image_id in enumerate(batch.image_ids)]
        rows = self.captioner(items)
        return {"text": [row.text.encode("utf-8") for row in rows],
                "reason": np.array([CAPTION_REASONS.index(row.reason) for row in rows], np.uint8)}

    def provenance(self) -> dict:
        return dict(self.captioner.provenance_fields(), captions=self.captioner.method)


def check_grounding_options(grounding: GroundingOptions) -> None:
    """Wrong values fail with the valid ones before anything is computed."""
    if grounding.method == "":
        return  # --grounding-clip alone: the crops must already be in the cache (checked by the planner)
    if grounding.method not in GROUNDERS:
        raise ValueError(f"--grounding {grounding.method!r}; valid: {', '.join(GROUNDERS)}")
    if grounding.fill not in FILL_RULES:
        raise ValueError(f"--grounding-fill {grounding.fill!r}; valid: {', '.join(FILL_RULES)}")
    if grounding.queries not in QUERY_RULES:
        raise ValueError(f"--grounding-queries {grounding.queries!r}; valid: {', '.join(QUERY_RULES)}")
    if not 0 <= grounding.threshold <= 1:
        raise ValueError(f"--grounding-threshold {grounding.threshold}: must be a probability in 0..1")
    if (grounding.maps or grounding.crop_dirs) and grounding.method != "files":
        raise ValueError("--grounding-map / --grounding-crops-dir are read only with --grounding files")
