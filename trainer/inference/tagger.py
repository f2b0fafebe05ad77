"""``Tagger``: a trained run kept in memory, tagging new posts (raw strings or tokens, with or without images).

    tagger = mner.Tagger.from_run("runs/t15-vcrmner")
    tagger(["Kevin Durant enters Oracle Arena"], images=["photo.jpg"])

``mner-train predict`` is a thin layer over :meth:`Tagger.tag_posts` (one code path for the CLI and
the API). Per post the model reads the image's cached row: from the run's training cache when the
image is there, else from a *side cache* that stage 1 fills with the missing images, using the
training cache's own record of its models (:mod:`mner.trainer.inference.stage1`, the only door to
stage 1 from the trainer). Posts are decoded in batches per cache; a post's tags do not depend on
its batch mates (a test checks it).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mner.pipeline.data import Post
from mner.trainer.core.config import ConfigError
from mner.trainer.evaluation.evaluate import extract_entities
from mner.trainer.inference.scores import decoder_kind, entity_score, pick_record
from mner.trainer.models.layers import trace_decoding

WORD = re.compile(r"\S+")


@dataclass
class TaggedEntity:
    type: str  # entity type, e.g. PER
    text: str  # its tokens joined by single spaces
    token_start: int  # first token
    token_end: int  # one past the last token
    char_start: int  # offset of its first character in the post's text
    char_end: int  # one past its last character
    score: float  # confidence, defined per decoder (mner.trainer.inference.scores); NaN when undefined


@dataclass
class TaggedPost:
    text: str  # the input string (tokens joined by single spaces when tokens were given)
    tokens: tuple[str, ...]  # words the model tagged
    tags: list[str]  # predicted BIO tag per token
    entities: list[TaggedEntity]  # predicted entities in token order
    gold: list[str] | None = None  # gold tags when the input had them
    post_id: str = ""  # id of the post (input order for the API)
    image_id: str | None = None  # the image's id in the cache that served it
    image_status: str = "no_image"  # ok | missing | unreadable | not_in_cache | no_image


@dataclass
class TagReport:
    """What one call did, for ``<out>.json`` and the bench."""

    posts: int = 0
    image_status: dict[str, int] = field(default_factory=dict)  # posts per image status
    extracted: int = 0  # images stage 1 added to the side cache in this call
    side_cache: str | None = None  # its path, when one was used or made
    stage1_groups: list[str] = field(default_factory=list)  # the side cache's groups: what the model reads
    seconds: dict[str, float] = field(default_factory=dict)  # stage1 / tag


def split_words(text: str) -> tuple[tuple[str, ...], list[tuple[int, int]]]:
    """Whitespace tokens of ``text`` and their character spans (start, end)."""
    matches = list(WORD.finditer(text))
    return tuple(m.group() for m in matches), [(m.start(), m.end()) for m in matches]


def joined_offsets(tokens: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Text of tokens joined by single spaces, and each token's span in it."""
    spans, position = [], 0
    for token in tokens:
        spans.append((position, position + len(token)))
        position += len(token) + 1
    return " ".join(tokens), spans


