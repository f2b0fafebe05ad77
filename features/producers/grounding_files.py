"""User-supplied grounding crops (``--grounding files``): HVPNeT crop folders + ``*_dict.pth``/JSON mappings.

HVPNeT distributes its visual-grounding crops as one folder per split plus a mapping per split, written
with ``torch.save``: ``{image file name: [crop file names]}``. ``load_crop_mapping`` reads and checks
every mapping before any compute (each problem names the file and the entry); ``FileGrounder`` then
turns an image's listed crops into rows like any other grounder's. The original picture is never
needed, so an image missing from ``--images`` keeps its crops.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mner.features.producers.grounding import (
    MAX_CROPS,
    Grounder,
    GroundingConfig,
    GroundingInput,
    GroundingRow,
    register_grounder,
    squash,
)
from mner.features.run.images import EXTENSIONS
from mner.pipeline.data import DataFormatError, read_json
from mner.pipeline.hashing import sha256_hex, sha256_tag


@dataclass
class CropMapping:
    """image id -> crop files, read from HVPNeT ``*_dict.pth`` or JSON mappings (see ``load_crop_mapping``)."""

    crops: dict[str, list[Path]]  # image id -> at most MAX_CROPS existing files, in mapping order
    files: dict[str, str]  # absolute mapping path -> sha256 of its bytes
    crops_sha256: str  # over the bytes of every crop file used, in image-id order
    unmatched_keys: int  # mapping entries naming no image of the dataset (other splits, other data)
    truncated: int  # images listing more than MAX_CROPS crops (the first ones are kept, as HVPNeT did)

    @property
    def mappings_sha256(self) -> str:
        """One tag for the mapping files, in --grounding-map order: what a rebuild checks (whatever the ids)."""
        return "sha256:" + hashlib.sha256("\n".join(self.files.values()).encode()).hexdigest()


def _read_mapping(path: Path) -> dict:
    if path.suffix in (".pth", ".pt"):
        import torch

        try:
            mapping = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise DataFormatError(path, None, f"not a readable torch file ({type(error).__name__}: {error})",
                                  "save the mapping with torch.save(dict) or write it as JSON") from None
    elif path.suffix == ".json":
        mapping = read_json(path, '{"<image file or id>": ["<crop file>", ...], ...}')
    else:
        raise DataFormatError(path, None, f"unknown mapping type {path.suffix!r}",
                              "use an HVPNeT *_dict.pth file or a .json file")
    if not isinstance(mapping, dict):
        raise DataFormatError(path, None, f"expected a dict from image file name to crop files, got "
                              f"{type(mapping).__name__}", 'write {"<image file or id>": ["<crop file>", ...]}')
    return mapping


def _image_id_of(key: str, ids: set[str]) -> str | None:
    """"1015799.jpg" (HVPNeT keys are file names) or "1015799" -> the dataset's image id, else None."""
    if key in ids:
        return key
    stem, suffix = os.path.splitext(key)
    return stem if suffix in EXTENSIONS and stem in ids else None


