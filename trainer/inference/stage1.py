"""The trainer's only door to stage 1: extract images a run's caches lack, with the run's own stage-1 record.

The trainer never imports a detector or an image encoder (docs/architecture.md). Prediction on new
images needs them once, so this module imports ``mner.features`` lazily, inside the one function
below, and passes it nothing but paths and ids: the producers are rebuilt by stage 1 from the
reference cache's provenance (models, weights and their hashes, thresholds, sizes, prompt sets),
never from trainer-side settings. ``tests/test_predict_new_images.py`` checks that importing the
trainer and tagging posts whose images are cached loads no ``mner.features`` module.
"""

from __future__ import annotations

from pathlib import Path

from mner.trainer.core.config import ConfigError


def extract_into_side_cache(*, reference: str | None, side_cache: Path | None, image_ids: list[str],
                            images_dir: str | Path, reads: list[str] | None = None,
                            texts: dict[str, list[list[str]]] | None = None, device: str = "auto",
                            progress: bool = True, weights: dict[str, str] | None = None) -> int:
    """Add ``image_ids`` (files ``<images_dir>/<id>``) to ``side_cache`` with the producers of
    ``reference``'s feature groups; returns how many images were added. ``reads``: the datasets the model
    reads: only their groups (and those they are computed from) are extracted. ``texts``: the tokens of
    the posts showing each image (text-queried grounding reads them)."""
    if reference is None or side_cache is None:
        raise ConfigError("new images need the run's feature cache (its stage-1 record): pass --features")
    from mner.features.run.rebuild import RebuildError, extend_side_cache  # lazy: stage 1 only when needed

    try:
        return extend_side_cache(reference, side_cache, image_ids, images_dir, groups=reads, texts=texts,
                                 device=device, progress=progress, weights=weights)
    except RebuildError as err:
        raise ConfigError(str(err)) from None
