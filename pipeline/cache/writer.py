"""The write side: atomic, locked, validated against the group specs, fingerprinted.

``with CacheWriter(out) as writer:`` holds the cache's lock (:class:`CacheLock`), copies an existing
cache to ``<out>.tmp-<host>-<pid>``, writes there, stores each group's fingerprint, and on clean exit
``os.replace``s the temp onto ``out``. An exception deletes the temp; ``out`` is never half-written.
Groups can be written whole (:meth:`CacheWriter.write_group`) or streamed chunk by chunk
(:meth:`CacheWriter.group` -> :class:`GroupWriter`), so assembly needs memory for one chunk only.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import re
import shutil
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from mner.pipeline.cache.base import (
    SCHEMA_VERSION,
    STATUS_NAMES,
    CacheError,
    cache_fingerprint,
    check_version,
    decode_ids,
    feature_groups,
    fixed_bytes,
    id_list_hash,
    library_versions,
    open_cache_file,
    stored_groups,
)
from mner.pipeline.cache.integrity import seal_group
from mner.pipeline.cache.lock import CacheLock, temp_suffix
from mner.pipeline.cache.specs import (
    COMMON_PROVENANCE,
    DatasetSpec,
    GroupSpec,
    get_group,
    index_path,
    is_ragged,
)

LEGACY_ROWS = {"offsets": "index"}  # the (values, rows) tuples of schema 1 callers
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")  # an address: differs between identical runs
FLAT_CHUNK = 1 << 20  # bytes per HDF5 chunk of a streamed (resizable) flat byte dataset


def _fsync_path(path: str, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


class CacheWriter:
    """Adds groups to a cache atomically under the cache's lock.

    ``overwrite=True`` starts an empty cache instead of extending the existing one. ``partial=True``
    lets a group leave out datasets (and group-specific provenance fields / attrs) its spec requires:
    only for tests and benches that need a few datasets. ``lock_timeout_s`` waits for another writer.
    ``in_memory=True`` (a new file only) builds the cache in memory and writes its bytes with plain file
    I/O: a full disk is then an ordinary OSError and never reaches HDF5 (an extraction's parts, one chunk
    each, are written this way in a background thread).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        partial: bool = False,
        lock_timeout_s: float = 0.0,
        in_memory: bool = False,
    ):
        self.path = os.fspath(path)
        self.overwrite = overwrite
        self.in_memory = in_memory
        self.partial = partial
        self.temp_path = f"{self.path}.tmp-{temp_suffix()}"
        self.lock = CacheLock(self.path, timeout_s=lock_timeout_s)
        self._file: h5py.File | None = None

    # context manager ---------------------------------------------------------------------------------
    def __enter__(self) -> CacheWriter:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.lock.acquire()
        try:
            self._remove_stale_temps()
            if self.in_memory:
                if os.path.exists(self.path) and not self.overwrite:
                    raise CacheError(f"{self.path}: an in-memory writer makes a new file (pass overwrite=True)")
                self._file = h5py.File(self.temp_path, "w", driver="core", backing_store=False)
                self._file.attrs["mner_schema_version"] = SCHEMA_VERSION
                self._file.attrs["mner_version"] = library_versions()["mner"] or "unknown"
            elif os.path.exists(self.path) and not self.overwrite:
                with open_cache_file(self.path, "r") as existing:
                    check_version(existing, self.path)
                shutil.copyfile(self.path, self.temp_path)
                self._file = h5py.File(self.temp_path, "r+")
            else:
                self._file = h5py.File(self.temp_path, "w")
                self._file.attrs["mner_schema_version"] = SCHEMA_VERSION
                self._file.attrs["mner_version"] = library_versions()["mner"] or "unknown"
        except BaseException:
            self._discard()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            disk = _disk_error(exc, self.path)
            if disk is not None:
                raise disk from None
            return
        try:
            handle = self.file
            self._finish_groups(handle)
            prints = {name: str(handle[name].attrs["fingerprint"]) for name in stored_groups(handle)}
            handle.attrs["fingerprint"] = cache_fingerprint(prints)
            handle.flush()
            image = handle.id.get_file_image() if self.in_memory else None
            handle.close()
            self._file = None
            if image is not None:
                with open(self.temp_path, "wb") as temp:
                    temp.write(image)
            _fsync_path(self.temp_path)
            self.lock.ensure_held()
            os.replace(self.temp_path, self.path)
            _fsync_path(os.path.dirname(os.path.abspath(self.path)), directory=True)
        except BaseException as error:
            self._discard()
            disk = _disk_error(error, self.path)
            if disk is not None:
                raise disk from None
            raise
        self.lock.release()

    def _finish_groups(self, handle: h5py.File) -> None:
        """Groups written around the GroupWriter (straight through ``writer.file``) are checked against
        their specs and fingerprinted here; /images and /posts are re-fingerprinted (small, and a
        producer may add a dataset such as images/content_sha256 after write_images)."""
        for name in ["images", "posts", *feature_groups(handle)]:
            if name not in handle:
                continue
            node = handle[name]
            if "fingerprint" not in node.attrs or name in ("images", "posts"):
                problems = spec_problems(node, get_group(name), partial=self.partial)
                if problems:
                    raise CacheError(f"group {name} does not match its spec: {'; '.join(problems)}")
                seal_group(node)

    def _discard(self) -> None:
        """Remove the temp file and release the lock, whatever state the file is in (a full disk makes
        h5py's close fail too: the temp and the lock must still go)."""
        handle, self._file = self._file, None
        try:
            if handle is not None:
                close_discarded(handle, self.temp_path)
            if os.path.exists(self.temp_path):
                os.remove(self.temp_path)
        finally:
            self.lock.release()

    def _remove_stale_temps(self) -> None:
        """Under the lock no other writer is alive: any temp of this cache is left over from a dead one."""
        for temp in glob.glob(glob.escape(self.path) + ".tmp-*"):
            os.remove(temp)

    @property
    def file(self) -> h5py.File:
        if self._file is None:
            raise CacheError("CacheWriter is not open: use it as `with CacheWriter(path) as writer:`")
        return self._file

    # queries -----------------------------------------------------------------------------------------
    def existing_groups(self) -> set[str]:
        """Feature groups already in the cache (e.g. {"objects/maskrcnn", "encoders/clip/RN50"}), plus images/posts."""
        groups = set(feature_groups(self.file))
        groups.update(name for name in ("images", "posts") if name in self.file)
        return groups

    @property
    def num_images(self) -> int:
        if "images" not in self.file:
            raise CacheError("write_images(...) must come before any feature group")
        return int(self.file["images/ids"].shape[0])

    # writes ------------------------------------------------------------------------------------------
    def write_images(
        self,
        ids: Sequence[str],
        status: Sequence[int | str] | np.ndarray | None = None,
        detail: Sequence[str] | None = None,
        width: Sequence[int] | np.ndarray | None = None,
        height: Sequence[int] | np.ndarray | None = None,
        *,
        content_sha256: Sequence[str] | None = None,
        overwrite: bool = False,
    ) -> None:
        """The image index. ``ids`` must be sorted and unique: every image-rows dataset follows this order."""
        ids = [str(i) for i in ids]
        if any(a >= b for a, b in itertools.pairwise(ids)):
            raise CacheError("image ids must be sorted and unique (pass sorted(set(ids)))")
        count = len(ids)
        status_codes = (
            np.zeros(count, np.uint8)
            if status is None
            else np.array(
                [STATUS_NAMES.index(s) if isinstance(s, str) else int(s) for s in status], dtype=np.uint8
            )
        )
        if status_codes.shape != (count,) or (status_codes >= len(STATUS_NAMES)).any():
            raise CacheError(f"status must be {count} codes in 0..3 or names in {STATUS_NAMES}")
        if "images" in self.file:
            if decode_ids(self.file["images/ids"][()]) != ids:
                if not overwrite or feature_groups(self.file):
                    raise CacheError(
                        f"{self.path} already indexes a different image list; write to a new --out "
                        "(feature groups are aligned to the existing ids)"
                    )
            elif not overwrite:
                return  # same image list: resuming, keep the stored statuses
            del self.file["images"]
        for row, text in enumerate(detail or ()):
            if _OBJECT_REPR.search(str(text)):
                raise CacheError(f"images/detail of {ids[row]!r} holds an object repr ({str(text)[:80]!r}): its memory "
                                 "address would make identical extractions differ; the image loader must describe "
                                 "the error without it")
        datasets: dict[str, Any] = {
            "ids": fixed_bytes(ids),
            "status": status_codes,
            "detail": [""] * count if detail is None else [str(d) for d in detail],
            "width": np.zeros(count, np.int32) if width is None else np.asarray(width),
            "height": np.zeros(count, np.int32) if height is None else np.asarray(height),
        }
        if content_sha256 is not None:
            datasets["content_sha256"] = fixed_bytes(list(content_sha256))
        for name, values in datasets.items():
            if len(values) != count:
                raise CacheError(f"write_images: {name} has {len(values)} entries for {count} ids")
        attrs = {"id_list_hash": id_list_hash(ids), "status_names": json.dumps(STATUS_NAMES)}
        self.write_group("images", datasets, None, attrs, num_images=count)

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
        tag_ids = np.array(
            [
                tag_index[tag] if post.tags is not None else -1
                for post in posts
                for tag in (post.tags if post.tags is not None else [None] * len(post.tokens))
            ],
            dtype=np.int16,
        ).reshape(-1)
        token_offsets = np.zeros(len(posts) + 1, dtype=np.int64)
        np.cumsum([len(p.tokens) for p in posts], out=token_offsets[1:])
        attrs = {
            "data_hash": dataset.data_hash,
            "data_files_json": json.dumps(dataset.files),
            "orphan_i_json": json.dumps(getattr(dataset, "orphan_i", {})),
            "notes_json": json.dumps(list(getattr(dataset, "notes", []))),
            "split_names_json": json.dumps(split_names),
            "tag_names_json": json.dumps(tag_names),
        }
        self.write_group(
            "posts",
            {
                "post_id": fixed_bytes([post.post_id for post in posts]),
                "split": np.array([split_names.index(p.split) for p in posts], np.uint8),
                "image_id": fixed_bytes([post.image_id or "" for post in posts]),
                "labelled": np.array([post.tags is not None for post in posts], np.uint8),
                "source": [post.source for post in posts],
                "token_offsets": token_offsets,
                "token_text": [token for post in posts for token in post.tokens],
                "tag_ids": tag_ids,
            },
            None,
            attrs,
        )

    def write_group(
        self,
        name: str,
        datasets: dict[str, Any],
        provenance: dict | None,
        attrs: dict | None = None,
        *,
        overwrite: bool = False,
        num_images: int | None = None,
    ) -> None:
        """Write one whole group. ``datasets`` maps a declared dataset name to its values, or to a
        ``(values, rows)`` pair whose row kind must match the spec. Existing groups are never touched
        unless ``overwrite`` (this group only)."""
        spec = get_group(name)
        indexes = {}
        for key, value in datasets.items():
            if spec.dataset(key).rows == "index":
                indexes[key] = value[0] if isinstance(value, tuple) else value
        with self.group(
            name, provenance, attrs, indexes=indexes, overwrite=overwrite, num_images=num_images
        ) as group:
            group.append({k: v for k, v in datasets.items() if k not in indexes})

    def group(
        self,
        name: str,
        provenance: dict | None,
        attrs: dict | None = None,
        *,
        indexes: dict[str, Any] | None = None,
        overwrite: bool = False,
        num_images: int | None = None,
    ) -> GroupWriter:
        """Stream a group: ``with writer.group(...) as g: g.append({...rows of the next images...})``.

        ``indexes`` gives the group's own index datasets (``objects/offsets``) whole, up front: they fix
        how many rows every ragged dataset gets.
        """
        name = name.strip("/")
        spec = get_group(name)
        if spec.feature:
            self._check_provenance(name, spec, provenance)
        elif provenance is not None:
            raise CacheError(f"group {name} carries no provenance")
        if name in self.file:
            if not overwrite:
                raise CacheError(f"{self.path}: group {name} exists; pass overwrite=True to replace it")
            del self.file[name]
        missing_attrs = [a for a in spec.attrs if a not in (attrs or {})]
        if missing_attrs and not self.partial:
            raise CacheError(f"group {name}: attrs {missing_attrs} are required by its spec")
        count = num_images if num_images is not None else self.num_images
        return GroupWriter(self, name, spec, provenance, attrs or {}, indexes or {}, count)

    def _check_provenance(self, name: str, spec: GroupSpec, provenance: dict | None) -> None:
        if not isinstance(provenance, dict) or "pretrained" not in provenance:
            raise CacheError(f"group {name}: provenance must come from make_provenance(...)")
        required = COMMON_PROVENANCE + (() if self.partial else spec.provenance)
        missing = [key for key in required if key not in provenance]
        if missing:
            raise CacheError(f"group {name}: provenance lacks {missing} (declared in its GroupSpec)")


