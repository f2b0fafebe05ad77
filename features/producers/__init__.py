"""Stage-1 producers: detectors, image encoders, prompt sets, grounding crops and captions, one per group."""
