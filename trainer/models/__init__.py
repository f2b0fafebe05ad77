"""Model registry: every model file registers itself by name with ``@register_model``.

A registered model is an ``nn.Module`` class with:

- ``Config``: a dataclass of the paper's switches and defaults (one comment per field);
- ``PRESETS``: ``{preset_name: {field: value}}`` -- the paper's main setting and ablation rows;
- ``required_features(config) -> list[str]``: cache dataset paths it reads (empty for text-only);
- ``__init__(self, config, *, labels, text_encoder, features)`` where ``features`` is a
  :class:`mner.pipeline.cache.FeatureSpec` (shapes + global arrays) or ``None``;
- ``forward(batch) -> dict`` with ``"loss"`` when ``batch["labels"]`` is present;
- ``decode(batch) -> list[list[int]]``: one label id per kept word of each post;
- ``parameter_groups(train_config) -> list[dict]``: the optimiser's parameter groups (torch dicts
  with ``params``, ``lr``, ``weight_decay`` and a ``name``). Most models return
  ``default_parameter_groups(self, train_config)``; a model with its own tower (a fine-tuned CLIP
  vision encoder) passes ``extra_rates={"vision_tower": config.vision_lr}``. The trainer checks that
  every trainable parameter is in exactly one group;
- optionally ``check_config(config, *, text_width)`` raising ValueError for option combinations the
  trainer's generic checks (dropout in [0, 1), ``num_*``/``max_*`` >= 1, ``num_heads`` dividing the
  text width, ``required_features`` accepting the config) do not cover; it runs before any data is read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

MODEL_REGISTRY: dict[str, type] = {}

# Model modules imported on first lookup, so registering needs no central list of imports
# beyond this one.
_MODEL_MODULES = ("bert_crf", "vcrmner", "promptmner", "pmner", "mgipscl", "espvr")


def default_parameter_groups(
    model,
    train_config,
    *,
    extra_rates: dict[str, float] | None = None,
    no_decay: Callable[[str, object], bool] | None = None,
) -> list[dict]:
    """Encoder / head / CRF groups, each split into decayed weights and undecayed biases and norm weights.

    Parameters under ``text_encoder.`` learn at ``encoder_lr``, under ``crf.`` at ``crf_lr``, under a
    prefix of ``extra_rates`` (a submodule name such as ``"vision_tower"``) at its rate; the rest is the
    head (``head_lr``). ``no_decay(name, param)`` overrides which tensors skip weight decay
    (default: tensors with fewer than two dimensions, i.e. biases and LayerNorm weights).
    """
    rates = {"text_encoder": train_config.encoder_lr, "crf": train_config.crf_lr, **(extra_rates or {})}
    skip_decay = no_decay or (lambda name, param: param.ndim < 2)
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = next((prefix for prefix in rates if name.startswith(prefix + ".")), "head")
        groups.setdefault((part, not skip_decay(name, param)), []).append(param)
    return [
        {"params": params, "lr": rates.get(part, train_config.head_lr),
         "weight_decay": train_config.weight_decay if decay else 0.0, "name": f"{part}{'' if decay else '/no_decay'}"}
        for (part, decay), params in sorted(groups.items())
    ]


def check_parameter_groups(model, groups: list[dict]) -> None:
    """Every trainable parameter in exactly one group, and every group named: the contract of
    ``parameter_groups``; a parameter left out would silently never train."""
    seen: dict[int, str] = {}
    for group in groups:
        if "name" not in group or "lr" not in group:
            raise ValueError(f"{type(model).__name__}.parameter_groups: every group needs 'name' and 'lr'")
        for param in group["params"]:
            if id(param) in seen:
                raise ValueError(f"{type(model).__name__}.parameter_groups: a parameter is in groups "
                                 f"{seen[id(param)]!r} and {group['name']!r}")
            seen[id(param)] = group["name"]
    missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"{type(model).__name__}.parameter_groups leaves out trainable parameters: {missing[:5]}")


def register_model(name: str) -> Callable[[type], type]:
    def decorator(cls: type) -> type:
        if name in MODEL_REGISTRY and MODEL_REGISTRY[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered by {MODEL_REGISTRY[name]}")
        cls.model_name = name
        MODEL_REGISTRY[name] = cls
        return cls

    return decorator


def _import_all() -> None:
    for module in _MODEL_MODULES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as err:  # a model file not written yet must not break the others
            if err.name != f"{__name__}.{module}":
                raise


def available_models() -> list[str]:
    _import_all()
    return sorted(MODEL_REGISTRY)


def get_model_class(name: str) -> type:
    _import_all()
    if name not in MODEL_REGISTRY:
        raise KeyError(f"unknown model {name!r}; valid values: {', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[name]
