"""Stage 1 from a cache's own record: grow caches with new images, and fill prediction side caches.

``record.py`` turns a cache's provenance back into the options of the extraction that made it
(:func:`~mner.features.run.record.recorded_options`); this module runs them, so new images get exactly
the same stage 1:

- ``mner-features extract --data MORE_POSTS --out EXISTING.h5`` grows a cache: every group it holds is
  computed for the new image ids only (:func:`grow_cache`), old rows are copied byte for byte;
- ``mner-train predict RUN --images DIR`` and ``mner.Tagger`` extract images the run's cache lacks into a
  side cache (:func:`extend_side_cache`), through the trainer's one lazy door
  (``mner.trainer.inference.stage1``). Only the groups the run's model reads, and those they are
  computed from, are extracted: tagging new pictures never pays for stage-1 groups the model ignores.

After the run every rebuilt group's provenance must equal the record apart from the fields that
describe a run (:data:`~mner.features.run.record.RUN_FIELDS`), and its global arrays (prompt
embeddings) must be identical; otherwise nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from mner.features.run.record import (  # noqa: F401 (re-exported: the record's API lives in record.py)
    LOCAL_COPY_FLAGS,
    RUN_FIELDS,
    WEIGHT_FLAGS,
    RebuildError,
    check_same_record,
    comparable,
    feature_groups,
    group_closure,
    recorded_options,
)
from mner.pipeline.cache import FeatureCache

# ----------------------------------------------------------------------------------------- running it


def _posts_file(folder: Path, image_ids: list[str], texts: dict[str, list[list[str]]] | None = None) -> Path:
    """A data file naming ``image_ids``: the extraction reads ids from posts. ``texts``: the tokens of the
    posts showing each image (``--grounding owlv2`` queries them), else one placeholder word."""
    lines = []
    for image_id in image_ids:
        for tokens in (texts or {}).get(image_id) or [["-"]]:
            words = ["".join(str(token).split()) or "-" for token in tokens] or ["-"]
            words = ["-" if word.startswith("IMGID:") else word for word in words]
            lines.append(f"IMGID:{image_id}\n" + "".join(f"{word}\tO\n" for word in words))
    path = folder / "test.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def extract_new_images(reference: FeatureCache, image_ids: list[str], images_dir: str | os.PathLike, out: Path, *,
                       groups: list[str] | None = None, data: str | os.PathLike | None = None,
                       texts: dict[str, list[list[str]]] | None = None, device: str = "auto", progress: bool = True,
                       weights: dict | None = None, batch_size: int = 32, chunk_size: int = 64,
                       num_workers: int | None = None) -> list[str]:
    """Extract ``image_ids`` into the new cache ``out`` with the producers of ``reference``'s record, then
    check that the result describes the same stage 1 (else ``out`` is removed and RebuildError raised).

    ``groups``: the groups (or dataset paths) wanted, default every feature group; those they are
    computed from are added. ``data``: the posts file the extraction reads (default: one written from
    ``texts``). Returns the groups extracted."""
    from mner.features.run.extract import Extraction, ExtractOptions

    groups = group_closure(reference, groups)
    copies: dict[str, str] = {}
    options = recorded_options(reference, weights=weights, groups=groups, copies=copies)
    what = f"(rebuilt from the record of {Path(reference.path).resolve()}: {', '.join(groups)})"
    with tempfile.TemporaryDirectory(prefix="mner-rebuild-") as scratch:
        posts = data if data is not None else _posts_file(Path(scratch), image_ids, texts)
        opts = ExtractOptions(data=str(posts), images=str(images_dir), out=str(out), device=device,
                              batch_size=batch_size, chunk_size=chunk_size, num_workers=num_workers,
                              progress=progress, command=["mner-features", "extract", what], **options)
        extraction = Extraction(opts, producers_factory=_keep_models_loaded(options, opts.device, reference))
        extraction.ids = sorted(image_ids)  # only the new images, whatever else the posts name
        try:
            extraction.run()
        except RebuildError:
            raise
        except ValueError as err:  # a user file that names none of the new images, ...: said with the record
            raise RebuildError(f"stage 1 for {len(image_ids)} new images, rebuilt from {reference.path}'s record: "
                               f"{err}") from None
    try:
        check_same_record(FeatureCache(out), reference, groups, copies)
    except RebuildError:
        Path(out).unlink(missing_ok=True)
        raise
    return groups


_LOADED_MODELS: dict[tuple, object] = {}  # (group, options, device) -> built detector / encoder, per process


def _keep_models_loaded(options: dict, device: str, reference: FeatureCache):
    """The extraction's planner, with each producer's model built once per process and reused by later calls
    (a Tagger extracting new images call after call loads its detector and encoders once). The plan
    records the models each group was made for, and any paper override, as the reference did: the
    rebuilt groups are the same stage 1, made for the same models."""
    from mner.features.run.plan import make_plan

    def factory(extraction, existing):
        recorded = json.dumps(options, sort_keys=True, default=str)
        extraction.shared_model = lambda key, build: _loaded((key, recorded, str(device)), build)
        plan = make_plan(extraction, existing)
        references = set(feature_groups(reference))
        for group in plan.groups:
            if group in references:
                record = reference.provenance(group)
                plan.needed_by[group] = list(record.get("for_models", []))
                plan.overrides = list(record.get("paper_overrides", plan.overrides))
        extraction.plan = plan
        producers = [extraction.producer(group) for group in plan.groups if group not in existing]
        return producers, [group for group in plan.groups if group in existing]

    return factory


def _loaded(key: tuple, build):
    if key not in _LOADED_MODELS:
        _LOADED_MODELS[key] = build()
    return _LOADED_MODELS[key]


def extend_side_cache(reference: str | os.PathLike, side_cache: str | os.PathLike, image_ids: list[str],
                      images_dir: str | os.PathLike, *, groups: list[str] | None = None,
                      texts: dict[str, list[list[str]]] | None = None, device: str = "auto", progress: bool = True,
                      weights: dict | None = None) -> int:
    """Add the ``image_ids`` ``side_cache`` lacks, extracted with ``reference``'s stage-1 record; returns
    how many were added. ``groups``: what the model reads (groups or dataset paths; default every group):
    only those and the groups they are computed from are extracted. ``texts``: tokens of the posts
    showing each image (grounding queries). The side cache is itself a cache (reused by later calls)."""
    reference_cache = FeatureCache(reference)
    side_cache = Path(side_cache)
    wanted = group_closure(reference_cache, groups)
    have = set()
    if side_cache.exists():
        side = FeatureCache(side_cache)
        held = feature_groups(side)
        lacking = [group for group in wanted if group not in held]
        if lacking:
            raise RebuildError(f"side cache {side_cache} holds {', '.join(held) or 'no group'} but not "
                               f"{', '.join(lacking)}, which the model reads: it was made for another model; pass "
                               "another --side-cache (or delete this one: mner wrote it)")
        wanted, have = held, set(side.image_ids)  # the same groups as its rows so far
    new = sorted(set(image_ids) - have)
    if not new:
        return 0
    from mner.pipeline.cache import CacheLock

    side_cache.parent.mkdir(parents=True, exist_ok=True)
    with CacheLock(side_cache), tempfile.TemporaryDirectory(prefix="mner-side-", dir=side_cache.parent) as scratch:
        fresh = Path(scratch) / "new.h5"
        extract_new_images(reference_cache, new, images_dir, fresh, groups=wanted, texts=texts, device=device,
                           progress=progress, weights=weights,
                           num_workers=0 if len(new) < 64 else None)  # no worker start-up for a few
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
    every image it holds, grow it first (the user's weight and file flags serve as local copies). Returns the
    count."""
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
    given = user_copies(opts)
    return grow_cache(out, opts.data, opts.images, new, device=opts.device, progress=opts.progress, weights=given,
                      batch_size=opts.batch_size, chunk_size=opts.chunk_size, num_workers=opts.num_workers)


def user_copies(opts) -> dict:
    """The files an extract command line names, as local copies for a cache's record (checked by hash)."""
    from mner.features.producers.captions import is_caption_file

    given: dict = {flag: getattr(opts, field) for flag, field in WEIGHT_FLAGS.values()
                   if field in ("detector_weights", "resnet_weights") and getattr(opts, field)}
    if opts.captions is not None and is_caption_file(opts.captions.source):
        given["--captions"] = opts.captions.source
    grounding = opts.grounding or opts.grounding_settings
    if grounding is not None and grounding.maps:
        given["--grounding-map"] = list(grounding.maps)
    if grounding is not None and grounding.crop_dirs:
        given["--grounding-crops-dir"] = list(grounding.crop_dirs)
    return given
