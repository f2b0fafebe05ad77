"""Dataset reader for Twitter-2015/2017-style MNER files and plain two-column CoNLL (docs/data.md).

Both stages read posts through this module only, so every quirk of the public data (``OTHER`` vs
``MISC``, orphan ``I-`` tags, BIOES copies, ``val.txt`` naming) is handled once, here, and every
malformed line fails with ``path:line: what is wrong; what to do``.

Public API (other modules rely on exactly these names):

- ``LABEL_TYPES``, ``SPLIT_NAMES``, ``DataFormatError``, ``Post``, ``Dataset``
- ``load_dataset(path, *, fmt="auto", require_tags=True) -> Dataset``: a folder of split files
  (``train.txt``, ``valid.txt``/``val.txt``/``dev.txt`` read as ``dev``, ``test.txt``) or one file
  (read as split ``test``).
- ``read_split(path, split, *, fmt="auto", require_tags=True) -> list[Post]``
- ``repair_bio`` (from :mod:`mner.pipeline.tags`, where every BIO helper lives): orphan I-X -> B-X.
- ``hash_files(paths) -> str``
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mner.pipeline.tags import repair_bio

LABEL_TYPES = ("PER", "LOC", "ORG", "MISC")
SPLIT_NAMES = ("train", "dev", "test")
FORMATS = ("auto", "twitter", "conll")

# Split -> accepted file names, in order of preference (copies of Twitter-2015 name dev differently).
SPLIT_FILES = {
    "train": ("train.txt",),
    "dev": ("valid.txt", "val.txt", "dev.txt"),
    "test": ("test.txt",),
}
TYPE_ALIASES = {"OTHER": "MISC"}  # Twitter-2015 calls its fourth type OTHER, Twitter-2017 MISC
IMGID_PREFIX = "IMGID:"
DOCSTART = "-DOCSTART-"
SIDECAR_SUFFIX = ".images.txt"  # CoNLL: <stem>.images.txt holds one image id per sentence

# Tag grammar (docs/data.md): O | <prefix>-<TYPE>; prefix B or I (BIO), S or E (BIOES, converted to
# B / I); TYPE a letter then letters, digits or '_' (no '-': "B-PER-X" is refused, not read as type PER-X).
_TAG_RE = re.compile(r"^([BIES])-(\S+)$")
_TYPE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_IMAGE_COMMENT_RE = re.compile(r"^#\s*image\s*:\s*(\S*)\s*$")
_UTF8_BOM = b"\xef\xbb\xbf"


class DataFormatError(ValueError):
    """A data file cannot be read; the message starts with ``path:line: `` (``path: `` if no line)."""

    def __init__(self, path: str | Path, line: int | None, problem: str, fix: str):
        self.path = str(path)
        self.line = line
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}; {fix}")


def read_json(path: str | Path, example: str):
    """A user's JSON file; invalid JSON is a DataFormatError naming the file, the line and ``example``."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataFormatError(path, error.lineno, f"invalid JSON ({error.msg})", f"write {example}") from None


@dataclass(frozen=True)
class Post:
    post_id: str  # "{split}-{index}", index in file order
    tokens: tuple[str, ...]
    tags: tuple[str, ...] | None  # BIO, OTHER -> MISC, orphan I- kept; None when unlabelled
    image_id: str | None  # string as written (leading zeros kept); None: text-only CoNLL
    split: str  # one of SPLIT_NAMES
    source: str  # "path:line" of the post's first line


