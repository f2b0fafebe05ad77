"""The HDF5 feature cache: layout, round trips, atomic writes, fork safety, merge, refusals."""

from __future__ import annotations

import hashlib
import json
import pickle

import h5py
import numpy as np
import pytest
from helpers.cache import (
    CATEGORIES,
    CLIP_DIM,
    IDS,
    PATCHES,
    PROMPT_TEXTS,
    _shard_ids,
    image_record,
    make_posts,
    provenance,
    write_cache,
)

from mner.pipeline.cache import (
    SCHEMA_VERSION,
    CacheError,
    CacheWriter,
    FeatureCache,
    MissingFeaturesError,
    SchemaVersionError,
    describe,
    extract_command_hint,
    merge_caches,
)
from mner.pipeline.cache import merge as merge_module
from mner.pipeline.data import Dataset

# Stored `rows` attrs: the spec's row kinds, plus "flat"/"offsets" for variable-length values.
STORED_ROWS = ("image", "object", "grounding", "global", "flat", "offsets")


def snapshot(path, groups=None) -> dict:
    """Every dataset's bytes + dtype + attrs (and every group's attrs), optionally limited to some groups."""
    found = {}
    with h5py.File(path, "r") as handle:
        def visit(name, obj):
            if groups is not None and name.split("/")[0] not in groups and name not in groups:
                return
            attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                found[name] = (obj.dtype.str, obj.shape, obj[()].tobytes(), attrs)
            else:
                found[name] = attrs
        handle.visititems(visit)
        found["/"] = dict(handle.attrs)
    return found


@pytest.fixture()
def cache_path(tmp_path):
    path = tmp_path / "t.h5"
    write_cache(path, IDS, IDS)
    return path


