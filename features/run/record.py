"""A cache's record of its stage 1, read back: the extraction options that remake its groups.

A cache's provenance names, per group, the model, its weights (tag, file and sha256, or "random"),
thresholds, input sizes, crop settings, prompt set, grounding method and captions source.
:func:`recorded_options` turns that record back into the options of the extraction that made it
(``ExtractOptions`` fields, with ``GroundingOptions`` / ``CaptionOptions`` for the grounding, CLIP
grounding and captions groups), for every group or only for some (:func:`group_closure`: the groups a
model reads, plus those they are computed from). ``rebuild.py`` runs them.

Files are checked before anything runs. A local weights file, a user's captions file or grounding
mapping whose sha256 differs from the record is refused naming the path and both hashes; one that
cannot be found is named with the flag that points at a local copy (:data:`LOCAL_COPY_FLAGS`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mner.pipeline.cache import FeatureCache

# Provenance fields that describe one run rather than the features: they may differ between a grown
# cache and a cache built in one go over the same images. ``coverage``: counts over the images of the
# run's data (a user file's ids that matched none of them, ...).
RUN_FIELDS = frozenset({"created", "command", "cwd", "image_list_hash", "num_images", "shard", "merge", "images",
                        "grown", "versions", "coverage"})

# The extract flag that points at a local copy of each group's weights, and the ExtractOptions field it sets.
WEIGHT_FLAGS = {"objects/{detector}": ("--detector-weights", "detector_weights"),
                "encoders/resnet/{resnet_model}": ("--resnet-weights", "resnet_weights"),
                "encoders/clip/{clip_model}": ("--clip-pretrained", "clip_pretrained"),
                "encoders/swin/{swin_model}": ("--swin-model", "swin_model")}
# Every flag a local copy can be given with (``weights={"--captions": PATH}``; mner-train predict:
# ``--stage1-weights captions=PATH``): weights, user files, and local folders of hub models.
LOCAL_COPY_FLAGS = (*(flag for flag, _ in WEIGHT_FLAGS.values()), "--grounding-map", "--grounding-crops-dir",
                    "--captions", "--grounding-model", "--grounding-clip-model", "--caption-model")
# transformers models record "transformers/<Class>(<hub name or folder>)"
HUB_MODEL = re.compile(r"^transformers/\w+\((?P<source>.*)\)$")


class RebuildError(ValueError):
    """A cache's record cannot be reproduced here (weights or files missing or different, an unknown group)."""


def feature_groups(cache: FeatureCache) -> list[str]:
    return [g for g in cache.groups() if g not in ("images", "posts")]


def _flag_values(command: list[str], flag: str) -> list[str]:
    values = []
    for i, arg in enumerate(command):
        if arg == flag and i + 1 < len(command):
            values.append(command[i + 1])
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
    return values


def _sha256(path: Path) -> str:
    from mner.pipeline.hashing import sha256_hex

    return sha256_hex(path)


def _copy_hint(flag: str) -> str:
    return f"{flag} PATH (mner-train predict: --stage1-weights {flag.lstrip('-')}=PATH)"


def _given(weights: dict, flag: str) -> list[str]:
    value = weights.get(flag)
    return [] if value is None else [value] if isinstance(value, str) else [str(v) for v in value]


# ---------------------------------------------------------------------------------------- which groups


def _inputs_of(group: str, record: dict) -> list[str]:
    """The groups ``group`` is computed from (the ``reads`` of its producer, known from its record)."""
    from mner.pipeline.cache.specs import get_group

    spec = get_group(group)
    slots = spec.matches(group) or {}
    if spec.name == "crops/{detector}/prompts/{clip_model}/{prompt_set}":
        return [f"objects/{slots['detector']}", f"crops/{slots['detector']}/clip/{slots['clip_model']}"]
    if spec.name.startswith("crops/"):
        return [f"objects/{slots['detector']}"]
    if spec.name == "prompts/{clip_model}/{prompt_set}":
        return [f"encoders/clip/{slots['clip_model']}"]
    if group == "grounding" and record.get("grounding") == "detector":
        return [f"objects/{grounding_detector(record)}"]
    if group == "encoders/clip_grounding":
        return ["grounding"]
    return []


def group_closure(cache: FeatureCache, wanted: list[str] | None = None) -> list[str]:
    """``wanted`` groups (or dataset paths in them; None: every feature group) and the groups of ``cache``
    they are computed from, in the cache's order. A wanted group the cache lacks is an error."""
    from mner.pipeline.cache.specs import split_path

    have = feature_groups(cache)
    if wanted is None:
        return have
    todo = [split_path(item)[0] if item.strip("/") not in have else item.strip("/") for item in wanted]
    found: set[str] = set()
    while todo:
        group = todo.pop()
        if group in found:
            continue
        if group not in have:
            raise RebuildError(f"{cache.path}: has no {group} (the model reads it); it cannot make it for new "
                               "images either: point at the cache the run was trained on")
        found.add(group)
        todo += _inputs_of(group, cache.provenance(group))
    return [group for group in have if group in found]


