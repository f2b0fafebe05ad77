"""--grounding / --grounding-clip / --captions through `mner-features extract` (main(argv), tiny models).

User-supplied crops and captions go through the same cache checks as every group: status per image,
provenance, resume after an interrupted run, merge of shards; zero crops, missing images, empty captions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from mner.features.cli import main
from mner.features.producers.grounding_files import FileGrounder
from mner.features.run.extract import shard_of
from mner.pipeline.cache import STATUS_NAMES, FeatureCache

IDS = ["100", "101", "102", "103", "104", "105"]  # 105 has no picture in --images
TINY = ["--random-init", "--detector", "fasterrcnn-test", "--score-threshold", "0", "--top-k", "2",
        "--detector-min-size", "64", "--encoder", "resnet152-test", "--chunk-size", "2", "--batch-size", "2",
        "--no-progress"]


def write_corpus(root: Path) -> tuple[Path, Path]:
    images, data = root / "images", root / "data"
    images.mkdir(parents=True)
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id in IDS[:-1]:
        Image.fromarray(rng.integers(0, 255, (48 + int(image_id) % 3 * 8, 64, 3), dtype=np.uint8)).save(
            images / f"{image_id}.jpg")
    posts = [f"IMGID:{i}\nRT\tO\n@John\tB-PER\nSmith\tI-PER\nin\tO\nNew\tB-LOC\nYork\tI-LOC\n" for i in IDS]
    (data / "train.txt").write_text("\n".join(posts[:4]) + "\n")
    (data / "valid.txt").write_text("\n".join(posts[4:]) + "\n")
    (data / "test.txt").write_text(posts[0] + "\n")
    return data, images


def write_user_files(root: Path) -> dict[str, Path]:
    """HVPNeT-style crops + mapping (.pth) and a captions TSV; 105's crops exist although its picture does not."""
    crops = root / "aux" / "crops"
    crops.mkdir(parents=True)
    mapping = {"100.jpg": ["100_0.png", "100_1.png", "100_2.png"], "101.jpg": ["101_0.png"], "102.jpg": [],
               "105.jpg": ["105_0.png", "105_1.png"], "999.jpg": ["100_0.png"]}  # 103, 104: not listed
    rng = np.random.default_rng(1)
    for name in {n for names in mapping.values() for n in names}:
        Image.fromarray(rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)).save(crops / name)
    torch.save(mapping, root / "t15_train_dict.pth")
    captions = root / "captions.tsv"
    captions.write_text("image_id\tcaption\n100\ta man on a stage\n101.jpg\t\n102\ta  dog\n105\ta crowd\n")
    return {"map": root / "t15_train_dict.pth", "crops": crops, "captions": captions}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("gc")
    data, images = write_corpus(root)
    return root, data, images, write_user_files(root)


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    """Caches with objects + a test encoder only (one, and two shards): the user-file runs add to copies of
    them, so only the grounding and captions producers run there."""
    folder = tmp_path_factory.mktemp("base")
    assert run(corpus, folder / "base.h5") == 0
    for index in (0, 1):
        assert run(corpus, folder / "s.h5", "--shard", f"{index}/2") == 0
    return folder


def copy_of(base: Path, name: str, to: Path) -> Path:
    to.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base / name, to / name)
    return to / name


def run(corpus, out, *extra) -> int:
    _, data, images, _ = corpus
    return main(["extract", "--data", str(data), "--images", str(images), "--out", str(out), *TINY, *extra])


def user_flags(corpus) -> list[str]:
    files = corpus[3]
    return ["--grounding", "files", "--grounding-map", str(files["map"]), "--grounding-crops-dir",
            str(files["crops"]), "--captions", str(files["captions"])]


def groups_bytes(path, *groups) -> dict:
    out = {}
    with h5py.File(path, "r") as handle:
        for group in groups:
            def keep(name, obj, group=group):
                if isinstance(obj, h5py.Dataset):
                    out[f"{group}/{name}"] = obj[()].tobytes()

            handle[group].visititems(keep)
    return out


