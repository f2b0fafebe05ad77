"""The Twitter-GMNER box reader: entities, boxed entities, images with XML, unmatched names, malformed
files and elements (reported with file and element, never a crash), and <size> scaling."""

from __future__ import annotations

import numpy as np

from mner.pipeline.data import load_dataset
from mner.pipeline.gmner import read_box_xml
from mner.trainer.gmner.candidates import entity_targets, scale_boxes, size_relation
from mner.trainer.gmner.gold import read_gold

TRAIN = """IMGID:71044
RT\tO
Ted\tB-PER
Cruz\tI-PER
and\tO
Ted\tB-PER
Cruz\tI-PER
in\tO
Texas\tB-LOC

IMGID:O_2371
Harry\tB-OTHER
Potter\tI-OTHER
trivia\tO

IMGID:16_05_15_51
no\tO
entity\tO

IMGID:555
Jeb\tI-PER
Bush\tI-PER
at\tO
GOP\tB-ORG

"""
DEV = "IMGID:9\nParis\tB-LOC\n\n"


def xml(size: tuple[int, int] | None, objects: list[tuple[str, tuple]]) -> str:
    head = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    body = "".join(f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for name, b in objects)
    return f"<annotation><filename>x.jpg</filename>{head}{body}</annotation>"


def write(tmp_path):
    data, boxes = tmp_path / "data", tmp_path / "xml"
    data.mkdir()
    boxes.mkdir()
    (data / "train.txt").write_text(TRAIN, encoding="utf-8")
    (data / "dev.txt").write_text(DEV, encoding="utf-8")
    # two boxes for "Ted Cruz" (both mentions get both), one for Texas, a name matching no entity
    # names match exactly, like the reference code: "Ted  Cruz\n" is reported (with a hint), not matched
    (boxes / "71044.xml").write_text(xml((500, 400), [
        ("Ted Cruz", (10, 10, 50, 90)), ("Ted Cruz", (60, 10, 100, 90)), ("Texas", (0, 0, 500, 400)),
        ("Rick Perry", (1, 1, 5, 5)), ("Ted  Cruz\n", (1, 1, 9, 9))]), encoding="utf-8")
    # OTHER is read as MISC; the name is still the surface text; one object with a broken <xmin>
    (boxes / "O_2371.xml").write_text(xml((200, 100), [("Harry Potter", (0, 0, 100, 100)),
                                                       ("Harry Potter", ("1o", 0, 5, 5))]), encoding="utf-8")
    (boxes / "16_05_15_51.xml").write_text("<annotation><object><name>oops</name>", encoding="utf-8")  # not XML
    (boxes / "12345.xml").write_text(xml((10, 10), [("Nobody", (0, 0, 5, 5))]), encoding="utf-8")  # no such post
    # 555 (orphan I- entity "Jeb Bush") and dev post 9 have no XML file: no boxed entity
    return data, boxes


def test_reader_counts_boxes_names_and_problems(tmp_path):
    data, boxes = write(tmp_path)
    dataset = load_dataset(data)
    gold, reports = read_gold(dataset.splits, boxes)
    train = reports["train"]
    assert (train.entities, train.boxed, train.boxes, train.images_with_xml) == (6, 4, 6, 3)
    assert train.unmatched_names == 2 and train.unmatched_whitespace == 1
    assert train.unmatched_examples == ["71044: 'Rick Perry'", "71044: 'Ted  Cruz\\n' (matches an entity once "
                                        "whitespace is collapsed; fix the XML)"]
    assert train.problems == 2
    assert any("O_2371.xml" in p and "object 2 ('Harry Potter') <bndbox><xmin>" in p for p in train.problem_examples)
    assert any("16_05_15_51.xml:1" in p and "file" in p for p in train.problem_examples)
    assert reports["dev"].as_dict() == {"entities": 1, "boxed": 0, "boxes": 0, "images_with_xml": 0,
                                        "unmatched_names": 0, "unmatched_whitespace": 0, "unmatched_examples": [],
                                        "problems": 0, "problem_examples": []}
    first = gold["train"][0]
    assert [(e.text, e.type, len(e.boxes)) for e in first.entities] == [
        ("Ted Cruz", "PER", 2), ("Ted Cruz", "PER", 2), ("Texas", "LOC", 1)]
    assert first.xml_size == (500, 400)
    assert [(e.text, e.type, e.boxes) for e in gold["train"][1].entities] == [("Harry Potter", "MISC",
                                                                               [(0.0, 0.0, 100.0, 100.0)])]
    assert [(e.start, e.end, e.boxed) for e in gold["train"][3].entities] == [(0, 1, False), (3, 3, False)]


def test_malformed_file_names_line_and_is_not_raised(tmp_path):
    bad = tmp_path / "1.xml"
    bad.write_text("<annotation>\n<object><name>a</name>\n</annotation>", encoding="utf-8")
    parsed = read_box_xml(bad)
    assert parsed.objects == [] and len(parsed.problems) == 1
    assert str(parsed.problems[0]).startswith(f"{bad}:3: file: not well-formed XML")


def test_boxes_are_scaled_to_the_cached_size_and_targets_follow_iou():
    scaled, changed = scale_boxes([(100, 50, 200, 150)], (1000, 500), (500, 250))
    assert changed and scaled.tolist() == [[50, 25, 100, 75]]
    same, changed = scale_boxes([(1, 2, 3, 4)], (500, 250), (500, 250))
    assert not changed and same.tolist() == [[1, 2, 3, 4]]
    # an EXIF-rotated picture: the XML gives the size transposed; the boxes are kept and the image reported
    assert size_relation((250, 500), (500, 250)) == "transposed"
    kept, changed = scale_boxes([(1, 2, 3, 4)], (250, 500), (500, 250))
    assert not changed and kept.tolist() == [[1, 2, 3, 4]]
    candidates = np.array([[50, 25, 100, 75], [50, 25, 100, 125], [0, 0, 10, 10]], float)  # IoU 1, 0.5, 0
    index, covered = entity_targets(scaled, candidates, style="index", threshold=0.5, compare=">=")
    assert covered and index.tolist() == [0, 1, 1, 0]
    soft, _ = entity_targets(scaled, candidates, style="soft", threshold=0.5, compare=">=")
    np.testing.assert_allclose(soft, [0, 1 / 1.5, 0.5 / 1.5, 0], rtol=1e-6)
    strict, _ = entity_targets(scaled, candidates, style="index", threshold=0.5, compare=">")
    assert strict.tolist() == [0, 1, 0, 0]
    none, covered = entity_targets(scaled, candidates[2:], style="index", threshold=0.5, compare=">=")
    assert not covered and none.tolist() == [1, 0]
