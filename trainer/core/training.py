"""The model built, seeded and checked, its optimiser, schedule and training loader prepared by the engine."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mner.trainer.core.config import ConfigError, TrainConfig
from mner.trainer.core.engine import Engine
from mner.trainer.core.preflight import check_longest_posts
from mner.trainer.core.request import RunData, RunRequest
from mner.trainer.core.tracking import LOG_DIR
from mner.trainer.inputs.posts import make_loader
from mner.trainer.inputs.run_inputs import RunInputs
from mner.trainer.inputs.text_encoder import resolve_text_encoder
from mner.trainer.inputs.visual_inputs import VisualInputs
from mner.trainer.models import check_parameter_groups, default_parameter_groups


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


def build_model(model_cls, model_config, *, labels, text_encoder: str, tokenizer, visual: VisualInputs | None):
    return model_cls(
        model_config, labels=labels, text_encoder=resolve_text_encoder(text_encoder), tokenizer=tokenizer,
        features=visual.spec if visual is not None else None,
    )


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """The model's own groups (``parameter_groups``), checked to hold every trainable parameter once."""
    if hasattr(model, "parameter_groups"):
        groups = model.parameter_groups(config)
    else:
        groups = default_parameter_groups(model, config)
    check_parameter_groups(model, groups)
    return groups


@dataclasses.dataclass
class Training:
    """The engine and what it prepared: the model, its optimiser and schedule, the training loader."""

    engine: Engine
    net: torch.nn.Module  # as prepared by the engine (engine.unwrap(net) is the model itself)
    optimizer: torch.optim.Optimizer
    scheduler: Any  # linear warm-up then linear decay, stepped once per optimiser step
    train_loader: DataLoader
    sampler: Any  # the loader's batch sampler: its order depends only on (seed, epoch)


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
