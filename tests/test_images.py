"""Every kind of bad image maps to a status; none raises."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mner.features.run.images import apply_missing_policy, crop_box, decode_jpeg, encode_jpeg, load_image


def _rgb(size=(40, 30)):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def write_bad_images(folder) -> dict[str, tuple[str, str | None]]:
    """id -> (expected status, expected note keyword). Used by the extraction tests too."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    _rgb().save(folder / "good.jpg")
    expected["good"] = ("ok", None)
    expected["missing"] = ("missing", None)
    (folder / "garbage.jpg").write_bytes(b"\x00\x01garbage" * 50)
    expected["garbage"] = ("unreadable", None)
    data = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expected["truncated"] = ("unreadable", None)
    (folder / "text.jpg").write_text("<html>404 not found</html>")
    expected["text"] = ("unreadable", None)
    _rgb().convert("CMYK").save(folder / "cmyk.jpg")
    expected["cmyk"] = ("ok", "CMYK")
    _rgb().convert("L").save(folder / "gray.jpg")
    expected["gray"] = ("ok", "L")
    rgba = _rgb().convert("RGBA")
    rgba.putalpha(0)
    rgba.save(folder / "rgba.png")
    expected["rgba"] = ("ok", "alpha")
    _rgb().convert("P").save(folder / "palette.png")
    expected["palette"] = ("ok", "palette")
    Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)).save(folder / "deep.png")
    expected["deep"] = ("ok", "I")
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    expected["anim"] = ("ok", "animated")
    Image.new("RGB", (1, 1), "white").save(folder / "pixel.jpg")
    expected["pixel"] = ("ok", "tiny")
    Image.new("1", (9000, 9000)).save(folder / "bomb.png")
    expected["bomb"] = ("unreadable", None)
    _rgb((3000, 100)).save(folder / "huge.jpg")
    expected["huge"] = ("ok", "huge")
    _rgb().save(folder / "noext", format="JPEG")
    expected["noext"] = ("ok", None)
    return expected


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
