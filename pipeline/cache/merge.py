"""Merge the shards of one extraction into the cache a single process would have written.

Refuses an incomplete shard set: every feature group's provenance records ``shard`` (index, count
and the hash of the whole id list), so the shards present must be 0..count-1 and their ids must hash
to the recorded list. ``allow_partial=True`` merges anyway and records the missing shards.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import h5py
import numpy as np

from mner.pipeline.cache.base import (
    CacheError,
    cache_fingerprint,
    check_version,
    decode_ids,
    feature_groups,
    id_list_hash,
    open_cache_file,
    stored_groups,
    walk_datasets,
)
from mner.pipeline.cache.integrity import seal_group
from mner.pipeline.cache.lock import CacheLock, temp_suffix
from mner.pipeline.cache.provenance import SHARD_KEYS, utc_now
from mner.pipeline.cache.writer import discardable_file

MERGE_IN_MEMORY_BYTES = 1 << 30  # merge gathers a dataset in memory below this size, run by run above
# grow=True (a cache plus images added later with the same stage 1): provenance may also differ in these
GROW_KEYS = (*SHARD_KEYS, "images", "grown", "versions")


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


def _copy_attrs(source, target) -> None:
    for attr, value in source.attrs.items():
        target.attrs[attr] = value


def _merged_dtype(sources: list[h5py.Dataset]) -> np.dtype:
    """The sources' dtype; fixed bytes (ids) take the widest, since each input sizes them to its longest."""
    if sources[0].dtype.kind == "S":
        return max((source.dtype for source in sources), key=lambda dtype: dtype.itemsize)
    return sources[0].dtype


def _copy_runs(sources: list[h5py.Dataset], runs, total: int, out_group: h5py.Group, key: str,
               gather_bytes: int = MERGE_IN_MEMORY_BYTES) -> None:
    template, dtype = sources[0], _merged_dtype(sources)
    out = out_group.create_dataset(key, shape=(total, *template.shape[1:]), dtype=dtype)
    row_bytes = int(np.prod(template.shape[1:], dtype=np.int64)) * dtype.itemsize
    if total * row_bytes <= gather_bytes:
        loaded = [src[()] for src in sources]
        buffer = np.empty(out.shape, out.dtype)
        for shard, lo, hi, dst in runs:
            buffer[dst : dst + hi - lo] = loaded[shard][lo:hi]
        if total:
            out[...] = buffer
    else:
        for shard, lo, hi, dst in runs:
            out[dst : dst + hi - lo] = sources[shard][lo:hi]
    _copy_attrs(template, out)


def _same_dataset(a: h5py.Dataset, b: h5py.Dataset) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a[()], b[()])


def _comparable(provenance: dict, grow: bool = False) -> dict:
    ignored = GROW_KEYS if grow else SHARD_KEYS
    return {key: value for key, value in provenance.items() if key not in ignored}


def _shard_of(provenance: dict) -> tuple[int | None, int | None, str | None]:
    shard = provenance.get("shard")
    if isinstance(shard, dict):
        return shard.get("index"), shard.get("count"), shard.get("id_list_hash")
    if isinstance(shard, str) and "/" in shard:  # "i/n" as written before the id-list hash was recorded
        index, count = shard.split("/")
        return int(index), int(count), None
    return None, None, None


