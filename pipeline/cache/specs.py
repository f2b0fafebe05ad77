"""Feature groups declared once, as data.

A :class:`GroupSpec` lists a group's datasets (:class:`DatasetSpec`: row kind, dtype, per-row shape,
how it becomes a batch tensor), the stage-1 option that produces it and the provenance fields it
records. The writer validates against these specs; the reader, merge, ``describe``/``info``, the
missing-features hint, the trainer's batcher, ``docs/cache-schema.md`` and the tests derive from
them. Adding a feature group = one ``register_group(GroupSpec(...))`` (see docs/architecture.md).

Row kinds (``DatasetSpec.rows``):

- ``image``: one row per image, in ``/images/ids`` order;
- ``object``: a ragged per-image set (the detector's objects), rows of image i are
  ``offsets[i]:offsets[i+1]`` of the set's index dataset (``objects/offsets``);
- ``grounding``: a second ragged per-image set (at most ``GROUNDING_MAX`` rows per image) with its own
  index dataset;
- ``global``: read whole (prompt embeddings, centroids);
- ``text``: one UTF-8 string per image (captions);
- ``index``: the ``(N+1,)`` int64 offsets that define a ragged set (``indexes`` names the set);
- ``post`` / ``token``: only in ``/posts``.

Variable-length values (JPEG crops, UTF-8 strings) set ``encoding`` and are stored as a flat uint8
dataset plus ``<name>_offsets``. Symbolic per-row dims (``"D"``) must agree within a group; their
values are stored in the group attr ``dims``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mner.pipeline.cache.base import CacheError

ROW_KINDS = ("image", "object", "grounding", "global", "text", "index", "post", "token")
RAGGED_KINDS = ("object", "grounding", "token")  # sliced per image (per post for tokens) by an index
GROUNDING_MAX = 3  # grounding crops per image at most
COLLATIONS = ("float", "pixels", "jpeg", "text", None)  # None: not a batch tensor (ids, indexes, globals)
ENCODINGS = ("utf-8", "jpeg", "bytes", None)  # None: a fixed-shape numeric or fixed-bytes array
COMMON_PROVENANCE = (
    "component",
    "model",
    "pretrained",
    "preprocessing",
    "thresholds",
    "versions",
    "image_list_hash",
    "num_images",
    "command",
    "created",
)


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a group."""

    name: str  # key inside the group ("crop_embed")
    rows: str  # row kind, one of ROW_KINDS
    dtype: str  # stored numpy dtype ("float16", "int32", "S" fixed bytes); "uint8" for encoded values
    shape: tuple = ()  # per-row shape (whole shape for globals); str entries are symbolic dims ("D")
    collate: str | None = "float"  # how it becomes a batch tensor: float | pixels | jpeg | text | None
    encoding: str | None = None  # variable-length values: utf-8 | jpeg | bytes (flat uint8 + <name>_offsets)
    required: bool = True  # the group is incomplete without it
    indexes: str | None = None  # rows="index" only: the ragged kind this offsets dataset defines
    max_per_image: int | None = None  # rows="index" only: rows of the set per image at most
    pixels: int | None = None  # collate jpeg/pixels: side of the square uint8 image in the batch
    doc: str = ""  # one line for docs/cache-schema.md

    def __post_init__(self):
        if self.rows not in ROW_KINDS:
            raise ValueError(f"{self.name}: rows {self.rows!r} not in {ROW_KINDS}")
        if self.collate not in COLLATIONS or self.encoding not in ENCODINGS:
            raise ValueError(f"{self.name}: collate {self.collate!r} / encoding {self.encoding!r} unknown")
        if self.rows == "text" and self.encoding != "utf-8":
            raise ValueError(f"{self.name}: rows 'text' are UTF-8 strings (encoding='utf-8')")
        if (self.rows == "index") != (self.indexes is not None):
            raise ValueError(f"{self.name}: rows 'index' and indexes=<ragged kind> go together")
        if self.collate in ("jpeg", "pixels") and not self.pixels:
            raise ValueError(f"{self.name}: collate {self.collate!r} needs pixels=<side>")

    @property
    def ragged_values(self) -> bool:
        """Stored as flat uint8 + offsets (JPEG bytes, strings)."""
        return self.encoding is not None

    @property
    def per_image_kind(self) -> str:
        """The row kind of the values' index: text rows are image rows holding a string."""
        return "image" if self.rows == "text" else self.rows


