"""Decoding posts into tags (always in full precision) and scoring them."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from mner.pipeline.data import Post
from mner.trainer.evaluation.evaluate import entity_scores
from mner.trainer.inputs.batching import Collator, PostDataset
from mner.trainer.inputs.posts import make_loader


def to_device(batch: dict, device: torch.device) -> dict:
    """Decoding batches (training batches arrive on the device through the engine's prepared loader)."""
    from accelerate.utils import send_to_device

    return send_to_device(batch, device, non_blocking=True)


# Decoding runs in full precision everywhere: dev F1 during training, the final dev/test scores, `evaluate`
# and `predict`. Under bf16/fp16 autocast the emissions into the CRF would be low-precision Linear outputs
# whose Viterbi can tie differently, so `evaluate` would disagree with metrics.json on a GPU.
DECODE_PRECISION = "fp32"


@torch.no_grad()
def predict_tags(model, dataset: PostDataset, collator: Collator, *, labels: list[str], device: torch.device,
                 batch_size: int, num_workers: int = 0, desc: str = "decode") -> list[list[str]]:
    """One tag per word of every post; words the model cannot see (word_mask False) are ``O``.
    Always in full precision (``DECODE_PRECISION``), whatever the training precision."""
    model.eval()
    loader = make_loader(dataset, collator, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    predictions: list[list[str]] = []
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
    for batch in bar:
        word_mask = batch["word_mask"]
        paths = model.decode(to_device(batch, device))
        for row, path in enumerate(paths):
            n_words = len(dataset.posts[len(predictions)].tokens)
            kept = word_mask[row, :n_words].tolist()
            if sum(kept) != len(path):
                raise RuntimeError(f"model decoded {len(path)} tags for a post with {sum(kept)} kept words")
            tags = iter(labels[i] for i in path)
            predictions.append([next(tags) if keep else "O" for keep in kept])
    return predictions


def score_split(posts: Sequence[Post], predictions: list[list[str]]) -> dict:
    return entity_scores([list(p.tags) for p in posts], predictions)
