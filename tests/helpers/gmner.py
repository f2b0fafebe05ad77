"""Generated Twitter-GMNER data: posts, pictures with drawn objects, Pascal VOC XML boxes, and a
colour-blob detector that finds the drawn objects (registered as ``blobs-test`` for ``mner-features``).

Every post says the same kind of thing about a name ("meet jordan today"): the text never says where
the person is. Each picture shows three coloured rectangles at random places and sizes; the entity's
box is the red one. A quarter of the pictures have no red rectangle: their entity has no box (the
XML lists only other names, or there is no XML). Some XML files give a ``<size>`` twice the picture's
with boxes to match (annotated on a larger copy), which the trainer must scale back.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

NAMES = ["jordan", "paris", "sydney", "victoria", "chelsea", "florence", "dallas", "austin"]
TEMPLATES = [["meet", "{}", "today"], ["{}", "is", "new"], ["love", "{}"], ["photo", "of", "{}", "today"]]
SIZE = (96, 72)  # width, height
BACKGROUND = (110, 110, 110)
TARGET = (220, 40, 40)  # the entity's object
DISTRACTORS = [(40, 180, 60), (50, 80, 220), (230, 210, 40)]
PALETTE = [TARGET, *DISTRACTORS]


def draw_post(rng: random.Random, with_target: bool) -> tuple[object, list[tuple[tuple, tuple[int, int, int, int]]]]:
    """A picture and its objects [(colour, box)]: three rectangles in three columns, shuffled."""
    from PIL import Image, ImageDraw

    colours = ([TARGET] if with_target else []) + rng.sample(DISTRACTORS, 3 - with_target)
    rng.shuffle(colours)
    image = Image.new("RGB", SIZE, BACKGROUND)
    draw = ImageDraw.Draw(image)
    objects = []
    column = SIZE[0] // 3
    for slot, colour in enumerate(colours):
        width, height = rng.randint(14, column - 6), rng.randint(16, 40)
        x0 = slot * column + rng.randint(2, column - width - 2)
        y0 = rng.randint(2, SIZE[1] - height - 2)
        box = (x0, y0, x0 + width, y0 + height)
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=colour)
        objects.append((colour, box))
    return image, objects


def voc_xml(image_id: str, size: tuple[int, int], objects: list[tuple[str, tuple]]) -> str:
    parts = [f"<annotation>\n\t<filename>{image_id}.jpg</filename>\n\t<size>\n\t\t<width>{size[0]}</width>\n"
             f"\t\t<height>{size[1]}</height>\n\t\t<depth>3</depth>\n\t</size>"]
    for name, (x0, y0, x1, y1) in objects:
        parts.append(f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<bndbox>\n"
                     f"\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n\t\t\t<xmax>{x1}</xmax>\n"
                     f"\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>")
    return "\n".join(parts) + "\n</annotation>\n"


def write_gmner_dataset(folder: Path, images: Path, xml: Path, *, posts: dict[str, int], seed: int = 3) -> dict:
    """Split files (dev.txt), JPEGs and XMLs; returns the true counts per split for the tests."""
    rng = random.Random(seed)
    for path in (folder, images, xml):
        path.mkdir(parents=True, exist_ok=True)
    truth = {}
    for split_index, (split, count) in enumerate(posts.items()):
        lines, boxed, scaled = [], 0, 0
        for p in range(count):
            image_id = f"O_{split_index}{p:03d}" if p % 2 else f"7{split_index}{p:03d}"
            with_target = p % 4 != 3
            image, objects = draw_post(rng, with_target)
            image.save(images / f"{image_id}.jpg", quality=95)
            name = NAMES[p % len(NAMES)]
            words = [f"{name}\tB-PER" if w == "{}" else f"{w}\tO" for w in rng.choice(TEMPLATES)]
            lines.append("\n".join([f"IMGID:{image_id}", *words]))
            named = [(name if colour == TARGET else "somebody else", box) for colour, box in objects]
            if not with_target and p % 8 == 7:
                continue  # no XML at all: the entity has no box
            factor = 2 if p % 5 == 0 else 1  # annotated on a copy twice as large
            if factor == 2:
                scaled += 1
            named = [(n, tuple(v * factor for v in box)) for n, box in named]
            (xml / f"{image_id}.xml").write_text(
                voc_xml(image_id, (SIZE[0] * factor, SIZE[1] * factor), named), encoding="utf-8")
            boxed += with_target
        name = "dev.txt" if split == "dev" else f"{split}.txt"
        (folder / name).write_text("\n\n".join(lines) + "\n\n", encoding="utf-8")
        truth[split] = {"entities": count, "boxed": boxed, "scaled": scaled}
    return truth


def register_blob_detector() -> None:
    """``--detector blobs-test``: one box per palette colour found in the picture (a perfect detector
    for these pictures). Scores follow the rectangle's area, so their order says nothing about which
    object is the entity's."""
    import torch

    from mner.features.producers.detectors import DETECTORS, Detector, register_detector

    if "blobs-test" in DETECTORS:
        return

    @register_detector("blobs-test")
    class BlobDetector(Detector):
        model_name = "blobs-test (colour thresholds)"
        class_names = ["blob"]
        always_random = True  # recorded as random in provenance: not a real detector

        def _forward(self, inputs, original_sizes):
            out = []
            for image, (height, width) in zip(inputs, original_sizes):
                pixels = image.permute(1, 2, 0).int()  # (h, w, 3)
                sy, sx = height / pixels.shape[0], width / pixels.shape[1]
                boxes, scores = [], []
                for colour in PALETTE:
                    mask = (pixels - torch.tensor(colour)).abs().max(dim=-1).values < 40  # (h, w)
                    if int(mask.sum()) < 4:
                        continue
                    ys, xs = np.nonzero(mask.numpy())
                    boxes.append([xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy])
                    scores.append(min(1.0, float(mask.float().mean()) * 4 + 0.05))
                out.append((torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            torch.tensor(scores, dtype=torch.float32), torch.ones(len(scores), dtype=torch.int64)))
            return out
