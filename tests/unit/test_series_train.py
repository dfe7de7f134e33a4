"""The classifier's training CSV (``label,x1,x2,...``): what is read, and one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest

from fmplex.families.timeseries import demo_data as dd
from fmplex.families.timeseries.train import TrainError, read_labelled_series


def write(tmp_path, text: str):
    p = tmp_path / "train.csv"
    p.write_text(text, encoding="utf-8")
    return p


def test_ragged_rows_header_missing_and_padding(tmp_path):
    body = "label,values...\n" + "up," + ",".join(str(i) for i in range(10)) + ",,\n"
    body += "down," + ",".join(str(-i) for i in range(12)) + "\n"
    body += "up,1,2,,4,5,6,7,8,9,nan,nan\n"
    rows, labels = read_labelled_series(write(tmp_path, body))
    assert labels == ["up", "down", "up"]
    assert [len(r) for r in rows] == [10, 12, 9]  # trailing empty fields and NaN are padding
    assert np.isnan(rows[2][2]) and rows[2].dtype == np.float32


def test_demo_windows_round_trip_through_the_csv(tmp_path):
    rows, labels = dd.labelled_windows(per_label=4, seed=3)
    back, back_labels = read_labelled_series(dd.write_labelled_csv(tmp_path / "w.csv", rows, labels))
    assert back_labels == labels
    for a, b in zip(rows, back):
        # write_labelled_csv keeps inner gaps; a window ending in a gap is shorter once read
        n = len(b)
        np.testing.assert_array_equal(a[:n], b)
        assert np.isnan(a[n:]).all()


@pytest.mark.parametrize(
    "body, match",
    [
        (",1,2,3,4,5,6,7,8\nb,1,2,3,4,5,6,7,8\n", "row 1 has an empty label"),
        ("a,1,2,x,4,5,6,7,8\nb,1,2,3,4,5,6,7,8\n", "row 1 has a value that is not a number: 'x'"),
        ("a,1,2,inf,4,5,6,7,8\nb,1,2,3,4,5,6,7,8\n", "row 1 has an infinite value"),
        ("a,1,2,3\nb,1,2,3,4,5,6,7,8\n", "row 1 has 3 values; a series needs at least 8"),
        ("a,1,2,3,4,5,6,7,8\na,1,2,3,4,5,6,7,8\n", "need at least two different labels"),
    ],
)
def test_bad_training_files_are_refused(tmp_path, body, match):
    with pytest.raises(TrainError, match=match):
        read_labelled_series(write(tmp_path, body))


def test_missing_file(tmp_path):
    with pytest.raises(TrainError, match="does not exist"):
        read_labelled_series(tmp_path / "nope.csv")
