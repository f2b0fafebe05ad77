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


def batch_sizes(num_posts: int, batch_size: int, world_size: int = 1) -> list[int]:
    """Sizes of one epoch's batches: every post exactly once, ``world_size`` divides the count.

    Data-parallel processes each take every ``world_size``-th batch and must run the same number of
    steps. Full batches of ``batch_size`` come first; the posts left over are spread evenly over the
    last group(s) of ``world_size`` batches, so no process gets an empty batch and none is skipped or
    padded with repeated posts. One process: ``batch_size``-sized batches and the remainder last.
    """
    if num_posts < world_size:
        raise ConfigError(f"{num_posts} training posts cannot feed {world_size} processes: "
                          "use fewer processes or more posts")
    steps = math.ceil(num_posts / (batch_size * world_size))  # batches per process
    count = steps * world_size
    missing = count * batch_size - num_posts  # how many fewer posts than full batches hold
    tail = world_size
    while tail < count and missing > tail * (batch_size - 1):  # the tail must keep >= 1 post per batch
        tail += world_size
    if missing > tail * (batch_size - 1):  # batch_size 1 and fewer posts than batches: steps shrink
        steps = num_posts // world_size
        count = steps * world_size
        spread = num_posts - count * batch_size  # < world_size posts: one more in some batches
        return [batch_size + (i >= count - spread) for i in range(count)]
    posts_in_tail = tail * batch_size - missing
    even = [posts_in_tail // tail + (i < posts_in_tail % tail) for i in range(tail)]
    return [batch_size] * (count - tail) + even


class LengthGroupedBatchSampler(Sampler):
    """Random batches of posts of similar length: about 25% less padding on tweets, same randomness.

    Each epoch shuffles all posts, sorts them by length inside windows of ``window`` batches, cuts
    the windows into batches (sizes from :func:`batch_sizes`) and shuffles the batches. Process
    ``rank`` of ``world_size`` data-parallel processes takes every ``world_size``-th batch of the same
    order: together they see every post exactly once per epoch, in the same number of steps.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int, window: int = 50,
                 rank: int = 0, world_size: int = 1):
        self.lengths, self.batch_size, self.seed, self.window = list(lengths), batch_size, seed, window
        self.rank, self.world_size = rank, world_size
        self.sizes = batch_sizes(len(self.lengths), batch_size, world_size)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.sizes) // self.world_size  # steps of this process

    def set_epoch(self, epoch: int) -> None:
        """The order depends only on (seed, epoch): a resumed run sees the batches an uninterrupted one saw."""
        self.epoch = epoch

    def _cut(self, order: list[int], sizes: list[int]) -> list[list[int]]:
        batches, start = [], 0
        for size in sizes:
            batches.append(order[start : start + size])
            start += size
        return batches

    def _all_batches(self, rng: random.Random, order: list[int]) -> list[list[int]]:
        batches = []
        for first in range(0, len(self.sizes), self.window):
            sizes = self.sizes[first : first + self.window]
            start = sum(self.sizes[:first])
            window = sorted(order[start : start + sum(sizes)], key=self.lengths.__getitem__)
            batches += self._cut(window, sizes)
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 1000003 + self.epoch)
        self.epoch += 1
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        yield from self._all_batches(rng, order)[self.rank :: self.world_size]


class ShuffledBatchSampler(LengthGroupedBatchSampler):
    """Plain random batches (``group_by_length`` off), ordered by (seed, epoch) like the grouped sampler."""

    def _all_batches(self, rng: random.Random, order: list[int]) -> list[list[int]]:
        return self._cut(order, self.sizes)


def _pad(rows: list[list], value, dtype: torch.dtype) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    width = max(width, 1)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


class HostTensors:
    """The batch's text tensors as the collator made them, in host memory, under ``batch["host"]``.

    Not a tensor, mapping or sequence, so moving the batch to the device (accelerate's
    ``send_to_device``) passes it through untouched: a model that builds inputs on the host from the
    text (P-MNER's template wrapping) reads them here instead of copying device tensors back, which
    would wait for the GPU on every forward."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors[key]


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
        batch["host"] = HostTensors(dict(batch))  # the text tensors above and post_index, never moved
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
