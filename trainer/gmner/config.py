"""GMNER options (``--boxes`` runs): given as ``--set gmner_<field>=value`` like any other option.

They are split off the ``--set`` pairs before the model and train configs are resolved, so no model
``Config`` changes and the five models' presets work unchanged with and without ``--boxes``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mner.trainer.core.config import ConfigError, convert_value, parse_sets

PREFIX = "gmner_"
TARGET_STYLES = ("index", "soft")


@dataclass
class GroundingConfig:
    gmner_targets: str = "index"  # index: any candidate with IoU >= iou is right | soft: normalised-IoU distribution
    gmner_iou: float = 0.5  # IoU a candidate / predicted box needs with a gold box (targets, coverage, metrics)
    gmner_iou_compare: str = ">="  # ">=" or ">" (H-Index's soft targets keep IoU > 0.5)
    gmner_uncovered: str = "hindex"  # hindex: boxed entities no candidate reaches cannot be right | mqspn: None is
    gmner_objects: str = "auto"  # detector instance whose objects are the candidates: auto (the only one) | group
    gmner_features: str = "auto"  # per-object features: auto (first encoder's crop_embed/crop_pooled) | none | path
    gmner_max_candidates: int = 0  # keep each image's first k objects by score (0: all cached)
    gmner_dim: int = 128  # width of the grounding head
    gmner_dropout: float = 0.1  # dropout on the head's span and candidate vectors
    gmner_loss_weight: float = 1.0  # grounding loss weight beside the tagger's loss

    def check(self) -> None:
        if self.gmner_targets not in TARGET_STYLES:
            raise ConfigError(f"--set gmner_targets={self.gmner_targets}: valid values: {', '.join(TARGET_STYLES)}")
        if self.gmner_iou_compare not in (">=", ">"):
            raise ConfigError(f"--set gmner_iou_compare={self.gmner_iou_compare}: valid values: >=, >")
        if self.gmner_uncovered not in ("hindex", "mqspn"):
            raise ConfigError(f"--set gmner_uncovered={self.gmner_uncovered}: valid values: hindex, mqspn")
        if not 0 < self.gmner_iou <= 1:
            raise ConfigError(f"--set gmner_iou={self.gmner_iou}: must be in (0, 1]")
        if self.gmner_max_candidates < 0 or self.gmner_dim < 1 or self.gmner_loss_weight < 0:
            raise ConfigError("--set gmner_max_candidates >= 0, gmner_dim >= 1, gmner_loss_weight >= 0")
        if not 0 <= self.gmner_dropout < 1:
            raise ConfigError(f"--set gmner_dropout={self.gmner_dropout}: must be in [0, 1)")

    def settings(self):
        from mner.trainer.gmner.metrics import GmnerSettings

        return GmnerSettings(iou=self.gmner_iou, compare=self.gmner_iou_compare, uncovered=self.gmner_uncovered)


def split_gmner_sets(sets: list[str] | None, *, boxes=None) -> tuple[list[str], GroundingConfig]:
    """``--set`` pairs without the ``gmner_*`` ones, and the GroundingConfig they give (only with ``--boxes``)."""
    rest, values = [], {}
    names = {f.name for f in dataclasses.fields(GroundingConfig)}
    for pair in sets or []:
        key = pair.partition("=")[0].strip()
        if key.startswith(PREFIX):
            if key not in names:
                raise ConfigError(f"unknown config key {key!r}; valid GMNER keys: {', '.join(sorted(names))}")
            if boxes is None:
                raise ConfigError(f"--set {pair}: GMNER options need the gold boxes: add --boxes XML_DIR")
            values.update(parse_sets([pair]))
        else:
            rest.append(pair)
    config = GroundingConfig(**{k: convert_value(GroundingConfig, k, v) for k, v in values.items()})
    config.check()
    return rest, config
