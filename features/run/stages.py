"""What happens to a chunk of decoded images on the device: detect, cut crops once, encode in large batches.

The extraction loop hands :meth:`ImageStages.process` the chunk's :class:`~mner.features.run.loader.DecodedImage`
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

import time
from collections import defaultdict
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from mner.features.producers.crops import CropBank, jpeg_crops
from mner.features.producers.detectors import Detector
from mner.features.producers.encoders import Encoder, InputSpec, normalize
from mner.features.run.loader import DecodedImage
from mner.pipeline.background import BackgroundWriter

FLOAT16_MAX = float(np.finfo(np.float16).max)


def to_host_half(values: torch.Tensor) -> np.ndarray:
    """float16 with saturation (random-init ResNet activations can exceed 65504), cast on the device."""
    return values.float().clamp_(-FLOAT16_MAX, FLOAT16_MAX).half().cpu().numpy()


def keep_one_window(shared: dict, key: tuple) -> None:
    """Drop ``shared``'s device tensors of the same kind and input from other windows of the chunk.

    Whole-image inputs and fp32 crops are kept for the next encoder with the same input, but only
    for the window being computed: keeping every window until the chunk ends made device memory
    grow with ``--chunk-size`` (about 200 MB of fp32 crops per 32 images with 10 objects at 224)
    instead of ``--batch-size``. A later encoder re-uploads the uint8 inputs and re-cuts crops of
    earlier windows, which costs little next to an encoder's forward."""
    for other in [k for k in shared if isinstance(k, tuple) and k[:2] == key[:2] and k != key]:
        del shared[other]


class StageClock:
    """Per stage: wall seconds, main-thread CPU seconds and, on CUDA, device seconds from CUDA events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.wall: dict[str, float] = defaultdict(float)
        self.thread_cpu: dict[str, float] = defaultdict(float)
        self.device_stages: set[str] = set()  # model forwards and other device work (the rest is overhead)
        self._events: dict[str, list] = defaultdict(list)

    @contextmanager
    def __call__(self, name: str, device: bool = True):
        wall, cpu = time.perf_counter(), time.thread_time()
        start = None
        if device:
            self.device_stages.add(name)
        if self.cuda and device:
            start = torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(self.device))  # this run's GPU, not the current one
        try:
            yield
        finally:
            if start is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record(torch.cuda.current_stream(self.device))
                self._events[name].append((start, end))
            self.wall[name] += time.perf_counter() - wall
            self.thread_cpu[name] += time.thread_time() - cpu

    def forward_thread_cpu(self) -> float:
        """Main-thread CPU seconds inside device stages (on a CPU device: the forwards themselves)."""
        return sum(self.thread_cpu[name] for name in self.device_stages)

    def device_seconds(self) -> dict[str, float]:
        """Seconds the device spent between each stage's start and end events (synchronises once)."""
        if not self.cuda:
            return {}
        torch.cuda.synchronize(self.device)
        return {
            name: sum(s.elapsed_time(e) for s, e in pairs) / 1000.0 for name, pairs in self._events.items()
        }


@dataclass
class ChunkImages:
    """Host results for the ``rows`` (chunk positions) that were computed, in row order."""

    rows: list[int]
    boxes: list[np.ndarray] = field(default_factory=list)  # per row (k, 4) float32 in ORIGINAL image pixels
    scores: list[np.ndarray] = field(default_factory=list)  # per row (k,)
    class_ids: list[np.ndarray] = field(default_factory=list)  # per row (k,)
    crop_jpegs: list[Future] = field(default_factory=list)  # per row: Future[list[bytes]] (when stored)
    image_arrays: dict[str, dict[str, np.ndarray]] = field(
        default_factory=dict
    )  # encoder -> key -> (rows, ...)
    crop_arrays: dict[str, dict[str, np.ndarray]] = field(
        default_factory=dict
    )  # encoder -> key -> (objects, ...)