@dataclass
class Dataset:
    splits: dict[str, list[Post]]  # split -> posts, only the splits found
    data_hash: str  # sha256 over names + bytes of every file read (hash_files)
    files: dict[str, str] = field(default_factory=dict)  # split -> path read
    orphan_i: dict[str, int] = field(default_factory=dict)  # split -> I-X tags not after B-X/I-X
    notes: list[str] = field(default_factory=list)  # human-readable normalisation notes

    @property
    def labels(self) -> list[str]:
        """``O`` then B-/I- of LABEL_TYPES in order, then of any extra type found (sorted)."""
        found = {tag[2:] for posts in self.splits.values() for post in posts for tag in post.tags or () if tag != "O"}
        types = list(LABEL_TYPES) + sorted(found - set(LABEL_TYPES))
        return ["O"] + [f"{prefix}-{kind}" for kind in types for prefix in ("B", "I")]

    def image_ids(self) -> list[str]:
        return sorted({post.image_id for posts in self.splits.values() for post in posts if post.image_id is not None})


@dataclass
class _FileResult:
    """What reading one split file produced, beyond the posts (feeds Dataset notes and hash)."""

    posts: list[Post]
    files_read: list[Path]
    fmt: str
    renamed: int = 0  # OTHER -> MISC
    bioes: int = 0  # S-/E- tags converted
    orphan_i: int = 0
    text_only: bool = False  # CoNLL without image ids


# ---------------------------------------------------------------------------------------------- tags


def _count_orphans(tags: Sequence[str]) -> int:
    return repair_bio(tags)[1]


def _bioes_to_bio(tag: str) -> str:
    if tag.startswith("S-"):
        return "B-" + tag[2:]
    if tag.startswith("E-"):
        return "I-" + tag[2:]
    return tag


def _check_tag(tag: str, path: Path, line: int) -> tuple[str, bool]:
    """Validated tag with aliases applied, and whether an alias renamed it."""
    if not tag:
        raise DataFormatError(path, line, "empty tag", "write a BIO tag (O, B-TYPE, I-TYPE) after the TAB")
    if tag == "O":
        return tag, False
    match = _TAG_RE.match(tag)
    if match is None:
        raise DataFormatError(
            path, line, f"tag {tag!r} is not BIO",
            "use O, B-TYPE or I-TYPE (BIOES S-/E- also accepted), e.g. B-PER, I-LOC",
        )
    prefix, kind = match.groups()
    if "-" in kind:
        raise DataFormatError(
            path, line, f"tag {tag!r}: entity type {kind!r} contains '-'",
            f"types are letters, digits and '_' (write {prefix}-{kind.replace('-', '_')}); mner never guesses "
            "whether the second '-' starts a new type",
        )
    if not _TYPE_RE.match(kind):
        raise DataFormatError(
            path, line, f"tag {tag!r}: entity type {kind!r} is not a name",
            "types start with a letter and hold letters, digits and '_' (e.g. B-PER, I-WORK_OF_ART)",
        )
    alias = TYPE_ALIASES.get(kind)
    return (f"{prefix}-{alias}", True) if alias else (tag, False)


# ---------------------------------------------------------------------------------------------- files


