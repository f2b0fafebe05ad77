"""Image captions for ESPVR (group ``captions``): one UTF-8 caption per image, from BLIP or a user file.

ESPVR feeds BERT ``[CLS] text [SEP] caption [SEP]``; the caption is stored per image and tokenised by
the trainer. Two sources:

``blip``   a captioning model from transformers (``BlipForConditionalGeneration``), batched, greedy or
           beam search; ``--random-init`` builds a tiny random BLIP with an in-memory tokenizer.
``FILE``   a user file, JSONL (``{"image_id": "1015799", "caption": "a man on a stage"}`` per line) or
           TSV (``1015799<TAB>a man on a stage``; an optional first line ``image_id<TAB>caption``).
           Ids may carry the image file's extension (``1015799.jpg``). A malformed line fails the run
           with ``file:line``; the file's sha256 goes into provenance.

An empty caption is legal and means "no caption": the trainer adds no second segment for it. Images
that are not ok get ``""`` from the model (a gray placeholder has nothing to describe); a user file's
captions are kept whatever the image's status. ``reason`` says why a caption is empty.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mner.features.producers.hub import registrar
from mner.features.run.images import EXTENSIONS, LoadedImage
from mner.pipeline.data import DataFormatError

# captions/reason codes per image; 0 = "no_image": the zero row the loop gives an image that is not ok says so
REASON_NAMES = ("no_image", "ok", "empty", "not_in_file")
BLIP_DEFAULT = "Salesforce/blip-image-captioning-base"

CAPTIONERS: dict[str, Callable[..., Captioner]] = {}
register_captioner = registrar(CAPTIONERS)


@dataclass
class CaptionConfig:
    model: str = BLIP_DEFAULT  # blip: hub name or local folder
    random_init: bool = False  # blip: tiny random BLIP + in-memory tokenizer, nothing downloaded
    max_new_tokens: int = 30  # blip: longest caption in tokens
    num_beams: int = 3  # blip: 1 = greedy
    prompt: str = ""  # blip: conditional captioning prefix (e.g. "a picture of"); kept in the caption
    batch_size: int = 16  # blip: images per generate call
    device: str = "cpu"
    file: str | None = None  # file: the user's JSONL/TSV captions


@dataclass
class CaptionRow:
    text: str
    reason: str  # one of REASON_NAMES


def is_caption_file(value: str) -> bool:
    """``--captions X``: a model name unless X looks like a captions file (by extension or existence)."""
    return value not in CAPTIONERS and (Path(value).suffix in (".jsonl", ".tsv") or Path(value).is_file())


def create_captioner(value: str, config: CaptionConfig) -> Captioner:
    if is_caption_file(value):
        return FileCaptioner(CaptionConfig(**{**config.__dict__, "file": value}))
    if value not in CAPTIONERS:
        raise ValueError(f"--captions {value!r}; valid: {', '.join(CAPTIONERS)} or a captions file "
                         "(.jsonl or .tsv: image id, caption)")
    return CAPTIONERS[value](config)


class Captioner:
    """Base: ``__call__`` maps (image id, loaded image or None) pairs to one CaptionRow each, in order."""

    method = ""
    needs_image = True

    def __init__(self, config: CaptionConfig):
        self.config = config

    def __call__(self, items: list[tuple[str, LoadedImage | None]]) -> list[CaptionRow]:
        raise NotImplementedError

    def provenance_fields(self) -> dict:
        raise NotImplementedError


def tiny_blip_config(tokenizer):
    """A two-layer, 32-wide BLIP on 32x32 inputs: --random-init runs (random words, often empty)."""
    from transformers import BlipConfig

    from mner.features.producers.hub import TINY_TOWER, tokenizer_ids

    ids = tokenizer_ids(tokenizer)
    text = dict(TINY_TOWER, vocab_size=len(tokenizer), max_position_embeddings=64, encoder_hidden_size=32,
                sep_token_id=ids["eos_token_id"], **ids)
    vision = dict(TINY_TOWER, image_size=32, patch_size=16)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=32)


@register_captioner("blip")
class BlipCaptioner(Captioner):
    method = "blip"

    def __init__(self, config: CaptionConfig):
        super().__init__(config)
        import torch
        from transformers import BlipForConditionalGeneration, BlipImageProcessor

        from mner.features.producers.hub import load_parts

        if config.max_new_tokens < 1 or config.num_beams < 1 or config.batch_size < 1:
            raise ValueError("--caption-max-tokens, --caption-beams and --batch-size must be at least 1")
        parts = load_parts(BlipForConditionalGeneration, BlipImageProcessor, config.model,
                           random_init=config.random_init, tiny_config=tiny_blip_config, tiny_image_size=32,
                           tiny_label="2 layers, 32 wide, 32 px")
        self.tokenizer, self.model, self.processor = parts.tokenizer, parts.model, parts.processor
        self.model_name, self.pretrained = parts.model_name, parts.pretrained
        self.model.eval().to(config.device)
        self._torch = torch

    def provenance_fields(self) -> dict:
        c = self.config
        return {"model": self.model_name, "pretrained": self.pretrained,
                "preprocessing": {"image": "BlipImageProcessor", "prompt": c.prompt,
                                  "not_ok_images": "empty caption (reason no_image)"},
                "thresholds": {"max_new_tokens": c.max_new_tokens, "num_beams": c.num_beams,
                               "decoding": "greedy" if c.num_beams == 1 else "beam search"}}

    def __call__(self, items: list[tuple[str, LoadedImage | None]]) -> list[CaptionRow]:
        rows: list[CaptionRow] = [CaptionRow("", "no_image")] * len(items)
        todo = [i for i, (_, loaded) in enumerate(items) if loaded is not None and loaded.status == "ok"]
        for start in range(0, len(todo), self.config.batch_size):
            batch = todo[start:start + self.config.batch_size]
            for i, text in zip(batch, self._generate([items[i][1].image for i in batch])):
                rows[i] = CaptionRow(text, "ok" if text else "empty")
        return rows

    def _generate(self, images) -> list[str]:
        torch = self._torch
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.config.device)
        kwargs = {}
        if self.config.prompt:
            prompt = self.tokenizer([self.config.prompt] * len(images), return_tensors="pt")
            kwargs = {"input_ids": prompt["input_ids"].to(self.config.device),
                      "attention_mask": prompt["attention_mask"].to(self.config.device)}
        with torch.inference_mode():
            generated = self.model.generate(pixel_values=pixel_values, max_new_tokens=self.config.max_new_tokens,
                                            num_beams=self.config.num_beams, **kwargs)
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [" ".join(text.split()) for text in texts]


# ------------------------------------------------------------------------------------- the user file


@dataclass
class CaptionFile:
    path: str  # absolute
    sha256: str  # "sha256:<hex>" of the file's bytes
    format: str  # "jsonl" | "tsv"
    captions: dict[str, tuple[str, int]]  # id as written -> (caption, line)


def _image_key(image_id: str) -> str:
    stem, suffix = os.path.splitext(image_id)
    return stem if suffix in EXTENSIONS and suffix else image_id


def read_captions_file(path: str | Path) -> CaptionFile:
    """Parse a JSONL or TSV captions file; any malformed line raises DataFormatError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--captions {path}: no such file")
    data = path.read_bytes()
    fmt = "jsonl" if path.suffix in (".jsonl", ".json") else "tsv" if path.suffix in (".tsv", ".txt") else None
    if fmt is None:
        raise DataFormatError(path, None, f"unknown captions file type {path.suffix!r}",
                              "name it .jsonl (one JSON object a line) or .tsv (image id<TAB>caption)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataFormatError(path, line, "not UTF-8", "save the file as UTF-8") from None
    captions: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if fmt == "jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(path, number, f"invalid JSON ({error.msg})",
                                      'write {"image_id": "...", "caption": "..."} per line') from None
            if not isinstance(record, dict) or not isinstance(record.get("image_id"), (str, int)) \
                    or not isinstance(record.get("caption"), str):
                raise DataFormatError(path, number, 'each line needs a string "image_id" and a string "caption"',
                                      'write {"image_id": "...", "caption": "..."} ("" for no caption)')
            image_id, caption = str(record["image_id"]), record["caption"]
        else:
            if "\t" not in line:
                raise DataFormatError(path, number, "no tab between image id and caption",
                                      "write <image id><TAB><caption> per line")
            image_id, caption = line.split("\t", 1)
            if number == 1 and (image_id, caption) == ("image_id", "caption"):
                continue  # header
            if "\t" in caption:
                raise DataFormatError(path, number, "more than one tab", "write <image id><TAB><caption>, one tab")
        image_id, caption = image_id.strip(), " ".join(caption.split())
        if not image_id:
            raise DataFormatError(path, number, "empty image id", "every line starts with an image id")
        if image_id in captions and captions[image_id][0] != caption:
            raise DataFormatError(path, number, f"image {image_id} already has another caption on line "
                                  f"{captions[image_id][1]}", "keep one caption per image")
        captions[image_id] = (caption, number)
    return CaptionFile(os.path.abspath(path), "sha256:" + hashlib.sha256(data).hexdigest(), fmt, captions)


