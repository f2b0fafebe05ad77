"""The resumable, shardable extraction loop behind ``mner-features extract``: one generic chunked loop.

Each feature group is made by one producer (``producers.py``); the loop knows none of them by name.
For every chunk of image ids it decodes the images (when a producer needs pixels), runs the producers
in order on the usable images, copies the placeholder rows (computed once per run from the gray image)
and writes the chunk as a part, a small cache ``<out>.parts/<run-config-hash>/chunk_<k>.h5`` (``parts.py``).
A killed run resumes at the first missing part. When every part is done, assembly is the merge of the
parts into the cache (temp file + atomic rename): peak memory is one part, temporary disk the parts folder.

The whole run holds the cache's lock: a second writer of the same ``--out`` stops with an error that
names the holder. Groups already in the cache are never recomputed (unless ``overwrite``): adding
``--encoder swin`` runs only Swin, and crop features are cut from the decoded image at the cached boxes
(``stages.py``), so adding an encoder later gives the same numbers as computing it in the first run.
A cache that grows is checked against the images it was built from (content fingerprints) and against
the CLIP model that made its embeddings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mner.features.producers.registry import ChunkBatch, Producer
from mner.features.run.images import MAX_SIDE, MISSING_POLICIES, LoadedImage, file_fingerprint, placeholder_image
from mner.features.run.loader import DecodedImage, ImageLoader, LoaderSpec, default_num_workers, prepared_image
from mner.features.run.parts import (
    PART_GLOB,
    ChunkRows,
    PartGroup,
    PartImages,
    cause_of,
    folder_bytes,
    part_paths,
    read_part_images,
    segments,
    write_part,
)
from mner.features.run.plan import RunModels, kept_differences, make_plan
from mner.features.run.sharding import parse_shard, resolve_shard, shard_of, shard_out_path  # noqa: F401 (re-exported)
from mner.features.run.stages import ImageStages
from mner.pipeline.background import BackgroundWriter
from mner.pipeline.cache import STATUS_NAMES, CacheLock, CacheWriter, FeatureCache, make_provenance, shard_record
from mner.pipeline.cache.specs import dataset_spec, get_group, index_path, is_ragged
from mner.pipeline.devices import resolve_device, use_device


class ImageError(RuntimeError):
    """Bad images: --missing-image error found some, or more than --max-bad-images (exit code 2)."""


@dataclass
class ExtractOptions:
    data: str  # dataset folder (or one file) read with mner.pipeline.data.load_dataset
    images: str | None  # folder of <image id>.jpg files; None only with no_images
    out: str  # cache path (a shard adds .shard<i>of<n> before .h5)
    detector: str | list[str] | None = None  # registered detector name(s); None: the cache's, else maskrcnn
    encoders: list[str] | None = None  # registered encoder names; None: clip (nothing extra with for_models)
    prompts: list[str] = field(default_factory=list)  # prompt set names (embedded by every CLIP model)
    import_objects: list[str] = field(default_factory=list)  # --import-objects NAME=FILE: objects/NAME from a file
    for_models: list[str] = field(default_factory=list)  # --for: models (or "all") whose paper groups to build
    groups: list[str] = field(default_factory=list)  # --group: any declared group instance, by path
    tiny: bool = False  # --tiny: every detector/encoder of a --for plan by its tiny test variant (random)
    override_paper: bool = False  # flags that contradict a --for paper's setting are kept (recorded)
    random_init: bool = False  # random weights everywhere (offline smoke runs), recorded in provenance
    device: str = "auto"  # auto: the LOCAL_RANK GPU under torchrun, else cuda:0, else cpu (distributed.py)
    batch_size: int = 32  # images per detector/encoder forward (crops: 4x)
    num_workers: int | None = None  # loader worker processes; None: all cores but one, at most 8
    top_k: int | None = None  # objects kept per image; None: 10 (every paper's objects are a subset)
    score_threshold: float | None = None  # detector score cut; None: 0.5 (0 with random_init)
    detector_min_size: int = 800  # detector input shorter side
    detector_weights: str | None = None  # local detector state dict
    detectron2_config: str = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
    clip_model: str | list[str] | None = None  # open_clip architecture(s); None: the cache's, else ViT-B-32
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
    no_images: bool = False  # build over the id list without any picture (every image "missing"), on purpose
    max_bad_images: float | None = None  # share of non-ok images above which the run is an error
    progress: bool = True
    grounding: object | None = None  # GroundingOptions (features/producers/grounding_captions.py): --grounding ...
    captions: object | None = None  # CaptionOptions: --captions blip | FILE
    grounding_settings: object | None = None  # GroundingOptions of the flags, for grounding a --for plan adds
    caption_settings: object | None = None  # CaptionOptions of the flags, for captions a --for plan adds
    command: list[str] | None = None  # the command line as typed (default sys.argv), recorded with absolute paths

    @property
    def detectors(self) -> list[str]:
        return [self.detector] if isinstance(self.detector, str) else list(self.detector or [])

    def imported_objects(self) -> dict[str, str]:
        """``--import-objects`` as {instance name: file}."""
        from mner.features.producers.imported_objects import parse_import

        return dict(parse_import(value) for value in self.import_objects)

    @property
    def clip_models(self) -> list[str]:
        return [self.clip_model] if isinstance(self.clip_model, str) else list(self.clip_model or [])

    def validate(self) -> None:
        """Bad values fail here, before anything touches the disk (no .parts folder is left behind)."""
        if self.tiny:
            self.random_init = True
        def need(ok: bool, flag: str, value, valid: str) -> None:
            if not ok:
                raise ValueError(f"{flag} {value!r}: must be {valid}")

        for flag, value in (("--batch-size", self.batch_size), ("--chunk-size", self.chunk_size),
                            ("--detector-min-size", self.detector_min_size), ("--crop-max-side", self.crop_max_side),
                            ("--max-image-side", self.max_image_side)):
            need(isinstance(value, int) and value >= 1, flag, value, "an integer >= 1")
        need(self.top_k is None or self.top_k >= 1, "--top-k", self.top_k, "an integer >= 1")
        need(self.num_workers is None or self.num_workers >= 0, "--num-workers", self.num_workers, "an integer >= 0")
        need(1 <= self.crop_quality <= 95, "--crop-quality", self.crop_quality, "a JPEG quality in 1..95")
        need(self.score_threshold is None or self.score_threshold >= 0, "--score-threshold", self.score_threshold,
             "a score >= 0")
        if self.max_bad_images is not None:
            need(0 <= self.max_bad_images <= 1, "--max-bad-images", self.max_bad_images, "a share in 0..1 (0.05 = 5%)")
        need(self.missing_image in MISSING_POLICIES, "--missing-image", self.missing_image,
             "one of " + ", ".join(MISSING_POLICIES))
        if self.no_images and self.images:
            raise ValueError("--no-images and --images are exclusive: drop one")
        if not self.no_images:
            if not self.images:
                raise ValueError("--images is required (or --no-images for a cache without pictures)")
            folder = Path(self.images)
            if not folder.is_dir():
                raise ValueError(f"--images {self.images}: no such folder (pass --no-images to build a cache "
                                 "without pictures on purpose)")
            if next(folder.iterdir(), None) is None:
                raise ValueError(f"--images {self.images}: the folder is empty (pass --no-images to build a "
                                 "cache without pictures on purpose)")


@dataclass
class Summary:
    out: str
    computed: list[str]
    skipped: list[str]
    status_counts: dict[str, int] = field(default_factory=dict)
    bad_causes: dict[str, int] = field(default_factory=dict)  # non-ok images by cause (no-file, corrupt, ...)
    notes: dict[str, int] = field(default_factory=dict)
    num_images: int = 0
    num_objects: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    parts_bytes: int = 0  # temporary disk at assembly: the parts folder
    cache_bytes: int = 0  # the cache written
    stages: dict[str, float] = field(default_factory=dict)  # device stages' wall seconds (detector, crops, ...)
    shard_count: int = 1  # > 1: this run wrote one shard of several (merge them when all are done)
    not_computed: list[str] = field(default_factory=list)  # asked for, kept as cached with other options
    overrides: list[str] = field(default_factory=list)  # paper settings overridden (--override-paper)
    added_images: int = 0  # images a grown cache gained (every group it held computed for them only)

    def __str__(self) -> str:
        lines = [f"wrote {self.out}: computed {', '.join(self.computed) or 'nothing'}"
                 + (f"; kept {', '.join(self.skipped)}" if self.skipped else "")]
        lines += [f"NOT COMPUTED: {note}" for note in self.not_computed]
        lines += [f"OVERRIDE (recorded in provenance): {note}" for note in self.overrides]
        if self.added_images:
            lines.insert(0, f"grew {self.out} by {self.added_images} images (its groups computed for them only, "
                            "with the stage 1 its record names; old rows unchanged)")
        lines.append(f"images {self.num_images}: " + ", ".join(f"{k} {v}" for k, v in self.status_counts.items()))
        if self.bad_causes:
            lines.append("not ok by cause: " + ", ".join(f"{k} {v}" for k, v in sorted(self.bad_causes.items())))
        if self.notes:
            lines.append("conversions: " + ", ".join(f"{k} {v}" for k, v in sorted(self.notes.items())))
        lines.append(f"objects {self.num_objects}")
        if self.cache_bytes:
            lines.append(f"temporary disk: parts {self.parts_bytes / 2**20:.1f} MiB for a "
                         f"{self.cache_bytes / 2**20:.1f} MiB cache")
        total = sum(self.seconds.values()) or 1.0
        for name, seconds in self.seconds.items():
            rate = self.num_images / seconds if seconds > 0 else float("inf")
            lines.append(f"  {name:<24} {seconds:8.2f} s  ({100 * seconds / total:5.1f}%, {rate:8.1f} images/s)")
        if self.stages:
            lines.append("device stages (inside the above):")
            for name, seconds in self.stages.items():
                rate = self.num_images / seconds if seconds > 0 else float("inf")
                lines.append(f"  {name:<24} {seconds:8.2f} s  ({rate:8.1f} images/s)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------- images


def seed_random_init(component: str, random_init: bool) -> None:
    """Random weights are a function of the component name: resumed, sharded and grown caches agree."""
    if random_init:
        torch.manual_seed(int.from_bytes(hashlib.sha1(component.encode()).digest()[:4], "big"))


PATH_OPTIONS = ("--data", "--images", "--out", "--detector-weights", "--resnet-weights")


def absolute_command(argv: list[str]) -> list[str]:
    """argv with path values made absolute: those of PATH_OPTIONS, and any naming an existing path."""
    out, previous = [], ""
    for arg in argv:
        flag, eq, value = arg.partition("=") if arg.startswith("--") and "=" in arg else ("", "", arg)
        path_option = (flag or previous) in PATH_OPTIONS
        if value and not value.startswith("--") and (path_option or os.path.exists(value)):
            value = os.path.abspath(value)
        out.append(f"{flag}={value}" if eq else value)
        previous = arg
    return out


# ----------------------------------------------------------------------------------------- the run


class Extraction(RunModels):
    """One extraction run over one shard: plan, compute chunks, assemble."""

    def __init__(self, opts: ExtractOptions, producers_factory=None):
        from mner.pipeline.data import load_dataset

        opts.validate()
        self.opts = opts
        self.shard = resolve_shard(opts.shard)
        opts.device = resolve_device(opts.device)
        use_device(opts.device)  # events, synchronize and the pin thread on this GPU, not GPU 0
        self.num_workers = default_num_workers() if opts.num_workers is None else opts.num_workers
        self.stages = ImageStages(opts.device, batch_size=opts.batch_size)  # shared by the image producers
        self.out = shard_out_path(opts.out, *self.shard)
        self.dataset = load_dataset(opts.data)
        index, count = self.shard
        self.ids = [i for i in self.dataset.image_ids() if shard_of(i, count) == index]
        self.seconds: dict[str, float] = defaultdict(float)
        self.notes: Counter = Counter()
        self.parts_root = Path(f"{self.out}.parts")
        self._producers_factory = producers_factory  # tests: (extraction, existing) -> (producers, kept)

    # planning --------------------------------------------------------------------------------------
    def _plan(self) -> None:
        opts = self.opts
        self.cache: FeatureCache | None = None
        existing: set[str] = set()
        if os.path.exists(self.out) and not opts.overwrite:
            self.cache = FeatureCache(self.out, in_memory=True)
            if self.cache.image_ids != self.ids:
                raise ValueError(f"{self.out} indexes {self.cache.num_images} other images than --data/--shard "
                                 f"select ({len(self.ids)}); use --overwrite or another --out")
            existing = set(self.cache.groups())
        self.not_computed: list[str] = []
        if self._producers_factory is not None:
            self.plan = None
            self.producers, self.skipped = self._producers_factory(self, existing)
        else:
            self.plan = make_plan(self, existing)
            self.skipped = [group for group in self.plan.groups if group in existing]
            self.producers = [self.producer(group) for group in self.plan.groups if group not in existing]
            self.not_computed = kept_differences(self, self.skipped)
            print(self.plan.describe(existing), flush=True)  # the plan first: each group and who needs it
        self.computed = [p.group for p in self.producers]
        self.groups_now = {p.group: p for p in self.producers}
        config = {k: v for k, v in asdict(opts).items()
                  if k not in ("num_workers", "progress", "out", "shard", "max_bad_images", "command")}
        config.update(computed=self.computed, ids=hashlib.sha256("\n".join(self.ids).encode()).hexdigest(),
                      data_hash=self.dataset.data_hash,  # the posts' text (grounding queries) shapes the parts
                      inputs={p.group: p.input_fingerprint for p in self.producers if hasattr(p, "input_fingerprint")})
        self.config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.parts = self.parts_root / self.config_hash
        self.decode = any(p.needs_pixels for p in self.producers)

    def _lock(self) -> CacheLock:
        """Held from planning to the final rename; covers <out> and <out>.parts (the writer re-enters it)."""
        return CacheLock(self.out)

    # checks before any model runs --------------------------------------------------------------------
    def check_images(self) -> list[LoadedImage]:
        loader = ImageLoader(LoaderSpec(self.opts.images, self.opts.max_image_side, keep_original=False), self.ids,
                             num_workers=self.num_workers)
        bad = [item for item in tqdm(loader, total=len(self.ids), unit="img", desc="checking images",
                                     disable=not self.opts.progress) if item.status != "ok"]
        loader.close()
        return bad

    def _check_image_drift(self) -> None:
        """A grown cache must describe the same pictures: changed/restored/newly missing images refuse the run."""
        if self.cache is None or not self.decode:
            return
        stored = self._stored_fingerprints()
        changed, restored, vanished = [], [], []
        for row, image_id in enumerate(tqdm(self.ids, desc="fingerprints", unit="img", disable=not self.opts.progress)):
            now = file_fingerprint(self.opts.images, image_id)
            before = stored[row] if stored is not None else None
            had_file = bool(before) if before is not None else self._had_file(row)
            if now and not had_file:
                restored.append(image_id)
            elif had_file and not now:
                vanished.append(image_id)
            elif now and before and now != before:
                changed.append(image_id)
        if changed or restored or vanished:
            def show(ids):
                return ", ".join(ids[:5]) + (f" (+{len(ids) - 5} more)" if len(ids) > 5 else "")

            parts = [f"{name} {len(ids)}: {show(ids)}" for name, ids in
                     (("changed", changed), ("restored", restored), ("newly missing", vanished)) if ids]
            raise ImageError(f"{self.out} was built from other image files than --images now holds ("
                             + "; ".join(parts) + "). Its groups would describe other pictures than the new ones: "
                             "rebuild with --overwrite, or restore the images it was built from.")

    def _verify_groups_read(self) -> None:
        """Groups of the cache that this run's producers read (boxes, crops, CLIP embeddings) are checked
        against their checksums first: a new group is never built on bytes that changed on disk."""
        if self.cache is None:
            return
        import h5py

        from mner.pipeline.cache.integrity import verify_group

        read = {path.rsplit("/", 1)[0] for p in self.producers for path in p.reads}
        read = sorted(read & set(self.cache.groups()) - set(self.computed))
        if not read:
            return
        with h5py.File(self.out, "r") as handle:
            bad = [check for check in (verify_group(handle[name], name) for name in read) if not check.ok]
        if bad:
            raise ValueError(f"{self.out}: {', '.join('/' + c.group for c in bad)} no longer match their checksums "
                             f"({'; '.join(c.problem for c in bad)}); the new groups would be built on changed data. "
                             f"Check the file with `mner-features verify {self.out}` and rebuild it with --overwrite")

    def _had_file(self, row: int) -> bool:
        """A cache from before fingerprints: did image ``row`` have a file? (from its status and detail)"""
        if STATUS_NAMES[self.cache.status[row]] == "missing":
            return False
        return not self.cache.detail(row).startswith(("missing", "no-file", "no file", "no-images-folder"))

    def _stored_fingerprints(self) -> list[str] | None:
        if not self.cache.has("images/content_sha256"):
            return None  # a cache from before fingerprints: statuses are compared instead
        return [bytes(self.cache.read("images/content_sha256", row)).decode() for row in range(len(self.ids))]

    # main loop ------------------------------------------------------------------------------------
    def check_out(self) -> str:
        """The output rule (pipeline/outputs.py): an existing --out must be an mner cache (extended, or replaced
        with --overwrite), never an input, in a writable folder; checked before the lock file is created."""
        from mner.pipeline.outputs import check_output

        inputs = [self.opts.data, *self.dataset.files.values(), *([self.opts.images] if self.opts.images else [])]
        return check_output(self.out, kind="cache", overwrite=self.opts.overwrite, inputs=inputs, extend=True)

    def run(self) -> Summary:
        self.check_out()
        with self._lock():
            try:
                return self._run()
            except BaseException:
                self._remove_empty_parts()
                raise

    def _run(self) -> Summary:
        opts = self.opts
        self._plan()
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
        self._check_image_drift()
        self._verify_groups_read()
        for producer in self.producers:
            with self._timed(f"load {producer.group}"):
                producer.load()
            check_producer(producer)
        self.part_groups = self._part_groups()
        self._template: dict[str, dict] | None = None
        self.parts.mkdir(parents=True, exist_ok=True)
        # a shard without images still writes one (empty) part: its cache merges with the other shards
        chunks = [self.ids[s:s + opts.chunk_size] for s in range(0, len(self.ids), opts.chunk_size)] or [[]]
        paths = part_paths(self.parts, len(chunks))
        bar = tqdm(total=len(self.ids), unit="img", desc=f"extract {Path(self.out).name}",
                   disable=not opts.progress)
        started, bad, self.status_counts = time.perf_counter(), Counter(), Counter()
        finished = {}  # part index -> its image table (read once: to check it, then to count statuses)
        for k, (chunk, path) in enumerate(zip(chunks, paths)):
            images = self._current_part(path, chunk) if path.exists() else None
            if images is None:
                path.unlink(missing_ok=True)  # unreadable, or its image files changed since it was computed
            else:
                finished[k] = images
        todo = [k for k in range(len(paths)) if k not in finished]
        # one loader for the whole shard: its workers decode the next chunks while the device works
        self.loader = ImageLoader(self._loader_spec(), [i for k in todo for i in chunks[k]],
                                  num_workers=self.num_workers, pin_memory=self.stages.device.type == "cuda") \
            if self.decode and todo else None
        self.stages.writer = writer = BackgroundWriter()  # JPEG crops and chunk files, off the device's path
        clock, pending = self.stages.clock, []
        loop_wall, loop_cpu = time.perf_counter(), time.thread_time()
        try:
            for k, (chunk, path) in enumerate(zip(chunks, paths)):
                if k in todo:
                    rows = self._process_chunk(chunk, k * opts.chunk_size)
                    statuses, causes = [STATUS_NAMES[s] for s in rows.images["status"]], rows.causes
                    pending.append(writer.submit(write_part, path, rows, self.part_groups))
                else:
                    statuses, causes = finished[k].status, finished[k].causes
                self.status_counts.update(statuses)
                if self.decode:  # a run that decodes nothing keeps the cache's statuses: nothing new is bad
                    bad.update(c for s, c in zip(statuses, causes) if s != "ok")
                self._check_bad_share(bad)
                bar.update(len(chunk))
                bar.set_postfix_str(f"{bar.n / max(time.perf_counter() - started, 1e-9):.1f} images/s")
            with clock("wait for writer", device=False):
                for future in pending:
                    future.result()  # every chunk file is complete (and a writer error surfaces) before assembly
            self.loop_stats = {"images": sum(len(chunks[k]) for k in todo), "wall": time.perf_counter() - loop_wall,
                               "main_thread_cpu": time.thread_time() - loop_cpu,
                               "forward_thread_cpu": clock.forward_thread_cpu(),
                               "device_seconds": clock.device_seconds()}
        except BaseException:
            writer.close()  # no chunk file appears after the error handling below
            if self.parts.is_dir() and self._bad_share_exceeded(bad):
                shutil.rmtree(self.parts, ignore_errors=True)
            raise
        finally:
            writer.close()
            if self.loader is not None:
                self.loader.close()
        bar.close()
        self.bad_causes = bad
        self.parts_bytes = folder_bytes(self.parts_root)
        with self._timed("assemble (merge of the parts)"):
            self._assemble(paths)
        shutil.rmtree(self.parts_root, ignore_errors=True)
        return self._summary()

    def _remove_empty_parts(self) -> None:
        """A run that stops before finishing any chunk leaves no .parts folder behind."""
        for folder in (getattr(self, "parts", None), self.parts_root):
            if folder is not None and folder.is_dir() and not any(folder.rglob(PART_GLOB)):
                shutil.rmtree(folder, ignore_errors=True)

    def _loader_spec(self) -> LoaderSpec:
        """What the loader's workers prepare, collected from the producers that take tensors."""
        detector, inputs = None, {}
        for producer in self.producers:
            wants = producer.pixel_inputs()
            detector = wants.get("detector", detector)
            if "encoder" in wants:
                inputs[wants["encoder"]] = None
        return LoaderSpec(self.opts.images, self.opts.max_image_side, detector, tuple(inputs))

    def _bad_share_exceeded(self, bad: Counter) -> bool:
        share = self.opts.max_bad_images
        return share is not None and sum(bad.values()) > share * len(self.ids)

    def _current_part(self, path: Path, chunk: list[str]) -> PartImages | None:
        """A finished part's image table when it is resumed: it is readable and its images are the same
        files (content fingerprints). None: it is computed again."""
        try:
            stored = read_part_images(path)
        except (OSError, KeyError, ValueError):  # unreadable (a damaged disk): recompute it
            return None
        if stored.ids != chunk:
            return None
        if self.decode and stored.fingerprints != [file_fingerprint(self.opts.images, i) for i in chunk]:
            return None
        return stored

    def _check_bad_share(self, bad: Counter) -> None:
        share = self.opts.max_bad_images
        if share is None or sum(bad.values()) <= share * len(self.ids):
            return
        shutil.rmtree(self.parts, ignore_errors=True)  # chunks of a rejected input are never resumed
        self._remove_empty_parts()
        causes = ", ".join(f"{k} {v}" for k, v in sorted(bad.items()))
        raise ImageError(f"{sum(bad.values())} of {len(self.ids)} images are not usable ({causes}), more than "
                         f"--max-bad-images {share:g}; check --images {self.opts.images} or raise the share")

    def _timed(self, name: str):
        seconds = self.seconds

        class _Timer:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                seconds[name] += time.perf_counter() - self.start

        return _Timer()

    # one chunk --------------------------------------------------------------------------------------
    def _load_chunk(self, chunk: list[str], first_row: int) -> list[LoadedImage | DecodedImage]:
        """Decoded images after the missing-image policy; statuses from the cache when nothing needs pixels."""
        if not self.decode:
            return [LoadedImage(image_id, STATUS_NAMES[self.cache.status[first_row + i]])
                    for i, image_id in enumerate(chunk)]
        with self.stages.clock("wait for images", device=False):
            decoded = self.loader.take(len(chunk))
        loaded = []
        for row, item in enumerate(decoded, start=first_row):
            self.notes.update(note.split(" ")[0] for note in item.notes)
            if item.status != "ok" and self.opts.missing_image == "placeholder":  # features of the gray image
                item = replace(item, status="placeholder", detail=f"{item.status}: {item.detail}")
            if self.cache is not None and STATUS_NAMES[self.cache.status[row]] != item.status:
                raise ImageError(f"image {item.image_id}: {self.out} has it as "
                                 f"{STATUS_NAMES[self.cache.status[row]]}, --images now gives {item.status} "
                                 f"({item.detail or 'readable'}); rebuild with --overwrite")
            loaded.append(item)
        return loaded

    def _process_chunk(self, chunk: list[str], first_row: int) -> ChunkRows:
        loaded = self._load_chunk(chunk, first_row)
        rows = [first_row + i for i in range(len(chunk))]
        if self.decode:
            images = {"status": np.array([STATUS_NAMES.index(item.status) for item in loaded], np.uint8),
                      "detail": [item.detail for item in loaded],
                      "width": np.array([item.width for item in loaded], np.int32),
                      "height": np.array([item.height for item in loaded], np.int32),
                      "content_sha256": [item.fingerprint for item in loaded]}
            causes = [item.cause for item in loaded]
        else:  # the cache's own image table (nothing was decoded)
            images = self._cached_images(rows)
            causes = [cause_of(STATUS_NAMES[s], d) for s, d in zip(images["status"], images["detail"])]
        part = ChunkRows(ids=list(chunk), images=images, causes=causes)
        computed_ok = [i for i, item in enumerate(loaded) if item.status == "ok"]
        kinds = [("ok", computed_ok.index(i)) if item.status == "ok" else
                 ("placeholder", 0) if item.status == "placeholder" else ("none", 0)
                 for i, item in enumerate(loaded)]
        outputs: dict[str, dict] = {}  # group -> key -> full-chunk rows (this run's groups)
        shared: dict = {}  # one scratch dict for every producer of this chunk (decoded/resized crops, ...)
        counts: dict[str, np.ndarray] = {}  # ragged row kind -> per-image counts in this chunk
        ok_items = [loaded[i] for i in computed_ok]
        owned = {p.owned_index for p in self.producers if p.owned_index}
        for index in self._ragged_indexes():
            if index not in owned:
                counts[index] = self._cached_counts(index, rows)
        for producer in self.producers:
            if getattr(producer, "every_image", False):  # rows independent of the picture (user files)
                batch = self._batch(producer, loaded, rows, list(range(len(loaded))), outputs, counts)
                with self._timed(producer.group):
                    outputs[producer.group] = producer.produce(batch)
                if producer.owned_index:
                    counts[producer.owned_index] = outputs[producer.group]["counts"]
                continue
            batch = self._batch(producer, ok_items, [rows[i] for i in computed_ok], computed_ok, outputs, counts)
            batch.shared = shared
            with self._timed(producer.group):
                produced = producer.produce(batch) if len(batch) else self._empty(producer)
            template = self._placeholder_template(rows, loaded) if any(k == "placeholder" for k, _ in kinds) else {}
            outputs[producer.group] = self._splice(producer, produced, template.get(producer.group), kinds, counts)
            if producer.owned_index:
                counts[producer.owned_index] = outputs[producer.group]["counts"]
        part.counts = {index: counts[index] for index in self._ragged_indexes()}
        part.rows = {group: {key: values[key] for key in self.groups_now[group].row_datasets()}
                     for group, values in outputs.items()}  # ragged bytes: lists, resolved by the part writer
        return part

    def _cached_images(self, rows: list[int]) -> dict:
        """write_images keywords for cache rows ``rows`` (a run that decodes nothing)."""
        cache = self.cache
        images = {"status": np.asarray(cache.status)[rows] if rows else np.zeros(0, np.uint8),
                  "detail": [cache.detail(row) for row in rows],
                  "width": np.array([cache.read("images/width", row) for row in rows], np.int32),
                  "height": np.array([cache.read("images/height", row) for row in rows], np.int32)}
        if cache.has("images/content_sha256"):
            images["content_sha256"] = [bytes(cache.read("images/content_sha256", row)).decode() for row in rows]
        return images

    def _part_groups(self) -> list[PartGroup]:
        """How every part writes this run's groups: borrowed indexes (sets made by an earlier run), then
        the producers' groups in run order (owners before the groups that follow their index)."""
        owned = {p.owned_index for p in self.producers if p.owned_index}
        groups = []
        for index in self._ragged_indexes():
            if index not in owned:
                owner, key = index.rsplit("/", 1)
                groups.append(PartGroup(owner, self.cache.provenance(owner), own_index=key, borrowed=True))
        self.run_provenance = {p.group: self._provenance(p) for p in self.producers}
        for producer in self.producers:
            own = producer.owned_index.rsplit("/", 1)[1] if producer.owned_index else None
            groups.append(PartGroup(producer.group, self.run_provenance[producer.group], producer.attrs(),
                                    own_index=own, globals=producer.global_datasets() or {}))
        return groups

    def _ragged_indexes(self) -> list[str]:
        """The index datasets slicing the rows of this run's ragged datasets (``objects/maskrcnn/offsets``)."""
        return sorted({index for p in self.producers for key in p.row_datasets() if (index := ragged_index(p, key))})

    def _cached_counts(self, index: str, rows: list[int]) -> np.ndarray:
        """Per-image counts of a ragged set whose owner group is in the cache (not computed now)."""
        if self.cache is None or not self.cache.has(index):
            raise ValueError(f"rows indexed by {index} need that index in the cache or computed in this run")
        return np.array([self.cache.count(index, row) for row in rows], np.int64)

    def _batch(self, producer: Producer, items: list[LoadedImage], rows: list[int], positions: list[int],
               outputs: dict, counts: dict) -> ChunkBatch:
        """What ``producer`` sees: its inputs from this run's chunk outputs, else from the cache."""
        pil = producer.needs_pixels and producer.pixels == "pil"  # a PIL copy only for producers that want one
        batch = ChunkBatch(image_ids=[item.image_id for item in items],
                           images=[item.image if pil else None for item in items],
                           scales=[item.scale for item in items],
                           decoded=items if producer.needs_pixels and producer.pixels == "tensors" else None)
        for path in producer.reads:
            batch.inputs[path] = [self._value(path, row, i, outputs, counts) for row, i in zip(rows, positions)]
        return batch

    def _value(self, path: str, row: int, i: int, outputs: dict, counts: dict):
        """Dataset ``path`` for cache row ``row`` (position ``i`` in the chunk): this run's value or the cache's."""
        _, dataset = dataset_spec(path)
        group = path.rsplit("/", 1)[0]
        if group in outputs:
            values = outputs[group][dataset.name]
            if dataset.per_image_kind == "image":
                return values[i]
            starts = segments(counts[index_path(group, dataset.rows)])
            return values[starts[i]:starts[i + 1]]
        return self.cache.read(path, row)

    def _empty(self, producer: Producer) -> dict:
        out = {"counts": np.zeros(0, np.int64)} if producer.owned_index else {}
        for key in producer.row_datasets():
            dataset = producer.spec.dataset(key)
            shape = (0, *producer.row_shape(key))
            out[key] = [] if dataset.ragged_values else np.zeros(shape, np.dtype(dataset.dtype))
        return out

    def _splice(self, producer: Producer, produced: dict, template: dict | None, kinds, counts) -> dict:
        """Full-chunk rows: ok rows from ``produced``, placeholder rows from the template, others empty/zero."""
        own_counts = None
        if producer.owned_index:
            tcount = int(template["counts"][0]) if template else 0
            own_counts = np.array([produced["counts"][j] if k == "ok" else tcount if k == "placeholder" else 0
                                   for k, j in kinds], np.int64)
        out = {"counts": own_counts} if producer.owned_index else {}
        for key in producer.row_datasets():
            values, dataset = produced[key], producer.spec.dataset(key)
            rows, ragged_bytes = dataset.per_image_kind, dataset.ragged_values
            if rows == "image" and ragged_bytes:  # per-image bytes (e.g. caption text)
                out[key] = [values[j] if k == "ok" else template[key][0] if k == "placeholder" else b""
                            for k, j in kinds]
                continue
            if rows == "image":
                full = np.zeros((len(kinds), *producer.row_shape(key)), np.dtype(dataset.dtype))
                for i, (k, j) in enumerate(kinds):
                    if k == "ok":
                        full[i] = values[j]
                    elif k == "placeholder":
                        full[i] = template[key][0]
                out[key] = full
                continue
            index = ragged_index(producer, key)
            per_ok = produced["counts"] if index == producer.owned_index else \
                np.array([c for c, (k, _) in zip(counts[index], kinds) if k == "ok"], np.int64)
            starts = segments(per_ok)
            pieces = []
            for k, j in kinds:
                if k == "ok":
                    pieces.append(values[starts[j]:starts[j + 1]])
                elif k == "placeholder":
                    pieces.append(template[key])
            if ragged_bytes:
                out[key] = [crop for piece in pieces for crop in piece]
            else:
                out[key] = np.concatenate(pieces).astype(np.dtype(dataset.dtype)) if pieces else \
                    np.zeros((0, *producer.row_shape(key)), np.dtype(dataset.dtype))
        return out

    def _placeholder_template(self, rows: list[int], loaded: list[LoadedImage]) -> dict[str, dict]:
        """Every producer's rows for the gray image, computed once per run and copied into placeholder rows."""
        if self._template is None:
            row = rows[[item.status for item in loaded].index("placeholder")]
            gray = placeholder_image()
            decoded = [prepared_image(self._loader_spec(), gray, "<placeholder>")]  # as the loader's workers would
            outputs, counts, shared = {}, {}, {}
            with self._timed("placeholder (once)"):
                for producer in self.producers:
                    tensors = producer.needs_pixels and producer.pixels == "tensors"
                    batch = ChunkBatch(["<placeholder>"], [gray if producer.needs_pixels and not tensors else None],
                                       [1.0], decoded=decoded if tensors else None, shared=shared)
                    for path in producer.reads:
                        batch.inputs[path] = [self._template_value(path, row, outputs, counts)]
                    outputs[producer.group] = producer.produce(batch)
                    if producer.owned_index:
                        counts[producer.owned_index] = outputs[producer.group]["counts"]
            self._template = outputs
        return self._template

    def _template_value(self, path: str, row: int, outputs: dict, counts: dict):
        _, dataset = dataset_spec(path)
        group = path.rsplit("/", 1)[0]
        if group in outputs:
            values = outputs[group][dataset.name]
            return values if dataset.per_image_kind != "image" else values[0]
        return self.cache.read(path, row)

    # assembly ------------------------------------------------------------------------------------------
    def _assemble(self, paths: list[Path]) -> None:
        """The merge of the parts into the cache (its writer's temp file, then an atomic rename)."""
        import h5py

        from mner.pipeline.cache.merge import merge_parts_into

        self._check_space()
        with CacheWriter(self.out, overwrite=self.opts.overwrite) as writer:
            merge_parts_into(writer.file, paths, ids=self.ids, groups=self.computed, provenance=self.run_provenance)
            writer.write_posts(self.dataset)
        with h5py.File(self.out, "r") as handle:
            self.num_objects = sum(int(handle[p.owned_index][-1]) for p in self.producers if p.owned_index and
                                   get_group(p.group).dataset(p.owned_index.rsplit("/", 1)[1]).indexes == "object")
        self.cache_bytes = os.path.getsize(self.out)

    def _check_space(self) -> None:
        """The temp cache holds the existing cache plus the chunks: refuse before writing when it cannot fit
        (HDF5 may not fail cleanly on a disk that fills mid-write); the chunks are kept for the rerun."""
        from mner.pipeline.outputs import check_free_space

        existing = os.path.getsize(self.out) if os.path.exists(self.out) and not self.opts.overwrite else 0
        needed = int((folder_bytes(self.parts) + existing) * 1.1) + (1 << 20)  # the temp: the cache + the parts' rows
        check_free_space(os.path.dirname(os.path.abspath(self.out)), needed, what="assembling the cache")

    def _provenance(self, producer: Producer) -> dict:
        fields = dict(producer.provenance())
        index, count = self.shard
        core = {k: fields.pop(k) for k in ("model", "pretrained", "preprocessing", "thresholds")}
        extra = dict(fields, random_init=core["pretrained"] == "random",
                     missing_image=self.opts.missing_image, max_image_side=self.opts.max_image_side,
                     images=os.path.abspath(self.opts.images) if self.opts.images else "none (--no-images)",
                     command=absolute_command(self.opts.command or sys.argv), cwd=os.getcwd())
        if getattr(self, "plan", None) is not None:
            extra["for_models"] = sorted(self.plan.needed_by.get(producer.group, []))
            if self.plan.overrides:
                extra["paper_overrides"] = list(self.plan.overrides)
        return make_provenance(producer.group, image_ids=self.ids, extra=extra,
                               shard=shard_record(index, count, self.dataset.image_ids()), **core)

    def _summary(self) -> Summary:
        counts = getattr(self, "status_counts", None)
        if counts is None and os.path.exists(self.out):
            counts = Counter(STATUS_NAMES[s] for s in FeatureCache(self.out).status)
        return Summary(out=self.out, computed=self.computed, skipped=self.skipped,
                       status_counts=dict(counts or {}), bad_causes=dict(getattr(self, "bad_causes", {})),
                       notes=dict(self.notes), num_images=len(self.ids), num_objects=getattr(self, "num_objects", 0),
                       seconds=dict(self.seconds), parts_bytes=getattr(self, "parts_bytes", 0),
                       cache_bytes=getattr(self, "cache_bytes", 0),
                       stages={k: v for k, v in self.stages.clock.wall.items() if k in self.stages.clock.device_stages},
                       shard_count=self.shard[1], not_computed=list(getattr(self, "not_computed", [])),
                       overrides=list(self.plan.overrides) if getattr(self, "plan", None) else [])


def ragged_index(producer: Producer, key: str) -> str | None:
    """The index slicing a producer's ragged dataset (``objects/maskrcnn/offsets``), None for image rows."""
    dataset = producer.spec.dataset(key)
    return index_path(producer.group, dataset.rows) if is_ragged(dataset.rows) else None


def check_producer(producer: Producer) -> None:
    """What a producer makes must be declared, and cover what its spec requires (before any chunk runs)."""
    spec = producer.spec
    for key in producer.row_datasets():
        spec.dataset(key)  # an undeclared name raises, naming the declared ones
    made = set(producer.row_datasets()) | set(producer.global_datasets())
    missing = [d.name for d in spec.datasets if d.required and d.rows != "index" and d.name not in made]
    if missing:
        raise ValueError(f"producer of {producer.group} makes no {', '.join(missing)}, which its spec requires")


def run_extraction(opts: ExtractOptions) -> Summary:
    """One extraction; an existing cache whose images are a subset of ``--data``'s first grows by the new
    images (``rebuild.py``: every group it holds, computed for them only, with its recorded stage 1)."""
    from mner.features.run.rebuild import grow_for_options

    added = grow_for_options(opts)
    summary = Extraction(opts).run()
    summary.added_images = added
    return summary
