"""Tiny caches built from the group specs alone (tests, benches, the every-group acceptance test).

Nothing here knows a group's meaning: sizes come from the spec's symbolic dims (small integers),
values are random, JPEG values are tiny solid-colour images, text is short UTF-8.
"""

from __future__ import annotations

import io
import os

import numpy as np

from mner.pipeline.cache.base import decode_ids, fixed_bytes
from mner.pipeline.cache.provenance import make_provenance
from mner.pipeline.cache.specs import GroupSpec, all_groups, get_group, index_path, is_ragged
from mner.pipeline.cache.writer import CacheWriter

TINY_SLOT = "tiny"  # every slot of a spec's tiny instance: objects/tiny, crops/tiny/clip/tiny, ...
JPEG_SIDE = 8


def instance_name(spec: GroupSpec, **slots: str) -> str:
    """The spec's tiny instance: every slot ``tiny`` unless given (``objects/{detector}`` -> ``objects/tiny``)."""
    return spec.instance(**{slot: slots.get(slot, TINY_SLOT) for slot in spec.slots})


def tiny_jpeg(colour: tuple[int, int, int], side: int = JPEG_SIDE) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _dims(spec: GroupSpec) -> dict[str, int]:
    symbols = sorted({d for ds in spec.datasets for d in ds.shape if isinstance(d, str)})
    return {symbol: 2 + i for i, symbol in enumerate(symbols)}


def _values(ds, count: int, dims: dict[str, int], rng: np.random.Generator, salt: int):
    shape = tuple(dims[d] if isinstance(d, str) else d for d in ds.shape)
    if ds.encoding == "utf-8":
        n = shape[0] if ds.rows == "global" and shape else count
        return [f"tiny {ds.name} {salt} {i} \u00fc" for i in range(n)]
    if ds.encoding == "jpeg":
        return [tiny_jpeg(tuple(int(c) for c in rng.integers(0, 256, 3))) for _ in range(count)]
    if ds.encoding == "bytes":
        return [rng.bytes(int(rng.integers(1, 9))) for _ in range(count)]
    lead = () if ds.rows == "global" else (count,)
    if ds.dtype == "S":
        return fixed_bytes([f"{ds.name}{i}" for i in range(count)])
    dtype = np.dtype(ds.dtype)
    if dtype.kind == "f":
        return rng.standard_normal((*lead, *shape)).astype(np.float32)
    return rng.integers(0, 4, (*lead, *shape)).astype(dtype)


def tiny_group(
    writer: CacheWriter, name: str, *, seed: int = 0, dims: dict[str, int] | None = None,
    counts: list[int] | None = None, provenance: dict | None = None, attrs: dict[str, object] | None = None,
) -> dict[str, object]:
    """Write group ``name`` with random values shaped by its spec; returns what was written per dataset.

    ``dims`` sets symbolic dims (``{"D": 16}``), ``counts`` the rows per image of a group that owns a
    ragged index, ``provenance`` fields over the tiny ones (``{"stands_for": {"detector": "maskrcnn"}}``),
    ``attrs`` group attributes whose value matters (``{"layers": [1, 2]}``).
    """
    spec = get_group(name)
    rng = np.random.default_rng(seed)
    dims = {**_dims(spec), **(dims or {})}
    num_images = writer.num_images
    written: dict[str, object] = {}
    totals = {"image": num_images, "text": num_images}
    for ds in spec.datasets:
        if ds.rows == "index":
            limit = ds.max_per_image or 4
            per_image = rng.integers(0, limit + 1, num_images)
            per_image[0] = limit  # the largest set, and (below) an image with none
            per_image[min(1, num_images - 1)] = 0
            if counts is not None:
                per_image = np.asarray(counts, np.int64)
            offsets = np.zeros(num_images + 1, np.int64)
            np.cumsum(per_image, out=offsets[1:])
            written[ds.name] = offsets
            totals[ds.indexes] = int(offsets[-1])
    for kind in {ds.rows for ds in spec.datasets if is_ragged(ds.rows)} - set(totals):
        totals[kind] = int(writer.file[index_path(name, kind)][-1])
    for salt, ds in enumerate(spec.datasets):
        if ds.rows != "index":
            written[ds.name] = _values(ds, totals.get(ds.per_image_kind, 0), dims, rng, salt)
    fields = {"model": "tiny", "pretrained": "random", "preprocessing": {}, "thresholds": {},
              **{field: f"tiny {field}" for field in spec.provenance}, **(provenance or {})}
    core = {key: fields.pop(key) for key in ("model", "pretrained", "preprocessing", "thresholds")}
    record = make_provenance(name, image_ids=decode_ids(writer.file["images/ids"][()]), extra=fields, **core)
    group_attrs = {
        key: [f"{key[:-6]}{i}" for i in range(dims.get("C", 4))] if key.endswith("_names") else 10.0
        for key in spec.attrs
    }
    group_attrs.update(attrs or {})
    writer.write_group(name, written, record if spec.feature else None, group_attrs)
    return written


