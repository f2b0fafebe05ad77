"""Which producers a run needs: the built-in groups (objects, encoders, prompt sets) from the options.

A group already in the cache is kept, never recomputed. A prompt set added to a cache is computed with
the CLIP model that made the cache's CLIP embeddings, or refused with the options that select it.
"""

from __future__ import annotations

import sys

from mner.features.producers.detectors import DetectorConfig, create_detector
from mner.features.producers.encoders import EncoderConfig, create_encoder
from mner.features.producers.prompts import load_prompt_set
from mner.features.producers.registry import EncoderProducer, ObjectsProducer, Producer, PromptsProducer


def build_detector(opts):
    from mner.features.run.extract import seed_random_init

    seed_random_init(opts.detector, opts.random_init)
    config = DetectorConfig(top_k=opts.top_k, score_threshold=opts.score_threshold, min_size=opts.detector_min_size,
                            weights=opts.detector_weights, random_init=opts.random_init, device=opts.device)
    extra = {"detectron2_config": opts.detectron2_config} if opts.detector == "detectron2" else {}
    return create_detector(opts.detector, config=config, **extra)


def build_encoder(opts, name: str):
    from mner.features.run.extract import seed_random_init

    seed_random_init(name, opts.random_init)
    return create_encoder(name, config=EncoderConfig(
        random_init=opts.random_init, weights=opts.resnet_weights if name == "resnet152" else None,
        clip_model=opts.clip_model, clip_pretrained=opts.clip_pretrained, swin_model=opts.swin_model,
        device=opts.device))


def check_clip_matches(cache, clip) -> None:
    """Text embeddings must come from the CLIP that made the cached image/crop embeddings."""
    stored = cache.provenance("encoders/clip")
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
    raise ValueError(f"{cache.path}: its CLIP embeddings come from {model} ({pretrained}), but the prompt sets "
                     f"would be encoded with {clip.model_name} ({clip.pretrained()}); use {use} "
                     "(or --overwrite to rebuild every group with the new model)")


def plan_producers(extraction, existing: set[str]) -> tuple[list[Producer], list[str]]:
    """(producers of the groups to compute, in dependency order; groups kept from the cache)."""
    opts, cache = extraction.opts, extraction.cache
    prompt_sets = {}
    for name in opts.prompts:
        prompt_set = load_prompt_set(name)
        prompt_sets.setdefault(prompt_set.name, prompt_set)
    wanted = ["objects"] + [f"encoders/{e}" for e in dict.fromkeys(opts.encoders)] + \
        [f"prompts/{name}" for name in prompt_sets]
    skipped = [group for group in wanted if group in existing]
    producers: list[Producer] = []
    if "objects" not in existing:
        producers.append(ObjectsProducer(lambda: build_detector(opts), stages=extraction.stages,
                                         crop_max_side=opts.crop_max_side,
                                         crop_quality=opts.crop_quality, extra={"detector": opts.detector}))
    else:
        model = cache.provenance("objects").get("model", "")
        if opts.detector not in model and not (opts.detector == "detectron2" and "detectron2" in model):
            print(f"note: {extraction.out} already has objects from {model}; --detector {opts.detector} is ignored "
                  "(boxes come from the cache; use --overwrite to re-detect)", file=sys.stderr)
    encoders = {}
    for name in dict.fromkeys(opts.encoders):
        if f"encoders/{name}" not in existing:
            chosen = {"clip_model": opts.clip_model, "clip_pretrained": opts.clip_pretrained} if name == "clip" else {}
            encoders[name] = EncoderProducer(name, lambda name=name: build_encoder(opts, name),
                                             stages=extraction.stages, batch_size=opts.batch_size, options=chosen)
            producers.append(encoders[name])
    new_sets = [s for name, s in prompt_sets.items() if f"prompts/{name}" not in existing]
    if new_sets:
        if "clip" in encoders:
            clip = encoders["clip"]

            def clip_encoder():
                return clip.encoder

            def logit_scale():
                return clip.encoder.logit_scale
        elif "encoders/clip" in existing:
            built = build_encoder(opts, "clip")  # needed for the text tower anyway; checked before any other model
            check_clip_matches(cache, built)

            def clip_encoder():
                return built

            def logit_scale():
                return float(cache.feature_spec(["encoders/clip/image_embed"]).attrs["encoders/clip"]["logit_scale"])
        else:
            raise ValueError(f"--prompts {' '.join(s.name for s in new_sets)} needs CLIP embeddings: "
                             "add --encoder clip")
        producers += [PromptsProducer(s, clip_encoder, logit_scale) for s in new_sets]
    from mner.features.producers.grounding_captions import plan_grounding_captions  # --grounding, --captions

    more, kept = plan_grounding_captions(extraction, existing, producers)
    return producers + more, skipped + kept
