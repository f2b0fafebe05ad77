"""Issue 7: feature groups declared once as data; writer, reader, batcher, fingerprints and coverage
derive from the specs. Every registered group round-trips from its spec alone through the batcher."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from mner.pipeline.cache import (
    CacheError,
    CacheWriter,
    DatasetSpec,
    FeatureCache,
    GroupSpec,
    all_groups,
    get_group,
    group_fingerprint,
    make_provenance,
    register_group,
    unregister_group,
)
from mner.pipeline.cache.tiny import instance_name, tiny_group, write_tiny_cache
from mner.trainer.inputs.visual import VisualBatcher

FEATURE_GROUPS = [instance_name(g) for g in all_groups() if g.feature]


def batch_paths(group: str) -> list[str]:
    return [f"{group}/{d.name}" for d in get_group(group).datasets if d.collate is not None]


def check_batch(cache: FeatureCache, group: str, written: dict, visual: dict, rows: list) -> None:
    """Every batched dataset equals what was written, padded/masked per its row kind."""
    for ds in get_group(group).datasets:
        if ds.collate is None:
            continue
        path = f"{group}/{ds.name}"
        tensor = visual[path]
        for b, row in enumerate(rows):
            if ds.rows == "image":
                want = np.asarray(written[ds.name][row], np.float32)
                np.testing.assert_allclose(tensor[b].numpy(), want, atol=2e-2, rtol=2e-2)
            elif ds.rows == "text":
                assert tensor[b] == written[ds.name][row]
            else:  # a ragged set: (B, K, ...) + its mask
                index = cache.index_of(path)
                lo, hi = cache.rows_of(index, row)
                mask = visual[index.rsplit("/", 1)[0] + "/mask"][b]
                assert int(mask.sum()) == hi - lo and tensor.shape[1] == max(1, mask.shape[0])
                if ds.collate == "jpeg":
                    assert tensor.dtype == torch.uint8 and tensor.shape[2:] == (ds.pixels, ds.pixels, 3)
                    import io

                    from PIL import Image

                    for k in range(hi - lo):  # solid colours survive JPEG and resizing
                        colour = np.asarray(Image.open(io.BytesIO(written[ds.name][lo + k])).convert("RGB"))[
                            4, 4
                        ]
                        assert (
                            np.abs(
                                tensor[b, k, ds.pixels // 2, ds.pixels // 2].numpy().astype(int)
                                - colour.astype(int)
                            ).max()
                            <= 3
                        )
                else:
                    want = np.asarray(written[ds.name][lo:hi], np.float32)
                    np.testing.assert_allclose(tensor[b, : hi - lo].numpy(), want, atol=2e-2, rtol=2e-2)
                    assert (tensor[b, hi - lo :] == 0).all()


@pytest.mark.parametrize("group", FEATURE_GROUPS)
def test_every_registered_group_round_trips_from_its_spec_through_the_batcher(tmp_path, group):
    path = tmp_path / "tiny.h5"
    written = write_tiny_cache(path, [group])[group]
    cache = FeatureCache(path)
    assert cache.group_fingerprints()[group]
    paths = batch_paths(group)
    if not paths:
        pytest.fail(f"{group} declares no batched dataset")
    rows = list(range(cache.num_images))
    visual = VisualBatcher(cache, paths)(rows)
    check_batch(cache, group, written, visual, rows)
    globals_ = [f"{group}/{d.name}" for d in get_group(group).datasets if d.rows == "global"]
    spec = cache.feature_spec(globals_)
    for key in globals_:  # globals reach models through FeatureSpec
        want = written[key.rsplit("/", 1)[1]]
        got = spec.globals[key]
        assert got == want if isinstance(want, list) else np.allclose(got, want, atol=1e-3)


GROUNDING = GroupSpec(
    name="test_grounding",
    option="--test-grounding",
    provenance=("grounder",),
    dims={"D": "width"},
    datasets=(
        DatasetSpec("offsets", "index", "int64", indexes="grounding", max_per_image=3, collate=None),
        DatasetSpec("crop_jpeg", "grounding", "uint8", encoding="jpeg", collate="jpeg", pixels=16),
        DatasetSpec("embed", "grounding", "float16", ("D",)),
        DatasetSpec("caption", "text", "uint8", encoding="utf-8", collate="text"),
    ),
)


@pytest.fixture()
def grounding_spec():
    register_group(GROUNDING)
    yield GROUNDING
    unregister_group(GROUNDING.name)


def test_grounding_and_text_rows_beside_objects(tmp_path, grounding_spec):
    """A second ragged per-image set (<= 3 rows) and per-image text, next to the objects."""
    path = tmp_path / "g.h5"
    written = write_tiny_cache(
        path, ["crops/tiny/clip/tiny", "test_grounding"], num_images=5, status=["ok", "ok", "ok", "missing", "ok"]
    )
    cache = FeatureCache(path)
    assert cache.index_of("test_grounding/embed") == "test_grounding/offsets"
    assert cache.index_of("crops/tiny/clip/tiny/crop_embed") == "objects/tiny/offsets"
    assert cache.rows_kind("test_grounding/caption") == "text"
    assert cache.read("test_grounding/caption", 2) == written["test_grounding"]["caption"][2]
    paths = [
        "crops/tiny/clip/tiny/crop_embed",
        "test_grounding/embed",
        "test_grounding/crop_jpeg",
        "test_grounding/caption",
    ]
    visual = VisualBatcher(cache, paths, max_objects=2)([0, 1, 2, 4])
    check_batch(cache, "test_grounding", written["test_grounding"], visual, [0, 1, 2, 4])
    assert visual["objects/tiny/mask"].shape[1] <= 2 and visual["test_grounding/mask"].shape[1] == 3
    missing = VisualBatcher(cache, paths)([3, None])
    assert missing["test_grounding/caption"] == ["", ""] and not missing["test_grounding/mask"].any()
    # token ids when a tokenizer is given
    tokenized = VisualBatcher(
        cache,
        ["test_grounding/caption"],
        tokenizer=lambda texts, **kw: {
            "input_ids": torch.tensor([[len(t)] for t in texts]),
            "attention_mask": torch.ones(len(texts), 1),
        },
    )([0, 3])
    assert tokenized["test_grounding/caption/input_ids"][:, 0].tolist() == [
        len(written["test_grounding"]["caption"][0]),
        0,
    ]
    # more than 3 grounding rows for an image is refused
    with CacheWriter(path) as writer, pytest.raises(CacheError, match="at most 3 grounding rows"):
        writer.write_group(
            "test_grounding",
            {"offsets": np.array([0, 4, 4, 4, 4, 4])},
            _provenance(cache.image_ids, grounder="g"),
            overwrite=True,
        )


def _provenance(ids, **extra):
    return make_provenance(
        "encoder",
        model="m",
        pretrained="random",
        preprocessing={},
        thresholds={},
        image_ids=ids,
        extra={"encoder": "x", **extra},
    )


def test_writer_validates_against_the_spec(tmp_path):
    path = tmp_path / "v.h5"
    write_tiny_cache(path, ["objects/tiny"], num_images=4)
    ids = FeatureCache(path).image_ids
    objects = int(FeatureCache(path).read("objects/tiny/offsets", 3)[1])
    good = {"image_embed": np.zeros((4, 8)), "patch_tokens": np.zeros((4, 2, 3))}
    crops = {"crop_embed": np.zeros((objects, 8))}
    cases = [
        ("encoders/nope", good, {}, "no feature group 'encoders/nope' is declared"),
        ("encoders/clip/m", {**good, "extra": np.zeros((4, 2))}, {}, "declares no dataset 'extra'"),
        ("encoders/clip/m", {**good, "image_embed": (np.zeros((4, 8)), "object")}, {}, "declared rows 'image'"),
        ("crops/tiny/clip/m", {"crop_embed": np.zeros((objects + 1, 8))}, {}, f"the cache has {objects} object rows"),
        ("crops/nodetector/clip/m", crops, {}, "need objects/nodetector/offsets; write that group first"),
        ("encoders/clip/m", {"patch_tokens": np.zeros((4, 2, 3))}, {}, "image_embed is required"),
        ("encoders/clip/m", {**good, "image_embed": np.full((4, 8), 1e6)}, {}, "beyond float16 range"),
        ("encoders/clip/m", good, None, "attrs \\['logit_scale'\\]"),
        ("encoders/clip/a/b", good, {}, "no feature group 'encoders/clip/a/b' is declared"),
        ("encoders/resnet/m", {"grid": np.zeros((4, 2, 2))}, {}, "does not match the declared"),
    ]
    for name, datasets, attrs, message in cases:
        with CacheWriter(path) as writer, pytest.raises(CacheError, match=message):
            writer.write_group(
                name, datasets, _provenance(ids), {"logit_scale": 1.0} if attrs is not None else {}
            )
    with CacheWriter(path) as writer, pytest.raises(CacheError, match="provenance lacks \\['encoder'\\]"):
        writer.write_group(
            "encoders/clip/m",
            good,
            make_provenance(
                "encoder", model="m", pretrained="random", preprocessing={}, thresholds={}, image_ids=ids
            ),
            {"logit_scale": 1.0},
        )
    with (  # a valid write, streamed in two chunks
        CacheWriter(path) as writer,
        writer.group("encoders/clip/m", _provenance(ids), {"logit_scale": 1.0}) as group,
    ):
        group.append({"image_embed": np.ones((2, 8))})
        group.append({"image_embed": np.ones((2, 8)) * 2})
    with CacheWriter(path) as writer:  # a second instance beside it: crops of the tiny detector
        writer.write_group("crops/tiny/clip/m", crops, _provenance(ids))
    cache = FeatureCache(path)
    assert cache.read("encoders/clip/m/image_embed", 3)[0] == 2 and cache.has("crops/tiny/clip/m/crop_embed")
    assert cache.index_of("crops/tiny/clip/m/crop_embed") == "objects/tiny/offsets"


def test_fingerprints_stored_per_group_and_for_the_cache(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    write_tiny_cache(a, ["objects/tiny", "encoders/clip/tiny"])
    write_tiny_cache(b, ["objects/tiny", "encoders/clip/tiny"])
    cache_a, cache_b = FeatureCache(a), FeatureCache(b)
    prints = cache_a.group_fingerprints()
    assert set(prints) == {"images", "objects/tiny", "encoders/clip/tiny"} and all(
        len(v) == 64 for v in prints.values()
    )
    assert (
        prints == cache_b.group_fingerprints() and cache_a.fingerprint == cache_b.fingerprint
    )  # same numbers
    with h5py.File(a, "r") as handle:  # the stored value is the checksum of the stored bytes
        assert all(group_fingerprint(handle[g]) == v for g, v in prints.items())
    with CacheWriter(b) as writer:  # adding a group keeps the others' fingerprints, changes the cache's
        tiny_group(writer, "encoders/swin/tiny")
    after = FeatureCache(b)
    assert {
        g: after.group_fingerprints()[g] for g in prints
    } == prints and after.fingerprint != cache_a.fingerprint
    with h5py.File(b, "r+") as handle:  # one changed value changes the group's checksum
        handle["encoders/clip/tiny/image_embed"][0, 0] += 1
        assert group_fingerprint(handle["encoders/clip/tiny"]) != prints["encoders/clip/tiny"]


def test_image_coverage_counts_every_cause(tmp_path):
    path = tmp_path / "c.h5"
    write_tiny_cache(
        path, ["encoders/swin/tiny"], num_images=4, status=["ok", "missing", "placeholder", "unreadable"]
    )
    coverage = FeatureCache(path).image_coverage(
        ["img000", "img000", "img001", "img002", "img003", "other", None, ""]
    )
    assert coverage == {
        "ok": 2,
        "missing": 1,
        "unreadable": 1,
        "placeholder": 1,
        "not_in_cache": 1,
        "no_image": 2,
        "total": 8,
    }


def test_groups_written_around_the_group_writer_are_checked_and_fingerprinted_on_exit(tmp_path):
    path = tmp_path / "d.h5"
    write_tiny_cache(path, ["objects/tiny"], num_images=3)
    with (
        pytest.raises(CacheError, match="encoders/swin/m does not match its spec: grid: dtype float64"),
        CacheWriter(path) as writer,
    ):
        group = writer.file.create_group("encoders/swin/m")
        group.create_dataset("grid", data=np.zeros((3, 2, 2, 4)))
        group["grid"].attrs["rows"] = "image"
        group.attrs["provenance"] = "{}"
    with CacheWriter(path) as writer:
        group = writer.file.create_group("encoders/swin/m")
        group.create_dataset("grid", data=np.zeros((3, 2, 2, 4), np.float16))
        group["grid"].attrs["rows"] = "image"
        group.attrs["provenance"] = "{}"
        writer.file["images"].create_dataset("content_sha256", data=np.array([b"a" * 64] * 3))
        writer.file["images/content_sha256"].attrs["rows"] = "image"
    cache = FeatureCache(path)
    with h5py.File(path, "r") as handle:
        assert cache.group_fingerprints()["encoders/swin/m"] == group_fingerprint(handle["encoders/swin/m"])
        assert cache.group_fingerprints()["images"] == group_fingerprint(
            handle["images"]
        )  # includes content_sha256
