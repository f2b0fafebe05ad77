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

import sys
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
from mner.features.producers.registry import ChunkBatch, Layout, Producer
from mner.features.run.images import LoadedImage

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


class GroundingProducer(Producer):
    group = "grounding"
    owns = "grounding"

    def __init__(self, build_grounder, *, method: str, config: GroundingConfig, texts: dict[str, list[list[str]]]):
        self._build, self.method, self.config, self.texts = build_grounder, method, config, texts
        self.grounder = None
        self.needs_pixels = GROUNDERS[method].needs_image
        self.every_image = not self.needs_pixels
        self.reads = ("objects/boxes", "objects/scores") if method == "detector" else ()

    def load(self) -> None:
        self.grounder = self._build()

    def datasets(self) -> dict[str, Layout]:
        size = self.config.crop_size
        return {"pixels": Layout("grounding", "uint8", (3, size, size)),
                "boxes": Layout("grounding", "float32", (4,)),
                "scores": Layout("grounding", "float32"), "source": Layout("grounding", "uint8"),
                "query": Layout("grounding", "uint8", ragged_bytes=True), "reason": Layout("image", "uint8")}

    def produce(self, batch: ChunkBatch) -> dict:
        items, placeholder = [], []
        for i, image_id in enumerate(batch.image_ids):
            detections = None
            if self.reads:  # detector boxes are stored in original pixels; crops are cut from the loaded image
                scale = np.float32(batch.scales[i] or 1.0)
                detections = (np.asarray(batch.inputs["objects/boxes"][i]).reshape(-1, 4) / scale,
                              np.asarray(batch.inputs["objects/scores"][i]))
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


class ClipGroundingProducer(Producer):
    """Frozen CLIP hidden states of every stored crop (reads grounding/pixels: this run's or the cache's)."""

    group = "encoders/clip_grounding"
    needs_pixels = False
    every_image = True
    reads = ("grounding/pixels",)

    def __init__(self, config: ClipGroundingConfig, crop_size: int):
        self.config, self.crop_size, self.states = config, crop_size, None

    def load(self) -> None:
        from mner.features.run.extract import seed_random_init

        seed_random_init("clip_grounding", self.config.random_init)
        self.states = ClipGroundingStates(self.config)

    def datasets(self) -> dict[str, Layout]:
        if self.states is None:
            self.load()
        return {"states": Layout("grounding", "float16", self.states.row_shape(self.crop_size))}

    def produce(self, batch: ChunkBatch) -> dict:
        shape = (-1, 3, self.crop_size, self.crop_size)
        pixels = [np.asarray(p).reshape(shape) for p in batch.inputs["grounding/pixels"]]  # per image (k, 3, S, S)
        flat = np.concatenate(pixels) if pixels else np.zeros((0, *shape[1:]), np.uint8)
        return {"states": self.states(flat)}

    def attrs(self) -> dict:
        return self.states.attrs(self.crop_size)

    def provenance(self) -> dict:
        return dict(self.states.provenance_fields(), encoder="clip_grounding", crop_source="grounding/pixels")


class CaptionsProducer(Producer):
    group = "captions"

    def __init__(self, build_captioner, *, needs_image: bool):
        self._build, self.captioner = build_captioner, None
        self.needs_pixels = needs_image
        self.every_image = not needs_image

    def load(self) -> None:
        self.captioner = self._build()

    def datasets(self) -> dict[str, Layout]:
        return {"text": Layout("image", "uint8", ragged_bytes=True), "reason": Layout("image", "uint8")}

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


def plan_grounding_captions(extraction, existing: set[str], built: list[Producer]):
    """(producers for --grounding / --grounding-clip / --captions, groups kept from the cache); ``built``: the others.

    User files are read and checked here, so a malformed mapping or captions line fails before any compute.
    """
    from mner.features.run.extract import seed_random_init

    opts = extraction.opts
    grounding: GroundingOptions | None = opts.grounding
    captions: CaptionOptions | None = opts.captions
    producers: list[Producer] = []
    skipped: list[str] = []
    if grounding is not None:
        check_grounding_options(grounding)
        grounding_config = GroundingConfig(
            model=grounding.model, random_init=opts.random_init, threshold=grounding.threshold, fill=grounding.fill,
            query_rule=grounding.queries, maps=list(grounding.maps), crop_dirs=list(grounding.crop_dirs),
            batch_size=opts.batch_size, device=opts.device, detector_model=opts.detector)
        if grounding.method == "":
            if "grounding" not in existing:
                raise ValueError("--grounding-clip encodes grounding crops: add --grounding owlv2 | detector | files")
        elif "grounding" in existing:
            skipped.append("grounding")
            kept = extraction.cache.provenance("grounding").get("grounding")
            if kept != grounding.method:
                print(f"note: {extraction.out} already has grounding crops from --grounding {kept}; --grounding "
                      f"{grounding.method} is ignored (use --overwrite to rebuild)", file=sys.stderr)
        else:
            if grounding.method == "detector" and "objects" not in existing and \
                    not any(p.group == "objects" for p in built):
                raise ValueError("--grounding detector crops the objects group's boxes: the run needs a --detector")
            fingerprint = None
            if grounding.method == "files":
                files = create_grounder("files", grounding_config)
                # every mapping problem fails here; checked against all of --data's ids, not this shard's,
                # so every shard records the same provenance (merge compares it)
                files.bind(extraction.dataset.image_ids())
                fingerprint = files.mapping.crops_sha256

                def build_grounder():
                    return files
            else:
                def build_grounder():
                    seed_random_init("grounding", opts.random_init)
                    return create_grounder(grounding.method, grounding_config)
            producers.append(GroundingProducer(build_grounder, method=grounding.method, config=grounding_config,
                                               texts=group_texts(extraction.dataset)))
            producers[-1].input_fingerprint = fingerprint  # changed crop files never resume an old run's chunks
        if grounding.clip:
            if "encoders/clip_grounding" in existing:
                skipped.append("encoders/clip_grounding")
            else:
                producers.append(ClipGroundingProducer(ClipGroundingConfig(
                    model=grounding.clip_model, layers=tuple(grounding.clip_layers), random_init=opts.random_init,
                    batch_size=opts.batch_size, device=opts.device), CROP_SIZE))
    if captions is not None:
        if "captions" in existing:
            skipped.append("captions")
        else:
            caption_config = CaptionConfig(
                model=captions.model, random_init=opts.random_init, max_new_tokens=captions.max_tokens,
                num_beams=captions.beams, prompt=captions.prompt, batch_size=opts.batch_size, device=opts.device)
            if is_caption_file(captions.source):
                captioner = create_captioner(captions.source, caption_config)  # malformed lines fail here
                captioner.bind(extraction.dataset.image_ids())  # all of --data: the same provenance in every shard
                producers.append(CaptionsProducer(lambda: captioner, needs_image=False))
                producers[-1].input_fingerprint = captioner.file.sha256
            elif captions.source not in CAPTIONERS:
                create_captioner(captions.source, caption_config)  # raises: the valid values
            else:
                def build_captioner():
                    seed_random_init("captions", opts.random_init)
                    return create_captioner(captions.source, caption_config)

                producers.append(CaptionsProducer(build_captioner, needs_image=True))
    return producers, skipped
