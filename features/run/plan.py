"""What a run computes: a list of group instances, from the flags or from the models it is for.

``--detector`` / ``--encoder`` / ``--clip-model`` / ``--prompts`` / ``--grounding`` / ``--captions``
name groups directly (every encoder over every detector's objects); ``--for vcrmner --for pmner``
(or ``--for all``) takes the groups and settings each model's paper preset and ablation rows read from
their declarations in ``mner.pipeline.stage1`` (stage 1 never imports the trainer). Dependencies are
added (crop embeddings need their detector's objects), instances already in the cache are kept, and
each remaining instance gets its producer from the registry (``producers/registry.py``).

Compatible flags refine a paper's settings (a larger ``--top-k``, a lower ``--score-threshold``:
the model cuts them when reading); a flag that contradicts one is an error naming both, unless
``--override-paper`` is given, which is recorded in the provenance of the groups it touches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from mner.features.producers.registry import encoder_key, producer_for, tiny_stands_for
from mner.pipeline.cache.specs import get_group, split_path
from mner.pipeline.stage1 import PAPER_NEEDS, paper_needs

DEFAULT_DETECTOR, DEFAULT_CLIP = "maskrcnn", "ViT-B-32"
DEFAULT_TOP_K, DEFAULT_SCORE = 10, 0.5  # a superset of every paper's objects (P-MNER cuts 5 > 0.95 when reading)


def tiny_variant(slot: str, value: str) -> str:
    """The registered tiny test variant of a real model (``--tiny``): each records what it stands for."""
    if tiny_stands_for(value) is not None:
        return value
    return "swin-test" if slot == "swin_model" else f"{value}-test"


def swin_slot(model: str) -> str:
    """``microsoft/swin-large-patch4-window12-384`` -> ``swin-large-patch4-window12-384`` (the instance name)."""
    return os.path.basename(model.rstrip("/")) or model


@dataclass
class Plan:
    groups: list[str]  # instances to have, dependencies first (kept ones included)
    needed_by: dict[str, list[str]] = field(default_factory=dict)  # group -> the models (or flags) asking
    overrides: list[str] = field(default_factory=list)  # paper settings overridden (--override-paper)
    notes: list[str] = field(default_factory=list)  # what the plan refined or lowered, said once

    def describe(self, kept: set[str]) -> str:
        width = max((len(g) for g in self.groups), default=0)
        lines = ["plan:"]
        for group in self.groups:
            state = "kept (in the cache)" if group in kept else "compute"
            lines.append(f"  {group:<{width}}  {state:<20} for {', '.join(self.needed_by.get(group, ['flags']))}")
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  OVERRIDE: {override}" for override in self.overrides]
        return "\n".join(lines)


def cached_slot_values(cache, spec_name: str, slot: str) -> list[str]:
    if cache is None:
        return []
    return sorted({values[slot] for values in cache.instances(spec_name).values()})


def flag_groups(opts, cache) -> list[str]:
    """The instances the explicit flags ask for (every encoder over every detector's objects)."""
    imported = list(opts.imported_objects())  # --import-objects NAME=FILE: objects/NAME, encoded like a detector's
    detectors = list(dict.fromkeys(opts.detectors)) or cached_slot_values(cache, "objects/{detector}", "detector") \
        or ([] if imported else [DEFAULT_DETECTOR])
    clip_models = list(dict.fromkeys(opts.clip_models)) or \
        cached_slot_values(cache, "encoders/clip/{clip_model}", "clip_model") or [DEFAULT_CLIP]
    detectors = list(dict.fromkeys([*detectors, *imported]))
    groups = [f"objects/{d}" for d in detectors]
    alone = (opts.for_models or opts.groups) and not (opts.detectors or opts.encoders is not None or opts.prompts
                                                      or opts.clip_models or imported)
    encoders = opts.encoders if opts.encoders is not None else ([] if alone else ["clip"])
    if alone:
        groups = []  # --for / --group alone: only the grounding/captions options below (set from the papers)
    for name in dict.fromkeys(encoders):
        if name in ("clip", "clip-test"):
            for clip in clip_models if name == "clip" else ["clip-test"]:
                groups += [f"encoders/clip/{clip}", *(f"crops/{d}/clip/{clip}" for d in detectors)]
        elif name.startswith("resnet"):
            groups += [f"encoders/resnet/{name}", *(f"crops/{d}/resnet/{name}" for d in detectors)]
        elif name.startswith("swin"):
            groups.append(f"encoders/swin/{'swin-test' if name == 'swin-test' else swin_slot(opts.swin_model)}")
        else:
            from mner.features.producers.encoders import ENCODERS

            raise ValueError(f"--encoder {name!r}; valid: {', '.join(sorted(ENCODERS))}")
    for prompt_set in dict.fromkeys(opts.prompts):
        stem = prompt_stem(prompt_set)
        for clip in clip_models:
            groups += [f"prompts/{clip}/{stem}", *(f"crops/{d}/prompts/{clip}/{stem}" for d in detectors)]
    if opts.grounding is not None and opts.grounding.method:
        groups.append("grounding")
    if opts.grounding is not None and opts.grounding.clip:
        groups.append("encoders/clip_grounding")
    if opts.captions is not None:
        groups.append("captions")
    return groups


def prompt_stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0] if name.endswith(".json") else name


