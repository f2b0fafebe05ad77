"""Object detectors, registered by name: ``maskrcnn``, ``fasterrcnn`` (torchvision) and ``detectron2``.

A detector maps one RGB PIL image to (boxes xyxy in that image's pixels, scores, class ids), at most
``top_k`` objects with score >= ``score_threshold``, highest score first.

Images are detected **one at a time**: torchvision pads a batch to a common size, so an image's
detections would depend on its batch mates, and a sharded or resumed run would not equal a single run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

DETECTORS: dict[str, Callable[..., "Detector"]] = {}

DETECTRON2_INSTALL = (
    "detectron2 is not installed (it publishes no wheels). Build it from source, which needs a C++ "
    "compiler and an installed torch:\n"
    "    pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'\n"
    "or use --detector maskrcnn / fasterrcnn (torchvision). See docs/features.md#detectron2."
)


def register_detector(name: str):
    def decorator(factory):
        DETECTORS[name] = factory
        return factory
    return decorator


def create_detector(name: str, **kwargs) -> "Detector":
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; valid: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name](**kwargs)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


@dataclass
class DetectorConfig:
    top_k: int = 10  # most objects kept per image (P-MNER: 5)
    score_threshold: float = 0.5  # objects scoring below are dropped (P-MNER: 0.95)
    min_size: int = 800  # shorter side the detector resizes to (torchvision default 800)
    weights: str | None = None  # local state-dict file; None = the library's COCO weights
    random_init: bool = False  # no weights at all (offline smoke runs)
    device: str = "cpu"


class Detector:
    """Base class: subclasses set ``model_name``, ``class_names`` and implement ``_detect``."""

    model_name = ""
    class_names: list[str] = []
    checkpoint: dict | None = None  # library weights: enum name, file loaded, its sha256 (features/weights.py)

    def __init__(self, config: DetectorConfig):
        self.config = config

    @property
    def pretrained(self) -> str:
        from mner.features.weights import pretrained_tag

        if self.config.random_init:
            return "random"
        if self.config.weights:
            return sha256_file(self.config.weights)
        return pretrained_tag(self.checkpoint or {}) or "unknown library weights"

    def provenance_fields(self) -> dict:
        fields = {
            "model": self.model_name,
            "pretrained": self.pretrained,
            "preprocessing": {"min_size": self.config.min_size, "one_image_per_forward": True},
            "thresholds": {"top_k": self.config.top_k, "score_threshold": self.config.score_threshold},
        }
        if self.checkpoint and not self.config.random_init and not self.config.weights:
            fields["checkpoint"] = self.checkpoint
        return fields

    def __call__(self, image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        boxes, scores, classes = self._detect(image)
        keep = np.flatnonzero(scores >= self.config.score_threshold)[: self.config.top_k]
        return boxes[keep].astype(np.float32), scores[keep].astype(np.float32), classes[keep].astype(np.int32)

    def _detect(self, image):
        raise NotImplementedError


class TorchvisionDetector(Detector):
    builder_name = ""
    weights_enum = ""

    def __init__(self, config: DetectorConfig):
        super().__init__(config)
        import torchvision.models.detection as detection

        weights_enum = getattr(detection, self.weights_enum)
        self.class_names = list(weights_enum.DEFAULT.meta["categories"])
        use_library_weights = not config.random_init and not config.weights
        self.model = getattr(detection, self.builder_name)(
            weights="DEFAULT" if use_library_weights else None,
            weights_backbone=None,
            num_classes=len(self.class_names),
            min_size=config.min_size,
            max_size=round(config.min_size * 1333 / 800),
            box_score_thresh=config.score_threshold,
            box_detections_per_img=max(config.top_k, 1),
            # random weights give meaningless proposals: scoring torchvision's 1000 per image only costs time
            **({"rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 20} if config.random_init else {}),
        )
        if config.weights and not config.random_init:
            state = torch.load(config.weights, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        if use_library_weights:
            from mner.features.weights import torchvision_checkpoint

            self.checkpoint = torchvision_checkpoint(weights_enum.DEFAULT)
        self.model.eval().to(config.device)

    @torch.inference_mode()
    def _detect(self, image):
        import torchvision.transforms.functional as F

        tensor = F.pil_to_tensor(image).float().div_(255).to(self.config.device)  # (3, H, W)
        output = self.model([tensor])[0]
        return (output["boxes"].float().cpu().numpy(), output["scores"].float().cpu().numpy(),
                output["labels"].cpu().numpy())


@register_detector("maskrcnn")
class MaskRCNN(TorchvisionDetector):
    """torchvision Mask R-CNN R50-FPN (VCRMNER's visual toolkit); only boxes are cached."""

    model_name = "torchvision/maskrcnn_resnet50_fpn"
    builder_name = "maskrcnn_resnet50_fpn"
    weights_enum = "MaskRCNN_ResNet50_FPN_Weights"


@register_detector("fasterrcnn")
class FasterRCNN(TorchvisionDetector):
    """torchvision Faster R-CNN R50-FPN (P-MNER's detector)."""

    model_name = "torchvision/fasterrcnn_resnet50_fpn"
    builder_name = "fasterrcnn_resnet50_fpn"
    weights_enum = "FasterRCNN_ResNet50_FPN_Weights"


@register_detector("detectron2")
class Detectron2Detector(Detector):
    """A detectron2 model-zoo config (``--detectron2-config``); weights from the zoo or ``--detector-weights``."""

    def __init__(self, config: DetectorConfig, detectron2_config: str = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"):
        super().__init__(config)
        try:
            from detectron2 import model_zoo
            from detectron2.config import get_cfg
            from detectron2.data import MetadataCatalog
            from detectron2.engine import DefaultPredictor
        except ImportError as error:
            raise RuntimeError(DETECTRON2_INSTALL) from error
        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(detectron2_config))
        if config.random_init:
            cfg.MODEL.WEIGHTS = ""
        else:
            cfg.MODEL.WEIGHTS = config.weights or model_zoo.get_checkpoint_url(detectron2_config)
        cfg.MODEL.DEVICE = config.device
        cfg.INPUT.MIN_SIZE_TEST = config.min_size
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = config.score_threshold
        cfg.TEST.DETECTIONS_PER_IMAGE = max(config.top_k, 1)
        self.model_name = f"detectron2/{detectron2_config}"
        self.checkpoint = {"weights": cfg.MODEL.WEIGHTS}
        self.class_names = list(MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", []))
        self.predictor = DefaultPredictor(cfg)

    @torch.inference_mode()
    def _detect(self, image):
        bgr = np.asarray(image)[:, :, ::-1]  # detectron2's default input format is BGR
        instances = self.predictor(bgr)["instances"].to("cpu")
        return (instances.pred_boxes.tensor.numpy(), instances.scores.numpy(),
                instances.pred_classes.numpy())
