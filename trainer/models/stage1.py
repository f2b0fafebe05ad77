"""The stage-1 settings a model's paper assumes, declared by the model and checked against a cache.

A model lists them with ``stage1_settings(config) -> list[Stage1Setting]``: which cache group's
provenance holds the value, what the paper says it is, and the ``mner-features extract`` flag that
produces it. The trainer refuses a cache whose provenance disagrees (unless told to go on), and the
hint for missing features prints the extract command with these flags, so the cache a user builds
from the hint is the one the paper describes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from mner.pipeline.stage1 import Choice, Stage1Setting, choose_instances, config_slots, paper_needs

__all__ = ["Stage1Setting", "check_cache_settings", "choose_model_instances", "extract_command",
           "missing_features_message", "model_stage1_settings", "stage1_flags", "stage1_mismatches"]


def _lookup(provenance: dict, key: str) -> Any:
    value: Any = provenance
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def stage1_mismatches(
    settings: Iterable[Stage1Setting], provenance_of: Callable[[str], dict | None]
) -> list[str]:
    """One line per setting the cache does not meet; groups the cache lacks are not checked here
    (the missing-features error names them)."""
    lines = []
    for setting in settings:
        provenance = provenance_of(setting.group)
        if provenance is None:
            continue
        if setting.random_init_free and provenance.get("pretrained") == "random":
            continue  # random weights: the value means nothing (a score threshold may be lowered)
        found = _lookup(provenance, setting.key)
        if not setting.satisfied_by(found):
            lines.append(f"{setting.describe()}: the cache has {found!r}; extract with {setting.flags}")
    return lines


def stage1_flags(settings: Iterable[Stage1Setting]) -> list[str]:
    """The extract flags of the settings, each flag once, in declaration order."""
    flags: list[str] = []
    for setting in settings:
        if setting.flags not in flags:
            flags.append(setting.flags)
    return flags


REPEATABLE = ("--encoder", "--prompts", "--detector", "--clip-model")  # mner-features extract flags given many times


def extract_command(base_command: str, settings: Iterable[Stage1Setting]) -> str:
    """``base_command`` (a ``mner-features extract ...`` hint) with the model's settings added: a
    ``--flag value`` of the settings replaces the same flag's value in the hint."""
    words = base_command.split(" ")
    for flags in stage1_flags(settings):
        name, _, value = flags.partition(" ")
        if name in REPEATABLE:  # repeatable flags: add if absent
            if f"{name} {value}" not in base_command:
                words += [name, value]
            continue
        if name in words:
            index = words.index(name)
            words[index + 1 : index + 2] = [value] if value else []
        else:
            words += [name, value] if value else [name]
    return " ".join(words)


ON_MISMATCH = ("error", "warn")


def model_stage1_settings(model_cls, model_config) -> list[Stage1Setting]:
    """The model's declared settings (a model without the method assumes nothing)."""
    declare = getattr(model_cls, "stage1_settings", None)
    return list(declare(model_config)) if declare is not None else []


def missing_features_message(model_name: str, cache, missing: list[str], settings: list[Stage1Setting]) -> str:
    return (
        f"model {model_name!r} needs {', '.join(missing)}, which {cache.path} lacks "
        f"(groups present: {', '.join(cache.groups()) or 'none'}). Add them (existing groups are kept) "
        f"with:\n  {extract_command(cache.hint(missing), settings)}"
    )


def choose_model_instances(model_name: str, model_cls, model_config, cache, *, on_mismatch: str):
    """The instances (detector, CLIP model, ...) the configuration reads in ``cache``, set on a copy of the config.

    The paper's instance, else a tiny test variant standing for it. When the cache has neither but holds
    another instance of the kind, ``on_mismatch="error"`` raises ``ConfigError`` naming what it has and the
    extract command that adds the paper's instance (existing ones are kept); ``"warn"`` reads that other
    instance and returns the mismatch line (the trainer warns and records it). Returns
    ``(config, choice, mismatch lines)``."""
    from mner.trainer.core.config import ConfigError

    if on_mismatch not in ON_MISMATCH:
        raise ConfigError(f"--set stage1_mismatch={on_mismatch}: valid values: {', '.join(ON_MISMATCH)}")
    needs = paper_needs(model_name)
    wanted = config_slots(model_config, needs)
    if not wanted:
        return model_config, Choice({}), []
    choice = choose_instances(cache, list(model_cls.required_features(model_config)), wanted)
    lines = [f"{slot} {value!r} ({needs.source or model_name}): {cache.path} holds no such instance; it has "
             f"{', '.join(have)}" for slot, (value, have) in choice.unmatched.items()]
    if lines and on_mismatch == "error":
        paths = list(model_cls.required_features(model_config))
        raise ConfigError(
            f"{cache.path} lacks the stage-1 instances model {model_name!r} reads:\n  - " + "\n  - ".join(lines)
            + f"\nAdd them (existing instances are kept) with:\n  {cache.hint(paths)}\n"
            "or pass --set stage1_mismatch=warn to read the cache's instance anyway (recorded in the run's files), "
            "or choose an instance with --set " + " ".join(f"{slot}=..." for slot in choice.unmatched))
    for slot, (_, have) in choice.unmatched.items():
        choice.slots[slot] = have[0]
    return replace(model_config, **choice.slots), choice, lines


def check_cache_settings(model_name: str, settings: list[Stage1Setting], cache, *, on_mismatch: str) -> list[str]:
    """Mismatch lines between the model's paper settings and the cache's provenance.

    ``on_mismatch="error"`` raises ``ConfigError`` naming each one, the extract command that fixes
    them and the override; ``"warn"`` returns them (the trainer warns and records them in the run).
    """
    from mner.trainer.core.config import ConfigError

    if on_mismatch not in ON_MISMATCH:
        raise ConfigError(f"--set stage1_mismatch={on_mismatch}: valid values: {', '.join(ON_MISMATCH)}")
    groups = set(cache.groups())
    lines = stage1_mismatches(settings, lambda group: cache.provenance(group) if group in groups else None)
    if lines and on_mismatch == "error":
        command = extract_command(cache.hint([s.group for s in settings]), settings)
        raise ConfigError(
            f"{cache.path} was not extracted with the stage-1 settings model {model_name!r} assumes:\n  - "
            + "\n  - ".join(lines)
            + f"\nRe-extract (into a new file) with:\n  {command} --overwrite\n"
            "or pass --set stage1_mismatch=warn to train on this cache anyway (recorded in the run's files)."
        )
    return lines
