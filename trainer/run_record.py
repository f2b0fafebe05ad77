"""What a run records about itself: code and library versions, the text encoder's weights, the
feature cache it read (fingerprints and image coverage), so a number can be traced to its inputs."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from mner.trainer.config import ConfigError

COVERAGE_KEYS = ("ok", "placeholder", "missing", "unreadable", "not_in_cache")


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
    except Exception:  # noqa: BLE001 - running from a source tree that is not installed
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


def _hash(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def group_fingerprints(cache) -> dict[str, str]:
    """Per-group checksums stored at write time (the cache API); for caches written before they were
    stored, a hash of each group's provenance and dataset shapes, marked ``legacy:``."""
    if hasattr(cache, "group_fingerprints"):
        return dict(cache.group_fingerprints())
    fingerprints = {}
    for group in sorted(cache.groups()):
        metas = {name: [str(kind), list(shape), str(dtype)]
                 for name, (kind, shape, dtype) in cache._meta.items() if name.startswith(group + "/")}
        fingerprints[group] = "legacy:" + _hash([cache.provenance(group), metas])[:32]
    return fingerprints


def cache_fingerprint(cache) -> str:
    if hasattr(cache, "fingerprint") and not callable(cache.fingerprint):
        return str(cache.fingerprint)
    return "legacy:" + _hash([group_fingerprints(cache), cache.image_ids, cache.status.tolist()])[:32]


def image_coverage(cache, image_ids: Sequence[str | None]) -> dict[str, int]:
    """Posts by the state of their image in the cache: ok / placeholder / missing / unreadable /
    not_in_cache, plus no_image (a post without an image id)."""
    counts = dict.fromkeys((*COVERAGE_KEYS, "no_image"), 0)
    named = [image_id for image_id in image_ids if image_id is not None]
    counts["no_image"] = len(image_ids) - len(named)
    if hasattr(cache, "image_coverage"):
        for key, value in cache.image_coverage(named).items():
            counts[key] = counts.get(key, 0) + int(value)
        return counts
    from mner.pipeline.feature_cache import STATUS_NAMES

    for image_id in named:
        try:
            row = cache.row_of(image_id)
        except KeyError:
            counts["not_in_cache"] += 1
            continue
        counts[STATUS_NAMES[int(cache.status[row])]] += 1
    return counts


def check_coverage(coverage: dict[str, dict[str, int]], *, cache_path: str, max_share: float, what: str) -> None:
    """Refuse a split in which more than ``max_share`` of the posts name an image the cache does not hold."""
    for split, counts in coverage.items():
        posts = sum(counts.values())
        absent = counts.get("not_in_cache", 0)
        if posts and absent / posts > max_share:
            raise ConfigError(
                f"{split}: {absent} of {posts} posts ({100 * absent / posts:.1f}%) name an image that is not in "
                f"{cache_path} (more than {100 * max_share:g}%): pass the cache built from these posts' images "
                f"with --features, add them with `mner-features extract`, or accept zero visual input for them "
                f"with --allow-missing-images ({what})"
            )


def cache_record(cache, splits: dict[str, Iterable]) -> dict:
    """Path, fingerprints and per-split image coverage of a cache, for config.json / metrics.json / eval files."""
    return {
        "path": str(Path(cache.path).resolve()),
        "fingerprint": cache_fingerprint(cache),
        "groups": group_fingerprints(cache),
        "coverage": {split: image_coverage(cache, [p.image_id for p in posts]) for split, posts in splits.items()},
    }


def short_fingerprint(fingerprint: str | None) -> str:
    return (fingerprint or "none").split(":")[-1][:8]
