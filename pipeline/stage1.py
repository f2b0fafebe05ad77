"""What each model's paper reads from stage 1, declared as data: both stages import it, never each other.

Stage 1 (``mner-features extract --for vcrmner --for pmner``) plans one extraction from these
declarations; stage 2 (``mner-train``) picks the instances a model reads from them and checks the
cache's provenance against them; ``mner-train sweep --dry-run`` checks a whole grid before training.

- :class:`Stage1Setting`: a value a group's provenance must hold (P-MNER's score threshold, MGIPS-CL's
  grounding method), the extract flags that produce it and where the paper says so.
- :class:`PaperNeeds`: one model's instance choices (``slots``: which detector, which CLIP model), the
  dataset paths its paper preset and ablation rows read, its settings and the extract options its
  groups need. A model's ``required_features(config)`` / ``stage1_settings(config)`` are the subset one
  configuration reads (tests/test_stage1_plan.py checks every preset against its declaration).
- :func:`choose_instances`: in a cache, the instance of each slot a model reads: the paper's own, else
  a tiny test variant that declares it stands for it (provenance ``stands_for``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

MATCHES = ("equal", "at_least", "at_most", "pattern")


@dataclass(frozen=True)
class Stage1Setting:
    group: str  # group whose provenance records the value; may hold slots ("objects/{detector}")
    key: str  # dotted key inside that provenance, e.g. "thresholds.score_threshold"
    expected: Any  # the paper's value; for "pattern" a regular expression
    flags: str  # the mner-features extract flags that produce it, e.g. "--score-threshold 0.95"
    source: str  # where the paper says so, e.g. "P-MNER sec. 4.1"
    match: str = "equal"  # equal | at_least | at_most (a superset the model cuts when reading) | pattern
    option: str | None = None  # the ExtractOptions field a stage-1 plan sets from ``expected`` ("top_k")
    random_init_free: bool = False  # not checked on random-init instances (a score threshold: scores mean nothing)

    def __post_init__(self):
        if self.match not in MATCHES:
            raise ValueError(f"Stage1Setting.match={self.match!r}; valid values: {', '.join(MATCHES)}")

    def satisfied_by(self, found: Any) -> bool:
        if self.match == "equal":
            return found == self.expected
        if self.match == "at_least":
            return isinstance(found, (int, float)) and found >= self.expected
        if self.match == "at_most":
            return isinstance(found, (int, float)) and found <= self.expected
        return isinstance(found, str) and re.fullmatch(self.expected, found) is not None

    def for_slots(self, slots: dict[str, str]) -> Stage1Setting:
        """This setting about one instance: the group's slots filled (``objects/fasterrcnn``)."""
        from dataclasses import replace

        return replace(self, group=self.group.format(**slots), flags=self.flags.format(**slots))

    def describe(self) -> str:
        wanted = {"equal": "{}", "at_least": ">= {}", "at_most": "<= {}", "pattern": "matching {}"}[self.match]
        return f"{self.group} {self.key} {wanted.format(self.expected)} ({self.source})"


@dataclass(frozen=True)
class PaperNeeds:
    """What one model's paper preset and ablation rows read from stage 1."""

    model: str  # registered model name
    slots: dict[str, str] = field(default_factory=dict)  # instance slot -> the paper's instance
    reads: tuple[str, ...] = ()  # dataset paths any preset or ablation row reads; slots as "{detector}"
    settings: tuple[Stage1Setting, ...] = ()  # provenance values the paper assumes
    extract: dict[str, Any] = field(default_factory=dict)  # ExtractOptions the plan sets: {"captions": "blip"}
    source: str = ""  # where the paper names its stage-1 models

    def paths(self, slots: dict[str, str] | None = None) -> list[str]:
        """``reads`` with the slots filled (the paper's instances unless ``slots`` overrides some)."""
        return [path.format(**{**self.slots, **(slots or {})}) for path in self.reads]

    def filled_settings(self, slots: dict[str, str] | None = None) -> list[Stage1Setting]:
        return [s.for_slots({**self.slots, **(slots or {})}) for s in self.settings]


PAPER_NEEDS: dict[str, PaperNeeds] = {}


def declare_needs(needs: PaperNeeds) -> PaperNeeds:
    PAPER_NEEDS[needs.model] = needs
    return needs


def paper_needs(model: str) -> PaperNeeds:
    """A model's declaration (an empty one for text-only models and models that declare none)."""
    return PAPER_NEEDS.get(model) or PaperNeeds(model)


# ------------------------------------------------------------------------------------ the five papers

VCRMNER = declare_needs(PaperNeeds(
    "vcrmner", slots={"detector": "maskrcnn", "clip_model": "ViT-B-16"},
    reads=("objects/{detector}/offsets", "crops/{detector}/clip/{clip_model}/crop_embed",
           "crops/{detector}/prompts/{clip_model}/vcrmner/crop_weights",  # paper, w/o inter-former
           "crops/{detector}/prompts/{clip_model}/vcrmner_words/crop_weights"),  # w/o prompt
    source="VCRMNER sec. 3.1 / 4.1: Mask R-CNN objects; CLIP ViT base with 16x16 patches scores crops and prompts",
))

