"""Gold GMNER entities: each gold entity of a post with its boxes from the post's XML (``--boxes``).

Entities are chunked exactly as the MNER metrics chunk them (seqeval's default mode: an orphan
``I-`` starts an entity), so the GMNER, MNER and EEG counts share one denominator. An XML
``<name>`` is matched against the surface text of every gold entity of the post (its tokens joined
by single spaces) exactly, as the Twitter-GMNER reference code matches them: a name with a stray
newline or double space stays unmatched, and the report says which ones would match after
whitespace normalisation. Every entity with that text gets the box, so one entity may have several boxes
and two mentions of the same name share them (as the Twitter-GMNER release does). Names that match
no entity are counted and listed, never fatal; so are malformed files and elements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from mner.pipeline.data import Post
from mner.pipeline.gmner import Box, BoxProblem, ImageBoxes, normalise_name, read_box_dir
from mner.pipeline.tags import extract_entities

MAX_LISTED = 20  # unmatched names and problems listed per split in the report (all are counted)


@dataclass
class GoldEntity:
    start: int  # first word
    end: int  # last word, inclusive
    type: str
    text: str  # tokens joined by single spaces
    boxes: list[Box] = field(default_factory=list)  # in the annotated image's pixels (see xml_size)

    @property
    def boxed(self) -> bool:
        return bool(self.boxes)


@dataclass
class PostGold:
    entities: list[GoldEntity]
    xml_size: tuple[int, int] | None  # (width, height) the boxes are in; None: no XML or no <size>
    has_xml: bool


@dataclass
class BoxReport:
    """Per split: what the reader found (the numbers the docs and metrics.json report)."""

    entities: int = 0
    boxed: int = 0  # gold entities with at least one box
    boxes: int = 0  # boxes attached to entities (an entity with two boxes counts two)
    images_with_xml: int = 0  # posts of the split whose image has an XML file
    unmatched_names: int = 0  # XML objects whose name is the text of no gold entity of the post
    unmatched_examples: list[str] = field(default_factory=list)
    unmatched_whitespace: int = 0  # of those, names equal to an entity's text once whitespace is collapsed
    problems: int = 0  # malformed files / elements (skipped)
    problem_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("entities", "boxed", "boxes", "images_with_xml", "unmatched_names",
                                             "unmatched_whitespace", "unmatched_examples", "problems",
                                             "problem_examples")}

    def message(self, split: str) -> str:
        text = (f"{split}: {self.entities} gold entities, {self.boxed} boxed ({self.boxes} boxes), "
                f"{self.images_with_xml} posts with an XML file, {self.unmatched_names} XML names matching no entity")
        if self.problems:
            text += f", {self.problems} malformed XML parts skipped (first: {self.problem_examples[0]})"
        return text


def entity_text(tokens: Sequence[str], start: int, end: int) -> str:
    return " ".join(tokens[start:end + 1])


def gold_entities(post: Post) -> list[GoldEntity]:
    """The post's gold entities, seqeval-chunked, without boxes."""
    if post.tags is None:
        return []
    return [GoldEntity(start, end, kind, entity_text(post.tokens, start, end))
            for kind, start, end in extract_entities(post.tags)]


def attach_boxes(post: Post, image_boxes: ImageBoxes | None, report: BoxReport) -> PostGold:
    entities = gold_entities(post)
    report.entities += len(entities)
    if image_boxes is None:
        return PostGold(entities, None, False)
    report.images_with_xml += 1
    for problem in image_boxes.problems:
        _count_problem(report, problem)
    by_text: dict[str, list[GoldEntity]] = {}
    for entity in entities:
        by_text.setdefault(entity.text, []).append(entity)
    for name, box in image_boxes.objects:
        matching = by_text.get(name)
        if not matching:
            report.unmatched_names += 1
            near = normalise_name(name) in by_text
            report.unmatched_whitespace += near
            if len(report.unmatched_examples) < MAX_LISTED:
                hint = " (matches an entity once whitespace is collapsed; fix the XML)" if near else ""
                report.unmatched_examples.append(f"{image_boxes.image_id}: {name!r}{hint}")
            continue
        for entity in matching:
            entity.boxes.append(box)
    for entity in entities:
        report.boxed += entity.boxed
        report.boxes += len(entity.boxes)
    return PostGold(entities, image_boxes.size, True)


def _count_problem(report: BoxReport, problem: BoxProblem) -> None:
    report.problems += 1
    if len(report.problem_examples) < MAX_LISTED:
        report.problem_examples.append(str(problem))


def read_gold(splits: dict[str, Sequence[Post]], xml_dir) -> tuple[dict[str, list[PostGold]], dict[str, BoxReport]]:
    """Gold entities with boxes for every post of every split, and the per-split report."""
    ids = {post.image_id for posts in splits.values() for post in posts if post.image_id is not None}
    xml = read_box_dir(xml_dir, ids)
    gold: dict[str, list[PostGold]] = {}
    reports: dict[str, BoxReport] = {}
    for split, posts in splits.items():
        report = reports[split] = BoxReport()
        gold[split] = [attach_boxes(post, xml.get(post.image_id) if post.image_id is not None else None, report)
                       for post in posts]
    return gold, reports


def main(argv: list[str] | None = None) -> int:
    """``python -m mner.trainer.gmner.gold DATA_DIR XML_DIR``: the reader's per-split counts as JSON
    (the numbers a ``--boxes`` run logs), without training anything."""
    import argparse
    import json

    from mner.pipeline.data import DataFormatError, load_dataset

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("data", help="folder of train.txt / dev.txt (or valid.txt) / test.txt")
    parser.add_argument("boxes", help="folder of <image id>.xml files")
    args = parser.parse_args(argv)
    try:
        _, reports = read_gold(load_dataset(args.data).splits, args.boxes)
    except (DataFormatError, FileNotFoundError) as err:
        print(f"error: {err}")
        return 2
    print(json.dumps({split: report.as_dict() for split, report in reports.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
