"""Posts -> the batch dict of docs/architecture.md (text part), plus the visual part when needed."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

from mner.pipeline.data import Post
from mner.pipeline.tags import repair_bio
from mner.trainer.core.config import ConfigError
from mner.trainer.inputs.align import AlignmentReport, align_posts

logger = logging.getLogger(__name__)


class PostDataset(TorchDataset):
    """Aligned posts, tokenised once up front (fast tokenizers do thousands of posts per second).

    ``repair`` turns orphan ``I-X`` into ``B-X`` in the training labels only; evaluation always
    compares against the file's own tags.
    """

    def __init__(
        self,
        posts: Sequence[Post],
        tokenizer,
        *,
        label_to_id: dict[str, int] | None,
        max_length: int,
        image_rows: Sequence[int | None] | None = None,
        repair: bool = False,
    ):
        self.posts = list(posts)
        self.aligned, self.report = align_posts(tokenizer, [p.tokens for p in self.posts], max_length=max_length)
        self.image_rows = list(image_rows) if image_rows is not None else [None] * len(self.posts)
        self.repaired = 0
        self.labels: list[list[int] | None] = []
        for post in self.posts:
            if label_to_id is None or post.tags is None:
                self.labels.append(None)
                continue
            tags = list(post.tags)
            if repair:
                tags, count = repair_bio(tags)
                self.repaired += count
            unknown = sorted({t for t in tags if t not in label_to_id})
            if unknown:
                raise ConfigError(
                    f"{post.source}: tags {unknown} are not in the model's labels {list(label_to_id)}"
                )
            self.labels.append([label_to_id[t] for t in tags])

    def __len__(self) -> int:
        return len(self.posts)

    def __getitem__(self, index: int) -> dict:
        aligned = self.aligned[index]
        return {
            "input_ids": aligned.input_ids,
            "word_index": aligned.word_index,
            "word_mask": aligned.word_mask,
            "labels": self.labels[index],
            "image_row": self.image_rows[index],
            "post_index": index,
        }


class LengthGroupedBatchSampler(Sampler):
    """Random batches of posts of similar length: about 25% less padding on tweets, same randomness.

    Each epoch shuffles all posts, sorts them by length inside windows of ``window`` batches, cuts
    the windows into batches and shuffles the batches.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int, window: int = 50):
        self.lengths, self.batch_size, self.seed, self.window = list(lengths), batch_size, seed, window
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The order depends only on (seed, epoch): a resumed run sees the batches an uninterrupted one saw."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 1000003 + self.epoch)
        self.epoch += 1
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        span = self.batch_size * self.window
        batches = []
        for start in range(0, len(order), span):
            window = sorted(order[start : start + span], key=self.lengths.__getitem__)
            batches += [window[i : i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        rng.shuffle(batches)
        yield from batches


class ShuffledBatchSampler(LengthGroupedBatchSampler):
    """Plain random batches (``group_by_length`` off), ordered by (seed, epoch) like the grouped sampler."""

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 1000003 + self.epoch)
        self.epoch += 1
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        yield from (order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size))


def _pad(rows: list[list], value, dtype: torch.dtype) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    width = max(width, 1)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


class Collator:
    """Pads a list of PostDataset items into the batch dict; ``visual_batcher`` adds ``batch["visual"]``;
    ``second_segment`` (:class:`mner.trainer.inputs.segments.SecondSegment`) appends per-image text such as
    captions as the encoder's second segment and adds ``token_type_ids``."""

    def __init__(self, *, pad_token_id: int, visual_batcher: Callable[[list[int | None]], dict] | None = None,
                 second_segment: Callable | None = None):
        self.pad_token_id = pad_token_id
        self.visual_batcher = visual_batcher
        self.second_segment = second_segment

    def __call__(self, items: list[dict]) -> dict:
        input_ids = _pad([it["input_ids"] for it in items], self.pad_token_id, torch.long)  # (B, L)
        attention_mask = _pad([[1] * len(it["input_ids"]) for it in items], 0, torch.long)  # (B, L)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "word_index": _pad([it["word_index"] for it in items], 0, torch.long),  # (B, W)
            "word_mask": _pad([it["word_mask"] for it in items], False, torch.bool),  # (B, W)
            # (B,) the posts' positions in their PostDataset: named when a batch's loss is not finite
            "post_index": torch.tensor([it.get("post_index", -1) for it in items], dtype=torch.long),
        }
        if all(it["labels"] is not None for it in items):
            batch["labels"] = _pad([it["labels"] for it in items], 0, torch.long)  # (B, W); pad = id 0 ("O")
        if self.visual_batcher is not None:
            batch["visual"] = self.visual_batcher([it["image_row"] for it in items])
        if self.second_segment is not None:
            texts = batch["visual"][self.second_segment.path]
            batch.update(self.second_segment([it["input_ids"] for it in items], texts))  # ids, mask, token types
        return batch


def describe_report(report: AlignmentReport, split: str) -> str | None:
    return report.message(f"{split} posts")
