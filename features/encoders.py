"""Image encoders, registered by name: ``clip``, ``resnet152``, ``swin`` (+ ``resnet152-test``, ``swin-test``).

An encoder turns a list of RGB PIL images into per-image arrays (``encode_images``) and, when it has
crop features, a list of object crops into per-object arrays (``encode_crops``). The ``-test``
variants keep the real code path and output layout with a few layers, like timm's test models, so the
test-suite runs on a laptop CPU; the real architectures are exercised with ``--random-init``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mner.features.detectors import sha256_file

ENCODERS: dict[str, Callable[..., "Encoder"]] = {}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register_encoder(name: str):
    def decorator(factory):
        ENCODERS[name] = factory
        return factory
    return decorator


def create_encoder(name: str, **kwargs) -> "Encoder":
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; valid: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name](**kwargs)


@dataclass
class EncoderConfig:
    random_init: bool = False  # random weights, no download (offline smoke runs); recorded as "random"
    weights: str | None = None  # local checkpoint file/folder; None = the library's pretrained weights
    clip_model: str = "ViT-B-32"  # open_clip architecture name
    clip_pretrained: str = "openai"  # open_clip pretrained tag, or a local checkpoint file
    swin_model: str = "microsoft/swin-large-patch4-window12-384"  # hub name or local folder
    device: str = "cpu"


def _resize_normalize(images, size: int, mean, std) -> torch.Tensor:
    """Squash every image to size x size (no crop: objects at the border stay) and normalise."""
    from PIL import Image

    arrays = [np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
              for image in images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)  # (B, 3, size, size)
    return (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class Encoder:
    """Base: ``image_datasets``/``crop_datasets`` name the arrays ``encode_*`` return (per-row shape)."""

    name = ""
    model_name = ""
    image_datasets: dict[str, tuple[int, ...]] = {}
    crop_datasets: dict[str, tuple[int, ...]] = {}
    preprocessing: dict = {}

    def __init__(self, config: EncoderConfig):
        self.config = config
        self.device = torch.device(config.device)

    random_weights = False  # set by an encoder that built its model without loading weights (test variants)
    checkpoint: dict | None = None  # what was loaded: weights enum / tag / hub revision, file, sha256

    def pretrained(self) -> str:
        from mner.features.weights import pretrained_tag

        if self.config.random_init or self.random_weights:
            return "random"
        if self.config.weights:
            return sha256_file(self.config.weights) if Path(self.config.weights).is_file() else str(self.config.weights)
        return pretrained_tag(self.checkpoint or {}) or "unknown library weights"

    def provenance_fields(self) -> dict:
        fields = {"model": self.model_name, "pretrained": self.pretrained(), "preprocessing": self.preprocessing,
                  "thresholds": {}}
        if self.checkpoint and self.pretrained() != "random":
            fields["checkpoint"] = self.checkpoint
        return fields

    def attrs(self) -> dict:
        return {}

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return nullcontext()

    def encode_images(self, images) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def encode_crops(self, crops) -> dict[str, np.ndarray]:
        return {}


@register_encoder("clip")
class ClipEncoder(Encoder):
    """open_clip ViT: pooled image embedding, patch tokens, 224x224 crop embeddings (VCRMNER eq. 3)."""

    name = "clip"

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        import open_clip

        pretrained = None if config.random_init else (config.weights or config.clip_pretrained)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            config.clip_model, pretrained=pretrained, device=self.device)
        self.model.eval()
        if pretrained and not Path(pretrained).is_file():
            from mner.features.weights import open_clip_checkpoint

            self.checkpoint = open_clip_checkpoint(config.clip_model, pretrained)
        self.tokenizer = open_clip.get_tokenizer(config.clip_model)
        self.model_name = f"open_clip/{config.clip_model}"
        visual = self.model.visual
        self.has_tokens = hasattr(visual, "output_tokens")
        if self.has_tokens:
            visual.output_tokens = True  # forward returns (pooled, patch tokens after ln_post)
        size = visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        with torch.inference_mode():
            pooled, tokens = self._forward(torch.zeros(1, 3, self.image_size, self.image_size, device=self.device))
        self.image_datasets = {"image_embed": tuple(pooled.shape[1:])}
        if tokens is not None:
            self.image_datasets["patch_tokens"] = tuple(tokens.shape[1:])
        self.crop_datasets = {"crop_embed": tuple(pooled.shape[1:])}
        self.preprocessing = {"image": f"open_clip preprocess (resize {self.image_size} + center crop)",
                              "crop": f"resize {self.image_size}x{self.image_size} (VCRMNER)",
                              "mean": self.mean, "std": self.std,
                              "patch_tokens": "visual transformer tokens after ln_post, class token excluded"}

    def pretrained(self) -> str:
        if self.config.random_init:
            return "random"
        if self.config.weights or Path(self.config.clip_pretrained).is_file():
            return sha256_file(self.config.weights or self.config.clip_pretrained)
        return self.config.clip_pretrained

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    def attrs(self) -> dict:
        return {"logit_scale": self.logit_scale}

    def _forward(self, pixels: torch.Tensor):
        with self.autocast():
            output = self.model.visual(pixels)
        pooled, tokens = output if self.has_tokens else (output, None)
        return pooled.float(), (tokens.float() if tokens is not None else None)  # (B, D), (B, P, Dp)

    @torch.inference_mode()
    def encode_images(self, images):
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)  # (B, 3, S, S)
        pooled, tokens = self._forward(pixels)
        arrays = {"image_embed": pooled.cpu().numpy()}
        if tokens is not None:
            arrays["patch_tokens"] = tokens.cpu().numpy()
        return arrays

    @torch.inference_mode()
    def encode_crops(self, crops):
        pixels = _resize_normalize(crops, self.image_size, self.mean, self.std).to(self.device)
        pooled, _ = self._forward(pixels)
        return {"crop_embed": pooled.cpu().numpy()}

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)
        with self.autocast():
            return self.model.encode_text(tokens).float().cpu().numpy()  # (Q, D), not normalised


@register_encoder("resnet152")
class ResNetEncoder(Encoder):
    """torchvision ResNet-152: 7x7x2048 last-conv grid at 224x224, average-pooled 2048-d crop features."""

    name = "resnet152"
    blocks = (3, 8, 36, 3)
    input_size = 224

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        import torchvision.models as models
        from torchvision.models.resnet import Bottleneck, ResNet

        if self.blocks == (3, 8, 36, 3) and not config.random_init and not config.weights:
            from mner.features.weights import torchvision_checkpoint

            self.model = models.resnet152(weights="DEFAULT")
            self.checkpoint = torchvision_checkpoint(models.ResNet152_Weights.DEFAULT)
        else:
            self.random_weights = not config.weights  # the test variant has no pretrained weights
            # random init: each residual block starts as the identity (zero last-BN gamma); with default
            # init and eval-mode BN the 50 blocks of ResNet-152 compound until float16 overflows (~1e8)
            self.model = ResNet(Bottleneck, list(self.blocks), zero_init_residual=config.random_init)
            if config.weights and not config.random_init:
                self.model.load_state_dict(torch.load(config.weights, map_location="cpu", weights_only=True))
        self.model.eval().to(self.device)
        self.model_name = f"torchvision/resnet(bottleneck {list(self.blocks)})" if self.name != "resnet152" \
            else "torchvision/resnet152"
        grid = self.input_size // 32
        self.image_datasets = {"grid": (grid, grid, 2048)}
        self.crop_datasets = {"crop_pooled": (2048,)}
        self.preprocessing = {"resize": f"{self.input_size}x{self.input_size} (no crop)",
                              "mean": IMAGENET_MEAN, "std": IMAGENET_STD}

    def _grid(self, images) -> torch.Tensor:
        pixels = _resize_normalize(images, self.input_size, IMAGENET_MEAN, IMAGENET_STD).to(self.device)
        m = self.model
        with self.autocast():
            x = m.maxpool(m.relu(m.bn1(m.conv1(pixels))))
            x = m.layer4(m.layer3(m.layer2(m.layer1(x))))  # (B, 2048, 7, 7)
        return x.float()

    @torch.inference_mode()
    def encode_images(self, images):
        return {"grid": self._grid(images).permute(0, 2, 3, 1).cpu().numpy()}  # (B, 7, 7, 2048)

    @torch.inference_mode()
    def encode_crops(self, crops):
        return {"crop_pooled": self._grid(crops).mean(dim=(2, 3)).cpu().numpy()}  # (M, 2048)


@register_encoder("resnet152-test")
class ResNetTestEncoder(ResNetEncoder):
    """One bottleneck block per stage: ResNet-152's layout and output shapes at a tenth of the cost."""

    name = "resnet152-test"
    blocks = (1, 1, 1, 1)


