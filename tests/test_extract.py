"""mner-features extract: statuses, prompt maths, zero detections, policies, adding groups (tiny models)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers.data import datasets_of, write_bad_images, write_dataset

from mner.features.cli import main
from mner.pipeline.cache import STATUS_NAMES, FeatureCache

FAST = ["--random-init", "--detector", "maskrcnn-test", "--score-threshold", "0", "--top-k", "3",
        "--detector-min-size", "64", "--clip-model", "clip-test", "--chunk-size", "4", "--batch-size", "4",
        "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expected = write_bad_images(root / "images")
    data = write_dataset(root / "data", sorted(expected))
    return root, data, expected


def extract(corpus, out, *extra) -> int:
    root, data, _ = corpus
    return main(["extract", "--data", str(data), "--images", str(root / "images"), "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def base_cache(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "base.h5"
    assert extract(corpus, out, "--encoder", "clip", "--prompts", "vcrmner", "--prompts", "promptmner_task") == 0
    return out


def test_statuses_shapes_offsets(base_cache, corpus):
    _, _, expected = corpus
    cache = FeatureCache(base_cache)
    for image_id, (status, _) in expected.items():
        row = cache.row_of(image_id)
        want = "ok" if status == "ok" else "placeholder"
        assert STATUS_NAMES[cache.status[row]] == want, image_id
        assert (cache.detail(row) == "") == (want == "ok")
    assert not Path(f"{base_cache}.parts").exists()
    with h5py.File(base_cache, "r") as handle:
        n, m = len(expected), int(handle["objects/offsets"][-1])
        assert handle["objects/offsets"].shape == (n + 1,) and m == 3 * n  # threshold 0: top-3 everywhere
        assert handle["objects/boxes"].shape == (m, 4) and handle["objects/boxes"].dtype == np.float32
        assert handle["objects/crop_jpeg_offsets"].shape == (m + 1,)
        assert handle["encoders/clip/image_embed"].shape == (n, 64)  # clip-test: 64-d, ViT-B-32's 7x7 patches
        assert handle["encoders/clip/patch_tokens"].shape == (n, 49, 64)
        assert handle["encoders/clip/crop_embed"].shape == (m, 64)
        assert handle["encoders/clip/crop_embed"].dtype == np.float16
        assert handle["prompts/vcrmner/prompt_embed"].shape == (40, 64)
        assert handle["prompts/vcrmner/crop_weights"].shape == (m, 4)
        assert handle["prompts/promptmner_task/image_relevance"].shape == (n, 3)
        # huge image: boxes are in original pixels (3000 wide), beyond the 2048 the model saw
        lo, hi = handle["objects/offsets"][cache.row_of("huge"): cache.row_of("huge") + 2]
        assert handle["objects/boxes"][lo:hi, 2].max() <= 3000 + 1e-3
    assert cache.provenance("objects")["pretrained"] == "random"
    assert cache.provenance("objects")["crops"] == {"format": "JPEG", "max_side": 384, "quality": 90}


def test_placeholder_rows_share_features(base_cache, corpus):
    cache = FeatureCache(base_cache)
    rows = [cache.row_of(i) for i in ("missing", "garbage", "bomb")]
    first = cache.read("encoders/clip/image_embed", rows[0])
    for row in rows[1:]:
        np.testing.assert_array_equal(cache.read("encoders/clip/image_embed", row), first)
        np.testing.assert_array_equal(cache.read("encoders/clip/crop_embed", row),
                                      cache.read("encoders/clip/crop_embed", rows[0]))
    assert not np.array_equal(first, cache.read("encoders/clip/image_embed", cache.row_of("good")))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("prompt_set", ["vcrmner", "promptmner_task"])
def test_prompt_values_match_direct_computation(base_cache, prompt_set):
    with h5py.File(base_cache, "r") as handle:
        group = handle[f"prompts/{prompt_set}"]
        scale = float(handle["encoders/clip"].attrs["logit_scale"])
        prompts = group["prompt_embed"][()].astype(np.float64)
        category = group["prompt_category"][()]
        image_embed = handle["encoders/clip/image_embed"][()].astype(np.float64)
        crop_embed = handle["encoders/clip/crop_embed"][()].astype(np.float64)
        centroids = np.stack([prompts[category == j].mean(0) for j in range(category.max() + 1)])
        np.testing.assert_allclose(group["centroids"][()], centroids, rtol=1e-5, atol=1e-6)
        weights = _softmax(scale * _unit(crop_embed) @ _unit(centroids).T)
        np.testing.assert_allclose(group["crop_weights"][()].astype(np.float64), weights, atol=2e-3)
        relevance = _softmax(scale * _unit(image_embed) @ _unit(prompts).T)
        np.testing.assert_allclose(group["image_relevance"][()].astype(np.float64), relevance, atol=2e-3)
        assert np.allclose(group["crop_weights"][()].astype(np.float64).sum(1), 1, atol=1e-2)
        texts = FeatureCache(base_cache).read_global(f"prompts/{prompt_set}/prompt_text")
    if prompt_set == "vcrmner":
        assert texts[0] == "a photo of a person" and len(texts) == 40
    else:
        assert texts == ["an image of person", "an image of location", "an image of organization"]


def test_adding_groups_keeps_existing_bytes(base_cache, corpus, tmp_path):
    out = tmp_path / "grow.h5"
    shutil.copyfile(base_cache, out)
    before = {g: datasets_of(out, g) for g in ("images", "posts", "objects", "encoders/clip", "prompts/vcrmner")}
    assert extract(corpus, out, "--encoder", "clip", "--encoder", "swin-test",
                   "--prompts", "vcrmner", "--prompts", "promptmner_kb") == 0
    for group, content in before.items():
        assert datasets_of(out, group) == content, group
    cache = FeatureCache(out)
    assert cache.row_shape("encoders/swin-test/grid") == (12, 12, 256)
    assert cache.row_shape("prompts/promptmner_kb/image_relevance") == (30,)


def test_zero_detections_are_ordinary_rows(corpus, tmp_path):
    out = tmp_path / "none.h5"
    assert extract(corpus, out, "--score-threshold", "1.01", "--encoder", "clip", "--prompts", "vcrmner_words") == 0
    with h5py.File(out, "r") as handle:
        assert (handle["objects/offsets"][()] == 0).all()
        assert handle["encoders/clip/crop_embed"].shape == (0, 64)
        assert handle["prompts/vcrmner_words/crop_weights"].shape == (0, 4)
        assert handle["encoders/clip/image_embed"].shape[0] == len(corpus[2])


def test_zeros_policy_and_error_policy(corpus, tmp_path):
    out = tmp_path / "zeros.h5"
    assert extract(corpus, out, "--missing-image", "zeros", "--encoder", "clip") == 0
    cache = FeatureCache(out)
    for image_id, (status, _) in corpus[2].items():
        row = cache.row_of(image_id)
        assert STATUS_NAMES[cache.status[row]] == status
        if status != "ok":
            assert not cache.read("encoders/clip/image_embed", row).any()
            assert len(cache.read("objects/boxes", row)) == 0
    error_out = tmp_path / "error.h5"
    assert extract(corpus, error_out, "--missing-image", "error", "--encoder", "clip") == 2
    assert not error_out.exists()


def test_bad_names_list_valid_values(corpus, tmp_path, capsys):
    assert extract(corpus, tmp_path / "x.h5", "--encoder", "vgg") == 1
    assert "valid: clip, clip-test, resnet152" in capsys.readouterr().err
    assert extract(corpus, tmp_path / "x.h5", "--prompts", "nope") == 1
    assert "vcrmner_words" in capsys.readouterr().err
    assert extract(corpus, tmp_path / "x.h5", "--encoder", "resnet152-test", "--prompts", "vcrmner") == 1
    assert "--encoder clip" in capsys.readouterr().err
