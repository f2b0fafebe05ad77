"""One background thread for writes the caller need not wait for: stage 1's JPEG crops and chunk files,
stage 2's epoch checkpoints (which then overlap the next epoch)."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor


class BackgroundWriter:
    """Jobs run one at a time, in submission order, on one thread.

    ``submit`` blocks while ``pending`` jobs are unfinished (back-pressure: the caller waits when the
    writer falls behind) and returns the job's Future. ``wait`` blocks until every job has finished and
    re-raises the first error not yet read through its Future. ``close`` waits and stops the thread."""

    def __init__(self, pending: int = 256, *, name: str = "mner-writer"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(pending)
        self._unread: list[Future] = []  # jobs whose outcome ``wait`` has still to check

    def submit(self, function, *args, **kwargs) -> Future:
        self._slots.acquire()
        future = self._pool.submit(function, *args, **kwargs)
        future.add_done_callback(lambda _: self._slots.release())
        self._unread = [f for f in self._unread if not f.done() or f.exception() is not None]
        self._unread.append(future)
        return future

    def wait(self) -> None:
        unread, self._unread = self._unread, []
        errors = [error for future in unread if (error := future.exception()) is not None]  # blocks until done
        if errors:
            raise errors[0]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