def check_shard_set(paths: list[str], handles: list[h5py.File], merged_ids: list[str]) -> list[str]:
    """Why this set of shards is not one complete extraction (empty when it is)."""
    problems: list[str] = []
    records = []
    for path, handle in zip(paths, handles):
        found = {_shard_of(json.loads(handle[g].attrs["provenance"])) for g in feature_groups(handle)}
        if len(found) != 1 or None in next(iter(found))[:2]:
            problems.append(
                f"{path} records no single shard i/n in its provenance ({sorted(map(str, found))})"
            )
            continue
        records.append((path, *next(iter(found))))
    if problems:
        return problems
    counts = {count for _, _, count, _ in records}
    if len(counts) != 1:
        return [
            f"shards come from extractions split {sorted(counts)} ways: "
            + ", ".join(f"{p} is {i}/{n}" for p, i, n, _ in records)
        ]
    count = counts.pop()
    seen: dict[int, str] = {}
    for path, index, _, _ in records:
        if index in seen:
            problems.append(f"shard {index}/{count} twice: {seen[index]} and {path}")
        seen[index] = path
    missing = [i for i in range(count) if i not in seen]
    if missing:
        problems.append(
            f"missing shard(s) {', '.join(f'{i}/{count}' for i in missing)} (have "
            f"{', '.join(f'{i}/{count}' for i in sorted(seen))})"
        )
    hashes = {h for *_, h in records if h is not None}
    if len(hashes) > 1:
        problems.append("shards were cut from different image lists (id-list hashes differ)")
    elif hashes and not missing and hashes.pop() != id_list_hash(merged_ids):
        problems.append(
            f"the shards' {len(merged_ids)} images are not the id list they were cut from "
            "(id-list hash differs): a shard was extracted from other data"
        )
    return problems


def merge_caches(
    paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, allow_partial: bool = False,
    overwrite: bool = False, grow: bool = False, posts_from: str | os.PathLike | None = None,
) -> str:
    """Merge shards (disjoint image subsets of one extraction) into the cache one process would write.

    An existing ``out`` is replaced only with ``overwrite`` and only when it is an mner cache; a shard
    is never the output (pipeline/outputs.py, docs/reliability.md).

    ``grow=True`` merges a cache with images added to it later (``mner.features.run.rebuild``): no shard
    set is expected, provenance may differ in the run-describing GROW_KEYS, the first cache's record is
    kept with a ``grown`` entry per addition, and the posts come from ``posts_from`` (default: the first)."""
    from mner.pipeline.outputs import check_free_space, check_output

    paths = [os.fspath(p) for p in paths]
    out = os.fspath(out)
    if not paths:
        raise CacheError("merge needs at least one shard")
    if os.path.abspath(out) in {os.path.abspath(p) for p in paths}:
        raise CacheError(f"merge output {out} is also a shard; choose another --out")
    check_output(out, kind="cache", overwrite=overwrite, inputs=paths)
    needed = int(sum(os.path.getsize(p) for p in paths) * 1.05) + (1 << 20)
    check_free_space(os.path.dirname(os.path.abspath(out)), needed, what="merging the shards")
    handles = [open_cache_file(p, "r") for p in paths]
    try:
        with CacheLock(out):
            _merge(paths, handles, out, allow_partial, grow=grow,
                   posts_index=paths.index(os.fspath(posts_from)) if posts_from is not None else 0)
    except (RuntimeError, OSError) as error:  # h5py's text for a full disk / read-only file: a plain OSError
        from mner.pipeline.cache.writer import _disk_error

        disk = _disk_error(error, out)
        if disk is not None:
            raise disk from None
        raise
    finally:
        for handle in handles:
            handle.close()
    return out


def _open_parts(paths: list[str], handles: list[h5py.File], what: str = "shard") -> list[str]:
    """The feature groups every input holds (they must hold the same), after version and /images checks."""
    for handle, path in zip(handles, paths):
        check_version(handle, path)
        if "images" not in handle:
            raise CacheError(f"{path}: {what} has no /images (an unfinished extraction?)")
    groups = feature_groups(handles[0])
    for handle, path in zip(handles[1:], paths[1:]):
        if feature_groups(handle) != groups:
            raise CacheError(
                f"{what}s differ in feature groups: {paths[0]} has {groups}, {path} has "
                f"{feature_groups(handle)}; finish every {what} with the same flags before merging"
            )
    return groups