def close_discarded(handle: h5py.File, path: str) -> None:
    """Close an HDF5 file whose content is being thrown away. Its blocks are freed first (truncated to 0
    bytes): after a write failed on a full disk, HDF5's closing writes would fail too, leaving the library
    unable to release the file (tracebacks from every handle, then a crash at exit). Errors are dropped:
    the write's own error is the one reported."""
    with contextlib.suppress(OSError):
        os.truncate(path, 0)
    with contextlib.suppress(Exception):
        handle.close()


@contextlib.contextmanager
def discardable_file(path: str):
    """``h5py.File(path, "w")`` that, on an exception, is closed by :func:`close_discarded`."""
    handle = h5py.File(path, "w")
    try:
        yield handle
    except BaseException:
        close_discarded(handle, path)
        raise
    handle.close()


_H5_ERRNO = re.compile(r"errno = (\d+)")


def _disk_error(error: BaseException, path: str) -> OSError | None:
    """h5py reports a failed write (disk full, read-only) as RuntimeError/OSError text with ``errno = N``
    (and a buffer address): the plain OSError, naming the file, so the command prints one line."""
    if isinstance(error, OSError) and error.errno is not None:
        return None  # already a proper OSError
    if not isinstance(error, (RuntimeError, OSError)):
        return None
    found = _H5_ERRNO.search(str(error))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), path)


