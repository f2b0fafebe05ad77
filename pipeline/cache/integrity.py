"""Checksums of a cache's bytes: sealed when a group is written, recomputed by ``mner-features verify``,
sampled by the trainer at startup.

Every group carries its fingerprint (:func:`~mner.pipeline.cache.base.group_fingerprint`: sha256 over
every dataset's bytes and the group's attrs). :func:`seal_group` computes it and, in the same read,
a sha256 per block of rows of every dataset (``mner_blocks`` attr of the dataset: rows per block and
the first 16 hex digits of each block's digest; at most ``MAX_BLOCKS`` blocks per dataset). Blocks let
a reader verify a sample of a large dataset without reading all of it, and let ``verify`` say which
rows changed. Dataset attrs are outside the fingerprint, so sealing does not change it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from mner.pipeline.cache import base
from mner.pipeline.cache.base import (
    CacheError,
    cache_fingerprint,
    check_version,
    damaged_metadata_as_error,
    group_fingerprint,
    open_cache_file,
    stored_groups,
    walk_datasets,
)

BLOCK_BYTES = 1 << 22  # a checksum per 4 MiB of rows ...
MAX_BLOCKS = 2048  # ... but at most this many per dataset (the attr stays under HDF5's 64 KiB)
BLOCKS_ATTR = "mner_blocks"
SAMPLE_BYTES = 64 << 20  # the trainer's startup check: groups up to this size are verified whole
SAMPLED_BLOCKS = 8  # larger ones: this many random blocks of each dataset


def rows_per_block(dataset: h5py.Dataset) -> int:
    row_bytes = max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:] or (1,))))
    rows = int(dataset.shape[0]) if dataset.shape else 1
    return max(1, BLOCK_BYTES // row_bytes, -(-rows // MAX_BLOCKS))


def block_digests(dataset: h5py.Dataset, whole: hashlib._Hash | None = None) -> tuple[int, list[str]]:
    """(rows per block, the first 16 hex digits of each block's sha256); ``whole`` is fed every byte."""
    if dataset.shape == ():
        data = np.asarray(dataset[()]).tobytes()
        if whole is not None:
            whole.update(data)
        return 1, [hashlib.sha256(data).hexdigest()[:16]]
    step, digests = rows_per_block(dataset), []
    row_bytes = max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:] or (1,))))
    read = max(1, min(step, base.HASH_BLOCK // row_bytes))  # rows per read: memory stays one HASH_BLOCK
    for start in range(0, dataset.shape[0], step):
        block = hashlib.sha256()
        for part in range(start, min(start + step, dataset.shape[0]), read):
            data = np.ascontiguousarray(dataset[part:min(part + read, start + step)]).tobytes()
            block.update(data)
            if whole is not None:
                whole.update(data)
        digests.append(block.hexdigest()[:16])
    return step, digests


def seal_group(group: h5py.Group) -> str:
    """Store the group's fingerprint and every dataset's block checksums (one read of the data)."""
    wholes = {}
    for name, dataset in walk_datasets(group).items():
        whole = hashlib.sha256()
        step, digests = block_digests(dataset, whole)
        dataset.attrs[BLOCKS_ATTR] = json.dumps({"rows": step, "sha256": digests})
        wholes[name] = whole.hexdigest()
    fingerprint = group_fingerprint(group, wholes)
    group.attrs["fingerprint"] = fingerprint
    return fingerprint


def _stored_blocks(dataset: h5py.Dataset) -> dict | None:
    raw = dataset.attrs.get(BLOCKS_ATTR)
    if raw is None:
        return None
    try:
        blocks = json.loads(raw)
        return blocks if isinstance(blocks, dict) and "rows" in blocks and "sha256" in blocks else None
    except ValueError:
        return None


@dataclass
class GroupCheck:
    group: str
    ok: bool
    how: str  # "full" | "sampled k of n blocks" | "not checked: ..."
    problem: str = ""
    bytes_read: int = 0

    def line(self) -> str:
        state = "ok      " if self.ok else "MISMATCH"
        return f"{state} /{self.group}  ({self.how})" + (f": {self.problem}" if self.problem else "")


def _changed_rows(group: h5py.Group) -> str:
    """Which dataset rows differ from their block checksums (when the cache has them)."""
    for name, dataset in sorted(walk_datasets(group).items()):
        stored = _stored_blocks(dataset)
        if stored is None:
            continue
        step, digests = block_digests(dataset)
        if step != stored["rows"] or len(digests) != len(stored["sha256"]):
            return f"{name}: shape changed"
        for block, (now, then) in enumerate(zip(digests, stored["sha256"])):
            if now != then:
                return f"{name} rows {block * step}..{min((block + 1) * step, dataset.shape[0]) - 1} changed"
    return "attrs or bytes changed"


def verify_group(group: h5py.Group, name: str) -> GroupCheck:
    """Recompute the whole group's fingerprint against the stored one."""
    stored = group.attrs.get("fingerprint")
    size = sum(d.size * d.dtype.itemsize for d in walk_datasets(group).values())
    if stored is None:
        return GroupCheck(name, False, "full", "no stored fingerprint", size)
    now = group_fingerprint(group)
    if now == str(stored):
        return GroupCheck(name, True, "full", "", size)
    return GroupCheck(name, False, "full", f"{_changed_rows(group)} (fingerprint stored {str(stored)[:12]}, "
                      f"recomputed {now[:12]})", size)


def sample_group(group: h5py.Group, name: str, rng: np.random.Generator) -> GroupCheck:
    """Verify ``SAMPLED_BLOCKS`` random blocks of every dataset against their stored checksums."""
    datasets = walk_datasets(group)
    size = sum(d.size * d.dtype.itemsize for d in datasets.values())
    if size <= SAMPLE_BYTES:
        return verify_group(group, name)
    checked = total = read = 0
    for key, dataset in sorted(datasets.items()):
        stored = _stored_blocks(dataset)
        if stored is None:
            return GroupCheck(name, True, "not checked: the cache predates block checksums (mner-features verify "
                              "checks it whole)", bytes_read=read)
        step = int(stored["rows"])
        count = len(stored["sha256"])
        total += count
        for block in sorted(rng.choice(count, size=min(SAMPLED_BLOCKS, count), replace=False).tolist()):
            values = np.ascontiguousarray(dataset[block * step:(block + 1) * step])
            read += values.nbytes
            checked += 1
            if hashlib.sha256(values.tobytes()).hexdigest()[:16] != stored["sha256"][block]:
                end = min((block + 1) * step, dataset.shape[0]) - 1
                return GroupCheck(name, False, f"sampled {checked} of {total} blocks",
                                  f"{key} rows {block * step}..{end} changed", read)
    return GroupCheck(name, True, f"sampled {checked} of {total} blocks", bytes_read=read)


@dataclass
class CacheCheck:
    path: str
    groups: list[GroupCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # file-level (the cache fingerprint)

    @property
    def ok(self) -> bool:
        return not self.problems and all(check.ok for check in self.groups)

    def lines(self) -> list[str]:
        return [check.line() for check in self.groups] + [f"MISMATCH {problem}" for problem in self.problems]


def verify_cache(path: str | os.PathLike) -> CacheCheck:
    """``mner-features verify``: every group's checksum recomputed against its data."""
    path = os.fspath(path)
    result = CacheCheck(path)
    with open_cache_file(path, "r") as handle, damaged_metadata_as_error(path):
        check_version(handle, path)
        prints = {}
        for name in stored_groups(handle):
            check = verify_group(handle[name], name)
            result.groups.append(check)
            prints[name] = str(handle[name].attrs.get("fingerprint", ""))
        stored = str(handle.attrs.get("fingerprint", ""))
        if stored != cache_fingerprint(prints):
            result.problems.append(f"{path}: the cache fingerprint does not match its groups' (a group was added, "
                                   "removed or re-fingerprinted outside mner)")
    return result


def check_groups_at_startup(path: str | os.PathLike, groups: list[str]) -> dict:
    """The trainer's cheap startup check of the groups a model reads: small groups whole, large ones by
    a sample of blocks. Its generator is seeded from the cache fingerprint and is its own: the training
    RNG streams (random, numpy, torch) are never touched. Raises CacheError on a mismatch; returns the
    record stored in the run."""
    path = os.fspath(path)
    with open_cache_file(path, "r") as handle, damaged_metadata_as_error(path):
        seed = int(str(handle.attrs.get("fingerprint", "0") or "0")[:8] or "0", 16)
        rng = np.random.default_rng(seed)
        checks = [sample_group(handle[name], name, rng) for name in sorted(set(groups)) if name in handle]
    bad = [check for check in checks if not check.ok]
    if bad:
        raise CacheError(
            f"{path}: the data of {', '.join('/' + c.group for c in bad)} no longer match the checksums written with "
            f"it ({'; '.join(c.problem for c in bad)}): the file changed on disk. Run `mner-features verify {path}` "
            "and re-extract the damaged groups (mner-features extract ... --overwrite)"
        )
    return {check.group: {"checked": check.how, "bytes_read": check.bytes_read} for check in checks}