def _owners(paths: list[str], handles: list[h5py.File], what: str = "shard") -> dict[str, tuple[int, int]]:
    """image id -> (input, row); the inputs must hold disjoint images."""
    owner: dict[str, tuple[int, int]] = {}
    for shard, handle in enumerate(handles):
        for row, image_id in enumerate(decode_ids(handle["images/ids"][()])):
            if image_id in owner:
                raise CacheError(
                    f"image id {image_id!r} is in both {paths[owner[image_id][0]]} and {paths[shard]}: "
                    f"{what}s must hold disjoint images"
                )
            owner[image_id] = (shard, row)
    return owner


def _check_same_provenance(groups, paths, handles, grow: bool = False, what: str = "shard") -> None:
    for group in groups:
        reference = _comparable(json.loads(handles[0][group].attrs["provenance"]), grow)
        for handle, path in zip(handles[1:], paths[1:]):
            other = _comparable(json.loads(handle[group].attrs["provenance"]), grow)
            if other != reference:
                diff = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
                raise CacheError(
                    f"group {group}: provenance of {path} differs from {paths[0]} in {diff}; "
                    f"{what}s must come from the same extraction settings and library versions"
                )


def _index_runs(handles: list[h5py.File], image_runs) -> dict[str, tuple]:
    """index path -> (runs over its rows, total rows, merged offsets), for every ragged set of the inputs."""
    runs_of: dict[str, tuple] = {}
    for index in _ragged_indexes(handles[0]):
        runs, merged = _derive_runs(image_runs, [h[index][()] for h in handles])
        runs_of[index] = (runs, int(merged[-1]), merged)
    return runs_of


def merge_parts_into(target: h5py.File, paths: Sequence[str | os.PathLike], *, ids: Sequence[str],
                     groups: Sequence[str], provenance: dict[str, dict]) -> None:
    """The assembly of one extraction run: its parts (small caches over disjoint chunks of its images,
    features/run/parts.py) merged into ``target``, the open temp file of the cache being written.

    The parts must hold exactly ``ids`` and record, for every group, the run's ``provenance`` (apart from
    the run-describing SHARD_KEYS: a resumed run's older parts differ in time and command). ``target`` gets
    /images when it has none, else its ids must be the parts'; only ``groups`` are written (sealed, with
    ``provenance``). A part group outside ``groups`` is a borrowed index: it must equal ``target``'s."""
    paths = [os.fspath(p) for p in paths]
    handles = [open_cache_file(p, "r") for p in paths]
    try:
        part_groups = _open_parts(paths, handles, what="part")
        absent = sorted(set(groups) - set(part_groups))
        if absent:
            raise CacheError(f"the run's parts hold no {absent} ({paths[0]} has {part_groups})")
        owner = _owners(paths, handles, what="part")
        merged_ids = sorted(owner)
        if merged_ids != sorted(ids):
            missing, extra = sorted(set(ids) - set(owner)), sorted(set(owner) - set(ids))
            raise CacheError(f"the run's parts hold other images than the run: missing {missing[:5]}, "
                             f"extra {extra[:5]}; remove {os.path.dirname(paths[0])} and run again")
        _check_same_provenance(part_groups, paths, handles, what="part")
        for group in groups:
            wanted = _comparable(json.loads(json.dumps(provenance[group], sort_keys=True, default=str)))
            found = _comparable(json.loads(handles[0][group].attrs["provenance"]))
            if wanted != found:
                diff = sorted(k for k in set(wanted) | set(found) if wanted.get(k) != found.get(k))
                raise CacheError(f"group {group}: the parts in {os.path.dirname(paths[0])} were computed with other "
                                 f"settings or library versions ({diff}); remove that folder and run again")
        image_runs = _runs_from_order([owner[i] for i in merged_ids])
        runs_of = _index_runs(handles, image_runs)
        if "images" in target:
            if decode_ids(target["images/ids"][()]) != merged_ids:
                raise CacheError(f"{target.filename}: its images are not the run's; nothing was written")
        else:
            _merge_group("images", handles, paths, target, image_runs, len(merged_ids), runs_of)
            target["images"].attrs["id_list_hash"] = id_list_hash(merged_ids)
        for index, (_, _, merged) in runs_of.items():
            if index.rsplit("/", 1)[0] not in groups and (index not in target or
                                                          not np.array_equal(target[index][()], merged)):
                raise CacheError(f"{index}: the parts' rows follow another {index} than {target.filename} holds; "
                                 f"remove {os.path.dirname(paths[0])} and run again")
        for group in groups:
            _merge_group(group, handles, paths, target, image_runs, len(merged_ids), runs_of, gather_bytes=0)
            target[group].attrs["provenance"] = json.dumps(provenance[group], sort_keys=True, default=str)
            seal_group(target[group])
    finally:
        for handle in handles:
            handle.close()