def spec_problems(node: h5py.Group, spec: GroupSpec, *, partial: bool = False) -> list[str]:
    """How a stored group differs from its declaration (empty when it matches)."""
    problems: list[str] = []
    declared = {d.name: d for d in spec.datasets}
    dims: dict[str, int] = {}
    for key, dataset in node.items():
        if not isinstance(dataset, h5py.Dataset):
            continue
        if key.endswith("_offsets") and key[: -len("_offsets")] in declared:
            continue
        ds = declared.get(key)
        if ds is None:
            problems.append(f"undeclared dataset {key}")
            continue
        if ds.ragged_values or ds.rows == "index":
            continue
        stored_rows = str(dataset.attrs.get("rows", ""))
        if stored_rows != ds.per_image_kind:
            problems.append(f"{key}: rows {stored_rows!r}, declared {ds.per_image_kind!r}")
        if (
            (ds.dtype == "S"
            and dataset.dtype.kind != "S")
            or (ds.dtype != "S"
            and dataset.dtype != np.dtype(ds.dtype))
        ):
            problems.append(f"{key}: dtype {dataset.dtype}, declared {ds.dtype}")
        row_shape = tuple(dataset.shape) if ds.rows == "global" else tuple(dataset.shape[1:])
        if len(row_shape) != len(ds.shape):
            problems.append(f"{key}: per-row shape {row_shape}, declared {ds.shape}")
            continue
        for got, want in zip(row_shape, ds.shape):
            if (
                (isinstance(want, str)
                and dims.setdefault(want, got) != got)
                or (isinstance(want, int)
                and want != got)
            ):
                problems.append(f"{key}: per-row shape {row_shape}, declared {ds.shape} (dims {dims})")
    if not partial:
        problems += [
            f"missing required dataset {d.name}" for d in spec.datasets if d.required and d.name not in node
        ]
    return problems


