"""The posts a run reads (``--data`` or the cache's own), encoded per split, and their loaders."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from mner.pipeline.data import Dataset, load_dataset
from mner.trainer.core.config import ConfigError
from mner.trainer.core.console import log
from mner.trainer.inputs.batching import Collator, LengthGroupedBatchSampler, PostDataset, ShuffledBatchSampler

SPLITS = ("train", "dev", "test")


def load_posts(
    data: str | Path | None, features: str | Path | None, *, require_tags: bool = True
) -> tuple[Dataset, dict]:
    """Posts from ``--data`` or, when only ``--features`` is given, from the posts stored in the cache."""
    if data is not None:
        dataset = load_dataset(data, require_tags=require_tags)
        return dataset, {"source": "data", "path": str(Path(data).resolve())}
    if features is not None:
        from mner.pipeline.cache import FeatureCache

        dataset = FeatureCache(features).load_posts()
        return dataset, {"source": "features", "path": str(Path(features).resolve())}
    raise ConfigError("no data: pass --data DIR (split files) or --features CACHE.h5 (posts stored in the cache)")


def make_post_dataset(posts, tokenizer, *, label_to_id, max_length, visual, split, repair=False) -> PostDataset:
    image_rows = None
    if visual is not None:
        image_rows, missing = visual.image_rows(posts)
        if missing:
            log(f"{split}: {missing} posts name an image the cache does not hold; their visual input is zeros")
    dataset = PostDataset(
        posts, tokenizer, label_to_id=label_to_id, max_length=max_length, image_rows=image_rows, repair=repair
    )
    message = dataset.report.message(f"{split} posts")
    if message:
        log(f"WARNING {split}: {message}")
    return dataset


def make_loader(dataset: PostDataset, collator: Collator, *, batch_size: int, shuffle: bool, num_workers: int,
                seed: int = 0, group_by_length: bool = False, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Training loaders draw batches from a sampler whose order depends only on (seed, epoch), so a
    resumed run replays exactly the batches an uninterrupted one would have seen; with several
    processes each loader holds its ``rank``'s share (every post once per epoch over all processes)."""
    if shuffle:
        lengths = [len(a.input_ids) for a in dataset.aligned]
        sampler_cls = LengthGroupedBatchSampler if group_by_length else ShuffledBatchSampler
        sampler = sampler_cls(lengths, batch_size, seed=seed, rank=rank, world_size=world_size)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator, num_workers=num_workers)
