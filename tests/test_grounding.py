"""Grounding producers (features/producers/grounding.py, grounding_clip.py): queries, box choice, user crop files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mner.features.producers.grounding import (
    MAX_CROPS,
    GroundingConfig,
    GroundingInput,
    Owlv2Grounder,
    create_grounder,
    crop_mask,
    greedy_pick,
    image_queries,
    post_queries,
    stack_rows,
)
from mner.features.producers.grounding_files import CropMapping, load_crop_mapping
from mner.features.run.images import LoadedImage
from mner.pipeline.data import DataFormatError


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def loaded(image_id: str, width: int = 80, height: int = 50, scale: float = 1.0) -> LoadedImage:
    return LoadedImage(image_id, "ok", image=picture(width, height), width=round(width * scale),
                       height=round(height * scale), scale=scale)


def write_hvpnet_crops(root: Path, mapping: dict[str, list[str]], *, suffix: str = ".pth") -> tuple[Path, Path]:
    """An HVPNeT-style crops folder + ``*_dict`` mapping (torch.save of {image file: [crop files]})."""
    crops = root / "aux_images" / "train" / "crops"
    crops.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(sorted({n for names in mapping.values() for n in names})):
        picture(40 + index, 30 + index, seed=index).save(crops / name)
    path = root / f"twitter2015_train_dict{suffix}"
    if suffix == ".pth":
        torch.save(mapping, path)
    else:
        path.write_text(json.dumps(mapping))
    return path, crops


# ------------------------------------------------------------------------------------------ queries


def test_query_rule_spans_words_and_stopwords():
    tokens = ["RT", "@JohnSmith", ":", "The", "New", "York", "Knicks", "beat", "#Boston", "in", "MSG",
              "http://t.co/x", "."]
    assert post_queries(tokens, "spans") == ["JohnSmith", "New York Knicks", "Boston", "MSG"]
    assert post_queries(tokens, "words") == ["JohnSmith", "New", "York", "Knicks", "Boston", "MSG"]
    config = GroundingConfig(max_text_queries=2)
    # two posts share the image: queries merge without case duplicates, entity types always follow
    queries = image_queries([["Paris", "is", "nice"], ["PARIS", "and", "Rome"], ["Lyon"]], config)
    assert queries == ["Paris", "Rome", "a person", "a place", "an organization logo", "an object"]
    with pytest.raises(ValueError, match="valid: spans, words"):
        post_queries(["A"], "nouns")


# -------------------------------------------------------------------------------------- box choice


def test_greedy_pick_ties_overlap_and_empty_boxes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [5, 5, 5, 9],
                      [40, 0, 50, 10]], np.float32)
    scores = np.array([0.5, 0.5, 0.9, 0.4, 0.99, 0.1], np.float32)
    # index 4 has no area; 2 is best; 0/1 tie but overlap 2 (IoU 0.81); then 3; 5 is under min_score
    assert greedy_pick(boxes, scores, limit=3, iou=0.3, min_score=0.2) == [2, 3]
    assert greedy_pick(boxes, scores, limit=3, iou=0.9) == [2, 0, 3]  # tie between 0 and 1: lower index
    assert greedy_pick(boxes, scores, limit=2, iou=0.3, kept=boxes[3:4]) == [2, 5]


def test_owlv2_selection_threshold_fill_and_original_pixels():
    grounder = Owlv2Grounder.__new__(Owlv2Grounder)
    grounder.config = GroundingConfig(threshold=0.3, nms_iou=0.3)
    image = loaded("a", width=100, height=50, scale=2.0)  # shown at half its original size
    # four candidate boxes (cx, cy, w, h) in the padded 100x100 square; two queries
    cxcywh = np.array([[0.2, 0.2, 0.2, 0.2], [0.7, 0.2, 0.2, 0.2], [0.21, 0.2, 0.2, 0.2], [0.5, 0.9, 0.2, 0.2]])
    probs = np.array([[0.9, 0.1], [0.2, 0.35], [0.8, 0.1], [0.1, 0.1]])
    objectness = np.array([0.1, 0.2, 0.9, 0.95])
    row = grounder._select(image, ["Paris", "a place"], probs, cxcywh, objectness)
    # query boxes 0 (0.9) and 1 (0.35); box 2 overlaps 0; box 3 lies in the padding below the image
    # (y 80..100 > height 50) so it has no area; the fill finds nothing else
    assert row.reason == "few_found" and list(row.source) == [0, 0] and list(row.query_index) == [0, 1]
    np.testing.assert_allclose(row.boxes[0], np.array([10, 10, 30, 30]) * 2.0, atol=1e-4)
    assert row.pixels.shape == (2, 3, 128, 128) and row.pixels.dtype == np.uint8
    grounder.config = GroundingConfig(threshold=0.5, nms_iou=0.95)  # boxes 0 and 2: IoU 0.905
    row = grounder._select(image, ["Paris", "a place"], probs, cxcywh, objectness)
    assert list(row.source) == [0, 0, 1] and list(row.query_index) == [0, 0, -1] and row.reason == "full"
    grounder.config = GroundingConfig(threshold=0.95, fill="none")
    row = grounder._select(image, ["Paris", "a place"], probs, cxcywh, objectness)
    assert len(row.scores) == 0 and row.reason == "few_found"


def test_owlv2_tiny_random_rows_and_images_that_are_not_ok():
    torch.manual_seed(0)
    grounder = create_grounder("owlv2", GroundingConfig(random_init=True, threshold=0.0, batch_size=2))
    items = [GroundingInput("a", loaded("a"), [["John", "in", "Paris"]]),
             GroundingInput("b", LoadedImage("b", "missing", detail="no file"), [["Rome"]]),
             GroundingInput("c", loaded("c", 30, 60), []),
             GroundingInput("d", LoadedImage("d", "placeholder", image=picture(8, 8)), [])]
    rows = grounder(items)
    assert [r.reason for r in rows][1::2] == ["no_image", "no_image"]
    assert rows[0].queries[:2] == ["John", "Paris"] and rows[1].queries[0] == "Rome"
    for row in rows:
        assert 0 <= len(row.scores) <= MAX_CROPS and row.pixels.shape[1:] == (3, 128, 128)
        assert ((row.boxes[:, 2:] >= row.boxes[:, :2]).all())
    stacked = stack_rows(rows)
    assert stacked["counts"][1] == stacked["counts"][3] == 0
    assert stacked["pixels"].shape[0] == stacked["counts"].sum() == len(stacked["source"]) == len(stacked["query"])
    assert stacked["reason"][1] == stacked["reason"][3] == 0  # "no_image" is code 0: the loop's zero rows
    found = [q.decode() for q in stacked["query"]]
    assert all(q in rows[0].queries + rows[2].queries or q == "" for q in found)
    assert grounder.provenance_fields()["pretrained"] == "random"


def test_detector_grounder_top_three_and_zero_detections():
    grounder = create_grounder("detector", GroundingConfig(crop_size=64, detector_model="maskrcnn"))
    boxes = np.array([[0, 0, 10, 10], [5, 5, 40, 40], [10, 0, 30, 20], [1, 1, 2, 2]], np.float32)
    rows = grounder([GroundingInput("a", loaded("a", scale=1.5), detections=(boxes, np.array([0.5, 0.9, 0.7, 0.1]))),
                     GroundingInput("b", loaded("b"), detections=(np.zeros((0, 4)), np.zeros(0))),
                     GroundingInput("c", LoadedImage("c", "unreadable"))])
    np.testing.assert_allclose(rows[0].boxes, boxes[[1, 2, 0]] * 1.5)
    assert rows[0].pixels.shape == (3, 3, 64, 64) and list(rows[0].source) == [2, 2, 2]
    assert (len(rows[1].scores), rows[1].reason) == (0, "few_found")
    assert rows[2].reason == "no_image"


def test_crop_mask():
    assert crop_mask(np.array([0, 2, 3])).tolist() == [[False] * 3, [True, True, False], [True] * 3]


# ----------------------------------------------------------------------------------- user crop files


def test_hvpnet_mapping_pth_and_json(tmp_path):
    mapping = {"100.jpg": ["100_crop_0.png", "100_crop_1.png"], "200.jpg": [], "999.jpg": ["999_crop_0.png"],
               "300": ["300_a.png", "300_b.png", "300_c.png", "300_d.png"]}
    path, crops = write_hvpnet_crops(tmp_path / "pth", mapping)
    found = load_crop_mapping([str(path)], [str(crops)], ["100", "200", "300", "400"])
    assert [p.name for p in found.crops["100"]] == ["100_crop_0.png", "100_crop_1.png"]
    assert found.crops["200"] == [] and len(found.crops["300"]) == 3 and "400" not in found.crops
    assert (found.unmatched_keys, found.truncated) == (1, 1)  # 999 is another split's image; 300 lists four
    json_path, json_crops = write_hvpnet_crops(tmp_path / "json", mapping, suffix=".json")
    again = load_crop_mapping([str(json_path)], [str(json_crops)], ["100", "200", "300", "400"])
    assert again.crops_sha256 == found.crops_sha256  # same crop bytes -> same fingerprint

    grounder = create_grounder("files", GroundingConfig(maps=[str(path)], crop_dirs=[str(crops)]))
    grounder.bind(["100", "200", "300", "400"])
    rows = grounder([GroundingInput(i) for i in ["100", "200", "300", "400"]])
    assert [r.reason for r in rows] == ["few_found", "few_found", "full", "not_in_mapping"]
    assert [len(r.scores) for r in rows] == [2, 0, 3, 0] and rows[0].pixels.shape == (2, 3, 128, 128)
    first = np.asarray(Image.open(crops / "100_crop_0.png").convert("RGB").resize((128, 128), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(rows[0].pixels[0], first.transpose(2, 0, 1))
    fields = grounder.provenance_fields()
    assert fields["coverage"]["crops_sha256"] == found.crops_sha256
    assert str(path.resolve()) in fields["preprocessing"]["mappings"]
    assert fields["pretrained"] == found.mappings_sha256  # the files, whatever the ids: a grown cache keeps it
    assert load_crop_mapping([str(path)], [str(crops)], ["100"]).mappings_sha256 == found.mappings_sha256


@pytest.mark.parametrize("content, problem", [
    ("[1, 2]", "expected a dict"),
    ('{"100.jpg": "100_crop_0.png"}', "value must be a list"),
    ('{"100.jpg": [3]}', "value must be a list"),
    ('{"100.jpg": ["nope.png"]}', "do not exist"),
    ('{"100.jpg": ["100_crop_0.png"],\n "oops"}', ":2: invalid JSON"),
    ('{"555.jpg": ["100_crop_0.png"]}', "none of the entries"),
])
def test_malformed_mapping_names_file_and_reason(tmp_path, content, problem):
    _, crops = write_hvpnet_crops(tmp_path, {"100.jpg": ["100_crop_0.png"]})
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=problem) as error:
        load_crop_mapping([str(bad)], [str(crops)], ["100"])
    if problem != "none of the entries":
        assert str(bad) in str(error.value)


def test_mapping_conflicts_pairs_and_unreadable_crop(tmp_path):
    path, crops = write_hvpnet_crops(tmp_path / "a", {"100.jpg": ["100_crop_0.png"]})
    other, other_crops = write_hvpnet_crops(tmp_path / "b", {"100.jpg": ["100_crop_0.png"]})
    with pytest.raises(DataFormatError, match="also listed with other crops"):
        load_crop_mapping([str(path), str(other)], [str(crops), str(other_crops)], ["100"])
    with pytest.raises(ValueError, match="one folder for all, or one per mapping"):
        load_crop_mapping([str(path)], [str(crops), str(other_crops)], ["100"])
    (crops / "100_crop_0.png").write_bytes(b"<html>not a png</html>")
    grounder = create_grounder("files", GroundingConfig(maps=[str(path)], crop_dirs=[str(crops)]))
    grounder.bind(["100"])
    with pytest.raises(DataFormatError, match=r"100_crop_0.png: crop of image 100 is unreadable"):
        grounder([GroundingInput("100")])
    assert isinstance(grounder.mapping, CropMapping)


# ------------------------------------------------------------------------------- frozen CLIP states


def test_clip_grounding_states_layers_shape_and_batch_independence():
    from mner.features.producers.grounding_clip import ClipGroundingConfig, ClipGroundingStates

    torch.manual_seed(0)
    states = ClipGroundingStates(ClipGroundingConfig(random_init=True, batch_size=2))
    pixels = np.random.default_rng(0).integers(0, 255, (3, 3, 128, 128), dtype=np.uint8)
    out = states(pixels)
    assert out.shape == (3, 2, 17, 32) and out.dtype == np.float16
    assert states.attrs(128) == {"layers": [6, 12], "image_size": 128, "patch_size": 32}
    np.testing.assert_allclose(states(pixels[2:]), out[2:], atol=2e-3)  # a crop's states ignore its batch
    # layer 0 is the embedding output after pre_layrnorm, computed directly here
    model = getattr(states.model, "vision_model", states.model)  # transformers 4.x nests it, 5.x does not
    batch = (torch.from_numpy(pixels[:1]).float() / 255 - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(
        1, 3, 1, 1)) / torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    states.config.layers = (0,)
    with torch.no_grad():
        direct = model.pre_layrnorm(model.embeddings(batch, interpolate_pos_encoding=True))
    np.testing.assert_allclose(states(pixels[:1])[0, 0], direct[0].numpy(), atol=2e-3)
    with pytest.raises(ValueError, match=re.escape("each must be in 0..12")):
        ClipGroundingStates(ClipGroundingConfig(random_init=True, layers=(13,)))


def test_real_loading_path_from_a_local_folder_records_the_weights_hash(tmp_path):
    """The non-random path (Auto* from_pretrained of weights, tokenizer, processor) runs offline from a folder."""
    from mner.features.producers.grounding_clip import ClipGroundingConfig, ClipGroundingStates

    torch.manual_seed(0)
    tiny = create_grounder("owlv2", GroundingConfig(random_init=True))
    folder = tmp_path / "owlv2"
    for part in (tiny.model, tiny.tokenizer, tiny.processor):
        part.save_pretrained(folder)
    loaded_grounder = create_grounder("owlv2", GroundingConfig(model=str(folder), threshold=0.0))
    pretrained = loaded_grounder.provenance_fields()["pretrained"]
    assert pretrained.startswith(str(folder.resolve())) and " sha256:" in pretrained
    item = GroundingInput("a", loaded("a"), [["Paris"]])
    np.testing.assert_array_equal(loaded_grounder([item])[0].boxes, tiny([item])[0].boxes)  # same weights
    clip = ClipGroundingStates(ClipGroundingConfig(random_init=True))
    clip.model.save_pretrained(tmp_path / "clip")
    again = ClipGroundingStates(ClipGroundingConfig(model=str(tmp_path / "clip")))
    assert " sha256:" in again.pretrained and again.model_name.endswith(f"({tmp_path / 'clip'})")