def test_owlv2_blip_random_init_offline_end_to_end(corpus, tmp_path):
    out = tmp_path / "models.h5"
    assert run(corpus, out, "--grounding", "owlv2", "--grounding-clip", "--captions", "blip") == 0
    cache = FeatureCache(out)
    assert {"grounding", "encoders/clip_grounding", "captions"} <= set(cache.groups())
    with h5py.File(out, "r") as handle:
        offsets = handle["grounding/offsets"][()]
        count = int(offsets[-1])
        assert offsets.shape == (len(IDS) + 1,) and (np.diff(offsets) <= 3).all()
        pixels = handle["grounding/pixels"]
        assert pixels.shape == (count, 3, 128, 128) and pixels.dtype == np.uint8
        assert handle["encoders/clip_grounding/states"].shape == (count, 2, 17, 32)
        assert json.loads(handle["encoders/clip_grounding"].attrs["layers"]) == [6, 12]
        missing = cache.row_of("105")
        assert STATUS_NAMES[cache.status[missing]] == "placeholder"
        assert offsets[missing + 1] == offsets[missing]  # no crops from the gray placeholder
        assert handle["grounding/reason"][missing] == 0 and handle["captions/reason"][missing] == 0
    assert cache.read("captions/text", missing) == ""
    for group in ("grounding", "encoders/clip_grounding", "captions"):
        assert cache.provenance(group)["pretrained"] == "random"
    provenance = cache.provenance("grounding")
    assert provenance["preprocessing"]["query_rule"] == "spans" and provenance["thresholds"]["fill"] == "objectness"


