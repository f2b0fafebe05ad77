"""Deprecated import path, kept while other branches move to ``mner.pipeline.cache``.

Everything here is re-exported from the package. ``CacheWriter`` keeps the schema-1 behaviour of
writing only the datasets it is given (``partial=True``); new code uses ``mner.pipeline.cache``.
"""

from mner.pipeline.cache import *  # noqa: F403
from mner.pipeline.cache import CacheWriter as _CacheWriter
from mner.pipeline.cache import __all__ as _ALL
from mner.pipeline.cache.merge import MERGE_IN_MEMORY_BYTES  # noqa: F401


class CacheWriter(_CacheWriter):
    """``mner.pipeline.cache.CacheWriter`` with ``partial=True`` (schema-1 callers write some datasets)."""

    def __init__(self, path, *, overwrite: bool = False, partial: bool = True, lock_timeout_s: float = 0.0):
        super().__init__(path, overwrite=overwrite, partial=partial, lock_timeout_s=lock_timeout_s)


__all__ = list(_ALL)