# ---------------------------------------------------------------------------------------- the options


def recorded_options(cache: FeatureCache, *, weights: dict | None = None, groups: list[str] | None = None,
                     copies: dict[str, str] | None = None) -> dict:
    """ExtractOptions fields that remake ``groups`` of ``cache`` (default: every feature group; a subset
    must be closed under :func:`group_closure`).

    ``weights``: local copies, by flag (``{"--detector-weights": "/models/maskrcnn.pth", "--captions":
    "/data/captions.tsv"}``; ``--grounding-map`` may list several files); a recorded local file that has
    moved is looked up there; ``copies`` (when given) is filled with {copy used: recorded path}. Raises
    :class:`RebuildError`."""
    from mner.pipeline.cache.specs import get_group

    weights = dict(weights or {})
    copies = {} if copies is None else copies
    groups = feature_groups(cache) if groups is None else list(groups)
    options: dict = {"groups": []}
    random_init = set()
    for group in groups:
        record = cache.provenance(group)
        spec_name = get_group(group).name
        options["groups"].append(group)  # every instance by path: the plan makes exactly these
        if not uses_no_model(group, record):
            random_init.add(record.get("pretrained") == "random")
        options.setdefault("missing_image", record.get("missing_image", "placeholder"))
        options.setdefault("max_image_side", record.get("max_image_side", 2048))
        if spec_name.startswith("crops/"):
            continue  # made from their detector's objects and their encoder, named by the path
        if spec_name == "objects/{detector}" and record.get("model") == "imported":
            raise RebuildError(f"{cache.path}: {group} holds boxes imported from a file (--import-objects), which "
                               "cannot be rebuilt from the record yet; extract the new images with the same "
                               "--import-objects flag")
        if spec_name == "objects/{detector}":
            thresholds, pre, crops = record["thresholds"], record["preprocessing"], record.get("crops", {})
            options.update(top_k=int(thresholds["top_k"]),
                           score_threshold=float(thresholds["score_threshold"]),
                           detector_min_size=int(pre["min_size"]),
                           crop_max_side=int(crops.get("max_side", 384)), crop_quality=int(crops.get("quality", 90)))
            if "detectron2_config" in pre:
                options["detectron2_config"] = pre["detectron2_config"]
        elif group.startswith("encoders/") and "encoder" in record and group != "encoders/clip_grounding":
            if "clip_pretrained" in record:
                options["clip_pretrained"] = record["clip_pretrained"]
            if record["encoder"] == "swin" and isinstance(record.get("checkpoint"), dict):
                options["swin_model"] = record["checkpoint"].get("source", options.get("swin_model"))
        elif group.startswith("prompts/") and "prompt_set" in record:
            pass  # the prompt set is named by the path (a file's stem: its bundled copy or --prompts FILE)
        elif group == "grounding":
            _grounding(options, cache, record, weights, copies).method = record["grounding"]
        elif group == "encoders/clip_grounding":
            _clip_grounding(options, cache, record, weights, copies)
        elif group == "captions":
            options["captions"] = _captions(cache, record, weights, copies)
        else:
            raise RebuildError(f"{cache.path}: group {group} cannot be rebuilt from its record yet; extract it "
                               "with its own flags")
        _local_weights(cache, group, record, options, weights)
    if len(random_init) > 1:
        raise RebuildError(f"{cache.path}: some groups have random weights and others not; it cannot be rebuilt")
    options["random_init"] = random_init == {True}
    if any(get_group(g).name.startswith("crops/") for g in groups) and \
            not any(get_group(g).name == "objects/{detector}" for g in groups):
        raise RebuildError(f"{cache.path}: encoders without objects cannot be rebuilt (crops need boxes)")
    return options


def uses_no_model(group: str, record: dict) -> bool:
    """Groups made from user files or another group's boxes: no weights, random or not."""
    return record.get("grounding") in ("detector", "files") or record.get("captions") == "file"


def grounding_detector(record: dict) -> str:
    """The objects instance ``--grounding detector`` cropped (its record: ``"objects group: <name>"``)."""
    model = str(record.get("model", ""))
    return model.split(":", 1)[1].strip() if model.startswith("objects group:") else ""


