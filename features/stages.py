"""What happens to a chunk of decoded images on the device: detect, cut crops once, encode in large batches.

The extraction loop hands :meth:`ImageStages.process` the chunk's :class:`~mner.features.loader.DecodedImage`
items (already decoded and resized by the loader's workers) and gets back host arrays per image and per
object. Inside:

1. the detector runs on batches of images with the same padded input size (results do not depend on
   batch-mates), each batch's detections copied to the host once;
2. the stored JPEG crops are encoded by the background writer from the host image (off the critical path);
3. each distinct whole-image input (side, squash or centre crop) is moved to the device once and feeds
   every encoder that uses it;
4. crops are cut once per side with roi_align on the device (``crops.CropBank``) and feed every crop
   encoder in batches of ``crop_batch_size``; outputs are cast to float16 on the device before the copy.

:class:`StageClock` records, per stage, wall time, the main thread's CPU time and (CUDA) device time
from CUDA events, so the benchmark can report GPU busy share and main-thread CPU outside the forwards.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from mner.features.crops import CropBank, jpeg_crops
from mner.features.detectors import Detector
from mner.features.encoders import Encoder, InputSpec, normalize
from mner.features.loader import DecodedImage, LoaderSpec

FLOAT16_MAX = float(np.finfo(np.float16).max)


def to_host_half(values: torch.Tensor) -> np.ndarray:
    """float16 with saturation (random-init ResNet activations can exceed 65504), cast on the device."""
    return values.float().clamp_(-FLOAT16_MAX, FLOAT16_MAX).half().cpu().numpy()


class StageClock:
    """Per stage: wall seconds, main-thread CPU seconds and, on CUDA, device seconds from CUDA events."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.wall: dict[str, float] = defaultdict(float)
        self.thread_cpu: dict[str, float] = defaultdict(float)
        self._events: dict[str, list] = defaultdict(list)

    @contextmanager
    def __call__(self, name: str):
        wall, cpu = time.perf_counter(), time.thread_time()
        start = None
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        try:
            yield
        finally:
            if start is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._events[name].append((start, end))
            self.wall[name] += time.perf_counter() - wall
            self.thread_cpu[name] += time.thread_time() - cpu

    def device_seconds(self) -> dict[str, float]:
        """Seconds the device spent between each stage's start and end events (synchronises once)."""
        if not self.cuda:
            return {}
        torch.cuda.synchronize()
        return {name: sum(s.elapsed_time(e) for s, e in pairs) / 1000.0 for name, pairs in self._events.items()}


class BackgroundWriter:
    """One thread for work the device need not wait for (JPEG crops, chunk files), at most ``pending`` queued."""

    def __init__(self, pending: int = 256):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mner-writer")
        self._slots = threading.BoundedSemaphore(pending)

    def submit(self, function, *args, **kwargs) -> Future:
        self._slots.acquire()  # back-pressure: the main thread waits when the writer falls behind
        future = self._pool.submit(function, *args, **kwargs)
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class ChunkImages:
    """Host results for the ``rows`` (chunk positions) that were computed, in row order."""

    rows: list[int]
    boxes: list[np.ndarray] = field(default_factory=list)  # per row (k, 4) float32 in ORIGINAL image pixels
    scores: list[np.ndarray] = field(default_factory=list)  # per row (k,)
    class_ids: list[np.ndarray] = field(default_factory=list)  # per row (k,)
    crop_jpegs: list[Future] = field(default_factory=list)  # per row: Future[list[bytes]] (when stored)
    image_arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # encoder -> key -> (rows, ...)
    crop_arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # encoder -> key -> (objects, ...)


