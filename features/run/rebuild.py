"""Stage 1 from a cache's own record: rebuild its producers from provenance, and grow caches with new images.

A cache's provenance names, per group, the model, its weights (tag, file and sha256, or "random"),
thresholds, input sizes, crop settings and prompt set. :func:`recorded_options` turns that record back
into the options of the extraction that made it, so new images get exactly the same stage 1:

- ``mner-features extract --data MORE_POSTS --out EXISTING.h5`` grows a cache: every group it holds is
  computed for the new image ids only (:func:`grow_cache`), old rows are copied byte for byte;
- ``mner-train predict RUN --images DIR`` and ``mner.Tagger`` extract images the run's cache lacks into a
  side cache (:func:`extend_side_cache`), through the trainer's one lazy door
  (``mner.trainer.inference.stage1``).

Weights are checked before anything runs: a local file whose sha256 differs from the record is refused
naming the path and both hashes; a file that cannot be found is named with the flag that points at a
local copy. After the run every rebuilt group's provenance must equal the record apart from the fields
that describe a run (:data:`RUN_FIELDS`), and its global arrays (prompt embeddings) must be identical;
otherwise nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from mner.pipeline.cache import FeatureCache

# Provenance fields that describe one run rather than the features: they may differ between a grown
# cache and a cache built in one go over the same images.
RUN_FIELDS = frozenset({"created", "command", "cwd", "image_list_hash", "num_images", "shard", "merge", "images",
                        "grown", "versions"})

# The extract flag that points at a local copy of each group's weights, and the ExtractOptions field it sets.
WEIGHT_FLAGS = {"objects": ("--detector-weights", "detector_weights"),
                "encoders/resnet152": ("--resnet-weights", "resnet_weights"),
                "encoders/clip": ("--clip-pretrained", "clip_pretrained"),
                "encoders/swin": ("--swin-model", "swin_model")}


class RebuildError(ValueError):
    """A cache's record cannot be reproduced here (weights missing or different, a group without a rebuild)."""


def _flag_value(command: list[str], flag: str) -> str | None:
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _sha256(path: Path) -> str:
    from mner.pipeline.cache import weights_tag

    return weights_tag(path).split(":", 1)[1]


def feature_groups(cache: FeatureCache) -> list[str]:
    return [g for g in cache.groups() if g not in ("images", "posts")]


def recorded_options(cache: FeatureCache, *, weights: dict[str, str] | None = None) -> dict:
    """ExtractOptions fields that remake every feature group of ``cache``.

    ``weights``: local copies, by extract flag (``{"--detector-weights": "/models/maskrcnn.pth"}``); a
    recorded local file that has moved is looked up there. Raises :class:`RebuildError`."""
    weights = dict(weights or {})
    options: dict = {"encoders": [], "prompts": []}
    random_init = set()
    for group in feature_groups(cache):
        record = cache.provenance(group)
        random_init.add(record.get("pretrained") == "random")
        options.setdefault("missing_image", record.get("missing_image", "placeholder"))
        options.setdefault("max_image_side", record.get("max_image_side", 2048))
        if group == "objects":
            thresholds, pre, crops = record["thresholds"], record["preprocessing"], record.get("crops", {})
            options.update(detector=record["detector"], top_k=int(thresholds["top_k"]),
                           score_threshold=float(thresholds["score_threshold"]),
                           detector_min_size=int(pre["min_size"]),
                           crop_max_side=int(crops.get("max_side", 384)), crop_quality=int(crops.get("quality", 90)))
            if "detectron2_config" in pre:
                options["detectron2_config"] = pre["detectron2_config"]
        elif group.startswith("encoders/") and "encoder" in record:
            options["encoders"].append(record["encoder"])
            for key in ("clip_model", "clip_pretrained"):
                if key in record:
                    options[key] = record[key]
            if record["encoder"] == "swin" and isinstance(record.get("checkpoint"), dict):
                options["swin_model"] = record["checkpoint"].get("source", options.get("swin_model"))
        elif group.startswith("prompts/") and "prompt_set" in record:
            options["prompts"].append(record["prompt_set"])
        else:
            raise RebuildError(f"{cache.path}: group {group} cannot be rebuilt from its record yet (only objects, "
                               "encoders and prompt sets can); extract it with its own flags")
        _local_weights(cache, group, record, options, weights)
    if len(random_init) > 1:
        raise RebuildError(f"{cache.path}: some groups have random weights and others not; it cannot be rebuilt")
    options["random_init"] = random_init == {True}
    if "detector" not in options and (options["encoders"] or options["prompts"]):
        raise RebuildError(f"{cache.path}: encoders without objects cannot be rebuilt (crops need boxes)")
    return options


