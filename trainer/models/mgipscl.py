"""MGIPS-CL: Multi-Granularity Interweave + Implicit Positive Sample Contrastive Learning, one file.

Reads top to bottom like the paper's section 3:

- 3.1 text embedding S^e (eq. 1: BERT's own embeddings) and the visual embedding V^e of the
  grounding crops (3 crops x 4x4 patches of 32 px, class token, positions);
- 3.2 the mutual-attention encoder (eq. 2-4): every BERT layer's queries attend over
  ``[vision keys/values of the matching CLIP layer ; the text's own keys/values]``;
- 3.3 the Multi-Granularity Interweave module: the Multi-Granularity Excavator (MGE, eq. 5-9) with
  row- and column-grained weights, the Interweave Encoder (eq. 10-11, shared image-/text-guided MGEs,
  one more image-guided than text-guided) and the pre-post adaptive gate (eq. 12-13);
- 3.4 IPS-CL (eq. 14-16, top-K in-batch implicit positives) + the standard contrastive loss (eq. 17);
- 3.5 the CRF decoder; loss = CRF + IPS-CL + CL (eq. 19).

Two vision modes (docs/models/mgipscl.md):

- ``finetune`` (the paper): the model owns a CLIP vision tower (transformers ``CLIPVisionModel``) run
  over the cached 128x128 crop pixels (``grounding/pixels``) and fine-tuned in its own parameter group
  at ``clip_lr`` (3e-5). Vision keys/values come from the CLIP layers' own ``k_proj``/``v_proj``.
- ``frozen``: cached CLIP hidden states of the crops (``encoders/clip_grounding/states``, a few
  layers, float16); the model's own LayerNorm + key/value projections turn them into keys/values.
  No CLIP forward or backward per step.

Each crop is a separate CLIP sequence (class token + 4x4 patches = 17 tokens) and the text attends
over the concatenation of the crops' tokens: the paper runs one class token over all 48 patches;
per-crop sequences let frozen mode cache a crop's states without knowing the other crops.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mner.trainer.inputs.text_encoder import load_encoder
from mner.trainer.models import register_model
from mner.trainer.models.layers import BIOConstrainedCRF, crf_loss_and_decode, gather_first_pieces, init_linear

PIXELS = "grounding/pixels"
CROP_MASK = "grounding/mask"
CROP_OFFSETS = "grounding/offsets"
STATES_GROUP = "encoders/clip_grounding"
STATES = f"{STATES_GROUP}/states"
IMAGE_OK = "images/ok"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pixel normalisation (open_clip / transformers)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_CLIP = "tiny-random"  # clip_model value that builds a tiny random tower (tests, smoke runs)
RANDOM_B32 = "random-vit-b-32"  # clip_model value: ViT-B/32's shape with random weights (offline benchmarks)
VISION_MODES = ("finetune", "frozen")


@dataclass
class MGIPSCLConfig:
    vision_mode: str = "finetune"  # finetune (paper: own CLIP tower over crop pixels) | frozen (cached CLIP states)
    # finetune: CLIPVisionModel hub name/folder; tiny-random | random-vit-b-32
    clip_model: str = "openai/clip-vit-base-patch32"
    clip_lr: float = 3e-5  # learning rate of the CLIP vision tower's parameter group (sec. 4.3)
    max_crops: int = 3  # grounding crops per image read from the cache (sec. 3.1.2: three)
    num_heads: int = 12  # heads of the MGE's guide-to-subject attention (f_2) (sec. 4.3: 12 heads)
    use_mgi: bool = True  # False = "w/o MGI": mutual-attention text states go straight to the CRF
    use_row_grained: bool = True  # False = "w/o Row-grained": drop V_C (eq. 6-8)
    use_column_grained: bool = True  # False = "w/o Column-grained": drop V_F (eq. 6-8)
    # ours, off in every paper preset: multiply M_C by the number of positions and M_F by d (mean weight 1)
    rescale_mge_weights: bool = False
    num_interweave: int = 1  # stacked Interweave Encoders (sec. 3.3.2 / 4.6.2: 1 is best)
    use_ips_cl: bool = True  # False = "w/o IPS-CL": no eq. 16 term
    use_standard_cl: bool = True  # eq. 17 term
    top_k: int = 3  # K implicit positives per text (sec. 4.3: 3; sensitivity 1-6)
    temperature: float = 0.1  # tau of eq. 16-17 (not stated in the paper)
    contrastive_dim: int = 256  # width of the f/g projections of eq. 14 (not stated in the paper)
    dropout: float = 0.1  # dropout in MGE encoders and before the emission layer


# ----------------------------------------------------------------------------------------------
# 3.1-3.2  Visual embedding and the vision side of the mutual-attention encoder
# ----------------------------------------------------------------------------------------------


def build_clip_tower(name: str) -> nn.Module:
    """A transformers CLIP vision tower: the hub name / folder, or a tiny random one for tests."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if name == TINY_CLIP:
        warnings.warn("mgipscl: clip_model=tiny-random builds a RANDOM CLIP tower (tests only)", stacklevel=2)
        config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=64, patch_size=16)
        return CLIPVisionModel(config)
    if name == RANDOM_B32:
        warnings.warn("mgipscl: clip_model=random-vit-b-32 builds a RANDOM ViT-B/32 tower (benchmarks only)",
                      stacklevel=2)
        return CLIPVisionModel(CLIPVisionConfig())  # transformers' defaults are ViT-B/32: 768 wide, 12 layers, patch 32
    try:
        return CLIPVisionModel.from_pretrained(name)
    except OSError:  # not downloadable (offline) and not in the local hub cache, or no such folder
        raise ValueError(
            f"mgipscl: cannot load the CLIP vision tower {name!r} (offline, or no such folder); pass a local copy "
            f"with --set clip_model=FOLDER, or train without it: --set vision_mode=frozen (cached CLIP states) "
            f"or --set clip_model={RANDOM_B32} (random weights)"
        ) from None


