"""Word <-> sub-word alignment for any Hugging Face fast tokenizer.

Every word is predicted from its first sub-word piece. A word that yields no piece at all
(e.g. ``"\\u200b"`` with a WordPiece vocabulary) or whose first piece falls past ``max_length``
cannot be predicted: its ``word_mask`` is False, the trainer predicts ``O`` for it and evaluation
counts it as a predicted ``O`` against its gold tag. Labels are never shifted onto another word:
a word's position comes from the tokenizer's own ``word_ids``, never from counting pieces.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class AlignedPost:
    """One post as the model sees it."""

    input_ids: list[int]  # [CLS] pieces... [SEP], at most max_length ids
    word_index: list[int]  # per word: position of its first piece in input_ids (0 when not kept)
    word_mask: list[bool]  # per word: True when the word has a piece inside max_length


@dataclass
class AlignmentReport:
    """Counts of words the model cannot predict (they are predicted O)."""

    words: int = 0  # words seen
    zero_piece: int = 0  # words the tokenizer maps to no piece at all
    truncated: int = 0  # words whose first piece lies past max_length
    posts_truncated: int = 0  # posts with at least one truncated word
    examples: list[str] = field(default_factory=list)  # a few zero-piece words, for the warning

    def message(self, what: str = "posts") -> str | None:
        if not (self.zero_piece or self.truncated):
            return None
        parts = []
        if self.truncated:
            parts.append(
                f"{self.truncated} words in {self.posts_truncated} {what} lie past max_length "
                "(raise --max-length to keep them)"
            )
        if self.zero_piece:
            shown = ", ".join(repr(word) for word in self.examples)
            parts.append(f"{self.zero_piece} words have zero sub-word pieces (e.g. {shown})")
        return "; ".join(parts) + f" -- of {self.words} words; these are predicted O"


def _check_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is a slow tokenizer; word alignment needs a fast one "
            "(load it with AutoTokenizer.from_pretrained(..., use_fast=True))"
        )


def align_posts(
    tokenizer, posts: Sequence[Sequence[str]], *, max_length: int, batch_size: int = 1024
) -> tuple[list[AlignedPost], AlignmentReport]:
    """Tokenise pre-split posts and find each word's first piece.

    Each post is tokenised twice (without and with truncation) so zero-piece words and
    truncated words are told apart and reported separately.
    """
    _check_fast(tokenizer)
    aligned: list[AlignedPost] = []
    report = AlignmentReport()
    for start in range(0, len(posts), batch_size):
        chunk = [list(words) for words in posts[start : start + batch_size]]
        full = tokenizer(chunk, is_split_into_words=True, add_special_tokens=True, truncation=False)
        kept = tokenizer(
            chunk, is_split_into_words=True, add_special_tokens=True, truncation=True, max_length=max_length
        )
        for i, words in enumerate(chunk):
            has_piece = {w for w in full.word_ids(i) if w is not None}
            first_piece: dict[int, int] = {}
            for position, w in enumerate(kept.word_ids(i)):
                if w is not None and w not in first_piece:
                    first_piece[w] = position
            word_index = [first_piece.get(w, 0) for w in range(len(words))]
            word_mask = [w in first_piece for w in range(len(words))]
            truncated = sum(1 for w in has_piece if w not in first_piece)
            zero = [words[w] for w in range(len(words)) if w not in has_piece]
            report.words += len(words)
            report.truncated += truncated
            report.posts_truncated += truncated > 0
            report.zero_piece += len(zero)
            for word in zero:
                if len(report.examples) < 5 and word not in report.examples:
                    report.examples.append(word)
            aligned.append(AlignedPost(list(kept["input_ids"][i]), word_index, word_mask))
    return aligned, report


def align_words(tokenizer, words: Sequence[str], *, max_length: int) -> AlignedPost:
    """Align one post (convenience for tests and interactive use)."""
    aligned, _ = align_posts(tokenizer, [words], max_length=max_length)
    return aligned[0]


def log_report(report: AlignmentReport, what: str) -> None:
    message = report.message(what)
    if message:
        logger.warning("%s: %s", what, message)
