"""The stage-2 training run: ``train(...) -> run directory``.

Options are checked, the data, labels, text encoder and feature cache are read, and the model runs
once on the longest post of every split, all before the run folder is created (see
:mod:`mner.trainer.core.run_folder` for its layout, :mod:`mner.trainer.core.engine` for the loop's engine).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mner.pipeline.data import Dataset, Post, load_dataset
from mner.pipeline.devices import resolve_device
from mner.trainer.core.config import ConfigError, TrainConfig, resolve_configs, validate_model_config
from mner.trainer.core.engine import Engine, NonFiniteLoss, check_device_and_precision
from mner.trainer.core.labels import (
    build_labels,
    check_case_conflicts,
    describe_unseen,
    parse_label_types,
    unseen_types,
)
from mner.trainer.core.run_folder import (
    STATE_FILE,
    RunFolderError,
    check_out,
    checkpoint_candidates,
    checkpoint_files,
    checkpoint_problem,
    checkpoint_staging,
    commit_checkpoint,
    invocation_record,
    latest_checkpoint,
    link_or_copy,
    options_for_resume,
    read_run_config,
    remove_checkpoints,
    require_finished,
    resume_differences,
    sha256_file,
    verify_weights,
    write_json_atomic,
    write_marker,
)
from mner.trainer.core.run_record import cache_record, check_coverage, image_fingerprints, software_versions
from mner.trainer.core.tracking import LOG_DIR, Tracker
from mner.trainer.evaluation.evaluate import entity_scores, format_scores, write_conll, write_parquet
from mner.trainer.inputs.batching import Collator, LengthGroupedBatchSampler, PostDataset, ShuffledBatchSampler
from mner.trainer.inputs.segments import second_segment_for
from mner.trainer.inputs.text_encoder import (
    load_encoder_config,
    load_tokenizer,
    position_limit,
    resolve_text_encoder,
    save_encoder_skeleton,
    weights_fingerprint,
)
from mner.trainer.models import check_parameter_groups, default_parameter_groups, get_model_class
from mner.trainer.models.stage1 import (
    check_cache_settings,
    extract_command,
    missing_features_message,
    model_stage1_settings,
)

SPLITS = ("train", "dev", "test")


def log(message: str) -> None:
    """Progress and warnings on stderr, from the first process only when several train together."""
    if os.environ.get("RANK", "0") == "0":
        tqdm.write(message, file=sys.stderr)


def warn_loudly(message: str) -> None:
    bar = "!" * 78
    log(f"{bar}\nWARNING: {message}\n{bar}")


def rank_seed(seed: int, rank: int) -> int:
    """Process ``rank``'s seed after the model is built: rank 0 keeps ``seed`` (a one-process run is
    unchanged), the others differ, so data-parallel processes do not share dropout masks (the same
    masks on every process would shrink the noise the gradient average sees)."""
    return seed if rank == 0 else (seed * 1000003 + rank) % 2**31


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def to_device(batch: dict, device: torch.device) -> dict:
    """Decoding batches (training batches arrive on the device through the engine's prepared loader)."""
    from accelerate.utils import send_to_device

    return send_to_device(batch, device, non_blocking=True)


# ----------------------------------------------------------------------------- inputs


def load_posts(
    data: str | Path | None, features: str | Path | None, *, require_tags: bool = True
) -> tuple[Dataset, dict]:
    """Posts from ``--data`` or, when only ``--features`` is given, from the posts stored in the cache."""
    if data is not None:
        dataset = load_dataset(data, require_tags=require_tags)
        return dataset, {"source": "data", "path": str(Path(data).resolve())}
    if features is not None:
        from mner.pipeline.cache import FeatureCache

        dataset = FeatureCache(features).load_posts()
        return dataset, {"source": "features", "path": str(Path(features).resolve())}
    raise ConfigError("no data: pass --data DIR (split files) or --features CACHE.h5 (posts stored in the cache)")


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
    ):
        from mner.pipeline.cache import FeatureCache
        from mner.trainer.inputs.visual import VisualBatcher  # lazy: text-only runs never touch it

        self.path = str(Path(features).resolve())
        self.cache = FeatureCache(features)
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
    features, model_cls, model_config, model_name: str, *, use_placeholders: bool = False
) -> VisualInputs | None:
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
    max_objects = getattr(model_config, "max_objects", None)
    return VisualInputs(
        features, required, model_name, max_objects=max_objects, use_placeholders=use_placeholders,
        stage1_settings=settings,
    )


def build_model(model_cls, model_config, *, labels, text_encoder: str, tokenizer, visual: VisualInputs | None):
    return model_cls(
        model_config, labels=labels, text_encoder=resolve_text_encoder(text_encoder), tokenizer=tokenizer,
        features=visual.spec if visual is not None else None,
    )