class GroupWriter:
    """Writes one group's datasets chunk by chunk, in image order, validating each against its spec."""

    def __init__(
        self,
        writer: CacheWriter,
        name: str,
        spec: GroupSpec,
        provenance: dict | None,
        attrs: dict,
        indexes: dict[str, Any],
        num_images: int,
    ):
        self.writer, self.name, self.spec = writer, name, spec
        self.provenance, self.attrs = provenance, attrs
        self.dims: dict[str, int] = {}
        self.totals: dict[str, int | None] = {"image": num_images, "text": num_images, "global": None}
        self.index_of: dict[str, str] = {}  # ragged kind -> path of its offsets dataset
        self.cursor: dict[str, int] = {}  # dataset -> rows written
        self.byte_cursor: dict[str, int] = {}  # ragged dataset -> bytes written
        self.group = writer.file.create_group(name)
        try:
            for key, offsets in indexes.items():
                self._write_index(spec.dataset(key), np.asarray(offsets))
        except BaseException:
            del writer.file[name]
            raise

    def __enter__(self) -> GroupWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self.name in self.writer.file:
                del self.writer.file[self.name]
            return
        try:
            self.close()
        except BaseException:
            del self.writer.file[self.name]
            raise

    # indexes -------------------------------------------------------------------------------------------
    def _write_index(self, spec: DatasetSpec, offsets: np.ndarray) -> None:
        where = f"{self.name}/{spec.name}"
        parent = "post" if spec.indexes == "token" else "image"
        expected = self.totals.get(parent)
        if spec.indexes == "token":  # posts: the index fixes the post count too
            expected = self.totals["post"] = len(offsets) - 1
        if (
            offsets.ndim != 1
            or offsets.shape[0] != expected + 1
            or (len(offsets) and offsets[0] != 0)
            or (np.diff(offsets) < 0).any()
            or offsets.dtype.kind not in "iu"
        ):
            raise CacheError(f"{where}: offsets must be ({expected + 1},) integers non-decreasing from 0")
        limit = spec.max_per_image
        if limit is not None and len(offsets) > 1 and int(np.diff(offsets).max()) > limit:
            raise CacheError(
                f"{where}: at most {limit} {spec.indexes} rows per image, found {int(np.diff(offsets).max())}"
            )
        dataset = self.group.create_dataset(spec.name, data=offsets.astype(np.int64))
        dataset.attrs["rows"] = "offsets"
        dataset.attrs["indexes"] = parent
        dataset.attrs["defines"] = spec.indexes
        self.index_of[spec.indexes] = where
        self.totals[spec.indexes] = int(offsets[-1]) if len(offsets) else 0
        self.cursor[spec.name] = len(offsets) - 1

    def _existing_index(self, kind: str) -> None:
        """A ragged kind indexed by another group (crop_embed rows follow objects/offsets)."""
        if kind in self.index_of or not is_ragged(kind):
            return
        path = index_path(self.name, kind)
        if path not in self.writer.file:
            raise CacheError(f"{self.name}: {kind!r} rows need {path}; write that group first")
        self.index_of[kind] = path
        self.totals[kind] = int(self.writer.file[path][-1])

    # rows ------------------------------------------------------------------------------------------------
    def append(self, arrays: dict[str, Any]) -> None:
        """The next rows of some datasets (all rows of a global). Row kinds/dtypes/shapes are checked."""
        for key, values in arrays.items():
            spec = self.spec.dataset(key)
            if isinstance(values, tuple):
                values, rows = values
                rows = LEGACY_ROWS.get(rows, rows)
                if rows != spec.rows and not (spec.rows == "text" and rows == "image"):
                    raise CacheError(f"{self.name}/{key}: declared rows {spec.rows!r}, got {rows!r}")
            if spec.rows == "index":
                raise CacheError(f"{self.name}/{key}: an index dataset is given whole when the group opens")
            if spec.ragged_values:
                self._append_ragged(spec, values)
            else:
                self._append_fixed(spec, values)

    def _total(self, spec: DatasetSpec, first_chunk: int) -> int:
        kind = spec.per_image_kind
        self._existing_index(kind)
        total = self.totals.get(kind)
        return first_chunk if total is None else total

    def _bind(self, spec: DatasetSpec, shape: tuple) -> None:
        where = f"{self.name}/{spec.name}"
        if len(shape) != len(spec.shape):
            raise CacheError(f"{where}: per-row shape {shape} does not match the declared {spec.shape}")
        for got, want in zip(shape, spec.shape):
            if isinstance(want, str):
                bound = self.dims.setdefault(want, int(got))
                if bound != got:
                    raise CacheError(f"{where}: dim {want} is {got} here but {bound} elsewhere in the group")
            elif want != got:
                raise CacheError(f"{where}: per-row shape {shape} does not match the declared {spec.shape}")

    def _append_fixed(self, spec: DatasetSpec, values: Any) -> None:
        where = f"{self.name}/{spec.name}"
        if (
            isinstance(values, (list, tuple))
            and values
            and isinstance(values[0], (bytes, str))
            and spec.dtype != "S"
        ):
            raise CacheError(f"{where}: declared {spec.dtype} arrays, got a list of strings/bytes")
        array = np.asarray(values)
        if array.dtype == object or array.dtype.kind in "OUV":
            raise CacheError(f"{where}: dtype {array.dtype} not storable")
        if spec.rows == "global":
            row_shape, rows = array.shape, None
        else:
            if array.ndim == 0:
                raise CacheError(f"{where}: {spec.rows} rows need a first axis")
            row_shape, rows = array.shape[1:], array.shape[0]
        self._bind(spec, tuple(row_shape))
        array = self._cast(where, spec, array)
        if array.dtype.kind == "f" and self.spec.finite and array.size and not np.isfinite(array).all():
            self._refuse_nonfinite(where, spec, array)
        if spec.rows == "global":
            if spec.name in self.cursor:
                raise CacheError(f"{where}: a global dataset is written once, whole")
            self._create(spec, data=array)
            self.cursor[spec.name] = 1
            return
        start = self.cursor.get(spec.name, 0)
        total = self._total(spec, rows)
        if start + rows > total:
            raise CacheError(
                f"{where}: first axis {start + rows} rows but the cache has {total} {spec.rows} rows"
            )
        if spec.name not in self.group:
            if rows == total:
                self._create(spec, data=array)
                self.cursor[spec.name] = rows
                return
            self._create(spec, shape=(total, *array.shape[1:]), dtype=array.dtype)
        self.group[spec.name][start : start + rows] = array
        self.cursor[spec.name] = start + rows

    def _refuse_nonfinite(self, where: str, spec: DatasetSpec, array: np.ndarray) -> None:
        """NaN/Inf never enter a cache silently (a model trained on them has NaN weights): name the image."""
        if spec.rows == "global":
            raise CacheError(f"{where}: NaN or Inf values in a global dataset; the producer of {self.name} is broken")
        bad = np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))
        start = self.cursor.get(spec.name, 0)
        rows = [start + int(i) for i in bad[:5]]
        if spec.rows != "image":
            self._existing_index(spec.per_image_kind)
            index = self.writer.file[self.index_of[spec.per_image_kind]][()]
            rows = [int(np.searchsorted(index, row, side="right")) - 1 for row in rows]
        ids = self.writer.file["images/ids"] if "images" in self.writer.file else None
        names = [ids[row].decode("utf-8") if ids is not None and row < len(ids) else f"row {row}" for row in rows]
        raise CacheError(
            f"{where}: NaN or Inf in the features of {len(bad)} row(s), image(s) {', '.join(dict.fromkeys(names))}; "
            "nothing was written. Check those images (or the producer's weights) and run again; a group that stores "
            "non-finite values on purpose declares GroupSpec(finite=False)"
        )

    @staticmethod
    def _cast(where: str, spec: DatasetSpec, array: np.ndarray) -> np.ndarray:
        if spec.dtype == "S":
            if array.dtype.kind != "S":
                raise CacheError(f"{where}: declared fixed bytes (S), got {array.dtype}")
            return array
        want = np.dtype(spec.dtype)
        if want.kind in "iu" and array.dtype.kind == "f":
            raise CacheError(f"{where}: declared {want}, got floats ({array.dtype}); cast explicitly")
        if want.kind == "f" and array.dtype.kind == "f" and want.itemsize < array.dtype.itemsize:
            limit = np.finfo(want).max
            if array.size and np.isfinite(array).all() and np.abs(array).max() > limit:
                raise CacheError(
                    f"{where}: values beyond {want} range ({float(np.abs(array).max()):.3g}); "
                    "scale or clip them before writing (no silent inf)"
                )
        if want.kind in "iu" and array.size and array.dtype.kind in "iu":
            info = np.iinfo(want)
            if array.min() < info.min or array.max() > info.max:
                raise CacheError(f"{where}: values outside {want} range")
        return array.astype(want, copy=False)

    def _create(self, spec: DatasetSpec, **kwargs) -> h5py.Dataset:
        # Contiguous, uncompressed: one image's rows are one contiguous byte range (fastest random reads).
        dataset = self.group.create_dataset(spec.name, **kwargs)
        dataset.attrs["rows"] = spec.per_image_kind
        if spec.rows in self.index_of:
            dataset.attrs["index"] = self.index_of[spec.rows]
        return dataset

    def _append_ragged(self, spec: DatasetSpec, values: Any) -> None:
        where = f"{self.name}/{spec.name}"
        if not isinstance(values, (list, tuple)) or (
            values and not isinstance(values[0], (bytes, str, np.ndarray))
        ):
            raise CacheError(
                f"{where}: declared {spec.encoding} values: pass a list of "
                f"{'str' if spec.encoding == 'utf-8' else 'bytes'}"
            )
        if spec.encoding == "utf-8" and values and not isinstance(values[0], str):
            raise CacheError(f"{where}: declared UTF-8 text, got {type(values[0]).__name__}")
        chunks = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
        if spec.rows == "global":
            if spec.name in self.cursor:
                raise CacheError(f"{where}: a global dataset is written once, whole")
            if spec.shape:
                self._bind(spec, (len(chunks),))
            total = len(chunks)
        else:
            total = self._total(spec, len(chunks))
        start = self.cursor.get(spec.name, 0)
        if start + len(chunks) > total:
            raise CacheError(f"{where}: {start + len(chunks)} values for {total} {spec.rows} rows")
        flat = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        lengths = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
        offsets_key = f"{spec.name}_offsets"
        if spec.name not in self.group:
            whole = len(chunks) == total
            data = (
                self._create(spec, data=flat)
                if whole
                else self._create(spec, shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(FLAT_CHUNK,))
            )
            data.attrs["rows"] = "flat"
            data.attrs["offsets"] = offsets_key
            data.attrs["encoding"] = spec.encoding
            index = self.group.create_dataset(offsets_key, shape=(total + 1,), dtype=np.int64)
            index.attrs["rows"] = "offsets"
            index.attrs["indexes"] = spec.per_image_kind
            if spec.rows in self.index_of:
                index.attrs["index"] = self.index_of[spec.rows]
            self.byte_cursor[spec.name] = 0
            if whole:
                index[...] = np.concatenate([[0], np.cumsum(lengths)])
                self.cursor[spec.name] = total
                self.byte_cursor[spec.name] = len(flat)
                return
        data, index = self.group[spec.name], self.group[offsets_key]
        byte_start = self.byte_cursor[spec.name]
        data.resize((byte_start + len(flat),))
        data[byte_start:] = flat
        index[start + 1 : start + 1 + len(chunks)] = byte_start + np.cumsum(lengths)
        self.cursor[spec.name] = start + len(chunks)
        self.byte_cursor[spec.name] = byte_start + len(flat)

    # finish ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        for spec in self.spec.datasets:
            written = self.cursor.get(spec.name)
            if written is None:
                if spec.required and not self.writer.partial:
                    raise CacheError(
                        f"group {self.name}: dataset {spec.name} is required by its spec but was "
                        "not written (CacheWriter(partial=True) is for tests only)"
                    )
                continue
            if spec.rows not in ("global", "index"):
                total = self.totals.get(spec.per_image_kind)
                if written != total:
                    raise CacheError(
                        f"{self.name}/{spec.name}: {written} of {total} {spec.rows} rows written"
                    )
        group = self.group
        for key, value in self.attrs.items():
            group.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
        if self.dims:
            group.attrs["dims"] = json.dumps(self.dims, sort_keys=True)
        if self.provenance is not None:
            group.attrs["provenance"] = json.dumps(self.provenance, sort_keys=True, default=str)
        seal_group(group)  # fingerprint + per-block checksums (pipeline/cache/integrity.py)
