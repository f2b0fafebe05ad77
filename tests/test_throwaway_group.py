"""Adding a feature group is a spec and a producer (docs/architecture.md, "How to add a feature group"): two
throwaway groups declared and registered here, in the test, go through extract (two shards), the cache,
merge, ``mner-features info`` and the trainer's batcher with no other file changed. The second declares its
own ragged per-image row kind (``test_spot``) by its index dataset: no list of kinds names it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mner.features.cli import main as features_main
from mner.features.producers.registry import Producer, register_producer, unregister_producer
from mner.pipeline.cache import (
    DatasetSpec,
    FeatureCache,
    GroupSpec,
    is_ragged,
    merge_caches,
    register_group,
    unregister_group,
)
from mner.trainer.inputs.visual import VisualBatcher

IDS = ["201", "205", "207", "204"]  # 204 has no picture; two shards of two

SPEC = GroupSpec(
    name="test_colour/{space}", option="--group test_colour/{space}", provenance=("space",),
    slot_docs={"space": "the colour space of the means (rgb)"}, dims={"C": "channels"},
    doc="Throwaway test group: each image's mean colour.",
    datasets=(DatasetSpec("mean", "image", "float16", ("C",), doc="mean channel value in 0..1"),),
)

SPOTS = GroupSpec(  # a ragged per-image set of a new kind: one or two spots per image, declared by its index
    name="test_spots/{space}", option="--group test_spots/{space}", provenance=("space",),
    slot_docs={"space": "the colour space of the means (rgb)"}, dims={"C": "channels"},
    doc="Throwaway test group: the mean colour of each half of a wide image, of the whole of a narrow one.",
    datasets=(
        DatasetSpec("offsets", "index", "int64", indexes="test_spot", max_per_image=2, collate=None,
                    doc="spots of image i: test_spot rows offsets[i]:offsets[i+1] (0..2)"),
        DatasetSpec("mean", "test_spot", "float16", ("C",), doc="mean channel value of the spot in 0..1"),
    ),
)


class MeanColour(Producer):
    """A stub producer: reads decoded pixels, writes one row per image."""

    def dims(self) -> dict[str, int]:
        return {"C": 3}

    def produce(self, batch):
        means = [np.asarray(image, np.float32).reshape(-1, 3).mean(0) / 255 for image in batch.images]
        return {"mean": np.stack(means)}  # (n, 3)

    def provenance(self) -> dict:
        return {"model": "mean colour", "pretrained": "none", "preprocessing": {}, "thresholds": {},
                "space": self.slots["space"]}


class HalfColours(MeanColour):
    """A stub producer of a ragged set: rows for every usable image plus ``counts`` (n,) per image."""

    def produce(self, batch):
        spots = []
        for image in batch.images:
            pixels = np.asarray(image, np.float32) / 255  # (H, W, 3)
            halves = np.array_split(pixels, 2, axis=1) if pixels.shape[1] > pixels.shape[0] else [pixels]
            spots.append([half.reshape(-1, 3).mean(0) for half in halves])
        return {"mean": np.array([s for image in spots for s in image], np.float32).reshape(-1, 3),  # (k, 3)
                "counts": np.array([len(image) for image in spots], np.int64)}  # (n,)


@pytest.fixture()
def throwaway():
    assert not is_ragged("test_spot")
    for spec, producer in ((SPEC, MeanColour), (SPOTS, HalfColours)):
        register_group(spec)
        register_producer(spec)(producer)
    yield SPEC
    for spec in (SPOTS, SPEC):
        unregister_producer(spec)
        unregister_group(spec.name)
    assert not is_ragged("test_spot")


def test_rows_of_a_kind_no_index_declares_are_refused():
    orphan = GroupSpec(name="test_orphan", datasets=(DatasetSpec("mean", "test_blob", "float16", (3,)),))
    with pytest.raises(ValueError, match=r"rows 'test_blob'.*no registered group defines.*indexes='test_blob'"):
        register_group(orphan)
    with pytest.raises(ValueError, match="neither one of"):
        DatasetSpec("mean", "Not A Kind", "float16")


def test_a_group_declared_in_a_test_goes_through_every_stage(throwaway, tmp_path, capsys):
    assert is_ragged("test_spot")  # declared by the registered index, nowhere else
    images, data = tmp_path / "images", tmp_path / "data"
    images.mkdir()
    data.mkdir()
    colours = {"201": (255, 0, 0), "205": (0, 255, 0), "207": (0, 0, 255)}
    widths = {"201": 40, "205": 30, "207": 40}  # 205 is square: one spot; the others two halves
    for image_id, colour in colours.items():
        picture = Image.new("RGB", (widths[image_id], 30), colour)
        picture.paste((255, 255, 255), (20, 0, 40, 30))  # right half white: the two spots differ
        picture.save(images / f"{image_id}.png")
    posts = [f"IMGID:{i}\nJohn\tB-PER\nin\tO\nParis\tB-LOC\n" for i in IDS]
    (data / "train.txt").write_text("\n".join(posts[:2]) + "\n")
    (data / "valid.txt").write_text("\n".join(posts[2:]) + "\n")
    out = tmp_path / "c.h5"
    argv = ["extract", "--data", str(data), "--images", str(images), "--out", str(out), "--group", "test_colour/rgb",
            "--group", "test_spots/rgb", "--missing-image", "zeros", "--no-progress"]
    for shard in ("0/2", "1/2"):  # extraction, in two shards
        assert features_main([*argv, "--shard", shard]) == 0
    planned = capsys.readouterr().out
    assert "test_colour/rgb" in planned and "test_spots/rgb" in planned  # the plan names them
    merge_caches(sorted(tmp_path.glob("c.shard*.h5")), out)  # merge
    cache = FeatureCache(out)  # the cache
    assert cache.groups() == ["test_colour/rgb", "test_spots/rgb"]
    assert cache.provenance("test_colour/rgb")["space"] == "rgb"
    assert cache.rows_kind("test_spots/rgb/mean") == "test_spot"
    assert cache.index_of("test_spots/rgb/mean") == "test_spots/rgb/offsets"
    assert features_main(["info", str(out)]) == 0  # info
    info = capsys.readouterr().out
    assert "/test_colour/rgb" in info and "/test_spots/rgb" in info and info.count("matches its spec") >= 2
    assert "instance space=rgb; made by mean colour" in info
    rows = [cache.row_of(i) for i in IDS]
    visual = VisualBatcher(cache, ["test_colour/rgb/mean", "test_spots/rgb/mean"])(rows)  # the trainer's batcher
    white = np.ones(3)
    left = {i: np.array(colours[i]) / 255 for i in colours}
    expected = [(left[i] * 20 + white * (widths[i] - 20)) / widths[i] for i in IDS[:3]] + [np.zeros(3)]
    np.testing.assert_allclose(visual["test_colour/rgb/mean"].numpy(), np.stack(expected), atol=1e-2)
    assert visual["images/ok"].tolist() == [True, True, True, False]
    spots = visual["test_spots/rgb/mean"].numpy()  # (B, K, 3) padded to the batch's largest count
    assert spots.shape == (4, 2, 3)
    assert visual["test_spots/rgb/mask"].tolist() == [[True, True], [True, False], [True, True], [False, False]]
    np.testing.assert_allclose(spots[0], [left["201"], white], atol=1e-2)  # left half, right half
    np.testing.assert_allclose(spots[1, 0], expected[1], atol=1e-2)  # square: the whole image
    assert not spots[1, 1].any() and not spots[3].any()  # padding and the post without a picture
