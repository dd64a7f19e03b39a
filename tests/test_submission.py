"""glr.submission: rows from kNN results, the kNN label vote, validation, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from glr.submission import (
    read_submission,
    recognition_predictions,
    recognition_rows,
    retrieval_rows,
    validate_submission,
    validate_submission_file,
    write_submission,
)
from glr.utils import InputError

INDEX = [f"i{j:03d}" for j in range(150)]


# --------------------------------------------------------------------------- retrieval_rows
def test_retrieval_rows_maps_indices_to_ids_in_rank_order():
    I = np.array([[2, 0, 1], [1, 1, 0], [-1, -1, -1], [0, -1, 2]])
    rows = retrieval_rows(["a", "b", "c", "d"], ["x", "y", "z"], I)
    assert rows == [("a", "z x y"), ("b", "y x"), ("c", ""), ("d", "x z")]


def test_retrieval_rows_truncates_to_100_after_skipping_padding_and_duplicates():
    row = [-1, 5, 5] + list(range(150))  # padding, a repeat, then 5 again inside the range
    rows = retrieval_rows(["q"], INDEX, np.array([row]))
    images = rows[0][1].split(" ")
    assert len(images) == 100 and len(set(images)) == 100
    # i005, then i000..i099 without i005: exactly 100 distinct ids
    assert images[:3] == ["i005", "i000", "i001"] and images[-1] == "i099"
    assert retrieval_rows(["q"], INDEX, np.array([row]), max_images=2) == [("q", "i005 i000")]


def test_retrieval_rows_dedupes_repeated_index_ids():
    assert retrieval_rows(["q"], ["x", "x", "y"], np.array([[0, 1, 2]])) == [("q", "x y")]


def test_retrieval_rows_checks_its_inputs():
    with pytest.raises(ValueError, match="shape"):
        retrieval_rows(["a", "b"], INDEX, np.zeros((1, 3), int))
    with pytest.raises(ValueError, match="outside"):
        retrieval_rows(["a"], ["x"], np.array([[1]]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_rows(["a"], ["x"], np.array([[-2]]))
    with pytest.raises(TypeError, match="strings"):
        retrieval_rows([17], ["x"], np.array([[0]]))
    with pytest.raises(ValueError, match="max_images"):
        retrieval_rows(["a"], ["x"], np.array([[0]]), max_images=101)


# --------------------------------------------------------------------------- recognition
def test_recognition_vote_hand_computed():
    I = np.arange(5)[None]
    labels = [3, 5, 3, 5, 7]
    # label 3: 0.9 + 0.7 = 1.6 beats label 5: 0.8 + 0.75 = 1.55
    lab, score = recognition_predictions(np.array([[0.9, 0.8, 0.7, 0.75, 0.1]]), I, labels)
    assert lab.tolist() == [3] and score.dtype == np.float32
    np.testing.assert_allclose(score, [1.6], rtol=1e-6)
    # label 5: 0.8 + 0.75 = 1.55 beats label 3: 0.9 + 0.6 = 1.5 although 3 is the top-1
    lab, score = recognition_predictions(np.array([[0.9, 0.8, 0.6, 0.75, 0.1]]), I, labels)
    assert lab.tolist() == [5]
    np.testing.assert_allclose(score, [1.55], rtol=1e-6)
    # top_k=1 is the nearest neighbour's label
    lab, score = recognition_predictions(np.array([[0.9, 0.8, 0.6, 0.75, 0.1]]), I, labels, top_k=1)
    assert lab.tolist() == [3] and score.tolist() == pytest.approx([0.9])


def test_recognition_vote_ties_padding_and_per_neighbour_labels():
    S = np.array([[0.5, 0.5, 0.5, 0.5], [0.9, 0.2, 0.0, 0.0], [0.3, 0.3, 0.0, 0.0]], np.float32)
    I = np.array([[0, 1, 2, 3], [-1, 2, -1, -1], [-1, -1, -1, -1]])
    db_labels = np.array([8, 4, 4, 8])  # row 0: 8 and 4 tie at 1.0; 8 ranks first
    lab, score = recognition_predictions(S, I, db_labels, top_k=4)
    assert lab.tolist() == [8, 4, -1]
    np.testing.assert_allclose(score, [1.0, 0.2, 0.0])
    # the same with the labels already gathered per neighbour (unlabelled = -1 does not vote)
    L = np.array([[8, 4, 4, 8], [-1, 4, -1, -1], [-1, -1, -1, -1]])
    lab2, score2 = recognition_predictions(S, np.where(I < 0, 0, I), L, top_k=4)
    assert lab2.tolist() == [8, 4, -1]
    np.testing.assert_allclose(score2, score)


def test_recognition_vote_matches_a_python_loop_on_random_data():
    rng = np.random.default_rng(1)
    S = -np.sort(-rng.random((200, 10)), axis=1).astype(np.float32)
    I = rng.integers(0, 50, (200, 10))
    db_labels = rng.integers(0, 6, 50)
    lab, score = recognition_predictions(S, I, db_labels, top_k=7)
    for i in range(200):
        sums: dict[int, float] = {}
        for j in range(7):
            sums[int(db_labels[I[i, j]])] = sums.get(int(db_labels[I[i, j]]), 0.0) + float(S[i, j])
        best = max(sums.values())
        assert score[i] == pytest.approx(best, rel=1e-6)
        assert sums[int(lab[i])] == pytest.approx(best, rel=1e-9)


def test_recognition_rows_format():
    rows = recognition_rows(
        ["a", "b", "c", "d"], np.array([142820, -1, 1, 0]), np.array([0.87, 0.5, 3.5e-05, 1.55], np.float32)
    )
    assert rows == [("a", "142820 0.87"), ("b", ""), ("c", "1 3.5e-05"), ("d", "0 1.55")]
    validate_submission(rows, "recognition")
    with pytest.raises(ValueError, match="not finite"):
        recognition_rows(["a"], [1], [float("nan")])


# --------------------------------------------------------------------------- validation
GOOD_RETRIEVAL = [("q1", "i001 i002"), ("q2", ""), ("q3", "i003")]
GOOD_RECOGNITION = [("q1", "12 0.5"), ("q2", ""), ("q3", "7 -1.5e-3")]


def test_valid_submissions_pass():
    validate_submission(GOOD_RETRIEVAL, "retrieval", expected_ids={"q1", "q2", "q3"}, index_ids=INDEX)
    validate_submission(GOOD_RECOGNITION, "recognition", expected_ids=["q3", "q2", "q1"])
    validate_submission([("q", " ".join(INDEX[:100]))], "retrieval", index_ids=INDEX)


def _rejects(rows, task, match, line, rid, **kw):
    with pytest.raises(InputError, match=match) as info:
        validate_submission(rows, task, **kw)
    msg = str(info.value)
    assert info.value.line == line
    if line is not None:
        assert f"line {line}" in msg
    if rid is not None:
        assert repr(rid) in msg
    return msg


BAD_COMMON = [
    ([("q1", "")] + [("", "")], "empty id", 3, ""),
    ([("q1", ""), ("q2", ""), ("q1", "")], "duplicate id", 4, "q1"),
    ([("q 1", "")], "id contains", 2, "q 1"),
    ([("q,1", "")], "id contains", 2, "q,1"),
    ([("q1", ""), ("zz", "")], "not one of the expected", 3, "zz"),
    ([("q1", ""), ["q2"]], "pair of strings", 3, None),
    ([("q1", ""), ("q2", 5)], "pair of strings", 3, None),
]


@pytest.mark.parametrize("task", ["retrieval", "recognition"])
@pytest.mark.parametrize(("rows", "match", "line", "rid"), BAD_COMMON)
def test_invalid_rows_common_to_both_tasks(task, rows, match, line, rid):
    expected = {"q1", "q2", "q 1", "q,1", ""} if match == "not one of the expected" else None
    _rejects(rows, task, match, line, rid, expected_ids=expected)


BAD_RETRIEVAL = [
    ("i001 " * 100 + "i101", "101 images"),
    ("i001 i002 i001", "'i001' appears more than once"),
    ("i001  i002", "empty image token"),
    (" i001", "empty image token"),
    ("i001 ", "empty image token"),
    ("i001,i002", "contain ','"),
    ('i001 "i002"', "contain '\"'"),
    ("i001\ti002", "contain '\\\\t'"),
    ("i001 nope", "not in the index, e.g. 'nope'"),
]


@pytest.mark.parametrize(("cell", "match"), BAD_RETRIEVAL)
def test_invalid_retrieval_cells(cell, match):
    if cell.startswith("i001 i001"):  # 101 images: make them distinct
        cell = " ".join(INDEX[:101])
    _rejects([("q1", "i001"), ("q2", cell)], "retrieval", match, 3, "q2", index_ids=INDEX)


BAD_RECOGNITION = [
    ("12", "expected 'label score'"),
    ("12 0.5 3", "expected 'label score'"),
    ("12.0 0.5", "label '12.0' is not a non-negative integer"),
    ("-3 0.5", "label '-3'"),
    ("+3 0.5", "label '\\+3'"),
    ("x 0.5", "label 'x'"),
    ("12 nan", "score 'nan' is not a finite"),
    ("12 inf", "score 'inf'"),
    ("12 1e999", "score '1e999'"),
    ("12 1_0", "score '1_0'"),
    ("12 abc", "score 'abc'"),
    ("12  0.5", "extra whitespace"),
    (" 12 0.5", "extra whitespace"),
    ("12 0.5 ", "extra whitespace"),
    ("12\t0.5", "extra whitespace"),
]


@pytest.mark.parametrize(("cell", "match"), BAD_RECOGNITION)
def test_invalid_recognition_cells(cell, match):
    _rejects([("q1", "1 1"), ("q2", cell)], "recognition", match, 3, "q2")


def test_missing_expected_ids_are_named_and_counted():
    expected = [f"q{j}" for j in range(1, 10)]
    msg = _rejects([("q1", ""), ("q3", "")], "retrieval", "7 expected id", None, None, expected_ids=expected)
    assert "'q2', 'q4', 'q5', 'q6', 'q7' and 2 more" in msg


def test_unknown_task_and_many_problems():
    with pytest.raises(InputError, match="unknown task"):
        validate_submission([], "classification")
    rows = [("q", "")] * 15
    msg = _rejects(rows, "retrieval", "duplicate id", 3, "q")
    assert "line 12" in msg and "and 4 more problem" in msg


# --------------------------------------------------------------------------- files
def test_write_read_round_trip(tmp_path):
    path = write_submission(tmp_path / "sub" / "retrieval.csv", GOOD_RETRIEVAL, "retrieval", index_ids=INDEX)
    assert path.read_bytes() == b"id,images\nq1,i001 i002\nq2,\nq3,i003\n"
    assert read_submission(path, "retrieval") == GOOD_RETRIEVAL
    validate_submission_file(path, "retrieval", expected_ids={"q1", "q2", "q3"}, index_ids=INDEX)

    path = write_submission(tmp_path / "recognition.csv", iter(GOOD_RECOGNITION), "recognition")
    assert path.read_text().splitlines()[0] == "id,landmarks"
    assert read_submission(path, "recognition") == GOOD_RECOGNITION
    validate_submission_file(path, "recognition")


def test_invalid_submission_never_replaces_a_good_file(tmp_path):
    path = write_submission(tmp_path / "s.csv", GOOD_RECOGNITION, "recognition")
    before = path.read_bytes()
    with pytest.raises(InputError, match=r"line 3 \(id 'q2'\)"):
        write_submission(path, [("q1", "1 0.5"), ("q2", "1.0 0.5")], "recognition")
    assert path.read_bytes() == before
    with pytest.raises(InputError):
        write_submission(tmp_path / "new.csv", [("q1", "1 nan")], "recognition")
    assert sorted(os.listdir(tmp_path)) == ["s.csv"]  # no new file, no temp file


def test_failed_write_leaves_no_half_file(tmp_path, monkeypatch):
    path = write_submission(tmp_path / "s.csv", GOOD_RETRIEVAL, "retrieval")
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_submission(path, [("q9", "i009")], "retrieval")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["s.csv"]


@pytest.mark.parametrize(
    ("text", "match", "line"),
    [
        ("id,landmarks\nq1,i001\n", "header must be 'id,images'", 1),
        ("\ufeffid,images\nq1,i001\n", "byte-order mark", 1),
        ("", "empty file", None),
        ("id,images\nq1,i001\nq2\n", "expected 2 columns", 3),
        ("id,images\nq1,i001\nq2,i002,i003\n", "expected 2 columns", 3),
        ("id,images\nq1,i001\n\nq2,i002\n", "blank line", 3),
        ("id,images\nq1,i001\nq2,i002  i003\n", r"line 3 \(id 'q2'\): empty image token", 3),
        # a quoted cell spanning two lines: the next record starts on line 4
        (
            'id,images\n"q1","i001\ni002"\nq2,i001 i001\n',
            r"line 2 \(id 'q1'\): images contain '\\n'.*line 4 \(id 'q2'\): image 'i001'",
            2,
        ),
    ],
)
def test_validate_submission_file_names_file_and_line(tmp_path, text, match, line):
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8", newline="")
    with pytest.raises(InputError, match=match) as info:
        validate_submission_file(path, "retrieval")
    assert str(path) in str(info.value)
    assert info.value.line == line


def test_read_submission_skips_blank_lines_and_keeps_cells_verbatim(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text('id,landmarks\r\nq1,12 0.5 \r\n\r\n"q2",""\r\n', encoding="utf-8", newline="")
    assert read_submission(path, "recognition") == [("q1", "12 0.5 "), ("q2", "")]
    with pytest.raises(InputError, match="header must be 'id,images', got 'id,landmarks'"):
        read_submission(path, "retrieval")


def test_atomic_write_gives_the_permissions_open_would(tmp_path):
    import os

    from glr.utils import atomic_write

    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.csv") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
