"""Word/sub-word alignment: zero-piece words, truncation, long words, WordPiece and byte-level BPE."""

from __future__ import annotations

import pytest

from mner.trainer.inputs.align import align_posts, align_words


@pytest.fixture(scope="module")
def bert_tokenizer(tiny_bert):
    from mner.trainer.inputs.text_encoder import load_tokenizer

    return load_tokenizer(str(tiny_bert))


@pytest.fixture(scope="module")
def roberta_tokenizer(tmp_path_factory):
    """A tiny byte-level BPE tokenizer trained offline, wrapped like RoBERTa (add_prefix_space)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-roberta")
    bpe = ByteLevelBPETokenizer()
    corpus = ["John Smith visits Paris today", "Apple and Google meet in London", "the new game is fun"] * 20
    bpe.train_from_iterator(corpus, vocab_size=1000, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    return RobertaTokenizerFast.from_pretrained(str(folder), add_prefix_space=True)


def check_alignment(tokenizer, words, aligned):
    """Every kept word's first piece decodes to the start of that word: labels cannot be shifted."""
    for w, (position, kept) in enumerate(zip(aligned.word_index, aligned.word_mask)):
        if not kept:
            assert position == 0
            continue
        piece = tokenizer.decode([aligned.input_ids[position]]).strip().replace("##", "")
        assert piece, f"word {w} points at an empty piece"
        assert words[w].lower().startswith(piece.lower()), (words[w], piece)


def test_one_index_per_word_on_first_piece(bert_tokenizer):
    words = ["John", "smithson", "visits", "Paris"]
    aligned = align_words(bert_tokenizer, words, max_length=64)
    assert aligned.word_mask == [True] * 4
    assert aligned.word_index[0] == 1  # right after [CLS]
    assert aligned.word_index == sorted(aligned.word_index)
    # "smithson" is several pieces: the next word starts after all of them
    assert aligned.word_index[2] - aligned.word_index[1] > 1
    check_alignment(bert_tokenizer, words, aligned)


def test_zero_piece_words_are_masked_not_shifted(bert_tokenizer):
    words = ["\u200b", "john", "\u200b", "paris", "\ufeff"]
    aligned, report = align_posts(bert_tokenizer, [words], max_length=64)
    post = aligned[0]
    assert post.word_mask == [False, True, False, True, False]
    assert report.zero_piece == 3 and report.truncated == 0
    # john / paris keep their own first pieces
    assert bert_tokenizer.convert_ids_to_tokens(post.input_ids[post.word_index[1]]) == "john"
    assert bert_tokenizer.convert_ids_to_tokens(post.input_ids[post.word_index[3]]) == "paris"
    assert "zero sub-word pieces" in report.message()


def test_truncation_masks_words_past_max_length(bert_tokenizer):
    words = ["london"] * 20
    aligned, report = align_posts(bert_tokenizer, [words, ["paris"]], max_length=8)
    first = aligned[0]
    assert len(first.input_ids) == 8
    assert first.word_mask == [True] * 6 + [False] * 14  # [CLS] + 6 words + [SEP]
    assert first.word_index[:6] == [1, 2, 3, 4, 5, 6]
    assert report.truncated == 14 and report.posts_truncated == 1 and report.zero_piece == 0
    assert aligned[1].word_mask == [True]
    assert "max_length" in report.message()


def test_long_word_cut_inside_keeps_its_first_piece(bert_tokenizer):
    words = ["a", "x" * 40, "the"]  # 40 single-letter pieces for the long word
    aligned, report = align_posts(bert_tokenizer, [words], max_length=10)
    post = aligned[0]
    assert post.word_mask == [True, True, False]
    assert post.word_index[:2] == [1, 2]
    assert report.truncated == 1


def test_roberta_style_byte_level_bpe(roberta_tokenizer):
    words = ["John", "Smith", "visits", "Parisxyz", "\u200b", "😀", "today"]
    aligned, report = align_posts(roberta_tokenizer, [words], max_length=64)
    post = aligned[0]
    # byte-level BPE never loses a word: every word has at least one piece
    assert post.word_mask == [True] * len(words)
    assert report.zero_piece == 0
    assert post.input_ids[0] == roberta_tokenizer.convert_tokens_to_ids("<s>")
    assert len(set(post.word_index)) == len(words)
    assert post.word_index == sorted(post.word_index)
    # the pieces from a word's first piece up to the next word's decode to exactly that word
    bounds = [*post.word_index, len(post.input_ids) - 1]
    for w, word in enumerate(words):
        assert roberta_tokenizer.decode(post.input_ids[bounds[w] : bounds[w + 1]]) == " " + word
    assert roberta_tokenizer.convert_ids_to_tokens(post.input_ids[post.word_index[1]]) == "ĠSmith"


def test_roberta_truncation(roberta_tokenizer):
    words = ["Smith"] * 30  # one piece each ("ĠSmith")
    aligned, report = align_posts(roberta_tokenizer, [words], max_length=12)
    assert sum(aligned[0].word_mask) == 10
    assert report.truncated == 20


def test_slow_tokenizer_refused():
    class Slow:
        is_fast = False

    with pytest.raises(TypeError, match="fast"):
        align_words(Slow(), ["a"], max_length=8)