def clip_layer_takes_causal_mask(layer_class: type) -> bool:
    """Whether a transformers CLIP encoder layer's forward has the positional ``causal_attention_mask``
    argument (transformers 4.x) or not (5.x): the crop encoder passes None for it when it exists."""
    import inspect

    return "causal_attention_mask" in inspect.signature(layer_class.forward).parameters


class CLIPCropEncoder(nn.Module):
    """Fine-tuned CLIP over each crop: V^e (eq. 3) and every layer's keys/values (eq. 2).

    Crops smaller than the tower's training size get bicubically interpolated position embeddings
    (7x7 -> 4x4 for ViT-B/32 at 128 px), as CLIP's own ``interpolate_pos_encoding`` does.
    """

    def __init__(self, name: str):
        super().__init__()
        model = build_clip_tower(name)
        self.tower = getattr(model, "vision_model", model)  # transformers 4 wraps it, 5 does not
        config = self.tower.config if hasattr(self.tower, "config") else model.config
        self.width = config.hidden_size
        self.patch_size = config.patch_size
        self.depth = config.num_hidden_layers
        # transformers 4.x: forward(hidden, attention_mask, causal_attention_mask, ...); 5.x: (hidden, attention_mask)
        self.layer_takes_causal_mask = clip_layer_takes_causal_mask(type(self.tower.encoder.layers[0]))
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(C, 3, H, W) uint8 -> V^e (C, 1 + (H/p)(W/p), D): class token + patches + positions."""
        embeddings = self.tower.embeddings
        images = (pixels.float() / 255.0 - self.mean) / self.std  # (C, 3, H, W)
        patches = embeddings.patch_embedding(images.to(embeddings.patch_embedding.weight.dtype))  # (C, D, h, w)
        grid_h, grid_w = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)  # (C, h*w, D)
        cls = embeddings.class_embedding.expand(patches.size(0), 1, -1)  # (C, 1, D)
        positions = embeddings.position_embedding.weight  # (1 + s*s, D)
        side = math.isqrt(positions.size(0) - 1)
        grid_pos = positions[1:]
        if (grid_h, grid_w) != (side, side):
            grid_pos = grid_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, s, s)
            grid_pos = F.interpolate(grid_pos, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
            grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)  # (h*w, D)
        tokens = torch.cat([cls, patches], dim=1) + torch.cat([positions[:1], grid_pos], dim=0)  # (C, T, D)
        return self.tower.pre_layrnorm(tokens)

    def forward(self, pixels: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Per vision layer i (0 = V^e itself, eq. 3; i >= 1 = layer i's k_proj/v_proj, eq. 2) its keys and
        values (C, T, D), and the tower's final states H^v after ``post_layernorm`` (C, T, D)."""
        hidden = self.embed(pixels)  # V^e (C, T, D)
        keys_values = [(hidden, hidden)]
        for layer in self.tower.encoder.layers:
            normed = layer.layer_norm1(hidden)
            keys_values.append((layer.self_attn.k_proj(normed), layer.self_attn.v_proj(normed)))  # K_i^v, V_i^v
            out = layer(hidden, None, None) if self.layer_takes_causal_mask else layer(hidden, None)
            hidden = out[0] if isinstance(out, tuple) else out  # (C, T, D)
        return keys_values, self.tower.post_layernorm(hidden)


