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
from mner.pipeline.cache.specs import GroupSpec, all_groups, get_group, index_path
from mner.pipeline.cache.writer import CacheWriter

WILDCARD_NAME = "tiny_set"  # how a "prompts/*" group is instantiated
JPEG_SIDE = 8


def instance_name(spec: GroupSpec) -> str:
    return spec.name.replace("*", WILDCARD_NAME)


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
    attrs: dict[str, object] | None = None,
) -> dict[str, object]:
    """Write group ``name`` with random values shaped by its spec; returns what was written per dataset.
    ``dims`` sets symbolic dims (``{"G": 12}``: the 12x12 grid a model insists on); others stay tiny.
    ``attrs`` sets group attributes whose value matters (``{"layers": [1, 2]}``)."""
    spec = get_group(name)
    rng = np.random.default_rng(seed)
    dims = {**_dims(spec), **(dims or {})}
    num_images = writer.num_images
    written: dict[str, object] = {}
    totals = {"image": num_images, "text": num_images}
    for ds in spec.datasets:
        if ds.rows == "index":
            limit = ds.max_per_image or (3 if ds.indexes == "grounding" else 4)
            counts = rng.integers(0, limit + 1, num_images)
            counts[0] = limit  # the largest set, and (below) an image with none
            counts[min(1, num_images - 1)] = 0
            offsets = np.zeros(num_images + 1, np.int64)
            np.cumsum(counts, out=offsets[1:])
            written[ds.name] = offsets
            totals[ds.indexes] = int(offsets[-1])
    for kind in ("object", "grounding"):
        if kind not in totals and any(ds.rows == kind for ds in spec.datasets):
            totals[kind] = int(writer.file[index_path(name, kind)][-1])
    for salt, ds in enumerate(spec.datasets):
        if ds.rows != "index":
            written[ds.name] = _values(ds, totals.get(ds.per_image_kind, 0), dims, rng, salt)
    extra = {field: f"tiny {field}" for field in spec.provenance}
    provenance = make_provenance(
        name,
        model="tiny",
        pretrained="random",
        preprocessing={},
        thresholds={},
        image_ids=decode_ids(writer.file["images/ids"][()]),
        extra=extra,
    )
    group_attrs = {
        key: [f"{key[:-6]}{i}" for i in range(dims.get("C", 4))] if key.endswith("_names") else 10.0
        for key in spec.attrs
    }
    group_attrs.update(attrs or {})
    writer.write_group(name, written, provenance if spec.feature else None, group_attrs)
    return written


def write_tiny_cache(
    path: str | os.PathLike,
    groups: list[str] | None = None,
    *,
    num_images: int = 6,
    status: list[str] | None = None,
    seed: int = 0,
    dims: dict[str, dict[str, int]] | None = None,
    attrs: dict[str, dict[str, object]] | None = None,
) -> dict[str, dict[str, object]]:
    """A cache with ``groups`` (default: every registered feature group), and any group whose ragged
    index they need; ``dims`` maps a group to the symbolic dims it should not take small
    (see :func:`tiny_group`). Returns ``{group: {dataset: values}}``."""
    names = groups if groups is not None else [instance_name(g) for g in all_groups() if g.feature]
    needed: list[str] = []
    for name in names:
        for ds in get_group(name).datasets:
            if ds.rows in ("object", "grounding"):
                owner = index_path(name, ds.rows).rsplit("/", 1)[0]
                if owner not in needed and owner != name:
                    needed.append(owner)
    ordered = [*needed, *[n for n in names if n not in needed]]
    ids = [f"img{i:03d}" for i in range(num_images)]
    written = {}
    with CacheWriter(path, overwrite=True) as writer:
        writer.write_images(
            ids, status or ["ok"] * num_images, width=[64] * num_images, height=[48] * num_images
        )
        for k, name in enumerate(ordered):
            written[name] = tiny_group(writer, name, seed=seed + k, dims=(dims or {}).get(name),
                                       attrs=(attrs or {}).get(name))
    return written


# what every registered model reads, with the dims the models insist on (ESPVR's 12x12 Swin grid, four
# entity categories); tests/test_resume.py and bench/gpu_check.py train every model on it
PROMPT_SETS = ("vcrmner", "vcrmner_words", "promptmner_task", "promptmner_kb", "promptmner_expert")
EVERY_MODEL_GROUPS = ("objects", "encoders/clip", "encoders/resnet152-test", "encoders/swin-test", "grounding",
                      "encoders/clip_grounding", "captions", *(f"prompts/{name}" for name in PROMPT_SETS))
EVERY_MODEL_DIMS = {"encoders/swin-test": {"G": 12}, "encoders/clip_grounding": {"L": 2, "T": 5, "D": 16},
                    **{f"prompts/{name}": {"C": 4} for name in PROMPT_SETS}}
EVERY_MODEL_ATTRS = {"encoders/clip_grounding": {"layers": [1, 2]}}  # MGIPS-CL's frozen mode reads them
EVERY_MODEL_FLAGS = {  # tiny settings per model, pointing the models at the -test groups
    "bert_crf": [],
    "vcrmner": ["--set", "num_heads=2", "--set", "num_blocks=1"],
    "promptmner": ["--set", "num_continuous_prompts=4"],
    "pmner": ["--set", "num_heads=2", "--set", "resnet_group=resnet152-test"],
    "mgipscl": ["--set", "clip_model=tiny-random", "--set", "num_heads=2"],
    "espvr": ["--set", "swin_group=swin-test", "--set", "cross_width=32", "--set", "cross_heads=2"],
}


def write_tiny_training_inputs(
    folder: str | os.PathLike, *, train_posts: int = 21, eval_posts: int = 6, missing: tuple[int, ...] = (6,),
    seed: int = 3,
) -> tuple[str, str]:
    """Twitter-format splits (post ``n`` of every split names image ``img<n>``) and a tiny cache with
    what every model reads; the images in ``missing`` have no usable picture. Returns (data folder,
    cache path); train with ``EVERY_MODEL_FLAGS[model]``, ``--set stage1_mismatch=warn`` and
    ``--max-missing-images 1``."""
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
                     dims=EVERY_MODEL_DIMS, attrs=EVERY_MODEL_ATTRS)
    return str(folder), str(folder / "cache.h5")
