"""The merge step after shards; which device a process takes is ``mner.pipeline.devices.resolve_device``
(``--device``, torchrun's LOCAL_RANK).

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


def merge_hint(out: str, count: int) -> str:
    """What to run once every shard has finished."""
    from pathlib import Path

    path = Path(out)
    pattern = path.with_name(f"{path.stem}.shard*of{count}{path.suffix or '.h5'}")
    return f"when all {count} shards are written: mner-features merge {pattern} --out {out}"
