"""Which images a process extracts: ``--shard i/n``, torchrun's RANK/WORLD_SIZE or a SLURM array.

The assignment depends only on the id (sha1), so shards of one run are disjoint and their union is
every id; each shard writes ``<out stem>.shard<i>of<n>.h5`` and ``mner-features merge`` joins them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def shard_of(image_id: str, count: int) -> int:
    """Deterministic shard of an id: independent of the id list, the process and the Python hash seed."""
    return int.from_bytes(hashlib.sha1(image_id.encode("utf-8")).digest()[:8], "big") % count


def resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    """--shard, else torchrun's RANK/WORLD_SIZE, else a SLURM array's task id/count, else (0, 1)."""
    if shard is not None:
        index, count = shard
    elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        index, count = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    elif "SLURM_ARRAY_TASK_ID" in os.environ and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        index, count = int(os.environ["SLURM_ARRAY_TASK_ID"]) - first, int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    else:
        index, count = 0, 1
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must be in 0..{count - 1}")
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
