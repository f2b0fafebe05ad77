"""Adding a feature group is a spec and a producer (docs/architecture.md, "How to add a feature group"): a
throwaway group declared and registered here, in the test, goes through extract (two shards), the cache,
merge, ``mner-features info`` and the trainer's batcher with no other file changed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mner.features.cli import main as features_main
from mner.features.producers.registry import Producer, register_producer, unregister_producer
from mner.pipeline.cache import DatasetSpec, FeatureCache, GroupSpec, merge_caches, register_group, unregister_group
from mner.trainer.inputs.visual import VisualBatcher

IDS = ["201", "205", "207", "204"]  # 204 has no picture; two shards of two

SPEC = GroupSpec(
    name="test_colour/{space}", option="--group test_colour/{space}", provenance=("space",),
    slot_docs={"space": "the colour space of the means (rgb)"}, dims={"C": "channels"},
    doc="Throwaway test group: each image's mean colour.",
    datasets=(DatasetSpec("mean", "image", "float16", ("C",), doc="mean channel value in 0..1"),),
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


@pytest.fixture()
def throwaway():
    register_group(SPEC)
    register_producer(SPEC)(MeanColour)
    yield SPEC
    unregister_producer(SPEC)
    unregister_group(SPEC.name)


def test_a_group_declared_in_a_test_goes_through_every_stage(throwaway, tmp_path, capsys):
    images, data = tmp_path / "images", tmp_path / "data"
    images.mkdir()
    data.mkdir()
    colours = {"201": (255, 0, 0), "205": (0, 255, 0), "207": (0, 0, 255)}
    for image_id, colour in colours.items():
        Image.new("RGB", (40, 30), colour).save(images / f"{image_id}.png")
    posts = [f"IMGID:{i}\nJohn\tB-PER\nin\tO\nParis\tB-LOC\n" for i in IDS]
    (data / "train.txt").write_text("\n".join(posts[:2]) + "\n")
    (data / "valid.txt").write_text("\n".join(posts[2:]) + "\n")
    out = tmp_path / "c.h5"
    argv = ["extract", "--data", str(data), "--images", str(images), "--out", str(out), "--group", "test_colour/rgb",
            "--missing-image", "zeros", "--no-progress"]
    for shard in ("0/2", "1/2"):  # extraction, in two shards
        assert features_main([*argv, "--shard", shard]) == 0
    assert "test_colour/rgb" in capsys.readouterr().out  # the plan names it
    merge_caches(sorted(tmp_path.glob("c.shard*.h5")), out)  # merge
    cache = FeatureCache(out)  # the cache
    assert cache.groups() == ["test_colour/rgb"] and cache.provenance("test_colour/rgb")["space"] == "rgb"
    assert features_main(["info", str(out)]) == 0  # info
    info = capsys.readouterr().out
    assert "/test_colour/rgb" in info and "matches its spec" in info
    assert "instance space=rgb; made by mean colour" in info
    rows = [cache.row_of(i) for i in IDS]
    visual = VisualBatcher(cache, ["test_colour/rgb/mean"])(rows)  # the trainer's batcher
    expected = [np.array(colours[i]) / 255 for i in IDS[:3]] + [np.zeros(3)]
    np.testing.assert_allclose(visual["test_colour/rgb/mean"].numpy(), np.stack(expected), atol=1e-3)
    assert visual["images/ok"].tolist() == [True, True, True, False]
