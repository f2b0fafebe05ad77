"""Shared by the transformers-based producers (grounding, captions): exact provenance and an offline tokenizer.

``--random-init`` runs of OWLv2 and BLIP must work with no network, but their tokenizers are downloaded
files. ``offline_tokenizer`` builds a small word-piece tokenizer in memory instead (letters, digits,
punctuation and a few caption words), so any query or caption round-trips through real token ids.
Its ``[SEP]`` is the highest id: CLIP-style text towers (OWLv2) pool at ``argmax(input_ids)``, which
is the end-of-text token of the real CLIP vocabulary, and so it is here.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mner.pipeline.hashing import sha256_tag

CAPTION_WORDS = (
    "a", "an", "the", "of", "in", "on", "with", "and", "at", "man", "woman", "people", "person", "dog",
    "cat", "car", "street", "building", "city", "sign", "logo", "shirt", "group", "standing", "sitting",
    "holding", "playing", "game", "field", "stage", "crowd", "picture", "photo", "text", "screen",
)


def registrar(table: dict):
    """``register(name)`` decorators filling ``table`` (the grounders' and captioners' registries)."""
    def register(name: str):
        def decorator(factory):
            table[name] = factory
            return factory
        return decorator
    return register


# Every tiny random tower (--random-init): two layers, 32 wide; callers override what differs.
TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def offline_tokenizer():
    """An in-memory BERT-style word-piece tokenizer; nothing is read from disk or the network."""
    from transformers import BertTokenizerFast

    pieces = ["[PAD]", "[UNK]", "[CLS]", "[MASK]"]
    pieces += list(string.ascii_lowercase + string.digits + string.punctuation)
    pieces += ["##" + c for c in string.ascii_lowercase + string.digits]
    pieces += [*CAPTION_WORDS, "[SEP]"]
    vocab = {piece: index for index, piece in enumerate(dict.fromkeys(pieces))}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True)


def tokenizer_ids(tokenizer) -> dict[str, int]:
    """Special-token ids a tiny random config must agree with."""
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id}


def _weights_hash(folder: Path) -> str | None:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return sha256_tag(folder / name)
    return None


def pin_revision(source: str):
    """(revision to pass to every ``from_pretrained`` of one model, the commit hash it names or None).

    Resolving once and loading weights, tokenizer and processor at that revision means all three come from
    one repository state, and the commit recorded in provenance is the one that was loaded.
    """
    if Path(source).is_dir():
        return None, None
    try:
        from transformers.utils.hub import resolve_revision
    except ImportError:  # transformers 4.x: the loaded config carries _commit_hash instead
        return None, None
    revision = resolve_revision(source)
    return revision, getattr(revision, "resolved", None)


def hub_pretrained(source: str, model, *, random_init: bool, commit: str | None = None) -> str:
    """The provenance ``pretrained`` tag: "random", ``<hub name>@<commit>``, or a local folder and its weights hash."""
    if random_init:
        return "random"
    folder = Path(source)
    if folder.is_dir():
        found = _weights_hash(folder)
        return f"{os.path.abspath(folder)} {found}" if found else os.path.abspath(folder)
    commit = commit or getattr(model.config, "_commit_hash", None)
    return f"{source}@{commit}" if commit else f"{source}@unresolved-revision"


@dataclass
class HubParts:
    """A transformers model with its tokenizer and image processor, and what provenance records of it."""

    tokenizer: object
    model: object
    processor: object
    model_name: str  # "transformers/<Class>(<source>)" or "(tiny random: ...)"
    pretrained: str  # "random", "<hub name>@<commit>", or "<folder> sha256:<weights hash>"


def load_parts(model_class, processor_class, source: str, *, random_init: bool, tiny_config: Callable,
               tiny_image_size: int, tiny_label: str) -> HubParts:
    """Weights, tokenizer and processor from one hub revision or folder; with ``random_init`` a tiny random
    config (``tiny_config(tokenizer)``) with the in-memory tokenizer, nothing read from disk or network."""
    from transformers import AutoTokenizer

    commit = None
    if random_init:
        tokenizer = offline_tokenizer()
        model = model_class(tiny_config(tokenizer))
        processor = processor_class(size={"height": tiny_image_size, "width": tiny_image_size})
        model_name = f"transformers/{model_class.__name__}(tiny random: {tiny_label})"
    else:
        revision, commit = pin_revision(source)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = model_class.from_pretrained(source, revision=revision)
        processor = processor_class.from_pretrained(source, revision=revision)
        model_name = f"transformers/{model_class.__name__}({source})"
    return HubParts(tokenizer, model, processor, model_name,
                    hub_pretrained(source, model, random_init=random_init, commit=commit))

