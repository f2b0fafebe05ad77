"""Which device a process takes (``--device``, torchrun's LOCAL_RANK), and the merge step after shards.

Shards themselves are resolved in ``sharding.py``; together:

- torchrun sets ``RANK``/``WORLD_SIZE`` (the shard) and ``LOCAL_RANK`` (the GPU on this node):
  ``torchrun --nproc-per-node 4 -m mner.features.cli extract ...`` runs 4 shards on cuda:0..3.
- A SLURM array sets ``SLURM_ARRAY_TASK_ID`` / ``_MIN`` / ``_STEP`` / ``_COUNT``; ``--array=0-15:4``
  has tasks 0, 4, 8, 12, which are shards 0..3 of 4. Each task usually sees one GPU (cuda:0).
- ``--device auto`` (the default) is the local-rank GPU when torch sees one, else the CPU.

Every process writes its own ``<out stem>.shard<i>of<n>.h5``; ``mner-features merge`` joins them (the
command to run is printed when a shard finishes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from mner.features.run.sharding import ShardError, env_int


def resolve_device(
    device: str, env: Mapping[str, str] | None = None, *, cuda_count: int | None = None
) -> str:
    """``auto`` -> ``cuda:<LOCAL_RANK>`` when a GPU is visible, else ``cpu``; ``cuda`` takes the local rank.

    An explicit ``cuda:N`` is kept, but under torchrun it must match LOCAL_RANK (every rank on one GPU
    is the mistake this guards against)."""
    env = os.environ if env is None else env
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local_rank = env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else None
    if device == "auto":
        if cuda_count == 0:
            return "cpu"
        device = "cuda"
    if device == "cuda":
        index = local_rank or 0
        if index >= max(cuda_count, 1) or cuda_count == 0:
            raise ShardError(
                f"--device cuda: LOCAL_RANK {index} but torch sees {cuda_count} GPU(s); "
                "use --nproc-per-node <= the GPU count, or --device cpu"
            )
        return f"cuda:{index}"
    if device.startswith("cuda:"):
        index = int(device.split(":", 1)[1]) if device.split(":", 1)[1].isdigit() else -1
        if not 0 <= index < cuda_count:
            raise ShardError(
                f"--device {device}: torch sees {cuda_count} GPU(s) (valid: auto, cpu, cuda, "
                f"cuda:0..{max(cuda_count - 1, 0)})"
            )
        if local_rank is not None and index != local_rank:
            raise ShardError(
                f"--device {device} under torchrun LOCAL_RANK {local_rank}: every rank would share "
                "one GPU; use --device auto (or cuda) to take the local rank's GPU"
            )
        return device
    if device in ("cpu", "mps") or device.startswith("mps"):
        return device
    raise ShardError(f"--device {device!r}; valid: auto, cpu, cuda, cuda:N, mps")


def merge_hint(out: str, count: int) -> str:
    """What to run once every shard has finished."""
    from pathlib import Path

    path = Path(out)
    pattern = path.with_name(f"{path.stem}.shard*of{count}{path.suffix or '.h5'}")
    return f"when all {count} shards are written: mner-features merge {pattern} --out {out}"
