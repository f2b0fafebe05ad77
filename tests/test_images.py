"""Every kind of bad image maps to a status; none raises."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.data import _rgb, write_bad_images

from mner.features.run.images import apply_missing_policy, crop_box, decode_jpeg, encode_jpeg, load_image


def test_every_bad_kind_gets_its_status(tmp_path):
    expected = write_bad_images(tmp_path)
    for image_id, (status, note) in expected.items():
        loaded = load_image(tmp_path, image_id)
        assert loaded.status == status, (image_id, loaded.detail)
        if status == "ok":
            assert loaded.image.mode == "RGB" and loaded.detail == ""
            assert loaded.width > 0 and loaded.height > 0
            if note:
                assert any(note in n for n in loaded.notes), (image_id, loaded.notes)
        else:
            assert loaded.image is None and loaded.detail
    assert "decompression bomb" in load_image(tmp_path, "bomb").detail
    rgba = load_image(tmp_path, "rgba")  # fully transparent -> white background
    assert np.asarray(rgba.image).min() == 255
    huge = load_image(tmp_path, "huge")
    assert max(huge.image.size) == 2048 and huge.scale == pytest.approx(3000 / 2048, rel=1e-3)
    assert (huge.width, huge.height) == (3000, 100)


def test_placeholder_policy_and_crops(tmp_path):
    missing = load_image(tmp_path, "nothing")
    assert apply_missing_policy(missing, "zeros").status == "missing"
    placeholder = apply_missing_policy(missing, "placeholder")
    assert placeholder.status == "placeholder" and placeholder.image.size == (224, 224)
    assert placeholder.detail.startswith("missing:")
    crop = crop_box(_rgb((50, 50)), np.array([10.2, 5.5, 10.3, 5.6]))  # sub-pixel box -> still 1x1
    assert crop.size == (1, 1)
    jpeg = encode_jpeg(_rgb((800, 400)), max_side=384, quality=90)
    assert decode_jpeg(jpeg).size == (384, 192)