def make_post_dataset(posts, tokenizer, *, label_to_id, max_length, visual, split, repair=False) -> PostDataset:
    image_rows = None
    if visual is not None:
        image_rows, missing = visual.image_rows(posts)
        if missing:
            log(f"{split}: {missing} posts name an image the cache does not hold; their visual input is zeros")
    dataset = PostDataset(
        posts, tokenizer, label_to_id=label_to_id, max_length=max_length, image_rows=image_rows, repair=repair
    )
    message = dataset.report.message(f"{split} posts")
    if message:
        log(f"WARNING {split}: {message}")
    return dataset


def make_loader(dataset: PostDataset, collator: Collator, *, batch_size: int, shuffle: bool, num_workers: int,
                seed: int = 0, group_by_length: bool = False, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Training loaders draw batches from a sampler whose order depends only on (seed, epoch), so a
    resumed run replays exactly the batches an uninterrupted one would have seen; with several
    processes each loader holds its ``rank``'s share (every post once per epoch over all processes)."""
    if shuffle:
        lengths = [len(a.input_ids) for a in dataset.aligned]
        sampler_cls = LengthGroupedBatchSampler if group_by_length else ShuffledBatchSampler
        sampler = sampler_cls(lengths, batch_size, seed=seed, rank=rank, world_size=world_size)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator, num_workers=num_workers)


# ----------------------------------------------------------------------------- prediction


# Decoding runs in full precision everywhere: dev F1 during training, the final dev/test scores, `evaluate`
# and `predict`. Under bf16/fp16 autocast the emissions into the CRF would be low-precision Linear outputs
# whose Viterbi can tie differently, so `evaluate` would disagree with metrics.json on a GPU.
DECODE_PRECISION = "fp32"