def _grounding(options: dict, cache, record: dict, weights: dict, copies: dict):
    from mner.features.producers.grounding_captions import GroundingOptions

    grounding = options.setdefault("grounding", GroundingOptions(method="", clip=False))
    method = record["grounding"]
    if method == "owlv2":
        thresholds = record["thresholds"]
        grounding.model = _hub_source(cache, "grounding", record, weights, "--grounding-model", grounding.model,
                                      copies)
        grounding.threshold = float(thresholds["score"])
        grounding.fill = thresholds["fill"]
        grounding.queries = record["preprocessing"]["query_rule"]
    elif method == "detector":
        grounding.detector = grounding_detector(record)
    elif method == "files":
        grounding.maps, grounding.crop_dirs = _grounding_files(cache, record, weights, copies)
    else:
        raise RebuildError(f"{cache.path}: grounding made with {method!r}, which this version cannot make")
    return grounding


def _clip_grounding(options: dict, cache, record: dict, weights: dict, copies: dict) -> None:
    from mner.features.producers.grounding_captions import GroundingOptions

    grounding = options.setdefault("grounding", GroundingOptions(method="", clip=False))
    grounding.clip = True
    grounding.clip_model = _hub_source(cache, "encoders/clip_grounding", record, weights, "--grounding-clip-model",
                                       grounding.clip_model, copies)
    grounding.clip_layers = tuple(int(layer) for layer in record["preprocessing"]["layers"])


def _captions(cache, record: dict, weights: dict, copies: dict):
    from mner.features.producers.grounding_captions import CaptionOptions

    if record.get("captions") == "file":
        recorded = record["preprocessing"]["file"]
        path = _user_file(cache, "captions", recorded, record["pretrained"], _given(weights, "--captions"),
                          "--captions", "captions file", copies)
        return CaptionOptions(source=path)
    thresholds, pre = record["thresholds"], record["preprocessing"]
    captions = CaptionOptions(source=record.get("captions", "blip"), max_tokens=int(thresholds["max_new_tokens"]),
                              beams=int(thresholds["num_beams"]), prompt=pre.get("prompt", ""))
    captions.model = _hub_source(cache, "captions", record, weights, "--caption-model", captions.model, copies)
    return captions


def _hub_source(cache, group: str, record: dict, weights: dict, flag: str, default: str, copies: dict) -> str:
    """The hub name or local folder a transformers model was loaded from; a local folder's weights are
    checked against the recorded hash (random weights: the default, never loaded)."""
    pretrained = str(record.get("pretrained", ""))
    if pretrained == "random":
        return default
    found = HUB_MODEL.match(str(record.get("model", "")))
    source = found.group("source") if found else default
    if " sha256:" not in pretrained:
        return source  # a hub name: the revision loaded is compared with the record's after the run
    folder, recorded = pretrained.rsplit(" sha256:", 1)
    from mner.features.producers.hub import _weights_hash

    candidates = [*_given(weights, flag), folder]
    for candidate in candidates:
        if Path(candidate).is_dir() and _weights_hash(Path(candidate)) == f"sha256:{recorded}":
            return _used(copies, str(candidate), folder)
    here = [c for c in candidates if Path(c).is_dir()]
    if here:
        found_hash = (_weights_hash(Path(here[0])) or "no weights file").removeprefix("sha256:")
        raise RebuildError(f"{cache.path}: {group} weights in {here[0]} have sha256 {found_hash}, but the cache's "
                           f"record says {recorded}: these are other weights; pass the recorded folder with "
                           + _copy_hint(flag))
    raise RebuildError(f"{cache.path}: {group} was made with the model folder {folder} (weights sha256 {recorded}), "
                       f"which is not here; pass a local copy with {_copy_hint(flag)}")


def _used(copies: dict, path: str, recorded: str) -> str:
    """``path`` (a file or folder that stands for ``recorded``), noted in ``copies`` when it is another one."""
    if Path(path).resolve() != Path(recorded).resolve():
        copies[str(Path(path).resolve())] = recorded
    return path


def _user_file(cache, group: str, recorded: str, recorded_hash: str, given: list[str], flag: str, what: str,
               copies: dict) -> str:
    """The recorded user file, or a given copy with the recorded sha256; else a RebuildError naming both."""
    want = recorded_hash.removeprefix("sha256:")
    candidates = [*given, recorded]
    for candidate in candidates:
        if Path(candidate).is_file() and _sha256(Path(candidate)) == want:
            return _used(copies, str(candidate), recorded)
    here = [c for c in candidates if Path(c).is_file()]
    if here:
        raise RebuildError(f"{cache.path}: {group} {what} {here[0]} has sha256 {_sha256(Path(here[0]))}, but the "
                           f"cache's record says {want} (made from {recorded}): this is another file; pass the "
                           f"recorded file with {_copy_hint(flag)}")
    raise RebuildError(f"{cache.path}: {group} was made from the {what} {recorded} (sha256 {want}), which is not "
                       f"here; pass a local copy with {_copy_hint(flag)}")


