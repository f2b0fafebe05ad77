"""Runs trained on schema-2 caches (before a cache held several detectors and CLIP models side by side).

Their ``config.json`` names the groups they read with the old knobs (``clip_group``, ``resnet_group``,
``swin_group``) and paths (``objects``, ``encoders/clip``) instead of the schema-3 instance slots
(``detector``, ``clip_model``, ...). A finished run is loaded by mapping each slot to the instance, in
the schema-3 cache it now reads, that the same model and weights made: the run records each old group's
provenance (``features.provenance``: model and pretrained weights), so the mapping is exact or refused
with one error naming what to rebuild. An unfinished schema-2 run cannot be resumed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mner.trainer.core.config import ConfigError

# schema-3 slot -> (the schema-2 knob naming its group, the knob's default, the schema-2 group it names)
SCHEMA2_SOURCES = {
    "detector": (None, None, "objects"),
    "clip_model": ("clip_group", "clip", "encoders/{}"),
    "resnet_model": ("resnet_group", "resnet152", "encoders/{}"),
    "swin_model": ("swin_group", "swin", "encoders/{}"),
}
SCHEMA2_KNOBS = tuple(knob for knob, _, _ in SCHEMA2_SOURCES.values() if knob)


def schema2_groups(run_config: dict) -> list[str]:
    """The groups the run's cache record names that are no schema-3 instance (``objects``, ``encoders/clip``)."""
    from mner.pipeline.cache import CacheError, get_group

    features = run_config.get("features") or {}
    names = set(features.get("provenance") or {}) | set(features.get("groups") or {})
    old = []
    for name in sorted(names):
        try:
            get_group(name)  # a schema-3 instance matches a declared spec, slots filled
        except CacheError:
            old.append(name)
    return old


def is_schema2_run(run_config: dict) -> bool:
    """The run names its groups the schema-2 way: an old knob in its model config or an old group in its record."""
    return bool(set(SCHEMA2_KNOBS) & set(run_config.get("model_config") or {})) or bool(schema2_groups(run_config))


def schema2_sources(slot: str, knob_value: str | None, recorded: dict, old_required: list[str]) -> list[str]:
    """The schema-2 groups a run read whose model names ``slot`` (prompts belong to the CLIP model)."""
    template = SCHEMA2_SOURCES[slot][2]
    own = template.format(knob_value) if knob_value else template
    belongs = (lambda g: g == own or g.startswith("prompts/")) if slot == "clip_model" else (lambda g: g == own)
    read = [path.rsplit("/", 1)[0] for path in old_required] if old_required else list(recorded)
    found = list(dict.fromkeys(g for g in read if belongs(g)))
    return sorted(found, key=lambda g: g != own)  # the encoder group first, then prompt sets


def current_fields(model_config: dict) -> dict:
    """The model config without the schema-2 knobs (enough to ask a model whether it reads features)."""
    return {k: v for k, v in model_config.items() if k not in SCHEMA2_KNOBS}


def rebuild_advice(run_dir: Path, run_config: dict) -> str:
    trained = (run_config.get("features") or {}).get("path") or "CACHE.h5"
    return (f"rebuild the cache as schema 3 (`mner-features extract --data DATA --images IMAGES --out NEW.h5 --for "
            f"{run_config['model']}`, with the detector / CLIP model the run was trained with; the schema-2 file "
            f"{trained} names its own command when opened) and pass it: `mner-train predict {run_dir} --data POSTS "
            "--features NEW.h5` / `mner-train evaluate ... --features NEW.h5`")