def write_tiny_cache(
    path: str | os.PathLike,
    groups: list[str] | None = None,
    *,
    num_images: int = 6,
    status: list[str] | None = None,
    seed: int = 0,
    image_ids: list[str] | None = None,
    posts=None,
    dims: dict | None = None,
    counts: list[int] | None = None,
    provenance: dict[str, dict] | None = None,
    attrs: dict[str, dict[str, object]] | None = None,
) -> dict[str, dict[str, object]]:
    """A cache with ``groups`` (default: every registered feature group), and any group whose ragged
    index they need. Returns ``{group: {dataset: values}}``.

    ``image_ids`` (sorted here) replace ``img000...``; ``posts`` (a ``mner.pipeline.data.Dataset``) are
    stored so the trainer needs only the cache; ``dims`` sets symbolic dims, for every group
    (``{"D": 16}``) or per group (``{"encoders/swin/swin-test": {"G": 12}}``); ``counts`` the rows per
    image of the groups that own a ragged index; ``provenance`` maps a group to fields over the tiny ones."""
    names = groups if groups is not None else [instance_name(g) for g in all_groups() if g.feature]
    needed: list[str] = []
    for name in names:
        for ds in get_group(name).datasets:
            if is_ragged(ds.rows):
                owner = index_path(name, ds.rows).rsplit("/", 1)[0]
                if owner not in needed and owner != name:
                    needed.append(owner)
    ordered = [*needed, *[n for n in names if n not in needed]]
    ids = sorted(image_ids) if image_ids is not None else [f"img{i:03d}" for i in range(num_images)]
    num_images = len(ids)
    written = {}
    with CacheWriter(path, overwrite=True) as writer:
        writer.write_images(
            ids, status or ["ok"] * num_images, width=[64] * num_images, height=[48] * num_images
        )
        if posts is not None:
            writer.write_posts(posts)
        for k, name in enumerate(ordered):
            group_dims = (dims or {}).get(name) if dims and all(isinstance(v, dict) for v in dims.values()) \
                else dims
            written[name] = tiny_group(writer, name, seed=seed + k, dims=group_dims, counts=counts,
                                       provenance=(provenance or {}).get(name), attrs=(attrs or {}).get(name))
    return written


# what every registered model reads: each paper's instances by their tiny variants (provenance stands_for the
# paper's model, so no stage-1 mismatch), with the dims the models insist on (ESPVR's 12x12 Swin grid, four
# entity categories); tests/test_resume.py and bench/gpu_check.py train every model on it
def tiny_instance(slot: str, value: str) -> str:
    """The registered tiny variant of a paper's model (``maskrcnn`` -> ``maskrcnn-test``, Swin -> ``swin-test``)."""
    return "swin-test" if slot == "swin_model" else f"{value}-test"


def _every_model_groups() -> tuple[tuple[str, ...], dict[str, dict], dict[str, dict]]:
    from mner.pipeline.cache.specs import split_path
    from mner.pipeline.stage1 import PAPER_NEEDS

    groups, stands_for = [], {}
    for needs in PAPER_NEEDS.values():
        slots = {slot: tiny_instance(slot, value) for slot, value in needs.slots.items()}
        for path in needs.paths(slots):
            group = split_path(path)[0]
            if group not in groups:
                groups.append(group)
            values = get_group(group).matches(group) or {}
            stands_for[group] = {"stands_for": {k: needs.slots[k] for k in values if k in needs.slots}}
        for setting in needs.filled_settings(slots):  # provenance values the paper's settings accept
            value = setting.expected.split("|")[0] if setting.match == "pattern" else setting.expected
            *parents, leaf = setting.key.split(".")
            node = stands_for.setdefault(setting.group, {})
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
    dims = {g: {"G": 12} for g in groups if g.startswith("encoders/swin/")}  # ESPVR's 12x12 grid
    dims.update({g: {"C": 4} for g in groups if "prompts/" in g})  # four entity categories
    return tuple(groups), dims, stands_for


EVERY_MODEL_GROUPS, EVERY_MODEL_DIMS, EVERY_MODEL_PROVENANCE = _every_model_groups()
EVERY_MODEL_DIMS["encoders/clip_grounding"] = {"L": 2, "T": 5, "D": 16}
EVERY_MODEL_ATTRS = {"encoders/clip_grounding": {"layers": [1, 2]}}  # MGIPS-CL's frozen mode reads them
EVERY_MODEL_FLAGS = {  # tiny settings per model (the instances are the tiny variants of the papers' models)
    "bert_crf": [],
    "vcrmner": ["--set", "num_heads=2", "--set", "num_blocks=1"],
    "promptmner": ["--set", "num_continuous_prompts=4"],
    "pmner": ["--set", "num_heads=2"],
    "mgipscl": ["--set", "clip_model=tiny-random", "--set", "num_heads=2"],
    "espvr": ["--set", "cross_width=32", "--set", "cross_heads=2"],
}


def write_tiny_training_inputs(
    folder: str | os.PathLike, *, train_posts: int = 21, eval_posts: int = 6, missing: tuple[int, ...] = (6,),
    seed: int = 3,
) -> tuple[str, str]:
    """Twitter-format splits (post ``n`` of every split names image ``img<n>``) and a tiny cache with
    what every model reads; the images in ``missing`` have no usable picture. Returns (data folder,
    cache path); train with ``EVERY_MODEL_FLAGS[model]`` and ``--max-missing-images 1``."""
    import random
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = {"PER": ["john", "smith"], "LOC": ["paris", "london"]}
    filler = ["the", "a", "in", "at", "of", "to", "and", "is", "rt", "with", "new", "city", "visit", "love"]
    for split, count in (("train", train_posts), ("valid", eval_posts), ("test", eval_posts)):
        lines = []
        for n in range(count):
            entity_type = ("PER", "LOC")[n % 2]
            lines += [f"IMGID:img{n:03d}", *[f"{w}\tO" for w in rng.sample(filler, rng.randint(1, 6))],
                      f"{rng.choice(names[entity_type])}\tB-{entity_type}", ""]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    images = max(train_posts, eval_posts)
    status = ["missing" if i in missing else "ok" for i in range(images)]
    write_tiny_cache(folder / "cache.h5", list(EVERY_MODEL_GROUPS), num_images=images, status=status,
                     dims=EVERY_MODEL_DIMS, provenance=EVERY_MODEL_PROVENANCE, attrs=EVERY_MODEL_ATTRS)
    return str(folder), str(folder / "cache.h5")