def model_groups(opts, plan: Plan) -> list[str]:
    """The instances ``--for`` models read, and their settings applied to ``opts`` (refined or refused)."""
    models = sorted(PAPER_NEEDS) if "all" in opts.for_models else list(dict.fromkeys(opts.for_models))
    unknown = [m for m in models if m not in PAPER_NEEDS]
    if unknown:
        raise ValueError(f"--for {', '.join(unknown)}: no stage-1 declaration; valid: all, "
                         f"{', '.join(sorted(PAPER_NEEDS))}")
    groups: list[str] = []
    for model in models:
        needs = paper_needs(model)
        slots = {slot: tiny_variant(slot, value) if opts.tiny else value for slot, value in needs.slots.items()}
        for path in needs.paths(slots):
            group = split_path(path)[0]
            groups.append(group)
            if model not in plan.needed_by.setdefault(group, []):
                plan.needed_by[group].append(model)
        for setting in needs.filled_settings(slots):
            apply_setting(opts, plan, model, setting)
        for option, value in needs.extract.items():
            apply_extract_option(opts, plan, model, option, value)
    return groups


def apply_setting(opts, plan: Plan, model: str, setting) -> None:
    """Refine ``opts`` with one paper setting; a contradicting explicit flag is an error (or a recorded override)."""
    if setting.option is None or setting.option in ("grounding", "captions"):
        return
    given = getattr(opts, setting.option)
    flag = "--" + setting.option.replace("_", "-")
    if given is None:  # not on the command line: the run's default, moved to cover the paper
        default = {"top_k": DEFAULT_TOP_K, "score_threshold": 0.0 if opts.random_init else DEFAULT_SCORE}
        value = default.get(setting.option, setting.expected)
        if not setting.satisfied_by(value):
            value = setting.expected
        setattr(opts, setting.option, value)
        return
    if setting.satisfied_by(given) or (setting.random_init_free and opts.random_init):
        return
    message = f"{flag} {given} contradicts {model}'s {setting.describe()}"
    if not opts.override_paper:
        raise ValueError(f"{message}; drop {flag} (the plan covers it: {setting.flags} or a superset), or pass "
                         "--override-paper to extract anyway (recorded in the groups' provenance)")
    plan.overrides.append(message)


def apply_extract_option(opts, plan: Plan, model: str, option: str, value) -> None:
    from mner.features.producers.grounding_captions import CaptionOptions, GroundingOptions

    if option == "grounding":
        if opts.grounding is None:
            opts.grounding = replace(opts.grounding_settings or GroundingOptions(), method=value, clip=False)
        elif not opts.grounding.method:
            opts.grounding.method = value
        elif opts.grounding.method not in (value, "files"):
            message = f"--grounding {opts.grounding.method} contradicts {model}'s grounding {value}"
            if not opts.override_paper:
                raise ValueError(f"{message}; drop --grounding (or use files), or pass --override-paper")
            plan.overrides.append(message)
    elif option == "grounding_clip":
        if opts.grounding is None:
            opts.grounding = replace(opts.grounding_settings or GroundingOptions(), method="", clip=False)
        opts.grounding.clip = opts.grounding.clip or bool(value)
    elif option == "captions" and opts.captions is None:
        opts.captions = replace(opts.caption_settings or CaptionOptions(), source=value)


