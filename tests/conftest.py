"""Shared fixtures: tiny random-initialised models and generated data (nothing is downloaded)."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest

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
