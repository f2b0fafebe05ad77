"""Image encoders, registered by name: ``clip``, ``resnet152``, ``swin`` and the test variants ``clip-test``,
``resnet152-test``, ``swin-test``.

An encoder declares the input it wants (:class:`InputSpec`: side, squash or centre crop, mean/std) and
maps normalised pixel batches on its device to per-image arrays (``forward_images``) and, when it has
crop features, per-object arrays (``forward_crops``). The loader's workers do the resizing (uint8), the
device does the normalisation, and encoders with the same input size share one resized batch of crops.
``encode_images`` / ``encode_crops`` take PIL images for the one-image paths (placeholder, tests).

The ``-test`` variants keep the real code path and output layout with a few layers, like timm's test
models, so the test-suite runs on a laptop CPU; they always have random weights and say so in provenance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mner.features.producers.detectors import autocast_for, seeded_if_random
from mner.pipeline.hashing import sha256_tag

ENCODERS: dict[str, Callable[..., Encoder]] = {}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_TEST_MODEL = "clip-test"  # --clip-model value (and --encoder name) of the tiny random CLIP


def register_encoder(name: str):
    def decorator(factory):
        ENCODERS[name] = factory
        return factory

    return decorator


def create_encoder(name: str, **kwargs) -> Encoder:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; valid: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name](**kwargs)


@dataclass
class EncoderConfig:
    random_init: bool = False  # random weights, no download (offline smoke runs); recorded as "random"
    weights: str | None = None  # local checkpoint file/folder; None = the library's pretrained weights
    clip_model: str = "ViT-B-32"  # open_clip architecture name (or "clip-test": the tiny random CLIP)
    clip_pretrained: str = "openai"  # open_clip pretrained tag, or a local checkpoint file
    swin_model: str = "microsoft/swin-large-patch4-window12-384"  # hub name or local folder
    device: str = "cpu"
    amp: str = "fp16"  # autocast dtype on CUDA: fp16 | bf16 | off (CPU always runs fp32)
    channels_last: bool = True  # NHWC convolutions on CUDA (ResNet); ignored on CPU


@dataclass(frozen=True)
class InputSpec:
    """The whole-image input an encoder wants; picklable, applied in the loader's workers."""

    size: int  # output side in pixels (square)
    mode: str = "squash"  # "squash": resize to size x size (no crop) | "center_crop": shorter side, then crop

    def resize(self, image) -> torch.Tensor:
        """PIL RGB image -> uint8 (3, size, size), bicubic (as the models' own preprocessing)."""
        from PIL import Image

        size = self.size
        if self.mode == "squash":
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        else:  # torchvision Resize(size) + CenterCrop(size), as open_clip's preprocess does
            short, long = sorted(image.size)
            new_long = int(size * long / short)
            new_size = (size, new_long) if image.width <= image.height else (new_long, size)
            if new_size != image.size:
                image = image.resize(new_size, Image.Resampling.BICUBIC)
            left = round((image.width - size) / 2.0)
            top = round((image.height - size) / 2.0)
            image = image.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, S, S)


_NORMALISERS: dict = {}


