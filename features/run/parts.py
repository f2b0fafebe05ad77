"""The parts of a resumable extraction: each chunk of images is a small cache, and assembly is the merge.

A finished chunk is ``<out>.parts/<run-config-hash>/chunk_<k>.h5``, a cache written by the same
:class:`~mner.pipeline.cache.CacheWriter` as every cache: validated against the group specs, built in
memory (a full disk is a plain OSError, never an HDF5 write error), written under a temp name that
carries host and pid and then renamed, so a killed run resumes at the first missing chunk.

A part holds its images (``/images``), every group the run computes for them (globals
such as prompt embeddings included) and, for each ragged set those groups follow but an earlier run
made, the set's index alone (a *borrowed* index: ``objects/maskrcnn`` holding only ``offsets`` when this
run adds CLIP crop embeddings to cached boxes). Parts carry no ``/posts``; the assembly writes them.

Assembly is the merge (:func:`mner.pipeline.cache.merge.merge_parts_into`): the parts' rows are merged
into the cache being written, in image order, through the cache writer's temp file and atomic rename;
a borrowed index must equal the cache's own. There is no third layout: the parts are read by the same
code that merges the shards of a ``--shard`` run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mner.pipeline.cache import STATUS_NAMES, CacheWriter
from mner.pipeline.cache.base import IMAGE_CAUSES, decode_ids
from mner.pipeline.cache.specs import get_group

PART_GLOB = "chunk_*.h5"


@dataclass
class PartGroup:
    """One group as every part of a run writes it."""

    name: str  # the group instance ("crops/maskrcnn/clip/RN50")
    provenance: dict  # the run's record (the same in every part; merge checks it)
    attrs: dict = field(default_factory=dict)  # group attrs (logit_scale, class_names)
    own_index: str | None = None  # key of the group's own index dataset ("offsets"), if it defines a ragged set
    globals: dict = field(default_factory=dict)  # whole-group datasets (prompt embeddings), repeated in each part
    borrowed: bool = False  # index only: the group is in the cache already and this run's groups follow its rows


@dataclass
class ChunkRows:
    """What one chunk computed, before it is written as a part."""

    ids: list[str]  # the chunk's image ids, in cache order
    images: dict[str, Any]  # CacheWriter.write_images keywords: status, detail, width, height, content_sha256
    causes: list[str]  # per image: why it is not ok ("" when ok), one of IMAGE_CAUSES
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # index path -> (n,) rows per image
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> dataset -> the chunk's rows


def segments(counts: np.ndarray) -> np.ndarray:
    """(n,) rows per image -> the (n+1,) int64 offsets of a ragged set."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def write_part(path: Path, chunk: ChunkRows, groups: list[PartGroup]) -> None:
    """Write one chunk as a small cache (owners before the groups that follow their index)."""
    from mner.features.producers.registry import resolved

    # partial: a borrowed group is its index alone (check_producer has checked what each producer makes)
    with CacheWriter(path, overwrite=True, partial=True, in_memory=True) as writer:
        writer.write_images(chunk.ids, **chunk.images)
        for group in groups:
            own = {group.own_index: segments(chunk.counts[f"{group.name}/{group.own_index}"])} \
                if group.own_index else {}
            with writer.group(group.name, group.provenance, group.attrs, indexes=own) as stream:
                if group.globals:
                    stream.append(group.globals)
                if group.borrowed:
                    continue
                spec = get_group(group.name)
                rows = {}
                for key, values in chunk.rows[group.name].items():
                    if isinstance(values, list):  # ragged bytes: JPEG crops may still be encoding
                        values = resolved(values)
                        if spec.dataset(key).encoding == "utf-8":
                            values = [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
                    rows[key] = values
                stream.append(rows)


def cause_of(status: str, detail: str) -> str:
    """The cause of a non-ok image from its stored detail ("placeholder" details start with the status)."""
    if status == "ok":
        return ""
    return next((piece for piece in detail.split(": ") if piece in IMAGE_CAUSES), "other")


@dataclass
class PartImages:
    """A finished part's image table, read back to resume."""

    ids: list[str]
    status: list[str]
    causes: list[str]
    fingerprints: list[str] | None  # None: the part holds no content_sha256


def read_part_images(path: Path) -> PartImages:
    with h5py.File(path, "r") as handle:
        images = handle["images"]
        status = [STATUS_NAMES[s] for s in images["status"][()]]
        flat, offsets = images["detail"][()].tobytes(), images["detail_offsets"][()]
        details = [flat[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(len(status))]
        prints = [p.decode() for p in images["content_sha256"][()]] if "content_sha256" in images else None
        return PartImages(decode_ids(images["ids"][()]), status,
                          [cause_of(s, d) for s, d in zip(status, details)], prints)


def part_paths(folder: Path, count: int) -> list[Path]:
    return [folder / f"chunk_{k:05d}.h5" for k in range(count)]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