def _grounding_files(cache, record: dict, weights: dict, copies: dict) -> tuple[list[str], list[str]]:
    """``--grounding files``: every recorded mapping (or a copy with its hash), in the order of the
    command that made it, and the crop folders."""
    pre = record["preprocessing"]
    recorded = dict(pre["mappings"])  # absolute path -> sha256 (JSON sorts it: the order comes from the command)
    ordered = [p for p in _flag_values(record.get("command") or [], "--grounding-map") if p in recorded]
    ordered += [p for p in recorded if p not in ordered]
    given = _given(weights, "--grounding-map")
    maps = [_user_file(cache, "grounding", path, recorded[path], given, "--grounding-map", "mapping file", copies)
            for path in ordered]
    crop_dirs = list(pre.get("crop_dirs", []))
    given_dirs = _given(weights, "--grounding-crops-dir")
    if given_dirs:
        if len(given_dirs) != len(crop_dirs):
            raise RebuildError(f"{cache.path}: grounding crops came from {len(crop_dirs)} folders "
                               f"({', '.join(crop_dirs)}); pass as many copies, in that order")
        crop_dirs = [_used(copies, copy, folder) for copy, folder in zip(given_dirs, crop_dirs)]
    for folder in crop_dirs:
        if not Path(folder).is_dir():
            raise RebuildError(f"{cache.path}: grounding crops came from {folder}, which is not here; pass a local "
                               f"copy with {_copy_hint('--grounding-crops-dir')}")
    return maps, crop_dirs


def _local_weights(cache, group: str, record: dict, options: dict, weights: dict) -> None:
    """A group made from a local weights file: find the file and check its sha256 against the record."""
    from mner.pipeline.cache.specs import get_group

    pretrained = str(record.get("pretrained", ""))
    spec_name = get_group(group).name
    if not pretrained.startswith("sha256:") or spec_name not in WEIGHT_FLAGS:
        return
    flag, field = WEIGHT_FLAGS[spec_name]
    recorded = pretrained.split(":", 1)[1]
    path = (_given(weights, flag) or _flag_values(record.get("command") or [], flag) or [None])[0]
    if path is None or not Path(path).is_file():
        raise RebuildError(f"{cache.path}: {group} was made with local weights (sha256 {recorded}) from "
                           f"{path or 'a file the record does not name'}, which is not here; pass a local copy "
                           f"with {_copy_hint(flag)}")
    found = _sha256(Path(path))
    if found != recorded:
        raise RebuildError(f"{cache.path}: {group} weights {path} have sha256 {found}, but the cache's record "
                           f"says {recorded}: these are other weights; pass the recorded file with {flag} PATH")
    options[field] = str(path)


# ------------------------------------------------------------------------------------- the check after


def comparable(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in RUN_FIELDS}


def check_same_record(made: FeatureCache, reference: FeatureCache, groups: list[str] | None = None,
                      copies: dict[str, str] | None = None) -> None:
    """Every group of ``made`` (``groups``: those it was asked to make) must describe the same stage 1 as
    ``reference``'s: provenance equal except RUN_FIELDS, global arrays identical. Library version changes
    are allowed (recorded in ``versions``); so are the paths of ``copies`` ({copy: recorded path}, each
    checked by hash), which ``made`` names where the record names the original."""
    import numpy as np

    problems = []
    groups = feature_groups(reference) if groups is None else groups
    extra = sorted(set(feature_groups(made)) - set(groups))
    if extra:
        problems.append(f"{', '.join(extra)}: made, but not asked for")
    for group in groups:
        if group not in made.groups():
            problems.append(f"{group}: not made")
            continue
        want, got = comparable(reference.provenance(group)), comparable(_as_recorded(made.provenance(group), copies))
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                problems.append(f"{group}.{key}: record {json.dumps(want.get(key))[:160]}, "
                                f"now {json.dumps(got.get(key))[:160]}")
        for name in _global_paths(reference, group):
            if not np.array_equal(np.asarray(reference.read_global(name)), np.asarray(made.read_global(name))):
                problems.append(f"{name}: global values differ from the record's (another text tower or prompt file)")
    if problems:
        raise RebuildError(f"stage 1 rebuilt from {reference.path}'s record does not reproduce it: "
                           + "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else ""))


def _as_recorded(record: dict, copies: dict[str, str] | None) -> dict:
    text = json.dumps(record)
    for copy, recorded in sorted((copies or {}).items(), key=lambda item: -len(item[0])):
        text = text.replace(json.dumps(copy)[1:-1], json.dumps(recorded)[1:-1])
    return json.loads(text)


def _global_paths(cache: FeatureCache, group: str) -> list[str]:
    from mner.pipeline.cache import get_group

    try:
        spec = get_group(group)
    except KeyError:
        return []
    return [f"{group}/{d.name}" for d in spec.datasets if d.rows == "global" and cache.has(f"{group}/{d.name}")
            and d.dtype not in ("uint8",)]
