"""Object detectors, registered by name: ``maskrcnn``, ``fasterrcnn`` (torchvision), ``detectron2``, and the
tiny random test variants ``maskrcnn-test`` / ``fasterrcnn-test``.

A detector maps images to (boxes xyxy in that image's pixels, scores, class ids), at most ``top_k`` objects
with score >= ``score_threshold``, highest score first.

**Batching without batch-mate dependence.** A detector pads the images of a batch to one size; a padded
border changes the convolutions near it, so an image's detections would depend on who shares its batch,
and a sharded or resumed run would not equal a single run. Here every image's padded size is a function
of the image alone (its resized size rounded up to ``size_divisible``), and only images with the same
padded size share a forward (:meth:`Detector.batch_key`). Batched and one-image results then agree up to
floating-point summation order: see ``tests/test_batched_detector.py`` for the tolerance.

The resize to the detector's input size happens in the loader's workers (:class:`ResizeSpec` is
picklable); the detector itself receives uint8 (3, h, w) tensors on its device, converts and normalises
them there (as torchvision's own ``GeneralizedRCNNTransform`` does inside the forward), and returns all
detections of a batch to the host in one copy.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from mner.pipeline.hashing import sha256_tag

DETECTORS: dict[str, Callable[..., Detector]] = {}

DETECTRON2_INSTALL = (
    "detectron2 is not installed (it publishes no wheels). Build it from source, which needs a C++ "
    "compiler and an installed torch (docs/install.md#detectron2 has the exact steps), "
    "or use --detector maskrcnn / fasterrcnn (torchvision)."
)
COCO_MAX_OVER_MIN = 1333 / 800  # torchvision's and detectron2's default max_size / min_size


def register_detector(name: str):
    def decorator(factory):
        DETECTORS[name] = factory
        return factory

    return decorator


def create_detector(name: str, **kwargs) -> Detector:
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; valid: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name](**kwargs)


@contextmanager
def seeded_if_random(component: str, random: bool):
    """Random weights are a function of the component name: resumed, sharded and grown caches agree."""
    if not random:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int.from_bytes(hashlib.sha1(component.encode()).digest()[:4], "big"))
        yield


def autocast_for(device: torch.device, amp: str):
    """fp16/bf16 autocast on CUDA; fp32 elsewhere (CPU autocast is slower than fp32 for these models).

    fp16 is the default: its 10-bit mantissa keeps more of the stored float16 features than bf16's 7 bits,
    and the models here (ViT, ResNet, Swin, R-CNN backbones) run in fp16 without overflow."""
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@dataclass(frozen=True)
class ResizeSpec:
    """How an image is resized to a detector's input: shorter side ``min_size``, longer side at most
    ``max_size``; ``rounding`` is the library's (torchvision floors, detectron2 rounds)."""

    min_size: int  # target shorter side in pixels
    max_size: int  # cap on the longer side
    rounding: str = "floor"  # "floor" (torchvision) | "round" (detectron2 ResizeShortestEdge)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        scale = min(self.min_size / min(height, width), self.max_size / max(height, width))
        if self.rounding == "round":
            return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))
        return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))

    def resize(self, image) -> torch.Tensor:
        """PIL RGB image -> uint8 (3, h, w) tensor at the detector's input size (bilinear, in the worker)."""
        from PIL import Image

        height, width = self.output_size(image.height, image.width)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, h, w)


@dataclass
class DetectorConfig:
    top_k: int = 10  # most objects kept per image (P-MNER: 5)
    score_threshold: float = 0.5  # objects scoring below are dropped (P-MNER: 0.95)
    min_size: int = 800  # shorter side the detector resizes to (torchvision default 800)
    weights: str | None = None  # local state-dict file; None = the library's COCO weights
    random_init: bool = False  # no weights at all (offline smoke runs)
    device: str = "cpu"
    amp: str = "fp16"  # autocast dtype on CUDA (backbone only): fp16 | bf16 | off; CPU always runs fp32
    channels_last: bool = True  # NHWC convolutions on CUDA (tensor cores); ignored on CPU