@torch.no_grad()
def predict_tags(model, dataset: PostDataset, collator: Collator, *, labels: list[str], device: torch.device,
                 batch_size: int, num_workers: int = 0, desc: str = "decode") -> list[list[str]]:
    """One tag per word of every post; words the model cannot see (word_mask False) are ``O``.
    Always in full precision (``DECODE_PRECISION``), whatever the training precision."""
    model.eval()
    loader = make_loader(dataset, collator, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    predictions: list[list[str]] = []
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    for batch in bar:
        word_mask = batch["word_mask"]
        paths = model.decode(to_device(batch, device))
        for row, path in enumerate(paths):
            n_words = len(dataset.posts[len(predictions)].tokens)
            kept = word_mask[row, :n_words].tolist()
            if sum(kept) != len(path):
                raise RuntimeError(f"model decoded {len(path)} tags for a post with {sum(kept)} kept words")
            tags = iter(labels[i] for i in path)
            predictions.append([next(tags) if keep else "O" for keep in kept])
    return predictions


def score_split(posts: Sequence[Post], predictions: list[list[str]]) -> dict:
    return entity_scores([list(p.tags) for p in posts], predictions)


# ----------------------------------------------------------------------------- optimisation


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """The model's own groups (``parameter_groups``), checked to hold every trainable parameter once."""
    if hasattr(model, "parameter_groups"):
        groups = model.parameter_groups(config)
    else:
        groups = default_parameter_groups(model, config)
    check_parameter_groups(model, groups)
    return groups


# ----------------------------------------------------------------------------- checks before epoch 1


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose generator ``fork_rng`` must save and restore for work on ``device``:
    ``devices=[]`` forks the CPU generator only, and dropout on a GPU draws from that GPU's."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def longest_post(dataset: PostDataset) -> int:
    return max(range(len(dataset)), key=lambda i: (len(dataset.aligned[i].input_ids), len(dataset.posts[i].tokens)))


def check_longest_posts(net, datasets: dict[str, PostDataset], collator: Collator, *, label_to_id: dict[str, int],
                        device: torch.device, autocast) -> None:
    """One forward in train mode and one decode in eval mode on the longest post of every split, so a
    shape problem surfaces in seconds instead of after the last epoch. Nothing before epoch 1 may
    change the model: a train-mode forward updates running statistics (BatchNorm, P-MNER's region
    standardiser), which would leak dev/test features into training, so every buffer is restored
    afterwards; parameters see no gradient; the random states (python, numpy, torch, CUDA) are
    restored too. The mode the model came in is restored."""
    buffers = {name: buffer.detach().clone() for name, buffer in net.named_buffers()}
    was_training = net.training
    with restored_random_states(device), torch.no_grad():
        try:
            for split, dataset in datasets.items():
                check_one_longest_post(net, split, dataset, collator, label_to_id=label_to_id, device=device,
                                       autocast=autocast)
        finally:
            for name, buffer in net.named_buffers():
                buffer.copy_(buffers[name])
            net.train(was_training)


def check_one_longest_post(net, split: str, dataset: PostDataset, collator: Collator, *,
                           label_to_id: dict[str, int], device: torch.device, autocast) -> None:
    index = longest_post(dataset)
    post = dataset.posts[index]
    item = dict(dataset[index])
    item["labels"] = [label_to_id.get(tag, 0) for tag in post.tags] if post.tags is not None else None
    batch = to_device(collator([item]), device)
    try:
        net.train()
        if item["labels"] is not None:
            with autocast():  # the training step's precision
                net(batch)
        net.eval()
        (path,) = net.decode(batch)  # decoding's (full) precision
    except (RuntimeError, ValueError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{split}: the model fails on the split's longest post ({post.source}, {len(post.tokens)} words, "
            f"{len(item['input_ids'])} pieces): {first[:200]}; lower --max-length or check the model options"
        ) from None
    if len(path) != sum(item["word_mask"]):
        raise ConfigError(f"{split}: the model decoded {len(path)} tags for {post.source}, which has "
                          f"{sum(item['word_mask'])} visible words: a model bug, not an option")


@contextlib.contextmanager
def restored_random_states(device: torch.device):
    """Python's, numpy's, torch's CPU and (on CUDA) the device's generator states are what they were."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=rng_devices(torch.device(device))):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


# ----------------------------------------------------------------------------- the run


class RunInterrupted(Exception):
    """Ctrl-C during training; the message says how to resume."""


class TrainingDiverged(Exception):
    """The training loss became NaN/Inf: the run stops (it never finishes "successfully" on NaN weights)."""


@dataclasses.dataclass
class TrainerState:
    """Everything the loop itself carries from epoch to epoch (saved in every checkpoint)."""

    epoch: int = 0  # epochs finished
    history: list = dataclasses.field(default_factory=list)
    best_f1: float = -1.0
    best_epoch: int = 0
    epochs_without_gain: int = 0
    stopped_early: bool = False
    resumes: list = dataclasses.field(default_factory=list)  # when and at which epoch the run was resumed


@dataclasses.dataclass
class RunRequest:
    """What the run was asked for, resolved and checked before anything is read or written."""

    out: Path  # the run folder
    mode: str  # "fresh" or "resume" (check_out's answer)
    invocation: dict  # the options as config.json records them (a resumed run's own, checked against the new ones)
    model: str  # registered model name
    model_cls: type  # its class
    model_config: Any  # its Config, after preset, --set and flags
    config: TrainConfig  # the training options, after preset, --set and flags
    extra_types: list[str]  # --labels: entity types added to those seen in training
    tracker: Tracker  # --track's tracker and the run's observers (trainer/core/tracking.py)
    grounding: Any = None  # GMNER (--boxes): the gmner_* options (GroundingConfig); None without --boxes


@dataclasses.dataclass
class RunData:
    """The posts of every split and the label set, which comes from the training split only."""

    dataset: Dataset
    source: dict  # where the posts were read: {"source": "data" | "features", "path": ...}
    labels: list[str]  # BIO labels, "O" first
    label_to_id: dict[str, int]
    unseen: dict[str, list[str]]  # split -> entity types it holds that training never shows


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


@dataclasses.dataclass
class Training:
    """The engine and what it prepared: the model, its optimiser and schedule, the training loader."""

    engine: Engine
    net: torch.nn.Module  # as prepared by the engine (engine.unwrap(net) is the model itself)
    optimizer: torch.optim.Optimizer
    scheduler: Any  # linear warm-up then linear decay, stepped once per optimiser step
    train_loader: DataLoader
    sampler: Any  # the loader's batch sampler: its order depends only on (seed, epoch)


def train(*, out: str | Path, **options) -> Path:
    """Train one model and return its finished run directory (see :func:`train_locked` for the options).

    One writer per run folder: the first process holds ``<out>.lock`` (host, pid, start time,
    heartbeat; a dead holder's lock is taken over) for the whole run, so a second trainer on the same
    ``--out`` is refused with the holder's name instead of both writing into one folder."""
    from mner.pipeline.cache.lock import CacheLock

    out = Path(out)
    if os.environ.get("RANK", "0") != "0":  # torchrun: process 0 holds the lock for all of them
        return train_locked(out=out, **options)
    if not out.parent.is_dir():
        from mner.pipeline.outputs import check_writable_folder

        check_writable_folder(out.parent, create=True)
    with CacheLock(out, what="run folder"):
        return train_locked(out=out, **options)


def train_locked(
    *,
    out: str | Path,
    model: str | None = None,
    data: str | Path | None = None,
    features: str | Path | None = None,
    preset: str | None = None,
    sets: list[str] | None = None,
    flags: dict[str, Any] | None = None,
    labels: str | list[str] | None = None,
    allow_missing_images: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    boxes: str | Path | None = None,
    observers: list | None = None,
) -> Path:
    """Train one model and return its finished run directory (the caller holds the run folder's lock).

    ``flags`` holds explicit command-line values for TrainConfig fields (None = not given); they
    override the preset and ``--set`` (see :mod:`mner.trainer.core.config`). ``resume`` continues the
    unfinished run in ``out`` with its stored options; options given again must agree with them.
    Every step up to :func:`open_run_folder` only reads and checks, so a refused run writes nothing.
    ``observers`` (:class:`~mner.trainer.core.tracking.RunObserver`) watch the epochs: tune's pruner.
    """
    started = time.time()
    request = resolve_request(out, model=model, data=data, features=features, preset=preset, sets=sets,
                              flags=flags, labels=labels, allow_missing_images=allow_missing_images,
                              overwrite=overwrite, resume=resume, boxes=boxes, observers=observers)
    data_and_labels = load_data_and_labels(request)
    inputs = build_inputs(request, data_and_labels)
    training = build_training(request, data_and_labels, inputs)
    run_config = describe_run(request, data_and_labels, inputs)
    state = open_run_folder(request, training, run_config, inputs.tokenizer)
    start_tracking(request, training, inputs, run_config, state)
    fit(request, training, data_and_labels, inputs, state)
    finish(request, training, data_and_labels, inputs, state, started=started)
    return request.out


def resolve_request(
    out: str | Path, *, model, data, features, preset, sets, flags, labels, allow_missing_images: bool,
    overwrite: bool, resume: bool, boxes=None, observers: list | None = None,
) -> RunRequest:
    """The options checked and resolved (a resumed run's own options); nothing is read or written yet,
    so every process can call it."""
    out = Path(out)
    given = invocation_record(model=model, data=data, features=features, preset=preset, sets=sets, flags=flags,
                              labels=labels, allow_missing_images=allow_missing_images,
                              **({"boxes": str(Path(boxes).resolve())} if boxes is not None else {}))
    mode = check_out(out, resume=resume, overwrite=overwrite)  # no side effect yet: every process agrees
    invocation = options_for_resume(out, given) if mode == "resume" else given
    model_name = invocation["model"] = invocation["model"] or "bert_crf"
    model_cls = get_model_class(model_name)
    from mner.trainer.gmner.config import split_gmner_sets  # GMNER (--boxes): its gmner_* --set keys

    model_sets, grounding = split_gmner_sets(invocation["sets"], boxes=invocation.get("boxes"))
    model_config, config = resolve_configs(model_cls, preset=invocation["preset"], sets=model_sets,
                                           flags=invocation["flags"])
    extra_types = parse_label_types(invocation["labels"])
    check_device_and_precision(config.device, config.precision)
    if invocation["allow_missing_images"]:
        config.max_missing_images = 1.0
    tracker = Tracker(config.track, observers=observers or [])  # --track: a missing package is an error here
    return RunRequest(out=out, mode=mode, invocation=invocation, model=model_name, model_cls=model_cls,
                      model_config=model_config, config=config, extra_types=extra_types, tracker=tracker,
                      grounding=grounding if invocation.get("boxes") is not None else None)


def load_data_and_labels(request: RunRequest) -> RunData:
    """The posts, and the labels seen in the training split (plus ``--labels``)."""
    dataset, source = load_posts(request.invocation["data"], request.invocation["features"])
    for split in ("train", "dev"):
        if not dataset.splits.get(split):
            raise ConfigError(f"{source['path']}: no {split} posts; training needs train and dev splits")
    check_case_conflicts(dataset.splits, request.extra_types)
    label_list = build_labels(dataset.splits["train"], request.extra_types)
    unseen = {split: found for split in ("dev", "test") if dataset.splits.get(split)
              if (found := unseen_types(dataset.splits[split], label_list))}
    return RunData(dataset=dataset, source=source, labels=label_list,
                   label_to_id={label: i for i, label in enumerate(label_list)}, unseen=unseen)


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
                                use_placeholders=config.use_placeholder_features)
    stage1_mismatches = []
    if visual is not None:  # the cache must come from the stage-1 settings the model's paper assumes
        stage1_mismatches = check_cache_settings(request.model,
                                                 model_stage1_settings(request.model_cls, request.model_config),
                                                 visual.cache, on_mismatch=config.stage1_mismatch)
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


def build_checked_model(request: RunRequest, data: RunData, inputs: RunInputs, engine: Engine) -> torch.nn.Module:
    """The model, seeded, on the engine's device, run once on the longest post of every split."""
    config = request.config
    seed_everything(config.seed)
    try:
        net = build_model(request.model_cls, request.model_config, labels=data.labels,
                          text_encoder=config.text_encoder, tokenizer=inputs.tokenizer, visual=inputs.visual)
    except ValueError as err:
        raise ConfigError(f"model {request.model}: {err}") from None
    net.to(engine.device)
    if config.fast_ablation:  # not the papers' protocol: frozen encoder, outputs computed once
        from mner.trainer.core.fast_text import use_cached_text_encoder

        use_cached_text_encoder(net, [inputs.train_set, *inputs.eval_sets.values()], device=engine.device,
                                batch_size=config.eval_batch_size)
    if inputs.gmner is not None:  # the grounding head on top of the tagger
        try:
            net = inputs.gmner.wrap_model(net, data.labels).to(engine.device)
        except ValueError as err:
            raise ConfigError(f"model {request.model} with --boxes: {err}") from None
    check_longest_posts(net, {"train": inputs.train_set, **inputs.eval_sets}, inputs.collator,
                        label_to_id=data.label_to_id, device=engine.device, autocast=engine.autocast)
    return net


def build_schedule(optimizer: torch.optim.Optimizer, total_steps: int, config: TrainConfig):
    """Linear warm-up over ``warmup_ratio`` of the optimiser steps, then linear decay to zero."""
    from transformers import get_linear_schedule_with_warmup

    total_steps = max(1, total_steps)
    return get_linear_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)


