"""Unit tests of reading labelled training CSVs (no model involved)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fmplex.control.train import TrainError, read_labelled_csv

DATA = Path(__file__).resolve().parents[2] / "fmplex" / "data"


def write(tmp_path: Path, text: str, name: str = "train.csv", encoding: str = "utf-8") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


def test_with_header(tmp_path):
    p = write(tmp_path, "text,label\ngood film,pos\nbad film,neg\n")
    assert read_labelled_csv(p) == (["good film", "bad film"], ["pos", "neg"])


def test_header_is_case_and_space_insensitive(tmp_path):
    p = write(tmp_path, " Text , LABEL \ngood film,pos\nbad film,neg\n")
    assert read_labelled_csv(p) == (["good film", "bad film"], ["pos", "neg"])


def test_without_header(tmp_path):
    p = write(tmp_path, "good film,pos\nbad film,neg\n")
    assert read_labelled_csv(p) == (["good film", "bad film"], ["pos", "neg"])


def test_quoted_commas_and_quotes(tmp_path):
    p = write(tmp_path, 'text,label\n"Hey, nice to meet you.",greeting\n"He said ""no, thanks""",refusal\n')
    texts, labels = read_labelled_csv(p)
    assert texts == ["Hey, nice to meet you.", 'He said "no, thanks"']
    assert labels == ["greeting", "refusal"]


def test_blank_lines_skipped_and_fields_stripped(tmp_path):
    p = write(tmp_path, "text,label\n\n  good film , pos \n,\n\nbad film,neg\n")
    assert read_labelled_csv(p) == (["good film", "bad film"], ["pos", "neg"])


def test_crlf_line_endings(tmp_path):
    p = write(tmp_path, "text,label\r\ngood film,pos\r\nbad film,neg\r\n")
    assert read_labelled_csv(p) == (["good film", "bad film"], ["pos", "neg"])


@pytest.mark.parametrize("bad_row,cols", [("lonely text", 1), ("a,b,c", 3), ("unquoted, comma,pos", 3)])
def test_wrong_column_count_names_row(tmp_path, bad_row, cols):
    p = write(tmp_path, f"good film,pos\n{bad_row}\nbad film,neg\n")
    with pytest.raises(TrainError) as info:
        read_labelled_csv(p)
    msg = str(info.value)
    assert "row 2" in msg
    assert f"{cols} columns" in msg
    assert str(p) in msg


@pytest.mark.parametrize("bad_row", [",pos", "good film,", "  ,pos"])
def test_empty_text_or_label_refused(tmp_path, bad_row):
    p = write(tmp_path, f"good film,pos\nbad film,neg\n{bad_row}\n")
    with pytest.raises(TrainError, match="row 3"):
        read_labelled_csv(p)


def test_empty_label_message_is_accurate(tmp_path):
    p = write(tmp_path, "good film,pos\nbad film,\n")
    with pytest.raises(TrainError) as info:
        read_labelled_csv(p)
    assert "has 2 columns" not in str(info.value)


@pytest.mark.parametrize("body", ["a,pos\nb,pos\nc,pos\n", "text,label\nonly,one\n", "text,label\n", ""])
def test_fewer_than_two_labels_refused(tmp_path, body):
    p = write(tmp_path, body)
    with pytest.raises(TrainError, match="at least two different labels"):
        read_labelled_csv(p)


def test_missing_file(tmp_path):
    with pytest.raises(TrainError, match="does not exist"):
        read_labelled_csv(tmp_path / "nope.csv")


def test_non_utf8_file(tmp_path):
    p = write(tmp_path, "text,label\nna\u00efve caf\u00e9,pos\nbad,neg\n", encoding="latin-1")
    with pytest.raises(TrainError, match="not UTF-8"):
        read_labelled_csv(p)


def test_utf8_bom_header_recognised(tmp_path):
    p = write(tmp_path, "text,label\ngood film,pos\nbad film,neg\n", encoding="utf-8-sig")
    assert read_labelled_csv(p) == (["good film", "bad film"], ["pos", "neg"])


@pytest.mark.parametrize("name", ["intent.csv", "sentiment.csv", "topic.csv"])
def test_shipped_data_files_load(name):
    texts, labels = read_labelled_csv(DATA / name)
    assert len(texts) == len(labels) >= 10
    assert len(set(labels)) >= 2
    assert "label" not in labels and "text" not in texts  # the header was recognised
    assert all(t and t == t.strip() for t in texts)


def test_three_shipped_data_files():
    assert {"intent.csv", "sentiment.csv", "topic.csv"} <= {p.name for p in DATA.glob("*.csv")}
