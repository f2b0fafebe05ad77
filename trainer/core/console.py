"""Progress and warnings on stderr (the first process only when several train together)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def log(message: str) -> None:
    """Progress and warnings on stderr, from the first process only when several train together."""
    if os.environ.get("RANK", "0") == "0":
        tqdm.write(message, file=sys.stderr)


def warn_loudly(message: str) -> None:
    bar = "!" * 78
    log(f"{bar}\nWARNING: {message}\n{bar}")