def build_training(request: RunRequest, data: RunData, inputs: RunInputs) -> Training:
    """The engine, the checked model, AdamW over the model's parameter groups, the loader and the schedule."""
    config = request.config
    engine = Engine(device=config.device, precision=config.precision, grad_accum=config.grad_accum,
                    log_with=request.tracker.log_with, project_dir=request.out / LOG_DIR)
    net = build_checked_model(request, data, inputs, engine)
    train_loader = make_loader(inputs.train_set, inputs.collator, batch_size=config.batch_size, shuffle=True,
                               num_workers=config.num_workers, seed=config.seed, group_by_length=config.group_by_length,
                               rank=engine.rank, world_size=engine.world_size)
    sampler = train_loader.batch_sampler
    optimizer = torch.optim.AdamW(parameter_groups(net, config))
    net, optimizer, train_loader = engine.prepare(net, optimizer, train_loader)
    if engine.rank > 0:  # DDP made the weights rank 0's; each process now draws its own dropout masks
        seed_everything(rank_seed(config.seed, engine.rank))
    scheduler = build_schedule(optimizer, engine.optimizer_steps_per_epoch(train_loader) * config.epochs, config)
    return Training(engine=engine, net=net, optimizer=optimizer, scheduler=scheduler, train_loader=train_loader,
                    sampler=sampler)


