"""Per-step training time of every registered model on the same batches, from the feature cache.

Answers three questions (docs/models/README.md records the figures):

1. fusion overhead: step time (forward + backward + AdamW) of each model / bert_crf's;
2. input stall: share of the step spent waiting for the DataLoader to deliver cached features;
3. cache vs in-step CNN: vcrmner's step from the cache vs the same step when an open_clip
   ViT-B-32 (random init, frozen, no_grad) encodes the object crops inside every step, as published
   MNER code does. Crops enter as ready 224x224 tensors, so JPEG decoding and resizing -- which the
   in-step variant would also pay -- are not counted: the ratio is a lower bound.

Text: the real Twitter-2015 training posts; visual input: a cache with the shapes stage 1 writes
(CLIP ViT-B-32, ResNet-152, prompt sets; for mgipscl 0-3 grounding crops of 128x128 uint8 per image
and frozen CLIP states of 2 layers x 17 tokens x 768; for espvr the Swin 12x12x1536 grid and a caption
per image) filled with seeded random values, since the images are not available offline (pass --cache
to time an extracted cache instead). mgipscl runs twice: in its paper mode (a ViT-B/32-shaped CLIP
tower, random weights, fine-tuned over the crop pixels inside the step) and in its frozen mode.

    python bench/bench_step_time.py --data ../shared/data/twitter2015 --text-encoder minilm-l6
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mner.pipeline.cache import CacheWriter, FeatureCache, make_provenance
from mner.pipeline.data import load_dataset
from mner.trainer.core.config import TrainConfig
from mner.trainer.core.train import parameter_groups
from mner.trainer.inputs.batching import Collator, PostDataset
from mner.trainer.inputs.segments import second_segment_for
from mner.trainer.inputs.text_encoder import load_tokenizer, resolve_text_encoder
from mner.trainer.inputs.visual import VisualBatcher
from mner.trainer.models import available_models, get_model_class

PROMPT_SETS = ("vcrmner", "vcrmner_words", "promptmner_task", "promptmner_kb", "promptmner_expert")
CLIP_WIDTH, CLIP_PATCHES, CLIP_PATCH_WIDTH = 512, 49, 768  # open_clip ViT-B-32 at 224 px
NUM_PROMPTS = 40  # VCRMNER: 10 prompts x 4 categories
# cache group -> {dataset: (rows, per-row shape)}: the layout docs/cache-schema.md describes
SCHEMA = {
    "encoders/clip": {
        "image_embed": ("image", (CLIP_WIDTH,)), "patch_tokens": ("image", (CLIP_PATCHES, CLIP_PATCH_WIDTH)),
        "crop_embed": ("object", (CLIP_WIDTH,)),
    },
    "encoders/resnet152": {"grid": ("image", (7, 7, 2048)), "crop_pooled": ("object", (2048,))},
    **{
        f"prompts/{name}": {
            "prompt_embed": ("global", (NUM_PROMPTS, CLIP_WIDTH)), "centroids": ("global", (4, CLIP_WIDTH)),
            "prompt_category": ("global", (NUM_PROMPTS,)), "crop_weights": ("object", (4,)),
            "image_relevance": ("image", (NUM_PROMPTS,)),
        }
        for name in PROMPT_SETS
    },
}


GROUNDING_SIDE, GROUNDING_LAYERS, GROUNDING_TOKENS, GROUNDING_WIDTH = 128, [6, 12], 17, 768  # CONTRACT-10
SWIN_GRID, SWIN_WIDTH = 12, 1536
CAPTION_WORDS = ["a", "man", "woman", "dog", "street", "sign", "crowd", "stage", "game", "city", "photo", "of",
                 "with", "in", "on", "the"]
# mgipscl's paper mode needs a CLIP tower: ViT-B/32's shape, random weights (no download offline)
MODEL_OVERRIDES = {"mgipscl": {"clip_model": "random-vit-b-32"}}
EXTRA_RUNS = {"mgipscl frozen": ("mgipscl", {"vision_mode": "frozen"})}  # label -> (model, config overrides)


def write_issue10_groups(writer: CacheWriter, num_images: int, rng: np.random.Generator, provenance: dict) -> None:
    """Grounding crops + frozen CLIP states (mgipscl), the Swin grid and captions (espvr)."""
    counts = rng.integers(0, 4, size=num_images)  # 0..3 crops per image
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    crops = int(offsets[-1])
    pixels = rng.integers(0, 256, (crops, 3, GROUNDING_SIDE, GROUNDING_SIDE), dtype=np.uint8)
    writer.write_group("grounding", {"offsets": offsets, "pixels": pixels}, provenance)
    states = rng.standard_normal((crops, len(GROUNDING_LAYERS), GROUNDING_TOKENS, GROUNDING_WIDTH), dtype=np.float32)
    writer.write_group("encoders/clip_grounding", {"states": states.astype(np.float16)}, provenance,
                       {"layers": GROUNDING_LAYERS, "image_size": GROUNDING_SIDE, "patch_size": 32})
    del states
    grid = np.concatenate([rng.standard_normal((min(64, num_images - i), SWIN_GRID, SWIN_GRID, SWIN_WIDTH),
                                               dtype=np.float32).astype(np.float16) for i in range(0, num_images, 64)])
    writer.write_group("encoders/swin", {"grid": grid}, provenance)
    captions = [" ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(6, 14)))) if rng.random() > 0.1 else ""
                for _ in range(num_images)]  # BLIP-length captions, 10% empty
    writer.write_group("captions", {"text": captions}, provenance)


def write_synthetic_cache(path: Path, image_ids: list[str], *, max_objects: int, seed: int) -> None:
    """Random features with stage 1's shapes and dtypes for ``image_ids`` (1..max_objects objects each)."""
    rng = np.random.default_rng(seed)
    ids = sorted(set(image_ids))
    counts = rng.integers(1, max_objects + 1, size=len(ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = {"image": len(ids), "object": int(offsets[-1])}
    provenance = make_provenance("bench", model="synthetic", pretrained="random", preprocessing={},
                                 thresholds={}, image_ids=ids, extra={"note": "bench_step_time.py random values"})
    with CacheWriter(path, overwrite=True, partial=True) as writer:  # only the datasets read
        writer.write_images(ids, ["ok"] * len(ids))
        scores = np.sort(rng.uniform(0.5, 1.0, rows["object"]).astype(np.float32))[::-1].copy()
        writer.write_group("objects", {"offsets": (offsets, "offsets"), "scores": (scores, "object")}, provenance)
        for group, datasets in SCHEMA.items():
            arrays = {}
            for name, (kind, shape) in datasets.items():
                if name == "prompt_category":
                    arrays[name] = (np.repeat(np.arange(4, dtype=np.int16), NUM_PROMPTS // 4), kind)
                    continue
                lead = (rows[kind],) if kind in rows else ()
                values = rng.standard_normal(lead + shape, dtype=np.float32)
                if name in ("crop_weights", "image_relevance"):
                    values = np.exp(values) / np.exp(values).sum(-1, keepdims=True)
                arrays[name] = (values, kind)
            attrs = {"category_names": ["PER", "LOC", "ORG", "MISC"]} if group.startswith("prompts/") else {}
            if group == "encoders/clip":
                attrs = {"logit_scale": 100.0}
            writer.write_group(group, arrays, provenance, attrs)
        write_issue10_groups(writer, len(ids), rng, provenance)


class InStepClip(torch.nn.Module):
    """Published-code baseline: a frozen CLIP image tower encodes each batch's crops inside the step."""

    def __init__(self, model: torch.nn.Module, crop_path: str, max_objects: int, clip_model: str = "ViT-B-32"):
        super().__init__()
        import open_clip

        self.model, self.crop_path, self.max_objects = model, crop_path, max_objects
        self.clip = open_clip.create_model(clip_model, pretrained=None).visual.eval().requires_grad_(False)

    def forward(self, batch: dict) -> dict:
        visual = dict(batch["visual"])
        mask = visual["objects/mask"][:, : self.max_objects]  # (B, K)
        crops = torch.randn(int(mask.sum()), 3, 224, 224, device=mask.device)  # stands in for decoded crops
        with torch.no_grad():
            embed = self.clip(crops)  # (n_crops, D)
        crop_embed = visual[self.crop_path][:, : self.max_objects].clone()  # (B, K, D)
        crop_embed[mask] = embed
        visual[self.crop_path] = crop_embed
        return self.model({**batch, "visual": visual})


class StepTimer:
    """One model, its optimiser and an endless stream of the shared batches; times steps on demand."""

    def __init__(self, model: torch.nn.Module, loader, *, lr: float):
        config = TrainConfig(encoder_lr=lr, head_lr=lr, crf_lr=lr)
        self.model, self.loader = model.train(), loader
        owned = getattr(model, "parameter_groups", None)  # a model with its own tower (mgipscl's CLIP)
        self.optimizer = torch.optim.AdamW(owned(config) if owned else parameter_groups(model, config))
        self.batches = iter(loader)
        self.compute: list[float] = []  # seconds of forward + backward + optimiser step
        self.wait: list[float] = []  # seconds blocked on the DataLoader

    def step(self, *, record: bool) -> None:
        start = time.perf_counter()
        try:
            batch = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            batch = next(self.batches)
        loaded = time.perf_counter()
        loss = self.model(batch)["loss"]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        done = time.perf_counter()
        if record:
            self.wait.append(loaded - start)
            self.compute.append(done - loaded)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/twitter2015", help="Twitter-format dataset folder")
    parser.add_argument("--text-encoder", default="minilm-l6", help="hub name, folder or alias")
    parser.add_argument("--cache", default=None, help="extracted cache to time (default: a synthetic one)")
    parser.add_argument("--work", default="/tmp/mner-bench", help="folder for the synthetic cache")
    parser.add_argument("--models", nargs="*", default=None, help="default: every registered model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--clip-steps", type=int, default=None,
                        help="timed steps of the in-step CLIP variant (default: --steps, same rounds; 0: skip)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=70)
    parser.add_argument("--max-objects", type=int, default=10, help="objects per image in the synthetic cache")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.clip_steps is None:
        args.clip_steps = args.steps
    if args.threads:
        torch.set_num_threads(args.threads)

    dataset = load_dataset(args.data)
    labels = dataset.labels
    label_to_id = {label: i for i, label in enumerate(labels)}
    num_posts = (args.warmup + max(args.steps, args.clip_steps)) * args.batch_size
    posts = dataset.splits["train"][:num_posts]
    cache_path = Path(args.cache) if args.cache else Path(args.work) / "bench.h5"
    if not args.cache:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_cache(cache_path, [p.image_id for p in posts if p.image_id], max_objects=args.max_objects,
                              seed=0)
    cache = FeatureCache(cache_path)
    image_rows = [cache.row_of(p.image_id) if p.image_id in set(cache.image_ids) else None for p in posts]

    tokenizer = load_tokenizer(args.text_encoder)
    post_dataset = PostDataset(posts, tokenizer, label_to_id=label_to_id, max_length=args.max_length,
                               image_rows=image_rows, repair=True)
    encoder_path = resolve_text_encoder(args.text_encoder)
    models = args.models or available_models()
    if "bert_crf" in models:
        models = ["bert_crf"] + [m for m in models if m != "bert_crf"]

    timers: dict[str, tuple[StepTimer, int]] = {}
    runs = [(name, name, {}, False) for name in models]
    runs += [(label, name, overrides, False) for label, (name, overrides) in EXTRA_RUNS.items() if name in models]
    if args.clip_steps and "vcrmner" in models:
        runs.append(("vcrmner + CLIP in step", "vcrmner", {}, True))
    for label, name, overrides, in_step_clip in runs:
        cls = get_model_class(name)
        config = cls.Config(**{**MODEL_OVERRIDES.get(name, {}), **overrides})
        required = list(cls.required_features(config))
        batcher = VisualBatcher(cache, required, max_objects=getattr(config, "max_objects", None)) if required else None
        collator = Collator(pad_token_id=tokenizer.pad_token_id, visual_batcher=batcher,
                            second_segment=second_segment_for(cls, config, tokenizer, args.max_length))
        loader = torch.utils.data.DataLoader(post_dataset, batch_size=args.batch_size, shuffle=False,
                                             collate_fn=collator, num_workers=args.num_workers,
                                             persistent_workers=args.num_workers > 0)
        torch.manual_seed(0)
        model = cls(config, labels=labels, text_encoder=encoder_path, tokenizer=tokenizer,
                    features=cache.feature_spec(required) if required else None)
        if in_step_clip:
            model = InStepClip(model, model.crop_path, config.max_objects)
        timers[label] = (StepTimer(model, loader, lr=1e-5), args.clip_steps if in_step_clip else args.steps)

    # Round robin, one step per model per round: load changes on a shared machine hit every model alike.
    for timer, _ in timers.values():
        for _ in range(args.warmup):
            timer.step(record=False)
    for round_index in tqdm(range(max(steps for _, steps in timers.values())), desc="rounds"):
        for timer, steps in timers.values():
            if round_index < steps:
                timer.step(record=True)

    results = {}
    for label, (timer, steps) in timers.items():
        total = sum(timer.compute) + sum(timer.wait)
        results[label] = {
            # median: robust to the load spikes of a shared machine; std shows how noisy it was
            "step_ms": 1000 * statistics.median(timer.compute), "step_ms_std": 1000 * statistics.pstdev(timer.compute),
            "wait_share": sum(timer.wait) / total, "steps": steps,
        }

    base = results.get("bert_crf", {}).get("step_ms")
    print(f"\n{'model':<26}{'median ms':>10}{'± std':>8}{'x bert_crf':>12}{'data wait':>11}")
    for label, row in results.items():
        ratio = f"{row['step_ms'] / base:.2f}" if base else "-"
        print(f"{label:<26}{row['step_ms']:>10.0f}{row['step_ms_std']:>8.0f}{ratio:>12}"
              f"{100 * row['wait_share']:>10.1f}%")
    if "vcrmner + CLIP in step" in results and "vcrmner" in results:
        print(f"\nvcrmner: in-step CLIP / cache = "
              f"{results['vcrmner + CLIP in step']['step_ms'] / results['vcrmner']['step_ms']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
