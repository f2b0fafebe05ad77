"""Human-facing views derived from the specs: ``describe`` (``mner-features info``), the
missing-features hint, and the schema tables of docs/cache-schema.md."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import h5py
import numpy as np

from mner.pipeline.cache.base import (
    IMAGE_CAUSES,
    STATUS_MEANINGS,
    STATUS_NAMES,
    CacheError,
    attrs_dict,
    check_version,
    damaged_metadata_as_error,
    feature_groups,
    open_cache_file,
)
from mner.pipeline.cache.specs import PER_POST, all_groups, get_group, split_path
from mner.pipeline.cache.writer import spec_problems


def extract_command_hint(
    paths: Iterable[str], *, out: str | None = None, data: str | None = None, images: str | None = None
) -> str:
    """The ``mner-features extract`` command that adds ``paths`` to a cache (existing groups are kept).

    Each path's group spec names the stage-1 option that produces it; pipeline/ knows no other flag.
    """
    options: list[str] = []
    for path in paths:
        try:
            group, _ = split_path(path)
        except CacheError:
            group = path.strip("/")
            try:
                get_group(group)
            except CacheError:
                options.append(f"<an option that produces {path}>")
                continue
        option = get_group(group).option_for(group) or ""
        words = option.split()
        for i, word in enumerate(words):  # "--flag value" pairs and lone flags, each once
            if not word.startswith("--"):
                continue
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
            pair = f"{word} {value}" if value else word
            if pair not in options:
                options.append(pair)
    return " ".join(
        [
            "mner-features extract",
            f"--data {data or '<data folder>'}",
            f"--images {images or '<image folder>'}",
            f"--out {out or '<cache.h5>'}",
            *options,
        ]
    )


def describe(path: str | os.PathLike) -> str:
    """Summary for ``mner-features info``: status counts, groups with their spec check, shapes, provenance."""
    path = os.fspath(path)
    with open_cache_file(path, "r") as handle, damaged_metadata_as_error(path):
        check_version(handle, path)
        lines = [f"{path}  ({os.path.getsize(path) / 2**20:.1f} MiB)"]
        lines.append(
            f"schema version {int(handle.attrs['mner_schema_version'])}, written by mner "
            f"{handle.attrs.get('mner_version', 'unknown')}; "
            f"fingerprint {str(handle.attrs.get('fingerprint', '?'))[:16]}"
        )
        if "images" in handle:
            status = handle["images/status"][()]
            counts = ", ".join(
                f"{name} {int((status == code).sum())}" for code, name in enumerate(STATUS_NAMES)
            )
            lines.append(f"images: {len(status)} ({counts})")
            not_ok = np.flatnonzero(status != 0)
            if len(not_ok) and "images/detail" in handle:
                flat, offsets = handle["images/detail"][()].tobytes(), handle["images/detail_offsets"][()]
                causes: dict[str, int] = {}
                for row in not_ok:
                    text = flat[offsets[row] : offsets[row + 1]].decode("utf-8")
                    segments = [part.strip() for part in text.split(":")]
                    known = [part for part in segments if part in IMAGE_CAUSES]  # "<cause>: <message>" details
                    cause = f"{STATUS_NAMES[status[row]]}: {known[0] if known else segments[-1] or '?'}"
                    causes[cause] = causes.get(cause, 0) + 1
                for cause, n in sorted(causes.items(), key=lambda kv: -kv[1])[:8]:
                    lines.append(f"  {n:>6}  {cause[:100]}")
        for index_name in _indexes(handle):
            per_image = np.diff(handle[index_name][()])
            kind = handle[index_name].attrs.get("defines", index_name)
            lines.append(
                f"{kind} rows ({index_name}): {int(per_image.sum())} (per image: mean "
                f"{per_image.mean() if len(per_image) else 0:.2f}, "
                f"max {int(per_image.max()) if len(per_image) else 0}, "
                f"images with none {int((per_image == 0).sum())})"
            )
        if "posts" in handle:
            split_names = json.loads(handle["posts"].attrs["split_names_json"])
            splits = np.bincount(handle["posts/split"][()], minlength=len(split_names))
            per_split = ", ".join(f"{name} {int(n)}" for name, n in zip(split_names, splits))
            lines.append(f"posts: {per_split}  (data hash {handle['posts'].attrs['data_hash'][:16]}...)")
        for group in ["images", "posts", *feature_groups(handle)]:
            if group in handle:
                lines += _describe_group(handle, group)
    return "\n".join(lines)


def _indexes(handle: h5py.File) -> list[str]:
    found: list[str] = []
    handle.visititems(
        lambda name, obj: (
            found.append(name)
            if isinstance(obj, h5py.Dataset) and "defines" in obj.attrs and obj.attrs["defines"] not in PER_POST
            else None
        )
    )
    return sorted(found)


def instance_text(group: str, provenance: dict) -> str:
    """``detector=fasterrcnn`` (and what a tiny variant stands for) for an instance of a slotted spec."""
    try:
        slots = get_group(group).matches(group) or {}
    except CacheError:
        slots = {}
    stands_for = provenance.get("stands_for") or {}
    parts = [f"{slot}={value}" + (f" (stands for {stands_for[slot]})" if stands_for.get(slot) else "")
             for slot, value in slots.items()]
    return ", ".join(parts) + ("; " if parts else "") + f"made by {provenance.get('model')}"


def _describe_group(handle: h5py.File, group: str) -> list[str]:
    node = handle[group]
    fingerprint = str(node.attrs.get("fingerprint", "none"))[:16]
    try:
        problems = spec_problems(node, get_group(group), partial=True)
        missing = [d.name for d in get_group(group).datasets if d.required and d.name not in node]
        check = (
            "matches its spec"
            if not problems and not missing
            else (f"DIFFERS from its spec: {'; '.join(problems + [f'lacks {m}' for m in missing])}")
        )
    except CacheError:
        check = "NOT DECLARED in this mner (no GroupSpec)"
    lines = [f"/{group}   fingerprint {fingerprint}, {check}"]
    if "provenance" in node.attrs:
        p = json.loads(node.attrs["provenance"])
        pretrained = p.get("pretrained")
        warn = "  <-- RANDOM WEIGHTS (smoke test only)" if pretrained == "random" else ""
        lines.append(f"    instance {instance_text(group, p)}")
        lines.append(f"    provenance: model {p.get('model')}, pretrained {pretrained}{warn}")
        shard = p.get("shard")
        shard_text = (
            f"shard {shard.get('index')}/{shard.get('count')}"
            if isinstance(shard, dict)
            else f"shard {shard}"
        )
        lines.append(
            f"      created {p.get('created')}, torch {p.get('versions', {}).get('torch')}, "
            f"images {p.get('num_images')} (hash {str(p.get('image_list_hash'))[:12]}...), {shard_text}"
        )
        if p.get("merge"):
            partial = (
                "  <-- PARTIAL: shards missing " + str(p["merge"]["missing"])
                if p["merge"].get("missing")
                else ""
            )
            lines.append(f"      merged from {len(p['merge']['shards'])} shards{partial}")
        if p.get("thresholds"):
            lines.append(f"      thresholds {json.dumps(p['thresholds'])}")
        extra = {k: v for k, v in attrs_dict(node).items() if k not in ("provenance", "fingerprint")}
        if extra:
            lines.append(f"      attrs {json.dumps(extra, default=str)}")
    for key, dataset in node.items():
        if isinstance(dataset, h5py.Dataset):
            shape = "x".join(str(s) for s in dataset.shape) or "scalar"
            rows = dataset.attrs.get("rows")
            lines.append(f"    {key:<24} {shape:<20} {dataset.dtype!s:<8} rows={rows}")
    return lines


# ------------------------------------------------------------------------------------------ doc tables


def rows_letter(kind: str) -> str:
    """The doc tables' name for a row kind's count: N images (image and text rows), else the kind's initial
    (P posts, T tokens, O objects, G grounding rows, the initial of any ragged kind a group declares)."""
    return "N" if kind in ("image", "text") else kind[0].upper()


def _shape_text(spec) -> str:
    if spec.rows == "index":
        return f"({rows_letter(PER_POST.get(spec.indexes, 'image'))}+1,)"
    if spec.encoding:
        count = rows_letter(spec.rows) if spec.rows != "global" else (spec.shape[0] if spec.shape else "Q")
        return f"flat + offsets ({count}+1,)"
    dims = [str(d) for d in spec.shape]
    if spec.rows != "global":
        dims = [rows_letter(spec.rows), *dims]
    return f"({dims[0]},)" if len(dims) == 1 else f"({', '.join(dims)})"


def schema_tables() -> str:
    """The status and per-group tables of docs/cache-schema.md, generated from the registered specs."""
    out: list[str] = ["### Status codes (`/images/status`)\n", "| code | name | meaning |", "|---|---|---|"]
    out += [f"| {code} | {name} | {STATUS_MEANINGS[name]} |" for code, name in enumerate(STATUS_NAMES)]
    out.append("")
    groups = all_groups()
    for position, group in enumerate(groups):
        option = group.option or "every extraction"
        out.append(f"### `/{group.name}`\n")
        out.append(f"{group.doc} Produced by: `{option}`.\n")
        twin = next((g for g in groups[:position] if g.datasets == group.datasets), None)
        if twin is not None:
            out.append(f"Same datasets as `/{twin.name}`.\n")
            continue
        if group.slots:
            out.append("Instances: " + "; ".join(f"`{{{k}}}` {group.slot_docs.get(k, '')}".rstrip()
                                                  for k in group.slots) + ".\n")
        if group.dims:
            out.append("Dims: " + "; ".join(f"`{k}` {v}" for k, v in group.dims.items()) + ".\n")
        if group.provenance:
            out.append(
                "Provenance fields beyond the common ones: "
                + ", ".join(f"`{p}`" for p in group.provenance)
                + ".\n"
            )
        out.append("| dataset | rows | shape | dtype | batch | required | meaning |")
        out.append("|---|---|---|---|---|---|---|")
        for d in group.datasets:
            dtype = f"{d.encoding} bytes" if d.encoding else ("fixed bytes" if d.dtype == "S" else d.dtype)
            batch = {
                "float": "float32",
                "jpeg": f"uint8 {d.pixels}x{d.pixels}x3 (decoded)",
                "pixels": "uint8 " + "x".join(str(n) for n in d.shape),  # the stored row, as stored
                "text": "strings / token ids",
                None: "-",
            }[d.collate]
            rows = f"index of `{d.indexes}`" if d.rows == "index" else d.rows
            out.append(
                f"| `{d.name}` | {rows} | {_shape_text(d)} | {dtype} | {batch} | "
                f"{'yes' if d.required else 'no'} | {d.doc} |"
            )
        out.append("")
    return "\n".join(out)