class CachedStateKeys(nn.Module):
    """Frozen mode: cached CLIP hidden states of a few layers -> keys/values via the model's own
    LayerNorm + projections, one set per cached layer that some text layer reads (``used``); the
    last cached layer, normalised, is H^v."""

    def __init__(self, width: int, used: list[int]):
        super().__init__()
        self.used = sorted(set(used))
        self.norms = nn.ModuleDict({str(s): nn.LayerNorm(width) for s in self.used})
        self.keys = nn.ModuleDict({str(s): nn.Linear(width, width) for s in self.used})
        self.values = nn.ModuleDict({str(s): nn.Linear(width, width) for s in self.used})
        self.final_norm = nn.LayerNorm(width)
        init_linear(self)

    def forward(self, states: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor] | None], torch.Tensor]:
        # states: (C, S, T, D) cached hidden states of the S cached layers
        keys_values: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * states.size(1)
        for s in self.used:
            normed = self.norms[str(s)](states[:, s])  # (C, T, D)
            keys_values[s] = (self.keys[str(s)](normed), self.values[str(s)](normed))
        return keys_values, self.final_norm(states[:, -1])


def vision_index_for_text_layer(text_layer: int, text_depth: int, vision_depth: int, available: list[int]) -> int:
    """Position in ``available`` (sorted vision hidden-state indices) of the keys/values that text layer
    ``text_layer`` (1-based) reads. eq. 2 pairs text layer l+1 with vision layer l (l = 0: V^e); depths
    that differ are mapped proportionally; of the available indices the last one at or below the
    wanted one is used, else the first (frozen mode caches only a few layers)."""
    wanted = round((text_layer - 1) * vision_depth / text_depth)
    below = [i for i, layer in enumerate(available) if layer <= wanted]
    return below[-1] if below else 0


class MutualAttentionLayer(nn.Module):
    """One pretrained BERT layer whose self-attention also reads vision keys/values (eq. 2-4).

    The layer's modules are moved here (not copied): Q from the text, K = [K^v ; H^t W^k],
    V = [V^v ; H^t W^v], one softmax over both, then BERT's own output, FFN and LayerNorms.
    """

    def __init__(self, pretrained_layer: nn.Module, vision_width: int):
        super().__init__()
        try:
            attention = pretrained_layer.attention.self
            self.query, self.key, self.value = attention.query, attention.key, attention.value
            self.attention_dropout = attention.dropout
            self.num_heads = attention.num_attention_heads
            self.attention_output = pretrained_layer.attention.output
            self.intermediate = pretrained_layer.intermediate
            self.output = pretrained_layer.output
        except AttributeError as err:
            raise ValueError(
                f"mgipscl runs the text encoder's layers itself (BERT/RoBERTa style: attention.self.query/key/value,"
                f" intermediate, output); this encoder's layer has no {err.name!r}. Use a BERT-like --text-encoder."
            ) from None
        width = self.query.out_features
        # vision keys/values in the text's width; identity when the widths already match (the paper's 768/768)
        self.vision_key = nn.Identity() if vision_width == width else nn.Linear(vision_width, width)
        self.vision_value = nn.Identity() if vision_width == width else nn.Linear(vision_width, width)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)  # (B, h, S, d)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, vision_kv: tuple[torch.Tensor, torch.Tensor],
                vision_mask: torch.Tensor) -> torch.Tensor:
        # text: (B, L, H); text_mask: (B, L) bool; vision_kv: 2 x (B, V, Dv); vision_mask: (B, V) bool
        queries = self.split_heads(self.query(text))  # Q^t (B, h, L, d)
        keys = torch.cat([self.vision_key(vision_kv[0]), self.key(text)], dim=1)  # K^t = [K^v, H^t W^k] (B, V+L, H)
        values = torch.cat([self.vision_value(vision_kv[1]), self.value(text)], dim=1)  # (B, V+L, H)
        scores = queries @ self.split_heads(keys).transpose(-1, -2) / math.sqrt(queries.size(-1))  # (B, h, L, V+L)
        attendable = torch.cat([vision_mask, text_mask], dim=1)  # (B, V+L)
        scores = scores.masked_fill(~attendable[:, None, None, :], torch.finfo(scores.dtype).min)
        weights = self.attention_dropout(scores.softmax(dim=-1))
        context = (weights @ self.split_heads(values)).transpose(1, 2).flatten(2)  # (B, L, H)
        attended = self.attention_output(context, text)
        return self.output(self.intermediate(attended), attended)  # H^t_{l+1} (B, L, H)


