"""What a run's model reads: the text encoder checked, the feature cache opened, the splits encoded."""

from __future__ import annotations

import dataclasses
from typing import Any

from mner.trainer.core.config import ConfigError, validate_model_config
from mner.trainer.core.console import log, warn_loudly
from mner.trainer.core.labels import describe_unseen
from mner.trainer.core.request import RunData, RunRequest
from mner.trainer.core.run_record import cache_record, check_coverage, image_fingerprints
from mner.trainer.inputs.batching import Collator, PostDataset
from mner.trainer.inputs.posts import SPLITS, make_post_dataset
from mner.trainer.inputs.segments import second_segment_for
from mner.trainer.inputs.text_encoder import load_encoder_config, load_tokenizer, position_limit
from mner.trainer.inputs.visual_inputs import VisualInputs, cache_summary, open_visual_inputs
from mner.trainer.models.stage1 import check_cache_settings, model_stage1_settings


@dataclasses.dataclass
class RunInputs:
    """What the model reads: the text encoder's tokenizer, the feature cache and the encoded splits."""

    tokenizer: Any
    positions: int  # the text encoder's position limit
    visual: VisualInputs | None  # None: the model reads no cached features
    cache_info: dict | None  # config.json's "features" entry; None without --features
    stage1_mismatches: list[str]  # where the cache differs from the paper's stage-1 settings (only with =warn)
    train_set: PostDataset  # orphan I- tags repaired, --train-fraction applied
    eval_sets: dict[str, PostDataset]  # "dev", and "test" when the data has it
    collator: Collator
    gmner: Any = None  # GMNER (--boxes): the GmnerTask (gold boxes, candidates); None without --boxes


def load_text_encoder(request: RunRequest) -> tuple[Any, int]:
    """The tokenizer and position limit of a reachable text encoder; max_length and the model options in range."""
    config = request.config
    tokenizer = load_tokenizer(config.text_encoder)
    encoder_config = load_encoder_config(config.text_encoder)
    limit = position_limit(config.text_encoder, tokenizer)
    if config.max_length > limit:
        raise ConfigError(f"--max-length {config.max_length}: the text encoder {config.text_encoder} has "
                          f"{limit} positions; pass --max-length {limit} or less")
    validate_model_config(request.model_cls, request.model_config,
                          text_width=getattr(encoder_config, "hidden_size", None))
    return tokenizer, limit


def open_feature_cache(request: RunRequest, data: RunData) -> tuple[VisualInputs | None, dict | None, list[str]]:
    """The model's visual inputs, the cache's record (fingerprints, per-split coverage) and the stage-1
    mismatches; refused when the cache is not the paper's or too many images are absent."""
    config, features = request.config, request.invocation["features"]
    visual = open_visual_inputs(features, request.model_cls, request.model_config, request.model,
                                use_placeholders=config.use_placeholder_features, on_mismatch=config.stage1_mismatch)
    stage1_mismatches = []
    if visual is not None:  # the cache must come from the stage-1 settings the model's paper assumes
        request.model_config = visual.model_config  # the instances read (recorded in config.json)
        for note in visual.instance_notes:
            log(f"reading {note}")
        stage1_mismatches = visual.instance_mismatches + check_cache_settings(
            request.model, model_stage1_settings(request.model_cls, request.model_config), visual.cache,
            on_mismatch=config.stage1_mismatch)
        if stage1_mismatches:
            warn_loudly("stage-1 settings differ from the model's paper (--set stage1_mismatch=warn):\n  "
                        + "\n  ".join(stage1_mismatches))
    cache_info = None
    if features is not None:
        from mner.pipeline.cache import FeatureCache

        cache = visual.cache if visual is not None else FeatureCache(features)
        cache_info = cache_record(cache, {s: p for s, p in data.dataset.splits.items() if s in SPLITS})
        cache_info["required"] = visual.required if visual is not None else []
        cache_info["integrity"] = visual.integrity if visual is not None else {}
        if visual is not None:  # a grown cache is recognised by these (evaluate, predict, --resume)
            posts = [p.image_id for s, ps in data.dataset.splits.items() if s in SPLITS for p in ps]
            cache_info["image_fingerprints"] = {"paths": visual.required,
                                                "rows": image_fingerprints(cache, visual.required, posts)}
        cache_info["provenance"] = cache_summary(cache)
        cache_info["stage1_mismatches"] = stage1_mismatches
        cache_info["instances"] = visual.instances if visual is not None else {}
        cache_info["instances_read"] = sorted({p.rsplit("/", 1)[0] for p in visual.required}) if visual else []
        if visual is not None:
            check_coverage(cache_info["coverage"], cache_path=cache_info["path"], max_share=config.max_missing_images,
                           what="or raise the share with --max-missing-images")
    if visual is not None and visual.random_init:
        warn_loudly(
            f"the feature cache {visual.path} holds features from RANDOMLY INITIALISED weights "
            f"({', '.join(visual.random_init)}): fine for smoke tests, meaningless for results"
        )
    return visual, cache_info, stage1_mismatches


def build_inputs(request: RunRequest, data: RunData) -> RunInputs:
    """Text encoder and feature cache checked, then every split encoded once (train repaired, dev and test as given)."""
    config = request.config
    tokenizer, positions = load_text_encoder(request)
    visual, cache_info, stage1_mismatches = open_feature_cache(request, data)
    train_posts = data.dataset.splits["train"]
    if config.train_fraction < 1.0:  # low-resource: nested subsets per seed (10% inside 20% ...)
        from mner.trainer.experiments.protocols import train_subset

        train_posts = [train_posts[i] for i in train_subset(len(train_posts), config.train_fraction, config.seed)]
    common = {"tokenizer": tokenizer, "max_length": config.max_length, "visual": visual}
    train_set = make_post_dataset(train_posts, split="train", repair=True, label_to_id=data.label_to_id, **common)
    log(f"train: repaired {train_set.repaired} orphan I- tags to B- for training (evaluation keeps them)")
    eval_sets = {split: make_post_dataset(data.dataset.splits[split], split=split, label_to_id=None, **common)
                 for split in ("dev", "test")
                 if data.dataset.splits.get(split) and (split == "dev" or config.score_test)}  # tune: never test
    for split, found in data.unseen.items():
        warn_loudly(describe_unseen(split, found))
    collator = Collator(
        pad_token_id=tokenizer.pad_token_id or 0, visual_batcher=visual.batcher if visual is not None else None,
        second_segment=second_segment_for(request.model_cls, request.model_config, tokenizer, config.max_length),
    )
    gmner = None
    if request.grounding is not None:  # GMNER: gold boxes, the cache's candidates, batch["gmner"]
        from mner.pipeline.cache import FeatureCache
        from mner.trainer.gmner.data import GmnerTask

        cache = (visual.cache if visual is not None else FeatureCache(request.invocation["features"])
                 if request.invocation["features"] is not None else None)
        gmner = GmnerTask(request.invocation["boxes"], data.dataset.splits, cache, request.grounding)
        for warning in gmner.warnings:
            warn_loudly(warning)
        train_set = gmner.wrap_dataset("train", train_set)
        eval_sets = {split: gmner.wrap_dataset(split, dataset) for split, dataset in eval_sets.items()}
        collator = gmner.wrap_collator(collator)
    return RunInputs(tokenizer=tokenizer, positions=positions, visual=visual, cache_info=cache_info,
                     stage1_mismatches=stage1_mismatches, train_set=train_set, eval_sets=eval_sets, collator=collator,
                     gmner=gmner)
