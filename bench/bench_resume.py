"""What resumability costs per epoch: the checkpoint written after every epoch (model, AdamW state,
scheduler, RNG states, best weights), on the bundled sample, on CPU.

Runs in one process, alternating, the same training (same seed, same batches) twice per repeat:

- A: as shipped -- every epoch takes a CPU snapshot (blocking) and writes it in a background
  thread while the next epoch trains;
- B: the same run with checkpoints switched off for every epoch but the last (the last one is
  needed to finish the run).

The overhead is (A - B) / B over the middle epochs (the first epoch warms caches; the last differs
by construction), in wall time and in process CPU time (all threads: the background write is
counted; CPU time is the steadier figure on a shared machine), plus the blocking share: snapshot
seconds / epoch seconds of A. All are ratios measured in the same process, minutes apart.

    OMP_NUM_THREADS=1 python bench/bench_resume.py --data sample/twitter_sample --text-encoder minilm-l6
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from unittest import mock


def epoch_history(run: Path) -> list[dict]:
    return json.loads((run / "metrics.json").read_text())["history"]


def train_once(args, out: Path, *, checkpoints: bool) -> list[dict]:
    from mner.trainer.core import epochs as epochs_module
    from mner.trainer.core import train as train_module
    from mner.trainer.core.engine import Engine

    flags = {"text_encoder": args.text_encoder, "epochs": args.epochs, "batch_size": args.batch_size,
             "seed": 1, "device": "cpu", "patience": 0}
    if checkpoints:
        train_module.train(out=out, data=args.data, flags=flags, overwrite=True)
        return epoch_history(out)
    real_snapshot, real_write = Engine.snapshot, epochs_module.write_checkpoint
    calls = {"n": 0}

    def last_epoch_only_snapshot(self, *a, **k):
        calls["n"] += 1
        return real_snapshot(self, *a, **k) if calls["n"] == args.epochs else None

    def last_epoch_only_write(out_dir, snapshot, state, *a, **k):
        if snapshot is not None:
            real_write(out_dir, snapshot, state, *a, **k)

    with mock.patch.object(Engine, "snapshot", last_epoch_only_snapshot), \
            mock.patch.object(epochs_module, "write_checkpoint", last_epoch_only_write):
        train_module.train(out=out, data=args.data, flags=flags, overwrite=True)
    return epoch_history(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="sample/twitter_sample")
    parser.add_argument("--text-encoder", default="minilm-l6")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    a_epochs, b_epochs, blocking, a_cpu, b_cpu = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for checkpoints in (True, False):
                history = train_once(args, Path(tmp) / f"run-{repeat}-{checkpoints}", checkpoints=checkpoints)
                middle = history[1:-1]
                (a_epochs if checkpoints else b_epochs).extend(h["seconds"] for h in middle)
                (a_cpu if checkpoints else b_cpu).extend(h["cpu_seconds"] for h in middle)
                if checkpoints:
                    blocking.extend(h["checkpoint_seconds"] / h["seconds"] for h in middle)
    a, b = statistics.mean(a_epochs), statistics.mean(b_epochs)
    result = {
        "epoch_seconds_with_checkpoints": round(a, 3), "epoch_seconds_without": round(b, 3),
        "overhead_share": round((a - b) / b, 4), "blocking_share": round(statistics.mean(blocking), 4),
        "epoch_cpu_seconds_with_checkpoints": round(statistics.mean(a_cpu), 3),
        "epoch_cpu_seconds_without": round(statistics.mean(b_cpu), 3),
        "cpu_overhead_share": round(statistics.mean(a_cpu) / statistics.mean(b_cpu) - 1, 4),
        "epochs_compared": len(a_epochs), "command": "bench/bench_resume.py " + " ".join(argv or []),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    import os
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1:])
