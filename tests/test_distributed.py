"""Shard and device resolution under torchrun and SLURM arrays (env vars only, no GPU needed)."""

from __future__ import annotations

import re

import pytest

from mner.features.run.distributed import merge_hint
from mner.features.run.sharding import ShardError, resolve_shard
from mner.pipeline.devices import DeviceError, resolve_device


def test_explicit_shard_wins_over_the_environment():
    assert resolve_shard((1, 3), {"RANK": "0", "WORLD_SIZE": "2"}) == (1, 3)
    assert resolve_shard(None, {}) == (0, 1)
    with pytest.raises(ShardError, match=re.escape("0..2")):
        resolve_shard((3, 3), {})


def test_torchrun_rank_is_the_shard_and_local_rank_the_gpu():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert resolve_shard(None, env) == (5, 8)
    assert resolve_device("auto", env, cuda_count=4) == "cuda:1"
    assert resolve_device("cuda", env, cuda_count=4) == "cuda:1"
    with pytest.raises(DeviceError, match="share"):
        resolve_device("cuda:0", env, cuda_count=4)  # every rank on cuda:0 is refused
    with pytest.raises(DeviceError, match="GPU"):
        resolve_device("cuda", {"LOCAL_RANK": "4"}, cuda_count=4)


def test_a_rank_that_sees_one_gpu_takes_it_whatever_its_local_rank():
    """torchrun / SLURM with one GPU per rank: rank 1 sees its GPU as cuda:0 (issue 19, point 5)."""
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert resolve_device("auto", env, cuda_count=1) == "cuda:0"
    assert resolve_device("cuda", env, cuda_count=1) == "cuda:0"
    assert resolve_device("cuda:0", env, cuda_count=1) == "cuda:0"
    with pytest.raises(DeviceError, match="GPU"):
        resolve_device("cuda:1", env, cuda_count=1)


@pytest.mark.parametrize("task,expected", [(0, 0), (4, 1), (8, 2), (12, 3)])
def test_slurm_array_with_a_step(task, expected):
    env = {
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_MAX": "12",
        "SLURM_ARRAY_TASK_STEP": "4",
        "SLURM_ARRAY_TASK_COUNT": "4",
    }
    assert resolve_shard(None, env) == (expected, 4)


def test_slurm_array_offset_and_off_grid_tasks():
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert resolve_shard(None, env) == (2, 3)
    with pytest.raises(ShardError, match="not on the grid"):
        resolve_shard(None, dict(env, SLURM_ARRAY_TASK_STEP="2", SLURM_ARRAY_TASK_ID="8"))
    with pytest.raises(ShardError, match="not an integer"):
        resolve_shard(None, {"RANK": "x", "WORLD_SIZE": "2"})


def test_device_auto_without_gpu_and_bad_names():
    assert resolve_device("auto", {}, cuda_count=0) == "cpu"
    assert resolve_device("auto", {"LOCAL_RANK": "2"}, cuda_count=0) == "cpu"
    assert resolve_device("cpu", {"LOCAL_RANK": "2"}, cuda_count=4) == "cpu"
    with pytest.raises(DeviceError, match="valid: auto, cpu"):
        resolve_device("gpu", {}, cuda_count=1)
    with pytest.raises(DeviceError, match="sees 0 GPU"):
        resolve_device("cuda", {}, cuda_count=0)


def test_merge_hint_names_the_shard_files():
    assert merge_hint("cache/t15.h5", 4) == (
        "when all 4 shards are written: mner-features merge cache/t15.shard*of4.h5 --out cache/t15.h5"
    )
