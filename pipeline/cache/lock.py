"""One writer per cache: a lock file next to the cache covering the cache and its ``.parts`` folder.

``<cache>.lock`` is created with O_CREAT|O_EXCL (atomic on local and NFS file systems) and holds the
holder's host, pid, start time and a random token. While held, a daemon thread touches it every
``heartbeat_s`` seconds. Another writer finds it stale when the holder is a dead pid on the same host,
or, on any host, when its mtime is older than ``stale_after_s`` measured with the file system's own
clock (no clock skew between hosts). A stale lock is taken over by renaming it away; a live one gives
:class:`CacheLockedError` naming the holder.

The lock is re-entrant within a process: the extraction loop holds it over its whole run, and the
``CacheWriter`` it opens inside reuses it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time

from mner.pipeline.cache.base import CacheError
from mner.pipeline.cache.provenance import utc_now

HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0

_HELD: dict[str, CacheLock] = {}  # absolute cache path -> the lock this process holds
_HELD_GUARD = threading.Lock()


class CacheLockedError(CacheError):
    """Another live process is writing this cache."""


def host_name() -> str:
    return socket.gethostname() or "unknown-host"


def temp_suffix() -> str:
    """``<host>-<pid>``: temp names that cannot collide between hosts sharing a file system."""
    return f"{host_name()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fs_now(folder: str) -> float:
    """The file system's clock, read from the mtime of a freshly written probe file."""
    probe = os.path.join(folder, f".mner-clock-{temp_suffix()}-{secrets.token_hex(4)}")
    try:
        with open(probe, "w"):
            pass
        return os.stat(probe).st_mtime
    except OSError:
        return time.time()
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)


def read_holder(lock_path: str) -> dict | None:
    """The lock's record plus ``age_s`` (seconds since its last heartbeat), or None when absent."""
    try:
        with open(lock_path, encoding="utf-8") as handle:
            text = handle.read()
        mtime = os.stat(lock_path).st_mtime
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError:  # a writer killed between create and write
        record = {"host": "?", "pid": -1, "started": "?", "token": None}
    record["age_s"] = max(0.0, fs_now(os.path.dirname(lock_path) or ".") - mtime)
    return record


def describe_holder(record: dict) -> str:
    return (
        f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')} "
        f"(last heartbeat {record.get('age_s', 0):.0f} s ago)"
    )


class CacheLock:
    """``with CacheLock(cache_path):`` -- exclusive right to write ``cache_path`` and ``cache_path.parts``."""

    def __init__(
        self,
        cache_path: str | os.PathLike,
        *,
        timeout_s: float = 0.0,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
        what: str = "cache",
    ):
        self.cache_path = os.path.abspath(os.fspath(cache_path))
        self.what = what  # "cache" or "run folder": named in the refusal
        self.path = f"{self.cache_path}.lock"
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.token: str | None = None
        self.record: dict | None = None
        self._depth = 0
        self._owner: CacheLock | None = None  # the outer lock when re-entered in this process
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # acquire / release ------------------------------------------------------------------------------
    def acquire(self) -> CacheLock:
        with _HELD_GUARD:
            outer = _HELD.get(self.cache_path)
            if outer is not None and outer.record and outer.record["pid"] == os.getpid():
                outer._depth += 1
                self._owner = outer
                return self
        deadline = time.monotonic() + self.timeout_s
        while True:
            if self._try_create():
                break
            holder = read_holder(self.path)
            if holder is None:
                continue  # released between our attempt and the read
            if self._is_stale(holder):
                self._break(holder)
                continue
            if time.monotonic() >= deadline:
                raise CacheLockedError(
                    f"{self.cache_path} is being written by {describe_holder(holder)}; lock file {self.path}. "
                    f"Wait for that run to finish (one writer per {self.what}), or write to another --out. "
                    f"If that process is gone, the lock is taken over {self.stale_after_s:.0f} s after its last "
                    "heartbeat (at once on the same host)."
                )
            time.sleep(min(1.0, self.heartbeat_s / 2))
        self._depth = 1
        with _HELD_GUARD:
            _HELD[self.cache_path] = self
        self._thread = threading.Thread(
            target=self._beat, name=f"mner-lock-{os.path.basename(self.path)}", daemon=True
        )
        self._thread.start()
        return self

    def release(self) -> None:
        if self._owner is not None:
            self._owner._depth -= 1
            self._owner = None
            return
        if self._depth == 0:
            return
        self._depth = 0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with _HELD_GUARD:
            if _HELD.get(self.cache_path) is self:
                del _HELD[self.cache_path]
        if self.holds():
            os.remove(self.path)

    def __enter__(self) -> CacheLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # state -------------------------------------------------------------------------------------------
    def holds(self) -> bool:
        """True while the lock file on disk is still ours (nobody judged it stale and took it)."""
        lock = self._owner or self
        try:
            with open(lock.path, encoding="utf-8") as handle:
                return json.load(handle).get("token") == lock.token
        except (OSError, json.JSONDecodeError):
            return False

    def ensure_held(self) -> None:
        """Raise before a final rename when another process took the lock over."""
        if not self.holds():
            holder = read_holder(self.path)
            raise CacheLockedError(
                f"lost the write lock on {self.cache_path}"
                + (f" to {describe_holder(holder)}" if holder else "")
                + " (heartbeats stopped for longer than the stale limit?); nothing was written. Re-run."
            )

    # internals ---------------------------------------------------------------------------------------
    def _try_create(self) -> bool:
        self.token = secrets.token_hex(16)
        self.record = {
            "host": host_name(),
            "pid": os.getpid(),
            "started": utc_now(),
            "token": self.token,
            "cache": self.cache_path,
        }
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _is_stale(self, holder: dict) -> bool:
        if holder.get("host") == host_name() and isinstance(holder.get("pid"), int) and holder["pid"] > 0:
            if holder["pid"] == os.getpid():
                return False  # ours (another CacheLock object of this process not registered): never break
            return not pid_alive(holder["pid"])
        return holder.get("age_s", 0.0) > self.stale_after_s

    def _break(self, holder: dict) -> None:
        """Rename the stale lock away; put it back if it turned out to be a fresh one (lost race)."""
        aside = f"{self.path}.stale-{temp_suffix()}-{secrets.token_hex(4)}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            with open(aside, encoding="utf-8") as handle:
                token = json.load(handle).get("token")
        except (OSError, json.JSONDecodeError):
            token = holder.get("token")
        if token != holder.get("token"):  # someone replaced the stale lock meanwhile: restore theirs
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        os.remove(aside)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.holds():
                self.lost = True
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)


def held_lock(cache_path: str | os.PathLike) -> CacheLock | None:
    """The lock this process holds on ``cache_path``, if any."""
    with _HELD_GUARD:
        return _HELD.get(os.path.abspath(os.fspath(cache_path)))
