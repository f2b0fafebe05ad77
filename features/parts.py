"""Chunk files of a resumable extraction, and their streaming assembly into the cache.

A finished chunk is one ``.npz`` in ``<out>.parts/<run-config-hash>/`` (written under a temp name
that carries host and pid, then ``os.replace``d), so a killed run resumes at the first missing chunk.
Assembly reads the chunks one at a time and writes each dataset slice by slice into datasets created
at their final shape: peak memory is one chunk, and the only temporary disk is the parts folder
(about the bytes this run adds) next to the cache being written.

Keys in a chunk file: ``images::<field>`` (status, width, height, detail, fingerprint, cause),
``<group>::<key>`` (rows of a dataset), ``<group>::<key>::lengths`` (bytes per row of a ragged
bytes dataset; the values are ``<group>::<key>`` as flat uint8) and ``rows::<kind>`` (per-image
counts of every ragged row kind the chunk has rows of).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from mner.features.producers import Layout

SEP = "::"


def host_pid() -> str:
    """Temp names carry host and pid: two hosts sharing a file system never touch each other's temps."""
    return f"{socket.gethostname()}-{os.getpid()}"


def save_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    temp = path.with_name(f"{path.name}.tmp-{host_pid()}")
    with open(temp, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def pack_bytes(values: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(v) for v in values], np.int64)
    return np.frombuffer(b"".join(values), np.uint8).copy(), lengths


def unpack_bytes(flat: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    raw, bounds = flat.tobytes(), np.concatenate([[0], np.cumsum(lengths)])
    return [raw[bounds[i]:bounds[i + 1]] for i in range(len(lengths))]


def chunk_key(group: str, key: str) -> str:
    return f"{group}{SEP}{key}"


class GroupStream:
    """One feature group written slice by slice into datasets created at their final shape.

    Stands in for the cache package's streaming writer; it follows the layout conventions of
    ``CacheWriter`` (attr ``rows``; ragged values as flat uint8 + ``<key>_offsets``).
    """

    def __init__(self, file: h5py.File, name: str, layouts: dict[str, Layout], totals: dict[str, int],
                 byte_totals: dict[str, int]):
        if name in file:
            del file[name]
        self.group, self.layouts = file.create_group(name), layouts
        self.datasets: dict[str, h5py.Dataset] = {}
        for key, layout in layouts.items():
            if layout.ragged_bytes:
                dataset = self.group.create_dataset(key, shape=(byte_totals[key],), dtype=np.uint8)
                dataset.attrs.update(rows="flat", offsets=f"{key}_offsets", encoding="bytes")
            else:
                dataset = self.group.create_dataset(key, shape=(totals[layout.rows], *layout.shape),
                                                    dtype=np.dtype(layout.dtype))
                dataset.attrs["rows"] = layout.rows
            self.datasets[key] = dataset

    def write(self, key: str, start: int, values: np.ndarray) -> None:
        if len(values):
            self.datasets[key][start:start + len(values)] = values

    def finish(self, *, offsets: dict[str, tuple[np.ndarray, str]], globals_: dict, attrs: dict,
               provenance: dict) -> None:
        import json

        for key, (values, indexes) in offsets.items():
            dataset = self.group.create_dataset(key, data=np.asarray(values, np.int64))
            dataset.attrs.update(rows="offsets", indexes=indexes)
        for key, (values, rows) in globals_.items():
            if isinstance(values, list):
                flat, lengths = pack_bytes([v.encode("utf-8") if isinstance(v, str) else v for v in values])
                text = bool(values) and isinstance(values[0], str)
                dataset = self.group.create_dataset(key, data=flat)
                dataset.attrs.update(rows="flat", offsets=f"{key}_offsets", encoding="utf-8" if text else "bytes")
                offsets_ds = self.group.create_dataset(f"{key}_offsets", data=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
                offsets_ds.attrs.update(rows="offsets", indexes=rows)
            else:
                array = np.asarray(values)
                dataset = self.group.create_dataset(key, data=array.astype(np.float32) if array.dtype.kind == "f" else array)
                dataset.attrs["rows"] = rows
        self.group.attrs["provenance"] = json.dumps(provenance, sort_keys=True, default=str)
        for key, value in attrs.items():
            self.group.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value


def chunk_paths(folder: Path, count: int) -> list[Path]:
    return [folder / f"chunk_{k:05d}.npz" for k in range(count)]


def iter_chunks(paths: list[Path], keys: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One chunk at a time (only ``keys`` when given): what assembly holds in memory."""
    for path in paths:
        with np.load(path, allow_pickle=False) as chunk:
            yield {key: chunk[key] for key in (keys if keys is not None else chunk.files) if key in chunk.files}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
