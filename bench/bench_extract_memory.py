"""Peak memory of ``mner-features extract`` at two dataset sizes 8x apart: bounded by a chunk, not the data.

    OMP_NUM_THREADS=1 python bench/bench_extract_memory.py --images 24 [--factor 8] [--encoder clip-test]

Generates noise images (640x480: their JPEG crops are large, the worst case for crop bytes), runs the
extraction once per size in a fresh subprocess (random-init detector, top-10 crops at score threshold 0,
chunks of 16 images) and prints each run's peak RSS (the main process, and the largest loader worker
process), the ratio larger/smaller, and the temporary disk (the parts folder at assembly) against the
size of the cache. The acceptance bound is a ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # bench/corpus.py (also when imported from elsewhere)

from corpus import make_corpus


def child(args) -> None:
    """One extraction in this process; prints a JSON line with its peak RSS and disk figures."""
    from mner.features.run.extract import ExtractOptions, run_extraction

    with tempfile.TemporaryDirectory() as tmp:
        data, images = make_corpus(Path(tmp), args.child, noise=True)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        opts = ExtractOptions(data=str(data), images=str(images), out=str(Path(tmp) / "bench.h5"),
                              detector=args.detector, encoders=list(args.encoder), random_init=True,
                              score_threshold=0.0, top_k=10, detector_min_size=args.detector_min_size,
                              chunk_size=args.chunk_size, batch_size=16, progress=False)
        started = time.perf_counter()
        summary = run_extraction(opts)
        seconds = time.perf_counter() - started
        cache_bytes = os.path.getsize(opts.out)
    print(json.dumps({"images": summary.num_images, "objects": summary.num_objects, "seconds": seconds,
                      "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "worker_peak_rss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                      "rss_before_kib": baseline, "parts_bytes": getattr(summary, "parts_bytes", 0),
                      "cache_bytes": cache_bytes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24, help="the smaller dataset")
    parser.add_argument("--factor", type=int, default=8, help="the larger dataset has this many times more")
    parser.add_argument("--detector", default="fasterrcnn-test")
    parser.add_argument("--detector-min-size", type=int, default=96)
    parser.add_argument("--encoder", action="append", default=None, help="repeatable (default clip-test)")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.encoder = args.encoder or ["clip-test"]
    if args.child is not None:
        child(args)
        return
    runs = []
    for count in (args.images, args.images * args.factor):
        command = [sys.executable, __file__, "--child", str(count), "--detector", args.detector,
                   "--detector-min-size", str(args.detector_min_size), "--chunk-size", str(args.chunk_size),
                   *[item for name in args.encoder for item in ("--encoder", name)]]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
    print(f"detector {args.detector} (random init, min size {args.detector_min_size}, top-10, threshold 0), "
          f"encoders {', '.join(args.encoder)}, chunks of {args.chunk_size}, 640x480 noise images")
    print(f"{'images':>7} {'objects':>8} {'seconds':>8} {'peak RSS MiB':>13} {'worker MiB':>11} {'cache MiB':>10}"
          f" {'parts MiB':>10} {'parts/cache':>12}")
    for run in runs:
        worker = run.get("worker_peak_rss_kib", 0) / 1024
        print(f"{run['images']:>7} {run['objects']:>8} {run['seconds']:>8.1f} {run['peak_rss_kib'] / 1024:>13.1f} "
              f"{worker:>11.1f} {run['cache_bytes'] / 2**20:>10.1f} {run['parts_bytes'] / 2**20:>10.1f} "
              f"{run['parts_bytes'] / max(run['cache_bytes'], 1):>12.2f}")
    ratio = runs[1]["peak_rss_kib"] / runs[0]["peak_rss_kib"]
    worker_ratio = runs[1].get("worker_peak_rss_kib", 0) / max(runs[0].get("worker_peak_rss_kib", 0), 1)
    print(f"largest loader worker: peak RSS ratio {worker_ratio:.3f}")
    cache_ratio = runs[1]["cache_bytes"] / max(runs[0]["cache_bytes"], 1)
    print(f"peak RSS ratio {ratio:.3f} for {cache_ratio:.1f}x the cache bytes "
          f"({'within' if ratio <= 1.3 else 'OVER'} the 1.3 bound)")
    sys.exit(0 if ratio <= 1.3 else 1)


if __name__ == "__main__":
    main()
