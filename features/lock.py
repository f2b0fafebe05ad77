"""The cache's writer lock as the extraction loop uses it.

Uses ``mner.pipeline.cache.CacheLock`` (issue 7a) when present; until then a small stand-in:
an ``O_EXCL`` lock file ``<out>.lock`` naming host, pid and start time, stale only when it names this
host and a dead pid (another host's lock is never broken silently).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket


class CacheLockedError(RuntimeError):
    """Another process writes this cache."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def cache_lock(path: str):
    lock = f"{path}.lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock)), exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                with open(lock, encoding="utf-8") as handle:
                    holder = json.load(handle)
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
                os.remove(lock)  # stale: its process is gone
                continue
            raise CacheLockedError(
                f"{path} is being written by host {holder.get('host', '?')} pid {holder.get('pid', '?')} "
                f"since {holder.get('started', '?')} (lock {lock}); wait for it to finish, or remove the lock "
                "file if that process is gone") from None
    else:
        raise CacheLockedError(f"{path}: could not take the lock {lock}")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(me, handle)
    try:
        yield me
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
