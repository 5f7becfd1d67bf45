"""The streaming detokenizer: whole characters only, as soon as they are complete, adding up to `decode`."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_mlx.text.tokenizer import BYTE_ENCODER, StreamingDetokenizer, Tokenizer

EMBEDDING_ROWS = 152_064  # Qwen2.5's embedding is padded past the vocabulary; the model may emit any row
MAX_PENDING = 3  # the longest unfinished UTF-8 character: a lead byte and two of its three continuation bytes

ZWJ_SEQUENCES = ["👨‍👩‍👧‍👦", "👩🏽‍💻", "🏳️‍🌈", "🧑‍🤝‍🧑", "👁️‍🗨️", "🐻‍❄️", "🇯🇵", "👍🏿"]
MULTILINGUAL_PIECES = st.one_of(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),  # ASCII
    st.sampled_from(list(" \n\t")),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK ideographs
    st.characters(min_codepoint=0x3040, max_codepoint=0x30FF),  # kana
    st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3),  # Hangul syllables
    st.characters(min_codepoint=0x0600, max_codepoint=0x06FF),  # Arabic
    st.characters(min_codepoint=0x0E00, max_codepoint=0x0E7F),  # Thai
    st.characters(min_codepoint=0x0400, max_codepoint=0x04FF),  # Cyrillic
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
    st.sampled_from(["\u200d", "\ufe0f", "\u0301", "\U0001f3fd"]),  # ZWJ, VS16, combining accent, skin tone
    st.sampled_from(ZWJ_SEQUENCES),
)
MULTILINGUAL_TEXT = st.lists(MULTILINGUAL_PIECES, max_size=30).map("".join)


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_folder(qwen_tokenizer_dir)


def _stream(tokenizer: Tokenizer, ids: list[int]) -> tuple[list[str], str, list[bytes]]:
    """Feed `ids` one by one: the increments, the finalize() tail, and the pending bytes after each add."""
    detok = tokenizer.detokenizer()
    increments, pending = [], []
    for token in ids:
        increments.append(detok.add(token))
        pending.append(detok.pending)
    return increments, detok.finalize(), pending


def _unfinished_character(data: bytes) -> bool:
    """`data` is the start of one UTF-8 character that more bytes could complete."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start == 0 and e.reason == "unexpected end of data"
    return False


@st.composite
def _resplit_tokens(draw: st.DrawFn, tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids whose bytes are `text`'s, cut at random byte offsets: pieces that are whole characters are encoded,
    the others spelled as single-byte tokens, so token boundaries also fall inside characters."""
    data = text.encode("utf-8")
    cuts = sorted(draw(st.sets(st.integers(0, len(data)), max_size=8)) | {0, len(data)})
    ids: list[int] = []
    for start, end in pairwise(cuts):
        piece = data[start:end]
        try:
            ids += tokenizer.encode(piece.decode("utf-8"))
        except UnicodeDecodeError:
            ids += [tokenizer.token_to_id(BYTE_ENCODER[b]) for b in piece]
    return ids


@settings(max_examples=200, deadline=None)
@given(data=st.data(), text=MULTILINGUAL_TEXT)
def test_increments_of_valid_text_are_whole_characters_that_add_up_to_decode(tokenizer: Tokenizer,
                                                                            data: st.DataObject,
                                                                            text: str) -> None:
    for ids in (tokenizer.encode(text), data.draw(_resplit_tokens(tokenizer, text), label="resplit ids")):
        decoded = tokenizer.decode(ids)
        assert "\ufffd" not in decoded
        increments, tail, pending = _stream(tokenizer, ids)
        for increment in increments:
            assert "\ufffd" not in increment
            increment.encode("utf-8")  # valid text: no lone surrogates
        assert "".join(increments) + tail == decoded
        assert tail == ""
        # Text is released as soon as a character is complete: only an unfinished character is held back.
        assert all(p == b"" or _unfinished_character(p) for p in pending)
        assert all(len(p) <= MAX_PENDING for p in pending)


@settings(max_examples=300, deadline=None)
@given(st.lists(
    st.one_of(
        st.integers(0, 255),  # Qwen's single-byte tokens: lone lead and continuation bytes
        st.integers(0, EMBEDDING_ROWS - 1),
        st.integers(151_643, EMBEDDING_ROWS - 1),  # added tokens and the padding rows past them
    ),
    max_size=40,
))
def test_arbitrary_ids_add_up_to_decode_with_bounded_pending(tokenizer: Tokenizer, ids: list[int]) -> None:
    increments, tail, pending = _stream(tokenizer, ids)
    assert "".join(increments) + tail == tokenizer.decode(ids)
    assert all(len(p) <= MAX_PENDING for p in pending)


def test_split_emoji_zwj_sequence_streams_each_code_point_once_complete(tokenizer: Tokenizer) -> None:
    family = "👨‍👩‍👧‍👦"
    ids = [tokenizer.token_to_id(BYTE_ENCODER[b]) for b in family.encode("utf-8")]
    increments, tail, _ = _stream(tokenizer, ids)
    assert [i for i in increments if i] == list(family)
    assert tail == ""


def test_finalize_flushes_an_unfinished_character_as_decode_renders_it(tokenizer: Tokenizer) -> None:
    ids = [tokenizer.token_to_id(BYTE_ENCODER[b]) for b in "好".encode()[:2]]
    increments, tail, _ = _stream(tokenizer, ids)
    assert increments == ["", ""]
    assert tail == tokenizer.decode(ids) == "\ufffd"


def test_detokenizer_starts_empty_and_is_reusable_after_finalize(tokenizer: Tokenizer) -> None:
    detok = tokenizer.detokenizer()
    assert isinstance(detok, StreamingDetokenizer)
    assert detok.pending == b""
    first = "".join(detok.add(i) for i in tokenizer.encode("你好")) + detok.finalize()
    second = "".join(detok.add(i) for i in tokenizer.encode("世界")) + detok.finalize()
    assert (first, second) == ("你好", "世界")