def _local_weights(cache, group: str, record: dict, options: dict, weights: dict) -> None:
    """A group made from a local weights file: find the file and check its sha256 against the record."""
    pretrained = str(record.get("pretrained", ""))
    if not pretrained.startswith("sha256:") or group not in WEIGHT_FLAGS:
        return
    flag, field = WEIGHT_FLAGS[group]
    recorded = pretrained.split(":", 1)[1]
    path = weights.get(flag) or _flag_value(record.get("command") or [], flag)
    if path is None or not Path(path).is_file():
        raise RebuildError(f"{cache.path}: {group} was made with local weights (sha256 {recorded}) from "
                           f"{path or 'a file the record does not name'}, which is not here; pass a local copy "
                           f"with {flag} PATH (mner-train predict: --stage1-weights {flag.lstrip('-')}=PATH)")
    found = _sha256(Path(path))
    if found != recorded:
        raise RebuildError(f"{cache.path}: {group} weights {path} have sha256 {found}, but the cache's record "
                           f"says {recorded}: these are other weights; pass the recorded file with {flag} PATH")
    options[field] = str(path)


def comparable(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in RUN_FIELDS}


def check_same_record(made: FeatureCache, reference: FeatureCache) -> None:
    """Every group of ``made`` must describe the same stage 1 as ``reference``'s: provenance equal except
    RUN_FIELDS, global arrays identical. Library version changes are allowed (recorded in ``versions``)."""
    import numpy as np

    problems = []
    for group in feature_groups(reference):
        if group not in made.groups():
            problems.append(f"{group}: not made")
            continue
        want, got = comparable(reference.provenance(group)), comparable(made.provenance(group))
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                problems.append(f"{group}.{key}: record {json.dumps(want.get(key))[:160]}, "
                                f"now {json.dumps(got.get(key))[:160]}")
        for name in _global_paths(reference, group):
            if not np.array_equal(np.asarray(reference.read_global(name)), np.asarray(made.read_global(name))):
                problems.append(f"{name}: global values differ from the record's (another text tower or prompt file)")
    if problems:
        raise RebuildError(f"stage 1 rebuilt from {reference.path}'s record does not reproduce it: "
                           + "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else ""))


def _global_paths(cache: FeatureCache, group: str) -> list[str]:
    from mner.pipeline.cache import get_group

    try:
        spec = get_group(group)
    except KeyError:
        return []
    return [f"{group}/{d.name}" for d in spec.datasets if d.rows == "global" and cache.has(f"{group}/{d.name}")
            and d.dtype not in ("uint8",)]


# ----------------------------------------------------------------------------------------- running it


def _posts_file(folder: Path, image_ids: list[str]) -> Path:
    """A data file naming ``image_ids`` (one placeholder word each): the extraction reads ids from posts."""
    path = folder / "test.txt"
    path.write_text("".join(f"IMGID:{image_id}\n-\tO\n\n" for image_id in image_ids), encoding="utf-8")
    return path


def extract_new_images(reference: FeatureCache, image_ids: list[str], images_dir: str | os.PathLike, out: Path, *,
                       data: str | os.PathLike | None = None, device: str = "auto", progress: bool = True,
                       weights: dict[str, str] | None = None, batch_size: int = 32, chunk_size: int = 64,
                       num_workers: int | None = None) -> None:
    """Extract ``image_ids`` into the new cache ``out`` with the producers of ``reference``'s record, then
    check that the result describes the same stage 1 (else ``out`` is removed and RebuildError raised)."""
    from mner.features.run.extract import Extraction, ExtractOptions

    options = recorded_options(reference, weights=weights)
    with tempfile.TemporaryDirectory(prefix="mner-rebuild-") as scratch:
        posts = data if data is not None else _posts_file(Path(scratch), image_ids)
        opts = ExtractOptions(data=str(posts), images=str(images_dir), out=str(out), device=device,
                              batch_size=batch_size, chunk_size=chunk_size, num_workers=num_workers,
                              progress=progress, command=["mner-features", "extract", "(rebuilt from the record of",
                                                          str(Path(reference.path).resolve()) + ")"],
                              **options)
        extraction = Extraction(opts, producers_factory=_keep_models_loaded(options, opts.device))
        extraction.ids = sorted(image_ids)  # only the new images, whatever else the posts name
        extraction.run()
    try:
        check_same_record(FeatureCache(out), reference)
    except RebuildError:
        Path(out).unlink(missing_ok=True)
        raise


_LOADED_MODELS: dict[tuple, object] = {}  # (group, options, device) -> built detector / encoder, per process


def _keep_models_loaded(options: dict, device: str):
    """The extraction's planner, with each producer's model built once per process and reused by later calls
    (a Tagger extracting new images call after call loads its detector and encoders once)."""
    import functools

    from mner.features.run.plan import plan_producers

    def factory(extraction, existing):
        producers, skipped = plan_producers(extraction, existing)
        for producer in producers:
            build = getattr(producer, "_build", None)
            if callable(build):
                key = (producer.group, json.dumps(options, sort_keys=True, default=str), str(device))
                producer._build = functools.partial(_loaded, key, build)
        return producers, skipped

    return factory


def _loaded(key: tuple, build):
    if key not in _LOADED_MODELS:
        _LOADED_MODELS[key] = build()
    return _LOADED_MODELS[key]


def extend_side_cache(reference: str | os.PathLike, side_cache: str | os.PathLike, image_ids: list[str],
                      images_dir: str | os.PathLike, *, device: str = "auto", progress: bool = True,
                      weights: dict[str, str] | None = None) -> int:
    """Add the ``image_ids`` ``side_cache`` lacks, extracted with ``reference``'s stage-1 record; returns
    how many were added. The side cache is itself a cache with the same groups (reused by later calls)."""
    reference_cache = FeatureCache(reference)
    side_cache = Path(side_cache)
    have = set(FeatureCache(side_cache).image_ids) if side_cache.exists() else set()
    new = sorted(set(image_ids) - have)
    if not new:
        return 0
    from mner.pipeline.cache import CacheLock

    side_cache.parent.mkdir(parents=True, exist_ok=True)
    with CacheLock(side_cache), tempfile.TemporaryDirectory(prefix="mner-side-", dir=side_cache.parent) as scratch:
        fresh = Path(scratch) / "new.h5"
        extract_new_images(reference_cache, new, images_dir, fresh, device=device, progress=progress,
                           weights=weights, num_workers=0 if len(new) < 64 else None)  # no worker start-up for a few
        if side_cache.exists():
            grow_merge(side_cache, fresh)
        else:
            shutil.move(str(fresh), side_cache)
    return len(new)


def grow_merge(cache: Path, additions: Path, *, posts_from: Path | None = None) -> None:
    """Replace ``cache`` by the union of its images and ``additions``' (disjoint ids, same stage 1)."""
    from mner.pipeline.cache.merge import merge_caches

    merged = cache.with_name(cache.name + ".grown.h5")
    merge_caches([cache, additions], merged, grow=True, posts_from=posts_from, overwrite=True)  # our temp name
    os.replace(merged, cache)


def grow_cache(out: str | os.PathLike, data: str | os.PathLike, images_dir: str | os.PathLike, new_ids: list[str],
               *, device: str = "auto", progress: bool = True, weights: dict[str, str] | None = None,
               batch_size: int = 32, chunk_size: int = 64, num_workers: int | None = None) -> int:
    """``mner-features extract`` on a cache whose image ids are a subset of ``data``'s: every group the cache
    holds is computed for ``new_ids`` only, with the producers its record names; old rows stay byte for
    byte (compared by id: rows move, ids are sorted); the posts become ``data``'s. Returns len(new_ids)."""
    from mner.pipeline.cache import CacheLock

    out = Path(out)
    reference = FeatureCache(out)
    with CacheLock(out), tempfile.TemporaryDirectory(prefix="mner-grow-", dir=out.parent) as scratch:
        fresh = Path(scratch) / "new.h5"
        extract_new_images(reference, new_ids, images_dir, fresh, data=data, device=device, progress=progress,
                           weights=weights, batch_size=batch_size, chunk_size=chunk_size, num_workers=num_workers)
        grow_merge(out, fresh, posts_from=fresh)
    return len(new_ids)


def grow_for_options(opts) -> int:
    """``mner-features extract`` onto an existing cache: when ``--data`` names images the cache lacks and
    every image it holds, grow it first (the user's weight flags serve as local copies). Returns the count."""
    from mner.features.run.sharding import resolve_shard
    from mner.pipeline.data import load_dataset
    from mner.pipeline.outputs import is_mner_cache

    out = Path(opts.out)
    if opts.overwrite or opts.no_images or not out.is_file() or not is_mner_cache(out):
        return 0  # nothing to grow: the extraction itself checks --out (pipeline/outputs.py)
    have = FeatureCache(out).image_ids
    wanted = load_dataset(opts.data).image_ids()
    new = sorted(set(wanted) - set(have))
    if not new or not set(have) <= set(wanted):
        return 0  # same images, or other ones: the extraction itself says what to do
    if resolve_shard(opts.shard)[1] > 1:
        raise RebuildError(f"{out}: growing a cache by {len(new)} images runs in one process; drop --shard")
    given = {flag: getattr(opts, field) for flag, field in WEIGHT_FLAGS.values()
             if field in ("detector_weights", "resnet_weights") and getattr(opts, field)}
    return grow_cache(out, opts.data, opts.images, new, device=opts.device, progress=opts.progress, weights=given,
                      batch_size=opts.batch_size, chunk_size=opts.chunk_size, num_workers=opts.num_workers)