def normalize(pixels: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, S, S) in 0..255 or float in 0..1 -> float normalised, on the pixels' device.

    The (mean, std) tensors are made once per device: a fresh ``torch.tensor(..., device="cuda")`` per
    batch would be a synchronous host-to-device copy that stalls the pipeline."""
    scale = 255.0 if pixels.dtype == torch.uint8 else 1.0
    key = (pixels.device, tuple(mean), tuple(std), scale)
    if key not in _NORMALISERS:
        _NORMALISERS[key] = (
            torch.tensor(mean, device=pixels.device).view(1, 3, 1, 1) * scale,
            torch.tensor(std, device=pixels.device).view(1, 3, 1, 1) * scale,
        )
    mean_t, std_t = _NORMALISERS[key]
    return (pixels.float() - mean_t) / std_t


class Encoder:
    """Base: ``image_datasets``/``crop_datasets`` name the arrays the forwards return (per-row shape)."""

    name = ""
    model_name = ""
    always_random = False  # test variants: random weights whatever the options say
    image_datasets: dict[str, tuple[int, ...]] = {}
    crop_datasets: dict[str, tuple[int, ...]] = {}
    preprocessing: dict = {}
    image_input = InputSpec(224)
    crop_size: int | None = None  # crops are resized (squashed) to crop_size x crop_size; None = no crops
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __init__(self, config: EncoderConfig):
        self.config = config
        self.device = torch.device(config.device)

    @property
    def random_weights(self) -> bool:
        return self.config.random_init or self.always_random

    checkpoint: dict | None = (
        None  # library weights: enum / tag / hub revision, file loaded, sha256 (weights.py)
    )

    def pretrained(self) -> str:
        from mner.features.producers.weights import pretrained_tag

        if self.random_weights:
            return "random"
        if self.config.weights:
            return (
                sha256_tag(self.config.weights)
                if Path(self.config.weights).is_file()
                else str(self.config.weights)
            )
        return pretrained_tag(self.checkpoint or {}) or "unknown library weights"

    def provenance_fields(self) -> dict:
        fields = {
            "model": self.model_name,
            "pretrained": self.pretrained(),
            "preprocessing": self.preprocessing,
            "thresholds": {},
        }
        if self.checkpoint and not self.random_weights:
            fields["checkpoint"] = self.checkpoint
        return fields

    def attrs(self) -> dict:
        return {}

    def autocast(self):
        return autocast_for(self.device, self.config.amp)

    def forward_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised (B, 3, S, S) on the device -> dataset name -> float (B, ...) on the device."""
        raise NotImplementedError

    def forward_crops(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}

    @torch.inference_mode()
    def encode_images(self, images) -> dict[str, np.ndarray]:
        pixels = torch.stack([self.image_input.resize(image.convert("RGB")) for image in images]).to(
            self.device
        )
        return {
            k: v.cpu().numpy() for k, v in self.forward_images(normalize(pixels, self.mean, self.std)).items()
        }

    @torch.inference_mode()
    def encode_crops(self, crops) -> dict[str, np.ndarray]:
        if not self.crop_size:
            return {}
        spec = InputSpec(self.crop_size)
        pixels = torch.stack([spec.resize(crop.convert("RGB")) for crop in crops]).to(self.device)
        return {
            k: v.cpu().numpy() for k, v in self.forward_crops(normalize(pixels, self.mean, self.std)).items()
        }


@dataclass
class TinyClipShape:
    embed_dim: int = 64  # joint image/text embedding width
    width: int = 64  # vision and text transformer width
    layers: int = 2  # transformer blocks (vision and text each)
    head_width: int = 32  # attention head width (2 heads)
    patch_size: int = 32  # 224 / 32 = 7x7 = 49 patch tokens, as ViT-B-32


