"""How far an image's stage-1 features move with its batch mates: every image extracted alone vs in batches.

Extracts the same images twice with the same models: once with ``--batch-size 1 --chunk-size 1`` (each
image alone in every forward) and once in batches (``--batch-size 32 --chunk-size 64``), then compares
every per-image and per-object float dataset image by image. The figures are recorded in
docs/features.md ("Batch mates").

    OMP_NUM_THREADS=1 python bench/bench_batch_mates.py                 # the bundled sample's models
    OMP_NUM_THREADS=1 python bench/bench_batch_mates.py --tiny          # the tiny test variants (seconds)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample" / "twitter_sample"
SAMPLE_MODELS = ["--random-init", "--detector", "fasterrcnn", "--detector-min-size", "224", "--score-threshold", "0",
                 "--top-k", "3", "--encoder", "clip", "--prompts", "vcrmner"]  # sample/run.sh
TINY_MODELS = ["--random-init", "--detector", "fasterrcnn-test", "--detector-min-size", "64", "--score-threshold",
               "0", "--top-k", "3", "--encoder", "clip", "--clip-model", "clip-test", "--prompts", "vcrmner"]


def sample_images(folder: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_images", REPO / "sample" / "make_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ids = module.sample_image_ids(SAMPLE)
    module.generate_sample_images(folder, {i: module.image_kind(i) for i in ids})


def compare(alone: Path, batched: Path) -> dict[str, dict]:
    """Per float dataset: largest absolute difference over images (rows matched by image id)."""
    from mner.pipeline.cache import FeatureCache

    a, b = FeatureCache(alone), FeatureCache(batched)
    out = {}
    for group in a.groups():
        if group in ("posts",):
            continue
        for path in sorted(p for p in _datasets(alone) if p.startswith(group + "/")):
            if a.rows_kind(path) not in ("image", "object"):
                continue
            largest, differing, rows = 0.0, 0, 0
            for image_id in a.image_ids:
                x = np.asarray(a.read(path, a.row_of(image_id)))
                y = np.asarray(b.read(path, b.row_of(image_id)))
                if x.dtype.kind != "f":
                    continue
                rows += 1
                if x.shape != y.shape:
                    largest, differing = float("inf"), differing + 1
                    continue
                diff = float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max(initial=0.0))
                largest, differing = max(largest, diff), differing + (diff > 0)
            if rows:
                out[path] = {"max_abs_diff": largest, "images_differing": differing, "images": rows}
    return out


def _datasets(path: Path) -> list[str]:
    import h5py

    names = []
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny test variants instead of the sample's models")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    from mner.features.cli import main as features

    models = TINY_MODELS if args.tiny else SAMPLE_MODELS
    with tempfile.TemporaryDirectory(prefix="mner-batch-mates-") as scratch:
        root = Path(scratch)
        sample_images(root / "images")
        caches = {}
        for name, sizes in (("alone", ["--batch-size", "1", "--chunk-size", "1"]),
                            ("batched", ["--batch-size", "32", "--chunk-size", "64"])):
            caches[name] = root / f"{name}.h5"
            code = features(["extract", "--data", str(SAMPLE), "--images", str(root / "images"),
                             "--out", str(caches[name]), "--device", args.device, "--num-workers", "0",
                             "--no-progress", *models, *sizes])
            if code != 0:
                return code
        figures = compare(caches["alone"], caches["batched"])
    print(f"models: {' '.join(models)} (device {args.device})")
    print(f"{'dataset':<40}{'max |alone - batched|':>24}{'images differing':>20}")
    for path, row in figures.items():
        print(f"{path:<40}{row['max_abs_diff']:>24.3g}{row['images_differing']:>12} of {row['images']}")
    if args.json:
        args.json.write_text(json.dumps({"models": models, "device": args.device, "datasets": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