def describe_run(request: RunRequest, data: RunData, inputs: RunInputs) -> dict:
    """config.json: everything that decides the run's result (a resume must match it)."""
    return {
        "model": request.model, "preset": request.invocation["preset"], "sets": request.invocation["sets"],
        "model_config": dataclasses.asdict(request.model_config),
        "train_config": dataclasses.asdict(request.config),
        "labels": data.labels, "label_map": data.label_to_id,
        "text_encoder": {"name": request.config.text_encoder,
                         "path": resolve_text_encoder(request.config.text_encoder), "positions": inputs.positions},
        "data": {**data.source, "hash": data.dataset.data_hash, "files": data.dataset.files,
                 "notes": data.dataset.notes},
        "features": inputs.cache_info, "invocation": request.invocation,
    } | ({"gmner": {**inputs.gmner.record(), "feature_width": inputs.gmner.feature_width}} if inputs.gmner else {})


def open_run_folder(request: RunRequest, training: Training, run_config: dict, tokenizer) -> TrainerState:
    """A fresh run folder, or the unfinished one resumed from its last checkpoint (its state returned)."""
    out, engine, config = request.out, training.engine, request.config
    state = TrainerState()
    if request.mode == "resume":
        stored = json.loads((out / "config.json").read_text(encoding="utf-8"))
        differ = resume_differences(stored, run_config)
        if differ:
            raise ConfigError(f"--resume: {out} was started with other options: {'; '.join(differ)}; resume with "
                              "the run's own options (`mner-train --out RUN --resume` is enough) or start a new run")
        checkpoint, damaged = load_good_checkpoint(engine, out, training.net, training.optimizer, training.scheduler)
        if checkpoint is None:
            log(f"{out}: no epoch had finished; starting it from epoch 1")
        else:
            saved = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
            state = TrainerState(**{k: v for k, v in saved.items() if k in TrainerState.__dataclass_fields__})
            engine.global_step = state.epoch * len(training.train_loader)
            log(f"resuming {out} after epoch {state.epoch} of {config.epochs} (best dev F1 "
                f"{100 * state.best_f1:.2f} at epoch {state.best_epoch})")
        state.resumes.append({"after_epoch": state.epoch, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              **({"damaged_checkpoints": damaged} if damaged else {})})
    elif engine.is_main:
        if out.exists():
            shutil.rmtree(out)  # check_out allowed it: --overwrite of a marked mner run
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, status="unfinished", epochs=config.epochs, epochs_done=0)
        write_json_atomic(out / "config.json", run_config)
        write_json_atomic(out / "labels.json", {"labels": run_config["labels"]})
        save_encoder_skeleton(config.text_encoder, tokenizer, out / "text_encoder")
    engine.wait()
    return state


def start_tracking(request: RunRequest, training: Training, inputs: RunInputs, run_config: dict,
                   state: TrainerState) -> None:
    """Open the tracker run (or continue the run folder's own) with config.json and the run record."""
    request.tracker.start(training.engine.accelerator, out=request.out, run_config=run_config,
                          record=process_record(request, training, inputs.cache_info), epochs=request.config.epochs,
                          epochs_done=state.epoch, steps_done=training.engine.global_step, history=state.history)


