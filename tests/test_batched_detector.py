"""The batched detector equals the one-image detector, and a result never depends on its batch-mates.

Tolerance (documented in docs/features.md): boxes within 1e-3 pixels, scores within 1e-5 on CPU fp32;
the only difference between the paths is floating-point summation order in batched convolutions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mner.features.producers.detectors import DetectorConfig, ResizeSpec, create_detector

BOX_ATOL, SCORE_ATOL = 1e-3, 1e-5


def _images():
    rng = np.random.default_rng(7)
    sizes = [(160, 120), (160, 120), (150, 113), (120, 160), (160, 120), (90, 200)]  # (width, height)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def detector():
    return create_detector("maskrcnn-test", config=DetectorConfig(score_threshold=0.0, top_k=5, min_size=96))


def _detect_grouped(detector, images, batch_size):
    """As the extraction loop does: group by padded input size, then batches of ``batch_size``."""
    inputs = [detector.resize_spec.resize(image) for image in images]
    groups: dict = {}
    for i, tensor in enumerate(inputs):
        groups.setdefault(detector.batch_key(*tensor.shape[1:]), []).append(i)
    out = {}
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            found = detector.detect_batch(
                [inputs[i] for i in batch], [(images[i].height, images[i].width) for i in batch]
            )
            out.update(zip(batch, found.split()))
    return [out[i] for i in range(len(images))], groups


def test_batched_equals_single_image(detector):
    images = _images()
    single = [detector(image) for image in images]
    batched, groups = _detect_grouped(detector, images, batch_size=4)
    assert max(len(m) for m in groups.values()) >= 3  # the test really batches
    assert len(groups) >= 2  # and really has several padded sizes
    for (b1, s1, c1), (b2, s2, c2) in zip(single, batched):
        assert len(s1) == len(s2) == 5
        np.testing.assert_allclose(b2, b1, atol=BOX_ATOL)
        np.testing.assert_allclose(s2, s1, atol=SCORE_ATOL)
        np.testing.assert_array_equal(c2, c1)


def test_result_independent_of_batch_mates(detector):
    images = _images()
    alone, _ = _detect_grouped(detector, images[:1], batch_size=8)
    with_mates, _ = _detect_grouped(detector, [images[0], images[1], images[4]], batch_size=8)
    np.testing.assert_allclose(with_mates[0][0], alone[0][0], atol=BOX_ATOL)
    np.testing.assert_allclose(with_mates[0][1], alone[0][1], atol=SCORE_ATOL)


def test_mixed_padded_sizes_are_refused(detector):
    small, tall = torch.zeros(3, 96, 128, dtype=torch.uint8), torch.zeros(3, 192, 96, dtype=torch.uint8)
    with pytest.raises(ValueError, match="one padded size"):
        detector.detect_batch([small, tall], [(96, 128), (192, 96)])


def test_zero_detections_and_empty_batch():
    detector = create_detector("fasterrcnn-test", config=DetectorConfig(score_threshold=1.01, min_size=96))
    found = detector.detect_batch(
        [detector.resize_spec.resize(image) for image in _images()[:2]], [(120, 160)] * 2
    )
    assert found.boxes.shape == (0, 4) and list(found.counts) == [0, 0] and len(found.split()) == 2
    empty = detector.detect_batch([], [])
    assert len(empty.counts) == 0 and empty.split() == []


def test_boxes_are_in_the_given_image_pixels(detector):
    image = _images()[0]
    boxes, _, _ = detector(image)
    big = image.resize((640, 480))
    big_boxes, _, _ = detector.detect_batch([detector.resize_spec.resize(big)], [(480, 640)]).split()[0]
    assert (big_boxes[:, 2] <= 640 + 1e-3).all() and big_boxes[
        :, 2
    ].max() > 160  # scaled to the 640x480 frame
    assert boxes.dtype == np.float32


def test_resize_spec_rounding_and_cap():
    assert ResizeSpec(800, 1333).output_size(480, 640) == (800, 1066)  # torchvision floors
    assert ResizeSpec(800, 1333, "round").output_size(480, 640) == (800, 1067)  # detectron2 rounds
    assert ResizeSpec(800, 1333).output_size(400, 1600) == (333, 1333)  # the longer side is capped
