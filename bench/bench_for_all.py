"""``mner-features extract --for all`` in one pass against the sum of one run per paper, on the same images.

One pass decodes each image once and builds each detector and encoder once; five separate runs (one
``--for <model>`` each, into fresh caches) decode the images again in every run that reads pixels and
rebuild the towers they share (none here: each paper names its own detector/CLIP, but each run pays
start-up, image decoding and placeholder work). The figures go to docs/features.md ("One pass for
every paper"). Every extraction is its own ``mner-features`` process, as a user runs it (start-up
included), on the same generated images, one after the other in this one bench run; ``--tiny`` swaps
in the registered tiny variants (then start-up and decoding dominate).

    OMP_NUM_THREADS=2 python bench/bench_for_all.py --images 12 --side 320 --detector-min-size 160
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(folder: Path, count: int, side: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "sample"))
    from make_images import PICTURE_KINDS, make_image

    images, data = folder / "images", folder / "data"
    images.mkdir(parents=True)
    data.mkdir(parents=True)
    posts = []
    for i in range(count):
        image_id = f"{1000 + i}"
        make_image(PICTURE_KINDS[i % len(PICTURE_KINDS)], i, size=(side, side * 3 // 4)).save(
            images / f"{image_id}.jpg", quality=90)
        posts.append(f"IMGID:{image_id}\nRT\tO\n@John\tB-PER\nSmith\tI-PER\nin\tO\nNew\tB-LOC\nYork\tI-LOC\n")
    (data / "train.txt").write_text("\n".join(posts[: count // 2]) + "\n")
    (data / "valid.txt").write_text("\n".join(posts[count // 2:]) + "\n")
    return data, images


def decode_seconds(images: Path, ids: list[str]) -> float:
    """Decoding every image once (what each run that reads pixels pays), in this process."""
    from mner.features.run.images import load_image

    started = time.perf_counter()
    for image_id in ids:
        load_image(images, image_id)
    return time.perf_counter() - started


def extract(data: Path, images: Path, out: Path, models: list[str], args) -> tuple[float, str]:
    """One ``mner-features extract --for ...`` as its own process (as a user runs it): wall seconds, output."""
    argv = [sys.executable, "-m", "mner.features.cli", "extract", "--data", str(data), "--images", str(images),
            "--out", str(out), *[arg for model in models for arg in ("--for", model)], "--random-init",
            "--detector-min-size", str(args.detector_min_size), "--top-k", str(args.top_k),
            "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers), "--device", "cpu",
            "--no-progress", *(["--tiny"] if args.tiny else [])]
    started = time.perf_counter()
    run = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{run.stderr[-3000:]}")
    return seconds, run.stdout


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=12, help="generated images")
    parser.add_argument("--side", type=int, default=320, help="image width in pixels")
    parser.add_argument("--detector-min-size", type=int, default=160)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="the tiny test variants instead of the real towers")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from mner.pipeline.stage1 import PAPER_NEEDS

    models = sorted(PAPER_NEEDS)
    with tempfile.TemporaryDirectory() as work:
        data, images = write_corpus(Path(work), args.images, args.side)
        ids = sorted(p.stem for p in images.glob("*.jpg"))
        one_pass, output = extract(data, images, Path(work) / "all.h5", ["all"], args)
        separate = {}
        for model in models:
            separate[model], _ = extract(data, images, Path(work) / f"{model}.h5", [model], args)
        decode = decode_seconds(images, ids)
        from mner.pipeline.cache import FeatureCache

        groups = len(FeatureCache(Path(work) / "all.h5").groups())
    total = sum(separate.values())
    result = {
        "images": args.images, "side": args.side, "tiny": args.tiny, "groups": groups,
        "one_pass_s": round(one_pass, 2), "separate_s": {m: round(s, 2) for m, s in separate.items()},
        "separate_sum_s": round(total, 2), "ratio_one_pass_over_sum": round(one_pass / total, 3),
        "decode_once_s": round(decode, 3), "decode_share_of_one_pass": round(decode / one_pass, 4),
        "one_pass_summary": [line for line in output.splitlines() if line.startswith("  ") and " s  (" in line],
    }
    print(f"{args.images} images, {'tiny variants' if args.tiny else 'real architectures, random init'}, "
          f"{groups} groups")
    print(f"  --for all, one pass       {one_pass:8.1f} s")
    for model, seconds in separate.items():
        print(f"  --for {model:<20}{seconds:8.1f} s")
    print(f"  sum of separate runs      {total:8.1f} s   one pass / sum = {one_pass / total:.2f}")
    print(f"  decoding every image once {decode:8.2f} s   ({100 * decode / one_pass:.1f}% of the one pass; "
          f"each of the {len(models)} separate runs decodes them again)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
