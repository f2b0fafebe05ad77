"""Dataset reader for Twitter-2015/2017-style MNER files (CONTRACT STUB: filled in by the data work).

Public API (other modules rely on exactly these names):

- ``LABEL_TYPES = ("PER", "LOC", "ORG", "MISC")``
- ``SPLIT_NAMES = ("train", "dev", "test")``; files ``train.txt``, ``valid.txt``/``val.txt``/``dev.txt``
  (all read as ``dev``), ``test.txt``.
- ``class DataFormatError(ValueError)`` with attributes ``path``, ``line`` (1-based, or None) and
  a message that starts with ``"{path}:{line}: "``.
- ``@dataclass(frozen=True) class Post``: ``post_id: str`` (``"{split}-{index}"``), ``tokens: tuple[str, ...]``,
  ``tags: tuple[str, ...] | None`` (BIO, ``OTHER`` normalised to ``MISC``; ``None`` when unlabelled),
  ``image_id: str | None``, ``split: str``, ``source: str`` (``"path:line"`` of the post's first line).
- ``@dataclass class Dataset``: ``splits: dict[str, list[Post]]``, ``data_hash: str`` (sha256 over the
  files read), ``files: dict[str, str]``, ``orphan_i: dict[str, int]``, ``notes: list[str]``
  (human-readable normalisation notes); ``labels`` property -> BIO label list
  ``["O", "B-PER", "I-PER", ...]`` in LABEL_TYPES order (plus any extra types found, sorted);
  ``image_ids()`` -> sorted unique image ids over all splits.
- ``load_dataset(path, *, fmt="auto", require_tags=True) -> Dataset``: a folder of split files
  or one file (read as split ``test``).
- ``read_split(path, split, *, fmt="auto", require_tags=True) -> list[Post]``.
- ``repair_bio(tags) -> tuple[list[str], int]``: orphan I-X -> B-X (training only), count.
- ``hash_files(paths) -> str``.
"""