def load_crop_mapping(maps: list[str], crop_dirs: list[str], image_ids: list[str]) -> CropMapping:
    """Validate user-supplied crops before any work: every problem names the mapping file and the entry.

    A mapping is a dict ``{image file name or id: [crop file, ...]}``, in a ``.pth`` (HVPNeT's
    ``twitter2015_train_dict.pth``, written with ``torch.save``) or a ``.json`` file. Crop files are
    relative to the crops folder paired with the mapping (one folder for all mappings, one per mapping
    in the same order, or none: relative to the mapping's own folder); absolute paths are used as is.
    """
    if not maps:
        raise ValueError("--grounding files needs --grounding-map FILE (HVPNeT *_dict.pth or .json)")
    if len(crop_dirs) not in (0, 1, len(maps)):
        raise ValueError(f"--grounding-crops-dir given {len(crop_dirs)} times for {len(maps)} --grounding-map "
                         "files: give one folder for all, or one per mapping in the same order")
    ids = set(image_ids)
    crops: dict[str, list[Path]] = {}
    owner: dict[str, tuple[Path, str]] = {}
    files: dict[str, str] = {}
    unmatched = truncated = 0
    for index, map_name in enumerate(maps):
        path = Path(map_name)
        if not path.is_file():
            raise ValueError(f"--grounding-map {map_name}: no such file")
        folder = Path(crop_dirs[index if len(crop_dirs) > 1 else 0]) if crop_dirs else path.parent
        if not folder.is_dir():
            raise ValueError(f"--grounding-crops-dir {folder}: no such folder (crops of {path})")
        mapping = _read_mapping(path)
        files[os.path.abspath(path)] = sha256_tag(path)
        missing: list[str] = []
        for key, value in mapping.items():
            if not isinstance(key, str):
                raise DataFormatError(path, None, f"entry {key!r}: keys must be image file names or ids (strings)",
                                      "rewrite the mapping with string keys")
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
                    not all(isinstance(name, str) and name for name in value):
                raise DataFormatError(path, None, f"entry {key!r}: value must be a list of crop file names, got "
                                      f"{value!r:.80}", 'write "<image>": ["<crop file>", ...] ([] for none)')
            image_id = _image_id_of(key, ids)
            if image_id is None:
                unmatched += 1
                continue
            resolved = [folder / name for name in value[:MAX_CROPS]]
            if image_id in owner and crops[image_id] != resolved:
                first, first_key = owner[image_id]
                raise DataFormatError(path, None, f"entry {key!r}: image {image_id} also listed with other crops in "
                                      f"{first} (entry {first_key!r})", "keep one list per image")
            missing += [f"{key!r} -> {p}" for p in resolved if not p.is_file()]
            truncated += len(value) > MAX_CROPS
            crops[image_id], owner[image_id] = resolved, (path, key)
        if missing:
            raise DataFormatError(path, None, f"{len(missing)} listed crop files do not exist, e.g. {missing[0]}",
                                  "pass the crops folder with --grounding-crops-dir")
    if ids and not crops:
        raise ValueError(f"none of the entries of {', '.join(maps)} names an image of --data "
                         f"(e.g. {next(iter(sorted(ids)))}); keys are image file names (1015799.jpg) or ids")
    digest = hashlib.sha256()
    for image_id in sorted(crops):
        for crop in crops[image_id]:
            digest.update(f"{image_id}\0{crop.name}\0{sha256_hex(crop)}\n".encode())
    return CropMapping(crops, files, "sha256:" + digest.hexdigest(), unmatched, truncated)


@register_grounder("files")
class FileGrounder(Grounder):
    """User-supplied crops (HVPNeT layout); the original image is never needed."""

    method = "files"
    needs_image = False

    def __init__(self, config: GroundingConfig, mapping: CropMapping | None = None):
        super().__init__(config)
        self.mapping = mapping

    def bind(self, image_ids: list[str]) -> None:
        """Read and validate the mappings against the run's image ids (fails before any compute)."""
        self.mapping = load_crop_mapping(self.config.maps, self.config.crop_dirs, image_ids)

    def provenance_fields(self) -> dict:
        mapping = self.mapping
        return {"model": "user-supplied crops", "pretrained": mapping.mappings_sha256,
                "preprocessing": {"crops": f"squashed to {self.config.crop_size}x{self.config.crop_size} uint8 RGB",
                                  "mappings": mapping.files,
                                  "crop_dirs": [os.path.abspath(d) for d in self.config.crop_dirs]},
                "thresholds": {"max_crops": MAX_CROPS},
                # about the run's images, not the features: a cache grown later keeps the first run's
                "coverage": {"crops_sha256": mapping.crops_sha256, "unmatched_entries": mapping.unmatched_keys,
                             "images_over_three_crops_truncated": mapping.truncated}}

    def __call__(self, items: list[GroundingInput]) -> list[GroundingRow]:
        size = self.config.crop_size
        rows = []
        for item in items:
            files = self.mapping.crops.get(item.image_id)
            if files is None:
                rows.append(GroundingRow.empty("not_in_mapping", size))
                continue
            pixels = []
            for path in files:
                try:
                    with Image.open(path) as opened:
                        pixels.append(squash(opened, size))
                except Exception as error:
                    raise DataFormatError(path, None, f"crop of image {item.image_id} is unreadable "
                                          f"({type(error).__name__}: {error})", "replace or remove the file") from None
            k = len(pixels)
            rows.append(GroundingRow(np.stack(pixels) if k else np.zeros((0, 3, size, size), np.uint8),
                                     np.zeros((k, 4), np.float32), np.ones(k, np.float32), np.full(k, 3, np.uint8),
                                     np.full(k, -1, np.int16), [], "full" if k >= MAX_CROPS else "few_found"))
        return rows
