"""Visual-grounding crops (MGIPS-CL, after HVPNeT): at most three 128x128 crops per image, stored as pixels.

MGIPS-CL (sec. 3.1.2) takes "three visual grounding images" of 128x128 per post, each cut into 4x4
patches of 32. HVPNeT, where those crops come from, parsed noun phrases with NLTK and sent each one as
its own query to a one-stage grounding model. Three ways to make them:

``owlv2``     a text-conditioned detector (OWLv2) queried per image with the post's capitalised spans
              (each span its own query, like HVPNeT's nouns) plus entity-type phrases; the best three
              boxes after NMS. With ``fill="objectness"`` (default) an image with fewer than three
              boxes above the threshold is topped up with OWLv2's own most object-like boxes (the
              detector's top objects, query-free), so the model sees three crops whenever the image has
              three distinct regions. ``source`` records which rule chose each crop.
``detector``  the top three objects of the cache's object detector (``objects`` group), no text.
``files``     crops a user already has: HVPNeT-style crop folders plus the ``*_dict.pth`` or JSON
              mapping from image file name to crop files (see ``load_crop_mapping``).

Every crop is squashed (no aspect-preserving crop, as the image encoders do) to ``crop_size`` squared
and stored as channel-first uint8 RGB pixels (3, S, S), so the trainer never opens the original image,
never decodes a JPEG and reads one fixed-shape slice per image. Images with fewer than three crops
simply have fewer rows; the batcher pads and masks. ``reason`` says why an image has fewer than three.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from mner.features.producers.hub import registrar
from mner.features.run.images import LoadedImage, crop_box

CROP_SIZE = 128  # MGIPS-CL: 128x128 crops, 4x4 patches of 32
MAX_CROPS = 3  # MGIPS-CL / HVPNeT: three grounding crops per image
SOURCE_NAMES = ("query", "objectness", "detector", "file")  # grounding/source codes: why a crop was chosen
# grounding/reason codes per image; 0 = "no_image": the zero row the loop gives an image that is not ok says so
REASON_NAMES = ("no_image", "full", "few_found", "not_in_mapping")
# One query per entity type (PER, LOC, ORG, MISC): lets an image without capitalised words still ground.
ENTITY_TYPE_QUERIES = ("a person", "a place", "an organization logo", "an object")
QUERY_RULES = ("spans", "words")
FILL_RULES = ("objectness", "none")
# Capitalised tokens that start a sentence or a retweet rather than name something.
SPAN_STOPWORDS = frozenset(
    [
        "rt", "i", "a", "an", "the", "my", "me", "we", "you", "he", "she", "it", "this", "that", "these", "those",
        "in", "on", "at", "of", "to", "and", "or", "but", "is", "are", "was", "for", "with", "from", "by", "via",
        "my", "our", "your", "his", "her", "their", "its",
    ]
)
OWLV2_DEFAULT = "google/owlv2-base-patch16-ensemble"

GROUNDERS: dict[str, Callable[..., Grounder]] = {}
register_grounder = registrar(GROUNDERS)


def create_grounder(name: str, config: GroundingConfig) -> Grounder:
    if name not in GROUNDERS:
        raise ValueError(f"--grounding {name!r}; valid: {', '.join(GROUNDERS)}")
    return GROUNDERS[name](config)


@dataclass
class GroundingConfig:
    model: str = OWLV2_DEFAULT  # owlv2: hub name or local folder
    random_init: bool = False  # owlv2: tiny random OWLv2 + in-memory tokenizer, nothing downloaded
    threshold: float = 0.1  # owlv2: a query box needs a probability above this (as HF's post-processing)
    nms_iou: float = 0.3  # boxes overlapping a kept one by more are dropped (owlv2 and the fill)
    fill: str = "objectness"  # owlv2: objectness (top up to three with query-free boxes) | none
    query_rule: str = "spans"  # spans (capitalised runs, one query each) | words (one query per word)
    entity_types: tuple[str, ...] = ENTITY_TYPE_QUERIES  # appended to every image's queries
    max_text_queries: int = 16  # at most this many span/word queries per image (first ones kept)
    crop_size: int = CROP_SIZE  # stored crops are crop_size x crop_size x 3 uint8
    batch_size: int = 8  # images per OWLv2 forward
    device: str = "cpu"
    maps: list[str] = field(default_factory=list)  # files: *_dict.pth / .json mappings
    crop_dirs: list[str] = field(default_factory=list)  # files: crop folders (one, or one per mapping)
    detector_model: str = ""  # detector: the objects group's model (provenance)


@dataclass
class GroundingInput:
    """One image: what any grounder may need. Boxes are in the loaded image's pixels."""

    image_id: str
    loaded: LoadedImage | None = None  # None when the grounder reads no image (files)
    texts: list[list[str]] = field(default_factory=list)  # tokens of every post showing this image
    detections: tuple[np.ndarray, np.ndarray] | None = None  # detector: (boxes (k,4) xyxy, scores (k,))