def test_read_back_every_kind(cache_path):
    cache = FeatureCache(cache_path)
    assert cache.image_ids == IDS
    assert set(cache.groups()) == {"objects", "encoders/clip", "prompts/vcrmner"}
    counts = []
    for row, image_id in enumerate(IDS):
        record = image_record(image_id)
        assert cache.row_of(image_id) == row
        assert cache.status[row] == record["status"]
        assert cache.detail(row) == record["detail"]
        assert cache.read("images/width", row) == record["width"]
        k = len(record["scores"])
        counts.append(k)
        boxes = cache.read("objects/boxes", row)
        assert boxes.shape == (k, 4) and boxes.dtype == np.float32
        np.testing.assert_array_equal(boxes, record["boxes"])
        np.testing.assert_array_equal(cache.read("objects/class_ids", row), record["class_ids"])
        assert cache.read("objects/crop_jpeg", row) == record["crops"]
        crop_embed = cache.read("encoders/clip/crop_embed", row)
        assert crop_embed.shape == (k, CLIP_DIM) and crop_embed.dtype == np.float16
        np.testing.assert_allclose(crop_embed, record["crop_embed"], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(cache.read("encoders/clip/patch_tokens", row), record["patch_tokens"], atol=4e-3)
        assert cache.read("prompts/vcrmner/crop_weights", row).shape == (k, CATEGORIES)
    assert 0 in counts and 3 in counts and set(cache.status.tolist()) == {0, 1, 2, 3}
    assert cache.read_global("prompts/vcrmner/prompt_text") == PROMPT_TEXTS
    assert cache.read_global("prompts/vcrmner/centroids").shape == (CATEGORIES, CLIP_DIM)
    with pytest.raises(KeyError, match="not in"):
        cache.row_of("no-such-image")


def test_offsets_consistent_and_in_memory_identical(cache_path):
    disk, memory = FeatureCache(cache_path), FeatureCache(cache_path, in_memory=True)
    with h5py.File(cache_path, "r") as handle:
        offsets = handle["objects/offsets"][()]
        assert offsets[0] == 0 and (np.diff(offsets) >= 0).all() and offsets.shape == (len(IDS) + 1,)
        for key in ("boxes", "scores", "class_ids"):
            assert handle[f"objects/{key}"].shape[0] == offsets[-1]
        crop_offsets = handle["objects/crop_jpeg_offsets"][()]
        assert crop_offsets.shape == (offsets[-1] + 1,) and crop_offsets[-1] == handle["objects/crop_jpeg"].shape[0]
        assert handle["encoders/clip/crop_embed"].shape[0] == offsets[-1]
    for row in range(len(IDS)):
        for path in ("encoders/clip/crop_embed", "encoders/clip/image_embed", "prompts/vcrmner/crop_weights"):
            np.testing.assert_array_equal(disk.read(path, row), memory.read(path, row))


def test_dtypes_no_vlen_and_provenance_everywhere(cache_path):
    with h5py.File(cache_path, "r") as handle:
        assert handle.attrs["mner_schema_version"] == SCHEMA_VERSION
        datasets = {}
        handle.visititems(lambda n, o: datasets.__setitem__(n, o) if isinstance(o, h5py.Dataset) else None)
        for name, dataset in datasets.items():
            assert dataset.dtype.kind not in "OV", name
            assert h5py.check_vlen_dtype(dataset.dtype) is None, name
            string = h5py.check_string_dtype(dataset.dtype)
            assert string is None or string.length is not None, name  # fixed-length bytes only
            kinds = ("post", "token", "offsets", "flat") if name.startswith("posts/") else STORED_ROWS
            assert dataset.attrs["rows"] in kinds, name
        for name in ("encoders/clip/image_embed", "encoders/clip/patch_tokens", "encoders/clip/crop_embed",
                     "prompts/vcrmner/crop_weights", "prompts/vcrmner/image_relevance"):
            assert datasets[name].dtype == np.float16, name
        assert datasets["objects/boxes"].dtype == np.float32 and datasets["images/ids"].dtype.kind == "S"
        for group in ("objects", "encoders/clip", "prompts/vcrmner"):
            prov = json.loads(handle[group].attrs["provenance"])
            for key in ("component", "model", "pretrained", "preprocessing", "thresholds", "versions",
                        "image_list_hash", "command", "created"):
                assert key in prov, (group, key)
            assert set(prov["versions"]) >= {"torch", "torchvision", "open_clip_torch", "transformers", "h5py",
                                             "numpy", "mner"}
            assert prov["image_list_hash"] == hashlib.sha256("\n".join(IDS).encode()).hexdigest()
    cache = FeatureCache(cache_path)
    assert set(cache.random_init_groups()) == {"encoders/clip", "prompts/vcrmner"}
    spec = cache.feature_spec(["encoders/clip/patch_tokens", "objects/boxes", "prompts/vcrmner/centroids"])
    assert spec.shapes["encoders/clip/patch_tokens"] == (PATCHES, CLIP_DIM)
    assert spec.shapes["objects/boxes"] == (4,)
    assert spec.globals["prompts/vcrmner/centroids"].shape == (CATEGORIES, CLIP_DIM)
    assert spec.attrs["encoders/clip"]["logit_scale"] == 100.0
    assert "images/status" not in spec.globals and "objects/boxes" not in spec.globals


def test_schema_version_refused(cache_path):
    with h5py.File(cache_path, "r+") as handle:
        handle.attrs["mner_schema_version"] = 99
    with pytest.raises(SchemaVersionError) as error:
        FeatureCache(cache_path)
    message = str(error.value)
    assert "99" in message and f"reads schema version {SCHEMA_VERSION}" in message
    assert "mner-features extract" in message and "install the mner version" in message
    with pytest.raises(SchemaVersionError), CacheWriter(cache_path):
        pass


def test_missing_features_names_the_command(tmp_path):
    path = tmp_path / "objects-only.h5"
    write_cache(path, IDS[:5], IDS[:5], groups=("objects",))
    cache = FeatureCache(path)
    cache.require(["objects/boxes"], model="vcrmner")  # present: no error
    with pytest.raises(MissingFeaturesError) as error:
        cache.require(["objects/boxes", "encoders/clip/crop_embed", "prompts/vcrmner/crop_weights"], model="vcrmner")
    message = str(error.value)
    assert "mner-features extract" in message and f"--out {path}" in message
    assert "--encoder clip" in message and "--prompts vcrmner" in message and "--detector" not in message
    assert "--data data" in message  # the posts record where the data came from
    hint = extract_command_hint(["objects/boxes", "encoders/resnet152/grid", "encoders/swin/grid"])
    assert hint.startswith("mner-features extract --data ") and "--images " in hint
    assert "--detector maskrcnn" in hint and "--encoder resnet152" in hint and "--encoder swin" in hint


def test_adding_a_group_keeps_others_byte_identical(cache_path):
    before = snapshot(cache_path)
    write_cache(cache_path, IDS, IDS, groups=("resnet",))  # same ids and posts: images/posts kept as they are
    after = snapshot(cache_path)
    assert after["/"].pop("fingerprint") != before["/"].pop("fingerprint")  # the cache's contents changed
    assert {k: v for k, v in after.items() if not k.startswith("encoders/resnet152")} == before
    assert "encoders/resnet152/crop_pooled" in after
    with CacheWriter(cache_path) as writer:
        assert writer.existing_groups() >= {"objects", "encoders/clip", "encoders/resnet152", "images", "posts"}
        with pytest.raises(CacheError, match="exists"):
            writer.write_group("encoders/clip", {"image_embed": (np.zeros((len(IDS), 2)), "image")},
                               provenance("encoder", "clip", IDS))
        objects = int(writer.file["objects/offsets"][-1])
        writer.write_group("encoders/clip", {"image_embed": (np.zeros((len(IDS), 2)), "image"),
                                             "crop_embed": (np.zeros((objects, 2)), "object")},
                           provenance("encoder", "clip", IDS), attrs={"logit_scale": 1.0}, overwrite=True)
    final = snapshot(cache_path)
    assert FeatureCache(cache_path).row_shape("encoders/clip/image_embed") == (2,)
    assert {k: v for k, v in final.items() if k.startswith("objects")} == {
        k: v for k, v in before.items() if k.startswith("objects")}


def test_failing_writer_leaves_original_and_no_temp(cache_path):
    before = snapshot(cache_path)
    stale = f"{cache_path}.tmp-otherhost-999999999"  # a temp of a dead writer (we hold the lock: none is alive)
    with open(stale, "wb") as handle:
        handle.write(b"junk")
    with pytest.raises(RuntimeError, match="boom"), CacheWriter(cache_path) as writer:
        writer.write_group("encoders/swin", {"grid": (np.ones((len(IDS), 2, 2, 3)), "image")},
                           provenance("encoder", "swin", IDS))
        raise RuntimeError("boom")
    assert snapshot(cache_path) == before
    assert [p.name for p in cache_path.parent.iterdir()] == [cache_path.name]
    # a wrong row count is a clear error, file untouched
    with pytest.raises(CacheError, match="3 of 40 image rows"), CacheWriter(cache_path) as writer:
        writer.write_group("encoders/swin", {"grid": (np.ones((3, 2, 2, 1)), "image")}, provenance("encoder", "s", IDS))
    assert snapshot(cache_path) == before
    with pytest.raises(CacheError, match="sorted"), CacheWriter(cache_path, overwrite=True) as writer:
        writer.write_images(["b", "a"])
    assert snapshot(cache_path) == before


class _Rows:
    """A map-style dataset over cache rows (what the trainer's visual batcher does)."""

    PATHS = ("encoders/clip/patch_tokens", "encoders/clip/crop_embed", "objects/boxes")

    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return self.cache.num_images

    def __getitem__(self, row):
        return row, [self.cache.read(path, row) for path in self.PATHS]


def test_fork_safe_dataloader(cache_path):
    import torch.utils.data

    cache = FeatureCache(cache_path)
    expected = {row: [cache.read(p, row) for p in _Rows.PATHS] for row in range(len(IDS))}  # opens in parent
    assert cache._file is not None
    restored = pickle.loads(pickle.dumps(cache))
    assert restored._file is None
    loader = torch.utils.data.DataLoader(_Rows(cache), batch_size=None, shuffle=True, num_workers=2,
                                         multiprocessing_context="fork")
    seen = 0
    for row, arrays in loader:
        for got, want in zip(arrays, expected[int(row)]):
            np.testing.assert_array_equal(np.asarray(got), want)
        seen += 1
    assert seen == len(IDS)
    np.testing.assert_array_equal(cache.read(_Rows.PATHS[0], 3), expected[3][0])  # parent handle still fine


@pytest.mark.parametrize("shards,in_memory", [(2, True), (3, False)])
def test_merge_equals_single_write(tmp_path, monkeypatch, shards, in_memory):
    if not in_memory:  # the run-by-run path used for datasets over MERGE_IN_MEMORY_BYTES
        monkeypatch.setattr(merge_module, "MERGE_IN_MEMORY_BYTES", 0)
    single = tmp_path / "single.h5"
    write_cache(single, IDS, IDS)
    paths = []
    for i, ids in enumerate(_shard_ids(shards)):
        paths.append(tmp_path / f"shard{i}.h5")
        write_cache(paths[-1], ids, IDS, shard=(i, shards))
    merged = tmp_path / "merged.h5"
    merge_caches(paths, merged)
    want, got = snapshot(single), snapshot(merged)
    for group in ("objects", "encoders/clip", "prompts/vcrmner"):
        want_prov, got_prov = want[group].pop("provenance"), got[group].pop("provenance")
        got_prov, want_prov = json.loads(got_prov), json.loads(want_prov)
        assert got_prov["image_list_hash"] == want_prov["image_list_hash"]
        assert got_prov["shard"] == want_prov["shard"]  # the merged cache is shard 0/1 of the same list
        assert len(got_prov["merge"]["shards"]) == shards and not got_prov["merge"]["missing"]
    assert got == want  # fingerprints included: the merge is the single write
    cache = FeatureCache(merged)
    assert cache.image_ids == IDS and cache.load_posts().splits == make_posts(IDS).splits
    assert f"merged from {shards} shards" in describe(merged)


def test_merge_refusals(tmp_path):
    a, b = _shard_ids(2)
    paths = {name: tmp_path / f"{name}.h5" for name in ("a", "b", "overlap", "fewer", "other_model")}
    write_cache(paths["a"], a, IDS, shard=(0, 2))
    write_cache(paths["b"], b, IDS, shard=(1, 2))
    write_cache(paths["overlap"], sorted(b + a[:1]), IDS, shard=(1, 2))
    write_cache(paths["fewer"], b, IDS, groups=("objects", "clip"), shard=(1, 2))
    write_cache(paths["other_model"], b, IDS, shard=(1, 2))
    with h5py.File(paths["other_model"], "r+") as handle:
        prov = json.loads(handle["encoders/clip"].attrs["provenance"])
        prov["model"] = "ViT-L-14"
        handle["encoders/clip"].attrs["provenance"] = json.dumps(prov)
    out = tmp_path / "out.h5"
    with pytest.raises(CacheError, match="both"):
        merge_caches([paths["a"], paths["overlap"]], out)
    with pytest.raises(CacheError, match="feature groups"):
        merge_caches([paths["a"], paths["fewer"]], out)
    with pytest.raises(CacheError, match=r"provenance .* differs .*model"):
        merge_caches([paths["a"], paths["other_model"]], out)
    with h5py.File(paths["b"], "r+") as handle:
        handle.attrs["mner_schema_version"] = 99
    with pytest.raises(SchemaVersionError):
        merge_caches([paths["a"], paths["b"]], out)
    assert not out.exists() and not list(tmp_path.glob("out.h5.tmp-*"))


def test_posts_round_trip_and_describe(cache_path):
    cache = FeatureCache(cache_path)
    loaded, original = cache.load_posts(), make_posts(IDS)
    assert loaded.splits == original.splits
    assert any(p.tags is None for p in loaded.splits["train"]) and any(p.image_id is None for p in loaded.splits["dev"])
    assert (loaded.data_hash, loaded.files, loaded.orphan_i, loaded.notes) == (
        original.data_hash, original.files, original.orphan_i, original.notes)
    text = describe(cache_path)
    status = FeatureCache(cache_path).status
    assert f"images: {len(IDS)} (ok {int((status == 0).sum())}" in text
    assert "posts: train 14, dev 13, test 13" in text and f"schema version {SCHEMA_VERSION}" in text
    # other data files: refused, not silently mixed
    with CacheWriter(cache_path) as writer, pytest.raises(CacheError, match="other data files"):
        writer.write_posts(Dataset(splits={}, data_hash="different"))
    assert "/encoders/clip" in text and "patch_tokens" in text and "float16" in text and "RANDOM" in text
