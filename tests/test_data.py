"""Dataset reader: formats, normalisation, orphan I- counting, errors with file and line, the sample."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mner.pipeline.data import (
    LABEL_TYPES,
    DataFormatError,
    Dataset,
    hash_files,
    load_dataset,
    read_split,
)
from mner.pipeline.tags import repair_bio

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample" / "twitter_sample"
REAL_T15 = REPO.parent / "shared" / "data" / "twitter2015"

POST_A = "IMGID:101\nGeorge\tB-PER\nZimmerman\tI-PER\nin\tO\nParis\tB-LOC\n"
POST_B = "IMGID:0102\nRT\tO\n@user\tO\n_\tO\nhttp://t.co/x\tO\n#WorldCup\tB-OTHER\n"


def write(folder: Path, name: str, text: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def load_make_images():
    """sample/make_images.py is a script, not a package module: import it by path."""
    spec = importlib.util.spec_from_file_location("make_images", REPO / "sample" / "make_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def error_of(path: Path, **kwargs) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        read_split(path, "train", **kwargs)
    return info.value


# ------------------------------------------------------------------------------------ Twitter format


def test_twitter_format_reads_posts(tmp_path):
    path = write(tmp_path, "train.txt", POST_A + "\n" + POST_B)
    posts = read_split(path, "train")
    assert [p.post_id for p in posts] == ["train-0", "train-1"]
    assert posts[0].tokens == ("George", "Zimmerman", "in", "Paris")
    assert posts[0].tags == ("B-PER", "I-PER", "O", "B-LOC")
    assert posts[1].image_id == "0102"  # a string: leading zero kept
    assert posts[1].tokens[2:4] == ("_", "http://t.co/x")
    assert posts[1].tags[-1] == "B-MISC"
    assert posts[1].source == f"{path}:7"


def test_tokens_keep_unusual_characters(tmp_path):
    # spaces, NBSP and U+2028 inside tokens; CRLF line endings and a BOM are accepted
    text = "IMGID:1\r\nNew York\tB-LOC\r\na\u00a0b\tO\r\nx\u2028y\tO\r\nIMGID:9\tO\r\n"
    path = write(tmp_path, "test.txt", b"\xef\xbb\xbf" + text.encode("utf-8"))
    (post,) = read_split(path, "test")
    assert post.tokens == ("New York", "a\u00a0b", "x\u2028y", "IMGID:9")  # with a TAB it is a token


def test_other_normalised_to_misc_with_note(tmp_path):
    write(tmp_path, "train.txt", POST_B + "\nIMGID:7\nGame\tB-OTHER\nof\tI-OTHER\nThrones\tI-OTHER\n")
    data = load_dataset(tmp_path)
    assert data.splits["train"][1].tags == ("B-MISC", "I-MISC", "I-MISC")
    assert any("renamed 4 OTHER tags to MISC" in note for note in data.notes)
    assert data.labels == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]


def test_extra_types_sorted_after_standard_ones(tmp_path):
    write(tmp_path, "test.txt", "IMGID:1\nx\tB-ZOO\ny\tB-EVENT\nz\tB-PER\n")
    assert load_dataset(tmp_path).labels[-4:] == ["B-EVENT", "I-EVENT", "B-ZOO", "I-ZOO"]


def test_orphan_i_counted_and_kept(tmp_path):
    text = "IMGID:1\na\tI-PER\nb\tI-PER\nc\tO\nd\tI-LOC\n\nIMGID:2\ne\tB-ORG\nf\tI-LOC\ng\tB-PER\nh\tI-PER\n"
    write(tmp_path, "train.txt", text)
    write(tmp_path, "test.txt", POST_A)
    data = load_dataset(tmp_path)
    assert data.orphan_i == {"train": 3, "test": 0}
    assert data.splits["train"][0].tags == ("I-PER", "I-PER", "O", "I-LOC")  # kept as is
    assert any("train: 3 orphan I-" in note for note in data.notes)


def test_repair_bio():
    tags, count = repair_bio(("I-PER", "I-PER", "O", "B-LOC", "I-ORG", "I-ORG", "B-PER", "I-PER"))
    assert tags == ["B-PER", "I-PER", "O", "B-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert count == 2
    assert repair_bio([]) == ([], 0)


def test_bioes_converted_to_bio(tmp_path):
    write(tmp_path, "train.txt", "IMGID:1\nNew\tB-LOC\nYork\tE-LOC\nJo\tS-PER\nand\tO\nLa\tB-ORG\nX\tI-ORG\nY\tE-ORG\n")
    data = load_dataset(tmp_path)
    assert data.splits["train"][0].tags == ("B-LOC", "I-LOC", "B-PER", "O", "B-ORG", "I-ORG", "I-ORG")
    assert any("BIOES" in note and "3 S-/E- tags" in note for note in data.notes)
    assert data.orphan_i == {"train": 0}


def test_split_file_names(tmp_path):
    for name in ("train.txt", "val.txt", "test.txt"):
        write(tmp_path, name, POST_A)
    data = load_dataset(tmp_path)
    assert set(data.splits) == {"train", "dev", "test"}
    assert data.files["dev"].endswith("val.txt")
    assert data.splits["dev"][0].split == "dev" and data.splits["dev"][0].post_id == "dev-0"


def test_ambiguous_dev_files_rejected(tmp_path):
    write(tmp_path, "valid.txt", POST_A)
    write(tmp_path, "dev.txt", POST_A)
    with pytest.raises(DataFormatError, match="several files for split 'dev'"):
        load_dataset(tmp_path)


def test_single_file_is_test_split_and_image_ids(tmp_path):
    path = write(tmp_path, "posts.txt", POST_A + "\n" + POST_B)
    data = load_dataset(path)
    assert list(data.splits) == ["test"]
    assert data.image_ids() == ["0102", "101"]


def test_duplicate_image_ids_across_splits_allowed(tmp_path):
    write(tmp_path, "train.txt", POST_A)
    write(tmp_path, "test.txt", POST_A)
    assert load_dataset(tmp_path).image_ids() == ["101"]


def test_unlabelled_reading(tmp_path):
    path = write(tmp_path, "test.txt", "IMGID:5\nhello\nParis\n\nIMGID:6\nlabelled\tO\n")
    posts = read_split(path, "test", require_tags=False)
    assert posts[0].tokens == ("hello", "Paris") and posts[0].tags is None
    assert posts[1].tags == ("O",)  # tags kept where present
    err = error_of(path)  # the same file with require_tags=True names the first untagged line
    assert err.line == 2 and "no TAB" in str(err)


def test_unlabelled_mixed_post_rejected(tmp_path):
    path = write(tmp_path, "test.txt", "IMGID:5\nhello\tO\nParis\n")
    err = error_of(path, require_tags=False)
    assert (err.path, err.line) == (str(path), 3)


def test_unknown_format_value(tmp_path):
    path = write(tmp_path, "test.txt", POST_A)
    with pytest.raises(ValueError, match="valid values: auto, twitter, conll"):
        read_split(path, "test", fmt="json")


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("IMGID:1\nGeorge B-PER\n", 2, "no TAB"),
        ("IMGID:1\nGeorge\t\n", 2, "empty tag"),
        ("IMGID:1\nok\tO\nGeorge\tX-PER\n", 3, "not BIO"),
        ("IMGID:1\nGeorge\tB-\n", 2, "not BIO"),
        ("IMGID:1\nGeorge\tb-per\n", 2, "not BIO"),
        ("IMGID:1\na\tO\nb\tO\tO\n", 3, "3 TAB-separated fields"),
        ("IMGID:1\n\tO\n", 2, "empty token"),
        ("IMGID:1\na\tO\n\nb\tO\n", 4, "post without an IMGID line"),
        ("a\tO\n\nIMGID:2\nb\tO\n", 1, "post without an IMGID line"),
        ("IMGID:1\na\tO\n\nIMGID:2\nb\tO\n\nIMGID:1\nc\tO\n", 7, "already used at line 1"),
        ("IMGID:1\n\nIMGID:2\nb\tO\n", 1, "IMGID line with no tokens"),
        ("IMGID:\nb\tO\n", 1, "IMGID line without an id"),
        ("\n\n  \n", 1, "file is empty"),
        ("", 1, "file is empty"),
    ],
)
def test_bad_twitter_input_names_file_and_line(tmp_path, text, line, message):
    path = write(tmp_path, "train.txt", text)
    err = error_of(path)
    assert err.path == str(path) and err.line == line
    assert str(err).startswith(f"{path}:{line}: ") and message in str(err)
    assert "; " in str(err)  # every message says what to do


def test_invalid_utf8_names_line(tmp_path):
    path = write(tmp_path, "train.txt", b"IMGID:1\nok\tO\ncaf\xe9\tO\n")
    err = error_of(path)
    assert (err.path, err.line) == (str(path), 3) and "invalid UTF-8" in str(err)


def test_error_in_folder_names_split_file(tmp_path):
    write(tmp_path, "train.txt", POST_A)
    write(tmp_path, "valid.txt", POST_B)
    write(tmp_path, "test.txt", "IMGID:1\nx\tO\ny\tZ-PER\n")
    with pytest.raises(DataFormatError) as info:
        load_dataset(tmp_path)
    assert info.value.path == str(tmp_path / "test.txt") and info.value.line == 3


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(DataFormatError, match="no such file or folder"):
        load_dataset(tmp_path / "absent")
    with pytest.raises(DataFormatError, match="no split files found"):
        load_dataset(tmp_path)


# ------------------------------------------------------------------------------------ CoNLL format


def test_conll_with_image_comments(tmp_path):
    text = "# image: 007\nGeorge B-PER\nwas\tO\n\n# image: 8\n-DOCSTART- O\nMiami B-LOC\n"
    path = write(tmp_path, "train.txt", text)
    posts = read_split(path, "train")
    assert [p.image_id for p in posts] == ["007", "8"]
    assert posts[0].tags == ("B-PER", "O") and posts[1].tokens == ("Miami",)
    assert posts[0].source == f"{path}:1"


def test_conll_comment_missing_for_one_sentence(tmp_path):
    path = write(tmp_path, "train.txt", "# image: 1\na O\n\nb O\n")
    err = error_of(path)
    assert err.line == 4 and "without a '# image: <id>' line" in str(err)


def test_conll_with_sidecar(tmp_path):
    write(tmp_path, "valid.txt", "-DOCSTART- O\n\nGeorge B-PER\n\nParis B-LOC\nrocks O\n")
    sidecar = write(tmp_path, "valid.images.txt", "0042\n43\n")
    write(tmp_path, "train.txt", POST_A)  # formats may differ per split
    data = load_dataset(tmp_path)
    assert [p.image_id for p in data.splits["dev"]] == ["0042", "43"]
    assert data.data_hash == hash_files([tmp_path / "train.txt", tmp_path / "valid.txt", sidecar])
    sidecar.write_text("0042\n43\n44\n")
    with pytest.raises(DataFormatError) as info:
        load_dataset(tmp_path)
    assert info.value.path == str(sidecar) and info.value.line == 3 and "3 image ids for 2 sentences" in str(info.value)


def test_conll_sidecar_duplicate_and_too_short(tmp_path):
    path = write(tmp_path, "train.txt", "a O\n\nb O\n\nc O\n")
    sidecar = write(tmp_path, "train.images.txt", "1\n1\n")
    err = error_of(path)
    assert (err.path, err.line) == (str(sidecar), 2) and "repeated" in str(err)
    sidecar.write_text("1\n2\n")
    err = error_of(path)
    assert (err.path, err.line) == (str(path), 5) and "sentence 3 has no image id" in str(err)


def test_conll_text_only_and_bad_lines(tmp_path):
    write(tmp_path, "test.txt", "John B-PER\nsmiles O\n\nRome B-LOC\n")
    data = load_dataset(tmp_path)
    assert [p.image_id for p in data.splits["test"]] == [None, None]
    assert any("text only" in note for note in data.notes)
    path = write(tmp_path, "train.txt", "John B-PER\nNew York B-LOC\n")
    err = error_of(path)
    assert err.line == 2 and "found 3" in str(err)
    path = write(tmp_path, "train.txt", "John B-PER\nsmiles X-O\n")
    assert error_of(path).line == 2


def test_conll_unlabelled_and_forced_format(tmp_path):
    path = write(tmp_path, "test.txt", "# image: 3\nJohn\nsmiles\n")
    (post,) = read_split(path, "test", require_tags=False)
    assert post.tags is None and post.image_id == "3"
    twitter = write(tmp_path, "t.txt", POST_A)
    with pytest.raises(DataFormatError, match="found 1"):
        read_split(twitter, "test", fmt="conll")  # the IMGID line is not a 'token tag' line


# ------------------------------------------------------------------------------------ hash


def test_hash_stable_and_content_sensitive(tmp_path):
    a = write(tmp_path / "a", "train.txt", POST_A)
    b = write(tmp_path / "b", "train.txt", POST_A)
    assert hash_files([a]) == hash_files([b])  # folder does not matter
    t = write(tmp_path / "a", "test.txt", POST_B)
    assert hash_files([a, t]) == hash_files([t, a])  # order does not matter
    assert len(hash_files([a])) == 64
    first = load_dataset(tmp_path / "a").data_hash
    assert first == load_dataset(tmp_path / "a").data_hash == hash_files([a, t])
    a.write_text(POST_A.replace("Paris", "Pariz"))
    assert load_dataset(tmp_path / "a").data_hash != first
    renamed = write(tmp_path / "c", "test.txt", POST_A)
    assert hash_files([renamed]) != hash_files([b])  # the name is hashed too


# ------------------------------------------------------------------------------------ the sample


def test_bundled_sample_loads():
    data = load_dataset(SAMPLE)
    assert isinstance(data, Dataset)
    assert {split: len(posts) for split, posts in data.splits.items()} == {"train": 36, "dev": 12, "test": 12}
    assert data.orphan_i == {"train": 1, "dev": 0, "test": 0}
    assert any("OTHER tags to MISC" in note for note in data.notes)
    found = {tag[2:] for posts in data.splits.values() for p in posts for tag in p.tags if tag != "O"}
    assert found == set(LABEL_TYPES)
    for posts in data.splits.values():  # unique ids within a split
        assert len({p.image_id for p in posts}) == len(posts)


def test_sample_images_decide_ambiguous_names():
    """A name tagged both PER and LOC in the sample is PER exactly with person images (id 1...)."""
    make_images = load_make_images()
    data = load_dataset(SAMPLE)
    types_by_name: dict[str, set[str]] = {}
    for posts in data.splits.values():
        for post in posts:
            for token, tag in zip(post.tokens, post.tags):
                if tag.startswith("B-"):
                    types_by_name.setdefault(token, set()).add(tag[2:])
    ambiguous = {name for name, types in types_by_name.items() if types == {"PER", "LOC"}}
    assert len(ambiguous) >= 6
    for posts in data.splits.values():
        for post in posts:
            for token, tag in zip(post.tokens, post.tags):
                if token in ambiguous and tag.startswith("B-"):
                    kind = make_images.image_kind(post.image_id)
                    assert (kind, tag) in {("person", "B-PER"), ("place", "B-LOC")}, post


def test_make_image_kinds_are_visually_distinct():
    make_images = load_make_images()
    for seed in range(3):
        person = np.asarray(make_images.make_image("person", seed), dtype=float)  # (120, 160, 3)
        place = np.asarray(make_images.make_image("place", seed), dtype=float)
        plain = np.asarray(make_images.make_image("plain", seed), dtype=float)
        assert person.shape == (120, 160, 3)
        red_excess = (person[..., 0] - person[..., 1:].max(-1) > 100).mean()
        assert 0.03 < red_excess < 0.5  # a red figure, background dark
        assert place[:20, :, 2].mean() > place[:20, :, 0].mean() + 60  # blue sky on top
        assert place[-20:, :, 1].mean() > place[-20:, :, 2].mean() + 50  # green ground below
        assert plain.std(axis=(0, 1)).max() < 15  # no structure
    same = make_images.make_image("place", 5), make_images.make_image("place", 5)
    assert np.array_equal(np.asarray(same[0]), np.asarray(same[1]))
    with pytest.raises(ValueError, match="valid kinds"):
        make_images.make_image("dog", 0)


def test_generate_sample_images_writes_good_and_bad_files(tmp_path):
    make_images = load_make_images()
    ids = make_images.sample_image_ids(SAMPLE)
    kinds = {image_id: make_images.image_kind(image_id) for image_id in ids}
    assert {"person", "place", "plain", "missing", "unreadable", "truncated"} <= set(kinds.values())
    make_images.generate_sample_images(tmp_path, kinds)
    for image_id, kind in kinds.items():
        path = tmp_path / f"{image_id}.jpg"
        if kind == "missing":
            assert not path.exists()
        elif kind == "unreadable":
            assert path.stat().st_size == 0
        elif kind == "truncated":
            with pytest.raises(OSError):
                Image.open(path).load()
        else:
            with Image.open(path) as image:
                assert image.size == (160, 120) and image.format == "JPEG"
    first = (tmp_path / "10001.jpg").read_bytes()
    make_images.generate_sample_images(tmp_path, {"10001": "person"})
    assert (tmp_path / "10001.jpg").read_bytes() == first  # deterministic


# ------------------------------------------------------------------------------------ real data


@pytest.mark.skipif(not REAL_T15.is_dir(), reason="Twitter-2015 not present at ../shared/data/twitter2015")
def test_real_twitter2015_loads():
    from seqeval.metrics.sequence_labeling import get_entities

    data = load_dataset(REAL_T15)
    assert {split: len(posts) for split, posts in data.splits.items()} == {"train": 4000, "dev": 1000, "test": 3257}
    assert data.orphan_i == {"train": 186, "dev": 53, "test": 135}
    test_tags = [list(post.tags) for post in data.splits["test"]]
    assert len(get_entities(test_tags)) == 5207  # seqeval: an orphan I- starts an entity
    assert sum(tag.startswith("B-") for tags in test_tags for tag in tags) == 5072
    assert data.labels == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
    assert data.splits["train"][0].image_id == "1015799"
    assert any("renamed 3643 OTHER tags to MISC" in note for note in data.notes)


@pytest.mark.parametrize("tag, message", [
    ("B-PER-X", "entity type 'PER-X' contains '-'"),  # never read as a new type PER-X
    ("I-PER-", "contains '-'"),
    ("B-1PER", "is not a name"),
    ("B-PE.R", "is not a name"),
])
def test_tag_grammar_refuses_unclear_tags(tmp_path, tag, message):
    path = write(tmp_path, "test.txt", f"IMGID:1\nGeorge\t{tag}\n")
    with pytest.raises(DataFormatError, match=rf"test.txt:2: .*{message}"):
        read_split(path, "test")
    ok = write(tmp_path, "ok.txt", "IMGID:1\nGeorge\tS-WORK_OF_ART\nx\tB-PER\ny\tE-PER\n")
    assert read_split(ok, "test")[0].tags == ("B-WORK_OF_ART", "B-PER", "I-PER")


def test_image_ids_with_surrounding_whitespace_are_errors(tmp_path):
    for text, line in (("IMGID:trail \nGeorge\tB-PER\n", 1), ("IMGID:1\nx\tO\n\nIMGID: 2\ny\tO\n", 4)):
        path = write(tmp_path, "test.txt", text)
        with pytest.raises(DataFormatError, match=rf"test.txt:{line}: image id .* has whitespace around it"):
            read_split(path, "test")
    conll = write(tmp_path, "c.txt", "# image: 42 \nGeorge B-PER\n")
    with pytest.raises(DataFormatError, match=r"c.txt:1: image id '42' has whitespace after it"):
        read_split(conll, "test", fmt="conll")
    write(tmp_path, "s.images.txt", "42 \n")
    sidecar = write(tmp_path, "s.txt", "George B-PER\n")
    with pytest.raises(DataFormatError, match=r"s.images.txt:1: image id '42' has whitespace around it"):
        read_split(sidecar, "test", fmt="conll")
    assert read_split(write(tmp_path, "t.txt", "IMGID:0042\nx\tO\n"), "test")[0].image_id == "0042"
