"""The feature cache a model reads: the instances chosen for it, its FeatureSpec and its batcher."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mner.pipeline.data import Post
from mner.trainer.core.config import ConfigError
from mner.trainer.models.stage1 import extract_command, missing_features_message, model_stage1_settings


def cache_summary(cache) -> dict:
    """Short provenance of every feature group: enough to tell which weights made the features."""
    from mner.pipeline.cache import CacheError

    summary = {}
    for group in sorted(cache.groups()):
        try:
            provenance = cache.provenance(group)
        except CacheError:  # a group without provenance is reported, not fatal
            provenance = {}
        summary[group] = {k: provenance.get(k) for k in ("component", "model", "pretrained", "created")}
    return summary


class VisualInputs:
    """The cache, the model's FeatureSpec and the VisualBatcher for a model that needs features."""

    def __init__(
        self, features: str | Path, required: list[str], model_name: str, *,
        max_objects: int | None = None, use_placeholders: bool = False, stage1_settings: list | None = None,
        cache=None,
    ):
        from mner.pipeline.cache import FeatureCache
        from mner.trainer.inputs.visual import VisualBatcher  # lazy: text-only runs never touch it

        self.path = str(Path(features).resolve())
        self.cache = cache if cache is not None else FeatureCache(features)
        self.model_config = None  # the configuration with the instances read (open_visual_inputs sets it)
        self.instances: dict[str, str] = {}  # slot -> instance read ("detector": "maskrcnn")
        self.instance_notes: list[str] = []  # tiny variants read in place of the paper's models
        self.instance_mismatches: list[str] = []  # other instances read with stage1_mismatch=warn
        missing = [path for path in required if not self.cache.has(path)]
        if missing:
            from mner.pipeline.cache import MissingFeaturesError

            raise MissingFeaturesError(missing_features_message(model_name, self.cache, missing, stage1_settings or []))
        self.required = list(required)
        # the groups read (and their ragged indexes), checked against their checksums: whole when small,
        # by a sample of blocks when large; recorded in the run (pipeline/cache/integrity.py)
        from mner.pipeline.cache.integrity import check_groups_at_startup

        groups = {"images"}
        for path in required:
            groups.add(path.rsplit("/", 1)[0])
            index = self.cache.index_of(path)
            if index:
                groups.add(index.rsplit("/", 1)[0])
        self.integrity = check_groups_at_startup(self.path, sorted(groups))
        self.spec = self.cache.feature_spec(required)
        # read and pad only the objects the model attends to (its top-m), not every cached detection
        self.batcher = VisualBatcher(
            self.cache, required, max_objects=max_objects, use_placeholders=use_placeholders
        )
        self.random_init = sorted(self.cache.random_init_groups())

    def image_rows(self, posts: Sequence[Post]) -> tuple[list[int | None], int]:
        rows: list[int | None] = []
        missing = 0
        for post in posts:
            row = None
            if post.image_id is not None:
                try:
                    row = self.cache.row_of(post.image_id)
                except KeyError:
                    row = None
                missing += row is None
            rows.append(row)
        return rows, missing


def open_visual_inputs(
    features, model_cls, model_config, model_name: str, *, use_placeholders: bool = False,
    on_mismatch: str = "error",
) -> VisualInputs | None:
    """The cache and batcher of a model that reads features; ``visual.model_config`` names the instances read
    (the paper's detector / CLIP model, a tiny variant standing for it, or with ``on_mismatch="warn"`` the
    cache's other instance, listed in ``visual.instance_mismatches``)."""
    required = list(model_cls.required_features(model_config))
    if not required:
        return None
    settings = model_stage1_settings(model_cls, model_config)  # the paper's stage-1 settings
    if features is None:
        from mner.pipeline.cache import extract_command_hint

        raise ConfigError(
            f"model {model_name!r} reads cached visual features ({', '.join(required)}); pass "
            f"--features CACHE.h5. Build one with: {extract_command(extract_command_hint(required), settings)}"
        )
    from mner.pipeline.cache import FeatureCache
    from mner.trainer.models.stage1 import choose_model_instances

    cache = FeatureCache(features)
    model_config, choice, mismatches = choose_model_instances(model_name, model_cls, model_config, cache,
                                                              on_mismatch=on_mismatch)
    required = list(model_cls.required_features(model_config))
    settings = model_stage1_settings(model_cls, model_config)
    max_objects = getattr(model_config, "max_objects", None)
    visual = VisualInputs(
        features, required, model_name, max_objects=max_objects, use_placeholders=use_placeholders,
        stage1_settings=settings, cache=cache,
    )
    visual.model_config, visual.instances = model_config, dict(choice.slots)
    visual.instance_notes, visual.instance_mismatches = list(choice.notes), mismatches
    return visual