def file_image_id(path: Path) -> str:
    """The id an API image gets in the side cache: its content hash (the same picture anywhere is one row)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256-" + digest.hexdigest()[:32]


class Tagger:
    """A finished run's model, tokenizer and feature caches, loaded once and reused across calls."""

    def __init__(self, run_dir: Path, *, model, run_config: dict, tokenizer, sources: list, device: torch.device,
                 batch_size: int, reference_cache: str | None, side_cache: Path | None, progress: bool,
                 stage1_weights: dict[str, str] | None = None):
        self.run_dir = run_dir
        self.model = model.eval()
        self.run_config = run_config
        self.labels: list[str] = run_config["labels"]
        self.tokenizer = tokenizer
        self.sources = sources  # VisualInputs per cache: [training cache, side cache], those that exist
        self.device = device
        self.batch_size = batch_size
        self.reference_cache = reference_cache  # the cache whose stage-1 record new images are extracted with
        self.side_cache = side_cache
        self.progress = progress
        self.stage1_weights = dict(stage1_weights or {})  # local copies of stage-1 weights, by extract flag
        self.max_length = run_config["train_config"]["max_length"]
        self.required = list(type(model).required_features(model.config))
        self.score_kind = "none"
        self.last_report = TagReport()

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_run(cls, run: str | Path, *, device: str = "auto", batch_size: int | None = None,
                 features: str | Path | None = None, side_cache: str | Path | None = None,
                 progress: bool = False, stage1_weights: dict[str, str] | None = None) -> Tagger:
        """Load a finished run once. ``features``: the cache to read images from (default: the one the
        run trained on); ``side_cache``: where images missing from it are extracted (default
        ``<run>/side-caches/<name>.h5``, chosen per images folder); ``stage1_weights``: local copies of
        the stage-1 weights the cache's record names, by extract flag (``{"--detector-weights": PATH}``)."""
        from mner.trainer.core.finished_run import load_run
        from mner.trainer.core.run_folder import read_run_config, require_finished
        from mner.trainer.core.schema2_runs import current_fields
        from mner.trainer.models import get_model_class

        run_dir = Path(run)
        require_finished(run_dir)
        run_config = read_run_config(run_dir)
        model_cls = get_model_class(run_config["model"])
        multimodal = bool(model_cls.required_features(model_cls.Config(**current_fields(run_config["model_config"]))))
        reference = None
        paths: list[str] = []
        if multimodal:
            trained = (run_config.get("features") or {}).get("path")
            reference = str(features) if features is not None else trained
            paths = [str(p) for p in (reference, side_cache) if p is not None and Path(p).exists()]
            if not paths:
                raise ConfigError(f"the cache {run_dir} was trained with ({trained}) is gone and no --side-cache "
                                  "exists; pass --features CACHE.h5 (the model needs its features' record)")
            if not Path(reference or "").exists():
                reference = paths[0]
        # the same loader as evaluate: weights checked against the run's record, the encoder from its skeleton
        net, run_config, tokenizer, visual, torch_device = load_run(run_dir, features=paths[0] if paths else None,
                                                                    device=device)
        tagger_sources = [visual] if visual is not None else []
        size = batch_size or run_config["train_config"].get("eval_batch_size") or 32
        tagger = cls(run_dir, model=net, run_config=run_config, tokenizer=tokenizer, sources=tagger_sources,
                     device=torch_device, batch_size=size, reference_cache=reference,
                     side_cache=Path(side_cache) if side_cache is not None else None, progress=progress,
                     stage1_weights=stage1_weights)
        if len(paths) > 1:
            tagger._open_side_cache(Path(paths[1]))
        return tagger

    @property
    def needs_images(self) -> bool:
        return bool(self.required)

    # ------------------------------------------------------------------------------------------ API
    def __call__(self, posts, *, images: Sequence[str | Path | None] | None = None):
        """Tag one post (a string) or a batch (a list of strings, or of token lists).

        Strings are split on whitespace; a list of tokens is taken as is (offsets then refer to the
        tokens joined by single spaces). ``images``: one image file (or None) per post; images not in
        the run's cache are extracted once into the side cache with the run's stage-1 models."""
        single = isinstance(posts, str)
        batch = [posts] if single else list(posts)
        if images is not None and len(images) != len(batch):
            raise ValueError(f"{len(batch)} posts but {len(images)} images")
        records, spans = [], []
        image_ids: list[str | None] = []
        missing_files: set[int] = set()
        for n, post in enumerate(batch):
            if isinstance(post, str):
                tokens, offsets = split_words(post)
                text = post
            else:
                tokens = tuple(str(t) for t in post)
                text, offsets = joined_offsets(tokens)
            image = images[n] if images is not None else None
            image_id = None
            if image is not None and self.needs_images:
                if Path(image).is_file():
                    image_id = file_image_id(Path(image))
                else:
                    missing_files.add(n)
            image_ids.append(image_id)
            records.append(Post(f"post-{n}", tokens, None, image_id, "predict", f"<input {n}>"))
            spans.append((text, offsets))
        files = {image_id: Path(images[n]) for n, image_id in enumerate(image_ids) if image_id is not None}
        with tempfile.TemporaryDirectory(prefix="mner-images-") as folder:
            for image_id, path in files.items():  # stage 1 finds <folder>/<id>, a link to the caller's file
                (Path(folder) / image_id).symlink_to(path.resolve())
            tagged = self._tag(records, spans, images_dir=folder if files else None,
                               side_cache=self._api_side_cache())
        for n in missing_files:
            tagged[n].image_status = "missing"
            tagged[n].image_id = str(images[n])
        self.last_report.image_status = _count_status(tagged)
        return tagged[0] if single else tagged

    def tag_posts(self, posts: Sequence[Post], *, images_dir: str | Path | None = None) -> list[TaggedPost]:
        """Tag posts read from a data file (the CLI). With ``images_dir``, images the caches lack are
        extracted first (``<images_dir>/<image id>``, as ``mner-features extract`` finds them)."""
        spans = [joined_offsets(post.tokens) for post in posts]
        if images_dir is not None and not Path(images_dir).is_dir():
            raise ConfigError(f"--images {images_dir}: no such folder")
        side = self.side_cache or (self._folder_side_cache(images_dir) if images_dir is not None else None)
        return self._tag(list(posts), spans, images_dir=images_dir, side_cache=side)

    # ------------------------------------------------------------------------------------------ core
    def _api_side_cache(self) -> Path:
        return self.side_cache or self.run_dir / "side-caches" / "by-content.h5"

    def _folder_side_cache(self, images_dir) -> Path:
        key = hashlib.sha1(str(Path(images_dir).resolve()).encode()).hexdigest()[:12]
        return self.run_dir / "side-caches" / f"{Path(images_dir).resolve().name}-{key}.h5"

    def _tag(self, posts: list[Post], spans: list, *, images_dir, side_cache: Path | None) -> list:
        report = self.last_report = TagReport(posts=len(posts))
        started = time.perf_counter()
        if images_dir is not None and self.needs_images:
            self._extract_missing(posts, images_dir, side_cache, report)
        report.seconds["stage1"] = time.perf_counter() - started
        started = time.perf_counter()
        rows, status = self._image_rows(posts)
        tags, scores = self._decode(posts, rows)
        out = []
        for n, post in enumerate(posts):
            text, offsets = spans[n]
            entities = []
            for (entity_type, first, last), score in zip(extract_entities(tags[n]), scores[n]):
                entities.append(TaggedEntity(
                    entity_type, " ".join(post.tokens[first:last + 1]), first, last + 1,
                    offsets[first][0], offsets[last][1], score))
            out.append(TaggedPost(text, tuple(post.tokens), tags[n], entities,
                                  list(post.tags) if post.tags is not None else None, post.post_id,
                                  post.image_id, status[n]))
        report.seconds["tag"] = time.perf_counter() - started
        report.image_status = _count_status(out)
        return out

    def _extract_missing(self, posts, images_dir, side_cache: Path | None, report: TagReport) -> None:
        """Images no cache holds go through stage 1 into the side cache, which is then (re)opened."""
        report.side_cache = str(side_cache) if side_cache is not None else None
        if side_cache is not None and Path(side_cache).exists() and \
                str(Path(side_cache).resolve()) not in [s.path for s in self.sources]:
            self._open_side_cache(side_cache)  # made by an earlier call: reused
        known = set()
        for source in self.sources:
            known.update(source.cache.image_ids)
        wanted = sorted({p.image_id for p in posts if p.image_id and p.image_id not in known})
        if wanted:
            from mner.trainer.inference.stage1 import extract_into_side_cache

            texts: dict[str, list[list[str]]] = {}
            for post in posts:
                if post.image_id in wanted:
                    texts.setdefault(post.image_id, []).append(list(post.tokens))
            report.extracted = extract_into_side_cache(
                reference=self.reference_cache, side_cache=side_cache, image_ids=wanted, images_dir=images_dir,
                reads=self.required, texts=texts, device=str(self.device), progress=self.progress,
                weights=self.stage1_weights)
            self._open_side_cache(side_cache)
        if side_cache is not None and Path(side_cache).exists():
            from mner.pipeline.cache import FeatureCache

            report.stage1_groups = [g for g in FeatureCache(side_cache).groups() if g not in ("images", "posts")]

    def _open_side_cache(self, side_cache: Path) -> None:
        from mner.trainer.inputs.visual_inputs import VisualInputs

        first = self.sources[0]
        resolved = str(Path(side_cache).resolve())
        self.sources = [s for s in self.sources if s.path != resolved]
        self.sources.append(VisualInputs(side_cache, first.required, self.run_config["model"],
                                         max_objects=first.batcher.max_objects,
                                         use_placeholders=self.run_config.get("train_config", {}).get(
                                             "use_placeholder_features", False)))

    def _image_rows(self, posts) -> tuple[list[tuple[int, int | None]], list[str]]:
        """(source, row) per post, and its image status. The first cache that holds the id serves it."""
        from mner.pipeline.cache import STATUS_NAMES

        rows, status = [], []
        for post in posts:
            if not self.sources or not post.image_id:
                rows.append((0, None))
                status.append("no_image")
                continue
            for k, source in enumerate(self.sources):
                try:
                    row = source.cache.row_of(post.image_id)
                except KeyError:
                    continue
                rows.append((k, row))
                name = STATUS_NAMES[int(source.cache.status[row])]
                if name == "placeholder":  # stands in for a missing or unreadable file: say which
                    name = source.cache.detail(row).split(":", 1)[0] or "missing"
                status.append(name)
                break
            else:
                rows.append((0, None))
                status.append("not_in_cache")
        return rows, status

    @torch.no_grad()
    def _decode(self, posts: list[Post], rows) -> tuple[list[list[str]], list[list[float]]]:
        """Tags and entity scores per post, batching the posts of each cache together."""
        from mner.trainer.evaluation.decode import to_device
        from mner.trainer.inputs.batching import Collator, PostDataset
        from mner.trainer.inputs.segments import second_segment_for

        tags: list[list[str] | None] = [None] * len(posts)
        scores: list[list[float] | None] = [None] * len(posts)
        for n, post in enumerate(posts):
            if not post.tokens:
                tags[n], scores[n] = [], []
        order = [n for n in range(len(posts)) if tags[n] is None]
        groups: dict[int, list[int]] = {}
        for n in order:
            groups.setdefault(rows[n][0], []).append(n)
        bar = tqdm(total=len(order), desc="tag", unit="post", disable=not self.progress, leave=False,
                   dynamic_ncols=True, file=sys.stderr)
        second = second_segment_for(type(self.model), self.model.config, self.tokenizer, self.max_length)
        for source_index, members in groups.items():
            source = self.sources[source_index] if self.sources else None
            dataset = PostDataset([posts[n] for n in members], self.tokenizer, label_to_id=None,
                                  max_length=self.max_length,
                                  image_rows=[rows[n][1] for n in members] if source is not None else None)
            collator = Collator(pad_token_id=self.tokenizer.pad_token_id or 0,
                                visual_batcher=source.batcher if source is not None else None, second_segment=second)
            for start in range(0, len(members), self.batch_size):
                chunk = list(range(start, min(start + self.batch_size, len(members))))
                batch = collator([dataset[i] for i in chunk])
                with trace_decoding() as records:
                    paths = self.model.decode(to_device(batch, self.device))
                record = pick_record(records, self.model)
                self.score_kind = decoder_kind(record)
                for row, (i, path) in enumerate(zip(chunk, paths)):
                    n = members[i]
                    kept = batch["word_mask"][row, :len(posts[n].tokens)].tolist()
                    if sum(kept) != len(path):
                        raise RuntimeError(f"model decoded {len(path)} tags for a post with {sum(kept)} kept words")
                    ids = iter(path)
                    label_ids = [next(ids) if keep else None for keep in kept]
                    tags[n] = [self.labels[i] if i is not None else "O" for i in label_ids]
                    scores[n] = self._scores(record, row, tags[n], label_ids, kept)
                bar.update(len(chunk))
        bar.close()
        return tags, scores

    def _scores(self, record, row: int, tags: list[str], label_ids: list, kept: list[bool]) -> list[float]:
        if record is None:
            return [float("nan")] * len(extract_entities(tags))
        packed = [0, *itertools.accumulate(int(k) for k in kept)]  # word column -> kept-word position
        out = []
        for entity_type, first, last in extract_entities(tags):
            out.append(entity_score(record, row, packed[first], packed[last], label_ids[first:last + 1],
                                    entity_type, self.labels, word_positions=list(range(first, last + 1))))
        return out


def _count_status(posts: Sequence[TaggedPost]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for post in posts:
        counts[post.image_status] = counts.get(post.image_status, 0) + 1
    return counts