@dataclass(frozen=True)
class GroupSpec:
    """A feature group: its datasets, the stage-1 option that makes it, what its provenance records."""

    name: str  # path in the file; one segment may be "*" ("prompts/*": any prompt set)
    datasets: tuple[DatasetSpec, ...]
    option: str | None = (
        None  # stage-1 option producing it ("--encoder clip", "--prompts {name}"); None: always
    )
    provenance: tuple[str, ...] = ()  # fields recorded beyond COMMON_PROVENANCE
    attrs: tuple[str, ...] = ()  # group attrs the writer requires (logit_scale, category_names)
    dims: dict = field(default_factory=dict)  # symbolic dim -> meaning with the usual value (docs)
    doc: str = ""  # one paragraph for docs/cache-schema.md
    feature: bool = True  # False for /images and /posts (no provenance, written by every extraction)
    finite: bool = True  # float rows must be finite: the writer refuses NaN/Inf naming the image (False: allowed)

    def __post_init__(self):
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"group {self.name}: duplicate dataset names {names}")

    def dataset(self, key: str) -> DatasetSpec:
        for spec in self.datasets:
            if spec.name == key:
                return spec
        raise CacheError(
            f"group {self.name} declares no dataset {key!r}; declared: {', '.join(d.name for d in self.datasets)}"
        )

    def matches(self, name: str) -> str | None:
        """The wildcard segment's value when ``name`` is an instance of this spec ("" for exact names)."""
        if "*" not in self.name:
            return "" if name == self.name else None
        pattern = "^" + re.escape(self.name).replace(r"\*", "([^/]+)") + "$"
        found = re.match(pattern, name)
        return found.group(1) if found else None

    def option_for(self, name: str) -> str | None:
        if self.option is None:
            return None
        return self.option.format(name=self.matches(name) or name.rsplit("/", 1)[-1])


_GROUPS: dict[str, GroupSpec] = {}


def register_group(spec: GroupSpec, *, replace: bool = False) -> GroupSpec:
    """Declare a feature group; stage 1 producers, the writer and the trainer all look it up here."""
    if spec.name in _GROUPS and not replace and _GROUPS[spec.name] != spec:
        raise ValueError(f"feature group {spec.name!r} is already registered")
    _GROUPS[spec.name] = spec
    return spec


def unregister_group(name: str) -> None:
    """Remove a declaration (tests that register a throw-away group)."""
    _GROUPS.pop(name, None)


def all_groups() -> list[GroupSpec]:
    _load_builtin()
    return list(_GROUPS.values())


def get_group(name: str) -> GroupSpec:
    """The spec of a group path ("encoders/clip", "prompts/my_set"): exact names win over wildcards."""
    _load_builtin()
    name = name.strip("/")
    if name in _GROUPS:
        return _GROUPS[name]
    for spec in _GROUPS.values():
        if spec.matches(name) is not None:
            return spec
    raise CacheError(
        f"no feature group {name!r} is declared; declared: {', '.join(sorted(_GROUPS))}. "
        "Declare it with mner.pipeline.cache.register_group(GroupSpec(...)) (docs/architecture.md)"
    )


def split_path(path: str) -> tuple[str, str]:
    """ "encoders/clip/crop_embed" -> ("encoders/clip", "crop_embed"), using the registry to find the group."""
    path = path.strip("/")
    parts = path.split("/")
    for cut in range(len(parts) - 1, 0, -1):
        group = "/".join(parts[:cut])
        try:
            get_group(group)
        except CacheError:
            continue
        return group, "/".join(parts[cut:])
    raise CacheError(f"{path!r} is in no declared feature group; declared: {', '.join(sorted(_GROUPS))}")


def dataset_spec(path: str) -> tuple[GroupSpec, DatasetSpec]:
    """The declarations behind a dataset path; ``<name>_offsets`` of a ragged dataset maps to its values."""
    group, key = split_path(path)
    spec = get_group(group)
    if key.endswith("_offsets") and key not in {d.name for d in spec.datasets}:
        key = key[: -len("_offsets")]
    return spec, spec.dataset(key)


def index_path(group: str, kind: str) -> str:
    """Where the offsets of a ragged kind live for datasets of ``group`` (its own index, else the declared one)."""
    own = get_group(group)
    for spec in own.datasets:
        if spec.indexes == kind:
            return f"{group}/{spec.name}"
    owners = [(g, d) for g in all_groups() for d in g.datasets if d.indexes == kind and "*" not in g.name]
    if len(owners) != 1:
        raise CacheError(
            f"{group}: rows {kind!r} need exactly one declared group with an index for {kind!r}, found "
            f"{[g.name for g, _ in owners]}"
        )
    owner, dataset = owners[0]
    return f"{owner.name}/{dataset.name}"


_LOADED = False


def _load_builtin() -> None:
    """Import the groups that exist today on first use (they register themselves)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from mner.pipeline.cache import groups  # noqa: F401
