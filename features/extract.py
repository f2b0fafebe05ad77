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
import io
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mner.features.detectors import DetectorConfig, create_detector
from mner.features.encoders import ClipEncoder, EncoderConfig, create_encoder
from mner.features.images import (
    MAX_SIDE, MISSING_POLICIES, LoadedImage, apply_missing_policy, crop_box, decode_jpeg, encode_jpeg,
    load_image, placeholder_image,
)
from mner.features.prompts import load_prompt_set, prompt_features
from mner.pipeline.cache import STATUS_NAMES, CacheWriter, FeatureCache, make_provenance

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
    device: str = "cpu"
    batch_size: int = 32  # images (and crops) per encoder forward
    num_workers: int = 0  # DataLoader workers decoding images
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


def resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    """--shard, else torchrun's RANK/WORLD_SIZE, else a SLURM array's task id/count, else (0, 1)."""
    if shard is not None:
        index, count = shard
    elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        index, count = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    elif "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        index, count = int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        index, count = 0, 1
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must be in 0..{count - 1}")
    return index, count


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


class _ImageList(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers; yields LoadedImage (PIL images pickle fine)."""

    def __init__(self, images_dir: str, ids: list[str], max_side: int):
        self.images_dir, self.ids, self.max_side = images_dir, ids, max_side

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> LoadedImage:
        return load_image(self.images_dir, self.ids[index], max_side=self.max_side)


def _identity(item):
    return item


def _iter_images(opts: ExtractOptions, ids: list[str]):
    loader = torch.utils.data.DataLoader(_ImageList(opts.images, ids, opts.max_image_side), batch_size=None,
                                         num_workers=opts.num_workers, collate_fn=_identity)
    return iter(loader)


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


def _half(values: np.ndarray) -> np.ndarray:
    """float16 with saturation (random-init ResNet-152 activations can exceed 65504)."""
    limit = np.finfo(np.float16).max
    return np.clip(values, -limit, limit).astype(np.float16)


def _batched(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass
class _RowTemplate:
    """Features of the gray placeholder image: computed once per run, copied into every placeholder row."""

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    crops: list[bytes]
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
        self.out = shard_out_path(opts.out, *self.shard)
        self.dataset = load_dataset(opts.data)
        index, count = self.shard
        self.ids = [i for i in self.dataset.image_ids() if shard_of(i, count) == index]
        self.seconds: dict[str, float] = defaultdict(float)
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

    # pre-pass for --missing-image error --------------------------------------------------------------
    def check_images(self) -> list[LoadedImage]:
        bad = [item for item in tqdm(_iter_images(self.opts, self.ids), total=len(self.ids), unit="img",
                                     desc="checking images", disable=not self.opts.progress)
               if item.status != "ok"]
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
        bar = tqdm(total=len(self.ids), unit="img", desc=f"extract {Path(self.out).name}", disable=not opts.progress)
        started = time.perf_counter()
        for k, chunk in enumerate(chunks):
            path = self.parts / f"chunk_{k:05d}.npz"
            if not path.exists():
                _save_npz_atomic(path, self._process_chunk(chunk, k * opts.chunk_size))
            bar.update(len(chunk))
            bar.set_postfix_str(f"{bar.n / max(time.perf_counter() - started, 1e-9):.1f} images/s")
        bar.close()
        self._assemble(len(chunks))
        shutil.rmtree(self.parts_root, ignore_errors=True)
        return self._summary()

    def _timed(self, name: str):
        seconds = self.seconds

        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                seconds[name] += time.perf_counter() - self.start

        return _Timer()

    # one chunk --------------------------------------------------------------------------------------
    def _process_chunk(self, chunk: list[str], first_row: int) -> dict[str, np.ndarray]:
        opts = self.opts
        loaded: list[LoadedImage] = []
        images_iter = _iter_images(opts, chunk)
        for _ in chunk:
            with self._timed("decode images"):
                item = next(images_iter)
            self.notes.update(note.split(" ")[0] for note in item.notes)
            loaded.append(apply_missing_policy(item, opts.missing_image))
        arrays: dict[str, np.ndarray] = {
            "images::status": np.array([STATUS_NAMES.index(item.status) for item in loaded], np.uint8),
            "images::width": np.array([item.width for item in loaded], np.int32),
            "images::height": np.array([item.height for item in loaded], np.int32),
            "images::detail": np.array([item.detail.encode("utf-8") for item in loaded], dtype=bytes),
        }
        # objects: detect now, or take the crops stored in the cache
        crops_of: list[list[bytes]] = []
        detections = []
        for row, item in enumerate(loaded, start=first_row):
            if self.compute_objects:
                if item.status == "ok":
                    detections.append(self._detect(item))
                elif item.status == "placeholder":
                    template = self._placeholder_template(row)
                    detections.append((template.boxes, template.scores, template.class_ids, template.crops))
                else:
                    detections.append((np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                       np.zeros(0, np.int32), []))
                crops_of.append(detections[-1][3])
            elif any(self.encoders[name].crop_datasets for name in self.encoder_names):
                crops_of.append(list(self.cache.read("objects/crop_jpeg", row)))
            else:
                lo, hi = self.cache.read("objects/offsets", row)
                crops_of.append([b""] * int(hi - lo))  # only the counts are used
        if self.compute_objects:
            arrays["objects::counts"] = np.array([len(d[1]) for d in detections], np.int64)
            arrays["objects::boxes"] = np.concatenate([d[0] for d in detections]).reshape(-1, 4).astype(np.float32)
            arrays["objects::scores"] = np.concatenate([d[1] for d in detections]).astype(np.float32)
            arrays["objects::class_ids"] = np.concatenate([d[2] for d in detections]).astype(np.int32)
            flat = [crop for d in detections for crop in d[3]]
            arrays["objects::crop_lengths"] = np.array([len(c) for c in flat], np.int64)
            arrays["objects::crop_bytes"] = np.frombuffer(b"".join(flat), np.uint8).copy()
        # encoders: ok rows are computed in batches, placeholder rows copy the template
        computed_rows = [i for i, item in enumerate(loaded) if item.status == "ok"]
        placeholder_rows = [i for i, item in enumerate(loaded) if item.status == "placeholder"]
        crop_counts = np.array([len(c) for c in crops_of], np.int64)
        crop_starts = np.concatenate([[0], np.cumsum(crop_counts)])
        for name in self.encoder_names:
            encoder = self.encoders[name]
            with self._timed(f"encoder {name}"):
                for key, shape in encoder.image_datasets.items():
                    arrays[f"encoders::{name}::{key}"] = np.zeros((len(loaded), *shape), np.float16)
                for key, shape in encoder.crop_datasets.items():
                    arrays[f"encoders::{name}::{key}"] = np.zeros((int(crop_starts[-1]), *shape), np.float16)
                for batch in _batched(computed_rows, opts.batch_size):
                    for key, values in encoder.encode_images([loaded[i].image for i in batch]).items():
                        arrays[f"encoders::{name}::{key}"][batch] = _half(values)
                if encoder.crop_datasets:
                    crop_rows = [(i, j) for i in computed_rows for j in range(crop_counts[i])]
                    for batch in _batched(crop_rows, opts.batch_size):
                        pictures = [decode_jpeg(crops_of[i][j]) for i, j in batch]
                        targets = [crop_starts[i] + j for i, j in batch]
                        for key, values in encoder.encode_crops(pictures).items():
                            arrays[f"encoders::{name}::{key}"][targets] = _half(values)
            for i in placeholder_rows:
                template = self._placeholder_template(first_row + i)
                for key, values in template.image_arrays[name].items():
                    arrays[f"encoders::{name}::{key}"][i] = values[0]
                for key, values in template.crop_arrays[name].items():
                    arrays[f"encoders::{name}::{key}"][crop_starts[i]:crop_starts[i + 1]] = values
        if not self.compute_objects:
            arrays["objects::counts"] = crop_counts
        return arrays

    def _detect(self, item: LoadedImage):
        with self._timed("detector"):
            boxes, scores, class_ids = self.detector(item.image)
        with self._timed("crops (jpeg)"):
            crops = [encode_jpeg(crop_box(item.image, box), max_side=self.opts.crop_max_side,
                                 quality=self.opts.crop_quality) for box in boxes]
        return boxes * np.float32(item.scale), scores, class_ids, crops

    def _placeholder_template(self, row: int) -> _RowTemplate:
        """Placeholder rows all get these features (gray image, its detections, its crops)."""
        if self._template is None:
            with self._timed("placeholder (once)"):
                gray = LoadedImage("<placeholder>", "ok", image=placeholder_image())
                if self.compute_objects:
                    boxes, scores, class_ids, crops = self._detect(gray)
                else:
                    crops = list(self.cache.read("objects/crop_jpeg", row))
                    boxes, scores, class_ids = np.zeros((len(crops), 4), np.float32), None, None
                image_arrays, crop_arrays = {}, {}
                for name in self.encoder_names:
                    encoder = self.encoders[name]
                    image_arrays[name] = {k: _half(v) for k, v in encoder.encode_images([gray.image]).items()}
                    crop_arrays[name] = {}
                    if encoder.crop_datasets and crops:
                        crop_arrays[name] = {k: _half(v) for k, v in
                                             encoder.encode_crops([decode_jpeg(c) for c in crops]).items()}
                self._template = _RowTemplate(boxes, scores, class_ids, crops, image_arrays, crop_arrays)
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
                    "encoder": name, "crop_source": "objects/crop_jpeg (decoded)",
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
                       num_objects=getattr(self, "num_objects", 0), seconds=dict(self.seconds))


def run_extraction(opts: ExtractOptions) -> Summary:
    return Extraction(opts).run()