class ImageStages:
    """The device stages of the image-based producers, shared by all of them within a run.

    Every method takes the chunk's usable :class:`DecodedImage` items; ``shared`` is the chunk's scratch
    dict (``ChunkBatch.shared``): whole-image inputs moved to the device and crops cut at one side are
    kept there, so the second encoder with the same input size reuses the first one's."""

    def __init__(
        self,
        device: str | torch.device,
        *,
        batch_size: int = 32,
        crop_batch_size: int | None = None,
        writer: BackgroundWriter | None = None,
        clock: StageClock | None = None,
    ):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.crop_batch_size = crop_batch_size or 4 * batch_size
        self.writer = writer
        self.clock = clock or StageClock(self.device)

    # detector -------------------------------------------------------------------------------------------
    def detect(
        self, detector: Detector, items: list[DecodedImage]
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per item (boxes in DECODED-image pixels, scores, class ids); batches share one padded size."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[detector.batch_key(*item.detector_input.shape[1:])].append(i)
        found: dict[int, tuple] = {}
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                with self.clock("detector"):
                    detections = detector.detect_batch(
                        [items[i].detector_input for i in batch],
                        [tuple(items[i].original.shape[1:]) for i in batch],
                    )
                found.update(zip(batch, detections.split()))
        return [found[i] for i in range(len(items))]

    def jpeg_crops(
        self, items: list[DecodedImage], boxes: list[np.ndarray], *, max_side: int, quality: int
    ) -> list[Future]:
        """The stored JPEG crops, encoded by the background writer: a Future[list[bytes]] per item."""
        if self.writer is None:
            done = []
            for item, item_boxes in zip(items, boxes):
                future: Future = Future()
                future.set_result(
                    jpeg_crops(item.original_hwc(), item_boxes, max_side=max_side, quality=quality)
                )
                done.append(future)
            return done
        return [
            self.writer.submit(
                jpeg_crops, item.original_hwc(), item_boxes, max_side=max_side, quality=quality
            )
            for item, item_boxes in zip(items, boxes)
        ]

    # encoders -------------------------------------------------------------------------------------------
    def image_features(
        self, encoder: Encoder, items: list[DecodedImage], shared: dict | None = None, name: str | None = None
    ) -> dict[str, np.ndarray]:
        """Per-image arrays (n, ...) float16; the uint8 inputs go to the device once per input spec."""
        shared = {} if shared is None else shared
        name = name or encoder.name
        spec: InputSpec = encoder.image_input
        out = {
            key: np.zeros((len(items), *shape), np.float16) for key, shape in encoder.image_datasets.items()
        }
        for start in range(0, len(items), self.batch_size):
            key_inputs = ("inputs", spec, start)
            if key_inputs not in shared:
                keep_one_window(shared, key_inputs)
                with self.clock("encoder inputs"):
                    shared[key_inputs] = torch.stack(
                        [
                            item.encoder_inputs[spec].to(self.device, non_blocking=True)
                            for item in items[start : start + self.batch_size]
                        ]
                    )  # (B, 3, S, S) uint8
            pixels = shared[key_inputs]
            with self.clock(f"encoder {name}"), torch.inference_mode():
                for key, values in encoder.forward_images(
                    normalize(pixels, encoder.mean, encoder.std)
                ).items():
                    out[key][start : start + len(pixels)] = to_host_half(values)
        return out

    def crop_features(
        self,
        encoder: Encoder,
        items: list[DecodedImage],
        boxes: list[np.ndarray],
        shared: dict | None = None,
        name: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Per-object arrays (M, ...) float16 for ``boxes`` (decoded-image pixels, per item, in order)."""
        shared = {} if shared is None else shared
        name = name or encoder.name
        total = int(sum(len(b) for b in boxes))
        out = {key: np.zeros((total, *shape), np.float16) for key, shape in encoder.crop_datasets.items()}
        if not encoder.crop_datasets or total == 0:
            return out
        written = 0
        # the crops of up to batch_size images at a time: device memory is bounded by a batch, not the chunk
        for start in range(0, len(items), self.batch_size):
            key_crops = ("crops", encoder.crop_size, start)
            if key_crops not in shared:
                keep_one_window(shared, key_crops)
                with self.clock("crops"), torch.inference_mode():
                    window = range(start, min(start + self.batch_size, len(items)))
                    bank = CropBank(
                        [items[j].original.to(self.device, non_blocking=True) for j in window],
                        [boxes[j] for j in window],  # host boxes: rois prepared on the host
                        {encoder.crop_size},
                    )
                    shared[key_crops] = bank[encoder.crop_size]  # (count, 3, S, S) in 0..1
            crops = shared[key_crops]
            for lo in range(0, len(crops), self.crop_batch_size):
                with self.clock(f"encoder {name}"), torch.inference_mode():
                    pixels = normalize(crops[lo : lo + self.crop_batch_size], encoder.mean, encoder.std)
                    for key, values in encoder.forward_crops(pixels).items():
                        out[key][written + lo : written + lo + len(values)] = to_host_half(values)
            written += len(crops)
        return out

    # everything at once (benchmarks, tests) -------------------------------------------------------------
    def process(
        self,
        detector: Detector | None,
        encoders: dict[str, Encoder],
        items: list[DecodedImage],
        cached_boxes: list[np.ndarray] | None = None,
        crop_jpeg: tuple[int, int] | None = None,
    ) -> ChunkImages:
        """Compute the ``ok`` items. ``cached_boxes`` (original pixels, per item) replace the detector."""
        rows = [i for i, item in enumerate(items) if item.status == "ok"]
        usable = [items[i] for i in rows]
        result = ChunkImages(rows)
        if cached_boxes is None:
            found = self.detect(detector, usable)
            boxes = [f[0] for f in found]
            result.boxes = [f[0] * np.float32(item.scale) for f, item in zip(found, usable)]
            result.scores = [f[1] for f in found]
            result.class_ids = [f[2] for f in found]
            if crop_jpeg:
                result.crop_jpegs = self.jpeg_crops(
                    usable, boxes, max_side=crop_jpeg[0], quality=crop_jpeg[1]
                )
        else:
            boxes = [
                np.asarray(cached_boxes[i], np.float32).reshape(-1, 4) / np.float32(items[i].scale)
                for i in rows
            ]
        shared: dict = {}
        for name, encoder in encoders.items():
            result.image_arrays[name] = self.image_features(encoder, usable, shared, name)
            if encoder.crop_datasets:
                result.crop_arrays[name] = self.crop_features(encoder, usable, boxes, shared, name)
        return result
