"""Throughput of the Python API: ``mner.Tagger`` tags N new posts with images, and the share spent in stage 1.

Builds the bundled sample's run as ``sample/run.sh`` does (``--for all --random-init --detector-min-size
224 --top-k 5``: every paper's groups; vcrmner on MiniLM-L6, one epoch: speed does not depend on
training), or uses ``--run``. Then generates N new pictures (never extracted) and N posts from the
sample's sentences (``--distinct-images K``: the posts use K new pictures in turn; default one per
post), and times, in one process:

1. ``tagger(posts, images=files)`` with an empty side cache: stage 1 on every new image (only the groups
   vcrmner reads: Mask R-CNN objects, their CLIP ViT-B-16 crops and prompt weights), then tagging;
2. the same call again: every image is now in the side cache, so it is tagging alone.

    OMP_NUM_THREADS=2 python bench/bench_tagger.py --posts 1000 --device cpu --json tagger.json
    OMP_NUM_THREADS=2 python bench/bench_tagger.py --posts 50 --workdir /tmp/tagger-bench   # reuses the run

Figures recorded in docs/training.md ("Tagging new posts").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample" / "twitter_sample"
STAGE1 = ["--for", "all", "--random-init", "--detector-min-size", "224", "--top-k", "5"]  # sample/run.sh


def make_images_module():
    spec = importlib.util.spec_from_file_location("make_images", REPO / "sample" / "make_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample_run(root: Path, device: str) -> Path:
    """The bundled sample's cache and a one-epoch vcrmner run on it (sample/run.sh with --epochs 1); kept
    and reused when ``root`` already holds a finished one."""
    from mner.features.cli import main as features
    from mner.trainer.cli import main as train

    if (root / "run" / "model.safetensors").exists():
        return root / "run"

    module = make_images_module()
    ids = module.sample_image_ids(SAMPLE)
    module.generate_sample_images(root / "images", {i: module.image_kind(i) for i in ids})
    cache = root / "sample.h5"
    if features(["extract", "--data", str(SAMPLE), "--images", str(root / "images"), "--out", str(cache),
                 "--device", device, "--no-progress", *STAGE1]) != 0:
        raise SystemExit("stage 1 of the sample failed")
    run = root / "run"
    if train(["--features", str(cache), "--model", "vcrmner", "--text-encoder", "minilm-l6", "--epochs", "1",
              "--batch-size", "8", "--device", device, "--seed", "1", "--set", "stage1_mismatch=warn",
              "--out", str(run)]) != 0:
        raise SystemExit("training the sample run failed")
    return run


def new_posts(folder: Path, count: int, distinct: int) -> tuple[list[str], list[str]]:
    """``count`` posts (the sample's sentences, cycled), each with one of ``distinct`` new pictures (plain /
    person / place, never extracted before), in turn."""
    from mner.pipeline.data import load_dataset

    module = make_images_module()
    sentences = [" ".join(p.tokens) for split in load_dataset(SAMPLE).splits.values() for p in split]
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for n in range(distinct):
        path = folder / f"new{n:05d}.jpg"
        module.make_image(module.PICTURE_KINDS[n % 3], seed=10_000 + n).save(path, quality=module.JPEG_QUALITY)
        files.append(str(path))
    return [sentences[n % len(sentences)] for n in range(count)], [files[n % distinct] for n in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished multimodal run (default: build the sample's)")
    parser.add_argument("--posts", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32, help="posts per model forward")
    parser.add_argument("--distinct-images", type=int, help="new pictures the posts use in turn (default: --posts)")
    parser.add_argument("--workdir", type=Path, help="keep the sample run here and reuse it (default: a temp dir)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import mner

    distinct = args.distinct_images or args.posts
    with tempfile.TemporaryDirectory(prefix="mner-bench-tagger-") as scratch:
        root = Path(scratch)
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
        run = args.run or sample_run(args.workdir or root, args.device)
        texts, files = new_posts(root / "new-images", args.posts, distinct)
        started = time.perf_counter()
        tagger = mner.Tagger.from_run(run, device=args.device, batch_size=args.batch_size,
                                      side_cache=root / "side.h5", progress=True)
        load_seconds = time.perf_counter() - started
        figures = {}
        for name in ("new images (stage 1 + tagging)", "cached images (tagging only)"):
            started = time.perf_counter()
            tagged = tagger(texts, images=files)
            wall = time.perf_counter() - started
            report = tagger.last_report
            stage1 = report.seconds.get("stage1", 0.0)
            figures[name] = {"seconds": wall, "posts_per_s": len(texts) / wall, "stage1_seconds": stage1,
                             "stage1_share": stage1 / wall, "stage1_groups": report.stage1_groups,
                             "extracted": report.extracted, "image_status": report.image_status,
                             "entities": sum(len(p.entities) for p in tagged)}
    result = {"posts": args.posts, "distinct_images": distinct, "device": args.device, "batch_size": args.batch_size,
              "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "load_seconds": load_seconds, "calls": figures}
    print(f"{args.posts} posts ({distinct} new pictures), device {args.device}, {torch.get_num_threads()} torch "
          f"threads; Tagger.from_run {load_seconds:.1f} s")
    print(f"  side cache groups (what the model reads): {', '.join(report.stage1_groups)}")
    for name, row in figures.items():
        print(f"  {name:<34} {row['seconds']:8.1f} s  {row['posts_per_s']:8.2f} posts/s  stage 1 "
              f"{100 * row['stage1_share']:5.1f}%  ({row['extracted']} images extracted)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
