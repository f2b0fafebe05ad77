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

from mner.pipeline.cache import CacheWriter, FeatureCache
from mner.pipeline.data import load_dataset
from mner.trainer.core.config import TrainConfig
from mner.trainer.core.training import parameter_groups
from mner.trainer.inputs.batching import Collator, PostDataset
from mner.trainer.inputs.segments import second_segment_for
from mner.trainer.inputs.text_encoder import load_tokenizer, resolve_text_encoder
from mner.trainer.inputs.visual import VisualBatcher
from mner.trainer.models import available_models, get_model_class

# real stage-1 shapes per group spec (open_clip ViT-B-16 / RN50 are 512-d like ViT-B-32; ResNet-152 at 224;
# Swin-L/4 w12 at 384; VCRMNER's 40 prompts; CONTRACT-10's frozen CLIP states of 128-px grounding crops)
REAL_DIMS = {
    "encoders/clip/{clip_model}": {"D": 512, "P": 49, "Dp": 768},
    "crops/{detector}/clip/{clip_model}": {"D": 512},
    "encoders/resnet/{resnet_model}": {"G": 7, "C": 2048},
    "crops/{detector}/resnet/{resnet_model}": {"C": 2048},
    "encoders/swin/{swin_model}": {"G": 12, "C": 1536},
    "prompts/{clip_model}/{prompt_set}": {"Q": 40, "C": 4, "D": 512},
    "crops/{detector}/prompts/{clip_model}/{prompt_set}": {"C": 4},
    "encoders/clip_grounding": {"L": 2, "T": 17, "D": 768},
}
# mgipscl's paper mode needs a CLIP tower: ViT-B/32's shape, random weights (no download offline)
MODEL_OVERRIDES = {"mgipscl": {"clip_model": "random-vit-b-32"}}
EXTRA_RUNS = {"mgipscl frozen": ("mgipscl", {"vision_mode": "frozen"})}  # label -> (model, config overrides)


def write_synthetic_cache(path: Path, image_ids: list[str], *, max_objects: int, seed: int) -> None:
    """Random features with stage 1's real shapes for ``image_ids`` (1..max_objects objects each): every
    group the papers' presets read (``PAPER_NEEDS``), built from the specs alone (``tiny.tiny_group``)."""
    from mner.pipeline.cache.specs import get_group, index_path, is_ragged, split_path
    from mner.pipeline.cache.tiny import tiny_group
    from mner.pipeline.stage1 import PAPER_NEEDS

    rng = np.random.default_rng(seed)
    ids = sorted(set(image_ids))
    groups = list(dict.fromkeys(split_path(p)[0] for needs in PAPER_NEEDS.values() for p in needs.paths()))
    owners = [index_path(g, d.rows).rsplit("/", 1)[0] for g in groups for d in get_group(g).datasets
              if is_ragged(d.rows)]
    groups = list(dict.fromkeys([*owners, *groups]))
    note = {"note": "bench_step_time.py random values"}
    with CacheWriter(path, overwrite=True) as writer:
        writer.write_images(ids, ["ok"] * len(ids))
        for k, group in enumerate(groups):
            spec = get_group(group)
            counts = rng.integers(1, max_objects + 1, size=len(ids)).tolist() if spec.name == "objects/{detector}" \
                else None
            tiny_group(writer, group, seed=seed + k, dims=REAL_DIMS.get(spec.name), counts=counts, provenance=note)


class InStepClip(torch.nn.Module):
    """Published-code baseline: a frozen CLIP image tower encodes each batch's crops inside the step."""

    def __init__(self, model: torch.nn.Module, crop_path: str, max_objects: int, clip_model: str = "ViT-B-32",
                 mask_path: str = "objects/maskrcnn/mask"):
        super().__init__()
        import open_clip

        self.model, self.crop_path, self.max_objects, self.mask_path = model, crop_path, max_objects, mask_path
        self.clip = open_clip.create_model(clip_model, pretrained=None).visual.eval().requires_grad_(False)

    def forward(self, batch: dict) -> dict:
        visual = dict(batch["visual"])
        mask = visual[self.mask_path][:, : self.max_objects]  # (B, K)
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
            model = InStepClip(model, model.crop_path, config.max_objects, mask_path=model.mask_path)
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
