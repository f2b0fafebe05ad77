"""``mner-features extract --for all`` in one pass against the sum of one run per paper, on the same images.

One pass decodes each image once and builds each detector and encoder once; five separate runs (one
``--for <model>`` each, into fresh caches) decode the images again in every run that reads pixels and
rebuild the towers they share (none here: each paper names its own detector/CLIP, but each run pays
start-up, image decoding and placeholder work). The figures go to docs/features.md ("One pass for
every paper"). Both sides run in this one process, alternating nothing else, on the same generated
images; ``--tiny`` swaps in the registered tiny variants (then start-up and decoding dominate).

    OMP_NUM_THREADS=2 python bench/bench_for_all.py --images 12 --side 320 --detector-min-size 160
"""

from __future__ import annotations

import argparse
import json
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


def extract(data: Path, images: Path, out: Path, models: list[str], args) -> tuple[float, object]:
    from mner.features.run.extract import ExtractOptions, run_extraction

    options = ExtractOptions(data=str(data), images=str(images), out=str(out), for_models=models,
                             random_init=True, tiny=args.tiny, detector_min_size=args.detector_min_size,
                             top_k=args.top_k, batch_size=args.batch_size, num_workers=args.num_workers,
                             device="cpu", progress=False)
    started = time.perf_counter()
    summary = run_extraction(options)
    return time.perf_counter() - started, summary


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
        one_pass, summary = extract(data, images, Path(work) / "all.h5", ["all"], args)
        separate = {}
        for model in models:
            separate[model], _ = extract(data, images, Path(work) / f"{model}.h5", [model], args)
        decode = decode_seconds(images, ids)
    total = sum(separate.values())
    result = {
        "images": args.images, "side": args.side, "tiny": args.tiny, "groups": len(summary.computed),
        "one_pass_s": round(one_pass, 2), "separate_s": {m: round(s, 2) for m, s in separate.items()},
        "separate_sum_s": round(total, 2), "ratio_one_pass_over_sum": round(one_pass / total, 3),
        "decode_once_s": round(decode, 3), "decode_share_of_one_pass": round(decode / one_pass, 4),
        "one_pass_stages": {k: round(v, 2) for k, v in summary.seconds.items()},
    }
    print(f"{args.images} images, {'tiny variants' if args.tiny else 'real architectures, random init'}, "
          f"{len(summary.computed)} groups")
    print(f"  --for all, one pass       {one_pass:8.1f} s")
    for model, seconds in separate.items():
        print(f"  --for {model:<20}{seconds:8.1f} s")
    print(f"  sum of separate runs      {total:8.1f} s   one pass / sum = {one_pass / total:.2f}")
    print(f"  decoding every image once {decode:8.2f} s   ({100 * decode / one_pass:.1f}% of the one pass; "
          f"the separate runs decode them {sum(1 for m in models if m != 'none')} times)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