PMNER = declare_needs(PaperNeeds(
    "pmner", slots={"detector": "fasterrcnn", "resnet_model": "resnet152"},
    reads=("objects/{detector}/offsets", "objects/{detector}/scores",
           "crops/{detector}/resnet/{resnet_model}/crop_pooled",  # FRR rows
           "encoders/resnet/{resnet_model}/grid"),  # T+V, T+V+TCFM
    settings=(
        Stage1Setting("objects/{detector}", "thresholds.score_threshold", 0.95, "--score-threshold 0.95",
                      "P-MNER sec. 4.1: objects with a probability above 0.95 (cut when reading)", match="at_most",
                      option="score_threshold", random_init_free=True),
        Stage1Setting("objects/{detector}", "thresholds.top_k", 5, "--top-k 5",
                      "P-MNER sec. 4.1: the first five objects (cut when reading)", match="at_least", option="top_k"),
    ),
    source="P-MNER sec. 3.2 / 4.1: Faster R-CNN objects, pre-trained 152-layer ResNet",
))

PROMPTMNER = declare_needs(PaperNeeds(
    "promptmner", slots={"clip_model": "RN50"},
    reads=("encoders/clip/{clip_model}/image_embed",  # continuous prompts
           *(f"prompts/{{clip_model}}/promptmner_{kind}/{key}" for kind in ("task", "kb", "expert")
             for key in ("image_relevance", "prompt_embed"))),
    source="PromptMNER sec. 2.3: CLIP's convolutional image encoder (a ResNet CLIP; RN50 the smallest)",
))

MGIPSCL = declare_needs(PaperNeeds(
    "mgipscl",
    reads=("grounding/offsets", "grounding/pixels",  # paper (fine-tuned CLIP over crop pixels)
           "encoders/clip_grounding/states"),  # the "frozen" row
    settings=(Stage1Setting("grounding", "grounding", "owlv2|files", "--grounding owlv2",
                            "MGIPS-CL sec. 3.1.2: three visual-grounding crops per image", match="pattern",
                            option="grounding"),),
    extract={"grounding": "owlv2", "grounding_clip": True},
    source="MGIPS-CL sec. 3.1.2: up to three grounded crops per image (after HVPNeT), CLIP ViT-B/32",
))

ESPVR = declare_needs(PaperNeeds(
    "espvr", slots={"swin_model": "swin-large-patch4-window12-384"},
    reads=("encoders/swin/{swin_model}/grid", "captions/text"),
    settings=(Stage1Setting("captions", "captions", "blip", "--captions blip",
                            "ESPVR sec. 3.2: BLIP image captions", option="captions"),),
    extract={"captions": "blip"},
    source="ESPVR sec. 3.2 / 4.1: Swin-L 12x12 grid at 384, BLIP captions",
))


# ------------------------------------------------------------------------------- choosing instances


@dataclass
class Choice:
    """The instances a configuration reads in one cache."""

    slots: dict[str, str]  # slot -> the instance read
    notes: list[str] = field(default_factory=list)  # tiny variants read in place of the paper's model
    unmatched: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # slot -> (wanted, cached values)


def slot_candidates(cache, paths: Iterable[str], slot: str) -> dict[str, dict]:
    """The values ``slot`` takes among the cache's instances of the specs ``paths`` belong to, each with
    the provenance of one such instance (``{"maskrcnn": {...}}``)."""
    from mner.pipeline.cache.specs import dataset_spec

    found: dict[str, dict] = {}
    for path in paths:
        spec, _ = dataset_spec(path)
        if slot not in spec.slots:
            continue
        for group, values in cache.instances(spec.name).items():
            found.setdefault(values[slot], cache.provenance(group))
    return found


def choose_instances(cache, paths: list[str], wanted: dict[str, str],
                     fill: Callable[[dict[str, str]], list[str]] | None = None) -> Choice:
    """For each slot, the cache instance a model reads: the wanted one, else one whose provenance says it
    stands for it (a tiny test variant), else none (``unmatched`` lists what the cache has instead)."""
    choice = Choice(dict(wanted))
    for slot, value in wanted.items():
        candidates = slot_candidates(cache, paths, slot)
        if value in candidates or not candidates:
            continue  # the paper's instance, or nothing of the kind (the missing-features error names it)
        standing = sorted(c for c, provenance in candidates.items()
                          if (provenance.get("stands_for") or {}).get(slot) == value)
        if standing:
            choice.slots[slot] = standing[0]
            choice.notes.append(f"{slot} {standing[0]} (a tiny variant standing for {value})")
        else:
            choice.unmatched[slot] = (value, sorted(candidates))
    return choice


def config_slots(config, needs: PaperNeeds) -> dict[str, str]:
    """The slot values a model configuration asks for (its fields named like the slots)."""
    return {slot: getattr(config, slot) for slot in needs.slots if hasattr(config, slot)}
