"""Issue 7 point 1 / build 4: one writer per cache, across processes and hosts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from mner.pipeline.cache import CacheLock, CacheLockedError, CacheWriter, FeatureCache
from mner.pipeline.cache.tiny import tiny_group, write_tiny_cache

HOLDER = """
import sys
from mner.pipeline.cache import CacheWriter
from mner.pipeline.cache.tiny import tiny_group
with CacheWriter(sys.argv[1]) as writer:
    tiny_group(writer, "encoders/swin/tiny")
    print(writer.temp_path, flush=True)
    sys.stdin.readline()  # hold the lock until the test says go
"""


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    path = tmp_path / "c.h5"
    write_tiny_cache(path, ["objects/tiny"])
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        temp = holder.stdout.readline().strip()
        assert temp.endswith(f".tmp-{socket.gethostname()}-{holder.pid}")  # temp names carry host and pid
        with pytest.raises(CacheLockedError) as error, CacheWriter(path) as writer:
            tiny_group(writer, "encoders/resnet/tiny")
        message = str(error.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and "started 20" in message
        assert os.path.exists(temp)  # the refused writer touched nothing of the holder's
    finally:
        holder.communicate("go\n", timeout=60)
    assert holder.returncode == 0
    with CacheWriter(path) as writer:  # the lock is free again; both groups survive
        tiny_group(writer, "encoders/resnet/tiny")
    assert {"encoders/swin/tiny", "encoders/resnet/tiny"} <= set(FeatureCache(path).groups())
    assert not os.path.exists(f"{path}.lock")


def _write_lock(path, **record) -> str:
    lock = f"{path}.lock"
    with open(lock, "w") as handle:
        json.dump(
            {
                "host": socket.gethostname(),
                "pid": 1,
                "started": "2026-01-01T00:00:00+00:00",
                "token": "t",
                **record,
            },
            handle,
        )
    return lock


def test_stale_locks_are_taken_over_live_ones_are_not(tmp_path):
    path = tmp_path / "c.h5"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(path, pid=dead.pid)  # same host, dead pid: stale at once
    with CacheLock(path) as lock:
        assert lock.holds()
    lock_file = _write_lock(path, host="other-node", pid=os.getpid())  # another host, fresh heartbeat
    with pytest.raises(CacheLockedError, match="host other-node"):
        CacheLock(path).acquire()
    old = time.time() - 3600  # another host, no heartbeat for an hour: stale
    os.utime(lock_file, (old, old))
    with CacheLock(path, stale_after_s=120) as lock, open(lock_file) as handle:
        assert json.load(handle)["host"] == socket.gethostname()
    assert not os.path.exists(lock_file)


def test_heartbeat_and_reentry(tmp_path):
    path = tmp_path / "c.h5"
    with CacheLock(path, heartbeat_s=0.05) as lock:
        first = os.stat(lock.path).st_mtime
        time.sleep(0.3)
        assert os.stat(lock.path).st_mtime > first  # refreshed while the holder runs
        write_tiny_cache(path, ["encoders/swin/tiny"])  # the extraction loop's CacheWriter reuses its lock
        assert os.path.exists(lock.path)
    assert not os.path.exists(lock.path)