def test_user_files_status_provenance_and_zero_crops(corpus, base, tmp_path):
    out = copy_of(base, "base.h5", tmp_path)
    assert run(corpus, out, *user_flags(corpus)) == 0
    cache = FeatureCache(out)
    files = corpus[3]
    with h5py.File(out, "r") as handle:
        counts = np.diff(handle["grounding/offsets"][()])
        reasons = handle["grounding/reason"][()]
        caption_reasons = handle["captions/reason"][()]
    by_id = {i: (int(counts[cache.row_of(i)]), int(reasons[cache.row_of(i)])) for i in IDS}
    # 105's picture is missing but its user crops are kept; 102 lists none; 103/104 are not in the mapping
    assert by_id == {"100": (3, 1), "101": (1, 2), "102": (0, 2), "103": (0, 3), "104": (0, 3), "105": (2, 2)}
    assert STATUS_NAMES[cache.status[cache.row_of("105")]] == "placeholder"
    first = np.asarray(Image.open(files["crops"] / "105_0.png").resize((128, 128), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(cache.read("grounding/pixels", cache.row_of("105"))[0], first.transpose(2, 0, 1))
    captions = {i: cache.read("captions/text", cache.row_of(i)) for i in IDS}
    assert captions == {"100": "a man on a stage", "101": "", "102": "a dog", "103": "", "104": "", "105": "a crowd"}
    assert [int(caption_reasons[cache.row_of(i)]) for i in IDS] == [1, 2, 1, 3, 3, 1]
    grounding, caption = cache.provenance("grounding"), cache.provenance("captions")
    assert grounding["pretrained"].startswith("sha256:") and grounding["grounding"] == "files"
    assert grounding["preprocessing"]["unmatched_entries"] == 1
    assert caption["pretrained"].startswith("sha256:") and caption["preprocessing"]["images_without_caption"] == 2


def test_user_files_resume_after_an_interrupted_run(corpus, base, tmp_path, monkeypatch):
    reference = copy_of(base, "base.h5", tmp_path / "reference")
    assert run(corpus, reference, *user_flags(corpus)) == 0
    out = copy_of(base, "base.h5", tmp_path / "interrupted")
    before = groups_bytes(out, "images", "objects/fasterrcnn-test")
    calls = {"n": 0}
    original = FileGrounder.__call__

    def crash_on_second_chunk(self, items):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")  # the run dies between two finished chunks
        return original(self, items)

    monkeypatch.setattr(FileGrounder, "__call__", crash_on_second_chunk)
    assert run(corpus, out, *user_flags(corpus)) == 1
    assert groups_bytes(out, "images", "objects/fasterrcnn-test") == before
    assert "grounding" not in FeatureCache(out).groups()
    assert any(Path(f"{out}.parts").rglob("chunk_*.h5"))
    calls["n"] = 10  # no more crashes; count the chunks the resumed run computes
    assert run(corpus, out, *user_flags(corpus)) == 0
    assert calls["n"] == 10 + 2  # three chunks of two images: the first was kept
    groups = ("grounding", "captions", "images")
    assert groups_bytes(out, *groups) == groups_bytes(reference, *groups)
    assert not Path(f"{out}.parts").exists()


def test_user_files_shards_merge_equals_single_run(corpus, base, tmp_path):
    assert {shard_of(i, 2) for i in IDS} == {0, 1}
    single = copy_of(base, "base.h5", tmp_path)
    assert run(corpus, single, *user_flags(corpus)) == 0
    out = tmp_path / "s.h5"
    for index in (0, 1):
        copy_of(base, f"s.shard{index}of2.h5", tmp_path)
        assert run(corpus, out, *user_flags(corpus), "--shard", f"{index}/2") == 0
    merged = tmp_path / "merged.h5"
    assert main(["merge", str(tmp_path / "s.shard0of2.h5"), str(tmp_path / "s.shard1of2.h5"),
                 "--out", str(merged)]) == 0
    groups = ("grounding", "captions")
    assert groups_bytes(merged, *groups) == groups_bytes(single, *groups)


def test_clip_states_added_later_equal_one_run(corpus, base, tmp_path):
    once = copy_of(base, "base.h5", tmp_path / "once")
    assert run(corpus, once, *user_flags(corpus)[:6], "--grounding-clip") == 0
    grown = copy_of(base, "base.h5", tmp_path / "grown")
    assert run(corpus, grown, *user_flags(corpus)[:6]) == 0
    before = groups_bytes(grown, "grounding", "objects/fasterrcnn-test")
    assert run(corpus, grown, "--grounding-clip") == 0  # the crops come from the cache
    assert groups_bytes(grown, "grounding", "objects/fasterrcnn-test") == before
    a, b = groups_bytes(grown, "encoders/clip_grounding"), groups_bytes(once, "encoders/clip_grounding")
    assert a.keys() == b.keys()
    key = "encoders/clip_grounding/states"
    np.testing.assert_allclose(np.frombuffer(a[key], np.float16).astype(np.float32),
                               np.frombuffer(b[key], np.float16).astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("content, where", [
    ("100\ta man\n101 no tab\n", ":2: no tab"),
    ("100\ta\n100\tb\n", ":2: image 100 already has another caption"),
])
def test_malformed_captions_fail_with_file_and_line(corpus, tmp_path, capsys, content, where):
    bad = tmp_path / "bad.tsv"
    bad.write_text(content)
    out = tmp_path / "bad.h5"
    assert run(corpus, out, "--captions", str(bad)) == 1
    err = capsys.readouterr().err
    assert f"{bad}{where}" in err and "Traceback" not in err
    assert not out.exists() and not Path(f"{out}.parts").exists()


def test_bad_grounding_options_list_valid_values(corpus, tmp_path, capsys):
    out = tmp_path / "x.h5"
    assert run(corpus, out, "--grounding", "glip") == 1
    assert "valid: owlv2, detector, files" in capsys.readouterr().err
    assert run(corpus, out, "--grounding", "owlv2", "--grounding-fill", "all") == 1
    assert "valid: objectness, none" in capsys.readouterr().err
    assert run(corpus, out, "--grounding", "files") == 1
    assert "--grounding-map" in capsys.readouterr().err
    assert run(corpus, out, "--grounding-clip") == 1
    assert "--grounding-clip encodes grounding crops: add --grounding" in capsys.readouterr().err
    assert run(corpus, out, "--grounding", "owlv2", "--grounding-clip", "--grounding-clip-layers", "6,x") == 1
    assert "expected comma-separated integers" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('{"100.jpg": "100_0.png"}')
    assert run(corpus, out, "--grounding", "files", "--grounding-map", str(broken)) == 1
    assert f"{broken}: entry '100.jpg': value must be a list" in capsys.readouterr().err
    assert not out.exists() and not Path(f"{out}.parts").exists()


def test_zero_crops_and_detector_crops_through_the_batcher(corpus, base, tmp_path):
    from mner.trainer.inputs.visual import VisualBatcher

    none = copy_of(base, "base.h5", tmp_path / "none")
    assert run(corpus, none, "--grounding", "owlv2", "--grounding-threshold", "1", "--grounding-fill", "none",
               "--grounding-clip") == 0
    cache = FeatureCache(none)
    with h5py.File(none, "r") as handle:
        assert not handle["grounding/offsets"][()].any() and handle["grounding/pixels"].shape == (0, 3, 128, 128)
        assert handle["encoders/clip_grounding/states"].shape == (0, 2, 17, 32)
        assert set(handle["grounding/reason"][()]) == {0, 2}  # no_image (105) and few_found
    visual = VisualBatcher(cache, ["grounding/pixels", "encoders/clip_grounding/states"])([0, 1, 5, None])
    assert visual["grounding/pixels"].shape == (4, 1, 3, 128, 128) and not visual["grounding/mask"].any()

    detector = copy_of(base, "base.h5", tmp_path / "detector")
    assert run(corpus, detector, "--grounding", "detector") == 0
    cache = FeatureCache(detector)
    row = cache.row_of("100")
    boxes, scores = cache.read("objects/fasterrcnn-test/boxes", row), cache.read("objects/fasterrcnn-test/scores", row)
    np.testing.assert_allclose(cache.read("grounding/boxes", row), boxes[np.argsort(-scores, kind="stable")][:3],
                               atol=1e-3)
    assert cache.read("grounding/source", row).tolist() == [2] * len(boxes)
    visual = VisualBatcher(cache, ["grounding/pixels"])([row, cache.row_of("105")])
    assert visual["grounding/pixels"].dtype == torch.uint8
    assert visual["grounding/mask"].sum(1).tolist() == [len(boxes), 0]