# ----------------------------------------------------------------------------------------------
# 3.3  Multi-Granularity Interweave module
# ----------------------------------------------------------------------------------------------


class MultiGranularityExcavator(nn.Module):
    """MGE(guide, subject) -> (B, n, d) with n = the subject's length (eq. 5-9).

    eq. 5: M_im = f1(Linear1(subject)) (.) f2(Linear2(guide)). The guide may be longer or shorter than
    the subject (H^v has 3 x 17 crop tokens, H^t n pieces): f2 "converts into a unified dimension"
    by letting each subject position attend over the guide (plus an always-present null key, so a post
    with no crop gets a defined result).
    eq. 6, row-grained, as written: M_C = softmax over the n positions of M_im M_3 (M_3 in R^{d x 1}):
    one weight per position (B, n, 1). Column-grained: eq. 6 as written (M_im M_4, a softmax over
    its single column) is identically 1; our reading is one weight per feature, M_F = softmax over
    the d features of m_4 (.) (mean of M_im over the subject's positions) (B, 1, d), m_4 in R^d.
    eq. 7-8: X = f3(M_F (.) s + M_C (.) s), s = f1(Linear1(subject)). ``rescale`` (ours, off in the
    paper presets) multiplies M_C by n and M_F by d, so that the average weight is 1.
    """

    def __init__(self, width: int, *, num_heads: int, dropout: float, use_row: bool, use_column: bool,
                 rescale: bool = False):
        super().__init__()
        if not (use_row or use_column):
            raise ValueError("mgipscl: use_row_grained and use_column_grained cannot both be false (that is w/o MGI: "
                             "set use_mgi=false)")
        self.use_row, self.use_column, self.rescale = use_row, use_column, rescale
        self.subject_in = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width)
        )
        self.guide_in = nn.Linear(width, width)  # Linear_2
        self.null_guide = nn.Parameter(torch.zeros(1, 1, width))
        self.unify = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)  # f_2
        self.row_weight = nn.Parameter(torch.randn(width, 1) / math.sqrt(width)) if use_row else None  # M_3 (d, 1)
        self.column_weight = nn.Parameter(torch.randn(width) / math.sqrt(width)) if use_column else None  # m_4 (d,)
        self.out = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width),
                                 nn.LayerNorm(width))  # f_3
        init_linear(self)
        nn.init.normal_(self.null_guide, std=0.02)

    def interaction(self, guide: torch.Tensor, guide_mask: torch.Tensor,
                    subject: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """eq. 5: (M_im, f1(Linear1(subject))), both (B, n, d)."""
        batch_size = subject.size(0)
        subject_enc = self.subject_in(subject)  # f1(Linear1(subject)) (B, n, d)
        guide_keys = torch.cat([self.null_guide.expand(batch_size, -1, -1), self.guide_in(guide)], dim=1)  # (B, 1+m, d)
        guide_pad = torch.cat([guide_mask.new_zeros(batch_size, 1), ~guide_mask], dim=1)  # (B, 1+m)
        guide_enc, _ = self.unify(subject_enc, guide_keys, guide_keys, key_padding_mask=guide_pad,
                                  need_weights=False)  # f2(Linear2(guide)) at the subject's positions (B, n, d)
        return subject_enc * guide_enc, subject_enc  # M_im (B, n, d), eq. 5

    def row_weights(self, interaction: torch.Tensor, subject_mask: torch.Tensor) -> torch.Tensor:
        """M_C = softmax over positions of M_im M_3 (B, n, 1); padded positions get 0."""
        scores = (interaction @ self.row_weight).masked_fill(~subject_mask[..., None],
                                                             torch.finfo(interaction.dtype).min)  # (B, n, 1)
        weights = scores.softmax(dim=-2)  # (B, n, 1), sums to 1 over the valid positions
        if self.rescale:
            weights = weights * subject_mask.sum(1).clamp(min=1).to(weights.dtype)[:, None, None]
        return weights

    def column_weights(self, interaction: torch.Tensor, subject_mask: torch.Tensor) -> torch.Tensor:
        """M_F = softmax over features of m_4 (.) mean_positions(M_im) (B, 1, d)."""
        valid = subject_mask[..., None].to(interaction.dtype)  # (B, n, 1)
        pooled = (interaction * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1.0)  # (B, 1, d)
        weights = (pooled * self.column_weight).softmax(dim=-1)  # (B, 1, d), sums to 1 over the features
        return weights * interaction.size(-1) if self.rescale else weights

    def forward(self, guide: torch.Tensor, guide_mask: torch.Tensor, subject: torch.Tensor,
                subject_mask: torch.Tensor) -> torch.Tensor:
        # guide: (B, m, d), guide_mask: (B, m) bool; subject: (B, n, d), subject_mask: (B, n) bool
        interaction, subject_enc = self.interaction(guide, guide_mask, subject)  # (B, n, d) x 2
        fused = torch.zeros_like(subject_enc)
        if self.use_row:
            fused = fused + self.row_weights(interaction, subject_mask) * subject_enc  # V_C, eq. 7
        if self.use_column:
            fused = fused + self.column_weights(interaction, subject_mask) * subject_enc  # V_F, eq. 7
        return self.out(fused) * subject_mask[..., None]  # X (B, n, d), eq. 8


class InterweaveEncoder(nn.Module):
    """eq. 9-11 in Figure 3's order: image-guided MGE 1 (X_0 = MGE(H^v, H^t)), then per interweave layer
    a text-guided MGE (T_l = T_{l-1} + MGE(T_{l-1}, X_{l-1})) and an image-guided one
    (X_l = X_{l-1} + MGE(X_{l-1}, T_l)): one more image-guided than text-guided, each kind one shared
    module. The last image-guided output X_L feeds IPS-CL; T_L the pre-post gate."""

    def __init__(self, width: int, *, num_layers: int, num_heads: int, dropout: float, use_row: bool, use_column: bool,
                 rescale: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"mgipscl: num_interweave must be >= 1, got {num_layers}")
        kwargs = dict(num_heads=num_heads, dropout=dropout, use_row=use_row, use_column=use_column, rescale=rescale)
        self.image_guided = MultiGranularityExcavator(width, **kwargs)
        self.text_guided = MultiGranularityExcavator(width, **kwargs)
        self.num_layers = num_layers

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, vision: torch.Tensor,
                vision_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        interwoven_visual = self.image_guided(vision, vision_mask, text, text_mask)  # X_0 (B, n, d), MGE 1
        interwoven_text = text  # T_0 = H^t
        for _ in range(self.num_layers):
            interwoven_text = interwoven_text + self.text_guided(interwoven_text, text_mask,
                                                                 interwoven_visual, text_mask)
            interwoven_visual = interwoven_visual + self.image_guided(interwoven_visual, text_mask,
                                                                      interwoven_text, text_mask)
        return interwoven_text, interwoven_visual  # T^t, X^v (B, n, d)


class PrePostGate(nn.Module):
    """eq. 12-13: I = sigmoid(W1 T^t + W2 H^t + b); z = I (.) H^t + (1 - I) (.) T^t."""

    def __init__(self, width: int):
        super().__init__()
        self.post = nn.Linear(width, width, bias=False)  # W_1
        self.pre = nn.Linear(width, width)  # W_2, b
        init_linear(self)

    def forward(self, pre_fusion: torch.Tensor, post_fusion: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.post(post_fusion) + self.pre(pre_fusion))  # I (B, n, d)
        return gate * pre_fusion + (1 - gate) * post_fusion  # z


# ----------------------------------------------------------------------------------------------
# 3.4  Contrastive losses
# ----------------------------------------------------------------------------------------------


def ips_contrastive_loss(similarity: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """eq. 15-16 over a (N texts, N images) cosine-similarity matrix: for text i the K images with the
    highest sim(t_i, v_j) (its own image included when it ranks) are the positives of one InfoNCE term.
    The top-K choice is an index (no gradient); the chosen similarities carry it."""
    k = min(top_k, similarity.size(1))
    logits = similarity / temperature  # (N, N)
    positives = logits.topk(k, dim=1).values  # (N, K)
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(positives, dim=1)).mean()


def standard_contrastive_loss(similarity: torch.Tensor, temperature: float) -> torch.Tensor:
    """eq. 17: the post's own image is the one positive of text i."""
    logits = similarity / temperature  # (N, N)
    return (torch.logsumexp(logits, dim=1) - logits.diagonal()).mean()


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(states.dtype).unsqueeze(-1)  # (B, S, 1)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # (B, d)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


@register_model("mgipscl")
class MGIPSCL(nn.Module):
    Config = MGIPSCLConfig
    # Sec. 4.3 (+ 4.6: 40 epochs). Fields that are not MGIPSCLConfig fields belong to TrainConfig.
    # The paper gives one lr for BERT (5e-5) and one for CLIP (3e-5). Each value it does not state is
    # marked "NOT STATED" with where ours comes from (also listed in docs/models/mgipscl.md).
    PRESETS: ClassVar[dict[str, dict]] = {
        "paper": dict(
            text_encoder="bert-base-uncased", max_length=40, num_heads=12, warmup_ratio=0.06, encoder_lr=5e-5,
            clip_lr=3e-5, weight_decay=1e-2, top_k=3, epochs=40, patience=0, rescale_mge_weights=False,
            head_lr=5e-5,  # NOT STATED: the fusion layers share BERT's rate
            crf_lr=1e-2,  # NOT STATED: the trainer's CRF default
            batch_size=16,  # NOT STATED: HVPNeT's (whose grounding crops the paper uses)
            temperature=0.1,  # NOT STATED: tau of eq. 16-17
            contrastive_dim=256,  # NOT STATED: width of f and g (eq. 14)
            dropout=0.1,  # NOT STATED: the head's dropout
        ),
    }
    PRESETS["w/o IPS-CL"] = {**PRESETS["paper"], "use_ips_cl": False}
    PRESETS["w/o MGI"] = {**PRESETS["paper"], "use_mgi": False}
    PRESETS["w/o Row-grained"] = {**PRESETS["paper"], "use_row_grained": False}
    PRESETS["w/o Column-grained"] = {**PRESETS["paper"], "use_column_grained": False}
    for _k in range(1, 7):
        PRESETS[f"K={_k}"] = {**PRESETS["paper"], "top_k": _k}
    for _n in range(1, 8):
        PRESETS[f"interweave={_n}"] = {**PRESETS["paper"], "num_interweave": _n}
    PRESETS["frozen"] = {**PRESETS["paper"], "vision_mode": "frozen"}
    del _k, _n
    # tiny test variant: what tests and smoke runs override (timm-style, beside the real settings)
    TINY_OVERRIDES: ClassVar[dict] = {"clip_model": TINY_CLIP}

    @staticmethod
    def required_features(config: MGIPSCLConfig) -> list[str]:
        if config.vision_mode not in VISION_MODES:
            raise ValueError(f"mgipscl: vision_mode={config.vision_mode!r}; valid values: {', '.join(VISION_MODES)}")
        return [CROP_OFFSETS, PIXELS if config.vision_mode == "finetune" else STATES]

    def __init__(self, config: MGIPSCLConfig, *, labels: list[str], text_encoder: str, tokenizer=None, features=None):
        super().__init__()
        if features is None:
            raise ValueError(
                "mgipscl reads cached grounding crops: pass --features <cache.h5> (see docs/models/mgipscl.md)"
            )
        self.required_features(config)  # validates vision_mode
        if config.top_k < 1:
            raise ValueError(f"mgipscl: top_k must be >= 1, got {config.top_k}")
        self.config = config
        self.labels = list(labels)
        self.text_encoder = load_encoder(text_encoder)
        width = self.text_encoder.config.hidden_size  # d
        if width % config.num_heads:
            raise ValueError(f"mgipscl: text width {width} is not divisible by num_heads={config.num_heads}")

        if config.vision_mode == "finetune":
            self.clip = CLIPCropEncoder(config.clip_model)
            vision_width = self.clip.width
            self.vision_layers = list(range(self.clip.depth + 1))  # 0 = V^e, i = layer i's K/V
            vision_depth = self.clip.depth
        else:
            shape = features.shapes[STATES]  # (S, T, D)
            self.vision_layers = _cached_layers(features, shape[0])
            vision_depth = max(self.vision_layers)
            vision_width = shape[-1]
        encoder_layers = getattr(getattr(self.text_encoder, "encoder", None), "layer", None)
        if encoder_layers is None:
            raise ValueError(f"mgipscl runs the text encoder's layers itself and needs a BERT/RoBERTa-style encoder "
                             f"(encoder.layer); {type(self.text_encoder).__name__} has none. "
                             "Use e.g. bert-base-uncased.")
        self.mutual_layers = nn.ModuleList(MutualAttentionLayer(layer, vision_width) for layer in encoder_layers)
        self.text_encoder.encoder.layer = nn.ModuleList()  # moved into mutual_layers (optimised at encoder_lr)
        depth = len(self.mutual_layers)
        self.vision_for_layer = [vision_index_for_text_layer(i, depth, vision_depth, self.vision_layers)
                                 for i in range(1, depth + 1)]
        if config.vision_mode == "frozen":
            self.cached = CachedStateKeys(vision_width, self.vision_for_layer)
        self.vision_out = nn.Sequential(nn.Linear(vision_width, width), nn.LayerNorm(width))  # H^v in the text width

        if config.use_mgi:
            self.interweave = InterweaveEncoder(
                width, num_layers=config.num_interweave, num_heads=config.num_heads, dropout=config.dropout,
                use_row=config.use_row_grained, use_column=config.use_column_grained,
                rescale=config.rescale_mge_weights,
            )
            self.gate = PrePostGate(width)
        if config.use_ips_cl or config.use_standard_cl:
            self.image_projection = nn.Linear(width, config.contrastive_dim)  # f of eq. 14
            self.text_projection = nn.Linear(width, config.contrastive_dim)  # g of eq. 14
        self.dropout = nn.Dropout(config.dropout)
        self.emissions = nn.Linear(width, len(self.labels))
        self.crf = BIOConstrainedCRF(self.labels)
        for module in (self.vision_out, self.emissions, getattr(self, "image_projection", None),
                       getattr(self, "text_projection", None)):
            if module is not None:
                init_linear(module)

    # parameters of the moved BERT layers keep the "text_encoder." prefix in the optimiser's eyes
    def named_parameter_parts(self) -> dict[str, list[nn.Parameter]]:
        parts: dict[str, list[nn.Parameter]] = {"text_encoder": [], "clip": [], "crf": [], "head": []}
        bert_layer_params = {
            id(p) for layer in self.mutual_layers
            for n, p in layer.named_parameters() if not n.startswith(("vision_key", "vision_value"))
        }
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("text_encoder.") or id(param) in bert_layer_params:
                parts["text_encoder"].append(param)
            elif name.startswith("clip."):
                parts["clip"].append(param)
            elif name.startswith("crf."):
                parts["crf"].append(param)
            else:
                parts["head"].append(param)
        return parts

    def parameter_groups(self, train_config) -> list[dict]:
        """Encoder (BERT incl. its mutual-attention layers) / CLIP tower (clip_lr) / head / CRF groups;
        no weight decay on biases and norm weights."""
        lrs = {"text_encoder": train_config.encoder_lr, "clip": self.config.clip_lr,
               "head": train_config.head_lr, "crf": train_config.crf_lr}
        groups = []
        for part, params in self.named_parameter_parts().items():
            for decay in (True, False):
                chosen = [p for p in params if (p.ndim > 1) == decay]
                if chosen:
                    groups.append({"params": chosen, "lr": lrs[part], "name": part + ("" if decay else "/no_decay"),
                                   "weight_decay": train_config.weight_decay if decay else 0.0})
        return groups

    def vision(self, visual: dict) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """Per available vision layer its (B, V, Dv) keys/values, H^v (B, V, d) and the token mask (B, V)."""
        crop_mask = visual[CROP_MASK][:, : self.config.max_crops].bool()  # (B, K)
        if IMAGE_OK in visual:
            crop_mask = crop_mask & visual[IMAGE_OK].bool()[:, None]
        batch_size, num_crops = crop_mask.shape
        if self.config.vision_mode == "finetune":
            pixels = visual[PIXELS][:, :num_crops]  # (B, K, 3, H, W) uint8
            if pixels.size(-1) == 3 and pixels.size(-3) != 3:  # decoded JPEG crops arrive channel-last
                pixels = pixels.movedim(-1, -3)
            keys_values, final = self.clip(pixels.flatten(0, 1))  # per layer 2 x (B*K, T, Dv)
        else:
            states = visual[STATES][:, :num_crops]  # (B, K, S, T, Dv)
            keys_values, final = self.cached(states.flatten(0, 1).float())  # unread layers are None
        tokens = final.size(1)  # T = 1 + patches per crop

        def per_post(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch_size, num_crops * tokens, x.size(-1))  # (B, K*T, Dv)

        keys_values = [None if kv is None else (per_post(kv[0]), per_post(kv[1])) for kv in keys_values]
        token_mask = crop_mask.repeat_interleave(tokens, dim=1)  # (B, K*T)
        return keys_values, self.vision_out(per_post(final)), token_mask

    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """Mutual-attention encoder (eq. 1-4), then MGI (eq. 5-13). Returns z, the contrastive pair and masks."""
        text_mask = batch["attention_mask"].bool()  # (B, L)
        keys_values, vision_states, vision_mask = self.vision(batch["visual"])
        hidden = self.text_encoder.embeddings(input_ids=batch["input_ids"])  # S^e (B, L, d), eq. 1
        for layer, vision_index in zip(self.mutual_layers, self.vision_for_layer):
            hidden = layer(hidden, text_mask, keys_values[vision_index], vision_mask)  # H^t_l, eq. 2-4
        if self.config.use_mgi:
            post_fusion, _ = self.interweave(hidden, text_mask, vision_states, vision_mask)  # T^t (B, n, d)
            fused = self.gate(hidden, post_fusion)  # z, eq. 12-13
        else:
            fused = hidden  # "w/o MGI"
        # eq. 14: t_i = the post's text states H^t, v_j = image j's visual tokens (its crops' H^v, m x d);
        # f and g read their means. With or without MGI the image side is the same.
        return {"fused": fused, "text_summary": masked_mean(hidden, text_mask),
                "image_summary": masked_mean(vision_states, vision_mask), "has_image": vision_mask.any(dim=1)}

    def word_emissions(self, encoded: dict, batch: dict) -> torch.Tensor:
        words = gather_first_pieces(encoded["fused"], batch["word_index"])  # (B, W, d)
        return self.emissions(self.dropout(words))  # (B, W, num_labels)

    def contrastive_losses(self, encoded: dict) -> dict[str, torch.Tensor]:
        """eq. 14-17 over the posts of the batch that have at least one crop (others have no image)."""
        losses = {}
        has_image = encoded["has_image"]
        if not (self.config.use_ips_cl or self.config.use_standard_cl) or int(has_image.sum()) < 2:
            return losses
        images = F.normalize(self.image_projection(encoded["image_summary"][has_image]), dim=-1)  # f(v_j) (N, c)
        # (the summaries are means over tokens; f and g are linear, so f(mean v_j) = mean f(v_j))
        texts = F.normalize(self.text_projection(encoded["text_summary"][has_image]), dim=-1)  # g(t_i) (N, c)
        similarity = texts @ images.T  # sim(t_i, v_j) (N, N), eq. 14
        if self.config.use_ips_cl:
            losses["ips_cl"] = ips_contrastive_loss(similarity, self.config.top_k, self.config.temperature)
        if self.config.use_standard_cl:
            losses["cl"] = standard_contrastive_loss(similarity, self.config.temperature)
        return losses

    def forward(self, batch: dict) -> dict:
        encoded = self.encode(batch)
        emissions = self.word_emissions(encoded, batch)
        loss, _ = crf_loss_and_decode(self.crf, emissions, batch["word_mask"].bool(), batch.get("labels"))
        out = {"emissions": emissions}
        if loss is not None:
            parts = self.contrastive_losses(encoded)
            out.update({f"loss_{name}": value.detach() for name, value in parts.items()})
            out["loss_mner"] = loss.detach()
            out["loss"] = loss + sum(parts.values())  # eq. 19
        return out

    @torch.no_grad()
    def decode(self, batch: dict) -> list[list[int]]:
        emissions = self.word_emissions(self.encode(batch), batch)
        _, paths = crf_loss_and_decode(self.crf, emissions, batch["word_mask"].bool(), decode=True)
        return paths


def _cached_layers(features, count: int) -> list[int]:
    """The hidden-state indices of the cached CLIP states (attr ``layers`` on the group or dataset)."""
    attrs = {**features.attrs.get(STATES_GROUP, {}), **features.attrs.get(STATES, {})}
    layers = attrs.get("layers")
    if isinstance(layers, str):
        import json

        layers = json.loads(layers)
    if layers is None:
        raise ValueError(f"mgipscl frozen mode: {STATES} has no 'layers' attribute (which CLIP layers were cached); "
                         "rebuild the group with mner-features extract --grounding ... (CONTRACT-10)")
    layers = [int(x) for x in layers]
    if len(layers) != count or layers != sorted(layers):
        raise ValueError(f"mgipscl frozen mode: {STATES} attr layers={layers} does not match its {count} cached layers")
    return layers