class ImageStages:
    """The device stages of the image-based producers (objects and encoders/*) for one chunk at a time."""

    def __init__(self, detector: Detector | None, encoders: dict[str, Encoder], *, device: str,
                 batch_size: int = 32, crop_batch_size: int | None = None, writer: BackgroundWriter | None = None,
                 crop_jpeg: tuple[int, int] | None = (384, 90), clock: StageClock | None = None):
        self.detector = detector
        self.encoders = encoders
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.crop_batch_size = crop_batch_size or 4 * batch_size
        self.writer = writer
        self.crop_jpeg = crop_jpeg  # (max_side, quality) of the stored crops; None = not stored
        self.clock = clock or StageClock(self.device)

    def loader_spec(self, images_dir: str, max_side: int) -> LoaderSpec:
        inputs = tuple(dict.fromkeys(encoder.image_input for encoder in self.encoders.values()))
        return LoaderSpec(images_dir, max_side, self.detector.resize_spec if self.detector else None, inputs)

    @property
    def crop_sizes(self) -> set[int]:
        return {e.crop_size for e in self.encoders.values() if e.crop_datasets and e.crop_size}

    def process(self, items: list[DecodedImage], cached_boxes: list[np.ndarray] | None = None) -> ChunkImages:
        """Compute the ``ok`` items. ``cached_boxes`` (original pixels, per item) replace the detector."""
        rows = [i for i, item in enumerate(items) if item.status == "ok"]
        result = ChunkImages(rows)
        boxes = self._detect(items, rows, result) if cached_boxes is None else \
            [np.asarray(cached_boxes[i], np.float32).reshape(-1, 4) / np.float32(items[i].scale) for i in rows]
        if self.crop_jpeg and self.writer is not None and cached_boxes is None:
            max_side, quality = self.crop_jpeg
            result.crop_jpegs = [self.writer.submit(jpeg_crops, items[i].original_hwc(), row_boxes,
                                                    max_side=max_side, quality=quality)
                                 for i, row_boxes in zip(rows, boxes)]
        self._encode_images(items, rows, result)
        self._encode_crops(items, rows, boxes, result)
        return result

    # stages ---------------------------------------------------------------------------------------------
    def _detect(self, items, rows, result: ChunkImages) -> list[np.ndarray]:
        """Boxes per row in decoded-image pixels; ``result`` gets them in original pixels."""
        detector = self.detector
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i in rows:
            groups[detector.batch_key(*items[i].detector_input.shape[1:])].append(i)
        found: dict[int, tuple] = {}
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                batch = members[start:start + self.batch_size]
                with self.clock("detector"):
                    detections = detector.detect_batch([items[i].detector_input for i in batch],
                                                       [tuple(items[i].original.shape[1:]) for i in batch])
                found.update(zip(batch, detections.split()))
        boxes = []
        for i in rows:
            row_boxes, scores, class_ids = found[i]
            boxes.append(row_boxes)
            result.boxes.append(row_boxes * np.float32(items[i].scale))
            result.scores.append(scores)
            result.class_ids.append(class_ids)
        return boxes

    def _encode_images(self, items, rows, result: ChunkImages) -> None:
        by_input: dict[InputSpec, list[str]] = defaultdict(list)
        for name, encoder in self.encoders.items():
            by_input[encoder.image_input].append(name)
            result.image_arrays[name] = {key: np.zeros((len(rows), *shape), np.float16)
                                         for key, shape in encoder.image_datasets.items()}
        for spec, names in by_input.items():
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                with self.clock("encoder inputs"):
                    pixels = torch.stack([items[i].encoder_inputs[spec].to(self.device, non_blocking=True)
                                          for i in batch])  # (B, 3, S, S) uint8, shared by `names`
                for name in names:
                    encoder = self.encoders[name]
                    with self.clock(f"encoder {name}"), torch.inference_mode():
                        outputs = encoder.forward_images(normalize(pixels, encoder.mean, encoder.std))
                        for key, values in outputs.items():
                            result.image_arrays[name][key][start:start + len(batch)] = to_host_half(values)

    def _encode_crops(self, items, rows, boxes, result: ChunkImages) -> None:
        crop_encoders = {n: e for n, e in self.encoders.items() if e.crop_datasets}
        total = int(sum(len(b) for b in boxes))
        for name, encoder in crop_encoders.items():
            result.crop_arrays[name] = {key: np.zeros((total, *shape), np.float16)
                                        for key, shape in encoder.crop_datasets.items()}
        if not crop_encoders or total == 0:
            return
        # crops of up to batch_size images at a time: device memory stays bounded by the batch, not the chunk
        written = 0
        for start in range(0, len(rows), self.batch_size):
            batch = range(start, min(start + self.batch_size, len(rows)))
            with self.clock("crops"), torch.inference_mode():
                bank = CropBank([items[rows[j]].original.to(self.device, non_blocking=True) for j in batch],
                                [torch.from_numpy(boxes[j]) for j in batch], self.crop_sizes)
            count = sum(bank.counts)
            for name, encoder in crop_encoders.items():
                crops = bank[encoder.crop_size]  # (count, 3, S, S) in 0..1
                for lo in range(0, count, self.crop_batch_size):
                    with self.clock(f"encoder {name}"), torch.inference_mode():
                        pixels = normalize(crops[lo:lo + self.crop_batch_size], encoder.mean, encoder.std)
                        for key, values in encoder.forward_crops(pixels).items():
                            target = result.crop_arrays[name][key]
                            target[written + lo:written + lo + len(values)] = to_host_half(values)
            written += count
