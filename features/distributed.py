"""Which shard and which device a process takes: ``--shard``/``--device``, torchrun, SLURM arrays.

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
from typing import Mapping


class ShardError(ValueError):
    """The environment or the options name an impossible shard or device."""


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ShardError(f"{name}={env[name]!r} is not an integer") from None


def resolve_shard(shard: tuple[int, int] | None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """--shard, else torchrun's RANK/WORLD_SIZE, else a SLURM array task (with its step), else (0, 1)."""
    env = os.environ if env is None else env
    if shard is not None:
        index, count = shard
        source = "--shard"
    elif "WORLD_SIZE" in env and "RANK" in env:
        index, count = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        source = "RANK/WORLD_SIZE (torchrun)"
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        task, count = _int(env, "SLURM_ARRAY_TASK_ID"), _int(env, "SLURM_ARRAY_TASK_COUNT")
        first = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = _int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        if step < 1 or (task - first) % step:
            raise ShardError(f"SLURM array task {task} is not on the grid {first}, {first + step}, ... "
                             f"(step {step}); use an evenly stepped --array=A-B[:S] or pass --shard i/n")
        index = (task - first) // step
        source = f"SLURM array task {task} (min {first}, step {step}, count {count})"
    else:
        return 0, 1
    if count < 1 or not 0 <= index < count:
        raise ShardError(f"shard {index}/{count} from {source}: the index must be in 0..{max(count - 1, 0)}")
    return index, count


def resolve_device(device: str, env: Mapping[str, str] | None = None, *, cuda_count: int | None = None) -> str:
    """``auto`` -> ``cuda:<LOCAL_RANK>`` when a GPU is visible, else ``cpu``; ``cuda`` gets the local rank too.

    An explicit ``cuda:N`` is kept, but under torchrun it must match LOCAL_RANK (every rank on one GPU
    is the mistake this guards against)."""
    env = os.environ if env is None else env
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else None
    if device == "auto":
        if cuda_count == 0:
            return "cpu"
        device = "cuda"
    if device == "cuda":
        index = local_rank or 0
        if index >= max(cuda_count, 1) or cuda_count == 0:
            raise ShardError(f"--device cuda: LOCAL_RANK {index} but torch sees {cuda_count} GPU(s); "
                             "use --nproc-per-node <= the GPU count, or --device cpu")
        return f"cuda:{index}"
    if device.startswith("cuda:"):
        index = int(device.split(":", 1)[1]) if device.split(":", 1)[1].isdigit() else -1
        if not 0 <= index < cuda_count:
            raise ShardError(f"--device {device}: torch sees {cuda_count} GPU(s) (valid: auto, cpu, cuda, "
                             f"cuda:0..{max(cuda_count - 1, 0)})")
        if local_rank is not None and index != local_rank:
            raise ShardError(f"--device {device} under torchrun LOCAL_RANK {local_rank}: every rank would share "
                             "one GPU; use --device auto (or cuda) to take the local rank's GPU")
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
