"""The resumable, shardable extraction loop behind ``mner-features extract``.

Work is split into chunks of image ids. Each finished chunk is saved to
``<out>.parts/<run-config-hash>/chunk_<k>.npz`` (write to a temp name, then ``os.replace``), so a
killed run resumes at the first unfinished chunk. When every chunk is done the groups are assembled
into the cache through ``CacheWriter`` (temp file + atomic rename) and the parts folder is deleted:
at any moment the cache file is either absent, the previous valid cache, or the new complete one.

Groups already in the cache are never recomputed (unless ``overwrite``): adding ``--encoder swin``
runs only Swin, and crop features are always computed from the cached JPEG crops, so adding an
encoder later gives the same numbers as computing it in the first run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mner.features.detectors import DetectorConfig, create_detector
from mner.features.distributed import resolve_device, resolve_shard
from mner.features.loader import ImageLoader, LoaderSpec, default_num_workers, prepared_image
from mner.features.stages import BackgroundWriter, ImageStages
from mner.features.encoders import EncoderConfig, create_encoder
from mner.features.images import (
    MAX_SIDE, MISSING_POLICIES, placeholder_image,
)
from mner.features.prompts import load_prompt_set, prompt_features
from mner.pipeline.feature_cache import STATUS_NAMES, CacheWriter, FeatureCache, make_provenance

SEP = "::"  # key separator inside chunk .npz files ("encoders::clip::image_embed")


class ImageError(RuntimeError):
    """--missing-image error found bad images (raised before any model runs)."""


@dataclass
class ExtractOptions:
    data: str  # dataset folder (or one file) read with mner.pipeline.data.load_dataset
    images: str  # folder of <image id>.jpg files
    out: str  # cache path (a shard adds .shard<i>of<n> before .h5)
    detector: str = "maskrcnn"  # registered detector name
    encoders: list[str] = field(default_factory=lambda: ["clip"])  # registered encoder names
    prompts: list[str] = field(default_factory=list)  # prompt set names (need the clip encoder)
    random_init: bool = False  # random weights everywhere (offline smoke runs), recorded in provenance
    device: str = "auto"  # auto: the local-rank GPU when torch sees one, else cpu (see distributed.py)
    batch_size: int = 32  # images per detector/encoder forward (crops: 4x)
    num_workers: int | None = None  # DataLoader workers decoding images; None: all cores but one, at most 8
    top_k: int = 10  # objects kept per image
    score_threshold: float = 0.5  # detector score cut
    detector_min_size: int = 800  # detector input shorter side
    detector_weights: str | None = None  # local detector state dict
    detectron2_config: str = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"  # open_clip tag or local checkpoint file
    resnet_weights: str | None = None  # local torchvision state dict for resnet152
    swin_model: str = "microsoft/swin-large-patch4-window12-384"  # hub name or local folder
    crop_max_side: int = 384  # crops are stored as JPEG with the longer side capped here
    crop_quality: int = 90  # JPEG quality of stored crops
    max_image_side: int = MAX_SIDE  # huge images are downscaled to this before the models
    missing_image: str = "placeholder"  # placeholder | zeros | error
    chunk_size: int = 64  # image ids per resumable chunk
    shard: tuple[int, int] | None = None  # (index, count); None = from env or (0, 1)
    overwrite: bool = False  # rebuild the cache from scratch instead of adding missing groups
    progress: bool = True


@dataclass
class Summary:
    out: str
    computed: list[str]
    skipped: list[str]
    status_counts: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    num_images: int = 0
    num_objects: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    shard_count: int = 1  # > 1: this run wrote one shard of several (merge them when all are done)

    def __str__(self) -> str:
        lines = [f"wrote {self.out}: computed {', '.join(self.computed) or 'nothing'}"
                 + (f"; kept {', '.join(self.skipped)}" if self.skipped else "")]
        lines.append(f"images {self.num_images}: " + ", ".join(f"{k} {v}" for k, v in self.status_counts.items()))
        if self.notes:
            lines.append("conversions: " + ", ".join(f"{k} {v}" for k, v in sorted(self.notes.items())))
        lines.append(f"objects {self.num_objects}")
        total = sum(self.seconds.values()) or 1.0
        for name, seconds in self.seconds.items():
            rate = self.num_images / seconds if seconds > 0 else float("inf")
            lines.append(f"  {name:<24} {seconds:8.2f} s  ({100 * seconds / total:5.1f}%, {rate:8.1f} images/s)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- sharding


def shard_of(image_id: str, count: int) -> int:
    """Deterministic shard of an id: independent of the id list, the process and the Python hash seed."""
    return int.from_bytes(hashlib.sha1(image_id.encode("utf-8")).digest()[:8], "big") % count


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    return resolve_shard((index, count))


def shard_out_path(out: str, index: int, count: int) -> str:
    if count == 1:
        return out
    path = Path(out)
    return str(path.with_name(f"{path.stem}.shard{index}of{count}{path.suffix or '.h5'}"))


# ----------------------------------------------------------------------------------------- helpers


def _batched(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _save_chunk(path: Path, arrays: dict[str, np.ndarray], jpegs: list | None) -> None:
    """Runs in the background writer: joins the chunk's JPEG crops (futures) and saves the chunk file."""
    if jpegs is not None:
        flat = [crop for row in jpegs for crop in (row.result() if hasattr(row, "result") else row)]
        arrays["objects::crop_lengths"] = np.array([len(c) for c in flat], np.int64)
        arrays["objects::crop_bytes"] = np.frombuffer(b"".join(flat), np.uint8).copy()
    _save_npz_atomic(path, arrays)


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(temp, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def _seed_random_init(component: str, random_init: bool) -> None:
    """Random weights are a function of the component name: resumed, sharded and grown caches agree."""
    if random_init:
        torch.manual_seed(int.from_bytes(hashlib.sha1(component.encode()).digest()[:4], "big"))


@dataclass
class _RowTemplate:
    """Features of the gray placeholder image: computed once per run, copied into every placeholder row."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    crops: object  # Future[list[bytes]] of the stored JPEG crops (None when objects come from the cache)
    image_arrays: dict[str, dict[str, np.ndarray]]  # encoder -> dataset -> (1, ...) array
    crop_arrays: dict[str, dict[str, np.ndarray]]  # encoder -> dataset -> (k, ...) array


# ----------------------------------------------------------------------------------------- the run


class Extraction:
    """One extraction run over one shard: plan, compute chunks, assemble."""

    def __init__(self, opts: ExtractOptions):
        from mner.pipeline.data import load_dataset

        if opts.missing_image not in MISSING_POLICIES:
            raise ValueError(f"--missing-image {opts.missing_image!r}; valid: {', '.join(MISSING_POLICIES)}")
        self.opts = opts
        self.shard = resolve_shard(opts.shard)
        opts.device = resolve_device(opts.device)
        self.out = shard_out_path(opts.out, *self.shard)
        self.dataset = load_dataset(opts.data)
        index, count = self.shard
        self.ids = [i for i in self.dataset.image_ids() if shard_of(i, count) == index]
        self.notes: Counter = Counter()
        self._plan()

    # planning --------------------------------------------------------------------------------------
    def _plan(self) -> None:
        opts = self.opts
        for name in opts.prompts:
            load_prompt_set(name)  # fail early on a bad name
        self.cache: FeatureCache | None = None
        existing: set[str] = set()
        if os.path.exists(self.out) and not opts.overwrite:
            self.cache = FeatureCache(self.out, in_memory=True)
            if self.cache.image_ids != self.ids:
                raise ValueError(f"{self.out} indexes {self.cache.num_images} other images than --data/--shard "
                                 f"select ({len(self.ids)}); use --overwrite or another --out")
            existing = set(self.cache.groups())
        wanted = ["objects"] + [f"encoders/{e}" for e in opts.encoders] + [f"prompts/{p}" for p in opts.prompts]
        self.skipped = [g for g in wanted if g in existing]
        self.compute_objects = "objects" not in existing
        if not self.compute_objects:
            model = self.cache.provenance("objects").get("model", "")
            if opts.detector not in model and not (opts.detector == "detectron2" and "detectron2" in model):
                print(f"note: {self.out} already has objects from {model}; --detector {opts.detector} is ignored "
                      "(crops come from the cache; use --overwrite to re-detect)", file=sys.stderr)
        self.encoder_names = [e for e in dict.fromkeys(opts.encoders) if f"encoders/{e}" not in existing]
        self.prompt_names = [p for p in dict.fromkeys(opts.prompts) if f"prompts/{p}" not in existing]
        if self.prompt_names and "clip" not in self.encoder_names and "encoders/clip" not in existing:
            raise ValueError(f"--prompts {' '.join(self.prompt_names)} needs CLIP embeddings: add --encoder clip")
        self.computed = (["objects"] if self.compute_objects else []) + \
            [f"encoders/{e}" for e in self.encoder_names] + [f"prompts/{p}" for p in self.prompt_names]
        config = {k: v for k, v in asdict(opts).items() if k not in ("num_workers", "progress", "out", "shard")}
        config.update(computed=self.computed, ids=hashlib.sha256("\n".join(self.ids).encode()).hexdigest())
        self.config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.parts_root = Path(f"{self.out}.parts")
        self.parts = self.parts_root / self.config_hash

    def _build_models(self) -> None:
        opts = self.opts
        self.detector = None
        if self.compute_objects:
            _seed_random_init(opts.detector, opts.random_init)
            config = DetectorConfig(top_k=opts.top_k, score_threshold=opts.score_threshold,
                                    min_size=opts.detector_min_size, weights=opts.detector_weights,
                                    random_init=opts.random_init, device=opts.device)
            extra = {"detectron2_config": opts.detectron2_config} if opts.detector == "detectron2" else {}
            self.detector = create_detector(opts.detector, config=config, **extra)
        self.encoders = {}
        for name in self.encoder_names + (["clip"] if self.prompt_names and "clip" not in self.encoder_names else []):
            weights = opts.resnet_weights if name == "resnet152" else None
            _seed_random_init(name, opts.random_init)
            self.encoders[name] = create_encoder(name, config=EncoderConfig(
                random_init=opts.random_init, weights=weights, clip_model=opts.clip_model,
                clip_pretrained=opts.clip_pretrained, swin_model=opts.swin_model, device=opts.device))
        self._template: _RowTemplate | None = None
        self.device = torch.device(opts.device)
        self.num_workers = default_num_workers() if opts.num_workers is None else opts.num_workers
        self.stages = ImageStages(self.detector, {n: self.encoders[n] for n in self.encoder_names},
                                  device=opts.device, batch_size=opts.batch_size, writer=BackgroundWriter(),
                                  crop_jpeg=(opts.crop_max_side, opts.crop_quality) if self.compute_objects else None)

    # pre-pass for --missing-image error --------------------------------------------------------------
    def check_images(self) -> list:
        """Decode every image (in the loader's workers, no resizing) and list the ones that are not ok."""
        workers = default_num_workers() if self.opts.num_workers is None else self.opts.num_workers
        loader = ImageLoader(LoaderSpec(self.opts.images, self.opts.max_image_side, keep_original=False), self.ids,
                             num_workers=workers)
        bad = [item for item in tqdm((item for chunk in _batched(self.ids, 256) for item in loader.take(len(chunk))),
                                     total=len(self.ids), unit="img", desc="checking images",
                                     disable=not self.opts.progress) if item.status != "ok"]
        loader.close()
        return bad

    # main loop ------------------------------------------------------------------------------------
    def run(self) -> Summary:
        opts = self.opts
        if not self.computed and os.path.exists(self.out):
            shutil.rmtree(self.parts_root, ignore_errors=True)
            return self._summary()
        if opts.missing_image == "error":
            bad = self.check_images()
            if bad:
                listing = "\n".join(f"  {item.image_id}: {item.status}: {item.detail}" for item in bad[:50])
                more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
                raise ImageError(f"{len(bad)} of {len(self.ids)} images are missing or unreadable "
                                 f"(--missing-image error):\n{listing}{more}\n"
                                 "Use --missing-image placeholder or zeros to extract anyway.")
        self._build_models()
        self.parts.mkdir(parents=True, exist_ok=True)
        chunks = [self.ids[start:start + opts.chunk_size] for start in range(0, len(self.ids), opts.chunk_size)]
        todo = [k for k in range(len(chunks)) if not (self.parts / f"chunk_{k:05d}.npz").exists()]
        bar = tqdm(total=len(self.ids), unit="img", desc=f"extract {Path(self.out).name}", disable=not opts.progress)
        bar.update(len(self.ids) - sum(len(chunks[k]) for k in todo))
        started = time.perf_counter()
        # one loader for the whole shard: its workers decode the next chunks while the device works
        loader = ImageLoader(self.stages.loader_spec(opts.images, opts.max_image_side),
                             [i for k in todo for i in chunks[k]], num_workers=self.num_workers,
                             pin_memory=self.device.type == "cuda")
        writer = self.stages.writer
        loop_wall, loop_cpu = time.perf_counter(), time.thread_time()
        try:
            pending = []
            for k in todo:
                with self.stages.clock("wait for images", device=False):
                    items = loader.take(len(chunks[k]))
                arrays, jpegs = self._process_chunk(items, k * opts.chunk_size)
                pending.append(writer.submit(_save_chunk, self.parts / f"chunk_{k:05d}.npz", arrays, jpegs))
                bar.update(len(chunks[k]))
                bar.set_postfix_str(f"{(bar.n) / max(time.perf_counter() - started, 1e-9):.1f} images/s")
            with self.stages.clock("wait for writer", device=False):
                for future in pending:
                    future.result()  # chunk files are complete (and errors surface) before assembly
            self.loop_stats = {"images": sum(len(chunks[k]) for k in todo),
                               "wall": time.perf_counter() - loop_wall,
                               "main_thread_cpu": time.thread_time() - loop_cpu,
                               "forward_thread_cpu": self.stages.clock.forward_thread_cpu(),
                               "device_seconds": self.stages.clock.device_seconds()}
        finally:
            loader.close()
            writer.close()
        bar.close()
        self._assemble(len(chunks))
        shutil.rmtree(self.parts_root, ignore_errors=True)
        return self._summary()

    def _timed(self, name: str):
        return self.stages.clock(name)

    # one chunk --------------------------------------------------------------------------------------
    def _process_chunk(self, items: list, first_row: int) -> tuple[dict[str, np.ndarray], list]:
        """Device work for one chunk; returns its arrays and the crops' JPEG futures (saved by the writer)."""
        opts = self.opts
        statuses = []
        for item in items:
            self.notes.update(note.split(" ")[0] for note in item.notes)
            statuses.append("placeholder" if item.status != "ok" and opts.missing_image == "placeholder"
                            else item.status)
        arrays: dict[str, np.ndarray] = {
            "images::status": np.array([STATUS_NAMES.index(s) for s in statuses], np.uint8),
            "images::width": np.array([item.width for item in items], np.int32),
            "images::height": np.array([item.height for item in items], np.int32),
            "images::detail": np.array([(item.detail if s == item.status else f"{item.status}: {item.detail}")
                                        .encode("utf-8") for item, s in zip(items, statuses)], dtype=bytes),
        }
        cached_boxes = None
        if not self.compute_objects:
            cached_boxes = [np.asarray(self.cache.read("objects/boxes", first_row + i)) for i in range(len(items))]
        result = self.stages.process(items, cached_boxes)
        template = self._placeholder_template() if "placeholder" in statuses else None
        position = {row: p for p, row in enumerate(result.rows)}

        def per_row(i: int, ok_rows: list, template_rows, empty):
            if i in position:
                return ok_rows[position[i]]
            return template_rows if statuses[i] == "placeholder" else empty

        if self.compute_objects:
            empty = np.zeros((0, 4), np.float32)
            boxes = [per_row(i, result.boxes, template.boxes if template else None, empty) for i in range(len(items))]
            scores = [per_row(i, result.scores, template.scores if template else None, np.zeros(0, np.float32))
                      for i in range(len(items))]
            classes = [per_row(i, result.class_ids, template.class_ids if template else None,
                               np.zeros(0, np.int32)) for i in range(len(items))]
            counts = np.array([len(s) for s in scores], np.int64)
            arrays["objects::counts"] = counts
            arrays["objects::boxes"] = np.concatenate(boxes).reshape(-1, 4).astype(np.float32)
            arrays["objects::scores"] = np.concatenate(scores).astype(np.float32)
            arrays["objects::class_ids"] = np.concatenate(classes).astype(np.int32)
            jpegs = [per_row(i, result.crop_jpegs, template.crops if template else None, [])
                     for i in range(len(items))]
        else:
            counts = np.array([len(b) for b in cached_boxes], np.int64)
            arrays["objects::counts"] = counts
            jpegs = None
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        ok_starts = np.concatenate([[0], np.cumsum([counts[i] for i in result.rows])]).astype(int)
        for name in self.encoder_names:
            encoder = self.encoders[name]
            for key, shape in encoder.image_datasets.items():
                values = np.zeros((len(items), *shape), np.float16)
                values[result.rows] = result.image_arrays[name][key]
                for i in range(len(items)):
                    if statuses[i] == "placeholder":
                        values[i] = template.image_arrays[name][key][0]
                arrays[f"encoders::{name}::{key}"] = values
            for key, shape in encoder.crop_datasets.items():
                values = np.zeros((int(starts[-1]), *shape), np.float16)
                computed = result.crop_arrays[name][key]
                for i in range(len(items)):
                    if i in position:
                        p = position[i]
                        values[starts[i]:starts[i + 1]] = computed[ok_starts[p]:ok_starts[p + 1]]
                    elif statuses[i] == "placeholder" and len(template.crop_arrays[name][key]) == counts[i]:
                        values[starts[i]:starts[i + 1]] = template.crop_arrays[name][key]
                arrays[f"encoders::{name}::{key}"] = values
        return arrays, jpegs

    def _placeholder_template(self) -> _RowTemplate:
        """Placeholder rows all get these features (gray image, its detections, its crops)."""
        if self._template is None:
            with self._timed("placeholder (once)"):
                spec = self.stages.loader_spec(self.opts.images, self.opts.max_image_side)
                gray = prepared_image(spec, placeholder_image(), "<placeholder>")
                cached = None
                if not self.compute_objects:  # the cache's placeholder rows all carry the gray image's boxes
                    rows = [r for r in range(self.cache.num_images)
                            if STATUS_NAMES[self.cache.status[r]] == "placeholder"]
                    cached = [np.asarray(self.cache.read("objects/boxes", rows[0])) if rows else
                              np.zeros((0, 4), np.float32)]
                result = self.stages.process([gray], cached)
                boxes = result.boxes[0] if self.compute_objects else cached[0]
                self._template = _RowTemplate(
                    boxes, result.scores[0] if result.scores else None,
                    result.class_ids[0] if result.class_ids else None,
                    result.crop_jpegs[0] if result.crop_jpegs else None,
                    {n: {k: v[:1] for k, v in arrays.items()} for n, arrays in result.image_arrays.items()},
                    result.crop_arrays)
        return self._template

    # assembly ------------------------------------------------------------------------------------------
    def _assemble(self, num_chunks: int) -> None:
        """Concatenate the chunk files (into disk-backed arrays: a Swin grid of 10k images is 3 GB)."""
        opts = self.opts
        paths = [self.parts / f"chunk_{k:05d}.npz" for k in range(num_chunks)]
        with np.load(paths[0], allow_pickle=False) as first:
            keys = [key for key in first.files if key not in ("objects::crop_bytes", "images::detail")]
            row_shapes = {key: (first[key].shape[1:], first[key].dtype) for key in keys}
        counts = np.concatenate([np.load(p, allow_pickle=False)["objects::counts"] for p in paths]) if paths else \
            np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        num_objects = int(offsets[-1])
        object_keys = {"objects::boxes", "objects::scores", "objects::class_ids", "objects::crop_lengths"}
        object_keys |= {f"encoders::{n}::{k}" for n in self.encoder_names for k in self.encoders[n].crop_datasets}
        merged: dict[str, np.ndarray] = {}
        for key in keys:
            shape, dtype = row_shapes[key]
            total = num_objects if key in object_keys else len(self.ids)
            merged[key] = np.lib.format.open_memmap(self.parts / f"assembled_{key.replace(':', '_')}.npy", mode="w+",
                                                    dtype=dtype, shape=(total, *shape))
        details: list[str] = []
        crops: list[bytes] = []
        image_row = object_row = 0
        for path in paths:
            with np.load(path, allow_pickle=False) as chunk:
                n, m = len(chunk["images::status"]), int(chunk["objects::counts"].sum())
                for key in keys:
                    start = object_row if key in object_keys else image_row
                    merged[key][start:start + (m if key in object_keys else n)] = chunk[key]
                details += [d.decode("utf-8") for d in chunk["images::detail"]]
                if self.compute_objects:
                    flat = chunk["objects::crop_bytes"].tobytes()
                    bounds = np.concatenate([[0], np.cumsum(chunk["objects::crop_lengths"])])
                    crops += [flat[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
                image_row, object_row = image_row + n, object_row + m
        self.status_counts = Counter(STATUS_NAMES[s] for s in merged["images::status"])
        self.num_objects = num_objects
        with CacheWriter(self.out, overwrite=opts.overwrite) as writer:
            writer.write_images(self.ids, merged["images::status"], details, merged["images::width"],
                                merged["images::height"])
            writer.write_posts(self.dataset)
            if self.compute_objects:
                fields = self.detector.provenance_fields()
                provenance = self._provenance("detector", fields, extra={
                    "detector": opts.detector, "crops": {"format": "JPEG", "max_side": opts.crop_max_side,
                                                         "quality": opts.crop_quality},
                    "missing_image": opts.missing_image, "max_image_side": opts.max_image_side})
                writer.write_group("objects", {
                    "offsets": (offsets, "offsets"),
                    "boxes": (merged["objects::boxes"], "object"),
                    "scores": (merged["objects::scores"], "object"),
                    "class_ids": (merged["objects::class_ids"], "object"),
                    "crop_jpeg": (crops, "object"),
                }, provenance, attrs={"class_names": list(self.detector.class_names)}, overwrite=opts.overwrite)
            for name in self.encoder_names:
                encoder = self.encoders[name]
                datasets = {key: (merged[f"encoders::{name}::{key}"], "image") for key in encoder.image_datasets}
                datasets |= {key: (merged[f"encoders::{name}::{key}"], "object") for key in encoder.crop_datasets}
                provenance = self._provenance(f"encoder {name}", encoder.provenance_fields(), extra={
                    "encoder": name, "crop_source": "roi_align of the decoded image at objects/boxes",
                    "missing_image": opts.missing_image})
                writer.write_group(f"encoders/{name}", datasets, provenance, attrs=encoder.attrs(),
                                   overwrite=opts.overwrite)
            if self.prompt_names:
                with self._timed("prompts"):
                    self._write_prompts(writer, merged, offsets)

    def _clip_embeddings(self, merged: dict, offsets: np.ndarray):
        if "clip" in self.encoder_names:
            return (np.asarray(merged["encoders::clip::image_embed"]), np.asarray(merged["encoders::clip::crop_embed"]),
                    self.encoders["clip"].logit_scale)
        rows = range(self.cache.num_images)
        image_embed = np.stack([self.cache.read("encoders/clip/image_embed", r) for r in rows])
        crop_embed = np.concatenate([self.cache.read("encoders/clip/crop_embed", r) for r in rows]) if len(rows) \
            else np.zeros((0, image_embed.shape[-1]), np.float16)
        attrs = self.cache.feature_spec(["encoders/clip/image_embed"]).attrs["encoders/clip"]
        return image_embed, crop_embed, float(attrs["logit_scale"])

    def _write_prompts(self, writer: CacheWriter, merged: dict, offsets: np.ndarray) -> None:
        image_embed, crop_embed, logit_scale = self._clip_embeddings(merged, offsets)
        status = np.asarray(merged["images::status"])
        has_features = (status == STATUS_NAMES.index("ok")) | (status == STATUS_NAMES.index("placeholder"))
        clip = self.encoders["clip"]
        for name in self.prompt_names:
            prompt_set = load_prompt_set(name)
            prompt_embed = clip.encode_text(prompt_set.texts)  # (Q, D)
            arrays = prompt_features(prompt_set, prompt_embed, image_embed, crop_embed, logit_scale, has_features)
            fields = {"model": clip.model_name, "pretrained": clip.pretrained(),
                      "preprocessing": {"template": prompt_set.template, "normalise": "unit length before cos"},
                      "thresholds": {"logit_scale": logit_scale}}
            provenance = self._provenance(f"prompts {name}", fields, extra={
                "prompt_set": name, "description": prompt_set.description,
                "formulas": {"centroids": "mean of the category's prompt_embed (VCRMNER eq. 2)",
                             "crop_weights": "softmax_j(logit_scale * cos(crop_embed_i, centroid_j)) (VCRMNER eq. 4-5)",
                             "image_relevance": "softmax_i(logit_scale * cos(prompt_embed_i, image_embed)) "
                                                "(PromptMNER eq. 1); 0 for images without features"}})
            writer.write_group(f"prompts/{name}", {
                "prompt_text": (prompt_set.texts, "global"),
                "prompt_category": (prompt_set.prompt_category, "global"),
                "prompt_embed": (arrays["prompt_embed"], "global"),
                "centroids": (arrays["centroids"], "global"),
                "crop_weights": (arrays["crop_weights"], "object"),
                "image_relevance": (arrays["image_relevance"], "image"),
            }, provenance, attrs={"category_names": prompt_set.category_names, "logit_scale": logit_scale},
                overwrite=self.opts.overwrite)

    def _provenance(self, component: str, fields: dict, extra: dict) -> dict:
        index, count = self.shard
        extra = dict(extra, shard=f"{index}/{count}", random_init=self.opts.random_init)
        return make_provenance(component, model=fields["model"], pretrained=fields["pretrained"],
                               preprocessing=fields["preprocessing"], thresholds=fields["thresholds"],
                               image_ids=self.ids, extra=extra)

    def _summary(self) -> Summary:
        counts = getattr(self, "status_counts", None)
        if counts is None and os.path.exists(self.out):
            cache = FeatureCache(self.out)
            counts = Counter(STATUS_NAMES[s] for s in cache.status)
        return Summary(out=self.out, computed=self.computed, skipped=self.skipped,
                       status_counts=dict(counts or {}), notes=dict(self.notes), num_images=len(self.ids),
                       num_objects=getattr(self, "num_objects", 0),
                       seconds=dict(self.stages.clock.wall) if hasattr(self, "stages") else {},
                       shard_count=self.shard[1])


def run_extraction(opts: ExtractOptions) -> Summary:
    return Extraction(opts).run()
