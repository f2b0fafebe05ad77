"""Model registry: every model file registers itself by name with ``@register_model``.

A registered model is an ``nn.Module`` class with:

- ``Config``: a dataclass of the paper's switches and defaults (one comment per field);
- ``PRESETS``: ``{preset_name: {field: value}}`` -- the paper's main setting and ablation rows;
- ``required_features(config) -> list[str]``: cache dataset paths it reads (empty for text-only);
- ``__init__(self, config, *, labels, text_encoder, features)`` where ``features`` is a
  :class:`mner.pipeline.cache.FeatureSpec` (shapes + global arrays) or ``None``;
- ``forward(batch) -> dict`` with ``"loss"`` when ``batch["labels"]`` is present;
- ``decode(batch) -> list[list[int]]``: one label id per kept word of each post.
"""

from __future__ import annotations

import importlib
from typing import Callable

MODEL_REGISTRY: dict[str, type] = {}

# Model modules imported on first lookup, so registering needs no central list of imports
# beyond this one.
_MODEL_MODULES = ("bert_crf", "vcrmner", "promptmner", "pmner")


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
