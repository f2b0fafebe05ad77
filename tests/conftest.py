"""Shared fixtures: tiny random-initialised models and generated data (nothing is downloaded)."""

from __future__ import annotations

import os
import random
import string
from pathlib import Path

import pytest
from helpers.data import make_post, write_split

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_WORDS = [
    "the", "a", "in", "at", "of", "to", "and", "is", "rt", "with", "new", "city", "visit", "meet",
    "today", "photo", "john", "smith", "paris", "london", "apple", "google", "game", "love",
]


def write_tiny_bert(folder: Path, *, hidden: int = 32, layers: int = 2, heads: int = 2) -> Path:
    """A random BERT (hidden 32, 2 layers) with a small word-piece vocabulary, saved like a hub model."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces += list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces += ["##" + c for c in string.ascii_lowercase + string.digits]
    pieces += [*TINY_WORDS, "person", "location", "organization", "other", "none", "begin", "inside"]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(pieces)) + "\n", encoding="utf-8")
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    try:
        tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)  # transformers 5
    except TypeError:  # transformers 4 (the pyproject lower bound) reads the vocabulary file
        tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 2, max_position_embeddings=64,
    )
    torch.manual_seed(0)  # the same tiny BERT in every session: test outcomes are reproducible
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """Folder of a tiny random BERT: pass it as ``--text-encoder``. Max 64 positions (tests truncation)."""
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("tiny-data")
    train = [make_post(rng, str(i), orphan=i % 10 == 0) for i in range(48)]
    train.append([("\u200b", "O"), ("paris", "B-LOC")])  # zero-piece word first: CRF must not break
    dev = [make_post(rng, str(i)) for i in range(12)]
    test = [make_post(rng, str(i)) for i in range(12)]
    test.append([("rt", "O")] + [("london", "B-LOC")] * 40)  # words past --max-length: predicted O
    write_split(folder / "train.txt", train)
    write_split(folder / "valid.txt", dev)
    write_split(folder / "test.txt", test)
    return folder


@pytest.fixture(scope="module")
def tiny_cache(tiny_data, tmp_path_factory) -> Path:
    import numpy as np

    from mner.pipeline.cache import CacheWriter, make_provenance
    from mner.pipeline.data import load_dataset

    dataset = load_dataset(tiny_data)
    ids = sorted(set(dataset.image_ids()) - {"5"})  # image 5 is absent from the cache
    path = tmp_path_factory.mktemp("cache") / "tiny.h5"
    with CacheWriter(path, partial=True) as writer:
        writer.write_images(ids, [0] * len(ids), [""] * len(ids), [64] * len(ids), [48] * len(ids))
        writer.write_posts(dataset)
        embed = np.random.default_rng(0).standard_normal((len(ids), 16)).astype(np.float16)
        provenance = make_provenance("encoder", model="ViT-B-32", pretrained="random", preprocessing=None,
                                     thresholds=None, image_ids=ids)
        writer.write_group("encoders/clip", {"image_embed": (embed, "image")}, provenance)
    return path
