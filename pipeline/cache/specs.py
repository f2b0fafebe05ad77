"""Feature groups declared once, as data.

A :class:`GroupSpec` lists a group's datasets (:class:`DatasetSpec`: row kind, dtype, per-row shape,
how it becomes a batch tensor), the stage-1 option that produces it and the provenance fields it
records. The writer validates against these specs; the reader, merge, ``describe``/``info``, the
missing-features hint, the trainer's batcher, ``docs/cache-schema.md`` and the tests derive from
them. Adding a feature group = one ``register_group(GroupSpec(...))`` (see docs/architecture.md).

Row kinds (``DatasetSpec.rows``). The structural kinds are fixed (``STRUCTURAL_KINDS``):

- ``image``: one row per image, in ``/images/ids`` order;
- ``global``: read whole (prompt embeddings, centroids);
- ``text``: one UTF-8 string per image (captions);
- ``index``: the ``(N+1,)`` int64 offsets that define a ragged set (``indexes`` names the set's kind);
- ``post`` / ``token``: only in ``/posts`` (tokens are sliced per post by ``posts/token_offsets``).

Every other kind is a **ragged per-image set declared by the index dataset that defines it**:
``DatasetSpec("offsets", "index", "int64", indexes="object", collate=None)`` in ``objects/{detector}``
makes ``object`` a row kind; rows of image i are ``offsets[i]:offsets[i+1]`` of that index (the
group's own, else the owner instance with the same slots: ``index_path``). ``ragged_kinds()`` is the set
the registered specs declare; ``register_group`` refuses rows of a kind no registered index defines.

Group names may hold instance slots (``objects/{detector}``): every instance of a group is named by
what made it, and a cache holds several side by side (docs/cache-schema.md, *Instances*).

Variable-length values (JPEG crops, UTF-8 strings) set ``encoding`` and are stored as a flat uint8
dataset plus ``<name>_offsets``. Symbolic per-row dims (``"D"``) must agree within a group; their
values are stored in the group attr ``dims``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mner.pipeline.cache.base import CacheError

STRUCTURAL_KINDS = ("image", "global", "text", "index", "post", "token")  # every other kind: a declared ragged set
KIND_NAME = re.compile(r"[a-z][a-z0-9_]*")  # what a ragged kind may be called ("object", "grounding")
PER_POST = {"token": "post"}  # ragged kinds sliced per post, not per image (structural: /posts only)
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
    rows: str  # row kind: one of STRUCTURAL_KINDS, or a ragged kind an index dataset declares ("object")
    dtype: str  # stored numpy dtype ("float16", "int32", "S" fixed bytes); "uint8" for encoded values
    shape: tuple = ()  # per-row shape (whole shape for globals); str entries are symbolic dims ("D")
    collate: str | None = "float"  # how it becomes a batch tensor: float | pixels | jpeg | text | None
    encoding: str | None = None  # variable-length values: utf-8 | jpeg | bytes (flat uint8 + <name>_offsets)
    required: bool = True  # the group is incomplete without it
    indexes: str | None = None  # rows="index" only: the ragged kind this offsets dataset defines
    max_per_image: int | None = None  # rows="index" only: rows of the set per image at most
    cut_by: str | None = None  # rows="index" only: the batcher's option keeping each image's first n ("max_objects")
    pixels: int | None = None  # collate jpeg/pixels: side of the square uint8 image in the batch
    doc: str = ""  # one line for docs/cache-schema.md

    def __post_init__(self):
        if self.rows not in STRUCTURAL_KINDS and not KIND_NAME.fullmatch(self.rows):
            raise ValueError(f"{self.name}: rows {self.rows!r} is neither one of {STRUCTURAL_KINDS} nor a ragged "
                             "kind name (lower case letters, digits, _)")
        if self.collate not in COLLATIONS or self.encoding not in ENCODINGS:
            raise ValueError(f"{self.name}: collate {self.collate!r} / encoding {self.encoding!r} unknown")
        if self.rows == "text" and self.encoding != "utf-8":
            raise ValueError(f"{self.name}: rows 'text' are UTF-8 strings (encoding='utf-8')")
        if (self.rows == "index") != (self.indexes is not None):
            raise ValueError(f"{self.name}: rows 'index' and indexes=<ragged kind> go together")
        if self.indexes is not None and ((self.indexes in STRUCTURAL_KINDS and self.indexes not in PER_POST)
                                         or not KIND_NAME.fullmatch(self.indexes)):
            raise ValueError(f"{self.name}: indexes={self.indexes!r}: a ragged kind is a new name (lower case "
                             f"letters, digits, _), not one of {STRUCTURAL_KINDS}")
        if self.rows != "index" and (self.max_per_image is not None or self.cut_by is not None):
            raise ValueError(f"{self.name}: max_per_image / cut_by belong to the index dataset (rows 'index')")
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


SLOT = re.compile(r"\{(\w+)\}")  # an instance slot in a group name: "objects/{detector}"
SLOT_VALUE = re.compile(r"[A-Za-z0-9_.@+-]+")  # what a slot may hold: one path segment, no "/"


@dataclass(frozen=True)
class GroupSpec:
    """A feature group: its datasets, the stage-1 option that makes it, what its provenance records.

    ``name`` may hold **instance slots**, whole path segments such as ``{detector}`` in
    ``objects/{detector}``: one spec then describes every instance of the group, each named by what
    made it (``objects/maskrcnn`` beside ``objects/fasterrcnn``). Rows of a ragged set follow the
    index of the instance with the same slot values (``crops/{detector}/clip/{clip_model}`` rows
    follow ``objects/{detector}/offsets``), so adding an instance never renames another.
    """

    name: str  # path in the file; segments "{slot}" are instance slots ("objects/{detector}")
    datasets: tuple[DatasetSpec, ...]
    option: str | None = (
        None  # stage-1 option producing it, slots filled ("--detector {detector}"); None: always
    )
    provenance: tuple[str, ...] = ()  # fields recorded beyond COMMON_PROVENANCE
    attrs: tuple[str, ...] = ()  # group attrs the writer requires (logit_scale, category_names)
    dims: dict = field(default_factory=dict)  # symbolic dim -> meaning with the usual value (docs)
    doc: str = ""  # one paragraph for docs/cache-schema.md
    feature: bool = True  # False for /images and /posts (no provenance, written by every extraction)
    slot_docs: dict = field(default_factory=dict)  # slot -> what names an instance, with examples (docs)
    finite: bool = True  # float rows must be finite: the writer refuses NaN/Inf naming the image (False: allowed)

    def __post_init__(self):
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"group {self.name}: duplicate dataset names {names}")
        for segment in self.name.split("/"):
            if "{" in segment and not SLOT.fullmatch(segment):
                raise ValueError(f"group {self.name}: a slot is a whole segment ({{name}}), got {segment!r}")

    @property
    def slots(self) -> tuple[str, ...]:
        """The instance slots of the name, in order (``("detector", "clip_model")``)."""
        return tuple(SLOT.findall(self.name))

    def dataset(self, key: str) -> DatasetSpec:
        for spec in self.datasets:
            if spec.name == key:
                return spec
        raise CacheError(
            f"group {self.name} declares no dataset {key!r}; declared: {', '.join(d.name for d in self.datasets)}"
        )

    def matches(self, name: str) -> dict[str, str] | None:
        """The slot values when ``name`` is an instance of this spec ({} for names without slots), else None."""
        if not self.slots:
            return {} if name == self.name else None
        pattern = "^" + SLOT.sub(lambda m: f"(?P<{m.group(1)}>[^/]+)", self.name) + "$"
        found = re.match(pattern, name)
        return found.groupdict() if found else None

    def instance(self, **values: str) -> str:
        """The group path of one instance: ``OBJECTS.instance(detector="maskrcnn")`` -> ``objects/maskrcnn``."""
        missing = [slot for slot in self.slots if not values.get(slot)]
        if missing:
            raise CacheError(f"group {self.name}: no value for slot(s) {missing}")
        for slot in self.slots:
            if not SLOT_VALUE.fullmatch(str(values[slot])):
                raise CacheError(f"group {self.name}: {slot}={values[slot]!r} is not one path segment "
                                 "(letters, digits, . _ - + @)")
        return SLOT.sub(lambda m: str(values[m.group(1)]), self.name)

    def option_for(self, name: str) -> str | None:
        if self.option is None:
            return None
        return self.option.format(**(self.matches(name) or {}))


_GROUPS: dict[str, GroupSpec] = {}


def register_group(spec: GroupSpec, *, replace: bool = False) -> GroupSpec:
    """Declare a feature group; stage 1 producers, the writer and the trainer all look it up here.
    Rows of a ragged kind need an index that defines it, in this spec or in one registered before."""
    _load_builtin()
    if spec.name in _GROUPS and not replace and _GROUPS[spec.name] != spec:
        raise ValueError(f"feature group {spec.name!r} is already registered")
    declared = ragged_kinds() | {d.indexes for d in spec.datasets if d.indexes}
    for dataset in spec.datasets:
        if dataset.rows not in STRUCTURAL_KINDS and dataset.rows not in declared:
            raise ValueError(
                f"group {spec.name}: dataset {dataset.name!r} has rows {dataset.rows!r}, a ragged kind no registered "
                f"group defines (declared: {', '.join(sorted(declared)) or 'none'}). Declare its index in this group, "
                f"DatasetSpec('offsets', 'index', 'int64', indexes={dataset.rows!r}, max_per_image=..., "
                "collate=None), or register the group that owns it first")
    _GROUPS[spec.name] = spec
    return spec


def ragged_kinds() -> set[str]:
    """The ragged row kinds the registered specs declare (each by an index dataset): {"object", "grounding", ...}."""
    return {d.indexes for g in _GROUPS.values() for d in g.datasets if d.indexes}


def is_ragged(kind: str) -> bool:
    """Rows of ``kind`` are sliced per image (per post for tokens) by an index dataset."""
    _load_builtin()
    return kind in ragged_kinds()


def index_spec(kind: str) -> DatasetSpec:
    """The declaration of the index that defines a ragged kind (its ``max_per_image``, ``cut_by``)."""
    _load_builtin()
    for group in _GROUPS.values():
        for dataset in group.datasets:
            if dataset.indexes == kind:
                return dataset
    raise CacheError(f"no registered group declares an index for rows {kind!r}; declared: "
                     f"{', '.join(sorted(ragged_kinds()))}")


def unregister_group(name: str) -> None:
    """Remove a declaration (tests that register a throw-away group)."""
    _GROUPS.pop(name, None)


def all_groups() -> list[GroupSpec]:
    _load_builtin()
    return list(_GROUPS.values())


def get_group(name: str) -> GroupSpec:
    """The spec of a group path ("objects/maskrcnn", "prompts/RN50/my_set"): exact names win over templates."""
    _load_builtin()
    name = name.strip("/")
    if name in _GROUPS:
        return _GROUPS[name]
    found = [spec for spec in _GROUPS.values() if spec.slots and spec.matches(name) is not None]
    if found:  # the most specific template: the most literal segments
        return max(found, key=lambda spec: len(spec.name.split("/")) - len(spec.slots))
    raise CacheError(
        f"no feature group {name!r} is declared; declared: {', '.join(sorted(_GROUPS))}. "
        "Declare it with mner.pipeline.cache.register_group(GroupSpec(...)) (docs/architecture.md)"
    )


def split_path(path: str) -> tuple[str, str]:
    """"encoders/clip/RN50/image_embed" -> ("encoders/clip/RN50", "image_embed"), using the registry."""
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
    """Where the offsets of a ragged kind live for datasets of ``group``: its own index, else the index of
    the declared owner instance with the same slot values (``crops/maskrcnn/clip/RN50`` ->
    ``objects/maskrcnn/offsets``)."""
    own = get_group(group)
    for spec in own.datasets:
        if spec.indexes == kind:
            return f"{group}/{spec.name}"
    owners = [(g, d) for g in all_groups() for d in g.datasets if d.indexes == kind]
    if len(owners) != 1:
        raise CacheError(
            f"{group}: rows {kind!r} need exactly one declared group with an index for {kind!r}, found "
            f"{[g.name for g, _ in owners]}"
        )
    owner, dataset = owners[0]
    values = own.matches(group.strip("/")) or {}
    missing = [slot for slot in owner.slots if slot not in values]
    if missing:
        raise CacheError(f"{own.name}: its {kind!r} rows follow {owner.name}, whose slot(s) {missing} its name lacks")
    return f"{owner.instance(**values)}/{dataset.name}"


_LOADED = False


def _load_builtin() -> None:
    """Import the groups that exist today on first use (they register themselves)."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        from mner.pipeline.cache import groups  # noqa: F401
