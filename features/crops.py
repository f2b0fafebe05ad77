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

from mner.features.images import crop_box, encode_jpeg


def union_window(boxes: torch.Tensor, height: int, width: int) -> tuple[int, int, int, int]:
    """Integer (top, left, bottom, right) covering every box (rounded outwards, clamped to the image)."""
    x0, y0 = boxes[:, 0].min().item(), boxes[:, 1].min().item()
    x1, y1 = boxes[:, 2].max().item(), boxes[:, 3].max().item()
    left = min(max(math.floor(x0) - 1, 0), width - 1)
    top = min(max(math.floor(y0) - 1, 0), height - 1)
    right = max(min(math.ceil(x1) + 1, width), left + 1)
    bottom = max(min(math.ceil(y1) + 1, height), top + 1)
    return top, left, bottom, right


def cut_crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (3, H, W) image and (K, 4) xyxy boxes in its pixels -> float (K, 3, size, size) in 0..1."""
    from torchvision.ops import roi_align

    if len(boxes) == 0:
        return torch.zeros(0, 3, size, size, device=image.device)
    height, width = image.shape[1:]
    boxes = boxes.to(image.device, torch.float32)
    # degenerate boxes get one pixel, as crop_box does for the stored JPEG crops
    boxes = torch.stack([boxes[:, 0], boxes[:, 1], torch.maximum(boxes[:, 2], boxes[:, 0] + 1),
                         torch.maximum(boxes[:, 3], boxes[:, 1] + 1)], dim=1)
    top, left, bottom, right = union_window(boxes, height, width)
    window = image[:, top:bottom, left:right].float().div_(255.0)[None]  # (1, 3, h, w): only the boxes' area
    shifted = boxes - torch.tensor([left, top, left, top], device=image.device, dtype=torch.float32)
    rois = torch.cat([torch.zeros(len(boxes), 1, device=image.device), shifted], dim=1)  # (K, 5) batch index 0
    return roi_align(window, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


class CropBank:
    """The crops of a batch of images at every side some encoder needs, cut once per side."""

    def __init__(self, images: list[torch.Tensor], boxes: list[torch.Tensor], sizes: set[int]):
        self.counts = [len(b) for b in boxes]
        self.by_size: dict[int, torch.Tensor] = {}
        for size in sorted(sizes):
            parts = [cut_crops(image, image_boxes, size) for image, image_boxes in zip(images, boxes)]
            self.by_size[size] = torch.cat(parts) if parts else torch.zeros(0, 3, size, size)  # (M, 3, S, S)

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
