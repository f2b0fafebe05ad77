"""What a run records about itself: code and library versions, the text encoder's weights, the
feature cache it read (fingerprints and image coverage), so a number can be traced to its inputs."""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

from mner.trainer.core.config import ConfigError


def git_commit(start: Path | None = None) -> str | None:
    """The commit of the mner checkout this code runs from (with ``+dirty`` when it has local changes)."""
    folder = start or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def software_versions() -> dict:
    import torch
    import transformers

    try:
        from importlib.metadata import version

        mner_version = version("mner")
    except Exception:
        mner_version = None
    try:
        import accelerate

        accelerate_version = accelerate.__version__
    except ImportError:
        accelerate_version = None
    return {
        "mner": mner_version, "git_commit": git_commit(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate_version,
        "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


# ----------------------------------------------------------------------------- the feature cache


def check_coverage(coverage: dict[str, dict[str, int]], *, cache_path: str, max_share: float, what: str) -> None:
    """Refuse a split in which more than ``max_share`` of the posts name an image the cache does not hold."""
    for split, counts in coverage.items():
        posts = counts["total"]
        absent = counts["not_in_cache"]
        if posts and absent / posts > max_share:
            raise ConfigError(
                f"{split}: {absent} of {posts} posts ({100 * absent / posts:.1f}%) name an image that is not in "
                f"{cache_path} (more than {100 * max_share:g}%): pass the cache built from these posts' images "
                f"with --features, add them with `mner-features extract`, or accept zero visual input for them "
                f"with --allow-missing-images ({what})"
            )


def cache_record(cache, splits: dict[str, Iterable]) -> dict:
    """Path, fingerprints (stored at write time) and per-split image coverage (ok / placeholder /
    missing / unreadable / not_in_cache / no_image posts) of a cache, for config.json, metrics.json
    and evaluation outputs."""
    return {
        "path": str(Path(cache.path).resolve()),
        "fingerprint": cache.fingerprint,
        "groups": cache.group_fingerprints(),
        "coverage": {split: cache.image_coverage([p.image_id for p in posts]) for split, posts in splits.items()},
    }


def short_fingerprint(fingerprint: str | None) -> str:
    return (fingerprint or "none").split(":")[-1][:8]


# ----------------------------------------------------------------------------- per-image fingerprints


def _value_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (str, int)):
        return str(value).encode("utf-8")
    if isinstance(value, list):
        return b"\0".join(_value_bytes(v) for v in value) + f"#{len(value)}".encode()
    import numpy as np

    array = np.ascontiguousarray(value)
    return f"{array.dtype.str}{array.shape}".encode() + array.tobytes()


def image_fingerprints(cache, paths: Iterable[str], image_ids: Iterable[str | None]) -> dict[str, str]:
    """sha256[:16] per image id of everything a model reads for it: its status and its rows of ``paths``.

    A grown cache (``mner-features extract`` with more posts) keeps these for the old images, so runs
    recognise it as a superset whose old rows are unchanged, while its whole-cache fingerprint changed.
    Ids the cache does not hold are left out."""
    import hashlib

    paths = sorted(dict.fromkeys(p.strip("/") for p in paths))
    row_of = {image_id: row for row, image_id in enumerate(cache.image_ids)}
    out = {}
    for image_id in sorted({i for i in image_ids if i and i in row_of}):
        row = row_of[image_id]
        digest = hashlib.sha256(f"status={int(cache.status[row])}".encode())
        for path in paths:
            value = cache.read(path, row)
            if cache.rows_kind(path) == "offsets":  # an index: its count, not where the rows sit in the file
                value = int(value[1] - value[0])
            digest.update(path.encode() + b"=" + _value_bytes(value))
        out[image_id] = digest.hexdigest()[:16]
    return out


def same_image_rows(stored: dict | None, cache) -> tuple[bool, str]:
    """Whether ``cache`` holds every image of a run's record (``features.image_fingerprints``) with the same
    rows; and a sentence saying so (or how many images are absent or changed)."""
    if not stored or not stored.get("rows"):
        return False, "the run recorded no per-image fingerprints"
    now = image_fingerprints(cache, stored["paths"], stored["rows"])
    absent = [i for i in stored["rows"] if i not in now]
    changed = [i for i in stored["rows"] if i in now and now[i] != stored["rows"][i]]
    if absent or changed:
        return False, (f"{len(changed)} of the run's {len(stored['rows'])} images have other rows, "
                       f"{len(absent)} are absent")
    return True, (f"it holds the run's {len(stored['rows'])} images with unchanged rows "
                  f"(a superset: {cache.num_images} images)")
