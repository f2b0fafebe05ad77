"""Training configuration and how presets, ``--set`` and explicit flags combine.

Precedence, lowest first: dataclass defaults < the model's preset < ``--set key=value`` < explicit
flags (``--epochs``, ``--batch-size``, ...). A preset or ``--set`` key may name a field of the model's
``Config`` or of :class:`TrainConfig` (a name in both sets both).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainConfig:
    text_encoder: str = "bert-base-cased"  # hub name, local folder or alias (minilm-l6)
    encoder_lr: float = 5e-5  # AdamW learning rate of parameters under `text_encoder.`
    head_lr: float = 1e-3  # learning rate of the emission / fusion layers
    crf_lr: float = 1e-2  # learning rate of parameters under `crf.`
    weight_decay: float = 0.01  # AdamW weight decay (not applied to biases and LayerNorm weights)
    warmup_ratio: float = 0.1  # fraction of all optimiser steps with linear warmup
    max_grad_norm: float = 1.0  # gradient clipping threshold (0 disables)
    epochs: int = 10  # maximum number of epochs
    batch_size: int = 16  # posts per optimiser step
    eval_batch_size: int = 64  # posts per batch when decoding dev/test
    max_length: int = 128  # sub-word pieces per post incl. special tokens; later words are predicted O
    patience: int = 3  # stop after this many epochs without a better dev F1 (0 disables)
    seed: int = 42  # seeds python, numpy and torch
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 0  # DataLoader worker processes
    group_by_length: bool = True  # batch posts of similar length together (less padding, faster)
    use_placeholder_features: bool = False  # feed placeholder images' stand-in features (default: mask like missing)
    train_fraction: float = 1.0  # keep this fraction of training posts (low-resource runs; nested subsets per seed)
    fast_ablation: bool = False  # freeze the text encoder and cache its outputs once (not the papers' protocol)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (CUDA only): autocast dtype
    grad_accum: int = 1  # batches whose gradients are summed before one optimiser step
    max_missing_images: float = 0.05  # refuse a split when more than this share of its posts has no cache row
    stage1_mismatch: str = "error"  # error | warn: cache extracted with other stage-1 settings than the model's paper
    track: str = "none"  # none | tensorboard | wandb | mlflow: live curves through accelerate's trackers
    score_test: bool = True  # decode and score the test split after training (tune's trials: false, never test)


class ConfigError(ValueError):
    pass


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRACKERS = ("none", "tensorboard", "wandb", "mlflow")

# (field, test, what it must be): the checks every resolved TrainConfig passes before any data is read
_TRAIN_RULES: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("epochs", lambda v: v >= 1, ">= 1"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("eval_batch_size", lambda v: v >= 1, ">= 1"),
    ("grad_accum", lambda v: v >= 1, ">= 1"),
    ("num_workers", lambda v: v >= 0, ">= 0"),
    ("encoder_lr", lambda v: v >= 0, ">= 0"),
    ("head_lr", lambda v: v >= 0, ">= 0"),
    ("crf_lr", lambda v: v >= 0, ">= 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("max_grad_norm", lambda v: v >= 0, ">= 0 (0 disables clipping)"),
    ("max_length", lambda v: v >= 3, ">= 3 ([CLS], one piece, [SEP])"),
    ("patience", lambda v: v >= 0, ">= 0 (0 disables early stopping)"),
    ("train_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("max_missing_images", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("precision", lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    ("track", lambda v: v in TRACKERS, f"one of {', '.join(TRACKERS)}"),
    ("device", lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()),
     "one of auto, cpu, cuda, cuda:N"),
]
_FLAG_OF = {"batch_size": "--batch-size", "num_workers": "--num-workers", "max_length": "--max-length",
            "encoder_lr": "--encoder-lr", "head_lr": "--head-lr", "crf_lr": "--crf-lr", "grad_accum": "--grad-accum",
            "max_missing_images": "--max-missing-images"}


def option_text(name: str, value: Any) -> str:
    """How a user gives this value: ``--batch-size 0`` for fields with a flag, else ``--set name=value``."""
    if name in _FLAG_OF or name in ("epochs", "patience", "seed", "device", "precision", "track"):
        return f"{_FLAG_OF.get(name, f'--{name}')} {value}"
    return f"--set {name}={value}"


def validate_train_config(config: TrainConfig) -> None:
    """Every train option in range, or a ConfigError naming the option, the value and the valid range."""
    for name, ok, expected in _TRAIN_RULES:
        value = getattr(config, name)
        if not ok(value):
            raise ConfigError(f"{option_text(name, value)}: must be {expected}")


def validate_model_config(model_cls, model_config, *, text_width: int | None = None) -> None:
    """Checks every model config gets from its field names (the conventions of the model files), then the
    model's own ``check_config`` when it has one. ``text_width`` is the text encoder's hidden size."""
    for f in dataclasses.fields(model_config):
        value = getattr(model_config, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if "dropout" in f.name and not 0 <= value < 1:
            raise ConfigError(f"--set {f.name}={value}: dropout must be in [0, 1)")
        if (f.name.startswith(("num_", "max_")) or f.name.endswith("_mult")) and value < 1:
            raise ConfigError(f"--set {f.name}={value}: must be >= 1")
    heads = getattr(model_config, "num_heads", None)
    if text_width is not None and isinstance(heads, int) and text_width % heads:
        divisors = [d for d in range(1, min(text_width, 64) + 1) if text_width % d == 0]
        raise ConfigError(
            f"--set num_heads={heads}: the text encoder's width {text_width} is not divisible by it; "
            f"valid values include {', '.join(map(str, divisors))}"
        )
    try:
        model_cls.required_features(model_config)  # models check their feature/prompt-set names here
        check = getattr(model_cls, "check_config", None)
        if check is not None:
            check(model_config, text_width=text_width)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def convert_value(cls, name: str, raw: Any) -> Any:
    """Convert a ``--set`` string to the type of ``cls.name`` (bool, int, float, str, tuple, Optional)."""
    if not isinstance(raw, str):
        return raw
    hint = typing.get_type_hints(cls)[name]
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if raw.lower() in ("none", "null"):
            return None
        hint, origin = args[0], typing.get_origin(args[0])
    try:
        if hint is bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        if origin in (tuple, list):
            item_type = (typing.get_args(hint) or (str,))[0]
            items = [item_type(x) for x in raw.split(",") if x.strip()]
            return tuple(items) if origin is tuple else items
    except ValueError as err:
        raise ConfigError(f"--set {name}={raw}: {err}") from None
    return raw


def parse_sets(pairs: list[str] | None) -> dict[str, str]:
    parsed: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set dropout=0.2")
        parsed[key.strip()] = value.strip()
    return parsed


def resolve_configs(
    model_cls,
    *,
    preset: str | None = None,
    sets: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> tuple[Any, TrainConfig]:
    """Build (model config, train config) from defaults, a preset, ``--set`` pairs and explicit flags.

    ``flags`` maps TrainConfig field names to values; ``None`` means "not given on the command line".
    """
    presets = getattr(model_cls, "PRESETS", {}) or {}
    model_fields = field_names(model_cls.Config)
    train_fields = field_names(TrainConfig)
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(
                f"unknown preset {preset!r} for model {getattr(model_cls, 'model_name', model_cls.__name__)}; "
                f"valid values: {', '.join(sorted(presets)) or '(none)'}"
            )
        values.update(presets[preset])
    values.update(parse_sets(sets))
    for key in values:
        if key not in model_fields and key not in train_fields:
            raise ConfigError(
                f"unknown config key {key!r}; valid model keys: {', '.join(model_fields) or '(none)'}; "
                f"valid train keys: {', '.join(train_fields)}"
            )
    # convert every given value, also those an explicit flag overrides: `--set epochs=abc --epochs 3` is an error
    for key, raw in values.items():
        for cls, names in ((model_cls.Config, model_fields), (TrainConfig, train_fields)):
            if key in names:
                convert_value(cls, key, raw)
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    model_kwargs = {k: convert_value(model_cls.Config, k, v) for k, v in values.items() if k in model_fields}
    train_kwargs = {
        k: convert_value(TrainConfig, k, v) for k, v in values.items() if k in train_fields
    }
    config = TrainConfig(**train_kwargs)
    validate_train_config(config)
    return model_cls.Config(**model_kwargs), config
