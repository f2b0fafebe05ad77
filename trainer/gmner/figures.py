"""``mner-train show RUN --post ID``: one post's picture with its gold and predicted regions, labelled.

Reads the run's grounded predictions (``predictions/<split>.jsonl``, written by a ``--boxes`` run or
``evaluate --boxes``), so it shows exactly what was scored. Gold boxes are drawn green, predicted ones
orange, each labelled with the entity's text and type; entities without a region are listed under the
picture ("no region"). The picture is looked up in ``--images`` or in the folder the cache was
extracted from (its provenance); when it is not there, the figure is drawn on a gray canvas of the
cached size and says so.
"""

from __future__ import annotations

import json
from pathlib import Path

GOLD, PRED = (40, 200, 60), (255, 140, 0)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


class ShowError(FileNotFoundError):
    pass


def find_record(run_dir: Path, post: str, split: str | None) -> tuple[str, dict, Path]:
    splits = [split] if split else ["test", "dev"]
    files = [run_dir / "predictions" / f"{s}.jsonl" for s in splits]
    for path in files:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if post in (record["post_id"], record["image_id"]):
                return path.stem, record, path
    present = [str(p) for p in files if p.is_file()]
    if not present:
        raise ShowError(f"{run_dir} has no grounded predictions ({', '.join(map(str, files))}): train it with "
                        "--boxes, or run `mner-train evaluate RUN --boxes XML_DIR` first")
    raise ShowError(f"no post {post!r} (post id such as test-12, or image id) in {', '.join(present)}")


def images_folder(run_dir: Path) -> Path | None:
    """The folder the run's cache was extracted from (recorded in every group's provenance)."""
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    cache = (config.get("features") or {}).get("path")
    if not cache or not Path(cache).is_file():
        return None
    from mner.pipeline.cache import FeatureCache

    features = FeatureCache(cache)
    for group in features.groups():
        images = features.provenance(group).get("images")
        if images and Path(images).is_dir():
            return Path(images)
    return None


def show_post(run_dir: str | Path, post: str, *, split: str | None = None, images: str | Path | None = None,
              out: str | Path | None = None) -> tuple[Path, str | None]:
    """Write the PNG; returns its path and a note when the picture was not available."""
    from PIL import Image, ImageDraw

    run_dir = Path(run_dir)
    if out is not None and Path(out).exists():  # never replace a file mner did not write
        raise FileExistsError(f"--out {out} exists; remove it or choose another file (the default, "
                              f"{run_dir / 'figures'}, is replaced freely)")
    split, record, _ = find_record(run_dir, post, split)
    folder = Path(images) if images is not None else images_folder(run_dir)
    picture, note = None, None
    image_id = record["image_id"]
    candidates = [folder / f"{image_id}{ext}" for ext in EXTENSIONS] if folder is not None and image_id else []
    found = next((p for p in candidates if p.is_file()), None)
    if found is not None:
        try:
            with Image.open(found) as image:
                picture = image.convert("RGB")
        except OSError as err:
            note = f"image {found} is not readable ({err})"
    else:
        where = f"in {folder}" if folder is not None else "(no --images, and the cache records no images folder)"
        note = f"image {image_id!r} is not available {where}; boxes drawn on a blank canvas"
    if picture is None:
        width, height = record.get("image_size") or (640, 480)
        picture = Image.new("RGB", (int(width), int(height)), (128, 128, 128))
    lines = [f"{record['post_id']}  image {image_id}" + (f"  [{note}]" if note else "")]
    draw = ImageDraw.Draw(picture)
    for entity in record["gold"]:
        label = f"gold: {entity['text']} ({entity['type']})"
        for box in entity["boxes"]:
            draw.rectangle(box, outline=GOLD, width=3)
            draw.text((box[0] + 3, box[1] + 2), label, fill=GOLD)
        if not entity["boxes"]:
            lines.append(f"{label}: no region")
        elif not entity.get("covered", True):
            lines.append(f"{label}: no candidate reaches its box")
    for entity in record["pred"]:
        label = f"pred: {entity['text']} ({entity['type']})"
        if entity["box"] is None:
            lines.append(f"{label}: no region")
            continue
        draw.rectangle(entity["box"], outline=PRED, width=2)
        draw.text((entity["box"][0] + 3, entity["box"][3] - 12), label, fill=PRED)
    line_height = 14
    canvas = Image.new("RGB", (max(picture.width, 480), picture.height + line_height * len(lines) + 8), "white")
    canvas.paste(picture, (0, 0))
    text = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        text.text((4, picture.height + 4 + i * line_height), line, fill=(0, 0, 0))
    out = Path(out) if out is not None else run_dir / "figures" / f"{record['post_id']}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out, note
