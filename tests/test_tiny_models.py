"""Every registered tiny test variant builds offline, is recorded as random and keeps the real layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mner.features.producers.detectors import DETECTORS, DetectorConfig, create_detector
from mner.features.producers.encoders import ENCODERS, EncoderConfig, create_encoder

TINY_DETECTORS = sorted(name for name in DETECTORS if name.endswith("-test"))
TINY_ENCODERS = sorted(name for name in ENCODERS if name.endswith("-test"))
EXPECTED_ENCODER_SHAPES = {
    "clip-test": ({"image_embed": (64,), "patch_tokens": (49, 64)}, {"crop_embed": (64,)}),
    "resnet152-test": ({"grid": (7, 7, 2048)}, {"crop_pooled": (2048,)}),
    "swin-test": ({"grid": (12, 12, 256)}, {}),
}


def _image(seed: int, size=(160, 120)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_tiny_variants_are_registered():
    assert {"fasterrcnn-test", "maskrcnn-test"} <= set(TINY_DETECTORS)
    assert set(EXPECTED_ENCODER_SHAPES) == set(TINY_ENCODERS)


@pytest.mark.parametrize("name", TINY_DETECTORS)
def test_tiny_detector(name):
    config = DetectorConfig(score_threshold=0.0, top_k=4, min_size=96)
    detector = create_detector(name, config=config)  # no --random-init: test variants are random anyway
    assert detector.provenance_fields()["pretrained"] == "random"
    assert len(detector.class_names) == 91
    boxes, scores, class_ids = detector(_image(0))
    assert (
        boxes.shape == (4, 4)
        and boxes.dtype == np.float32
        and scores.shape == (4,)
        and class_ids.shape == (4,)
    )
    assert (
        (np.diff(scores) <= 0).all()
        and (boxes[:, 2] <= 160 + 1e-3).all()
        and (boxes[:, 3] <= 120 + 1e-3).all()
    )
    again = create_detector(name, config=config)(_image(0))  # weights are a function of the name
    np.testing.assert_array_equal(again[0], boxes)
    none = create_detector(name, config=DetectorConfig(score_threshold=1.01, min_size=96))(_image(1))
    assert none[0].shape == (0, 4) and none[1].shape == (0,)
    assert (
        getattr(detector.model.roi_heads, "mask_head", None) is None
    )  # masks are never stored: no mask head


@pytest.mark.parametrize("name", TINY_ENCODERS)
def test_tiny_encoder(name):
    encoder = create_encoder(name, config=EncoderConfig())
    image_shapes, crop_shapes = EXPECTED_ENCODER_SHAPES[name]
    assert encoder.provenance_fields()["pretrained"] == "random"
    assert encoder.image_datasets == image_shapes and encoder.crop_datasets == crop_shapes
    arrays = encoder.encode_images([_image(0), _image(1, (90, 200))])
    assert {k: v.shape[1:] for k, v in arrays.items()} == image_shapes and all(
        len(v) == 2 for v in arrays.values()
    )
    assert all(np.isfinite(v).all() for v in arrays.values())
    if crop_shapes:
        crops = encoder.encode_crops([_image(2, (30, 50))])
        assert {k: v.shape[1:] for k, v in crops.items()} == crop_shapes
    again = create_encoder(name, config=EncoderConfig()).encode_images([_image(0)])  # batch of 1, not 2
    for key, values in again.items():
        np.testing.assert_allclose(values[0], arrays[key][0], rtol=1e-4, atol=1e-5)


def test_clip_test_is_also_a_clip_model_name():
    """``--encoder clip --clip-model clip-test`` fills an ``encoders/clip/clip-test`` instance the trainer reads."""
    via_model = create_encoder("clip", config=EncoderConfig(clip_model="clip-test"))
    assert via_model.name == "clip" and via_model.pretrained() == "random"
    text = via_model.encode_text(["a photo of a person", "a photo of a city"])
    assert text.shape == (2, 64) and via_model.logit_scale > 1
    np.testing.assert_array_equal(
        via_model.encode_images([_image(3)])["image_embed"],
        create_encoder("clip-test", config=EncoderConfig()).encode_images([_image(3)])["image_embed"],
    )