@dataclass
class GroundingRow:
    """One image's grounding crops (k <= MAX_CROPS rows)."""

    pixels: np.ndarray  # (k, 3, S, S) uint8 RGB, channel-first (CONTRACT-10: the model normalises)
    boxes: np.ndarray  # (k, 4) float32 xyxy in original-image pixels (zeros for file crops)
    scores: np.ndarray  # (k,) float32 (query or objectness probability, detector score, 1 for files)
    source: np.ndarray  # (k,) uint8 index into SOURCE_NAMES
    query_index: np.ndarray  # (k,) int16 index into ``queries`` (-1: not chosen by a query)
    queries: list[str]  # the queries sent for this image
    reason: str  # one of REASON_NAMES

    @staticmethod
    def empty(reason: str, size: int, queries: list[str] | None = None) -> GroundingRow:
        return GroundingRow(np.zeros((0, 3, size, size), np.uint8), np.zeros((0, 4), np.float32),
                            np.zeros(0, np.float32), np.zeros(0, np.uint8), np.zeros(0, np.int16),
                            list(queries or []), reason)


def stack_rows(rows: list[GroundingRow]) -> dict[str, np.ndarray | list[bytes]]:
    """Rows of a chunk -> flat arrays: ``counts`` and ``reason`` per image, the rest per crop.

    ``query`` is the UTF-8 text of the query that found each crop (b"" when no query chose it).
    """
    size = rows[0].pixels.shape[-1] if rows else CROP_SIZE
    return {
        "counts": np.array([len(r.scores) for r in rows], np.int64),
        "reason": np.array([REASON_NAMES.index(r.reason) for r in rows], np.uint8),
        "pixels": np.concatenate([r.pixels for r in rows]) if rows else np.zeros((0, 3, size, size), np.uint8),
        "boxes": np.concatenate([r.boxes for r in rows]).reshape(-1, 4).astype(np.float32),
        "scores": np.concatenate([r.scores for r in rows]).astype(np.float32),
        "source": np.concatenate([r.source for r in rows]).astype(np.uint8),
        "query": [(r.queries[q] if q >= 0 else "").encode("utf-8") for r in rows for q in r.query_index],
    }


def crop_mask(counts: np.ndarray, max_crops: int = MAX_CROPS) -> np.ndarray:
    """(n,) crop counts -> (n, max_crops) bool, True where a crop exists (padding slots are False)."""
    return np.arange(max_crops)[None, :] < np.asarray(counts)[:, None]


# ------------------------------------------------------------------------------------------ queries


def _clean(token: str) -> str:
    return token.lstrip("#@").strip(".,:;!?\"'()[]")


def _is_name(token: str) -> bool:
    word = _clean(token)
    return bool(word) and word[0].isupper() and not word.lower().startswith("http") \
        and word.lower() not in SPAN_STOPWORDS


