"""Grounded-MNER box annotations: the Twitter-GMNER Pascal VOC XML files (docs/gmner.md).

One file per image, ``<xml dir>/<image id>.xml``, holding the picture's ``<size>`` and any number
of ``<object>`` elements, each a ``<name>`` (the entity's surface text: its tokens joined by single
spaces) and a ``<bndbox>`` with ``xmin ymin xmax ymax`` in pixels. This module only parses; which
entity a name belongs to is decided by the trainer (``mner.trainer.gmner.gold``), which also counts
what did not match. It imports no torch so that either stage can read the files.

A malformed file or element never stops a run: it is returned as a :class:`BoxProblem` naming the
file, the line where the XML parser knows it, and the element, and the caller reports it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

Box = tuple[float, float, float, float]  # xmin, ymin, xmax, ymax in the annotated image's pixels
COORDINATES = ("xmin", "ymin", "xmax", "ymax")


@dataclass(frozen=True)
class BoxProblem:
    """Something in an XML file that could not be used; ``element`` says which part."""

    path: str
    element: str  # e.g. "object 3 <bndbox><xmin>", "<size>", "file"
    problem: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.element}: {self.problem}"


@dataclass
class ImageBoxes:
    """The usable content of one image's XML file."""

    image_id: str
    path: str
    size: tuple[int, int] | None  # (width, height) from <size>; None when absent, zero or unreadable
    objects: list[tuple[str, Box]] = field(default_factory=list)  # (<name> text exactly as written, box)
    problems: list[BoxProblem] = field(default_factory=list)


def normalise_name(name: str) -> str:
    """Whitespace collapsed to single spaces: only used to explain an unmatched name (matching is exact)."""
    return " ".join(name.split())


def _number(element: ET.Element | None, tag: str) -> float | None:
    child = element.find(tag) if element is not None else None
    if child is None or child.text is None:
        return None
    try:
        return float(child.text.strip())
    except ValueError:
        return None


def read_box_xml(path: str | Path, image_id: str | None = None) -> ImageBoxes:
    """Parse one Pascal VOC file; unusable parts become ``problems`` (never an exception)."""
    path = Path(path)
    image_id = image_id if image_id is not None else path.stem
    result = ImageBoxes(image_id=image_id, path=str(path), size=None)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        line = err.position[0] if getattr(err, "position", None) else None
        result.problems.append(BoxProblem(str(path), "file", f"not well-formed XML ({err})", line))
        return result
    except OSError as err:
        result.problems.append(BoxProblem(str(path), "file", f"cannot be read ({err.strerror or err})"))
        return result
    size = root.find("size")
    if size is not None:
        width, height = _number(size, "width"), _number(size, "height")
        if width is None or height is None:
            result.problems.append(BoxProblem(str(path), "<size>", "width or height missing or not a number"))
        elif width > 0 and height > 0:
            result.size = (round(width), round(height))
    for number, obj in enumerate(root.findall("object"), start=1):  # direct children, as VOC
        name_element = obj.find("name")
        name = (name_element.text or "") if name_element is not None else ""
        if not name.strip():
            result.problems.append(BoxProblem(str(path), f"object {number} <name>", "missing or empty"))
            continue
        box_element = obj.find("bndbox")
        if box_element is None:
            result.problems.append(BoxProblem(str(path), f"object {number} ({name!r}) <bndbox>", "missing"))
            continue
        values = [_number(box_element, tag) for tag in COORDINATES]
        bad = [tag for tag, value in zip(COORDINATES, values) if value is None]
        if bad:
            result.problems.append(BoxProblem(str(path), f"object {number} ({name!r}) <bndbox><{bad[0]}>",
                                              "missing or not a number"))
            continue
        xmin, ymin, xmax, ymax = values
        if xmax <= xmin or ymax <= ymin:
            result.problems.append(BoxProblem(str(path), f"object {number} ({name!r}) <bndbox>",
                                              f"empty box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g})"))
            continue
        result.objects.append((name, (xmin, ymin, xmax, ymax)))
    return result


def xml_path(xml_dir: str | Path, image_id: str) -> Path:
    return Path(xml_dir) / f"{image_id}.xml"


def read_box_dir(xml_dir: str | Path, image_ids) -> dict[str, ImageBoxes]:
    """The XML of every id in ``image_ids`` that has a file (ids without one have no boxed entity)."""
    xml_dir = Path(xml_dir)
    if not xml_dir.is_dir():
        raise FileNotFoundError(f"--boxes {xml_dir}: no such folder (expected <image id>.xml files)")
    present = {p.stem for p in xml_dir.glob("*.xml")}
    return {image_id: read_box_xml(xml_path(xml_dir, image_id), image_id)
            for image_id in sorted(set(image_ids)) if image_id in present}