def build_tiny_clip(shape: TinyClipShape = TinyClipShape()):
    """A tiny open_clip ``CLIP`` (random weights, built offline) with ViT-B-32's token layout."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        layers=shape.layers,
        width=shape.width,
        head_width=shape.head_width,
        patch_size=shape.patch_size,
        image_size=224,
    )
    text = CLIPTextCfg(
        context_length=77,
        vocab_size=49408,
        width=shape.width,
        heads=shape.width // shape.head_width,
        layers=shape.layers,
    )
    return open_clip.CLIP(embed_dim=shape.embed_dim, vision_cfg=vision, text_cfg=text)


@register_encoder("clip")
class ClipEncoder(Encoder):
    """open_clip ViT: pooled image embedding, patch tokens, 224x224 crop embeddings (VCRMNER eq. 3)."""

    name = "clip"

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        import open_clip

        if config.clip_model == CLIP_TEST_MODEL:
            self.always_random = True
            with seeded_if_random(CLIP_TEST_MODEL, True):
                self.model = build_tiny_clip()
            self.model_name = f"open_clip/CLIP({TinyClipShape()})"
            self.tokenizer = open_clip.get_tokenizer("ViT-B-32")  # the bundled BPE vocabulary (offline)
        else:
            pretrained = None if config.random_init else (config.weights or config.clip_pretrained)
            self.model = open_clip.create_model(config.clip_model, pretrained=pretrained, device=self.device)
            self.model_name = f"open_clip/{config.clip_model}"
            if pretrained and not Path(pretrained).is_file():
                from mner.features.producers.weights import open_clip_checkpoint

                self.checkpoint = open_clip_checkpoint(config.clip_model, pretrained)
            self.tokenizer = open_clip.get_tokenizer(config.clip_model)
        self.model.eval().to(self.device)
        visual = self.model.visual
        self.has_tokens = hasattr(visual, "output_tokens")
        if self.has_tokens:
            visual.output_tokens = True  # forward returns (pooled, patch tokens after ln_post)
        size = visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.image_input = InputSpec(size, "center_crop")
        self.crop_size = size
        self.mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        with torch.inference_mode():
            probe = self.forward_images(torch.zeros(1, 3, size, size, device=self.device))
        self.image_datasets = {key: tuple(value.shape[1:]) for key, value in probe.items()}
        self.crop_datasets = {"crop_embed": self.image_datasets["image_embed"]}
        self.preprocessing = {
            "image": f"open_clip preprocess (resize {size} bicubic + center crop)",
            "crop": f"roi_align of the decoded image to {size}x{size} (VCRMNER)",
            "mean": self.mean,
            "std": self.std,
            "patch_tokens": "visual transformer tokens after ln_post, class token excluded",
        }

    @property
    def image_size(self) -> int:
        return self.image_input.size

    def pretrained(self) -> str:
        if self.random_weights:
            return "random"
        if self.config.weights or Path(self.config.clip_pretrained).is_file():
            return sha256_tag(self.config.weights or self.config.clip_pretrained)
        return self.config.clip_pretrained

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    def attrs(self) -> dict:
        return {"logit_scale": self.logit_scale}

    def _visual(self, pixels: torch.Tensor):
        with self.autocast():
            output = self.model.visual(pixels)
        pooled, tokens = output if self.has_tokens else (output, None)
        return pooled.float(), (tokens.float() if tokens is not None else None)  # (B, D), (B, P, Dp)

    def forward_images(self, pixels):
        pooled, tokens = self._visual(pixels)
        return {"image_embed": pooled} | ({"patch_tokens": tokens} if tokens is not None else {})

    def forward_crops(self, pixels):
        return {"crop_embed": self._visual(pixels)[0]}

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts).to(self.device)
        with self.autocast():
            return self.model.encode_text(tokens).float().cpu().numpy()  # (Q, D), not normalised


@register_encoder("clip-test")
class ClipTestEncoder(ClipEncoder):
    """Tiny random CLIP (2+2 layers, width 64, ViT-B-32 token layout); as ``--clip-model clip-test``."""

    name = "clip-test"

    def __init__(self, config: EncoderConfig):
        from dataclasses import replace

        super().__init__(replace(config, clip_model=CLIP_TEST_MODEL))


@register_encoder("resnet152")
class ResNetEncoder(Encoder):
    """torchvision ResNet-152: 7x7x2048 last-conv grid at 224x224, average-pooled 2048-d crop features."""

    name = "resnet152"
    blocks = (3, 8, 36, 3)
    image_input = InputSpec(224)
    crop_size = 224

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        import torchvision.models as models
        from torchvision.models.resnet import Bottleneck, ResNet

        if self.blocks == (3, 8, 36, 3) and not self.random_weights and not config.weights:
            from mner.features.producers.weights import torchvision_checkpoint

            self.model = models.resnet152(weights="DEFAULT")
            self.checkpoint = torchvision_checkpoint(models.ResNet152_Weights.DEFAULT)
        elif self.always_random:
            with seeded_if_random(self.name, True):
                self.model = build_tiny_resnet_grid()
        else:
            # random init: each residual block starts as the identity (zero last-BN gamma); with default
            # init and eval-mode BN the 50 blocks of ResNet-152 compound until float16 overflows (~1e8)
            self.model = ResNet(Bottleneck, list(self.blocks), zero_init_residual=self.random_weights)
            if config.weights and not self.random_weights:
                self.model.load_state_dict(torch.load(config.weights, map_location="cpu", weights_only=True))
        self.model.eval().to(self.device)
        self.channels_last = self.device.type == "cuda" and config.channels_last
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model_name = (
            "tiny-resnet-grid(4 strided convs, 1x1 to 2048)"
            if self.name != "resnet152"
            else "torchvision/resnet152"
        )
        grid = self.image_input.size // 32
        self.image_datasets = {"grid": (grid, grid, 2048)}
        self.crop_datasets = {"crop_pooled": (2048,)}
        self.preprocessing = {
            "resize": f"{self.image_input.size}x{self.image_input.size} bicubic (no crop)",
            "crop": "roi_align of the decoded image to 224x224",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
        }

    def _grid(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        m = self.model
        with self.autocast():
            x = m.maxpool(m.relu(m.bn1(m.conv1(pixels))))
            x = m.layer4(m.layer3(m.layer2(m.layer1(x))))  # (B, 2048, 7, 7)
        return x.float()

    def forward_images(self, pixels):
        return {"grid": self._grid(pixels).permute(0, 2, 3, 1)}  # (B, 7, 7, 2048)

    def forward_crops(self, pixels):
        return {"crop_pooled": self._grid(pixels).mean(dim=(2, 3))}  # (M, 2048)


def build_tiny_resnet_grid() -> torch.nn.Module:
    """Four strided 3x3 convs (224 -> 7) and a 1x1 lift to 2048 channels, ReLU'd like ResNet's last stage:
    ResNet-152's input size and (7, 7, 2048) grid at about 1/300 of its arithmetic."""
    import itertools

    from torch import nn

    widths = (3, 16, 32, 64, 128)
    layers: list[nn.Module] = [nn.Conv2d(3, 3, 7, stride=2, padding=3), nn.ReLU()]  # (B, 3, 112, 112)
    for cin, cout in itertools.pairwise(widths):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.ReLU()]  # halves the side: 112 -> 7
    layers += [nn.Conv2d(widths[-1], 2048, 1), nn.ReLU()]  # (B, 2048, 7, 7)
    return nn.Sequential(*layers)


