"""Which images a process extracts: ``--shard i/n``, torchrun's RANK/WORLD_SIZE or a SLURM array
(``--array=0-15:4`` has tasks 0, 4, 8, 12: shards 0..3 of 4; see also ``distributed.py``).

The assignment depends only on the id (sha1), so shards of one run are disjoint and their union is
every id; each shard writes ``<out stem>.shard<i>of<n>.h5`` and ``mner-features merge`` joins them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path


def shard_of(image_id: str, count: int) -> int:
    """Deterministic shard of an id: independent of the id list, the process and the Python hash seed."""
    return int.from_bytes(hashlib.sha1(image_id.encode("utf-8")).digest()[:8], "big") % count


class ShardError(ValueError):
    """The environment or the options name an impossible shard or device."""


def env_int(env: Mapping[str, str], name: str) -> int:
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
        index, count = env_int(env, "RANK"), env_int(env, "WORLD_SIZE")
        source = "RANK/WORLD_SIZE (torchrun)"
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        task, count = env_int(env, "SLURM_ARRAY_TASK_ID"), env_int(env, "SLURM_ARRAY_TASK_COUNT")
        first = env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
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


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    return resolve_shard((index, count))


def shard_out_path(out: str, index: int, count: int) -> str:
    if count == 1:
        return out
    path = Path(out)
    return str(path.with_name(f"{path.stem}.shard{index}of{count}{path.suffix or '.h5'}"))