def _merge(paths: list[str], handles: list[h5py.File], out: str, allow_partial: bool, *, grow: bool = False,
           posts_index: int = 0) -> None:
    first_path, first = paths[0], handles[0]
    groups = _open_parts(paths, handles)
    owner = _owners(paths, handles)
    merged_ids = sorted(owner)
    problems = [] if grow else check_shard_set(paths, handles, merged_ids)
    if problems and not allow_partial:
        raise CacheError(
            "incomplete shard set: "
            + "; ".join(problems)
            + ". Merge every shard of the extraction, or pass --allow-partial to merge these "
            "anyway (recorded in the merged cache's provenance)"
        )
    _check_same_provenance(groups, paths, handles, grow)
    image_runs = _runs_from_order([owner[i] for i in merged_ids])
    runs_of = _index_runs(handles, image_runs)

    temp = f"{out}.tmp-{temp_suffix()}"
    try:
        with discardable_file(temp) as target:
            for key, value in first.attrs.items():
                target.attrs[key] = value
            if grow and "posts" in handles[posts_index]:
                handles[posts_index].copy(handles[posts_index]["posts"], target, "posts")
            elif "posts" in first:
                for handle, path in zip(handles[1:], paths[1:]):
                    _check_same_group(first["posts"], handle["posts"], first_path, path)
                first.copy(first["posts"], target, "posts")
            for group in ["images", *groups]:
                _merge_group(group, handles, paths, target, image_runs, len(merged_ids), runs_of)
            target["images"].attrs["id_list_hash"] = id_list_hash(merged_ids)
            for group in groups:
                provenance = json.loads(first[group].attrs["provenance"])
                shards = [json.loads(h[group].attrs["provenance"]) for h in handles]
                full = _shard_of(provenance)[2]
                if grow:
                    provenance.update(image_list_hash=id_list_hash(merged_ids), num_images=len(merged_ids),
                                      shard={"index": 0, "count": 1, "id_list_hash": id_list_hash(merged_ids)})
                    provenance["grown"] = [*provenance.get("grown", []), *(
                        {"created": p.get("created"), "added": p.get("num_images"), "images": p.get("images"),
                         "command": p.get("command"), "versions": p.get("versions")} for p in shards[1:])]
                    target[group].attrs["provenance"] = json.dumps(provenance, sort_keys=True, default=str)
                    continue
                provenance.update(
                    image_list_hash=id_list_hash(merged_ids),
                    num_images=len(merged_ids),
                    shard={
                        "index": 0,
                        "count": 1,
                        "id_list_hash": full if not problems else id_list_hash(merged_ids),
                    },
                    merge={
                        "command": list(sys.argv),
                        "cwd": os.getcwd(),
                        "created": utc_now(),
                        "missing": problems,
                        "shards": [
                            {
                                "path": os.path.abspath(path),
                                **{k: p.get(k) for k in SHARD_KEYS if k != "merge"},
                            }
                            for path, p in zip(paths, shards)
                        ],
                    },
                )
                target[group].attrs["provenance"] = json.dumps(provenance, sort_keys=True, default=str)
            prints = {}
            for name in stored_groups(target):
                prints[name] = seal_group(target[name])
            target.attrs["fingerprint"] = cache_fingerprint(prints)
        os.replace(temp, out)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def _ragged_indexes(handle: h5py.File) -> list[str]:
    """Offsets datasets that define a ragged per-image set (objects/offsets, grounding offsets)."""
    found = []
    for name, dataset in walk_datasets(handle).items():
        if "defines" in dataset.attrs and dataset.attrs.get("indexes") == "image":
            found.append(name)
    return sorted(found)