def fit(request: RunRequest, training: Training, data: RunData, inputs: RunInputs, state: TrainerState) -> None:
    """The epochs; Ctrl-C leaves the last finished epoch's checkpoint complete and says how to resume."""
    engine, out = training.engine, request.out
    log(f"training {request.model} on {len(inputs.train_set)} posts, {len(training.train_loader)} steps/epoch, "
        f"device {engine.device}, {engine.precision}, {engine.world_size} process(es)")
    try:
        run_epochs(engine, state, training.net, training.optimizer, training.scheduler, training.train_loader,
                   training.sampler, config=request.config, out=out, eval_set=inputs.eval_sets["dev"],
                   collator=inputs.collator, labels=data.labels, tracker=request.tracker,
                   dev_score=inputs.gmner.dev_score(inputs.eval_sets["dev"], inputs.collator, labels=data.labels,
                                                    device=engine.device, config=request.config)
                   if inputs.gmner else None)
    except KeyboardInterrupt:
        engine.writer.wait()  # the last finished epoch's checkpoint is complete on disk
        engine.end()
        raise RunInterrupted(
            f"interrupted in epoch {state.epoch + 1}; {out} keeps {state.epoch} finished epoch(s) and is resumable: "
            f"mner-train --out {out} --resume"
        ) from None
    except NonFiniteLoss as err:
        engine.writer.wait()
        raise TrainingDiverged(describe_divergence(err, inputs.train_set, state, out)) from None
    except Exception:  # an observer stopped the run (tune's pruner): its checkpoints stay complete, resumable
        engine.writer.wait()
        engine.end()
        raise


def finish(request: RunRequest, training: Training, data: RunData, inputs: RunInputs, state: TrainerState, *,
           started: float) -> None:
    """The best epoch's weights scored on dev and test; predictions, metrics.json and model.safetensors
    written, the checkpoints removed and the run marked finished."""
    out, engine, config, net = request.out, training.engine, request.config, training.net
    engine.writer.wait()
    engine.wait()
    final = latest_checkpoint(out)
    engine.load_weights(net, final / "best_model.safetensors")
    engine.wait()  # every process has read the best weights before process 0 moves them
    metrics: dict[str, Any] = {
        "model": request.model, "preset": request.invocation["preset"], "best_epoch": state.best_epoch,
        "epochs_run": state.epoch, "stopped_early": state.stopped_early, "data_hash": data.dataset.data_hash,
        "data_source": data.source, "orphan_i": data.dataset.orphan_i, "repaired_train_tags": inputs.train_set.repaired,
        "labels": data.labels, "unseen_types": data.unseen,
    }
    for split, eval_set in inputs.eval_sets.items():
        if inputs.gmner is not None:
            from mner.trainer.gmner.data import predict_grounded

            pred, regions = predict_grounded(engine.unwrap(net), eval_set, inputs.collator, labels=data.labels,
                                             device=engine.device, batch_size=config.eval_batch_size,
                                             num_workers=config.num_workers, desc=split)
        else:
            pred = predict_tags(engine.unwrap(net), eval_set, inputs.collator, labels=data.labels,
                                device=engine.device, batch_size=config.eval_batch_size,
                                num_workers=config.num_workers, desc=split)
        scores = score_split(eval_set.posts, pred)
        metrics[split] = scores
        if engine.is_main:
            write_conll(out / "predictions" / f"{split}.conll", eval_set.posts, pred)
            write_parquet(out / "predictions" / f"{split}.parquet", eval_set.posts, pred)
        log(format_scores(scores, f"{split} (best epoch {state.best_epoch})"))
        if inputs.gmner is not None:
            scores.update(inputs.gmner.finish_split(split, eval_set, regions, out if engine.is_main else None))
    metrics["alignment"] = {
        split: {"words": ds.report.words, "zero_piece": ds.report.zero_piece, "truncated": ds.report.truncated}
        for split, ds in [("train", inputs.train_set), *inputs.eval_sets.items()]
    }
    cache_info = inputs.cache_info
    if cache_info is not None:
        metrics["cache"] = {k: cache_info[k] for k in ("path", "fingerprint", "groups")}
        metrics["image_coverage"] = cache_info["coverage"]
    if inputs.visual is not None:
        metrics["random_init_features"] = inputs.visual.random_init
        metrics["stage1_mismatches"] = inputs.stage1_mismatches
    if inputs.gmner is not None:
        metrics["gmner"] = inputs.gmner.record(train_set=inputs.train_set)
    metrics["history"] = state.history
    metrics["run"] = {
        **process_record(request, training, cache_info), "resumes": state.resumes,
        "epoch_seconds": [h["seconds"] for h in state.history],
        "seconds_this_process": round(time.time() - started, 1), "peak_memory": engine.peak_memory_mb(),
    }
    if engine.is_main:
        os.replace(final / "best_model.safetensors", out / "model.safetensors")
        os.chmod(out / "model.safetensors", 0o644)
        weights_sha256 = sha256_file(out / "model.safetensors")  # evaluate / predict verify it
        metrics["run"]["weights_sha256"] = weights_sha256
        write_json_atomic(out / "metrics.json", metrics)
        remove_checkpoints(out)
        write_marker(out, status="finished", epochs=config.epochs, epochs_done=state.epoch,
                     weights_sha256=weights_sha256)
        log(f"run written to {out}")
    engine.wait()
    engine.end()


