"""sha256 of files, read in blocks: the one implementation behind image fingerprints, weights tags,
crop-file and detector-config hashes and the text encoder's weights fingerprint (both stages use it)."""

from __future__ import annotations

import hashlib
import os

BLOCK_BYTES = 1 << 20  # read size; any size gives the same digest


def update_from_file(digest, path: str | os.PathLike):
    """Feed a file's bytes into ``digest`` (a hashlib object) without reading it whole; returns ``digest``."""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest


def sha256_hex(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes."""
    return update_from_file(hashlib.sha256(), path).hexdigest()


def sha256_tag(path: str | os.PathLike) -> str:
    """``sha256:<hex>``: how provenance records a local weights, config or input file."""
    return "sha256:" + sha256_hex(path)