def post_queries(tokens: list[str], rule: str = "spans") -> list[str]:
    """Text queries of one post: maximal runs of capitalised tokens ("spans") or each such token ("words").

    Capitals are how tweets mark names; no POS tagger ships offline, so this stands in for HVPNeT's NLTK
    noun phrases. ``#``/``@`` prefixes and edge punctuation are dropped; "RT", "The", "I", ... never start
    a span; URLs are skipped.
    """
    if rule not in QUERY_RULES:
        raise ValueError(f"query rule {rule!r}; valid: {', '.join(QUERY_RULES)}")
    queries: list[str] = []
    run: list[str] = []
    for token in [*tokens, ""]:
        if token and _is_name(token):
            run.append(_clean(token))
            continue
        if run:
            queries += [" ".join(run)] if rule == "spans" else run
        run = []
    return queries


def image_queries(texts: list[list[str]], config: GroundingConfig) -> list[str]:
    """Queries of every post showing the image (deduplicated ignoring case, first ones kept) + entity types."""
    seen: dict[str, str] = {}
    for tokens in texts:
        for query in post_queries(tokens, config.query_rule):
            seen.setdefault(query.lower(), query)
    return list(seen.values())[: config.max_text_queries] + list(config.entity_types)


# ------------------------------------------------------------------------------------------- pixels


def squash(picture: Image.Image, size: int) -> np.ndarray:
    """Any picture -> (3, size, size) uint8 RGB, aspect ratio not kept (objects at the border stay)."""
    resized = picture.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1))


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,4), (m,4) xyxy -> (n,m) IoU."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def greedy_pick(boxes: np.ndarray, scores: np.ndarray, *, limit: int, iou: float,
                kept: np.ndarray | None = None, min_score: float = -np.inf) -> list[int]:
    """Indices of at most ``limit`` boxes, best score first (ties: lower index), each overlapping neither a
    kept box nor an earlier pick by more than ``iou``; boxes not above ``min_score`` or with no area are skipped."""
    chosen: list[int] = []
    taken = np.zeros((0, 4), np.float32) if kept is None else kept.reshape(-1, 4)
    for index in np.argsort(-scores, kind="stable"):
        if len(chosen) >= limit or scores[index] <= min_score:
            break
        box = boxes[index:index + 1]
        if box[0, 2] - box[0, 0] <= 0 or box[0, 3] - box[0, 1] <= 0:
            continue
        if len(taken) and _box_iou(box, taken).max() > iou:
            continue
        chosen.append(int(index))
        taken = np.concatenate([taken, box])
    return chosen


# ------------------------------------------------------------------------------------------ grounders


class Grounder:
    """Base: ``__call__`` maps a list of GroundingInput to one GroundingRow each, in order."""

    method = ""
    needs_image = True  # False: rows do not depend on the original image (user files)

    def __init__(self, config: GroundingConfig):
        self.config = config

    def __call__(self, items: list[GroundingInput]) -> list[GroundingRow]:
        raise NotImplementedError

    def provenance_fields(self) -> dict:
        raise NotImplementedError

    def _rows_from_boxes(self, loaded: LoadedImage, boxes: np.ndarray, scores: np.ndarray, source: np.ndarray,
                         query_index: np.ndarray, queries: list[str]) -> GroundingRow:
        size = self.config.crop_size
        pixels = np.stack([squash(crop_box(loaded.image, box), size) for box in boxes]) if len(boxes) else \
            np.zeros((0, 3, size, size), np.uint8)
        reason = "full" if len(boxes) >= MAX_CROPS else "few_found"
        return GroundingRow(pixels, (boxes * np.float32(loaded.scale)).astype(np.float32).reshape(-1, 4),
                            scores.astype(np.float32), source.astype(np.uint8), query_index.astype(np.int16),
                            queries, reason)


