"""Image loading that never raises: every image id gets a status and, when decodable, an RGB image.

Social-media image dumps contain missing files, HTML error pages saved as ``.jpg``, truncated
downloads, CMYK/16-bit/palette/alpha images, animated GIFs, 1x1 tracking pixels and the odd
decompression bomb. Each is mapped to one of the cache statuses (ok / missing / unreadable /
placeholder) with a human-readable ``detail`` so one bad file never stops a run.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from mner.pipeline.cache.base import IMAGE_CAUSES
from mner.pipeline.hashing import sha256_hex

EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".JPG", ".JPEG", ".PNG", "")
MAX_PIXELS = 64_000_000  # larger images are refused as decompression bombs (8000 x 8000)
MAX_SIDE = 2048  # larger images are downscaled before any model sees them (boxes are mapped back)
TINY_SIDE = 8  # smaller images are kept (the models resize them) and counted as "tiny" in the summary
PLACEHOLDER_SIZE = 224  # the fixed gray image used by --missing-image placeholder
PLACEHOLDER_GRAY = (128, 128, 128)
MISSING_POLICIES = ("placeholder", "zeros", "error")

# Pillow raises a warning (not an error) between MAX_IMAGE_PIXELS and 2x; we check the size ourselves.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is "unreadable", never half-gray


@dataclass
class LoadedImage:
    """One image id after loading; ``image`` is an RGB PIL image or None when not decodable."""

    image_id: str
    status: str  # "ok" | "missing" | "unreadable" | "placeholder"
    image: Image.Image | None = None
    detail: str = ""  # why the image is not ok ("" when ok)
    width: int = 0  # original size in pixels (0 when not decodable)
    height: int = 0
    scale: float = 1.0  # original pixels per loaded pixel (> 1 when a huge image was downscaled)
    notes: list[str] = field(default_factory=list)  # conversions applied (CMYK, alpha, tiny, ...)
    fingerprint: str = ""  # sha256 of the file's bytes ("" when there is no file): a changed image is noticed
    cause: str = ""  # why not ok, one of IMAGE_CAUSES: no-file | no-images-folder | corrupt | too-large


def find_image_file(images_dir: Path, image_id: str) -> Path | None:
    """``<images>/<id>.jpg`` first, then the other usual extensions, then the bare id.

    An id that would leave the folder (a path separator, ``..``) finds nothing: the data reader refuses
    such ids with their file and line, this is the second guard.
    """
    if "/" in image_id or "\\" in image_id or ".." in image_id or Path(image_id).is_absolute():
        return None
    suffix = Path(image_id).suffix
    stem = image_id[: -len(suffix)] if suffix and suffix.lower() in EXTENSIONS else image_id
    for name in [image_id] + [stem + ext for ext in EXTENSIONS]:
        candidate = images_dir / name
        try:
            if candidate.is_file():
                return candidate
        except OSError:  # a name the file system cannot hold (ENAMETOOLONG): no such file, not a crash
            continue
    return None


def name_too_long(images_dir: Path | str, image_id: str) -> int | None:
    """The file system's name limit when no file can be named after ``image_id`` (None when one can)."""
    from mner.pipeline.outputs import name_limit

    limit = name_limit(images_dir) if Path(images_dir).is_dir() else 255
    return limit if len(os.fsencode(image_id)) > limit else None


# "<_io.BytesIO object at 0x7f...>" and friends: an address differs between runs, so it never enters a
# cache (details are fingerprinted: the same images must give the same cache bytes).
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def stable_message(error: BaseException, path: Path) -> str:
    """An exception's message with object reprs (memory addresses) replaced by the file's path."""
    return _OBJECT_REPR.sub(str(path), f"{type(error).__name__}: {error}")