def _check_same_group(a: h5py.Group, b: h5py.Group, path_a: str, path_b: str) -> None:
    names_a, names_b = walk_datasets(a), walk_datasets(b)
    if set(names_a) != set(names_b) or not all(_same_dataset(names_a[n], names_b[n]) for n in names_a):
        raise CacheError(
            f"{a.name} differs between {path_a} and {path_b}: shards must come from the same data"
        )


def _merge_group(group, handles, paths, target, image_runs, num_images, runs_of,
                 gather_bytes: int = MERGE_IN_MEMORY_BYTES) -> None:
    """``gather_bytes``: datasets up to this size are gathered in memory and written once; larger ones are
    copied run by run (an extraction's parts: one part's rows in memory at a time)."""
    sources = [h[group] for h in handles]
    out_group = target.require_group(group)
    _copy_attrs(sources[0], out_group)
    keys = sorted(k for k, v in sources[0].items() if isinstance(v, h5py.Dataset))
    for source, path in zip(sources[1:], paths[1:]):
        other = sorted(k for k, v in source.items() if isinstance(v, h5py.Dataset))
        if other != keys:
            raise CacheError(f"{group}: datasets differ between {paths[0]} ({keys}) and {path} ({other})")
        for key in keys:
            same_dtype = source[key].dtype == sources[0][key].dtype or \
                source[key].dtype.kind == sources[0][key].dtype.kind == "S"  # fixed bytes of other widths
            if source[key].shape[1:] != sources[0][key].shape[1:] or not same_dtype:
                raise CacheError(f"{group}/{key}: row shape/dtype differs between {paths[0]} and {path}")

    def row_runs(attrs):
        """Runs and total of the rows a dataset (or a flat dataset's offsets) is indexed by."""
        if "index" in attrs:
            runs, total, _ = runs_of[str(attrs["index"])]
            return runs, total
        if attrs.get("rows", attrs.get("indexes")) == "image" or attrs.get("indexes") == "image":
            return image_runs, num_images
        return None, None

    def check_global(key):
        for source, path in zip(sources[1:], paths[1:]):
            if not _same_dataset(sources[0][key], source[key]):
                raise CacheError(f"global dataset {group}/{key} differs between {paths[0]} and {path}")
        sources[0].copy(sources[0][key], out_group, key)

    for key in keys:
        attrs = sources[0][key].attrs
        rows = attrs.get("rows", "global")
        if "defines" in attrs:  # a ragged set's index: merged offsets
            dataset = out_group.create_dataset(key, data=runs_of[f"{group}/{key}"][2])
            _copy_attrs(sources[0][key], dataset)
        elif rows == "flat":
            offsets_key = str(attrs["offsets"])
            runs, _ = row_runs(sources[0][offsets_key].attrs)
            if runs is None:
                check_global(key)
                check_global(offsets_key)
                continue
            value_runs, merged = _derive_runs(runs, [s[offsets_key][()] for s in sources])
            _copy_runs([s[key] for s in sources], value_runs, int(merged[-1]), out_group, key, gather_bytes)
            index = out_group.create_dataset(offsets_key, data=merged)
            _copy_attrs(sources[0][offsets_key], index)
        elif rows == "offsets":
            continue  # written with its flat values
        else:
            runs, total = row_runs(attrs)
            if runs is None:
                check_global(key)
            else:
                _copy_runs([s[key] for s in sources], runs, total, out_group, key, gather_bytes)
