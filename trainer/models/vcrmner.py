"""VCRMNER: Visual Cue Refinement in MNER using CLIP prompts (Bai et al.), one file, top to bottom.

Stage one of the paper (sec. 3.1: Mask R-CNN objects -> CLIP crop embeddings v_i, prompt centroids
c_j, eq. 1-5 weights w_sim_ij = softmax_j(logit * v_i . c_j)) ran once in ``mner-features``; this
model reads ``crops/<detector>/clip/<clip_model>/crop_embed`` and
``crops/<detector>/prompts/<clip_model>/<set>/crop_weights`` from the cache.
Stage two (sec. 3.2-3.3) lives here: cue_v (eq. 6) -> N interaction blocks (self-attention over the
text, eq. 8-10, then cross-attention text -> visual cues, eq. 11-13) -> CRF (eq. 14-15).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mner.pipeline.stage1 import paper_needs
from mner.trainer.inputs.text_encoder import load_encoder
from mner.trainer.models import default_parameter_groups, register_model
from mner.trainer.models.layers import BIOConstrainedCRF, crf_loss_and_decode, gather_first_pieces, init_linear

NEEDS = paper_needs("vcrmner")  # the paper's detector and CLIP model (mner.pipeline.stage1, read by stage 1 too)


@dataclass
class VCRMNERConfig:
    max_objects: int = 4  # m: top-m detected objects per image used as visual cues (UMGF-style; unstated in the paper)
    num_blocks: int = 3  # interaction transformer blocks (sec. 4.1)
    num_heads: int = 8  # attention heads in every block (sec. 4.1)
    dropout: float = 0.1  # dropout on attention, FFN and the emission layer
    ffn_mult: int = 4  # FFN inner width = ffn_mult * text width
    use_inter_former: bool = True  # False = "w/o inter-former": [word state ; pooled cue] -> CRF
    use_visual_evaluation: bool = True  # False = "w/o ev": cue_v = v_i, no prompt weighting (eq. 6)
    prompt_set: str = "vcrmner"  # "vcrmner" (prompt centroids) | "vcrmner_words" ("w/o prompt": category words)
    detector: str = NEEDS.slots["detector"]  # objects/<detector> instance read (sec. 3.1: Mask R-CNN); an override
    clip_model: str = NEEDS.slots["clip_model"]  # CLIP instance of crops and prompts (sec. 4.1: ViT-B-16); an override


class InteractionBlock(nn.Module):
    """One block of the interaction transformer: intra-modal, then inter-modal attention.

    Residual connections wrap both attentions as in a standard post-LN transformer (the paper's
    eq. 9/12 write the attention output without one; the residual keeps the encoder's states
    intact at initialisation).
    """

    def __init__(self, width: int, *, num_heads: int, dropout: float, ffn_mult: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.self_norm = nn.LayerNorm(width)
        self.self_ffn = _ffn(width, ffn_mult, dropout)
        self.self_ffn_norm = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.cross_norm = nn.LayerNorm(width)
        self.cross_ffn = _ffn(width, ffn_mult, dropout)
        self.cross_ffn_norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, text: torch.Tensor, text_pad: torch.Tensor, cues: torch.Tensor, cue_pad: torch.Tensor
    ) -> torch.Tensor:
        # eq. 8-10: Q, K, V from the text; I_t = LN(I'_t + FFN(I'_t))
        attended, _ = self.self_attn(text, text, text, key_padding_mask=text_pad, need_weights=False)  # (B, L, d)
        intra = self.self_norm(text + self.dropout(attended))  # I'_t (B, L, d)
        intra = self.self_ffn_norm(intra + self.self_ffn(intra))  # I_t (B, L, d)
        # eq. 11-13: Q from I_t, K, V from cue_v; I_m = LN(I'_m + FFN(I'_m))
        attended, _ = self.cross_attn(intra, cues, cues, key_padding_mask=cue_pad, need_weights=False)  # (B, L, d)
        inter = self.cross_norm(intra + self.dropout(attended))  # I'_m (B, L, d)
        return self.cross_ffn_norm(inter + self.cross_ffn(inter))  # I_m (B, L, d)


def _ffn(width: int, mult: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(width, mult * width),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(mult * width, width),
        nn.Dropout(dropout),
    )


@register_model("vcrmner")
class VCRMNER(nn.Module):
    Config = VCRMNERConfig
    # Paper sec. 4.1 hyper-parameters; the ablation rows of Table 3 are named exactly as printed.
    # Fields that are not VCRMNERConfig fields belong to the trainer's TrainConfig. The 40 epochs run
    # to the end of the linear decay and the best dev checkpoint is kept (patience 0: no early stop).
    PRESETS = {
        "paper": dict(
            text_encoder="roberta-base", encoder_lr=4e-5, head_lr=4e-5, crf_lr=1e-4, warmup_ratio=0.01,
            num_heads=8, num_blocks=3, max_length=70, epochs=40, batch_size=18, patience=0,
        ),
    }
    PRESETS["w/o inter-former"] = {**PRESETS["paper"], "use_inter_former": False}
    PRESETS["w/o ev"] = {**PRESETS["paper"], "use_visual_evaluation": False}
    PRESETS["w/o prompt"] = {**PRESETS["paper"], "prompt_set": "vcrmner_words"}

    @staticmethod
    def required_features(config: VCRMNERConfig) -> list[str]:
        crops = f"crops/{config.detector}"
        paths = [f"objects/{config.detector}/offsets", f"{crops}/clip/{config.clip_model}/crop_embed"]
        if config.use_visual_evaluation:
            paths.append(f"{crops}/prompts/{config.clip_model}/{config.prompt_set}/crop_weights")
        return paths

    @staticmethod
    def stage1_settings(config: VCRMNERConfig) -> list:
        """Sec. 3.1: Mask R-CNN objects; CLIP ViT base with 16x16 patches encodes crops and prompts: both are
        instance choices (``NEEDS.slots``), so no provenance value is checked beyond them."""
        return NEEDS.filled_settings({"detector": config.detector, "clip_model": config.clip_model})

    def __init__(self, config: VCRMNERConfig, *, labels: list[str], text_encoder: str, tokenizer=None, features=None):
        super().__init__()
        if features is None:
            raise ValueError("vcrmner reads cached CLIP crop embeddings: pass --features <cache.h5>")
        self.config = config
        self.labels = list(labels)
        self.crop_path, *rest = self.required_features(config)[1:]
        self.weight_path = rest[0] if rest else None
        self.mask_path = f"objects/{config.detector}/mask"
        self.text_encoder = load_encoder(text_encoder)  # AutoModel by hub name, folder or alias
        width = self.text_encoder.config.hidden_size  # d
        if width % config.num_heads:
            raise ValueError(f"text width {width} is not divisible by num_heads={config.num_heads}")
        clip_width = features.shapes[self.crop_path][-1]  # D of the CLIP joint space

        self.cue_proj = nn.Sequential(nn.Linear(clip_width, width), nn.Dropout(config.dropout))  # cue_v -> text width
        if config.use_inter_former:
            # Always-attendable "no cue" key: posts with no (ok) image or no object attend to it
            # instead of to an all-masked softmax (which would give NaN).
            self.null_cue = nn.Parameter(torch.zeros(1, 1, width))
            self.blocks = nn.ModuleList(
                InteractionBlock(width, num_heads=config.num_heads, dropout=config.dropout, ffn_mult=config.ffn_mult)
                for _ in range(config.num_blocks)
            )
            emission_in = width
        else:
            emission_in = 2 * width  # [word state ; pooled visual cue]
        self.dropout = nn.Dropout(config.dropout)
        self.emissions = nn.Linear(emission_in, len(self.labels))
        self.crf = BIOConstrainedCRF(self.labels)
        init_linear(self.cue_proj)
        init_linear(self.emissions)
        if config.use_inter_former:
            init_linear(self.blocks)
            nn.init.normal_(self.null_cue, std=0.02)

    def visual_cues(self, visual: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """eq. 6: cue_v = v_i * max_j w_sim_ij, projected to the text width. Returns cues, object mask.

        v_i is eq. 4's L2-normalised crop embedding (the vector the weights were computed from), so
        the relative weight of two crops is their relevance alone, not also their raw CLIP norms.
        """
        m = self.config.max_objects  # slots keep stage 1's score order: the first m are the top-m objects
        crops = F.normalize(visual[self.crop_path][:, :m].float(), dim=-1)  # v_i = v'_i / ||v'_i|| (B, K, D), eq. 4
        mask = visual[self.mask_path][:, :m].bool()  # (B, K)
        if self.config.use_visual_evaluation:
            relevance = visual[self.weight_path][:, :m].max(dim=-1).values  # max_j w_sim_ij (B, K)
            crops = crops * relevance.unsqueeze(-1)  # (B, K, D)
        return self.cue_proj(crops), mask  # (B, K, d), (B, K)

    def fused_word_states(self, batch: dict) -> torch.Tensor:
        text = self.text_encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state  # H_t^0 (B, L, d), eq. 7
        cues, object_mask = self.visual_cues(batch["visual"])  # (B, K, d), (B, K)
        if self.config.use_inter_former:
            batch_size = cues.size(0)
            cues = torch.cat([self.null_cue.expand(batch_size, -1, -1), cues], dim=1)  # (B, 1+K, d)
            cue_pad = torch.cat([object_mask.new_zeros(batch_size, 1), ~object_mask], dim=1)  # (B, 1+K)
            text_pad = ~batch["attention_mask"].bool()  # (B, L)
            for block in self.blocks:
                text = block(text, text_pad, cues, cue_pad)  # H_t^l (B, L, d)
        else:
            weights = object_mask.to(cues.dtype).unsqueeze(-1)  # (B, K, 1)
            pooled = (cues * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # mean cue, 0 if none (B, d)
            text = torch.cat([text, pooled.unsqueeze(1).expand_as(text)], dim=-1)  # (B, L, 2d)
        return text

    def word_emissions(self, batch: dict) -> torch.Tensor:
        states = self.fused_word_states(batch)  # G (B, L, d')
        words = gather_first_pieces(states, batch["word_index"])  # first piece of each word (B, W, d')
        return self.emissions(self.dropout(words))  # (B, W, num_labels)

    def forward(self, batch: dict) -> dict:
        emissions = self.word_emissions(batch)  # (B, W, num_labels)
        loss, _ = crf_loss_and_decode(self.crf, emissions, batch["word_mask"].bool(), batch.get("labels"))  # eq. 15
        return {"loss": loss, "emissions": emissions} if loss is not None else {"emissions": emissions}

    def parameter_groups(self, train_config) -> list[dict]:
        return default_parameter_groups(self, train_config)  # encoder / head / CRF rates

    @torch.no_grad()
    def decode(self, batch: dict) -> list[list[int]]:
        emissions = self.word_emissions(batch)  # (B, W, num_labels)
        _, paths = crf_loss_and_decode(self.crf, emissions, batch["word_mask"].bool(), decode=True)  # Viterbi
        return paths
