"""CLIP prompt sets (``prompt_sets/*.json``) -> prompt embeddings, category centroids, crop weights, relevance.

VCRMNER (sec. 3.1): c_j = mean_i p_i^j (eq. 2); w_ij = softmax_j(logit_scale * cos(v_i, c_j)) (eq. 4-5)
for every object crop v_i. PromptMNER (sec. 2.3, eq. 1): p(P_i | I) = softmax_i(logit_scale * cos(s_i, v))
over the set's prompts, v the whole-image CLIP embedding. Everything is computed from the float16
values stored in the cache, so adding a prompt set later gives the same numbers as computing it at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPT_DIR = Path(__file__).parent / "prompt_sets"


@dataclass
class PromptSet:
    name: str
    description: str
    template: str  # "{}" is replaced by each word ("an image of {}" for PromptMNER)
    categories: dict[str, list[str]]  # category -> words/prompts, in file order

    @property
    def texts(self) -> list[str]:
        return [self.template.format(word) for words in self.categories.values() for word in words]

    @property
    def category_names(self) -> list[str]:
        return list(self.categories)

    @property
    def prompt_category(self) -> np.ndarray:
        return np.array([j for j, words in enumerate(self.categories.values()) for _ in words], dtype=np.int16)


def available_prompt_sets() -> list[str]:
    return sorted(path.stem for path in PROMPT_DIR.glob("*.json"))


def load_prompt_set(name: str) -> PromptSet:
    """A bundled set by name, or any JSON file path with the same fields."""
    path = Path(name) if name.endswith(".json") else PROMPT_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown prompt set {name!r}; valid: {', '.join(available_prompt_sets())} "
                         "(or a path to a .json file with 'template' and 'categories')")
    raw = json.loads(path.read_text(encoding="utf-8"))
    return PromptSet(name=raw.get("name", path.stem), description=raw.get("description", ""),
                     template=raw.get("template", "{}"), categories=raw["categories"])


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def row_cosines(rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """cos(rows_i, targets_j) (n, t) computed row by row in float64 (elementwise product + sum over d), so a
    row's value never depends on the other rows in the chunk: a BLAS matmul picks other kernels for other
    batch sizes (gemv for one image, gemm for many) and moved float16 values by one step."""
    rows = _unit(rows.astype(np.float64))  # (n, d)
    targets = _unit(targets.astype(np.float64))  # (t, d)
    out = np.empty((len(rows), len(targets)), np.float64)
    for j, target in enumerate(targets):
        out[:, j] = (rows * target[None, :]).sum(axis=-1)  # (n,) per-row reduction, same order for every n
    return out


def prompt_features(prompt_set: PromptSet, prompt_embed: np.ndarray, image_embed: np.ndarray,
                    crop_embed: np.ndarray, logit_scale: float, image_ok: np.ndarray) -> dict[str, np.ndarray]:
    """All arrays of one /prompts/<set> group; inputs are the cached (float16) CLIP embeddings.

    Rows of images with no features (status not ok and not placeholder) get zero relevance.
    """
    prompt_embed = prompt_embed.astype(np.float16).astype(np.float32)  # (Q, D) as stored
    category = prompt_set.prompt_category
    centroids = np.stack([prompt_embed[category == j].mean(axis=0)
                          for j in range(len(prompt_set.categories))]).astype(np.float32)  # (C, D) eq. 2
    crop_weights = _softmax(logit_scale * row_cosines(crop_embed, centroids))  # (M, C) eq. 4-5
    relevance = _softmax(logit_scale * row_cosines(image_embed, prompt_embed))  # (N, Q) PromptMNER eq. 1
    relevance[~image_ok] = 0.0
    return {"prompt_embed": prompt_embed.astype(np.float16), "centroids": centroids,
            "crop_weights": crop_weights.astype(np.float16), "image_relevance": relevance.astype(np.float16)}
