"""Checks before epoch 1: the model runs on the longest post of every split and changes nothing."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from mner.trainer.core.config import ConfigError
from mner.trainer.evaluation.decode import to_device
from mner.trainer.inputs.batching import Collator, PostDataset


def rng_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose generator ``fork_rng`` must save and restore for work on ``device``:
    ``devices=[]`` forks the CPU generator only, and dropout on a GPU draws from that GPU's."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def longest_post(dataset: PostDataset) -> int:
    return max(range(len(dataset)), key=lambda i: (len(dataset.aligned[i].input_ids), len(dataset.posts[i].tokens)))


def check_longest_posts(net, datasets: dict[str, PostDataset], collator: Collator, *, label_to_id: dict[str, int],
                        device: torch.device, autocast) -> None:
    """One forward in train mode and one decode in eval mode on the longest post of every split, so a
    shape problem surfaces in seconds instead of after the last epoch. Nothing before epoch 1 may
    change the model: a train-mode forward updates running statistics (BatchNorm, P-MNER's region
    standardiser), which would leak dev/test features into training, so every buffer is restored
    afterwards; parameters see no gradient; the random states (python, numpy, torch, CUDA) are
    restored too. The mode the model came in is restored."""
    buffers = {name: buffer.detach().clone() for name, buffer in net.named_buffers()}
    was_training = net.training
    with restored_random_states(device), torch.no_grad():
        try:
            for split, dataset in datasets.items():
                check_one_longest_post(net, split, dataset, collator, label_to_id=label_to_id, device=device,
                                       autocast=autocast)
        finally:
            for name, buffer in net.named_buffers():
                buffer.copy_(buffers[name])
            net.train(was_training)


def check_one_longest_post(net, split: str, dataset: PostDataset, collator: Collator, *,
                           label_to_id: dict[str, int], device: torch.device, autocast) -> None:
    index = longest_post(dataset)
    post = dataset.posts[index]
    item = dict(dataset[index])
    item["labels"] = [label_to_id.get(tag, 0) for tag in post.tags] if post.tags is not None else None
    batch = to_device(collator([item]), device)
    try:
        net.train()
        if item["labels"] is not None:
            with autocast():  # the training step's precision
                net(batch)
        net.eval()
        (path,) = net.decode(batch)  # decoding's (full) precision
    except (RuntimeError, ValueError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{split}: the model fails on the split's longest post ({post.source}, {len(post.tokens)} words, "
            f"{len(item['input_ids'])} pieces): {first[:200]}; lower --max-length or check the model options"
        ) from None
    if len(path) != sum(item["word_mask"]):
        raise ConfigError(f"{split}: the model decoded {len(path)} tags for {post.source}, which has "
                          f"{sum(item['word_mask'])} visible words: a model bug, not an option")


@contextlib.contextmanager
def restored_random_states(device: torch.device):
    """Python's, numpy's, torch's CPU and (on CUDA) the device's generator states are what they were."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=rng_devices(torch.device(device))):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
