"""Exact provenance of model weights: which named weights, which file, its sha256, which hub revision.

"library default" says nothing a year later; the enum name and the hash of the file actually loaded
do. Every helper returns plain JSON-able dicts for the group's provenance.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from mner.pipeline.hashing import sha256_tag


def torchvision_checkpoint(weights) -> dict:
    """A torchvision weights enum member -> its name, the cached checkpoint file it loads and that file's hash.

    torchvision loads ``<torch hub dir>/checkpoints/<basename of weights.url>``; hashing that file after
    the model is built hashes exactly the bytes that were loaded.
    """
    import torch

    name = f"{type(weights).__name__}.{weights.name}"
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not path.is_file():
        return {"weights": name, "url": weights.url, "checkpoint": None, "sha256": None,
                "note": f"checkpoint not found at {path} after loading"}
    return {"weights": name, "url": weights.url, "checkpoint": str(path), "sha256": sha256_tag(path)}


def pretrained_tag(checkpoint: dict) -> str:
    """The short ``pretrained`` provenance value: ``<Enum.NAME> sha256:<hex>``."""
    return " ".join(v for v in (checkpoint.get("weights"), checkpoint.get("sha256")) if v)


def open_clip_checkpoint(model: str, tag: str) -> dict:
    """The open_clip tag and the cached file it loaded (already downloaded when the model was built)."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    config = open_clip.get_pretrained_cfg(model, tag)
    if not config:
        return {"tag": tag, "checkpoint": None, "sha256": None, "note": "no such open_clip tag"}
    try:
        path = download_pretrained(config)
    except Exception as error:
        return {"tag": tag, "checkpoint": None, "sha256": None, "note": f"cannot resolve the file: {error}"}
    return {"tag": tag, "checkpoint": str(path), "sha256": sha256_tag(path)}


def hf_revision(model) -> dict:
    """A transformers model loaded from the hub -> its repo and the commit hash that was loaded."""
    config = model.config
    source = getattr(config, "_name_or_path", "")
    revision = getattr(config, "_commit_hash", None)
    if source and Path(source).is_dir():
        files = sorted(p for p in Path(source).iterdir() if p.suffix in (".safetensors", ".bin"))
        return {"source": str(Path(source).resolve()), "revision": "local folder",
                "sha256": {p.name: sha256_tag(p) for p in files}}
    return {"source": source, "revision": revision}