def make_plan(extraction, existing: set[str]) -> Plan:
    """Every group instance the run has to have, dependencies first."""
    opts, cache = extraction.opts, extraction.cache
    plan = Plan([])
    wanted = model_groups(opts, plan) if opts.for_models else []
    explicit = opts.detectors or opts.encoders is not None or opts.clip_models or opts.prompts \
        or opts.import_objects
    if (not opts.for_models and not opts.groups) or explicit or opts.grounding is not None \
            or opts.captions is not None:
        wanted += [g for g in flag_groups(opts, cache) if g not in wanted]
    wanted += [g.strip("/") for g in opts.groups if g.strip("/") not in wanted]  # --group: any declared instance
    if opts.score_threshold is None:
        opts.score_threshold = 0.0 if opts.random_init else DEFAULT_SCORE
        if opts.random_init:
            plan.notes.append("--random-init: detector score threshold 0 (random scores mean nothing)")
    if opts.top_k is None:
        opts.top_k = DEFAULT_TOP_K
    order: list[str] = []
    visiting: set[str] = set()

    def visit(group: str) -> None:
        if group in order:
            return
        if group in visiting:
            raise ValueError(f"plan: {group} depends on itself")
        visiting.add(group)
        if group not in existing:
            for path in extraction.producer(group).reads:
                dependency = split_path(path)[0]
                plan.needed_by.setdefault(dependency, []).extend(
                    m for m in plan.needed_by.get(group, ["flags"]) if m not in plan.needed_by.get(dependency, []))
                visit(dependency)
        visiting.discard(group)
        order.append(group)

    for group in dict.fromkeys(wanted):
        get_group(group)  # an undeclared name fails here, with the declared ones
        visit(group)
    plan.groups = order
    for group in order:
        if group not in existing:
            check_instance_weights(opts, cache, group)
    check_imported_kept(opts, cache, [g for g in order if g in existing])
    return plan


def check_instance_weights(opts, cache, group: str) -> None:
    """A group added to an existing CLIP / ResNet instance must come from the same weights (random or not,
    the same pretrained tag): its embeddings are compared with the cached ones (prompts, crops)."""
    if cache is None:
        return
    slots = get_group(group).matches(group) or {}
    for slot, family in (("clip_model", "clip"), ("resnet_model", "resnet")):
        model = slots.get(slot)
        stored_group = f"encoders/{family}/{model}"
        if model is None or stored_group == group or stored_group not in set(cache.groups()):
            continue
        stored = cache.provenance(stored_group).get("pretrained", "")
        random = opts.random_init or tiny_stands_for(model) is not None
        wanted = "random" if random else (opts.clip_pretrained if family == "clip" else None)
        if (stored == "random") == random and (wanted is None or random or stored == wanted
                                               or stored.startswith("sha256:")):
            continue
        if stored == "random":
            use = f"--clip-model {model} --random-init" if family == "clip" else "--random-init"
        else:
            use = f"--clip-model {model} --clip-pretrained {stored}" if family == "clip" else "without --random-init"
        raise ValueError(f"{cache.path}: its {stored_group} features come from {stored} weights, but {group} would be "
                         f"computed with {wanted} weights; use {use} (or another --out, or --overwrite to rebuild "
                         "every group)")


def check_imported_kept(opts, cache, kept: list[str]) -> None:
    """``--import-objects NAME=FILE`` over a cache whose objects/NAME came from another file (or a detector)
    is refused: the kept boxes would silently not be the file's."""
    from mner.features.producers.imported_objects import _file_sha256

    for name, path in opts.imported_objects().items():
        group = f"objects/{name}"
        if group not in kept:
            continue
        stored = cache.provenance(group).get("imported_from", {}).get("sha256")
        if not Path(path).is_file() or stored == _file_sha256(Path(path)):
            continue
        made = f"the file with {stored}" if stored else "a detector"
        raise ValueError(f"{cache.path}: its {group} was made from {made}, not {path}; import under another NAME, "
                         "use another --out, or --overwrite to rebuild every group")


def kept_differences(extraction, kept: list[str]) -> list[str]:
    """Kept groups whose recorded options differ from this run's (named in the summary: not recomputed)."""
    opts, cache, notes = extraction.opts, extraction.cache, []
    for group in kept:
        if get_group(group).name != "objects/{detector}":
            continue
        thresholds = cache.provenance(group).get("thresholds", {})
        asked = {"top_k": opts.top_k, "score_threshold": opts.score_threshold}
        differ = {k: (thresholds.get(k), v) for k, v in asked.items() if thresholds.get(k) not in (None, v)}
        if differ:
            asked_text = ", ".join(f"{k} {old} (asked {new})" for k, (old, new) in differ.items())
            notes.append(f"{group} kept with {asked_text}; not recomputed (a new --out or --overwrite recomputes it)")
    return notes


# ------------------------------------------------------------------------------------- building models


