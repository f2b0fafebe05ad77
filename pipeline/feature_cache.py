"""The HDF5 feature cache: schema, provenance, writer and reader.

This module is the only thing stage 1 (``mner.features``) and stage 2 (``mner.trainer``) share; it
alone knows the file layout. Schema version 1 (full description: docs/cache-schema.md):

/                      attrs: mner_schema_version=1, mner_version
/images                row i = image i; ids sorted (canonical order, identical for shards/merge)
  ids            (N,)     S<k>    image ids (utf-8)
  status         (N,)     uint8   0 ok, 1 missing, 2 unreadable, 3 placeholder (attr status_names, json)
  detail         (B,)     uint8   + detail_offsets (N+1,) int64: why an image is not ok ("" when ok)
  width, height  (N,)     int32   original size (0 when not decodable)
                 attrs: id_list_hash (sha256 of "\\n".join(ids))
/posts                 the posts the cache was built from (tokens, tags, splits, data hash)
  post_id (P,) S<k>; split (P,) uint8 (attr split_names_json); image_id (P,) S<k> (b"" when none);
  source (B,) uint8 + source_offsets (P+1,) ("path:line"); token_offsets (P+1,) int64 (tokens of post
  p are token rows token_offsets[p]:token_offsets[p+1]); token_text (B,) uint8 + token_text_offsets
  (T+1,) int64; tag_ids (T,) int16 (attr tag_names_json, -1 when unlabelled); labelled (P,) uint8;
  attrs: data_hash, data_files_json, orphan_i_json, notes_json
/objects               one detector per cache
  offsets (N+1,) int64   objects of image i are rows offsets[i]:offsets[i+1] of every "object" dataset
  boxes (M,4) float32 xyxy original pixels; scores (M,) float32; class_ids (M,) int32
  crop_jpeg (B,) uint8 + crop_jpeg_offsets (M+1,) int64: each object's crop as JPEG bytes
/encoders/<name>       clip | resnet152 | swin
  clip: image_embed (N,D) f16, patch_tokens (N,P,Dp) f16, crop_embed (M,D) f16; attr logit_scale
  resnet152: grid (N,7,7,2048) f16, crop_pooled (M,2048) f16
  swin: grid (N,12,12,1536) f16
/prompts/<set>         vcrmner | vcrmner_words | promptmner_task | promptmner_kb | promptmner_expert
  prompt_text (B,) uint8 + prompt_text_offsets (Q+1,); prompt_category (Q,) int16 (attr category_names)
  prompt_embed (Q,D) float32; centroids (C,D) float32; crop_weights (M,C) f16; image_relevance (N,Q) f16

Every dataset has attr ``rows``: "image" (first axis N), "object" (first axis M, sliced with
/objects/offsets), "global" (read whole), "offsets" ((R+1,) int64; attr ``indexes`` = the row kind
of its R rows) or "flat" (concatenated variable-length values; attr ``offsets`` = its offsets
dataset, attr ``encoding`` = "utf-8" for text); /posts also uses "post" and "token". Every group under /objects, /encoders, /prompts has
attr ``provenance`` (JSON): component, model, pretrained (tag | "sha256:<file hash>" | "random"),
preprocessing, thresholds, library versions, image_list_hash, command (argv), created (UTC).

Public API:

- ``SCHEMA_VERSION = 1``; ``STATUS_NAMES = ("ok", "missing", "unreadable", "placeholder")``
- ``class CacheError(Exception)``; ``SchemaVersionError(CacheError)``; ``MissingFeaturesError(CacheError)``
- ``extract_command_hint(paths, *, out=None, data=None, images=None) -> str``: the
  ``mner-features extract ...`` command that adds the missing paths
- ``make_provenance(component, *, model, pretrained, preprocessing, thresholds, image_ids, extra=None) -> dict``
- ``pack_ragged(values) -> (flat uint8, offsets int64)``; ``weights_tag(path) -> "sha256:<hash>"``
- ``class CacheWriter(path, *, overwrite=False)``: context manager; copies an existing cache to a temp
  file in the same folder, writes there, ``os.replace``s on clean exit, deletes the temp on error.
  ``.existing_groups() -> set[str]``; ``.write_images(ids, status, detail, width, height)``;
  ``.write_posts(dataset)``; ``.write_group(name, datasets: dict[str, tuple[array | list, str rows]],
  provenance: dict, attrs: dict | None = None, *, overwrite=False)`` (``name`` like ``"objects"``,
  ``"encoders/clip"``). A list of bytes/str with rows "image"/"object"/"global" is stored as a
  ragged pair ``name`` + ``name_offsets``; ``objects/offsets`` is passed with rows "offsets".
  Floating "image"/"object" arrays outside /objects are stored float16.
- ``class FeatureCache(path, *, in_memory=False)``: opens h5py lazily per process (safe across fork:
  handle dropped when pickled / pid changes). ``.image_ids``, ``.row_of(image_id)``, ``.status``,
  ``.has(path)``, ``.require(paths, model)``, ``.read(path, row)``, ``.read_global(path)``,
  ``.row_shape(path)``, ``.provenance(group)``, ``.groups()``, ``.load_posts() -> Dataset``,
  ``.random_init_groups()``, ``.feature_spec(paths) -> FeatureSpec``, ``.detail(row)``,
  ``.rows_kind(path)``, ``.num_images``, ``.ok`` ((N,) bool), ``.hint(paths)``, ``.close()``.
- ``@dataclass FeatureSpec``: ``shapes: dict[str, tuple]`` (per-row shape of each path),
  ``globals: dict[str, np.ndarray]`` (the "global" datasets), ``attrs: dict[str, dict]``.
- ``merge_caches(paths, out)``; ``describe(path) -> str`` (for ``mner-features info``).
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import itertools
import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import h5py
import numpy as np

SCHEMA_VERSION = 1
STATUS_NAMES = ("ok", "missing", "unreadable", "placeholder")
ROW_KINDS = ("image", "object", "global", "offsets", "flat")
FEATURE_ROOTS = ("objects", "encoders", "prompts", "grounding", "captions")
LIBRARIES = ("torch", "torchvision", "open_clip_torch", "transformers", "h5py", "numpy", "mner")
MERGE_IN_MEMORY_BYTES = 1 << 30  # merge gathers a dataset in memory below this size, run by run above
# Provenance keys that legitimately differ between shards of one extraction.
SHARD_KEYS = ("command", "created", "image_list_hash", "num_images", "shard", "merge")
# Path prefix -> the `mner-features extract` flag that produces it (longest prefix wins).
EXTRACT_FLAGS = {
    "objects": "--detector maskrcnn",
    "encoders/clip": "--encoder clip",
    "encoders/resnet152": "--encoder resnet152",
    "encoders/swin": "--encoder swin",
    "prompts/vcrmner": "--prompts vcrmner",
    "prompts/vcrmner_words": "--prompts vcrmner_words",
    "prompts/promptmner_task": "--prompts promptmner_task",
    "prompts/promptmner_kb": "--prompts promptmner_kb",
    "prompts/promptmner_expert": "--prompts promptmner_expert",
    "grounding": "--grounding",
    "captions": "--captions",
}


class CacheError(Exception):
    """A feature cache is malformed, incompatible or used wrongly."""


class SchemaVersionError(CacheError):
    """The cache was written with another schema version than this mner reads."""


class MissingFeaturesError(CacheError):
    """A model needs cache datasets the file does not have."""

def open_cache_file(path, mode: str = "r") -> "h5py.File":
    """h5py.File with an error that names the file and says how to make a valid one."""
    if mode == "r" and not os.path.isfile(path):
        raise CacheError(f"{path}: no such cache file; make one with `mner-features extract ... --out {path}`")
    try:
        return h5py.File(path, mode)
    except OSError as error:
        raise CacheError(
            f"{path}: not a readable HDF5 cache ({error}); it may be truncated or another kind of file. "
            f"Rebuild it with `mner-features extract ... --out {path} --overwrite`"
        ) from error



@dataclass
class FeatureSpec:
    """What a model needs to size itself from the cache without reading rows."""

    shapes: dict[str, tuple] = field(default_factory=dict)  # path -> shape of one row (whole shape for globals)
    globals: dict[str, np.ndarray] = field(default_factory=dict)  # "global" datasets, read whole
    attrs: dict[str, dict] = field(default_factory=dict)  # group -> its attrs (provenance parsed, logit_scale, ...)


# ----------------------------------------------------------------------------------------------- helpers


def id_list_hash(ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def weights_tag(path: str | os.PathLike) -> str:
    """Provenance tag of a local weights file: ``sha256:<hex>``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def make_provenance(
    component: str,
    *,
    model: str,
    pretrained: str,
    preprocessing: dict | str | None,
    thresholds: dict | None,
    image_ids: Sequence[str],
    extra: dict | None = None,
) -> dict:
    """Everything needed to tell whether two feature groups are comparable."""
    if not isinstance(pretrained, str) or not pretrained:
        raise CacheError(f"pretrained must be a tag, 'sha256:<hash>' or 'random', got {pretrained!r}")
    provenance = {
        "component": component,
        "model": model,
        "pretrained": pretrained,
        "preprocessing": preprocessing,
        "thresholds": thresholds,
        "versions": _library_versions(),
        "image_list_hash": id_list_hash(image_ids),
        "num_images": len(image_ids),
        "command": list(sys.argv),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    provenance.update(extra or {})
    return provenance


def pack_ragged(values: Sequence[bytes | str | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length values -> (flat uint8 concatenation, (len+1,) int64 offsets)."""
    chunks = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunks], dtype=np.int64)]).astype(np.int64)
    flat = np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()
    return flat, offsets


def _fixed_bytes(strings: Sequence[str]) -> np.ndarray:
    encoded = [s.encode("utf-8") for s in strings]
    width = max([len(e) for e in encoded] + [1])
    return np.array(encoded, dtype=f"S{width}")


def _decode_ids(array: np.ndarray) -> list[str]:
    return [b.decode("utf-8") for b in array.tolist()]


def extract_command_hint(
    paths: Iterable[str], *, out: str | None = None, data: str | None = None, images: str | None = None
) -> str:
    """The ``mner-features extract`` command that adds ``paths`` to a cache (existing groups are kept)."""
    flags: list[str] = []
    for path in paths:
        path = path.strip("/")
        if path.split("/")[0] in ("images", "posts"):
            continue  # every extraction writes these
        matches = [prefix for prefix in EXTRACT_FLAGS if path == prefix or path.startswith(prefix + "/")]
        if matches:
            flag = EXTRACT_FLAGS[max(matches, key=len)]
        else:  # an unknown group: name it after its first two path parts
            parts = path.split("/")
            flag = f"--{parts[0].rstrip('s')} {parts[1]}" if len(parts) > 2 else f"--{parts[0]}"
        if flag not in flags:
            flags.append(flag)
    return " ".join(
        ["mner-features extract", f"--data {data or '<data folder>'}", f"--images {images or '<image folder>'}",
         f"--out {out or '<cache.h5>'}", *flags]
    )


def _check_version(handle: h5py.File, path: str) -> None:
    found = handle.attrs.get("mner_schema_version")
    found = None if found is None else int(found)
    if found != SCHEMA_VERSION:
        writer = handle.attrs.get("mner_version", "unknown")
        raise SchemaVersionError(
            f"{path}: feature cache schema version {found} (written by mner {writer}); this mner "
            f"({_library_versions()['mner']}) reads schema version {SCHEMA_VERSION}. Re-run "
            f"`mner-features extract ... --out {path}` with this mner version into a new file, "
            f"or install the mner version that wrote it."
        )


def _attrs_dict(obj: h5py.HLObject) -> dict[str, Any]:
    out = {}
    for key, value in obj.attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if key == "provenance" or (isinstance(value, str) and key.endswith("_json")):
            value = json.loads(value)
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def _walk_datasets(group: h5py.Group) -> dict[str, h5py.Dataset]:
    found: dict[str, h5py.Dataset] = {}
    group.visititems(lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _feature_groups(handle: h5py.File) -> list[str]:
    """Groups carrying a provenance attr (objects, encoders/clip, prompts/vcrmner, ...)."""
    names: list[str] = []
    handle.visititems(
        lambda name, obj: names.append(name) if isinstance(obj, h5py.Group) and "provenance" in obj.attrs else None
    )
    return sorted(names)


# ------------------------------------------------------------------------------------------------ writer


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_path(path: str, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


class CacheWriter:
    """Adds groups to a cache atomically: all writes go to ``<out>.tmp-<pid>``, renamed on clean exit.

    ``overwrite=True`` starts an empty cache instead of extending the existing one.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False):
        self.path = os.fspath(path)
        self.overwrite = overwrite
        self.temp_path = f"{self.path}.tmp-{os.getpid()}"
        self._file: h5py.File | None = None

    # context manager ---------------------------------------------------------------------------------
    def __enter__(self) -> CacheWriter:  # noqa: PYI034 (3.10 has no typing.Self)
        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        self._remove_stale_temps()
        if os.path.exists(self.path) and not self.overwrite:
            with open_cache_file(self.path, "r") as existing:
                _check_version(existing, self.path)
            shutil.copyfile(self.path, self.temp_path)
            self._file = h5py.File(self.temp_path, "r+")
        else:
            self._file = h5py.File(self.temp_path, "w")
            self._file.attrs["mner_schema_version"] = SCHEMA_VERSION
            self._file.attrs["mner_version"] = _library_versions()["mner"] or "unknown"
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        handle, self._file = self._file, None
        if exc_type is not None:
            if handle is not None:
                handle.close()
            if os.path.exists(self.temp_path):
                os.remove(self.temp_path)
            return
        handle.flush()
        handle.close()
        _fsync_path(self.temp_path)
        os.replace(self.temp_path, self.path)
        _fsync_path(os.path.dirname(os.path.abspath(self.path)), directory=True)

    def _remove_stale_temps(self) -> None:
        for temp in glob.glob(glob.escape(self.path) + ".tmp-*"):
            suffix = temp.rsplit(".tmp-", 1)[-1]
            if suffix.isdigit() and int(suffix) != os.getpid() and not _pid_alive(int(suffix)):
                os.remove(temp)
        if os.path.exists(self.temp_path):  # left by an earlier writer of this very process
            os.remove(self.temp_path)

    @property
    def file(self) -> h5py.File:
        if self._file is None:
            raise CacheError("CacheWriter is not open: use it as `with CacheWriter(path) as writer:`")
        return self._file

    # queries -----------------------------------------------------------------------------------------
    def existing_groups(self) -> set[str]:
        """Feature groups already in the cache (e.g. {"objects", "encoders/clip"}), plus images/posts."""
        groups = set(_feature_groups(self.file))
        groups.update(name for name in ("images", "posts") if name in self.file)
        return groups

    @property
    def num_images(self) -> int:
        if "images" not in self.file:
            raise CacheError("write_images(...) must come before any feature group")
        return int(self.file["images/ids"].shape[0])

    def _num_objects(self, pending: dict[str, tuple]) -> int:
        if "objects/offsets" in self.file:
            return int(self.file["objects/offsets"][-1])
        if "offsets" in pending:  # the objects group itself
            return int(np.asarray(pending["offsets"][0])[-1])
        raise CacheError("'object' rows need /objects/offsets: write the objects group first")

    # writes ------------------------------------------------------------------------------------------
    def write_images(
        self,
        ids: Sequence[str],
        status: Sequence[int | str] | np.ndarray | None = None,
        detail: Sequence[str] | None = None,
        width: Sequence[int] | np.ndarray | None = None,
        height: Sequence[int] | np.ndarray | None = None,
        *,
        overwrite: bool = False,
    ) -> None:
        """The image index. ``ids`` must be sorted and unique: every image-rows dataset follows this order."""
        ids = [str(i) for i in ids]
        if any(a >= b for a, b in itertools.pairwise(ids)):
            raise CacheError("image ids must be sorted and unique (pass sorted(set(ids)))")
        count = len(ids)
        status_codes = np.zeros(count, np.uint8) if status is None else np.array(
            [STATUS_NAMES.index(s) if isinstance(s, str) else int(s) for s in status], dtype=np.uint8
        )
        if status_codes.shape != (count,) or (status_codes >= len(STATUS_NAMES)).any():
            raise CacheError(f"status must be {count} codes in 0..3 or names in {STATUS_NAMES}")
        detail = [""] * count if detail is None else list(detail)
        width = np.zeros(count, np.int32) if width is None else np.asarray(width, dtype=np.int32)
        height = np.zeros(count, np.int32) if height is None else np.asarray(height, dtype=np.int32)
        for name, values in (("detail", detail), ("width", width), ("height", height)):
            if len(values) != count:
                raise CacheError(f"write_images: {name} has {len(values)} entries for {count} ids")
        if "images" in self.file:
            if _decode_ids(self.file["images/ids"][()]) != ids:
                if not overwrite or _feature_groups(self.file):
                    raise CacheError(
                        f"{self.path} already indexes a different image list; write to a new --out "
                        "(feature groups are aligned to the existing ids)"
                    )
            elif not overwrite:
                return  # same image list: resuming, keep the stored statuses
            del self.file["images"]
        group = self.file.create_group("images")
        group.attrs["id_list_hash"] = id_list_hash(ids)
        group.attrs["status_names"] = json.dumps(STATUS_NAMES)
        self._create(group, "ids", _fixed_bytes(ids), "image")
        self._create(group, "status", status_codes, "image")
        self._create_ragged(group, "detail", detail, "image")
        self._create(group, "width", width, "image")
        self._create(group, "height", height, "image")

    def write_posts(self, dataset, *, overwrite: bool = False) -> None:
        """Store the posts (tokens, tags, splits, data hash) so training needs only the cache."""
        from mner.pipeline.data import SPLIT_NAMES

        if "posts" in self.file:
            stored = self.file["posts"].attrs["data_hash"]
            if not overwrite and stored != dataset.data_hash:
                raise CacheError(
                    f"{self.path} was built from other data files (data hash {stored[:12]}..., now "
                    f"{dataset.data_hash[:12]}...); extract into a new --out"
                )
            if not overwrite:
                return
            del self.file["posts"]
        posts = [post for split in SPLIT_NAMES for post in dataset.splits.get(split, [])]
        extra = sorted(set(dataset.splits) - set(SPLIT_NAMES))
        posts += [post for split in extra for post in dataset.splits[split]]
        split_names = list(SPLIT_NAMES) + extra
        tag_names = sorted({tag for post in posts for tag in (post.tags or ())})
        tag_index = {tag: i for i, tag in enumerate(tag_names)}
        tokens = [token for post in posts for token in post.tokens]
        tag_ids = np.array(
            [tag_index[tag] if post.tags is not None else -1 for post in posts
             for tag in (post.tags if post.tags is not None else [None] * len(post.tokens))],
            dtype=np.int16,
        ).reshape(-1)
        token_offsets = np.concatenate([[0], np.cumsum([len(p.tokens) for p in posts], dtype=np.int64)])

        group = self.file.create_group("posts")
        group.attrs["data_hash"] = dataset.data_hash
        group.attrs["data_files_json"] = json.dumps(dataset.files)
        group.attrs["orphan_i_json"] = json.dumps(getattr(dataset, "orphan_i", {}))
        group.attrs["notes_json"] = json.dumps(list(getattr(dataset, "notes", [])))
        group.attrs["split_names_json"] = json.dumps(split_names)
        group.attrs["tag_names_json"] = json.dumps(tag_names)
        self._create(group, "post_id", _fixed_bytes([post.post_id for post in posts]), "post")
        self._create(group, "split", np.array([split_names.index(p.split) for p in posts], np.uint8), "post")
        self._create(group, "image_id", _fixed_bytes([post.image_id or "" for post in posts]), "post")
        self._create(group, "labelled", np.array([post.tags is not None for post in posts], np.uint8), "post")
        self._create_ragged(group, "source", [post.source for post in posts], "post")
        self._create(group, "token_offsets", token_offsets, "offsets", indexes="post")
        self._create_ragged(group, "token_text", tokens, "token")
        self._create(group, "tag_ids", tag_ids, "token")

    def write_group(
        self,
        name: str,
        datasets: dict[str, tuple[np.ndarray | list, str]],
        provenance: dict,
        attrs: dict | None = None,
        *,
        overwrite: bool = False,
    ) -> None:
        """Write one feature group; existing groups are never touched unless ``overwrite`` (this one only)."""
        name = name.strip("/")
        if name.split("/")[0] not in FEATURE_ROOTS:
            raise CacheError(f"feature group {name!r} must live under one of {FEATURE_ROOTS}")
        if not isinstance(provenance, dict) or "pretrained" not in provenance:
            raise CacheError(f"group {name}: provenance must come from make_provenance(...)")
        if name in self.file:
            if not overwrite:
                raise CacheError(f"{self.path}: group {name} exists; pass overwrite=True to replace it")
            del self.file[name]
        num_images = self.num_images
        prepared = {}
        for key, (values, rows) in datasets.items():
            if rows not in ROW_KINDS:
                raise CacheError(f"{name}/{key}: rows must be one of {ROW_KINDS}, got {rows!r}")
            prepared[key] = (values, rows)
        num_objects = None
        if any(rows == "object" for _, rows in prepared.values()):
            num_objects = self._num_objects(prepared if name == "objects" else {})
        group = self.file.create_group(name)
        try:
            for key, (values, rows) in prepared.items():
                if isinstance(values, (list, tuple)) and (not values or isinstance(values[0], (bytes, str))):
                    self._create_ragged(group, key, values, rows)
                    expected = {"image": num_images, "object": num_objects}.get(rows)
                    if expected is not None and len(values) != expected:
                        raise CacheError(f"{name}/{key}: {len(values)} values for {expected} {rows} rows")
                    continue
                array = np.asarray(values)
                if array.dtype == object or array.dtype.kind in "OUV":
                    raise CacheError(f"{name}/{key}: dtype {array.dtype} not storable; pass a list of bytes/str")
                if rows == "offsets":
                    self._check_offsets(f"{name}/{key}", array, num_images)
                    self._create(group, key, array.astype(np.int64), "offsets", indexes="image")
                    continue
                expected = {"image": num_images, "object": num_objects}.get(rows)
                if expected is not None and (array.ndim == 0 or array.shape[0] != expected):
                    raise CacheError(
                        f"{name}/{key}: first axis {array.shape[:1]} but the cache has {expected} {rows} rows"
                    )
                if array.dtype.kind == "f":
                    cast = np.float16 if rows in ("image", "object") and name != "objects" else np.float32
                    array = array.astype(cast, copy=False)
                self._create(group, key, array, rows)
            group.attrs["provenance"] = json.dumps(provenance, sort_keys=True, default=str)
            for key, value in (attrs or {}).items():
                group.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        except Exception:
            del self.file[name]
            raise

    @staticmethod
    def _check_offsets(where: str, offsets: np.ndarray, num_images: int) -> None:
        if offsets.shape != (num_images + 1,) or offsets[0] != 0 or (np.diff(offsets) < 0).any():
            raise CacheError(f"{where}: offsets must be ({num_images + 1},) non-decreasing from 0")

    @staticmethod
    def _create(group: h5py.Group, key: str, array: np.ndarray, rows: str, **attrs: Any) -> h5py.Dataset:
        # Contiguous, uncompressed: one image's rows are one contiguous byte range (fastest random reads).
        dataset = group.create_dataset(key, data=array)
        dataset.attrs["rows"] = rows
        for attr, value in attrs.items():
            dataset.attrs[attr] = value
        return dataset

    def _create_ragged(self, group: h5py.Group, key: str, values: Sequence[bytes | str], rows: str) -> None:
        flat, offsets = pack_ragged(values)
        text = bool(values) and isinstance(values[0], str)
        self._create(group, key, flat, "flat", offsets=f"{key}_offsets", encoding="utf-8" if text else "bytes")
        self._create(group, f"{key}_offsets", offsets, "offsets", indexes=rows)


# ------------------------------------------------------------------------------------------------ reader


class FeatureCache:
    """Read side of the cache; cheap to pickle, opens its own h5py handle in every process."""

    def __init__(self, path: str | os.PathLike, *, in_memory: bool = False):
        self.path = os.fspath(path)
        self.in_memory = in_memory
        if not os.path.exists(self.path):
            raise CacheError(f"{self.path}: no such feature cache; build it with `mner-features extract`")
        with open_cache_file(self.path, "r") as handle:
            _check_version(handle, self.path)
            if "images" not in handle:
                raise CacheError(f"{self.path}: has no /images index (incomplete extraction?)")
            self._ids_array = handle["images/ids"][()]
            self.status = handle["images/status"][()]
            self._meta = {
                name: (ds.attrs.get("rows", "global"), ds.shape, ds.dtype) for name, ds in _walk_datasets(handle).items()
            }
            self._group_attrs = {name: _attrs_dict(handle[name]) for name in _feature_groups(handle)}
            self._object_offsets = handle["objects/offsets"][()] if "objects/offsets" in handle else None
        self._row_of: dict[str, int] | None = None
        self._image_ids: list[str] | None = None
        self._memory: dict[str, np.ndarray] = {}
        self._flat_info: dict[str, tuple[str, str, bool]] = {}
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._datasets: dict[str, h5py.Dataset] = {}

    # process-local handle ----------------------------------------------------------------------------
    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = open_cache_file(self.path, "r")  # after fork: never reuse the parent's handle
            self._pid = os.getpid()
            self._datasets = {}
        return self._file

    def _dataset(self, path: str) -> h5py.Dataset:
        handle = self._h5()
        dataset = self._datasets.get(path)
        if dataset is None:
            dataset = self._datasets[path] = handle[path]
        return dataset

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_file=None, _pid=None, _datasets={})
        return state

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid, self._datasets = None, None, {}

    # index -------------------------------------------------------------------------------------------
    @property
    def image_ids(self) -> list[str]:
        if self._image_ids is None:
            self._image_ids = _decode_ids(self._ids_array)
        return self._image_ids

    @property
    def num_images(self) -> int:
        return int(self._ids_array.shape[0])

    @property
    def ok(self) -> np.ndarray:
        return self.status == 0

    def row_of(self, image_id: str) -> int:
        if self._row_of is None:
            self._row_of = {image_id: row for row, image_id in enumerate(self.image_ids)}
        try:
            return self._row_of[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in {self.path}") from None

    def detail(self, row: int) -> str:
        return self.read("images/detail", row)

    # metadata ----------------------------------------------------------------------------------------
    def has(self, path: str) -> bool:
        return path.strip("/") in self._meta

    def groups(self) -> list[str]:
        return list(self._group_attrs)

    def provenance(self, group: str) -> dict:
        try:
            return self._group_attrs[group.strip("/")]["provenance"]
        except KeyError:
            raise CacheError(f"{self.path}: no feature group {group!r}; groups: {self.groups()}") from None

    def random_init_groups(self) -> list[str]:
        return [g for g, attrs in self._group_attrs.items() if attrs["provenance"].get("pretrained") == "random"]

    def rows_kind(self, path: str) -> str:
        return self._info(path)[0]

    def row_shape(self, path: str) -> tuple:
        rows, shape, _ = self._info(path)
        return tuple(shape[1:]) if rows in ("image", "object") else tuple(shape)

    def _info(self, path: str) -> tuple:
        try:
            return self._meta[path.strip("/")]
        except KeyError:
            raise MissingFeaturesError(
                f"{self.path} has no dataset {path!r}. Add it with:\n  {self.hint([path])}"
            ) from None

    def hint(self, paths: Iterable[str]) -> str:
        data = None
        if self.has("posts/post_id"):
            files = json.loads(self._h5()["posts"].attrs.get("data_files_json", "{}"))
            folders = {os.path.dirname(f) for f in files.values()} if isinstance(files, dict) else set()
            data = folders.pop() if len(folders) == 1 else None
        return extract_command_hint(paths, out=self.path, data=data)

    def require(self, paths: Iterable[str], model: str = "this model") -> None:
        missing = [path for path in paths if not self.has(path)]
        if missing:
            raise MissingFeaturesError(
                f"model {model!r} needs {', '.join(missing)}, which {self.path} lacks "
                f"(groups present: {', '.join(self.groups()) or 'none'}). Add them (existing groups are kept) "
                f"with:\n  {self.hint(missing)}"
            )

    def feature_spec(self, paths: Iterable[str]) -> FeatureSpec:
        paths = [path.strip("/") for path in paths]
        self.require(paths)
        spec = FeatureSpec()
        for path in paths:
            spec.shapes[path] = self.row_shape(path)
            if self.rows_kind(path) == "global":
                spec.globals[path] = self.read_global(path)
            group = path.rsplit("/", 1)[0]
            if group in self._group_attrs:
                spec.attrs[group] = dict(self._group_attrs[group])
        return spec

    # rows ----------------------------------------------------------------------------------------------
    def _array(self, path: str) -> np.ndarray | h5py.Dataset:
        if self.in_memory:
            array = self._memory.get(path)
            if array is None:
                array = self._memory[path] = self._dataset(path)[()]
            return array
        return self._dataset(path)

    def _objects_of(self, row: int) -> tuple[int, int]:
        if self._object_offsets is None:
            raise MissingFeaturesError(f"{self.path} has no /objects group. Add it with:\n  {self.hint(['objects'])}")
        return int(self._object_offsets[row]), int(self._object_offsets[row + 1])

    def read(self, path: str, row: int):
        """Image ``row``'s data at ``path``: per-image row, (k, ...) object rows, or a global array whole."""
        path = path.strip("/")
        rows, shape, dtype = self._info(path)
        if rows == "image":
            return self._array(path)[row]
        if rows == "object":
            lo, hi = self._objects_of(row)
            if hi == lo:
                return np.zeros((0, *shape[1:]), dtype=dtype)
            return self._array(path)[lo:hi]
        if rows == "flat":
            return self._read_flat(path, row)
        if rows == "offsets":
            return np.asarray(self._array(path)[row : row + 2])
        return self.read_global(path)

    def _read_flat(self, path: str, row: int):
        info = self._flat_info.get(path)
        if info is None:  # attrs lookups are slow in h5py: resolve once per path
            attrs = self._dataset(path).attrs
            group = path.rsplit("/", 1)[0] if "/" in path else ""
            offsets_path = f"{group}/{attrs['offsets']}" if group else str(attrs["offsets"])
            indexes = str(self._dataset(offsets_path).attrs["indexes"])
            info = self._flat_info[path] = (offsets_path, indexes, attrs.get("encoding") == "utf-8")
        offsets_path, indexes, text = info
        offsets = self._offsets(offsets_path)
        flat = self._array(path)

        if indexes == "object":
            lo, hi = self._objects_of(row)
        elif indexes == "global":
            lo, hi = 0, len(offsets) - 1
        else:
            lo, hi = row, row + 1
        start = int(offsets[lo])
        raw = np.asarray(flat[start : int(offsets[hi])], dtype=np.uint8).tobytes()  # one read for all values
        values = [raw[offsets[i] - start : offsets[i + 1] - start] for i in range(lo, hi)]
        if text:
            values = [v.decode("utf-8") for v in values]
        return values if indexes in ("object", "global") else values[0]

    def _offsets(self, path: str) -> np.ndarray:
        array = self._memory.get(path)
        if array is None:  # offsets are small: always kept in memory
            array = self._memory[path] = self._dataset(path)[()]
        return array

    def read_global(self, path: str):
        path = path.strip("/")
        rows = self._info(path)[0]
        if rows == "flat":
            return self._read_flat(path, 0) if self._h5()[path].attrs.get("offsets") else self._array(path)[()]
        array = self._memory.get(path)
        if array is None:
            array = self._memory[path] = self._dataset(path)[()]
        return array

    # posts -----------------------------------------------------------------------------------------------
    def load_posts(self):
        """The posts the cache was built from, as a ``mner.pipeline.data.Dataset``."""
        from mner.pipeline.data import Dataset, Post

        if not self.has("posts/post_id"):
            raise CacheError(f"{self.path} has no /posts; re-run `mner-features extract --data <folder> ...`")
        group = self._h5()["posts"]
        split_names = json.loads(group.attrs["split_names_json"])
        tag_names = json.loads(group.attrs["tag_names_json"])
        post_ids = _decode_ids(group["post_id"][()])
        image_ids = _decode_ids(group["image_id"][()])
        splits_of = group["split"][()]
        labelled = group["labelled"][()].astype(bool)
        token_offsets = group["token_offsets"][()]
        tag_ids = group["tag_ids"][()]
        tokens = _unpack(group["token_text"][()], group["token_text_offsets"][()])
        sources = _unpack(group["source"][()], group["source_offsets"][()])
        splits: dict[str, list] = {name: [] for name in split_names}
        for p, post_id in enumerate(post_ids):
            lo, hi = int(token_offsets[p]), int(token_offsets[p + 1])
            tags = tuple(tag_names[t] for t in tag_ids[lo:hi]) if labelled[p] else None
            splits[split_names[splits_of[p]]].append(
                Post(post_id=post_id, tokens=tuple(tokens[lo:hi]), tags=tags, image_id=image_ids[p] or None,
                     split=split_names[splits_of[p]], source=sources[p])
            )
        splits = {name: posts for name, posts in splits.items() if posts}
        return Dataset(
            splits=splits, data_hash=group.attrs["data_hash"], files=json.loads(group.attrs["data_files_json"]),
            orphan_i=json.loads(group.attrs["orphan_i_json"]), notes=json.loads(group.attrs["notes_json"]),
        )


def _unpack(flat: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = flat.tobytes()
    return [raw[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]


# ------------------------------------------------------------------------------------------------- merge


def _runs_from_order(order: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """(shard, src_row) per output row -> coalesced runs (shard, src_lo, src_hi, dst_lo)."""
    runs: list[list[int]] = []
    for dst, (shard, src) in enumerate(order):
        if runs and runs[-1][0] == shard and runs[-1][2] == src:
            runs[-1][2] += 1
        else:
            runs.append([shard, src, src + 1, dst])
    return [tuple(run) for run in runs]


def _derive_runs(runs, offsets_by_shard):
    """Runs over R rows -> runs over the values those rows own, plus the merged (R+1,) offsets."""
    derived, lengths, cursor = [], [], 0
    for shard, lo, hi, _ in runs:
        offsets = offsets_by_shard[shard]
        start, stop = int(offsets[lo]), int(offsets[hi])
        if stop > start:
            derived.append((shard, start, stop, cursor))
        lengths.append(np.diff(offsets[lo : hi + 1]))
        cursor += stop - start
    merged = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=merged[1:])
    return derived, merged


def _copy_runs(sources: list[h5py.Dataset], runs, total: int, out_group: h5py.Group, key: str):
    template = sources[0]
    out = out_group.create_dataset(key, shape=(total, *template.shape[1:]), dtype=template.dtype)
    row_bytes = int(np.prod(template.shape[1:], dtype=np.int64)) * template.dtype.itemsize
    in_memory = total * row_bytes <= MERGE_IN_MEMORY_BYTES
    if in_memory:
        loaded = [src[()] for src in sources]
        buffer = np.empty(out.shape, out.dtype)
        for shard, lo, hi, dst in runs:
            buffer[dst : dst + hi - lo] = loaded[shard][lo:hi]
        if total:
            out[...] = buffer
    else:
        for shard, lo, hi, dst in runs:
            out[dst : dst + hi - lo] = sources[shard][lo:hi]
    for attr, value in template.attrs.items():
        out.attrs[attr] = value
    return out


def _same_dataset(a: h5py.Dataset, b: h5py.Dataset) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a[()], b[()])


def _comparable(provenance: dict) -> dict:
    return {key: value for key, value in provenance.items() if key not in SHARD_KEYS}


def merge_caches(paths: Sequence[str | os.PathLike], out: str | os.PathLike) -> str:
    """Merge shards (disjoint image subsets of one extraction) into the cache one process would write."""
    paths = [os.fspath(p) for p in paths]
    out = os.fspath(out)
    if not paths:
        raise CacheError("merge needs at least one shard")
    if os.path.abspath(out) in {os.path.abspath(p) for p in paths}:
        raise CacheError(f"merge output {out} is also a shard; choose another --out")
    handles = [open_cache_file(p, "r") for p in paths]
    try:
        for handle, path in zip(handles, paths):
            _check_version(handle, path)
            if "images" not in handle:
                raise CacheError(f"{path}: shard has no /images (an unfinished extraction?)")
        first_path, first = paths[0], handles[0]
        groups = _feature_groups(first)
        for handle, path in zip(handles[1:], paths[1:]):
            if _feature_groups(handle) != groups:
                raise CacheError(
                    f"shards differ in feature groups: {first_path} has {groups}, {path} has "
                    f"{_feature_groups(handle)}; finish every shard with the same flags before merging"
                )
        # the image index: a sorted merge of disjoint sorted id lists
        ids_by_shard = [_decode_ids(h["images/ids"][()]) for h in handles]
        owner: dict[str, tuple[int, int]] = {}
        for shard, ids in enumerate(ids_by_shard):
            for row, image_id in enumerate(ids):
                if image_id in owner:
                    raise CacheError(
                        f"image id {image_id!r} is in both {paths[owner[image_id][0]]} and {paths[shard]}: "
                        "shards must hold disjoint images"
                    )
                owner[image_id] = (shard, row)
        merged_ids = sorted(owner)
        image_runs = _runs_from_order([owner[i] for i in merged_ids])
        for group in groups:
            reference = _comparable(json.loads(first[group].attrs["provenance"]))
            for handle, path in zip(handles[1:], paths[1:]):
                other = _comparable(json.loads(handle[group].attrs["provenance"]))
                if other != reference:
                    diff = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
                    raise CacheError(
                        f"group {group}: provenance of {path} differs from {first_path} in {diff}; "
                        "shards must come from the same extraction settings and library versions"
                    )
        object_runs = None
        if "objects/offsets" in first:
            object_runs, _ = _derive_runs(image_runs, [h["objects/offsets"][()] for h in handles])
        runs_of = {"image": image_runs, "object": object_runs}
        totals = {"image": len(merged_ids), "object": None}
        if object_runs is not None:
            totals["object"] = sum(int(h["objects/offsets"][-1]) for h in handles)

        temp = f"{out}.tmp-{os.getpid()}"
        try:
            with h5py.File(temp, "w") as target:
                for key, value in first.attrs.items():
                    target.attrs[key] = value
                if "posts" in first:
                    for handle, path in zip(handles[1:], paths[1:]):
                        _check_same_group(first["posts"], handle["posts"], first_path, path)
                    first.copy(first["posts"], target, "posts")
                for group in ["images", *groups]:
                    _merge_group(group, handles, paths, target, runs_of, totals)
                target["images"].attrs["id_list_hash"] = id_list_hash(merged_ids)
                for group in groups:
                    provenance = json.loads(first[group].attrs["provenance"])
                    shards = [json.loads(h[group].attrs["provenance"]) for h in handles]
                    provenance.pop("shard", None)
                    provenance.update(
                        image_list_hash=id_list_hash(merged_ids), num_images=len(merged_ids),
                        merge={"command": list(sys.argv), "created": datetime.datetime.now(
                            datetime.timezone.utc).isoformat(timespec="seconds"),
                            "shards": [{"path": path, **{k: p.get(k) for k in SHARD_KEYS if k != "merge"}}
                                       for path, p in zip(paths, shards)]},
                    )
                    target[group].attrs["provenance"] = json.dumps(provenance, sort_keys=True, default=str)
            _fsync_path(temp)
            os.replace(temp, out)
        except BaseException:
            if os.path.exists(temp):
                os.remove(temp)
            raise
    finally:
        for handle in handles:
            handle.close()
    return out


def _check_same_group(a: h5py.Group, b: h5py.Group, path_a: str, path_b: str) -> None:
    names_a, names_b = _walk_datasets(a), _walk_datasets(b)
    if set(names_a) != set(names_b) or not all(_same_dataset(names_a[n], names_b[n]) for n in names_a):
        raise CacheError(f"{a.name} differs between {path_a} and {path_b}: shards must come from the same data")


def _merge_group(group, handles, paths, target, runs_of, totals) -> None:
    sources = [h[group] for h in handles]
    out_group = target.require_group(group)
    for key, value in sources[0].attrs.items():
        out_group.attrs[key] = value
    keys = sorted(k for k, v in sources[0].items() if isinstance(v, h5py.Dataset))
    for source, path in zip(sources[1:], paths[1:]):
        other = sorted(k for k, v in source.items() if isinstance(v, h5py.Dataset))
        if other != keys:
            raise CacheError(f"{group}: datasets differ between {paths[0]} ({keys}) and {path} ({other})")
        for key in keys:
            if source[key].shape[1:] != sources[0][key].shape[1:] or source[key].dtype != sources[0][key].dtype:
                raise CacheError(f"{group}/{key}: row shape/dtype differs between {paths[0]} and {path}")
    done = set()
    for key in keys:
        if key in done:
            continue
        rows = sources[0][key].attrs.get("rows", "global")
        if rows in ("image", "object"):
            _copy_runs([s[key] for s in sources], runs_of[rows], totals[rows], out_group, key)
        elif rows == "global" or (rows == "offsets" and sources[0][key].attrs["indexes"] not in runs_of):
            for source, path in zip(sources[1:], paths[1:]):
                if not _same_dataset(sources[0][key], source[key]):
                    raise CacheError(f"global dataset {group}/{key} differs between {paths[0]} and {path}")
            sources[0].copy(sources[0][key], out_group, key)
        elif rows == "offsets":  # merged together with the values it indexes
            indexes = sources[0][key].attrs["indexes"]
            if runs_of[indexes] is None:
                raise CacheError(f"{group}/{key} indexes {indexes} rows but the shards have no /objects/offsets")
            _, merged = _derive_runs(runs_of[indexes], [s[key][()] for s in sources])
            dataset = out_group.create_dataset(key, data=merged)
            for attr, value in sources[0][key].attrs.items():
                dataset.attrs[attr] = value
            flat = [k for k in keys if sources[0][k].attrs.get("offsets") == key]
            for flat_key in flat:  # the ragged values this offsets dataset owns
                value_runs, _ = _derive_runs(runs_of[indexes], [s[key][()] for s in sources])
                _copy_runs([s[flat_key] for s in sources], value_runs, int(merged[-1]), out_group, flat_key)
                done.add(flat_key)
        elif rows == "flat":
            offsets_key = sources[0][key].attrs["offsets"]
            if sources[0][offsets_key].attrs["indexes"] in runs_of:
                continue  # written with its offsets dataset
            for source, path in zip(sources[1:], paths[1:]):
                if not _same_dataset(sources[0][key], source[key]):
                    raise CacheError(f"global dataset {group}/{key} differs between {paths[0]} and {path}")
            sources[0].copy(sources[0][key], out_group, key)
        done.add(key)


# ---------------------------------------------------------------------------------------------- describe


def describe(path: str | os.PathLike) -> str:
    """Human-readable summary for ``mner-features info``."""
    path = os.fspath(path)
    with open_cache_file(path, "r") as handle:
        lines = [f"{path}  ({os.path.getsize(path) / 2**20:.1f} MiB)"]
        version = handle.attrs.get("mner_schema_version")
        lines.append(
            f"schema version {version} (this mner reads {SCHEMA_VERSION}), written by mner "
            f"{handle.attrs.get('mner_version', 'unknown')}"
        )
        if "images" in handle:
            status = handle["images/status"][()]
            counts = ", ".join(f"{name} {int((status == code).sum())}" for code, name in enumerate(STATUS_NAMES))
            lines.append(f"images: {len(status)} ({counts})")
        if "objects/offsets" in handle:
            per_image = np.diff(handle["objects/offsets"][()])
            lines.append(
                f"objects: {int(per_image.sum())} (per image: mean {per_image.mean() if len(per_image) else 0:.2f}, "
                f"max {int(per_image.max()) if len(per_image) else 0}, images with none {int((per_image == 0).sum())})"
            )
        if "posts" in handle:
            split_names = json.loads(handle["posts"].attrs["split_names_json"])
            splits = np.bincount(handle["posts/split"][()], minlength=len(split_names))
            per_split = ", ".join(f"{name} {int(n)}" for name, n in zip(split_names, splits))
            lines.append(f"posts: {per_split}  (data hash {handle['posts'].attrs['data_hash'][:16]}...)")
        for group in ["images", "posts", *_feature_groups(handle)]:
            if group not in handle:
                continue
            lines.append(f"/{group}")
            if "provenance" in handle[group].attrs:
                p = json.loads(handle[group].attrs["provenance"])
                pretrained = p.get("pretrained")
                warn = "  <-- RANDOM WEIGHTS (smoke test only)" if pretrained == "random" else ""
                lines.append(f"    provenance: model {p.get('model')}, pretrained {pretrained}{warn}")
                lines.append(
                    f"      created {p.get('created')}, torch {p.get('versions', {}).get('torch')}, "
                    f"images {p.get('num_images')} (hash {str(p.get('image_list_hash'))[:12]}...)"
                )
                if p.get("merge"):
                    lines.append(f"      merged from {len(p['merge']['shards'])} shards")
                if p.get("thresholds"):
                    lines.append(f"      thresholds {json.dumps(p['thresholds'])}")
                extra = {k: v for k, v in _attrs_dict(handle[group]).items() if k != "provenance"}
                if extra:
                    lines.append(f"      attrs {json.dumps(extra, default=str)}")
            for key, dataset in handle[group].items():
                if isinstance(dataset, h5py.Dataset):
                    shape = "x".join(str(s) for s in dataset.shape) or "scalar"
                    lines.append(f"    {key:<24} {shape:<20} {dataset.dtype!s:<8} rows={dataset.attrs.get('rows')}")
    return "\n".join(lines)