def hash_files(paths: Iterable[str | Path]) -> str:
    """sha256 over (file name, size, bytes) of each file, by name: independent of folder and order."""
    digest = hashlib.sha256()
    for path in sorted((Path(p) for p in paths), key=lambda p: (p.name, str(p))):
        data = path.read_bytes()
        digest.update(path.name.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _read_lines(path: Path) -> list[str]:
    """Lines without line endings; only ``\\n`` splits (tokens may hold U+2028 and friends)."""
    if not path.is_file():
        raise DataFormatError(path, None, "file not found", "check the --data path")
    data = path.read_bytes()
    data = data.removeprefix(_UTF8_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataFormatError(
            path, line, f"invalid UTF-8 (byte 0x{data[err.start]:02x})",
            "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8",
        ) from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if not any(line.strip() for line in lines):
        raise DataFormatError(path, 1, "file is empty", "remove the file or fill it with posts")
    return lines


def _detect_format(lines: list[str]) -> str:
    return "twitter" if any(line.startswith(IMGID_PREFIX) and "\t" not in line for line in lines) else "conll"


# ---------------------------------------------------------------------------------------------- posts


class _PostBuilder:
    """Collects (token, tag, line) rows of one file and emits validated Posts."""

    def __init__(self, path: Path, split: str, require_tags: bool):
        self.path, self.split, self.require_tags = path, split, require_tags
        self.posts: list[Post] = []
        self.rows: list[tuple[str, str | None, int]] = []
        self.start_line: int | None = None
        self.image_id: str | None = None
        self.image_lines: dict[str, int] = {}  # image id -> line it first appeared on
        self.renamed = 0
        self.bioes = 0

    def begin(self, line: int, image_id: str | None) -> None:
        if image_id is not None:
            if image_id != image_id.strip():
                raise DataFormatError(
                    self.path, line, f"image id {image_id!r} has whitespace around it",
                    "ids are used exactly as written (the image file is <id>.jpg): remove the spaces, or rename "
                    "the image file and the id together",
                )
            if "/" in image_id or "\\" in image_id or ".." in image_id:
                raise DataFormatError(
                    self.path, line, f"image id {image_id!r} contains a path separator or '..'",
                    "write the bare id (the image is looked up as <images>/<id>.jpg)",
                )
            first = self.image_lines.setdefault(image_id, line)
            if first != line:
                raise DataFormatError(
                    self.path, line, f"image id {image_id!r} already used at line {first} of this split",
                    "give each post its own image id (duplicates are allowed only across splits)",
                )
        self.start_line, self.image_id = line, image_id

    def add(self, token: str, tag: str | None, line: int) -> None:
        if not token:
            raise DataFormatError(self.path, line, "empty token", "remove the line or write the token before the TAB")
        if tag is None and self.require_tags:
            raise DataFormatError(
                self.path, line, f"no tag after token {token!r}",
                "write 'token<TAB>tag', or read unlabelled data with require_tags=False (mner-train predict)",
            )
        if tag is not None:
            tag, renamed = _check_tag(tag, self.path, line)
            self.renamed += renamed
        if self.start_line is None:
            self.start_line = line
        self.rows.append((token, tag, line))

    def end(self) -> None:
        """Closes the current post (a blank line, a new IMGID, or the end of the file)."""
        if not self.rows:
            return
        has_tag = [tag is not None for _, tag, _ in self.rows]
        if any(has_tag) and not all(has_tag):
            line = self.rows[has_tag.index(False)][2]
            raise DataFormatError(self.path, line, "token without a tag in a labelled post", "tag every token or none")
        tags = None
        if all(has_tag):
            tags = tuple(_bioes_to_bio(tag) for _, tag, _ in self.rows)
            self.bioes += sum(tag[:2] in ("S-", "E-") for _, tag, _ in self.rows)
        self.posts.append(Post(
            post_id=f"{self.split}-{len(self.posts)}", tokens=tuple(token for token, _, _ in self.rows),
            tags=tags, image_id=self.image_id, split=self.split, source=f"{self.path}:{self.start_line}",
        ))
        self.rows, self.start_line, self.image_id = [], None, None


def _parse_twitter(lines: list[str], builder: _PostBuilder) -> None:
    path = builder.path
    pending_image: int | None = None  # line of an IMGID that has no token yet
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            if pending_image is None:
                builder.end()
            continue
        if line.startswith(IMGID_PREFIX) and "\t" not in line:
            if pending_image is not None:
                raise DataFormatError(path, pending_image, "IMGID line with no tokens",
                                      "remove it or add the post's tokens")
            builder.end()
            image_id = line[len(IMGID_PREFIX):]
            if not image_id.strip():
                raise DataFormatError(path, number, "IMGID line without an id", "write IMGID:<image id>")
            builder.begin(number, image_id)
            pending_image = number
            continue
        if builder.start_line is None:
            raise DataFormatError(
                path, number, "post without an IMGID line",
                "start every post with IMGID:<image id> (or use the CoNLL format, docs/data.md)",
            )
        fields = line.split("\t")
        if len(fields) > 2:
            raise DataFormatError(path, number, f"{len(fields)} TAB-separated fields", "write exactly 'token<TAB>tag'")
        if len(fields) == 1 and builder.require_tags:
            raise DataFormatError(
                path, number, f"no TAB in {line[:40]!r}",
                "separate token and tag by one TAB ('token<TAB>tag'); tokens cannot contain TABs",
            )
        builder.add(fields[0], fields[1].strip() if len(fields) == 2 else None, number)
        pending_image = None
    if pending_image is not None:
        raise DataFormatError(path, pending_image, "IMGID line with no tokens", "remove it or add the post's tokens")
    builder.end()


def _parse_conll(lines: list[str], builder: _PostBuilder, sidecar: list[tuple[str, int]] | None) -> bool:
    """Two-column CoNLL; image ids from ``# image: <id>`` lines or a sidecar. Returns text_only."""
    path = builder.path
    comment_line: int | None = None  # line of a `# image:` that has no token yet
    used_comments = False
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.split()[0] == DOCSTART:
            builder.end()
            continue
        comment = _IMAGE_COMMENT_RE.match(stripped)
        if comment and line != line.rstrip():
            raise DataFormatError(path, number, f"image id {comment.group(1)!r} has whitespace after it",
                                  "ids are used exactly as written: remove the trailing spaces")
        if comment:
            if comment_line is not None:
                raise DataFormatError(path, comment_line, "'# image:' line with no sentence",
                                      "remove it or add the sentence")
            if sidecar is not None:
                raise DataFormatError(
                    path, number, f"'# image:' line while {path.stem}{SIDECAR_SUFFIX} also gives image ids",
                    "use one convention: remove the comment lines or the sidecar file",
                )
            if not comment.group(1):
                raise DataFormatError(path, number, "'# image:' line without an id", "write '# image: <id>'")
            builder.end()
            builder.begin(number, comment.group(1))
            comment_line, used_comments = number, True
            continue
        if builder.start_line is None and used_comments:
            raise DataFormatError(
                path, number, "sentence without a '# image: <id>' line",
                "this file gives image ids by comment lines: add one before every sentence",
            )
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) > 2 or (len(fields) == 1 and builder.require_tags):
            raise DataFormatError(
                path, number, f"expected 2 fields 'token tag', found {len(fields)} in {line[:40]!r}",
                "write one token and its tag per line, separated by a TAB or spaces",
            )
        if builder.start_line is None and sidecar is not None:
            index = len(builder.posts)
            if index >= len(sidecar):
                raise DataFormatError(
                    path, number, f"sentence {index + 1} has no image id: the sidecar lists {len(sidecar)}",
                    f"add one line per sentence to {path.stem}{SIDECAR_SUFFIX}",
                )
            image_id, sidecar_line = sidecar[index]
            try:
                builder.begin(number, image_id)
            except DataFormatError as err:
                raise DataFormatError(
                    path.with_name(path.stem + SIDECAR_SUFFIX), sidecar_line,
                    f"image id {image_id!r} repeated within the split", "give each sentence its own image id",
                ) from err
        builder.add(fields[0], fields[1].strip() if len(fields) == 2 else None, number)
        comment_line = None
    if comment_line is not None:
        raise DataFormatError(path, comment_line, "'# image:' line with no sentence", "remove it or add the sentence")
    builder.end()
    if sidecar is not None and len(sidecar) != len(builder.posts):
        sidecar_path = path.with_name(path.stem + SIDECAR_SUFFIX)
        raise DataFormatError(
            sidecar_path, sidecar[len(builder.posts)][1],
            f"{len(sidecar)} image ids for {len(builder.posts)} sentences of {path.name}",
            "list exactly one image id per sentence, in order",
        )
    return sidecar is None and not used_comments


def _read_sidecar(path: Path) -> list[tuple[str, int]] | None:
    sidecar = path.with_name(path.stem + SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return None
    ids = []
    for number, line in enumerate(_read_lines(sidecar), start=1):
        if not line.strip():
            continue
        if len(line.split()) != 1:
            raise DataFormatError(sidecar, number, f"expected one image id, found {line[:40]!r}",
                                  "write one id per line")
        if line != line.strip():
            raise DataFormatError(sidecar, number, f"image id {line.strip()!r} has whitespace around it",
                                  "ids are used exactly as written: remove the spaces")
        ids.append((line, number))
    return ids


def _read_file(path: str | Path, split: str, fmt: str, require_tags: bool) -> _FileResult:
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; valid values: {', '.join(FORMATS)}")
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown split {split!r}; valid values: {', '.join(SPLIT_NAMES)}")
    path = Path(path)
    lines = _read_lines(path)
    fmt = _detect_format(lines) if fmt == "auto" else fmt
    builder = _PostBuilder(path, split, require_tags)
    files_read = [path]
    text_only = False
    if fmt == "twitter":
        _parse_twitter(lines, builder)
    else:
        sidecar = _read_sidecar(path)
        if sidecar is not None:
            files_read.append(path.with_name(path.stem + SIDECAR_SUFFIX))
        text_only = _parse_conll(lines, builder, sidecar)
    if not builder.posts:
        raise DataFormatError(path, 1, "no posts found", "the file holds only comments or -DOCSTART- lines")
    orphans = sum(_count_orphans(post.tags) for post in builder.posts if post.tags is not None)
    return _FileResult(builder.posts, files_read, fmt, builder.renamed, builder.bioes, orphans, text_only)


def read_split(path: str | Path, split: str, *, fmt: str = "auto", require_tags: bool = True) -> list[Post]:
    return _read_file(path, split, fmt, require_tags).posts


def _find_split_files(folder: Path) -> dict[str, Path]:
    found = {}
    for split, names in SPLIT_FILES.items():
        present = [folder / name for name in names if (folder / name).is_file()]
        if len(present) > 1:
            raise DataFormatError(
                folder, None, f"several files for split {split!r}: {', '.join(p.name for p in present)}",
                "keep only one of them",
            )
        if present:
            found[split] = present[0]
    if not found:
        expected = ", ".join(name for names in SPLIT_FILES.values() for name in names)
        raise DataFormatError(folder, None, "no split files found", f"expected some of: {expected}")
    return found


def load_dataset(path: str | Path, *, fmt: str = "auto", require_tags: bool = True) -> Dataset:
    """A folder of split files, or one file read as split ``test``."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(path, None, "no such file or folder", "check the --data path")
    split_files = _find_split_files(path) if path.is_dir() else {"test": path}
    results = {split: _read_file(file, split, fmt, require_tags) for split, file in split_files.items()}

    notes = []
    renamed = {split: r.renamed for split, r in results.items() if r.renamed}
    if renamed:
        per_split = ", ".join(f"{split} {count}" for split, count in renamed.items())
        notes.append(f"renamed {sum(renamed.values())} OTHER tags to MISC ({per_split})")
    for split, result in results.items():
        if result.bioes:
            notes.append(f"{split}: BIOES file, {result.bioes} S-/E- tags converted to BIO (S-X -> B-X, E-X -> I-X)")
        if result.orphan_i:
            notes.append(
                f"{split}: {result.orphan_i} orphan I- tags kept (evaluation: an orphan I- starts an entity, "
                "as seqeval; training repairs them to B-)"
            )
        if result.text_only:
            notes.append(f"{split}: no image ids (CoNLL without '# image:' lines or a sidecar): text only")
    return Dataset(
        splits={split: r.posts for split, r in results.items()},
        data_hash=hash_files(f for r in results.values() for f in r.files_read),
        files={split: str(file) for split, file in split_files.items()},
        orphan_i={split: r.orphan_i for split, r in results.items()},
        notes=notes,
    )
