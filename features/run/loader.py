"""One persistent, prefetching image loader per shard: workers do every per-pixel step before the device.

A worker decodes an image (``images.load_image``: EXIF orientation, mode conversion, huge-image
downscale, status for bad files), then resizes it for the detector (:class:`ResizeSpec`) and for each
distinct encoder input (:class:`InputSpec`), and hands over uint8 tensors; with CUDA the DataLoader's
pin thread puts them in pinned memory so the copies to the device are asynchronous. The main thread
only moves tensors and runs models: no decoding, resizing or normalising (normalising is part of the
models' forwards, as in torchvision's detectors).

The loader spans the whole shard (not one chunk), so workers decode chunk k+1 while the device works on
chunk k; :meth:`ImageLoader.take` hands out the next ``n`` images in order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from mner.features.producers.detectors import ResizeSpec
from mner.features.producers.encoders import InputSpec
from mner.features.run.images import MAX_SIDE, load_image


def default_num_workers() -> int:
    """Decoding workers when --num-workers is not given: all cores but the main thread's, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


@dataclass(frozen=True)
class LoaderSpec:
    """What a worker produces per image (picklable: it travels to the worker processes)."""

    images_dir: str  # folder of <image id>.jpg files
    max_side: int = MAX_SIDE  # huge images are downscaled to this before anything else
    detector: ResizeSpec | None = None  # the detector's input resize; None when objects are not computed
    encoder_inputs: tuple[InputSpec, ...] = ()  # distinct whole-image inputs of the encoders
    keep_original: bool = True  # the decoded image itself (crops are cut from it)

    def prepare(self, image) -> dict:
        """PIL RGB image -> the tensors the device stages need (all uint8 (3, h, w))."""
        tensors = {
            "detector_input": self.detector.resize(image) if self.detector else None,
            "encoder_inputs": {spec: spec.resize(image) for spec in self.encoder_inputs},
        }
        if self.keep_original:
            tensors["original"] = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return tensors


@dataclass
class DecodedImage:
    """One image id after a worker: status as ``images.LoadedImage``, pixels as uint8 tensors."""

    image_id: str
    status: str  # ok | missing | unreadable (placeholders are filled in later, from one template)
    detail: str = ""
    width: int = 0  # original size (0 when not decodable)
    height: int = 0
    scale: float = 1.0  # original pixels per decoded pixel (> 1 when a huge image was downscaled)
    notes: list[str] = field(default_factory=list)
    fingerprint: str = ""  # sha256 of the file's bytes (images.LoadedImage.fingerprint)
    cause: str = ""  # why not ok, one word (images.LoadedImage.cause)
    original: torch.Tensor | None = None  # uint8 (3, H, W) decoded image (after the huge-image downscale)
    detector_input: torch.Tensor | None = None  # uint8 (3, h, w) at the detector's input size
    encoder_inputs: dict = field(default_factory=dict)  # InputSpec -> uint8 (3, S, S)

    def pin_memory(self) -> DecodedImage:
        """Called by the DataLoader's pin thread (CUDA only): page-locked tensors copy asynchronously."""
        pin = lambda t: t.pin_memory() if t is not None else None  # noqa: E731
        return replace(
            self,
            original=pin(self.original),
            detector_input=pin(self.detector_input),
            encoder_inputs={spec: pin(t) for spec, t in self.encoder_inputs.items()},
        )

    @property
    def image(self):
        """The decoded image as PIL, for producers that want one (built on demand: a copy of the pixels)."""
        from PIL import Image

        return Image.fromarray(self.original_hwc()) if self.original is not None else None

    def original_hwc(self) -> np.ndarray:
        """(H, W, 3) uint8 host view of the decoded image (for the stored JPEG crops)."""
        return self.original.permute(1, 2, 0).numpy()


def decode(spec: LoaderSpec, image_id: str) -> DecodedImage:
    loaded = load_image(spec.images_dir, image_id, max_side=spec.max_side)
    item = DecodedImage(
        loaded.image_id,
        loaded.status,
        loaded.detail,
        loaded.width,
        loaded.height,
        loaded.scale,
        list(loaded.notes),
        getattr(loaded, "fingerprint", ""),
        getattr(loaded, "cause", ""),
    )
    if loaded.status == "ok":
        tensors = spec.prepare(loaded.image)
        item.original, item.detector_input = tensors.get("original"), tensors["detector_input"]
        item.encoder_inputs = tensors["encoder_inputs"]
    return item


def prepared_image(spec: LoaderSpec, image, image_id: str, status: str = "ok") -> DecodedImage:
    """A DecodedImage for an in-memory PIL image (the gray placeholder), prepared as a worker would."""
    tensors = spec.prepare(image)
    return DecodedImage(
        image_id,
        status,
        width=image.width,
        height=image.height,
        original=tensors.get("original"),
        detector_input=tensors["detector_input"],
        encoder_inputs=tensors["encoder_inputs"],
    )


class _Images(torch.utils.data.Dataset):
    def __init__(self, spec: LoaderSpec, ids: list[str]):
        self.spec, self.ids = spec, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> DecodedImage:
        return decode(self.spec, self.ids[index])


def _single(item):
    return item


class ImageLoader:
    """Iterates a shard's images in order through one DataLoader whose workers live for the whole run."""

    def __init__(
        self,
        spec: LoaderSpec,
        ids: list[str],
        *,
        num_workers: int,
        pin_memory: bool = False,
        prefetch: int = 32,
    ):
        self.ids = ids
        workers = num_workers if len(ids) > 1 else 0
        options = {"prefetch_factor": max(2, prefetch // max(workers, 1))} if workers else {}
        self.loader = torch.utils.data.DataLoader(
            _Images(spec, ids),
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            collate_fn=_single,
            pin_memory=pin_memory,
            **options,
        )
        self._iterator = None
        self.position = 0

    def __iter__(self):
        return iter(self.loader)

    def take(self, count: int) -> list[DecodedImage]:
        """The next ``count`` images, in id order."""
        if self._iterator is None:
            self._iterator = iter(self.loader)
        items = [next(self._iterator) for _ in range(count)]
        for item, expected in zip(items, self.ids[self.position : self.position + count]):
            if item.image_id != expected:
                raise RuntimeError(f"loader out of order: got {item.image_id!r}, expected {expected!r}")
        self.position += count
        return items

    def close(self) -> None:
        self._iterator = None  # shuts the workers down
