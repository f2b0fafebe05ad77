"""Throughput of ``mner-features extract``: per component, end to end, and the overhead around the models.

    OMP_NUM_THREADS=2 python bench/bench_extract.py --images 64 --detector maskrcnn-test --encoder clip-test
    python bench/bench_extract.py --images 512 --device cuda --detector maskrcnn --encoder clip \\
        --encoder resnet152 --encoder swin --batch-size 64        # real architectures, random weights

One process measures, on the same generated 640x480 JPEGs and the same models:

- **end to end**: the extraction loop (loader workers, device stages, background writer), images/s and
  per stage; the whole run including model build and assembly is printed too;
- **bare batched forwards**: the same device stages (detector, crops, encoders) on images already
  decoded and in memory, main thread only: what the models alone cost;
- the ratio of the two, the **main-thread CPU ms per image outside the forwards** (thread CPU time of
  the loop minus the thread CPU time inside device stages), and on CUDA the share of wall time the GPU
  is busy (CUDA events around every device stage) and the peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from corpus import make_corpus  # bench/corpus.py (the script's folder is on sys.path)

from mner.features.run.extract import Extraction, ExtractOptions
from mner.features.run.loader import ImageLoader
from mner.features.run.stages import ImageStages


def bare_forwards(extraction: Extraction, ids: list[str], chunk: int) -> tuple[float, dict]:
    """The run's device stages on pre-decoded images (no loader, no writer): seconds and per-stage seconds."""
    detector = next(p.detector for p in extraction.producers if p.group.startswith("objects/"))
    encoders = {p.group: p.encoder for p in extraction.producers if p.group.startswith("encoders/")}
    run_stages = extraction.stages
    stages = ImageStages(
        run_stages.device, batch_size=run_stages.batch_size, crop_batch_size=run_stages.crop_batch_size
    )
    loader = ImageLoader(extraction._loader_spec(), ids, num_workers=extraction.num_workers)
    items = [
        item for start in range(0, len(ids), chunk) for item in loader.take(len(ids[start : start + chunk]))
    ]
    loader.close()
    stages.process(detector, encoders, items[:2])  # warm-up
    stages.clock.wall.clear()
    if stages.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for lo in range(0, len(items), chunk):
        stages.process(detector, encoders, items[lo : lo + chunk])
    if stages.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, dict(stages.clock.wall)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--detector", default="maskrcnn-test")
    parser.add_argument("--encoder", action="append", help="repeatable (default: clip-test)")
    parser.add_argument("--detector-min-size", type=int, default=800)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    encoders = args.encoder or ["clip-test"]
    with tempfile.TemporaryDirectory() as tmp:
        data, images = make_corpus(Path(tmp), args.images)

        def options(out: str) -> ExtractOptions:
            return ExtractOptions(
                data=str(data),
                images=str(images),
                out=str(Path(tmp) / out),
                detector=args.detector,
                encoders=encoders,
                random_init=True,
                device=args.device,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                top_k=args.top_k,
                score_threshold=0.0,
                detector_min_size=args.detector_min_size,
                chunk_size=args.chunk_size,
                progress=False,
            )

        extraction = Extraction(options("bench.h5"))
        if extraction.opts.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        summary = extraction.run()
        whole = time.perf_counter() - start
        stats = extraction.loop_stats
        bare, bare_stages = bare_forwards(extraction, extraction.ids, args.chunk_size)
    n = stats["images"]
    device = extraction.opts.device
    figures = {
        "device": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu",
        "images": n,
        "objects": summary.num_objects,
        "detector": args.detector,
        "encoders": encoders,
        "num_workers": extraction.num_workers,
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "end_to_end_images_per_s": n / stats["wall"],
        "bare_forwards_images_per_s": n / bare,
        "end_to_end_over_bare": stats["wall"] / bare,
        "main_thread_cpu_ms_per_image_outside_forwards": 1000
        * (stats["main_thread_cpu"] - stats["forward_thread_cpu"])
        / n,
        "whole_run_s_incl_build_and_assembly": whole,
        "stages_images_per_s": {name: n / s for name, s in summary.stages.items() if s > 0},
        "bare_stages_images_per_s": {name: n / s for name, s in bare_stages.items() if s > 0},
    }
    if stats["device_seconds"]:
        figures["gpu_busy_share"] = sum(stats["device_seconds"].values()) / stats["wall"]
        figures["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"device {figures['device']}, {n} images 640x480, {summary.num_objects} objects "
        f"(top-k {args.top_k}), "
        f"detector {args.detector} min size {args.detector_min_size}, encoders {', '.join(encoders)}, "
        f"batch {args.batch_size}, loader workers {extraction.num_workers}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'stage (end to end)':<28}{'seconds':>9}{'images/s':>11}   {'bare forwards':>13}")
    for name, seconds in summary.stages.items():
        bare_s = bare_stages.get(name)
        print(
            f"{name:<28}{seconds:>9.2f}{n / seconds if seconds else float('inf'):>11.1f}   "
            + (f"{n / bare_s:>13.1f}" if bare_s else f"{'':>13}")
        )
    print(f"{'end to end (loop)':<28}{stats['wall']:>9.2f}{figures['end_to_end_images_per_s']:>11.1f}")
    print(f"{'bare batched forwards':<28}{bare:>9.2f}{figures['bare_forwards_images_per_s']:>11.1f}")
    print(
        f"end to end / bare forwards: {figures['end_to_end_over_bare']:.2f}x   "
        "main-thread CPU outside forwards: "
        f"{figures['main_thread_cpu_ms_per_image_outside_forwards']:.2f} ms/image"
    )
    if "gpu_busy_share" in figures:
        print(
            f"GPU busy {100 * figures['gpu_busy_share']:.0f}% of the loop, peak GPU memory "
            f"{figures['peak_gpu_memory_gib']:.2f} GiB"
        )
    print(f"whole run incl. model build and assembly: {whole:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
