"""Generates the sample's images: tiny synthetic pictures whose content decides some entity types.

The first digit of a sample image id says what its file must be (docs/data.md, "The sample"):

    0 plain      grey texture, no visual cue (text-decided posts)
    1 person     a red upright figure (head + body) on a dark background -> ambiguous names are PER
    2 place      blue sky over a green horizon -> ambiguous names are LOC
    7 truncated  a JPEG cut half-way (decoders fail or return a partial image)
    8 missing    no file at all
    9 unreadable a zero-byte .jpg

Deterministic: the same id always gives the same bytes (seeded from the id). Stdlib, numpy and Pillow only,
so tests can import it to make synthetic data: ``make_image(kind, seed)``, ``generate_sample_images(out, ids)``.

    python sample/make_images.py --out sample/images [--data sample/twitter_sample]
"""

from __future__ import annotations

import argparse
import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

KIND_BY_CODE = {"0": "plain", "1": "person", "2": "place", "7": "truncated", "8": "missing", "9": "unreadable"}
PICTURE_KINDS = ("plain", "person", "place")  # kinds make_image can draw
SIZE = (160, 120)  # width, height
JPEG_QUALITY = 90


def image_kind(image_id: str) -> str:
    """The kind a sample image id asks for (its first digit, see KIND_BY_CODE)."""
    kind = KIND_BY_CODE.get(image_id[:1])
    if kind is None:
        raise ValueError(f"image id {image_id!r}: first digit must be one of {', '.join(KIND_BY_CODE)}")
    return kind


def seed_of(image_id: str) -> int:
    return zlib.crc32(image_id.encode("utf-8"))


def make_image(kind: str, seed: int, size: tuple[int, int] = SIZE) -> Image.Image:
    """An RGB picture of ``kind`` (plain | person | place) with noise and random placement."""
    if kind not in PICTURE_KINDS:
        raise ValueError(f"cannot draw kind {kind!r}; valid kinds: {', '.join(PICTURE_KINDS)}")
    rng = np.random.default_rng(seed)
    width, height = size
    rows = np.arange(height)[:, None]  # (H, 1)
    cols = np.arange(width)[None, :]  # (1, W)
    if kind == "plain":
        base = rng.uniform(90, 160) + rng.uniform(-15, 15, size=3)  # muted grey, slight tint
        canvas = np.broadcast_to(base, (height, width, 3)).copy()  # (H, W, 3)
    elif kind == "person":
        canvas = np.broadcast_to(rng.uniform(15, 45, size=3), (height, width, 3)).copy()  # dark background
        center = width * rng.uniform(0.3, 0.7)
        top = height * rng.uniform(0.08, 0.2)
        head_radius = height * rng.uniform(0.08, 0.11)
        head = (cols - center) ** 2 + (rows - top - head_radius) ** 2 <= head_radius**2  # (H, W)
        body_top = top + 2 * head_radius
        body_half_width = width * rng.uniform(0.08, 0.13)
        body = ((cols - center) / body_half_width) ** 2 + ((rows - body_top) / (height - body_top)) ** 2 <= 1
        body &= rows >= body_top
        canvas[head | body] = (rng.uniform(190, 235), rng.uniform(25, 60), rng.uniform(25, 60))  # red figure
    else:  # place
        horizon = int(height * rng.uniform(0.45, 0.65))
        sky = np.linspace(1.0, 0.75, horizon)[:, None] * np.array([90, 150, 235])  # (horizon, 3) blue gradient
        canvas = np.empty((height, width, 3))
        canvas[:horizon] = sky[:, None, :]
        canvas[horizon:] = (rng.uniform(40, 80), rng.uniform(130, 170), rng.uniform(40, 70))  # green ground
        sun_x, sun_y, sun_r = width * rng.uniform(0.1, 0.9), horizon * rng.uniform(0.2, 0.6), height * 0.06
        canvas[((cols - sun_x) ** 2 + (rows - sun_y) ** 2 <= sun_r**2) & (rows < horizon)] = (250, 235, 150)
    canvas += rng.normal(0, 8, size=canvas.shape)  # sensor-like noise
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def write_image(out_dir: Path, image_id: str, kind: str, size: tuple[int, int] = SIZE) -> Path | None:
    """Writes ``<out_dir>/<image_id>.jpg`` as ``kind`` (or removes it for ``missing``); returns its path."""
    path = Path(out_dir) / f"{image_id}.jpg"
    if kind == "missing":
        path.unlink(missing_ok=True)
        return None
    if kind == "unreadable":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = _jpeg_bytes(make_image("place", seed_of(image_id), size))
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(_jpeg_bytes(make_image(kind, seed_of(image_id), size)))
    return path


def generate_sample_images(
    out_dir: str | Path, ids_to_kind: dict[str, str], size: tuple[int, int] = SIZE
) -> dict[str, str]:
    """One file per id as its kind asks (``missing`` ids get none); returns id -> kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for image_id, kind in sorted(ids_to_kind.items()):
        write_image(out_dir, image_id, kind, size)
    return dict(ids_to_kind)


def sample_image_ids(data_dir: str | Path) -> list[str]:
    """The IMGID values of every ``*.txt`` split file in ``data_dir`` (no mner import: runs anywhere)."""
    ids = set()
    for split_file in sorted(Path(data_dir).glob("*.txt")):
        for line in split_file.read_text(encoding="utf-8").split("\n"):
            if line.startswith("IMGID:") and "\t" not in line:
                ids.add(line[len("IMGID:"):].strip())
    return sorted(ids)


def main(argv: list[str] | None = None) -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description="Generate the sample's synthetic images (deterministic).")
    parser.add_argument("--out", type=Path, default=here / "images", help="output folder (git-ignored)")
    parser.add_argument("--data", type=Path, default=here / "twitter_sample", help="folder of split files")
    args = parser.parse_args(argv)
    ids_to_kind = {image_id: image_kind(image_id) for image_id in sample_image_ids(args.data)}
    generate_sample_images(args.out, ids_to_kind)
    counts = {kind: sum(k == kind for k in ids_to_kind.values()) for kind in sorted(set(ids_to_kind.values()))}
    print(f"{len(ids_to_kind)} image ids -> {args.out}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))


if __name__ == "__main__":
    main()
