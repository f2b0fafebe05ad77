"""Issue 16, item 5: an extraction's chunks are small caches written by the cache writer (parts), and the
assembly is the merge. Tiny random models, generated images."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers.extract import IDS, extract_tiny, noise_corpus

from mner.features.cli import main
from mner.features.run import extract as extract_module
from mner.features.run.sharding import shard_of
from mner.pipeline.cache import FeatureCache
from mner.pipeline.cache.base import check_version, feature_groups

DETECTOR = "fasterrcnn-test"
RESNET = ["--encoder", "resnet152-test", "--chunk-size", "2"]


@pytest.fixture()
def corpus(tmp_path):
    return tmp_path, *noise_corpus(tmp_path)


def killed_before_assembly(monkeypatch, data, images, out, *extra) -> list[Path]:
    """Run until every part is written, then "kill" the run; the finished parts."""
    monkeypatch.setattr(extract_module.Extraction, "_assemble",
                        lambda self, paths: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert extract_tiny(data, images, out, *extra) != 0
    monkeypatch.undo()
    return sorted(Path(f"{out}.parts").rglob("chunk_*.h5"))


def test_parts_are_caches_with_a_borrowed_index(corpus, monkeypatch):
    """Adding ResNet to a cache with objects: each part is a valid cache holding its images, the new groups
    and the objects' index alone (the crops follow it); the merge of the parts gives the cache's rows."""
    root, data, images = corpus
    out = root / "c.h5"
    assert extract_tiny(data, images, out) == 0
    before = FeatureCache(out)
    kept = before.group_fingerprints()
    parts = killed_before_assembly(monkeypatch, data, images, out, *RESNET)
    assert [p.name for p in parts] == ["chunk_00000.h5", "chunk_00001.h5"]
    objects = f"objects/{DETECTOR}"
    for k, part in enumerate(parts):
        with h5py.File(part, "r") as handle:
            check_version(handle, str(part))
            assert [i.decode() for i in handle["images/ids"][()]] == IDS[2 * k:2 * k + 2]
            assert set(feature_groups(handle)) == {objects, "encoders/resnet/resnet152-test",
                                                   f"crops/{DETECTOR}/resnet/resnet152-test"}
            assert list(handle[objects]) == ["offsets"]  # borrowed: the index alone, no boxes or crops
            assert "posts" not in handle
            counts = [before.count(f"{objects}/offsets", row) for row in (2 * k, 2 * k + 1)]
            assert np.diff(handle[f"{objects}/offsets"][()]).tolist() == counts
    assert extract_tiny(data, images, out, *RESNET) == 0
    after = FeatureCache(out)
    assert not Path(f"{out}.parts").exists()
    assert {name: after.group_fingerprints()[name] for name in kept} == kept  # the cache's groups, byte for byte
    crops = f"crops/{DETECTOR}/resnet/resnet152-test/crop_pooled"
    assert all(len(after.read(crops, row)) == after.count(f"{objects}/offsets", row) for row in range(len(IDS)))


def test_a_part_with_another_borrowed_index_is_refused(corpus, monkeypatch, capsys):
    """A part whose borrowed index is not the cache's (its crops would follow other objects): one line,
    the cache untouched."""
    root, data, images = corpus
    out = root / "c.h5"
    assert extract_tiny(data, images, out) == 0
    before = out.read_bytes()
    parts = killed_before_assembly(monkeypatch, data, images, out, *RESNET)
    with h5py.File(parts[0], "r+") as handle:
        offsets = handle[f"objects/{DETECTOR}/offsets"]
        moved = offsets[()].copy()
        moved[1] = moved[2] - moved[1] if moved[2] != 2 * moved[1] else moved[1] + 1  # same total, other split
        offsets[...] = moved
    capsys.readouterr()
    assert extract_tiny(data, images, out, *RESNET) == 1
    err = capsys.readouterr().err
    assert "follow another" in err and "Traceback" not in err
    assert out.read_bytes() == before


def test_parts_from_other_library_versions_are_refused(corpus, monkeypatch, capsys):
    """A resumed run whose finished parts were computed by another library version: the merge names the
    folder to remove instead of mixing them."""
    root, data, images = corpus
    out = root / "c.h5"
    parts = killed_before_assembly(monkeypatch, data, images, out, "--chunk-size", "2")
    group = "encoders/clip/clip-test"
    with h5py.File(parts[0], "r+") as handle:
        record = json.loads(handle[group].attrs["provenance"])
        record["versions"] = {**record["versions"], "torch": "0.0.1"}
        handle[group].attrs["provenance"] = json.dumps(record)
    capsys.readouterr()
    assert extract_tiny(data, images, out, "--chunk-size", "2") == 1
    err = capsys.readouterr().err
    assert "versions" in err and str(parts[0].parent) in err and not out.exists()


def test_a_shard_without_images_merges_with_the_others(tmp_path):
    """`extract --shard 1/2` over a list whose images all fall in shard 0 writes an empty cache, and the
    merge of both shards equals a one-process extraction."""
    ids = [f"p{i}" for i in range(40) if shard_of(f"p{i}", 2) == 0][:3]
    data, images = noise_corpus(tmp_path, ids)
    shard_paths = []
    for index in (0, 1):
        assert extract_tiny(data, images, tmp_path / "s.h5", "--shard", f"{index}/2") == 0
        shard_paths.append(tmp_path / f"s.shard{index}of2.h5")
    assert FeatureCache(shard_paths[1]).num_images == 0
    assert main(["merge", *map(str, shard_paths), "--out", str(tmp_path / "m.h5")]) == 0
    assert extract_tiny(data, images, tmp_path / "one.h5") == 0
    merged, one = FeatureCache(tmp_path / "m.h5"), FeatureCache(tmp_path / "one.h5")
    assert merged.image_ids == one.image_ids == ids
    for name, fingerprint in one.group_fingerprints().items():
        if name not in ("images", "posts"):
            assert merged.group_fingerprints()[name] == fingerprint, name
