"""Caption producers (features/producers/captions.py): the user file's format and errors, tiny random BLIP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mner.features.producers.captions import CaptionConfig, create_captioner, read_captions_file
from mner.features.run.images import LoadedImage
from mner.pipeline.data import DataFormatError


def test_jsonl_and_tsv_files(tmp_path):
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text("\n".join([json.dumps({"image_id": "100", "caption": "a man  on\ta stage"}),
                                "", json.dumps({"image_id": 200, "caption": ""}),
                                json.dumps({"image_id": "300.jpg", "caption": "a dog", "score": 0.3})]) + "\n")
    parsed = read_captions_file(jsonl)
    assert parsed.format == "jsonl" and parsed.captions["100"] == ("a man on a stage", 1)
    assert parsed.sha256.startswith("sha256:") and len(parsed.sha256) == 71
    tsv = tmp_path / "caps.tsv"
    tsv.write_text("image_id\tcaption\n100\ta man on a stage\n200\t\n300.jpg\ta dog\n")
    captioner = create_captioner(str(tsv), CaptionConfig())
    captioner.bind(["100", "200", "300", "400"])
    rows = captioner([(i, None) for i in ["100", "200", "300", "400"]])
    assert [(r.text, r.reason) for r in rows] == [("a man on a stage", "ok"), ("", "empty"), ("a dog", "ok"),
                                                  ("", "not_in_file")]
    fields = captioner.provenance_fields()
    assert fields["pretrained"] == read_captions_file(tsv).sha256
    assert fields["coverage"]["images_without_caption"] == 1


@pytest.mark.parametrize("name, content, line, problem", [
    ("c.tsv", "100\tok\n200 no tab here\n", 2, "no tab"),
    ("c.tsv", "100\tone\ttwo\n", 1, "more than one tab"),
    ("c.tsv", "100\ta\n \ta caption\n", 2, "empty image id"),
    ("c.tsv", "100\ta\n100\tb\n", 2, "already has another caption on line 1"),
    ("c.jsonl", '{"image_id": "1", "caption": "a"}\n{"image_id": "2", "caption": \n', 2, "invalid JSON"),
    ("c.jsonl", '{"image_id": "1", "text": "a"}\n', 1, 'string "caption"'),
    ("c.jsonl", '["1", "a"]\n', 1, 'string "image_id"'),
])
def test_malformed_caption_lines_fail_with_file_and_line(tmp_path, name, content, line, problem):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataFormatError, match=problem) as error:
        read_captions_file(path)
    assert str(error.value).startswith(f"{path}:{line}: ")


def test_caption_file_errors_without_a_line(tmp_path):
    (tmp_path / "c.csv").write_text("1,a\n")
    with pytest.raises(DataFormatError, match="unknown captions file type"):
        read_captions_file(tmp_path / "c.csv")
    (tmp_path / "c.tsv").write_bytes(b"1\tok\n2\t\xff\xfe\n")
    with pytest.raises(DataFormatError, match=r"c.tsv:2: not UTF-8"):
        read_captions_file(tmp_path / "c.tsv")
    (tmp_path / "other.tsv").write_text("999\ta\n")
    captioner = create_captioner(str(tmp_path / "other.tsv"), CaptionConfig())
    with pytest.raises(ValueError, match="none of its 1 image ids"):
        captioner.bind(["100"])
    with pytest.raises(ValueError, match="valid: blip or a captions file"):
        create_captioner("blib", CaptionConfig())


def test_tiny_random_blip_batches_and_skips_images_that_are_not_ok():
    torch.manual_seed(0)
    captioner = create_captioner("blip", CaptionConfig(random_init=True, batch_size=2, num_beams=1,
                                                       max_new_tokens=5))
    rng = np.random.default_rng(0)
    image = lambda: Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))  # noqa: E731
    items = [("a", LoadedImage("a", "ok", image=image())), ("b", LoadedImage("b", "missing")),
             ("c", LoadedImage("c", "ok", image=image())), ("d", LoadedImage("d", "placeholder", image=image())),
             ("e", LoadedImage("e", "ok", image=image()))]
    rows = captioner(items)
    assert [r.reason for r in rows][1::2] == ["no_image", "no_image"] and rows[1].text == rows[3].text == ""
    for row in rows[::2]:
        assert row.reason == ("ok" if row.text else "empty") and len(row.text.split()) <= 5
    alone = captioner(items[4:])
    assert alone[0].text == rows[4].text  # batch mates do not change a caption
    fields = captioner.provenance_fields()
    assert fields["pretrained"] == "random" and fields["thresholds"]["num_beams"] == 1


def test_blip_from_a_local_folder(tmp_path):
    torch.manual_seed(0)
    tiny = create_captioner("blip", CaptionConfig(random_init=True, num_beams=1, max_new_tokens=4))
    for part in (tiny.model, tiny.tokenizer, tiny.processor):
        part.save_pretrained(tmp_path / "blip")
    loaded = create_captioner("blip", CaptionConfig(model=str(tmp_path / "blip"), num_beams=1, max_new_tokens=4))
    image = LoadedImage("a", "ok", image=Image.new("RGB", (20, 30), (10, 200, 30)))
    assert loaded([("a", image)]) == tiny([("a", image)])
    assert " sha256:" in loaded.provenance_fields()["pretrained"]
