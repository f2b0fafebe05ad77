"""Frozen CLIP vision states over the stored grounding crops (group ``encoders/clip_grounding``).

MGIPS-CL fine-tunes the CLIP image encoder over its three 128x128 grounding crops; the trainer's fast
frozen mode reads these cached states instead (CONTRACT-10 section 2). Each crop is run alone at
128x128 with CLIP's position embeddings bicubically interpolated (7x7 -> 4x4 for ViT-B/32), so a row is
17 tokens: the class token, then the 4x4 patches of 32 px in row-major order. ``layers`` picks hidden
states: 0 is the embedding output after ``pre_layrnorm``, i the output of transformer layer i (no
``post_layernorm``), exactly what a fine-tuned tower started from the same weights produces at step 0.

The input is the stored uint8 crop, never the original image: adding this group to a cache later gives
the same numbers as computing it in the run that made the crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLIP_GROUNDING_DEFAULT = "openai/clip-vit-base-patch32"  # the paper's CLIP_IMAGE
DEFAULT_LAYERS = (6, 12)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipGroundingConfig:
    model: str = CLIP_GROUNDING_DEFAULT  # hub name or local folder of a CLIPVisionModel (or full CLIPModel)
    layers: tuple[int, ...] = DEFAULT_LAYERS  # hidden-state indices to keep
    random_init: bool = False  # a tiny random tower (12 layers, 32 wide, patch 32), nothing downloaded
    batch_size: int = 32  # crops per forward
    device: str = "cpu"


def tiny_clip_vision_config():
    """12 layers (so the default layers 6 and 12 exist), 32 wide, patch 32 on a 224 grid like ViT-B/32."""
    from transformers import CLIPVisionConfig

    from mner.features.producers.hub import TINY_TOWER

    return CLIPVisionConfig(**dict(TINY_TOWER, num_hidden_layers=12), image_size=224, patch_size=32,
                            projection_dim=32)


class ClipGroundingStates:
    """(G, 3, S, S) uint8 crops -> (G, len(layers), 1 + (S/patch)^2, D) float16 hidden states."""

    def __init__(self, config: ClipGroundingConfig):
        import torch
        from transformers import CLIPVisionModel

        from mner.features.producers.hub import hub_pretrained, pin_revision

        self.config = config
        commit = None
        if config.random_init:
            self.model = CLIPVisionModel(tiny_clip_vision_config())
            self.model_name = "transformers/CLIPVisionModel(tiny random: 12 layers, 32 wide, patch 32)"
        else:
            revision, commit = pin_revision(config.model)
            self.model = CLIPVisionModel.from_pretrained(config.model, revision=revision)
            self.model_name = f"transformers/CLIPVisionModel({config.model})"
        self.pretrained = hub_pretrained(config.model, self.model, random_init=config.random_init,
                                         commit=commit)
        depth = self.model.config.num_hidden_layers
        bad = [layer for layer in config.layers if not 0 <= layer <= depth]
        if bad or not config.layers:
            raise ValueError(f"--grounding-clip-layers {','.join(map(str, config.layers))}: each must be in "
                             f"0..{depth} (0 = embeddings, {depth} = last layer of {self.model_name})")
        self.model.eval().to(config.device)
        self.width = self.model.config.hidden_size
        self.patch = self.model.config.patch_size
        self._torch = torch

    def row_shape(self, crop_size: int) -> tuple[int, int, int]:
        return (len(self.config.layers), 1 + (crop_size // self.patch) ** 2, self.width)

    def attrs(self, crop_size: int) -> dict:
        return {"layers": list(self.config.layers), "image_size": crop_size, "patch_size": self.patch}

    def provenance_fields(self) -> dict:
        return {"model": self.model_name, "pretrained": self.pretrained,
                "preprocessing": {"input": "grounding/pixels (stored uint8 crops), /255, CLIP mean/std",
                                  "mean": CLIP_MEAN, "std": CLIP_STD, "interpolate_pos_encoding": True,
                                  "layers": list(self.config.layers),
                                  "layer_meaning": "0 = embeddings after pre_layrnorm, i = output of layer i"},
                "thresholds": {}}

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        torch = self._torch
        count, _, size, _ = pixels.shape
        out = np.zeros((count, *self.row_shape(size)), np.float16)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        for start in range(0, count, self.config.batch_size):
            batch = torch.from_numpy(np.asarray(pixels[start:start + self.config.batch_size])).float().div_(255)
            batch = ((batch - mean) / std).to(self.config.device)  # (b, 3, S, S)
            with torch.inference_mode():
                hidden = self.model(pixel_values=batch, output_hidden_states=True,
                                    interpolate_pos_encoding=True).hidden_states  # (depth+1) x (b, T, D)
            states = torch.stack([hidden[layer] for layer in self.config.layers], 1)  # (b, L, T, D)
            limit = float(np.finfo(np.float16).max)
            out[start:start + len(batch)] = states.float().clamp(-limit, limit).cpu().numpy().astype(np.float16)
        return out