@register_encoder("resnet152-test")
class ResNetTestEncoder(ResNetEncoder):
    """Tiny random stand-in with ResNet-152's input (224) and outputs (7x7x2048 grid, 2048-d crops)."""

    name = "resnet152-test"
    always_random = True  # so the base class builds build_tiny_resnet_grid, never torchvision's ResNet

    def _grid(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(pixels).float()  # (B, 2048, 7, 7)


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

        if self.name == "swin" and not self.random_weights:
            source = config.weights or config.swin_model
            from mner.features.producers.weights import hf_revision

            self.model = SwinModel.from_pretrained(source)
            self.model_name = f"transformers/{source}"
            self.checkpoint = hf_revision(self.model)  # the hub commit actually loaded
        else:
            s = self.shape
            with seeded_if_random(self.name, self.always_random):
                self.model = SwinModel(
                    SwinConfig(
                        image_size=s.image_size,
                        patch_size=4,
                        embed_dim=s.embed_dim,
                        depths=list(s.depths),
                        num_heads=list(s.num_heads),
                        window_size=s.window_size,
                    )
                )
            self.model_name = f"transformers/SwinModel({s})"
        self.model.eval().to(self.device)
        self.image_input = InputSpec(self.model.config.image_size)
        grid = self.image_input.size // 32
        self.image_datasets = {"grid": (grid, grid, self.model.num_features)}
        self.preprocessing = {
            "resize": f"{self.image_input.size}x{self.image_input.size} bicubic (no crop)",
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "grid": "last_hidden_state (after the final layer norm)",
        }

    def pretrained(self) -> str:
        if self.random_weights:
            return "random"
        return f"{self.config.weights or self.config.swin_model}@{(self.checkpoint or {}).get('revision')}"

    def forward_images(self, pixels):
        with self.autocast():
            hidden = self.model(pixel_values=pixels).last_hidden_state.float()  # (B, 144, 1536)
        side = math.isqrt(hidden.shape[1])
        return {"grid": hidden.reshape(hidden.shape[0], side, side, hidden.shape[2])}  # (B, 12, 12, 1536)


@register_encoder("swin-test")
class SwinTestEncoder(SwinEncoder):
    """Same 384 input and 12x12 grid with one block per stage and 256-d output (always random)."""

    name = "swin-test"
    shape = SwinShape(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
    always_random = True