def tiny_owlv2_config(tokenizer):
    """A two-layer, 32-wide OWLv2 on 64x64 inputs (16 patches = 16 candidate boxes): --random-init runs."""
    from transformers import Owlv2Config

    from mner.features.producers.hub import TINY_TOWER, tokenizer_ids

    text = dict(TINY_TOWER, vocab_size=len(tokenizer), max_position_embeddings=16, **tokenizer_ids(tokenizer))
    vision = dict(TINY_TOWER, image_size=64, patch_size=16)
    return Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)


@register_grounder("owlv2")
class Owlv2Grounder(Grounder):
    """OWLv2 queried with the posts' spans + entity types; boxes above ``threshold``, then the objectness fill."""

    method = "owlv2"

    def __init__(self, config: GroundingConfig):
        super().__init__(config)
        import torch
        from transformers import Owlv2ForObjectDetection, Owlv2ImageProcessor

        from mner.features.producers.hub import load_parts

        if config.fill not in FILL_RULES:
            raise ValueError(f"--grounding-fill {config.fill!r}; valid: {', '.join(FILL_RULES)}")
        if config.query_rule not in QUERY_RULES:
            raise ValueError(f"--grounding-queries {config.query_rule!r}; valid: {', '.join(QUERY_RULES)}")
        parts = load_parts(Owlv2ForObjectDetection, Owlv2ImageProcessor, config.model, random_init=config.random_init,
                           tiny_config=tiny_owlv2_config, tiny_image_size=64, tiny_label="2 layers, 32 wide, 64 px")
        self.tokenizer, self.model, self.processor = parts.tokenizer, parts.model, parts.processor
        self.model_name, self.pretrained = parts.model_name, parts.pretrained
        self.model.eval().to(config.device)
        self.max_length = self.model.config.text_config.max_position_embeddings
        self._torch = torch

    def provenance_fields(self) -> dict:
        c = self.config
        return {
            "model": self.model_name,
            "pretrained": self.pretrained,
            "preprocessing": {"image": "Owlv2ImageProcessor (pad to square, resize)", "crops": f"squash to "
                              f"{c.crop_size}x{c.crop_size} uint8 RGB", "query_rule": c.query_rule,
                              "query_rule_text": "capitalised runs of tokens (#/@ stripped, RT/The/I/... never "
                              "start one), each its own query" if c.query_rule == "spans" else
                              "each capitalised token its own query", "entity_type_queries": list(c.entity_types),
                              "max_text_queries": c.max_text_queries, "max_query_tokens": self.max_length},
            "thresholds": {"score": c.threshold, "nms_iou": c.nms_iou, "fill": c.fill, "max_crops": MAX_CROPS},
        }

    def __call__(self, items: list[GroundingInput]) -> list[GroundingRow]:
        rows: list[GroundingRow | None] = [None] * len(items)
        queries = [image_queries(item.texts, self.config) for item in items]
        todo = [i for i, item in enumerate(items) if item.loaded is not None and item.loaded.status == "ok"]
        for i in set(range(len(items))) - set(todo):
            rows[i] = GroundingRow.empty("no_image", self.config.crop_size, queries[i])
        for start in range(0, len(todo), self.config.batch_size):
            batch = todo[start:start + self.config.batch_size]
            images = [items[i].loaded.image for i in batch]
            logits, boxes, objectness = self._forward(images, [queries[i] for i in batch])
            for b, i in enumerate(batch):
                rows[i] = self._select(items[i].loaded, queries[i], logits[b], boxes[b], objectness[b])
        return rows

    def _forward(self, images: list[Image.Image], queries: list[list[str]]):
        """-> query probabilities (B, P, Qmax), boxes (B, P, 4) cxcywh in the padded square, objectness (B, P)."""
        torch = self._torch
        width = max(1, max(len(q) for q in queries))
        flat = [q[j] if j < len(q) else "" for q in queries for j in range(width)]
        encoded = self.tokenizer(flat, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt")
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        padded = torch.tensor([j >= len(q) for q in queries for j in range(width)])
        input_ids[padded] = 0  # OWLv2 masks queries whose first token is 0
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            device = self.config.device
            out = self.model(input_ids=input_ids.to(device), pixel_values=pixel_values.to(device),
                             attention_mask=attention_mask.to(device))
        probs = torch.sigmoid(out.logits.float()).cpu().numpy()  # (B, P, Qmax)
        objectness = torch.sigmoid(out.objectness_logits.float()).cpu().numpy()  # (B, P)
        return probs, out.pred_boxes.float().cpu().numpy(), objectness

    def _select(self, loaded: LoadedImage, queries: list[str], probs: np.ndarray, cxcywh: np.ndarray,
                objectness: np.ndarray) -> GroundingRow:
        image = loaded.image
        side = float(max(image.width, image.height))  # OWLv2 pads bottom/right to a square
        xyxy = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1) * side
        xyxy = np.clip(xyxy, 0, [image.width, image.height, image.width, image.height]).astype(np.float32)
        probs = probs[:, : len(queries)]  # (P, Q): padded queries dropped
        if probs.shape[1]:
            best_query, best = probs.argmax(1), probs.max(1)
        else:
            best_query, best = np.zeros(len(xyxy), np.int64), np.zeros(len(xyxy), np.float32)
        chosen = greedy_pick(xyxy, best, limit=MAX_CROPS, iou=self.config.nms_iou, min_score=self.config.threshold)
        source = [0] * len(chosen)
        scores = [float(best[i]) for i in chosen]
        query_index = [int(best_query[i]) for i in chosen]
        if self.config.fill == "objectness" and len(chosen) < MAX_CROPS:
            extra = greedy_pick(xyxy, objectness, limit=MAX_CROPS - len(chosen), iou=self.config.nms_iou,
                                kept=xyxy[chosen])
            chosen, source = chosen + extra, source + [1] * len(extra)
            scores += [float(objectness[i]) for i in extra]
            query_index += [-1] * len(extra)
        return self._rows_from_boxes(loaded, xyxy[chosen].reshape(-1, 4), np.array(scores, np.float32),
                                     np.array(source), np.array(query_index), queries)


