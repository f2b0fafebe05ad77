"""Provenance records: everything needed to tell whether two feature groups are comparable."""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Sequence

from mner.pipeline.cache.base import CacheError, id_list_hash, library_versions
from mner.pipeline.hashing import sha256_tag

# Provenance keys that describe one run, not the features: shards of one extraction (and a cache grown
# later) may differ in them.
# ``coverage``: counts over the run's data (a user file's ids that matched none of its images, ...).
SHARD_KEYS = ("command", "cwd", "created", "image_list_hash", "num_images", "shard", "merge", "coverage")


def weights_tag(path: str | os.PathLike) -> str:
    """Provenance tag of a local weights file: ``sha256:<hex>``."""
    return sha256_tag(path)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def shard_record(index: int, count: int, all_ids: Sequence[str]) -> dict:
    """Provenance ``shard``: this is shard index/count of the id list whose hash is ``id_list_hash``.

    Merge uses it to refuse an incomplete shard set: the union of the shards' ids must hash to it.
    """
    if not 0 <= index < count:
        raise CacheError(f"shard {index}/{count}: the index must be in 0..{count - 1}")
    return {"index": int(index), "count": int(count), "id_list_hash": id_list_hash(sorted(set(all_ids)))}


def make_provenance(
    component: str,
    *,
    model: str,
    pretrained: str,
    preprocessing: dict | str | None,
    thresholds: dict | None,
    image_ids: Sequence[str],
    shard: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """The provenance every feature group records (``shard`` from :func:`shard_record`)."""
    if not isinstance(pretrained, str) or not pretrained:
        raise CacheError(f"pretrained must be a tag, 'sha256:<hash>' or 'random', got {pretrained!r}")
    provenance = {
        "component": component,
        "model": model,
        "pretrained": pretrained,
        "preprocessing": preprocessing,
        "thresholds": thresholds,
        "versions": library_versions(),
        "image_list_hash": id_list_hash(image_ids),
        "num_images": len(image_ids),
        "shard": shard if shard is not None else shard_record(0, 1, image_ids),
        "command": list(sys.argv),
        "cwd": os.getcwd(),
        "created": utc_now(),
    }
    provenance.update(extra or {})
    return provenance