def process_record(request: RunRequest, training: Training, cache_info: dict | None) -> dict:
    """metrics.json's "run": software, seed, device and precision, and the weights the run read."""
    config, engine = request.config, training.engine
    return {
        "software": software_versions(), "seed": config.seed, "device": str(engine.device),
        "precision": engine.precision, "decode_precision": DECODE_PRECISION, "world_size": engine.world_size,
        "grad_accum": config.grad_accum,
        "rank_seeds": [rank_seed(config.seed, rank) for rank in range(engine.world_size)],
        "optimizer_steps_per_epoch": engine.optimizer_steps_per_epoch(training.train_loader),
        "text_encoder": {"name": config.text_encoder, "weights": weights_fingerprint(config.text_encoder)},
        "cache": None if cache_info is None else {k: cache_info[k] for k in ("path", "fingerprint", "groups")},
    }


def write_checkpoint(out: Path, snapshot: dict, state: dict, improved: bool, epochs: int) -> None:
    """Stage, complete and swap in one epoch's checkpoint (runs in the engine's background writer).
    The best-so-far weights are this epoch's model when it improved, else the previous checkpoint's
    best (hard links: no rewrite); the trainer state goes last and marks the checkpoint complete."""
    previous = latest_checkpoint(out)
    staging = checkpoint_staging(out)
    Engine.write_snapshot(snapshot, staging)
    best = staging / "best_model.safetensors"
    link_or_copy(staging / "model.safetensors" if improved or previous is None
                 else previous / "best_model.safetensors", best)
    state = {**state, "files": checkpoint_files(staging)}  # verified on --resume (a damaged one is skipped)
    write_json_atomic(staging / STATE_FILE, state)
    commit_checkpoint(out)
    write_marker(out, status="unfinished", epochs=epochs, epochs_done=state["epoch"])


def load_good_checkpoint(engine: Engine, out: Path, net, optimizer, scheduler) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose files match their recorded hashes and load; a damaged newest one
    falls back to the previous epoch's (``checkpoint.old``). Returns it (None: no epoch had finished)
    and what was wrong with the ones skipped (warned about and recorded in the run)."""
    candidates = checkpoint_candidates(out)
    damaged: list[str] = []
    for checkpoint in candidates:
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            try:
                engine.load_checkpoint(checkpoint, net, optimizer, scheduler)
            except ConfigError:
                raise
            except Exception as err:  # a truncated safetensors / pickle: try the previous epoch's
                problem = f"{checkpoint} does not load ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
        if problem is None:
            if damaged:
                warn_loudly(f"{'; '.join(damaged)}: resuming from the previous good checkpoint {checkpoint}")
            return checkpoint, damaged
        damaged.append(problem)
    if damaged:
        raise RunFolderError(f"no intact checkpoint in {out} ({'; '.join(damaged)}); start the run again with "
                             "--overwrite")
    return None, damaged


def describe_divergence(err: NonFiniteLoss, train_set: PostDataset, state: TrainerState, out: Path) -> str:
    """One message: the step, the batch's posts (and those with non-finite features), the likely cause."""
    posts = [train_set.posts[i] for i in err.post_indices if 0 <= i < len(train_set.posts)]
    shown = ", ".join(f"{p.post_id} ({p.source})" for p in posts[:8]) + (" ..." if len(posts) > 8 else "")
    bad = [posts[row] for row in err.bad_rows if row < len(posts)]
    images = ("; posts whose cached features are not finite: "
              + ", ".join(f"{p.post_id} (image {p.image_id})" for p in bad[:8])) if bad else ""
    return (f"training stopped: the loss is {err.loss} at step {err.step} (epoch {state.epoch + 1}); batch posts "
            f"{shown}{images}. Likely cause: {err.cause}. {out} keeps {state.epoch} finished epoch(s) and is not "
            "a finished run")


