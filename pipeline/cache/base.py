"""Constants, errors and small HDF5 helpers shared by the writer, reader, merge and describe."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from importlib import metadata
from typing import Any

import h5py
import numpy as np

# Version 2: ragged row sets named by an `index` attr (several per cache: objects, grounding, ...),
# per-image text, per-group fingerprints. Version 1 files are refused with the re-extract command.
SCHEMA_VERSION = 2
STATUS_NAMES = ("ok", "missing", "unreadable", "placeholder")
# Why an image is not ok: the first word of its /images/detail ("corrupt: <path>: <error>"); info counts by it.
IMAGE_CAUSES = ("no-file", "no-images-folder", "corrupt", "too-large")
STATUS_MEANINGS = {  # docs/cache-schema.md's status table is generated from this
    "ok": "decoded; every feature of the row was computed from the image",
    "missing": "no file for the id (detail: the path looked for); features are zeros, no objects",
    "unreadable": "a file that does not decode (truncated, not an image; detail: the error); zeros, no objects",
    "placeholder": "missing or unreadable (detail says which and why), and extracted with `--missing-image "
    "placeholder`: its features are those of a fixed gray stand-in image, not of the post's image",
}
LIBRARIES = ("torch", "torchvision", "open_clip_torch", "transformers", "h5py", "numpy", "mner")
HASH_BLOCK = 1 << 24  # bytes per read when fingerprinting a dataset


class CacheError(Exception):
    """A feature cache is malformed, incompatible or used wrongly."""


class SchemaVersionError(CacheError):
    """The cache was written with another schema version than this mner reads."""


class MissingFeaturesError(CacheError):
    """A model needs cache datasets the file does not have."""


class NotACacheError(CacheError):
    """An HDF5 file that no mner wrote (no ``mner_schema_version`` attribute)."""


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def id_list_hash(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def pack_ragged(values: Sequence[bytes | str | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length values -> (flat uint8 concatenation, (len+1,) int64 offsets)."""
    chunks = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chunks], out=offsets[1:])
    flat = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    return flat, offsets


def unpack_text(flat: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = np.asarray(flat, dtype=np.uint8).tobytes()
    return [raw[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


def fixed_bytes(strings: Sequence[str]) -> np.ndarray:
    encoded = [s.encode("utf-8") for s in strings]
    width = max([len(e) for e in encoded] + [1])
    return np.array(encoded, dtype=f"S{width}")


def decode_ids(array: np.ndarray) -> list[str]:
    return [b.decode("utf-8") for b in array.tolist()]


def open_cache_file(path, mode: str = "r") -> h5py.File:
    """h5py.File with an error that names the file and says how to make a valid one."""
    if mode == "r" and not os.path.isfile(path):
        raise CacheError(
            f"{path}: no such cache file; make one with `mner-features extract ... --out {path}`"
        )
    try:
        return h5py.File(path, mode)
    except OSError as error:
        raise CacheError(
            f"{path}: not a readable HDF5 cache ({error}); it may be truncated or another program's file. mner "
            f"replaces only caches it can identify as its own: if this was an mner cache, delete it and run "
            f"`mner-features extract ... --out {path}` again, otherwise choose another --out"
        ) from error


@contextlib.contextmanager
def damaged_metadata_as_error(path: str | os.PathLike):
    """h5py answers a damaged object header with KeyError / RuntimeError / OSError from deep inside a
    read: one line naming the file and the fix instead."""
    try:
        yield
    except (KeyError, RuntimeError, OSError) as error:
        raise CacheError(
            f"{os.fspath(path)}: damaged cache metadata ({type(error).__name__}: {str(error).strip()[:100]}); the "
            "file cannot be read. Restore it from a copy, or delete it and run `mner-features extract` again"
        ) from None


def check_version(handle: h5py.File, path: str) -> None:
    found = handle.attrs.get("mner_schema_version")
    if found is None:
        raise NotACacheError(
            f"{path}: an HDF5 file but not an mner feature cache (no mner_schema_version attribute); "
            f"make one with `mner-features extract ... --out {path}`"
        )
    found = int(found)
    if found != SCHEMA_VERSION:
        writer = handle.attrs.get("mner_version", "unknown")
        raise SchemaVersionError(
            f"{path}: feature cache schema version {found} (written by mner {writer}); this mner "
            f"({library_versions()['mner']}) reads schema version {SCHEMA_VERSION}. Re-run "
            f"`mner-features extract ... --out {path} --overwrite` with this mner version (or into a new file), "
            f"or install the mner version that wrote it."
        )


def attrs_dict(obj: h5py.HLObject) -> dict[str, Any]:
    out = {}
    for key, value in obj.attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if key in ("provenance", "dims") or (isinstance(value, str) and key.endswith("_json")):
            value = json.loads(value)
        elif isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def walk_datasets(group: h5py.Group) -> dict[str, h5py.Dataset]:
    found: dict[str, h5py.Dataset] = {}
    group.visititems(
        lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None
    )
    return found


def stored_groups(handle: h5py.File) -> list[str]:
    """Groups that carry a fingerprint or provenance: images, posts and every feature group."""
    names: list[str] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and ("provenance" in obj.attrs or "fingerprint" in obj.attrs):
            names.append(name)

    handle.visititems(visit)
    return sorted(names)


def feature_groups(handle: h5py.File) -> list[str]:
    """Groups carrying a provenance attr (objects, encoders/clip, prompts/vcrmner, ...)."""
    names: list[str] = []
    handle.visititems(
        lambda name, obj: (
            names.append(name) if isinstance(obj, h5py.Group) and "provenance" in obj.attrs else None
        )
    )
    return sorted(names)


def _json_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def group_fingerprint(group: h5py.Group, digests: dict[str, str] | None = None) -> str:
    """sha256 over every dataset's name, dtype, shape and bytes and the group's own attrs.

    Provenance (which holds the creation time and command) and the fingerprint itself are left out:
    two writes of the same numbers give the same fingerprint; any changed byte changes it.
    ``digests`` (dataset -> sha256 of its bytes) skips re-reading datasets just hashed by the caller.
    """
    record: dict[str, Any] = {"datasets": {}, "attrs": {}}
    for name, dataset in sorted(walk_datasets(group).items()):
        if digests is not None and name in digests:
            record["datasets"][name] = [dataset.dtype.str, list(dataset.shape), digests[name]]
            continue
        digest = hashlib.sha256()
        rows_per_block = max(
            1, HASH_BLOCK // max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:] or (1,))))
        )
        if dataset.shape == ():
            digest.update(np.asarray(dataset[()]).tobytes())
        else:
            for start in range(0, dataset.shape[0], rows_per_block):
                digest.update(np.ascontiguousarray(dataset[start : start + rows_per_block]).tobytes())
        record["datasets"][name] = [dataset.dtype.str, list(dataset.shape), digest.hexdigest()]
    for key, value in sorted(group.attrs.items()):
        if key not in ("provenance", "fingerprint"):
            record["attrs"][key] = _json_attr(value)
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def cache_fingerprint(group_fingerprints: dict[str, str]) -> str:
    """One hash of every group's fingerprint: equal caches (same numbers, same groups) share it."""
    return hashlib.sha256(json.dumps(sorted(group_fingerprints.items())).encode("utf-8")).hexdigest()
