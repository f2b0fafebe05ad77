"""Generated posts, split files, datasets and images (nothing downloaded)."""

from __future__ import annotations

import random
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

ENTITIES = [(["john", "smith"], "PER"), (["paris"], "LOC"), (["london"], "LOC"), (["apple"], "ORG"),
            (["google"], "ORG"), (["game"], "MISC")]


FILLER = ["the", "a", "in", "at", "of", "to", "and", "is", "rt", "with", "new", "city", "visit", "love"]


def make_post(rng: random.Random, image_id: str | None, *, orphan: bool = False) -> list[tuple[str, str]]:
    rows = [(w, "O") for w in rng.sample(FILLER, 3)]
    words, entity_type = rng.choice(ENTITIES)
    rows += [(w, ("B-" if i == 0 and not orphan else "I-") + entity_type) for i, w in enumerate(words)]
    rows += [(w, "O") for w in rng.sample(FILLER, 2)]
    return rows


def write_split(path: Path, posts: list[list[tuple[str, str]]], *, tags: bool = True) -> None:
    lines = []
    for n, rows in enumerate(posts):
        lines.append(f"IMGID:{n}")
        lines += [f"{w}\t{t}" if tags else w for w, t in rows]
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_generated_splits(folder: Path, *, seed: int, sizes: tuple[int, int, int], extra_test=()) -> Path:
    """train/valid/test files of generated posts (``sizes`` posts each), ``extra_test`` appended to test."""
    rng = random.Random(seed)
    for name, size in zip(("train.txt", "valid.txt", "test.txt"), sizes):
        posts = [make_post(rng, str(i)) for i in range(size)]
        write_split(folder / name, posts + (list(extra_test) if name == "test.txt" else []))
    return folder


def write_dataset(folder: Path, image_ids: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    posts = [f"IMGID:{image_id}\nJohn\tB-PER\nin\tO\nParis\tB-LOC\n" for image_id in image_ids]
    half = max(1, len(posts) // 2)
    (folder / "train.txt").write_text("\n".join(posts[:half]) + "\n")
    (folder / "valid.txt").write_text("\n".join(posts[half:]) + "\n")
    (folder / "test.txt").write_text(posts[0] + "\n")
    return folder


def datasets_of(path, group):
    with h5py.File(path, "r") as handle:
        out = {}
        handle[group].visititems(lambda name, obj: out.__setitem__(name, obj[()].tobytes())
                                 if isinstance(obj, h5py.Dataset) else None)
        return out, dict(handle[group].attrs)


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
