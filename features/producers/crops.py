"""Object crops cut once, on the device, and shared by every encoder that reads crops.

Each crop is cut from the decoded image (uint8 (3, H, W), already on the device) with
``torchvision.ops.roi_align``: ``aligned=True`` treats box corners as pixel edges, and the adaptive
sampling ratio averages ceil(box side / output side) samples per output pixel in each direction, which
anti-aliases large boxes the way an area resize does. Crops depend only on their image and box, never
on the other images of a batch (one roi_align call per image), so sharded, resumed and grown caches agree.

Encoders with the same crop side share one resized batch (``CropBank``); each normalises it with its own
mean and std. The JPEG crops stored in the cache are encoded from the host copy of the image in the
background writer (``jpeg_crops``), off the device's critical path.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mner.features.run.images import crop_box, encode_jpeg


def union_window(boxes: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """Integer (top, left, bottom, right) covering every box with a one-pixel margin, clamped to the image.

    The margin keeps roi_align's bilinear neighbours inside the window, so cutting from the window equals
    cutting from the whole image."""
    left = min(max(math.floor(float(boxes[:, 0].min())) - 1, 0), width - 1)
    top = min(max(math.floor(float(boxes[:, 1].min())) - 1, 0), height - 1)
    right = max(min(math.ceil(float(boxes[:, 2].max())) + 1, width), left + 1)
    bottom = max(min(math.ceil(float(boxes[:, 3].max())) + 1, height), top + 1)
    return top, left, bottom, right


def crop_rois(boxes, height: int, width: int) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Host-side preparation of one image's crops: its window and (K, 5) roi rows relative to the window.

    Done on the host so that cutting needs no device->host synchronisation (``.item()``) per image."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    # degenerate boxes get one pixel, as crop_box does for the stored JPEG crops
    boxes = np.stack(
        [
            boxes[:, 0],
            boxes[:, 1],
            np.maximum(boxes[:, 2], boxes[:, 0] + 1),
            np.maximum(boxes[:, 3], boxes[:, 1] + 1),
        ],
        axis=1,
    )
    top, left, bottom, right = union_window(boxes, height, width)
    rois = np.concatenate(
        [np.zeros((len(boxes), 1), np.float32), boxes - np.array([left, top, left, top], np.float32)], axis=1
    )  # batch index 0
    return (top, left, bottom, right), rois


def _cut(
    image: torch.Tensor, window: tuple[int, int, int, int], rois: torch.Tensor, size: int
) -> torch.Tensor:
    from torchvision.ops import roi_align

    top, left, bottom, right = window
    pixels = image[:, top:bottom, left:right].float().div_(255.0)[None]  # (1, 3, h, w): only the boxes' area
    return roi_align(
        pixels, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True
    )


def cut_crops(image: torch.Tensor, boxes, size: int) -> torch.Tensor:
    """uint8 (3, H, W) image and (K, 4) xyxy boxes in its pixels -> float (K, 3, size, size) in 0..1."""
    if len(boxes) == 0:
        return torch.zeros(0, 3, size, size, device=image.device)
    window, rois = crop_rois(np.asarray(boxes, np.float32), *image.shape[1:])
    return _cut(image, window, torch.from_numpy(rois).to(image.device), size)


class CropBank:
    """The crops of a batch of images at every side some encoder needs, cut once per side.

    The roi rows of the whole batch travel to the device in one copy."""

    def __init__(self, images: list[torch.Tensor], boxes: list, sizes: set[int]):
        self.counts = [len(b) for b in boxes]
        prepared = [crop_rois(b, *image.shape[1:]) if len(b) else None for image, b in zip(images, boxes)]
        device = images[0].device if images else torch.device("cpu")
        flat = [rois for p in prepared if p is not None for rois in [p[1]]]
        all_rois = torch.from_numpy(np.concatenate(flat)).to(device, non_blocking=True) if flat else None
        self.by_size: dict[int, torch.Tensor] = {}
        for size in sorted(sizes):
            parts, start = [], 0
            for image, p, count in zip(images, prepared, self.counts):
                if p is not None:
                    parts.append(_cut(image, p[0], all_rois[start : start + count], size))
                    start += count
            self.by_size[size] = torch.cat(parts) if parts else torch.zeros(0, 3, size, size, device=device)

    def __getitem__(self, size: int) -> torch.Tensor:
        return self.by_size[size]


def jpeg_crops(original: np.ndarray, boxes: np.ndarray, *, max_side: int, quality: int) -> list[bytes]:
    """The cache's stored crops: (H, W, 3) uint8 host image, boxes in its pixels -> JPEG bytes per box.

    Runs in the background writer (Pillow releases the GIL while resizing and encoding)."""
    from PIL import Image

    if len(boxes) == 0:
        return []
    image = Image.fromarray(original)
    return [encode_jpeg(crop_box(image, box), max_side=max_side, quality=quality) for box in boxes]
