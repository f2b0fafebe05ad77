"""``mner-features extract --import-objects NAME=FILE``: a user's own candidate boxes (JSON or NPZ) become the
``objects/NAME`` instance. Checks that GMNER's ``CandidateSource`` reads exactly the file's boxes (sorted by
score) for ok images and none for a missing one, that crops were cut so an encoder ran on them, that the
file's sha256 is in provenance, and that a changed file is refused over the kept instance."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.gmner import write_gmner_dataset


def extract(data, images, out, *imports):
    from mner.features.cli import main as features_main

    argv = ["extract", "--data", str(data), "--images", str(images), "--out", str(out), "--random-init",
            "--encoder", "clip", "--clip-model", "clip-test", "--device", "cpu", "--no-progress", "--num-workers", "0"]
    for value in imports:
        argv += ["--import-objects", value]
    return features_main(argv)


def test_imported_boxes_become_an_objects_instance(tmp_path, capsys):
    from mner.features.producers.imported_objects import _file_sha256
    from mner.pipeline.cache import FeatureCache
    from mner.trainer.gmner.candidates import CandidateSource

    data, images, xml, cache_path = tmp_path / "data", tmp_path / "images", tmp_path / "xml", tmp_path / "c.h5"
    write_gmner_dataset(data, images, xml, posts={"train": 3, "dev": 2, "test": 2})
    ids = sorted(p.stem for p in images.glob("*.jpg"))
    missing = ids[0]
    (images / f"{missing}.jpg").unlink()  # not ok: no candidates whatever the file says
    boxes = {i: [[1, 2, 30, 40], [10, 10, 50, 60]] for i in ids}
    scores = {i: [0.2, 0.9] for i in ids}
    json_file = tmp_path / "vinvl.json"
    json_file.write_text(json.dumps({**{i: {"boxes": boxes[i], "scores": scores[i], "class_names": ["dog", "man"]}
                                        for i in ids}, "not-an-image": {"boxes": [], "scores": []}}))
    npz_file = tmp_path / "mine.npz"
    np.savez(npz_file, **{f"{i}/{k}": np.asarray(v) for i in ids
                          for k, v in (("boxes", boxes[i][:1]), ("scores", scores[i][:1]),
                                       ("features", np.ones((1, 3))))})

    assert extract(data, images, cache_path, f"vinvl={json_file}", f"mine={npz_file}") in (0, None)
    cache = FeatureCache(cache_path)
    assert {"objects/vinvl", "objects/mine", "crops/vinvl/clip/clip-test", "crops/mine/clip/clip-test"} <= \
        set(cache.groups())
    assert "objects/maskrcnn" not in set(cache.groups())  # an import alone runs no detector
    made = cache.provenance("objects/vinvl")["imported_from"]
    assert made["sha256"] == _file_sha256(json_file) and made["unknown_ids"] == 1
    assert "not stored" in cache.provenance("objects/mine")["imported_from"]["features"]

    source = CandidateSource(cache, instance="objects/vinvl")  # as --set gmner_objects=objects/vinvl
    assert source.feature_path == "crops/vinvl/clip/clip-test/crop_embed"
    assert len(source.post_candidates(missing).boxes) == 0
    found = source.post_candidates(ids[1])
    np.testing.assert_allclose(found.boxes, [[10, 10, 50, 60], [1, 2, 30, 40]])  # descending score
    np.testing.assert_allclose(found.scores, [0.9, 0.2])
    assert found.features.shape == (2, cache.row_shape(source.feature_path)[-1])
    assert np.abs(found.features).sum() > 0  # the encoder ran on the cut crops
    row = cache.row_of(ids[1])
    names = cache.feature_spec(["objects/vinvl/class_ids"]).attrs["objects/vinvl"]["class_names"]
    names = json.loads(names) if isinstance(names, str) else names
    assert [names[c] for c in cache.read("objects/vinvl/class_ids", row)] \
        == ["man", "dog"]
    mine = CandidateSource(cache, instance="objects/mine").post_candidates(ids[2])
    np.testing.assert_allclose(mine.boxes, [[1, 2, 30, 40]])
    with pytest.raises(Exception, match="gmner_objects"):
        CandidateSource(cache)  # two instances: the choice is the user's

    json_file.write_text(json.dumps({ids[1]: {"boxes": [[0, 0, 5, 5]], "scores": [1.0]}}))
    capsys.readouterr()
    assert extract(data, images, cache_path, f"vinvl={json_file}") == 1  # changed file over the kept instance
    assert "made from the file with sha256:" in capsys.readouterr().err
