"""Why grounding crops are stored as uint8 pixels: bytes per crop and batch read time, pixels vs JPEG.

Writes N images x 3 photo-like 128x128 crops to two HDF5 files laid out like the cache (uint8 rows
(3,128,128) vs JPEG bytes + offsets), then times what the trainer's batcher does per batch: read the
rows of B random images and produce (B, 3, 3, 128, 128) uint8. Both figures come from one run.

    OMP_NUM_THREADS=1 python bench/bench_grounding_storage.py --images 512 --batch 32 --quality 90
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from PIL import Image


def photo_like(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """Smooth colour fields + edges + a little noise: compresses like a photo crop, not like pure noise."""
    coarse = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    x0, y0 = rng.integers(0, size // 2, 2)
    image[y0:y0 + size // 3, x0:x0 + size // 3] = rng.integers(0, 255, 3)  # an object with hard edges
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8).transpose(2, 0, 1)  # (3, S, S)


def jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    crops = np.stack([photo_like(rng) for _ in range(args.images * 3)])  # (G, 3, 128, 128)
    encoded = [jpeg(c, args.quality) for c in crops]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])])
    with tempfile.TemporaryDirectory() as folder:
        pixels_path, jpeg_path = Path(folder) / "pixels.h5", Path(folder) / "jpeg.h5"
        with h5py.File(pixels_path, "w") as handle:
            handle["pixels"] = crops
        with h5py.File(jpeg_path, "w") as handle:
            handle["crop_jpeg"] = np.frombuffer(b"".join(encoded), np.uint8)
            handle["crop_jpeg_offsets"] = offsets
        order = [rng.choice(args.images, args.batch, replace=False) for _ in range(args.batches)]

        def read_pixels():
            with h5py.File(pixels_path, "r") as handle:
                data = handle["pixels"]
                for images in order:
                    np.stack([data[3 * i:3 * i + 3] for i in images])  # (B, 3, 3, 128, 128)

        def read_jpeg():
            with h5py.File(jpeg_path, "r") as handle:
                data, bounds = handle["crop_jpeg"], handle["crop_jpeg_offsets"][()]
                for images in order:
                    batch = []
                    for i in images:
                        raw = data[bounds[3 * i]:bounds[3 * i + 3]].tobytes()
                        base = bounds[3 * i]
                        batch.append(np.stack([np.asarray(Image.open(io.BytesIO(
                            raw[bounds[j] - base:bounds[j + 1] - base])).convert("RGB")).transpose(2, 0, 1)
                            for j in range(3 * i, 3 * i + 3)]))
                    np.stack(batch)

        timings = {}
        for name, function in (("pixels", read_pixels), ("jpeg", read_jpeg), ("pixels ", read_pixels)):
            started = time.perf_counter()
            function()
            timings[name.strip()] = min(timings.get(name.strip(), np.inf), time.perf_counter() - started)
    per_batch = {name: seconds / args.batches * 1000 for name, seconds in timings.items()}
    print(f"{args.images} images x 3 crops of 128x128, batches of {args.batch} images, {args.batches} batches")
    print(f"bytes per crop: pixels {crops[0].nbytes}, JPEG q{args.quality} {offsets[-1] / len(encoded):.0f} "
          f"(ratio {crops[0].nbytes / (offsets[-1] / len(encoded)):.1f}x)")
    print(f"ms per batch:   pixels {per_batch['pixels']:.2f}, JPEG {per_batch['jpeg']:.2f} "
          f"(JPEG / pixels = {per_batch['jpeg'] / per_batch['pixels']:.1f}x)")


if __name__ == "__main__":
    main()