@register_grounder("detector")
class DetectorGrounder(Grounder):
    """The top three objects of the cache's object detector (``objects`` group); no text involved."""

    method = "detector"

    def provenance_fields(self) -> dict:
        return {"model": f"objects group: {self.config.detector_model or 'detector'}",
                "pretrained": "see the objects group", "preprocessing": {
                    "crops": f"top {MAX_CROPS} objects by detector score, squashed to "
                             f"{self.config.crop_size}x{self.config.crop_size} uint8 RGB"},
                "thresholds": {"max_crops": MAX_CROPS, "nms": "the detector's own"}}

    def __call__(self, items: list[GroundingInput]) -> list[GroundingRow]:
        rows = []
        for item in items:
            if item.loaded is None or item.loaded.status != "ok":
                rows.append(GroundingRow.empty("no_image", self.config.crop_size))
                continue
            boxes, scores = item.detections if item.detections is not None else (np.zeros((0, 4)), np.zeros(0))
            order = np.argsort(-np.asarray(scores), kind="stable")[:MAX_CROPS]
            boxes = np.asarray(boxes, np.float32)[order].reshape(-1, 4)
            scores = np.asarray(scores, np.float32)[order]
            rows.append(self._rows_from_boxes(item.loaded, boxes, scores, np.full(len(order), 2),
                                              np.full(len(order), -1), []))
        return rows


def group_texts(dataset) -> dict[str, list[list[str]]]:
    """image id -> tokens of every post showing it (dataset order): the owlv2 grounder's text input."""
    texts: dict[str, list[list[str]]] = {}
    for posts in dataset.splits.values():
        for post in posts:
            if post.image_id is not None:
                texts.setdefault(post.image_id, []).append(list(post.tokens))
    return texts


from mner.features.producers import grounding_files  # noqa: E402,F401 - registers --grounding files
