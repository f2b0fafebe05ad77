"""Training time per epoch with bf16 autocast against fp32, measured in one process (issue 8).

Runs the same training (same seed, same batches) alternately with ``--precision fp32`` and
``--precision bf16``, ``--repeats`` times each, and compares the train seconds of epochs 2.. (epoch 1
warms kernels and caches). The ratio is fp32 / bf16: above 1 means bf16 is faster. On a GPU the
device name is recorded with the figures; on CPU the command runs (it is how the script is tested)
but bf16 autocast is usually slower there, and the figure says nothing about GPUs.

    python bench/bench_precision.py --device cuda --data data/twitter2015 --text-encoder bert-base-cased \\
        --model bert_crf --epochs 3 --repeats 2
    OMP_NUM_THREADS=1 python bench/bench_precision.py --device cpu --data sample/twitter_sample --epochs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def epoch_seconds(args, out: Path, precision: str) -> list[float]:
    from mner.trainer.core import train as train_module

    flags = {"text_encoder": args.text_encoder, "epochs": args.epochs, "batch_size": args.batch_size,
             "seed": 1, "device": args.device, "patience": 0, "precision": precision}
    train_module.train(out=out, model=args.model, data=args.data, features=args.features, flags=flags,
                       overwrite=True)
    history = json.loads((out / "metrics.json").read_text())["history"]
    return [h["train_seconds"] for h in history[1:]]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="sample/twitter_sample")
    parser.add_argument("--features", default=None, help="feature cache, for multimodal models")
    parser.add_argument("--model", default="bert_crf")
    parser.add_argument("--text-encoder", default="minilm-l6")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (epoch 1 is warm-up and not compared)")

    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for precision in ("fp32", "bf16"):  # alternating: load changes hit both alike
                seconds[precision] += epoch_seconds(args, Path(tmp) / f"{precision}-{repeat}", precision)
    fp32, bf16 = statistics.mean(seconds["fp32"]), statistics.mean(seconds["bf16"])
    result = {"device": device_name(args.device), "model": args.model, "text_encoder": args.text_encoder,
              "train_seconds_per_epoch_fp32": round(fp32, 3), "train_seconds_per_epoch_bf16": round(bf16, 3),
              "fp32_over_bf16": round(fp32 / bf16, 3), "epochs_compared_per_precision": len(seconds["fp32"]),
              "command": "bench/bench_precision.py " + " ".join(argv or [])}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    import os
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1:])
