"""Chunk files of a resumable extraction, and their streaming assembly into the cache.

A finished chunk is one ``.npz`` in ``<out>.parts/<run-config-hash>/`` (written under a temp name
that carries host and pid, then ``os.replace``d), so a killed run resumes at the first missing chunk.
Assembly (``Extraction._assemble``) reads the chunks one at a time and appends them to the cache's
streaming group writers: peak memory is one chunk, and the only temporary disk is the parts folder
(about the bytes this run adds) next to the cache being written.

Keys in a chunk file: ``images::<field>`` (status, width, height, detail, fingerprint, cause),
``<group>::<key>`` (rows of a dataset), ``<group>::<key>::lengths`` (bytes per row of a ragged
bytes dataset; the values are ``<group>::<key>`` as flat uint8) and ``rows::<kind>`` (per-image
counts of every ragged row kind the chunk has rows of).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mner.pipeline.cache.lock import temp_suffix

SEP = "::"


def save_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    temp = path.with_name(f"{path.name}.tmp-{temp_suffix()}")  # host and pid: no clash on a shared file system
    try:
        with open(temp, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:  # disk full, killed: no half-written temp is left (finished chunks stay)
        temp.unlink(missing_ok=True)
        raise


def pack_bytes(values: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(v) for v in values], np.int64)
    return np.frombuffer(b"".join(values), np.uint8).copy(), lengths


def unpack_bytes(flat: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    raw, bounds = flat.tobytes(), np.concatenate([[0], np.cumsum(lengths)])
    return [raw[bounds[i]:bounds[i + 1]] for i in range(len(lengths))]


def chunk_key(group: str, key: str) -> str:
    return f"{group}{SEP}{key}"


def chunk_paths(folder: Path, count: int) -> list[Path]:
    return [folder / f"chunk_{k:05d}.npz" for k in range(count)]


def iter_chunks(paths: list[Path], keys: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One chunk at a time (only ``keys`` when given): what assembly holds in memory."""
    for path in paths:
        with np.load(path, allow_pickle=False) as chunk:
            yield {key: chunk[key] for key in (keys if keys is not None else chunk.files) if key in chunk.files}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