@dataclass
class SwinShape:
    embed_dim: int = 192  # stage-1 channels (x8 at the last stage: 1536)
    depths: tuple = (2, 2, 18, 2)  # blocks per stage
    num_heads: tuple = (6, 12, 24, 48)  # attention heads per stage
    window_size: int = 12  # local attention window (tokens per side)
    image_size: int = 384  # input side: 384 / 32 = 12x12 output grid


@register_encoder("swin")
class SwinEncoder(Encoder):
    """Swin-L/4 w12 384 (ESPVR): last hidden state as a 12x12 grid of 1536-d regions."""

    name = "swin"
    shape = SwinShape()

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        from transformers import SwinConfig, SwinModel

        if self.name == "swin" and not config.random_init:
            source = config.weights or config.swin_model
            from mner.features.weights import hf_revision

            self.model = SwinModel.from_pretrained(source)
            self.model_name = f"transformers/{source}"
            self.checkpoint = hf_revision(self.model)
        else:
            self.random_weights = True  # built from a config: random weights, whatever the options say
            s = self.shape
            self.model = SwinModel(SwinConfig(image_size=s.image_size, patch_size=4, embed_dim=s.embed_dim,
                                              depths=list(s.depths), num_heads=list(s.num_heads),
                                              window_size=s.window_size))
            self.model_name = f"transformers/SwinModel({s})"
        self.model.eval().to(self.device)
        self.image_size = self.model.config.image_size
        grid = self.image_size // 32
        self.image_datasets = {"grid": (grid, grid, self.model.num_features)}
        self.preprocessing = {"resize": f"{self.image_size}x{self.image_size} (no crop)",
                              "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                              "grid": "last_hidden_state (after the final layer norm)"}

    def pretrained(self) -> str:
        if self.config.random_init or self.random_weights:
            return "random"
        revision = (self.checkpoint or {}).get("revision")
        return f"{self.config.weights or self.config.swin_model}@{revision}"

    @torch.inference_mode()
    def encode_images(self, images):
        pixels = _resize_normalize(images, self.image_size, IMAGENET_MEAN, IMAGENET_STD).to(self.device)
        with self.autocast():
            hidden = self.model(pixel_values=pixels).last_hidden_state.float()  # (B, 144, 1536)
        side = int(math.isqrt(hidden.shape[1]))
        return {"grid": hidden.reshape(hidden.shape[0], side, side, hidden.shape[2]).cpu().numpy()}


@register_encoder("swin-test")
class SwinTestEncoder(SwinEncoder):
    """Same 384 input and 12x12 grid with one block per stage and 256-d output (always random)."""

    name = "swin-test"
    shape = SwinShape(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