def build_detector(opts, name: str):
    from mner.features.producers.detectors import DetectorConfig, create_detector
    from mner.features.run.extract import seed_random_init

    seed_random_init(name, opts.random_init)
    config = DetectorConfig(top_k=opts.top_k, score_threshold=opts.score_threshold, min_size=opts.detector_min_size,
                            weights=opts.detector_weights, random_init=opts.random_init, device=opts.device)
    extra = {"detectron2_config": opts.detectron2_config} if name == "detectron2" else {}
    return create_detector(name, config=config, **extra)


def build_encoder(opts, family: str, model: str):
    """The encoder of one instance: ``("clip", "RN50")``, ``("resnet", "resnet152-test")``, ``("swin", slot)``."""
    from mner.features.producers.encoders import EncoderConfig, create_encoder
    from mner.features.run.extract import seed_random_init

    name, option = encoder_key(family, model)
    seed_random_init(f"{name}/{option}" if option else name, opts.random_init)
    swin_model = opts.swin_model if family != "swin" or swin_slot(opts.swin_model) == model else model
    if family == "swin" and "/" not in swin_model and not Path(swin_model).exists():
        swin_model = f"microsoft/{swin_model}"  # the instance name of a hub model (--swin-model swin-large-...)
    return create_encoder(name, config=EncoderConfig(
        random_init=opts.random_init, weights=opts.resnet_weights if name == "resnet152" else None,
        clip_model=option or DEFAULT_CLIP, clip_pretrained=opts.clip_pretrained, swin_model=swin_model,
        device=opts.device))


def check_clip_matches(cache, group: str, clip) -> None:
    """Text embeddings must come from the CLIP that made the cached image/crop embeddings."""
    stored = cache.provenance(group)
    model, pretrained = stored.get("model", ""), stored.get("pretrained", "")
    if model == clip.model_name and pretrained == clip.pretrained():
        return
    arch = stored.get("clip_model") or model.split("/", 1)[-1]
    if pretrained == "random":
        use = f"--clip-model {arch} --random-init"
    elif pretrained.startswith("sha256:"):
        use = f"--clip-model {arch} --clip-pretrained <the checkpoint file with {pretrained}>"
    else:
        use = f"--clip-model {arch} --clip-pretrained {stored.get('clip_pretrained') or pretrained}"
    raise ValueError(f"{cache.path}: its {group} embeddings come from {model} ({pretrained}), but the prompt sets "
                     f"would be encoded with {clip.model_name} ({clip.pretrained()}); use {use} "
                     "(or --overwrite to rebuild every group with the new model)")


class RunModels:
    """What producers ask of the run: models built once and shared (each detector and encoder runs once)."""

    def shared_model(self, key, build):
        models = self.__dict__.setdefault("_models", {})
        if key not in models:
            models[key] = build()
        return models[key]

    def encoder(self, family: str, model: str):
        return self.shared_model(("encoder", family, model), lambda: build_encoder(self.opts, family, model))

    @staticmethod
    def encoder_dims(spec, encoder) -> dict[str, int]:
        shapes = {**encoder.image_datasets, **encoder.crop_datasets}
        dims = {}
        for dataset in spec.datasets:
            for symbol, size in zip(dataset.shape, shapes.get(dataset.name, ())):
                if isinstance(symbol, str):
                    dims[symbol] = int(size)
        return dims

    def clip_logit_scale(self, clip_model: str, clip) -> float:
        """The logit scale of the CLIP instance (the cached attr when its embeddings are in the cache)."""
        group = f"encoders/clip/{clip_model}"
        if self.cache is not None and group in set(self.cache.groups()):
            check_clip_matches(self.cache, group, clip)
            return float(self.cache.feature_spec([f"{group}/image_embed"]).attrs[group]["logit_scale"])
        return clip.logit_scale

    def prompt_source(self, stem: str) -> str:
        """A prompt set's file (--prompts FILE.json) or bundled name, from its instance name."""
        for name in self.opts.prompts:
            if prompt_stem(name) == stem:
                return name
        return stem

    def first_detector(self) -> str:
        """The detector ``--grounding detector`` crops: the one its record names (a rebuild), else the first
        asked, else the cache's."""
        if self.opts.grounding is not None and self.opts.grounding.detector:
            return self.opts.grounding.detector
        names = list(self.opts.detectors) or cached_slot_values(self.cache, "objects/{detector}", "detector")
        return names[0] if names else DEFAULT_DETECTOR

    def producer(self, group: str):
        producers = self.__dict__.setdefault("_producers", {})
        if group not in producers:
            producers[group] = producer_for(self, group)
        return producers[group]