def run_epochs(engine: Engine, state: TrainerState, net, optimizer, scheduler, train_loader, sampler, *,
               config: TrainConfig, out: Path, eval_set: PostDataset, collator: Collator, labels: list[str],
               tracker: Tracker, dev_score=None) -> None:
    """Epochs ``state.epoch + 1 ..`` with a checkpoint after each, until ``config.epochs`` or early stop;
    ``tracker`` gets each step and each finished epoch. ``dev_score(model) -> scores`` replaces the dev
    entity scores as the selection score (GMNER runs: dev GMNER P/R/F1 as ``micro``)."""
    epoch_bar = tqdm(range(state.epoch + 1, config.epochs + 1), desc="epochs", dynamic_ncols=True, file=sys.stderr,
                     disable=not engine.is_main)
    for epoch in epoch_bar:
        if state.stopped_early:
            break
        epoch_start, cpu_start = time.time(), time.process_time()
        sampler.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        loss = engine.train_epoch(net, train_loader, optimizer, scheduler, max_grad_norm=config.max_grad_norm,
                                  desc=f"epoch {epoch}", tracker=tracker)
        train_seconds = time.time() - epoch_start
        if dev_score is not None:
            dev_scores = dev_score(engine.unwrap(net))
        else:
            dev_pred = predict_tags(engine.unwrap(net), eval_set, collator, labels=labels, device=engine.device,
                                    batch_size=config.eval_batch_size, num_workers=config.num_workers, desc="dev")
            dev_scores = score_split(eval_set.posts, dev_pred)
        dev_f1, agreement = engine.agree(net, dev_scores["micro"]["f1"])
        if agreement and not agreement["replicas_agree"]:
            warn_loudly(f"epoch {epoch}: the {engine.world_size} processes disagree (dev F1 by rank "
                        f"{agreement['dev_f1_by_rank']}, or their weights / buffers differ); process 0's "
                        "dev F1 decides; recorded in metrics.json history")
        improved = dev_f1 > state.best_f1
        if improved:
            state.best_f1, state.best_epoch, state.epochs_without_gain = dev_f1, epoch, 0
        else:
            state.epochs_without_gain += 1
        state.epoch = epoch
        state.stopped_early = bool(config.patience and state.epochs_without_gain >= config.patience)
        eval_seconds = time.time() - epoch_start - train_seconds

        checkpoint_start = time.time()
        state.history.append({"epoch": epoch, "loss": loss, "dev_f1": dev_f1, "train_seconds": round(train_seconds, 2),
                              "eval_seconds": round(eval_seconds, 2), "seconds": None, "checkpoint_seconds": None,
                              "cpu_seconds": None, **agreement})
        snapshot = engine.snapshot(net, optimizer, scheduler)  # the write overlaps the next epoch
        if engine.is_main:
            engine.writer.submit(functools.partial(
                write_checkpoint, out, snapshot, copy.deepcopy(dataclasses.asdict(state)), improved, config.epochs))
        state.history[-1].update(checkpoint_seconds=round(time.time() - checkpoint_start, 2),
                                 seconds=round(time.time() - epoch_start, 2),
                                 cpu_seconds=round(time.process_time() - cpu_start, 2))  # all threads
        epoch_bar.set_postfix(loss=f"{loss:.3f}", dev_f1=f"{100 * dev_f1:.2f}",
                              best=f"{100 * state.best_f1:.2f}@{state.best_epoch}")
        log(f"epoch {epoch}: loss {loss:.4f}  dev F1 {100 * dev_f1:.2f}{'  (best)' if improved else ''}  "
            f"{time.time() - epoch_start:.0f}s")
        if state.stopped_early:
            log(f"early stop: no better dev F1 for {config.patience} epochs")
        tracker.epoch(epoch, engine.global_step, dev_scores=dev_scores, entry=state.history[-1],
                      memory=engine.peak_memory_mb())
    epoch_bar.close()


# ----------------------------------------------------------------------------- finished runs


def load_run(run_dir: str | Path, *, features: str | Path | None = None, device: str = "auto"):
    """Rebuild a trained model from its finished run directory: (model, run config, tokenizer, visual
    inputs, device). The encoder is built from the run's own ``text_encoder/`` skeleton, so the run
    keeps working after the original encoder folder moved or without network."""
    from safetensors.torch import load_model

    run_dir = Path(run_dir)
    require_finished(run_dir)
    run_config = read_run_config(run_dir)
    verify_weights(run_dir)
    model_cls = get_model_class(run_config["model"])
    model_config = model_cls.Config(**run_config["model_config"])
    use_placeholders = run_config.get("train_config", {}).get("use_placeholder_features", False)
    visual = open_visual_inputs(
        features, model_cls, model_config, run_config["model"], use_placeholders=use_placeholders
    )
    skeleton = run_dir / "text_encoder"
    encoder = str(skeleton) if skeleton.is_dir() else run_config["text_encoder"]["name"]
    tokenizer = load_tokenizer(encoder)
    torch_device = torch.device(resolve_device(device))
    net = build_model(model_cls, model_config, labels=run_config["labels"], text_encoder=encoder,
                      tokenizer=tokenizer, visual=visual)
    if run_config.get("gmner"):  # trained with --boxes: the grounding head as it was sized then
        from mner.trainer.gmner.head import rebuild_grounded

        net = rebuild_grounded(net, run_config)
    try:
        load_model(net, str(run_dir / "model.safetensors"), device="cpu")
    except Exception as err:  # a truncated or foreign file (runs from before weights_sha256 was recorded)
        raise RunFolderError(f"{run_dir / 'model.safetensors'} does not load ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:80] if str(err) else ''}); restore it or train the run "
                             "again") from None
    return net.to(torch_device), run_config, tokenizer, visual, torch_device
