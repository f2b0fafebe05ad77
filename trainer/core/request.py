"""What a run was asked for (options resolved and checked, nothing written) and its data and labels."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from mner.pipeline.data import Dataset
from mner.trainer.core.config import ConfigError, TrainConfig, resolve_configs
from mner.trainer.core.engine import check_device_and_precision
from mner.trainer.core.labels import build_labels, check_case_conflicts, parse_label_types, unseen_types
from mner.trainer.core.run_folder import check_out, invocation_record, options_for_resume
from mner.trainer.core.schema2_runs import refuse_schema2_resume
from mner.trainer.core.tracking import Tracker
from mner.trainer.inputs.posts import load_posts
from mner.trainer.models import get_model_class


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
    if mode == "resume":
        refuse_schema2_resume(out)
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