def upgrade_schema2_run(run_dir: Path, run_config: dict, features) -> tuple[dict, list[str]]:
    """A schema-2 run's config with its instance slots set from the cache ``features`` (default: the
    run's own), and the lines saying what was mapped. ``ConfigError`` when the cache is schema 2, gone, or
    holds no instance (or several) made by the model and weights the run recorded."""
    from mner.pipeline.cache import CacheError, FeatureCache
    from mner.pipeline.stage1 import paper_needs, slot_candidates
    from mner.trainer.models import get_model_class

    run_dir = Path(run_dir)
    model = run_config["model"]
    recorded = (run_config.get("features") or {}).get("provenance") or {}
    old_required = (run_config.get("features") or {}).get("required") or []
    path = features if features is not None else (run_config.get("features") or {}).get("path")
    head = f"{run_dir} was trained on a schema-2 feature cache ({', '.join(schema2_groups(run_config)) or 'old knobs'})"
    if path is None or not Path(path).exists():
        raise ConfigError(f"{head} and its cache {path} is gone: {rebuild_advice(run_dir, run_config)}")
    try:
        cache = FeatureCache(path)
        cache.groups()
    except CacheError as err:
        raise ConfigError(f"{head}; {path} cannot serve it ({str(err).splitlines()[0]}): "
                          f"{rebuild_advice(run_dir, run_config)}") from None
    model_cls = get_model_class(model)
    fields = {f.name for f in dataclasses.fields(model_cls.Config)}
    needs = paper_needs(model)
    config = dict(run_config["model_config"])
    mapped: list[str] = []
    for slot in needs.slots:
        if slot not in fields or slot not in SCHEMA2_SOURCES:
            continue
        knob, default, _ = SCHEMA2_SOURCES[slot]
        old_groups = schema2_sources(slot, config.get(knob, default) if knob else None, recorded, old_required)
        if not old_groups:
            continue  # the run never read a group this slot names
        old_group = old_groups[0]
        made_by = recorded.get(old_group) or {}
        if not made_by.get("model"):
            raise ConfigError(f"{head}: its record does not say which model made {old_group}, so the instance it "
                              f"read cannot be known: {rebuild_advice(run_dir, run_config)}, or train the run again")
        candidates = slot_candidates(cache, needs.paths(), slot)
        same = sorted(value for value, provenance in candidates.items()
                      if (provenance.get("model"), provenance.get("pretrained"))
                      == (made_by.get("model"), made_by.get("pretrained")))
        if len(same) > 1:  # tiny variants share a model name: the paper's instance, or one standing for it
            paper = needs.slots[slot]
            preferred = [v for v in same if v == paper
                         or (candidates[v].get("stands_for") or {}).get(slot) == paper]
            same = preferred if len(preferred) == 1 else same
        if len(same) != 1:
            have = "; ".join(f"{v} ({p.get('model')}, {p.get('pretrained')})" for v, p in sorted(candidates.items()))
            what = "several instances" if same else "no instance"
            raise ConfigError(
                f"{head}: {old_group} was made by {made_by.get('model')} (weights {made_by.get('pretrained')}); "
                f"{cache.path} holds {what} of {slot} made by it (it has: {have or 'none'}). Add that model's "
                f"instance with `mner-features extract ... --out {cache.path}` and the flag that selects it, or "
                f"{rebuild_advice(run_dir, run_config)}")
        config[slot] = same[0]
        mapped.append(f"{old_group} -> {slot} {same[0]} (made by {made_by.get('model')})")
    for knob in SCHEMA2_KNOBS:
        config.pop(knob, None)
    upgraded = {**run_config, "model_config": config, "schema2_upgrade": mapped}
    return upgraded, mapped


def refuse_schema2_resume(out: Path) -> None:
    """An unfinished run started on a schema-2 cache cannot continue: its checkpoints were trained on the
    old groups, and its options name old knobs."""
    import json

    try:
        stored = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # options_for_resume reports an unreadable config
    if isinstance(stored, dict) and is_schema2_run(stored):
        trained = (stored.get("features") or {}).get("path") or "its cache"
        raise ConfigError(f"--resume: {out} was started on a schema-2 feature cache ({trained}); it cannot continue "
                          f"on schema 3. Rebuild the cache (`mner-features extract --data DATA --images IMAGES "
                          f"--out NEW.h5 --for {stored.get('model')}`) and start the run again with --overwrite "
                          "--features NEW.h5")
