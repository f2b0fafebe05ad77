"""Per-epoch training time: the papers' protocol (fine-tuned encoder) vs fast ablation mode
(frozen encoder, outputs cached once), measured in one process on the same batches.

    OMP_NUM_THREADS=1 python bench/bench_fast_ablation.py --features cache/sample.h5 \
        --text-encoder minilm-l6 --models bert_crf vcrmner --epochs 3

Each epoch is the trainer's own loop body (forward, backward, clip, AdamW step, scheduler-free);
the two modes alternate epoch by epoch so machine load hits both alike. The one-off cost of
encoding every post is reported separately. Prints a Markdown table for docs/experiments.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def build(model_name: str, features: str, text_encoder: str, *, fast: bool, seed: int = 1):
    from mner.pipeline.cache import FeatureCache
    from mner.trainer.core.config import resolve_configs
    from mner.trainer.core.training import build_model, parameter_groups, seed_everything
    from mner.trainer.inputs.batching import Collator
    from mner.trainer.inputs.posts import make_loader, make_post_dataset
    from mner.trainer.inputs.text_encoder import load_tokenizer
    from mner.trainer.inputs.visual_inputs import open_visual_inputs
    from mner.trainer.models import get_model_class

    cls = get_model_class(model_name)
    model_config, config = resolve_configs(cls, flags={"text_encoder": text_encoder, "batch_size": 8, "seed": seed,
                                                       "fast_ablation": fast})
    seed_everything(seed)
    dataset = FeatureCache(features).load_posts()
    labels = dataset.labels
    visual = open_visual_inputs(features, cls, model_config, model_name)
    tokenizer = load_tokenizer(text_encoder)
    common = {"tokenizer": tokenizer, "label_to_id": {label: i for i, label in enumerate(labels)},
              "max_length": config.max_length, "visual": visual}
    train_set = make_post_dataset(dataset.splits["train"], split="train", repair=True, **common)
    others = [make_post_dataset(dataset.splits[s], split=s, **common) for s in ("dev", "test")]
    collator = Collator(pad_token_id=tokenizer.pad_token_id or 0, visual_batcher=visual.batcher if visual else None)
    net = build_model(cls, model_config, labels=labels, text_encoder=text_encoder, tokenizer=tokenizer, visual=visual)
    setup = 0.0
    if fast:
        from mner.trainer.core import fast_text
        from mner.trainer.core.fast_text import use_cached_text_encoder

        fast_text._SHARED_TABLES.clear()  # measure the one-off encoding, not a lookup of an earlier model's
        start = time.perf_counter()
        use_cached_text_encoder(net, [train_set, *others], device=torch.device("cpu"), batch_size=64)
        setup = time.perf_counter() - start
    loader = make_loader(train_set, collator, batch_size=config.batch_size, shuffle=True, num_workers=0, seed=seed)
    optimizer = torch.optim.AdamW(parameter_groups(net, config))
    return net, loader, optimizer, setup, len(train_set)


def epoch_seconds(net, loader, optimizer) -> float:
    net.train()
    start = time.perf_counter()
    for batch in loader:
        loss = net(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", default="cache/sample.h5")
    parser.add_argument("--text-encoder", default="minilm-l6")
    parser.add_argument("--models", nargs="+", default=["bert_crf", "vcrmner"])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for model in args.models:
        full = build(model, args.features, args.text_encoder, fast=False)
        fast = build(model, args.features, args.text_encoder, fast=True)
        times = {"full": [], "fast": []}
        epoch_seconds(full[0], full[1], full[2])  # warm-up (allocator, lazy init), not counted
        epoch_seconds(fast[0], fast[1], fast[2])
        for _ in range(args.epochs):
            times["full"].append(epoch_seconds(full[0], full[1], full[2]))
            times["fast"].append(epoch_seconds(fast[0], fast[1], fast[2]))
        full_s, fast_s = statistics.median(times["full"]), statistics.median(times["fast"])
        rows.append((model, full[4], full_s, fast_s, full_s / fast_s, fast[3]))
    print(f"\nsample: {Path(args.features)}; text encoder {args.text_encoder}; "
          f"torch threads {torch.get_num_threads()}; median of {args.epochs} epochs after one warm-up epoch\n")
    print("| model | train posts | epoch, fine-tuned encoder (papers) | epoch, fast ablation | speed-up "
          "| one-off encoding |")
    print("|---|---|---|---|---|---|")
    for model, posts, full_s, fast_s, ratio, setup in rows:
        print(f"| {model} | {posts} | {full_s:.3f} s | {fast_s:.3f} s | **{ratio:.1f}x** | {setup:.2f} s |")


if __name__ == "__main__":
    main()
