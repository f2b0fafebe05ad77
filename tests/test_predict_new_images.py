"""Tagging posts whose images were never extracted: stage 1 from the cache's own record, side caches, grown caches.

One tiny stage 1 (random-init Faster R-CNN test variant, tiny CLIP, VCRMNER prompts) over the bundled
sample's images, one vcrmner run on it with a tiny BERT; then new posts with new images.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from experiment_helpers import SAMPLE, sample_image_ids
from helpers.extract import all_datasets as datasets
from helpers.extract import by_image

from mner.features.cli import main as features_main
from mner.pipeline.cache import FeatureCache
from mner.trainer.cli import main as train_main

pytestmark = pytest.mark.slow  # stage 1 + a vcrmner run on the bundled sample (about a minute in all)

REPO = Path(__file__).resolve().parent.parent
STAGE1 = ["--random-init", "--detector", "fasterrcnn-test", "--detector-min-size", "64", "--score-threshold", "0",
          "--top-k", "3", "--encoder", "clip", "--clip-model", "clip-test", "--prompts", "vcrmner", "--no-progress",
          "--num-workers", "0"]
# new posts: new images of each kind (1 person, 2 place, 0 plain), a missing file (8), an unreadable one (9),
# and one image the training cache already holds
NEW_POSTS = [("10950", "Jordan B-PER|scores O|again O"), ("20950", "Sunny O|day O|in O|Austin B-LOC"),
             ("00950", "Apple B-ORG|shares O|fall O"), ("80950", "Where O|is O|Kim B-PER|?"),
             ("90950", "Denver B-LOC|tonight O"), ("10201", "Phoenix B-PER|again O")]


def load_make_images():
    spec = importlib.util.spec_from_file_location("make_images", REPO / "sample" / "make_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_posts(path: Path, posts) -> Path:
    lines = []
    for image_id, words in posts:
        lines.append(f"IMGID:{image_id}")
        lines += [w.replace(" ", "\t") if " " in w else f"{w}\tO" for w in words.split("|")]
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("new-images")
    make_images = load_make_images()
    ids = sample_image_ids() + [image_id for image_id, _ in NEW_POSTS]
    make_images.generate_sample_images(root / "images", {i: make_images.image_kind(i) for i in ids})
    cache = root / "train.h5"
    assert features_main(["extract", "--data", str(SAMPLE), "--images", str(root / "images"), "--out", str(cache),
                          *STAGE1]) == 0
    run = root / "run"
    assert train_main(["--features", str(cache), "--model", "vcrmner", "--text-encoder", str(tiny_bert),
                       "--epochs", "1", "--batch-size", "16", "--max-length", "32", "--device", "cpu", "--seed", "1",
                       "--set", "num_heads=2", "--set", "num_blocks=1", "--set", "stage1_mismatch=warn",
                       "--out", str(run)]) == 0
    posts = write_posts(root / "new.txt", NEW_POSTS)
    return root, cache, run, posts


def sample_plus(folder: Path, posts: Path) -> Path:
    """The bundled sample with the posts of new images appended to its test split."""
    folder.mkdir()
    for split in SAMPLE.glob("*.txt"):
        shutil.copy(split, folder / split.name)
    new = write_posts(folder / "new.txt.part", NEW_POSTS[:5]).read_text()
    (folder / "new.txt.part").unlink()
    test = folder / "test.txt"
    test.write_text(test.read_text().rstrip("\n") + "\n\n" + new, encoding="utf-8")
    return folder


def predictions(path: Path) -> list[list[str]]:
    return [[line.split("\t")[-1] for line in block.splitlines() if "\t" in line]
            for block in path.read_text().split("\n\n") if block.strip()]


@pytest.fixture(scope="module")
def grown(trained):
    """The training cache grown by hand: `mner-features extract` with the sample plus the new posts."""
    root, cache, _, posts = trained
    grown = root / "grown.h5"
    shutil.copy(cache, grown)
    everything = sample_plus(root / "everything", posts)
    assert features_main(["extract", "--data", str(everything), "--images", str(root / "images"),
                          "--out", str(grown), *STAGE1]) == 0
    return grown, everything


def test_predict_on_new_images_equals_growing_the_cache_by_hand(trained, grown, tmp_path):
    root, _, run, posts = trained
    grown, _ = grown
    side = tmp_path / "side.h5"
    out = tmp_path / "tagged.conll"
    assert train_main(["predict", str(run), "--data", str(posts), "--images", str(root / "images"),
                       "--side-cache", str(side), "--out", str(out), "--device", "cpu"]) == 0
    record = json.loads((tmp_path / "tagged.conll.json").read_text())
    assert record["extracted_images"] == 5 and record["side_cache"] == str(side)  # only the 5 new ids
    assert record["image_status"] == {"ok": 4, "missing": 1, "unreadable": 1}
    assert sorted(FeatureCache(side).image_ids) == sorted(i for i, _ in NEW_POSTS[:5])
    # only what vcrmner reads (and what that is computed from): not the whole-image CLIP or its prompt relevance
    reads = ["objects/fasterrcnn-test", "crops/fasterrcnn-test/clip/clip-test",
             "crops/fasterrcnn-test/prompts/clip-test/vcrmner"]
    assert sorted(record["side_cache_groups"]) == sorted(reads)
    assert sorted(set(FeatureCache(side).groups()) - {"images", "posts"}) == sorted(reads)
    assert {"encoders/clip/clip-test", "prompts/clip-test/vcrmner"} <= set(FeatureCache(trained[1]).groups())
    assert "rebuilt from the record of" in FeatureCache(side).provenance(reads[0])["command"][-1]
    assert all(len(line.split("\t")) == 3 for line in out.read_text().splitlines() if "\t" in line)  # token gold pred

    # by hand: a copy of the training cache grown with the new posts, same stage-1 flags, then predict from it
    by_hand = tmp_path / "by_hand.conll"
    assert train_main(["predict", str(run), "--data", str(posts), "--features", str(grown), "--out", str(by_hand),
                       "--device", "cpu"]) == 0
    assert predictions(out) == predictions(by_hand)
    hand_record = json.loads((tmp_path / "by_hand.conll.json").read_text())  # a superset, not "another cache"
    assert "holds the run's 60 images with unchanged rows" in hand_record["cache"]["grown_from"]["note"]
    assert not [w for w in hand_record["warnings"] if "changed" in w or "not the one" in w]
    assert sum(tag != "O" for post in predictions(out) for tag in post) > 0  # the comparison sees entities
    side_cache, grown_cache = FeatureCache(side), FeatureCache(grown)
    for image_id in side_cache.image_ids:  # the side cache's rows are the grown cache's, value for value
        for path in ("crops/fasterrcnn-test/clip/clip-test/crop_embed",
                     "crops/fasterrcnn-test/prompts/clip-test/vcrmner/crop_weights", "objects/fasterrcnn-test/boxes"):
            assert np.array_equal(side_cache.read(path, side_cache.row_of(image_id)),
                                  grown_cache.read(path, grown_cache.row_of(image_id))), (image_id, path)

    # the next call reuses the side cache: nothing extracted
    again = tmp_path / "again.jsonl"
    assert train_main(["predict", str(run), "--data", str(posts), "--images", str(root / "images"),
                       "--side-cache", str(side), "--out", str(again), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "again.jsonl.json").read_text())["extracted_images"] == 0
    lines = [json.loads(line) for line in again.read_text().splitlines()]
    assert [line["tags"] for line in lines] == predictions(out)


def test_grown_cache_equals_a_cache_built_in_one_go(trained, grown, tmp_path):
    root, cache, _, _ = trained
    grown, everything = grown
    one_go = tmp_path / "one_go.h5"
    assert features_main(["extract", "--data", str(everything), "--images", str(root / "images"),
                          "--out", str(one_go), *STAGE1]) == 0
    a, b = FeatureCache(grown), FeatureCache(one_go)
    assert a.image_ids == b.image_ids and len(a.image_ids) == len(FeatureCache(cache).image_ids) + 5
    assert by_image(grown) == by_image(one_go)
    for group in a.groups():
        if group in ("images", "posts"):
            for key, value in datasets(one_go).items():
                if key.startswith("posts/"):
                    assert np.array_equal(datasets(grown)[key], value), key  # the posts are the new data's
            continue
        for name, value in datasets(one_go).items():  # globals (prompt embeddings) too
            if name.startswith(group + "/") and a.rows_kind(name) == "global":
                assert np.array_equal(datasets(grown)[name], value), name
        pa, pb = a.provenance(group), b.provenance(group)
        differ = {k for k in set(pa) | set(pb) if pa.get(k) != pb.get(k)}
        assert differ <= {"created", "command", "cwd", "image_list_hash", "grown"}, (group, differ)
        assert pa["grown"][0]["added"] == 5


def test_prediction_refuses_a_cache_whose_weights_have_another_hash(trained, tmp_path, capsys):
    root, cache, run, posts = trained
    weights = tmp_path / "detector.pth"
    weights.write_bytes(b"not the weights the cache was made with")
    patched = tmp_path / "patched.h5"
    shutil.copy(cache, patched)
    with h5py.File(patched, "r+") as handle:  # the record names a local detector file with another hash
        record = json.loads(handle["objects/fasterrcnn-test"].attrs["provenance"])
        record["pretrained"] = "sha256:" + "ab" * 32
        record["command"] += ["--detector-weights", str(weights)]
        handle["objects/fasterrcnn-test"].attrs["provenance"] = json.dumps(record)
    code = train_main(["predict", str(run), "--data", str(posts), "--images", str(root / "images"),
                       "--features", str(patched), "--side-cache", str(tmp_path / "side.h5"),
                       "--out", str(tmp_path / "x.conll"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and str(weights) in err and "ab" * 32 in err
    assert __import__("hashlib").sha256(weights.read_bytes()).hexdigest() in err
    assert not (tmp_path / "side.h5").exists() and not (tmp_path / "x.conll").exists()
    weights.unlink()  # gone: named, with the flag that points at a local copy
    code = train_main(["predict", str(run), "--data", str(posts), "--images", str(root / "images"),
                       "--features", str(patched), "--side-cache", str(tmp_path / "side.h5"),
                       "--out", str(tmp_path / "x.conll"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "--detector-weights" in err and "not here" in err


def test_tagging_cached_images_never_imports_stage_1(trained):
    _, _, run, _ = trained
    script = (f"import sys; import mner; tagger = mner.Tagger.from_run({str(run)!r}, device='cpu'); "
              "tagger(['Phoenix again'], images=[None]); "
              "print(sorted(m for m in sys.modules if m.startswith('mner.features')))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_resume_accepts_a_grown_cache_but_not_changed_rows():
    from mner.trainer.core.run_folder import resume_differences

    def config(fingerprint, rows):
        return {"model_config": {}, "train_config": {}, "model": "m", "labels": ["O"], "data": {"hash": "h"},
                "features": {"fingerprint": fingerprint, "image_fingerprints": {"paths": ["a"], "rows": rows}}}

    assert resume_differences(config("f1", {"1": "aa"}), config("f2", {"1": "aa"})) == []
    assert resume_differences(config("f1", {"1": "aa"}), config("f2", {"1": "ab"})) != []