@dataclass
class Detections:
    """One batch's detections on the host: flat rows plus per-image counts (boxes in each image's pixels)."""

    boxes: np.ndarray  # (N, 4) float32 xyxy
    scores: np.ndarray  # (N,) float32
    class_ids: np.ndarray  # (N,) int32
    counts: np.ndarray  # (B,) int64, rows of image b are counts[:b].sum() ... counts[:b+1].sum()

    def split(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        bounds = np.concatenate([[0], np.cumsum(self.counts)]).astype(int)
        return [(self.boxes[a:b], self.scores[a:b], self.class_ids[a:b]) for a, b in itertools.pairwise(bounds)]


def _to_host_once(per_image: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Detections:
    """Filter, pack and copy a whole batch's results to the host in one transfer."""
    counts = np.array([len(scores) for _, scores, _ in per_image], np.int64)
    if not per_image or counts.sum() == 0:
        return Detections(
            np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32), counts
        )
    packed = torch.cat(
        [
            torch.cat([boxes.float(), scores.float()[:, None], labels.float()[:, None]], dim=1)
            for boxes, scores, labels in per_image
        ]
    )  # (N, 6) on the device
    host = packed.cpu().numpy()  # the one device->host copy of this batch
    return Detections(
        np.ascontiguousarray(host[:, :4]),
        np.ascontiguousarray(host[:, 4]),
        host[:, 5].astype(np.int32),
        counts,
    )


class Detector:
    """Base: subclasses set ``model_name``, ``class_names``, ``resize_spec`` and implement ``_forward``."""

    model_name = ""
    class_names: list[str] = []
    size_divisible = 32  # padded input sides are multiples of this (the backbone's stride)
    always_random = False  # test variants: random weights whatever the options say

    def __init__(self, config: DetectorConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.resize_spec = ResizeSpec(config.min_size, round(config.min_size * COCO_MAX_OVER_MIN))

    @property
    def random_weights(self) -> bool:
        return self.config.random_init or self.always_random

    @property
    def pretrained(self) -> str:
        if self.random_weights:
            return "random"
        if self.config.weights:
            return sha256_tag(self.config.weights)
        return self.library_weights()

    def library_weights(self) -> str:
        return "library default"

    def provenance_fields(self) -> dict:
        return {
            "model": self.model_name,
            "pretrained": self.pretrained,
            "preprocessing": {
                "min_size": self.resize_spec.min_size,
                "max_size": self.resize_spec.max_size,
                "resize": f"bilinear, sizes rounded by {self.resize_spec.rounding}",
                "batching": f"images batched only with images of the same padded size "
                f"(multiple of {self.size_divisible})",
                "masks": "not computed (only boxes are cached)",
            },
            "thresholds": {"top_k": self.config.top_k, "score_threshold": self.config.score_threshold},
        }

    def batch_key(self, height: int, width: int) -> tuple[int, int]:
        """Padded input size of a (resized) image: images with equal keys may share a forward."""
        step = self.size_divisible
        return (math.ceil(height / step) * step, math.ceil(width / step) * step)

    def autocast(self):
        return autocast_for(self.device, self.config.amp)

    @torch.inference_mode()
    def detect_batch(self, inputs: list[torch.Tensor], original_sizes: list[tuple[int, int]]) -> Detections:
        """``inputs``: uint8 (3, h, w) tensors at ``resize_spec`` size, all with one ``batch_key``;
        ``original_sizes``: (height, width) the boxes are returned in."""
        if not inputs:
            return _to_host_once([])
        keys = {self.batch_key(*image.shape[1:]) for image in inputs}
        if len(keys) != 1:
            raise ValueError(f"detect_batch needs one padded size per batch, got {sorted(keys)}")
        per_image = self._forward(
            [image.to(self.device, non_blocking=True) for image in inputs], original_sizes
        )
        kept = []
        for boxes, scores, labels in per_image:
            order = torch.argsort(scores, descending=True, stable=True)
            order = order[scores[order] >= self.config.score_threshold][: self.config.top_k]
            kept.append((boxes[order], scores[order], labels[order]))
        return _to_host_once(kept)

    def __call__(self, image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One PIL image (the one-image path; the batched path is :meth:`detect_batch`)."""
        detections = self.detect_batch([self.resize_spec.resize(image)], [(image.height, image.width)])
        return detections.split()[0]

    def _forward(self, inputs: list[torch.Tensor], original_sizes: list[tuple[int, int]]):
        raise NotImplementedError


class TorchvisionDetector(Detector):
    builder_name = ""
    weights_enum = ""

    def __init__(self, config: DetectorConfig):
        super().__init__(config)
        import torchvision.models.detection as detection

        self.weights_entry = getattr(detection, self.weights_enum).DEFAULT
        self.class_names = list(self.weights_entry.meta["categories"])
        with seeded_if_random(self.model_name, self.random_weights):
            self.model = self._build(config)
        if config.weights and not self.random_weights:
            state = torch.load(config.weights, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        self._drop_mask_head()
        self.model.eval().to(self.device)
        if self.device.type == "cuda" and config.channels_last:
            self.model.backbone.to(memory_format=torch.channels_last)
        transform = self.model.transform
        self.mean = torch.tensor(transform.image_mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(transform.image_std, device=self.device).view(1, 3, 1, 1) * 255.0

    def _build(self, config: DetectorConfig):
        import torchvision.models.detection as detection

        use_library_weights = not self.random_weights and not config.weights
        return getattr(detection, self.builder_name)(
            weights="DEFAULT" if use_library_weights else None,
            weights_backbone=None,
            num_classes=len(self.class_names),
            box_score_thresh=config.score_threshold,
            box_detections_per_img=max(config.top_k, 1),
            # random weights give meaningless proposals: scoring torchvision's 1000 per image only costs time
            **({"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 20} if self.random_weights else {}),
        )

    def library_weights(self) -> str:
        """The weights enum name and the sha256 of the file torch hub actually loaded."""
        from mner.features.producers.weights import pretrained_tag, torchvision_checkpoint

        return pretrained_tag(torchvision_checkpoint(self.weights_entry))

    def _drop_mask_head(self) -> None:
        """Masks are never stored: without a mask head the roi heads skip mask prediction and pasting."""
        heads = self.model.roi_heads
        if getattr(heads, "mask_roi_pool", None) is not None:
            heads.mask_roi_pool = heads.mask_head = heads.mask_predictor = None

    def _forward(self, inputs, original_sizes):
        from torchvision.models.detection.image_list import ImageList

        padded_h, padded_w = self.batch_key(*inputs[0].shape[1:])
        batch = torch.zeros(len(inputs), 3, padded_h, padded_w, device=self.device)  # (B, 3, Hp, Wp)
        for b, image in enumerate(inputs):
            h, w = image.shape[1:]
            batch[b, :, :h, :w] = (
                image.float()[None] - self.mean
            ) / self.std  # zero padding after normalising
        if self.device.type == "cuda" and self.config.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        sizes = [tuple(image.shape[1:]) for image in inputs]
        images = ImageList(batch, sizes)
        with self.autocast():  # the backbone is where the FLOPs are
            features = self.model.backbone(images.tensors)
        # torchvision decodes boxes in the dtype of the regression outputs: keep RPN and box heads in fp32
        features = {name: value.float() for name, value in features.items()}
        proposals, _ = self.model.rpn(images, features)
        # the box head per image: one matmul over the whole batch's proposals picks other kernels for other
        # batch sizes and moved scores by a float32 step with the batch mates (docs/features.md)
        detections = []
        for b, image_proposals in enumerate(proposals):
            image_features = {name: value[b:b + 1] for name, value in features.items()}
            detections += self.model.roi_heads(image_features, [image_proposals], [images.image_sizes[b]])[0]
        results = []
        for detection, (h, w), (orig_h, orig_w) in zip(detections, sizes, original_sizes):
            boxes = detection[
                "boxes"
            ].float()  # (k, 4) in resized pixels; python scalars: no host->device copy
            boxes = torch.stack(
                [
                    boxes[:, 0] * (orig_w / w),
                    boxes[:, 1] * (orig_h / h),
                    boxes[:, 2] * (orig_w / w),
                    boxes[:, 3] * (orig_h / h),
                ],
                dim=1,
            )
            results.append((boxes, detection["scores"].float(), detection["labels"]))
        return results


@register_detector("maskrcnn")
class MaskRCNN(TorchvisionDetector):
    """torchvision Mask R-CNN R50-FPN (VCRMNER's toolkit); only boxes are cached (mask head skipped)."""

    model_name = "torchvision/maskrcnn_resnet50_fpn"
    builder_name = "maskrcnn_resnet50_fpn"
    weights_enum = "MaskRCNN_ResNet50_FPN_Weights"


@register_detector("fasterrcnn")
class FasterRCNN(TorchvisionDetector):
    """torchvision Faster R-CNN R50-FPN (P-MNER's detector)."""

    model_name = "torchvision/fasterrcnn_resnet50_fpn"
    builder_name = "fasterrcnn_resnet50_fpn"
    weights_enum = "FasterRCNN_ResNet50_FPN_Weights"


@dataclass
class TinyDetectorShape:
    channels: tuple = (8, 16, 16)  # conv stages, each halving the resolution (stride 2**len(channels))
    representation: int = 32  # box-head MLP width
    mask_channels: int = 8  # mask head width (maskrcnn-test only; the head is dropped at inference)
    score_spread: float = 30.0  # class-logit weight scale, so random scores are distinct, not all ~1/91


class TinyBackbone(torch.nn.Module):
    """A few strided 3x3 convolutions: one feature map, ``out_channels`` wide (random weights)."""

    def __init__(self, channels: tuple):
        super().__init__()
        layers, previous = [], 3
        for width in channels:
            layers += [torch.nn.Conv2d(previous, width, 3, stride=2, padding=1), torch.nn.ReLU(inplace=True)]
            previous = width
        self.body = torch.nn.Sequential(*layers)
        self.out_channels = previous

    def forward(self, x):
        return {"0": self.body(x)}  # (B, C, H / 2**L, W / 2**L)


class TinyTorchvisionDetector(TorchvisionDetector):
    """The real torchvision R-CNN code path (RPN, RoIAlign, box head, NMS) on a few-layer backbone."""

    always_random = True
    shape = TinyDetectorShape()
    with_masks = False
    weights_enum = "FasterRCNN_ResNet50_FPN_Weights"  # only for the COCO class names

    def _build(self, config: DetectorConfig):
        from torchvision.models.detection import FasterRCNN as TorchFasterRCNN
        from torchvision.models.detection import MaskRCNN as TorchMaskRCNN
        from torchvision.models.detection.anchor_utils import AnchorGenerator
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
        from torchvision.ops import MultiScaleRoIAlign

        s = self.shape
        backbone = TinyBackbone(s.channels)
        num_classes = len(self.class_names)
        common = dict(
            num_classes=None,
            rpn_anchor_generator=AnchorGenerator(((32, 64, 128, 256),), ((0.5, 1.0, 2.0),)),
            box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
            box_head=TwoMLPHead(backbone.out_channels * 49, s.representation),
            box_predictor=FastRCNNPredictor(s.representation, num_classes),
            box_score_thresh=config.score_threshold,
            box_detections_per_img=max(config.top_k, 1),
            rpn_pre_nms_top_n_test=100,
            rpn_post_nms_top_n_test=20,
        )
        if not self.with_masks:
            model = TorchFasterRCNN(backbone, **common)
        else:
            model = TorchMaskRCNN(
                backbone,
                mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
                mask_head=MaskRCNNHeads(backbone.out_channels, (s.mask_channels,), 1),
                mask_predictor=MaskRCNNPredictor(s.mask_channels, s.mask_channels, num_classes),
                **common,
            )
        # spread the random class scores (default init gives ~1/91 everywhere: near-ties make top-k arbitrary)
        model.roi_heads.box_predictor.cls_score.weight.data.mul_(s.score_spread)
        return model

    @property
    def model_name(self) -> str:
        return f"torchvision/{'MaskRCNN' if self.with_masks else 'FasterRCNN'}(TinyBackbone {self.shape})"


@register_detector("fasterrcnn-test")
class FasterRCNNTest(TinyTorchvisionDetector):
    """Tiny random Faster R-CNN for tests and overhead benchmarks (COCO class names, always random)."""


@register_detector("maskrcnn-test")
class MaskRCNNTest(TinyTorchvisionDetector):
    """Tiny random Mask R-CNN: like ``fasterrcnn-test`` plus a mask head, which inference skips."""

    with_masks = True


@register_detector("detectron2")
class Detectron2Detector(Detector):
    """A detectron2 model-zoo config (``--detectron2-config``); zoo weights or ``--detector-weights``."""

    def __init__(
        self,
        config: DetectorConfig,
        detectron2_config: str = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml",
    ):
        super().__init__(config)
        try:
            from detectron2 import model_zoo
            from detectron2.checkpoint import DetectionCheckpointer
            from detectron2.config import get_cfg
            from detectron2.data import MetadataCatalog
            from detectron2.modeling import build_model
        except ImportError as error:
            raise RuntimeError(DETECTRON2_INSTALL) from error
        try:
            config_file = model_zoo.get_config_file(detectron2_config)
        except RuntimeError as error:
            raise ValueError(f"--detectron2-config {detectron2_config!r}: {error}") from None
        cfg = get_cfg()
        cfg.merge_from_file(config_file)
        cfg.MODEL.DEVICE = str(self.device)
        # the same min/max scaling as the torchvision detectors: MAX_SIZE_TEST follows MIN_SIZE_TEST
        cfg.INPUT.MIN_SIZE_TEST = config.min_size
        cfg.INPUT.MAX_SIZE_TEST = round(config.min_size * COCO_MAX_OVER_MIN)
        # RetinaNet (one-stage) reads its own thresholds; the R-CNNs read ROI_HEADS'
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = config.score_threshold
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = config.score_threshold
        cfg.TEST.DETECTIONS_PER_IMAGE = max(config.top_k, 1)
        cfg.MODEL.MASK_ON = False  # masks are not stored: skip the mask head
        self.cfg = cfg
        self.config_name = detectron2_config
        self.config_hash = sha256_tag(config_file)
        self.model_name = f"detectron2/{detectron2_config}"
        self.resize_spec = ResizeSpec(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, rounding="round")
        self.class_names = list(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", []))
        with seeded_if_random(self.model_name, self.random_weights):
            self.model = build_model(cfg).eval()
        self.size_divisible = max(int(self.model.backbone.size_divisibility), 1)
        self.checkpoint = ""
        if self.random_weights:
            self._identity_residuals()
        else:
            self.checkpoint = config.weights or model_zoo.get_checkpoint_url(detectron2_config)
            DetectionCheckpointer(self.model).load(self.checkpoint)
        self.model.to(self.device)
        self.bgr = cfg.INPUT.FORMAT == "BGR"

    def _identity_residuals(self) -> None:
        """Random weights: each bottleneck starts as the identity (zero last-norm scale), as our random
        ResNets do. With detectron2's frozen batch norm (mean 0, var 1) the random blocks otherwise
        compound until every score is 1.0 and every box degenerate, which leaves nothing to test."""
        for module in self.model.backbone.modules():
            norm = getattr(getattr(module, "conv3", None), "norm", None)
            if norm is not None and hasattr(norm, "weight"):
                norm.weight.data.zero_()

    @property
    def pretrained(self) -> str:
        if self.random_weights:
            return "random"
        from detectron2.utils.file_io import PathManager

        local = PathManager.get_local_path(self.checkpoint)  # the zoo's cached download or the local file
        return f"{self.checkpoint} ({sha256_tag(local)})"

    def provenance_fields(self) -> dict:
        fields = super().provenance_fields()
        fields["preprocessing"].update(
            detectron2_config=self.config_name,
            config_sha256=self.config_hash,
            input_format=self.cfg.INPUT.FORMAT,
        )
        fields["checkpoint"] = self.checkpoint or "none (random weights)"
        return fields

    def _forward(self, inputs, original_sizes):
        batch = [
            {"image": (image.flip(0) if self.bgr else image).float(), "height": h, "width": w}
            for image, (h, w) in zip(inputs, original_sizes)
        ]
        model = self.model
        if hasattr(model, "proposal_generator") and hasattr(model, "roi_heads"):  # the two-stage R-CNNs
            images = model.preprocess_image(batch)
            with self.autocast():  # the backbone is where the FLOPs are
                features = model.backbone(images.tensor)
            # proposals and box heads in fp32, as for torchvision: fp16 scores and box deltas sit near the
            # 0.95 threshold the papers use, and would move detections across it
            features = {name: value.float() for name, value in features.items()}
            proposals, _ = model.proposal_generator(images, features, None)
            results, _ = model.roi_heads(images, features, proposals, None)
            outputs = model._postprocess(results, batch, images.image_sizes)  # boxes at (height, width)
        else:  # one-stage detectors (RetinaNet): autocast as a whole
            with self.autocast():
                outputs = model(batch)  # eval mode: rescales boxes to (height, width)
        return [
            (
                out["instances"].pred_boxes.tensor.float(),
                out["instances"].scores.float(),
                out["instances"].pred_classes,
            )
            for out in outputs
        ]
