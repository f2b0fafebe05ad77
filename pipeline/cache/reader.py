"""The read side: ``FeatureCache`` (cheap to pickle; one h5py handle per process) and ``FeatureSpec``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import h5py
import numpy as np

from mner.pipeline.cache.base import (
    STATUS_NAMES,
    CacheError,
    MissingFeaturesError,
    attrs_dict,
    check_version,
    damaged_metadata_as_error,
    decode_ids,
    feature_groups,
    open_cache_file,
    stored_groups,
    unpack_text,
    walk_datasets,
)

COVERAGE_KEYS = (*STATUS_NAMES, "not_in_cache", "no_image")


@dataclass
class FeatureSpec:
    """What a model needs to size itself from the cache without reading rows."""

    shapes: dict[str, tuple] = field(
        default_factory=dict
    )  # path -> shape of one row (whole shape for globals)
    globals: dict[str, np.ndarray] = field(default_factory=dict)  # "global" datasets, read whole
    attrs: dict[str, dict] = field(
        default_factory=dict
    )  # group -> its attrs (provenance parsed, logit_scale, ...)


@dataclass(frozen=True)
class _Meta:
    rows: str  # logical row kind: image | global | text | offsets | post | token | a declared ragged kind (object, ...)
    shape: tuple
    dtype: np.dtype
    index: str | None  # offsets dataset slicing these rows per image (object / grounding)
    offsets: str | None  # flat values: their offsets dataset
    encoding: str | None  # flat values: utf-8 | jpeg | bytes


def _scan(handle: h5py.File) -> dict[str, _Meta]:
    meta: dict[str, _Meta] = {}
    datasets = walk_datasets(handle)
    for name, ds in datasets.items():
        attrs = ds.attrs
        rows = str(attrs.get("rows", "global"))
        index = attrs.get("index")
        offsets = encoding = None
        if rows == "flat":
            group = name.rsplit("/", 1)[0] if "/" in name else ""
            offsets = f"{group}/{attrs['offsets']}" if group else str(attrs["offsets"])
            encoding = str(attrs.get("encoding", "bytes"))
            rows = str(datasets[offsets].attrs["indexes"])
            index = datasets[offsets].attrs.get("index")
            if rows == "image" and encoding == "utf-8":
                rows = "text"
        meta[name] = _Meta(
            rows, tuple(ds.shape), ds.dtype, None if index is None else str(index), offsets, encoding
        )
    return meta


class FeatureCache:
    """Read side of the cache; cheap to pickle, opens its own h5py handle in every process."""

    def __init__(self, path: str | os.PathLike, *, in_memory: bool = False):
        self.path = os.fspath(path)
        self.in_memory = in_memory
        with open_cache_file(self.path, "r") as handle, damaged_metadata_as_error(self.path):
            check_version(handle, self.path)
            if "images" not in handle:
                raise CacheError(f"{self.path}: has no /images index (incomplete extraction?)")
            self._ids_array = handle["images/ids"][()]
            self.status = handle["images/status"][()]
            self._meta = _scan(handle)
            self._group_attrs = {name: attrs_dict(handle[name]) for name in feature_groups(handle)}
            self._fingerprints = {
                name: str(handle[name].attrs["fingerprint"])
                for name in stored_groups(handle)
                if "fingerprint" in handle[name].attrs
            }
            self._fingerprint = str(handle.attrs.get("fingerprint", ""))
            self._data_files = (
                handle["posts"].attrs.get("data_files_json", "{}") if "posts" in handle else "{}"
            )
            # ragged-set offsets are small: kept in memory, shared by every dataset they slice
            self._index = {m.index: handle[m.index][()] for m in self._meta.values() if m.index}
        self._row_of: dict[str, int] | None = None
        self._image_ids: list[str] | None = None
        self._memory: dict[str, np.ndarray] = {}
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
        dataset = self._datasets.get(path)
        if dataset is None:
            dataset = self._datasets[path] = self._h5()[path]
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
            self._image_ids = decode_ids(self._ids_array)
        return self._image_ids

    @property
    def num_images(self) -> int:
        return int(self._ids_array.shape[0])

    @property
    def ok(self) -> np.ndarray:
        return self.status == 0

    def _rows(self) -> dict[str, int]:
        if self._row_of is None:
            self._row_of = {image_id: row for row, image_id in enumerate(self.image_ids)}
        return self._row_of

    def row_of(self, image_id: str) -> int:
        try:
            return self._rows()[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in {self.path}") from None

    def detail(self, row: int) -> str:
        return self.read("images/detail", row)

    def image_coverage(self, image_ids: Iterable[str | None]) -> dict[str, int]:
        """How a list of posts' image ids is covered: ok / missing / unreadable / placeholder rows,
        ids with no row at all (``not_in_cache``) and posts with no image (``no_image``, ids None or "")."""
        counts = dict.fromkeys(COVERAGE_KEYS, 0)
        row_of = self._rows()
        for image_id in image_ids:
            if not image_id:
                counts["no_image"] += 1
                continue
            row = row_of.get(image_id)
            if row is None:
                counts["not_in_cache"] += 1
            else:
                counts[STATUS_NAMES[int(self.status[row])]] += 1
        counts["total"] = sum(counts.values())
        return counts

    # metadata ----------------------------------------------------------------------------------------
    def has(self, path: str) -> bool:
        return path.strip("/") in self._meta

    def groups(self) -> list[str]:
        return list(self._group_attrs)

    def instances(self, spec_name: str) -> dict[str, dict[str, str]]:
        """The instances of a slotted spec in this cache: ``{"objects/maskrcnn": {"detector": "maskrcnn"}}``."""
        from mner.pipeline.cache.specs import get_group

        spec = get_group(spec_name)
        found = {}
        for group in self._group_attrs:
            values = spec.matches(group)
            if values is not None and get_group(group) is spec:
                found[group] = values
        return found

    def group_fingerprints(self) -> dict[str, str]:
        """Per-group checksum stored at write time (images, posts and every feature group)."""
        return dict(self._fingerprints)

    @property
    def fingerprint(self) -> str:
        """One checksum of the whole cache's contents (stored at write time)."""
        return self._fingerprint

    def provenance(self, group: str) -> dict:
        try:
            return self._group_attrs[group.strip("/")]["provenance"]
        except KeyError:
            raise CacheError(f"{self.path}: no feature group {group!r}; groups: {self.groups()}") from None

    def random_init_groups(self) -> list[str]:
        return [
            g for g, attrs in self._group_attrs.items() if attrs["provenance"].get("pretrained") == "random"
        ]

    def rows_kind(self, path: str) -> str:
        """image | global | text | offsets | post | token, or a ragged kind an index declares (object,
        grounding, ...); variable-length values report the kind of their rows."""
        return self._info(path).rows

    def encoding(self, path: str) -> str | None:
        """utf-8 | jpeg | bytes for variable-length values, None for fixed-shape arrays."""
        return self._info(path).encoding

    def index_of(self, path: str) -> str | None:
        """The offsets dataset slicing a ragged dataset's rows per image ("objects/maskrcnn/offsets")."""
        return self._info(path).index

    def row_shape(self, path: str) -> tuple:
        meta = self._info(path)
        if meta.offsets:
            return ()
        return tuple(meta.shape[1:]) if meta.rows not in ("global", "offsets") else tuple(meta.shape)

    def _info(self, path: str) -> _Meta:
        try:
            return self._meta[path.strip("/")]
        except KeyError:
            raise MissingFeaturesError(
                f"{self.path} has no dataset {path!r}. Add it with:\n  {self.hint([path])}"
            ) from None

    def hint(self, paths: Iterable[str]) -> str:
        from mner.pipeline.cache.describe import extract_command_hint

        files = json.loads(self._data_files)
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

    def _small(self, path: str) -> np.ndarray:
        array = self._memory.get(path)
        if array is None:  # offsets are small: always kept in memory
            array = self._memory[path] = self._dataset(path)[()]
        return array

    def rows_of(self, index: str, row: int) -> tuple[int, int]:
        """The slice of a ragged set (``index`` = its offsets path) that belongs to image ``row``."""
        offsets = self._index.get(index)
        if offsets is None:
            raise MissingFeaturesError(f"{self.path} has no {index}. Add it with:\n  {self.hint([index])}")
        return int(offsets[row]), int(offsets[row + 1])

    def count(self, index: str, row: int) -> int:
        lo, hi = self.rows_of(index, row)
        return hi - lo

    def read(self, path: str, row: int):
        """Image ``row``'s data at ``path``: a per-image row, ``(k, ...)`` rows of a ragged set, its text or
        bytes (a list for ragged sets), or a global array whole."""
        path = path.strip("/")
        meta = self._info(path)
        if meta.offsets:
            return self._read_values(path, meta, row)
        if meta.rows == "image":
            return self._array(path)[row]
        if meta.index:
            lo, hi = self.rows_of(meta.index, row)
            if hi == lo:
                return np.zeros((0, *meta.shape[1:]), dtype=meta.dtype)
            return self._array(path)[lo:hi]
        if meta.rows == "offsets":
            return np.asarray(self._small(path)[row : row + 2])
        return self.read_global(path)

    def _read_values(self, path: str, meta: _Meta, row: int):
        offsets = self._small(meta.offsets)
        if meta.index:
            lo, hi = self.rows_of(meta.index, row)
        elif meta.rows == "global":
            lo, hi = 0, len(offsets) - 1
        else:
            lo, hi = row, row + 1
        start = int(offsets[lo])
        raw = np.asarray(self._array(path)[start : int(offsets[hi])], dtype=np.uint8).tobytes()  # one read
        values = [raw[offsets[i] - start : offsets[i + 1] - start] for i in range(lo, hi)]
        if meta.encoding == "utf-8":
            values = [v.decode("utf-8") for v in values]
        return values if (meta.index or meta.rows == "global") else values[0]

    def read_global(self, path: str):
        path = path.strip("/")
        meta = self._info(path)
        if meta.offsets:
            return self._read_values(path, meta, 0)
        return self._small(path)

    # posts -----------------------------------------------------------------------------------------------
    def load_posts(self):
        """The posts the cache was built from, as a ``mner.pipeline.data.Dataset``."""
        from mner.pipeline.data import Dataset, Post

        if not self.has("posts/post_id"):
            raise CacheError(f"{self.path} has no /posts; re-run `mner-features extract --data <folder> ...`")
        group = self._h5()["posts"]
        split_names = json.loads(group.attrs["split_names_json"])
        tag_names = json.loads(group.attrs["tag_names_json"])
        post_ids = decode_ids(group["post_id"][()])
        image_ids = decode_ids(group["image_id"][()])
        splits_of = group["split"][()]
        labelled = group["labelled"][()].astype(bool)
        token_offsets = group["token_offsets"][()]
        tag_ids = group["tag_ids"][()]
        tokens = unpack_text(group["token_text"][()], group["token_text_offsets"][()])
        sources = unpack_text(group["source"][()], group["source_offsets"][()])
        splits: dict[str, list] = {name: [] for name in split_names}
        for p, post_id in enumerate(post_ids):
            lo, hi = int(token_offsets[p]), int(token_offsets[p + 1])
            tags = tuple(tag_names[t] for t in tag_ids[lo:hi]) if labelled[p] else None
            splits[split_names[splits_of[p]]].append(
                Post(
                    post_id=post_id,
                    tokens=tuple(tokens[lo:hi]),
                    tags=tags,
                    image_id=image_ids[p] or None,
                    split=split_names[splits_of[p]],
                    source=sources[p],
                )
            )
        splits = {name: posts for name, posts in splits.items() if posts}
        return Dataset(
            splits=splits,
            data_hash=group.attrs["data_hash"],
            files=json.loads(group.attrs["data_files_json"]),
            orphan_i=json.loads(group.attrs["orphan_i_json"]),
            notes=json.loads(group.attrs["notes_json"]),
        )