class FileCaptioner(Captioner):
    """Captions from the user's file; the original image is never needed."""

    method = "file"
    needs_image = False

    def __init__(self, config: CaptionConfig):
        super().__init__(config)
        self.file = read_captions_file(config.file)
        self.by_id = {_image_key(key): value for key, value in self.file.captions.items()}
        self.by_id.update(self.file.captions)  # an exact id wins over the extension-stripped one
        self.unused = 0

    def bind(self, image_ids: list[str]) -> None:
        """Check the file against the run's ids: none matching is an error; counts go into provenance."""
        ids = set(image_ids)
        used = {key for key in self.file.captions if key in ids or _image_key(key) in ids}
        if ids and not used:
            example = next(iter(self.file.captions), "<empty file>")
            raise ValueError(f"--captions {self.file.path}: none of its {len(self.file.captions)} image ids is an "
                             f"image of --data (e.g. {example!r} vs {sorted(ids)[0]!r})")
        self.unused = len(self.file.captions) - len(used)
        self.missing = sum(image_id not in self.by_id for image_id in ids)

    def provenance_fields(self) -> dict:
        return {"model": f"user file {self.file.path}", "pretrained": self.file.sha256,
                "preprocessing": {"format": self.file.format, "file": self.file.path,
                                  "lines": len(self.file.captions),
                                  "whitespace": "runs collapsed to one space"},
                "thresholds": {},
                # counts over the run's data, not the features: a cache grown later keeps the first run's
                "coverage": {"ids_not_in_data": self.unused, "images_without_caption": getattr(self, "missing", None)}}

    def __call__(self, items: list[tuple[str, LoadedImage | None]]) -> list[CaptionRow]:
        rows = []
        for image_id, _ in items:
            found = self.by_id.get(image_id)
            if found is None:
                rows.append(CaptionRow("", "not_in_file"))
            else:
                rows.append(CaptionRow(found[0], "ok" if found[0] else "empty"))
        return rows