def _to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white (how a browser shows it)."""
    if getattr(image, "is_animated", False):
        image.seek(0)
        notes.append("animated: first frame")
    mode = image.mode
    if mode == "RGB":
        return image.copy() if image.format == "GIF" else image
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
        notes.append("palette")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        notes.append(f"alpha {mode} on white")
        return canvas
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
        notes.append(f"{mode} rescaled to 8 bit")
    elif mode != "RGB":
        notes.append(f"{mode} -> RGB")
    return image.convert("RGB")


def _not_ok(image_id: str, status: str, cause: str, message: str, **fields) -> LoadedImage:
    """A non-ok image; its detail starts with the cause (one of IMAGE_CAUSES), so info can count by it."""
    assert cause in IMAGE_CAUSES, cause
    return LoadedImage(image_id, status, detail=f"{cause}: {message}", cause=cause, **fields)


def load_image(images_dir: Path | str, image_id: str, *, max_side: int = MAX_SIDE,
               max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Load one image; any failure becomes a status + detail instead of an exception."""
    if images_dir is None:  # --no-images: a cache over the id list without pictures, asked for explicitly
        return _not_ok(image_id, "missing", "no-images-folder", "no images folder (--no-images)")
    path = find_image_file(Path(images_dir), image_id)
    if path is None:
        limit = name_too_long(images_dir, image_id)
        if limit is not None:
            return _not_ok(image_id, "missing", "no-file", f"the id is {len(os.fsencode(image_id))} bytes, longer "
                           f"than a file name may be here ({limit}): no image file can have this name")
        return _not_ok(image_id, "missing", "no-file", f"no file {Path(images_dir) / image_id}[.jpg|.png|...]")
    notes: list[str] = []
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return _not_ok(image_id, "missing", "no-file", f"{path}: vanished while reading")
    except OSError as error:
        return _not_ok(image_id, "unreadable", "corrupt", f"{path}: {error}")
    fingerprint = hashlib.sha256(content).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content)) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    return _not_ok(image_id, "unreadable", "too-large", f"{path}: {width}x{height} exceeds "
                                   f"{max_pixels} pixels (decompression bomb guard)", width=width, height=height,
                                   fingerprint=fingerprint)
                if opened.format == "JPEG" and max(width, height) > 2 * max_side:
                    opened.draft("RGB", (max_side, max_side))  # decode at reduced scale: much faster
                opened.load()
                oriented = opened
                if opened.getexif().get(0x0112, 1) != 1:  # phones store rotated pixels + an EXIF flag
                    oriented = ImageOps.exif_transpose(opened)
                    notes.append("exif orientation applied")
                    width, height = oriented.size
                image = _to_rgb(oriented, notes)
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return _not_ok(image_id, "unreadable", "too-large", f"{path}: decompression bomb: {error}",
                       fingerprint=fingerprint)
    except Exception as error:
        return _not_ok(image_id, "unreadable", "corrupt", f"{path}: {stable_message(error, path)}",
                       fingerprint=fingerprint)
    scale = 1.0
    if max(image.size) > max_side:
        factor = max_side / max(image.size)
        new_size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        image = image.resize(new_size, Image.Resampling.BICUBIC)
        notes.append(f"huge {width}x{height} downscaled to {new_size[0]}x{new_size[1]}")
    if image.size != (width, height):
        scale = width / image.width
    if min(width, height) < TINY_SIDE:
        notes.append(f"tiny {width}x{height} (kept; the models' resize upscales it)")
    return LoadedImage(image_id, "ok", image=image, width=width, height=height, scale=scale, notes=notes,
                       fingerprint=fingerprint)


def file_fingerprint(images_dir: Path | str | None, image_id: str) -> str:
    """sha256 of the image file's bytes, "" when there is none (the cheap pre-pass of a growing cache)."""
    path = None if images_dir is None else find_image_file(Path(images_dir), image_id)
    if path is None:
        return ""
    return sha256_hex(path)


def placeholder_image() -> Image.Image:
    """The fixed gray image whose features stand in for missing/unreadable images."""
    return Image.new("RGB", (PLACEHOLDER_SIZE, PLACEHOLDER_SIZE), PLACEHOLDER_GRAY)


def apply_missing_policy(loaded: LoadedImage, policy: str) -> LoadedImage:
    """placeholder: swap in the gray image (status "placeholder"); zeros/error: leave as found."""
    if loaded.status == "ok" or policy != "placeholder":
        return loaded
    return LoadedImage(loaded.image_id, "placeholder", image=placeholder_image(),
                       detail=f"{loaded.status}: {loaded.detail}", width=loaded.width, height=loaded.height,
                       fingerprint=loaded.fingerprint, cause=loaded.cause)


def encode_jpeg(image: Image.Image, *, max_side: int, quality: int) -> bytes:
    """A crop as JPEG bytes, longer side capped at ``max_side`` (crops are re-decoded for every encoder)."""
    if max(image.size) > max_side:
        factor = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))),
                             Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_jpeg(data: bytes | np.ndarray) -> Image.Image:
    with Image.open(io.BytesIO(bytes(data))) as opened:
        return opened.convert("RGB")


def crop_box(image: Image.Image, box_xyxy: np.ndarray) -> Image.Image:
    """Crop with the box rounded outwards and clamped, so every crop has at least 1x1 pixels."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    left = min(max(int(np.floor(x0)), 0), image.width - 1)
    top = min(max(int(np.floor(y0)), 0), image.height - 1)
    right = max(min(int(np.ceil(x1)), image.width), left + 1)
    bottom = max(min(int(np.ceil(y1)), image.height), top + 1)
    return image.crop((left, top, right, bottom))
