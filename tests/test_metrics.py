"""glr.metrics: the official GLDv2 scorer, its reader quirks, and parity with the DELF code.

Hand-computed cases follow spec §3.3, §3.4, §4 and §7; the parity test runs the vendored
official code (tests/oracle/delf_metrics.py) on a few hundred random small file pairs.
"""

from __future__ import annotations
import csv

import importlib.util
import json
import math
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from glr.metrics import (
    format_score,
    global_average_precision,
    mean_average_precision,
    mean_median_position,
    mean_precisions,
    read_predictions,
    read_solution,
    score,
    top1_accuracy,
)
from glr.utils import InputError

_ORACLE_PATH = Path(__file__).parent / "oracle" / "delf_metrics.py"
_spec = importlib.util.spec_from_file_location("delf_metrics_oracle", _ORACLE_PATH)
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)

REC_HEADER = "id,landmarks,Usage"
RET_HEADER = "id,images,Usage"


def write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def assert_located(exc: pytest.ExceptionInfo, path: Path, line: int) -> None:
    assert f"{path}:{line}:" in str(exc.value), str(exc.value)


def close(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) <= 1e-12


# =========================================================================== GAP / top-1
# Official worked example (metrics_test.py, spec §4.1).
GAP_SOLUTION = {"A": [0, 12], "B": [100, 200, 300], "C": [1], "D": [], "E": []}
GAP_PREDICTIONS = {"B": (0, 0.01), "C": (1, 10.0), "D": (150, 15.0)}


def test_gap_official_example():
    # order D (wrong, n=1), C (right, n=2 -> 1/2), B (wrong); M = 3 (A, B, C).
    assert close(global_average_precision(GAP_PREDICTIONS, GAP_SOLUTION), Fraction(1, 6))
    # ignoring non-landmarks: C (1/1), B (wrong) -> 1/3.
    assert close(global_average_precision(GAP_PREDICTIONS, GAP_SOLUTION, True), Fraction(1, 3))


def test_gap_official_example_end_to_end(tmp_path):
    sol = write(tmp_path, "sol.csv", [REC_HEADER, "A,0 12,Public", "B,100 200 300,Public",
                                      "C,1,Public", "D,,Public", "E,,Public"])
    sub = write(tmp_path, "sub.csv", ["id,landmarks", "B,0 0.01", "C,1 10.0", "D,150 15.0"])
    res = score("recognition", sol, sub)
    assert res["private"] is None
    pub = res["public"]
    assert close(pub["gap"], Fraction(1, 6))
    assert close(pub["gap_ignoring_non_landmarks"], Fraction(1, 3))
    assert close(pub["top1_accuracy"], Fraction(1, 3))  # only C of A, B, C
    assert (pub["n_queries"], pub["n_with_gt"], pub["n_predicted"]) == (5, 3, 3)


def test_gap_ties_broken_by_id_ascending_as_strings():
    sol = {"9": [1], "10": [2]}
    # equal confidence: "10" < "9" as strings, so the wrong "10" comes first -> 1/2 / 2.
    preds = {"9": (1, 0.5), "10": (7, 0.5)}
    assert close(global_average_precision(preds, sol), Fraction(1, 4))
    preds = {"9": (7, 0.5), "10": (2, 0.5)}  # now the right one comes first -> 1 / 2
    assert close(global_average_precision(preds, sol), Fraction(1, 2))


def test_gap_score_descending_beats_id_order():
    sol = {"a": [1], "b": [2]}
    preds = {"a": (9, 0.1), "b": (2, 0.9)}  # b first by score: 1/1, then a wrong
    assert close(global_average_precision(preds, sol), Fraction(1, 2))


def test_gap_negative_and_large_confidences_only_order():
    sol = {"a": [1], "b": [2], "c": [3]}
    preds = {"a": (1, -5.0), "b": (0, 1e9), "c": (3, math.inf)}
    # c (1/1), b wrong, a (2/3) -> (1 + 2/3) / 3
    assert close(global_average_precision(preds, sol), Fraction(5, 9))


def test_gap_non_landmark_prediction_lowers_later_precisions():
    sol = {"a": [1], "n": []}
    preds = {"a": (1, 0.5), "n": (4, 0.9)}
    assert close(global_average_precision(preds, sol), Fraction(1, 2))
    assert close(global_average_precision(preds, sol, ignore_non_gt_test_images=True), 1.0)


def test_gap_missing_prediction_counts_in_denominator_and_several_labels():
    sol = {"a": [1, 2, 3], "b": [5]}
    assert close(global_average_precision({"a": (3, 0.2)}, sol), Fraction(1, 2))
    assert close(top1_accuracy({"a": (3, 0.2)}, sol), Fraction(1, 2))


def test_top1_ignores_queries_without_ground_truth():
    sol = {"a": [1], "b": [2], "n": []}
    preds = {"a": (1, 0.1), "b": (3, 0.9), "n": (1, 0.9)}
    assert close(top1_accuracy(preds, sol), Fraction(1, 2))


def test_recognition_library_errors():
    with pytest.raises(ValueError, match="no solution entry has ground truth"):
        global_average_precision({}, {"n": []})
    with pytest.raises(ValueError, match="no solution entry has ground truth"):
        top1_accuracy({}, {"n": []})
    with pytest.raises(InputError, match="'zz'"):
        global_average_precision({"zz": (1, 0.5)}, {"a": [1]})
    with pytest.raises(ValueError, match="NaN"):
        global_average_precision({"a": (1, math.nan)}, {"a": [1]})


# =========================================================================== retrieval
RET_SOLUTION = {"A": ["x1", "x2"], "B": ["x1"], "C": ["x3", "x4", "x5"], "D": ["x3"]}
RET_PREDICTIONS = {"B": ["x0", "x1"], "C": ["x4"], "D": ["x3", "x4"]}


def test_map_official_example():
    # AP = 0, 1/2, 1/3, 1 -> 11/24
    assert close(mean_average_precision(RET_PREDICTIONS, RET_SOLUTION), Fraction(11, 24))
    # k = 1: AP = 0, 0, 1/1, 1/1 -> 1/2
    assert close(mean_average_precision(RET_PREDICTIONS, RET_SOLUTION, max_predictions=1), 0.5)


def test_map_official_example_end_to_end(tmp_path):
    sol = write(tmp_path, "sol.csv", [RET_HEADER, "A,x1 x2,Public", "B,x1,Public",
                                      "C,x3 x4 x5,Public", "D,x3,Public"])
    sub = write(tmp_path, "sub.csv", ["id,images", "B,x0 x1", "C,x4", "D,x3 x4"])
    res = score("retrieval", sol, sub)
    pub = res["public"]
    assert res["private"] is None
    assert close(pub["map@100"], Fraction(11, 24))
    assert close(pub["p@1"], Fraction(1, 2))  # C and D hit at rank 1
    assert close(pub["p@5"], Fraction(3, 20))  # B, C, D one hit each, / 5 / 4
    assert close(pub["p@100"], Fraction(3, 400))
    # first hits: A 101, B 2, C 1, D 1
    assert close(pub["mean_first_position"], Fraction(105, 4))
    assert close(pub["median_first_position"], 1.5)
    assert (pub["n_queries"], pub["n_predicted"]) == (4, 3)


def test_map_denominator_is_min_of_relevant_and_100():
    gt = [f"r{i}" for i in range(150)]
    sol = {"q": gt}
    assert close(mean_average_precision({"q": gt[:100]}, sol), 1.0)
    assert close(mean_average_precision({"q": gt[:50]}, sol), 0.5)
    assert close(mean_average_precision({"q": gt}, sol), 1.0)  # only 100 slots looked at


def test_map_duplicates_keep_their_slot():
    sol = {"q": ["y"]}
    assert close(mean_average_precision({"q": ["x", "x", "y"]}, sol), Fraction(1, 3))
    # a repeated hit scores once: [y, y] -> 1/1 only, AP = 1
    assert close(mean_average_precision({"q": ["y", "y"]}, {"q": ["y", "z"]}), 0.5)


def test_map_first_100_raw_positions_only():
    sol = {"q": ["hit"]}
    assert mean_average_precision({"q": ["w"] * 100 + ["hit"]}, sol) == 0.0
    assert close(mean_average_precision({"q": ["w"] * 99 + ["hit"]}, sol), Fraction(1, 100))
    assert mean_median_position({"q": ["w"] * 100 + ["hit"]}, sol) == (101.0, 101.0)


def test_map_queries_without_predictions_add_zero():
    sol = {"a": ["x"], "b": ["y"], "c": ["z"]}
    assert close(mean_average_precision({"a": ["x"]}, sol), Fraction(1, 3))


def test_precision_at_k_for_lists_shorter_than_k():
    sol = {"q": ["a", "b"], "r": ["c"]}
    p = mean_precisions({"q": ["a"]}, sol)
    assert p.shape == (100,) and p.dtype == np.float64
    assert close(p[0], Fraction(1, 2))
    assert close(p[4], Fraction(1, 10))  # 1/5 for q, 0 for r
    assert close(p[99], Fraction(1, 200))
    # distinct relevant ids: duplicates do not count twice
    p = mean_precisions({"q": ["a", "a", "b"]}, {"q": ["a", "b"]}, max_predictions=3)
    assert np.allclose(p, [1, 1 / 2, 2 / 3])


def test_first_position_101_when_no_hit_or_no_prediction():
    sol = {"a": ["x"], "b": ["y"], "c": ["z"]}
    mean, median = mean_median_position({"a": ["w", "x"], "b": ["w"]}, sol)
    assert close(mean, Fraction(2 + 101 + 101, 3)) and median == 101.0
    assert isinstance(mean, float) and isinstance(median, float)


def test_retrieval_library_errors():
    for fn in (mean_average_precision, mean_precisions, mean_median_position):
        with pytest.raises(ValueError, match="no query"):
            fn({}, {})
        with pytest.raises(InputError, match="'zz'"):
            fn({"zz": ["x"]}, {"a": ["x"]})
    with pytest.raises(ValueError, match="ground truth is empty"):
        mean_average_precision({"a": ["x"]}, {"a": []})
    # an empty ground truth is harmless while the query is not predicted (as the official)
    assert mean_average_precision({}, {"a": [], "b": ["x"]}) == 0.0


# =========================================================================== solution reader
def test_read_solution_recognition(tmp_path):
    path = write(tmp_path, "sol.csv", ["whatever,the,header", "a,1 142820,Public", "b,,Private",
                                       "c,not read,Ignored", "a,7,Public", "d,3,Private",
                                       "d,4,Public", "e,None,Ignored"])
    public, private, ignored = read_solution(path, "recognition")
    assert public == {"a": [7], "d": [4]}  # the later row overwrites; d sits in both subsets
    assert private == {"b": [], "d": [3]}
    assert ignored == ["c", "e"]


def test_read_solution_retrieval_ids_are_strings_and_empty_cell_is_one_item(tmp_path):
    path = write(tmp_path, "sol.csv", [RET_HEADER, "0000000000000e12,0123 00ab,Public",
                                       "q2,,Private", "q3,a  b,Public", '"q4","x y",Private'])
    public, private, ignored = read_solution(path, "retrieval")
    assert public == {"0000000000000e12": ["0123", "00ab"], "q3": ["a", "", "b"]}
    assert private == {"q2": [""], "q4": ["x", "y"]}
    assert ignored == []


def test_empty_retrieval_ground_truth_has_m_q_one(tmp_path):
    sol = write(tmp_path, "sol.csv", [RET_HEADER, "q,,Public", "r,x,Public"])
    sub = write(tmp_path, "sub.csv", ["id,images", "q,a", "r,x"])
    assert close(score("retrieval", sol, sub)["public"]["map@100"], 0.5)
    # As in the official code, an '' rank token matches the '' ground-truth item.
    sub = write(tmp_path, "sub2.csv", ["id,images", "q,a  b", "r,x"])
    res = score("retrieval", sol, sub)["public"]
    assert close(res["map@100"], Fraction(1, 2) * (Fraction(1, 2) + 1))
    assert res["mean_first_position"] == 1.5


@pytest.mark.parametrize("rows, line, message", [
    (["a,1,Public", "", "b,2,Public"], 3, "blank line"),
    (["a,1,Public", "b,2"], 3, "3 columns"),
    (["a,1,Public", "b"], 3, "3 columns"),
    (["a,1,Public", "b,2,Publc"], 3, "Usage"),
    (["a,12.0,Private"], 2, "'12.0'"),
    (["a,1  2,Public"], 2, "''"),
    (["a,x,Public"], 2, "'x'"),
])
def test_read_solution_errors_name_file_and_line(tmp_path, rows, line, message):
    path = write(tmp_path, "sol.csv", [REC_HEADER] + rows)
    with pytest.raises(InputError, match=message) as exc:
        read_solution(path, "recognition")
    assert_located(exc, path, line)


def test_read_solution_garbage_in_ignored_rows_is_fine(tmp_path):
    path = write(tmp_path, "sol.csv", [REC_HEADER, "a,1 x,Ignored", "b,,Ignored,extra"])
    assert read_solution(path, "recognition") == ({}, {}, ["a", "b"])


def test_read_solution_line_numbers_count_multiline_records(tmp_path):
    path = write(tmp_path, "sol.csv", [REC_HEADER, 'a,"1",Public', 'b,"2', '3",Public',
                                       "c,4,Nope"])
    with pytest.raises(InputError) as exc:
        read_solution(path, "recognition")  # b's cell "2\n3" is one record over lines 3-4
    assert_located(exc, path, 3)
    path = write(tmp_path, "sol2.csv", [REC_HEADER, 'a,"1",Public', 'b,"2 3",Public',
                                        "c,4,Nope"])
    with pytest.raises(InputError) as exc:
        read_solution(path, "recognition")
    assert_located(exc, path, 4)


def test_undecodable_and_oversized_cells_are_input_errors(tmp_path):
    path = tmp_path / "sol.csv"
    path.write_bytes(b"id,images,Usage\nq,\xff\xfe,Public\n")
    with pytest.raises(InputError, match="UTF-8") as exc:
        read_solution(path, "retrieval")
    assert str(path) in str(exc.value)
    path = write(tmp_path, "sub.csv", ["id,images", "q,x", "r," + "x" * 200_000])
    old = csv.field_size_limit(131072)  # csv's default; another module may have raised it process-wide
    try:
        with pytest.raises(InputError, match="malformed CSV") as exc:
            read_predictions(path, ["q", "r"], [], [], "retrieval")  # csv's field size limit
    finally:
        csv.field_size_limit(old)
    assert_located(exc, path, 3)


def test_unknown_task_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="unknown task"):
        score("detection", tmp_path / "a.csv", tmp_path / "b.csv")
    with pytest.raises(InputError, match="cannot read") as exc:
        read_solution(tmp_path / "missing.csv", "retrieval")
    assert "missing.csv" in str(exc.value)


# =========================================================================== submission reader
def _solution(tmp_path, task="recognition"):
    header = REC_HEADER if task == "recognition" else RET_HEADER
    gt = "1" if task == "recognition" else "x"
    path = write(tmp_path, "sol.csv", [header, f"a,{gt},Public", f"b,{gt},Private",
                                       f"c,{gt},Public", "i,None,Ignored"])
    return read_solution(path, task)


def _read(tmp_path, rows, task="recognition", name="sub.csv"):
    public, private, ignored = _solution(tmp_path, task)
    path = write(tmp_path, name, ["id,landmarks" if task == "recognition" else "id,images"] + rows)
    return path, read_predictions(path, public, private, ignored, task)


def test_read_predictions_routes_and_parses(tmp_path):
    _, (pub, priv) = _read(tmp_path, ["a,12 0.5", "", '"b","3 -1e-5"', "c,4 inf"])
    assert pub == {"a": (12, 0.5), "c": (4, math.inf)}
    assert priv == {"b": (3, -1e-05)}
    assert isinstance(pub["a"][0], int) and isinstance(pub["a"][1], float)


def test_read_predictions_header_is_skipped_unconditionally(tmp_path):
    public, private, ignored = _solution(tmp_path)
    path = write(tmp_path, "sub.csv", ["a,1 0.9", "b,1 0.5"])  # no header: row 1 is lost
    assert read_predictions(path, public, private, ignored, "recognition") == ({}, {"b": (1, 0.5)})


def test_repeated_id_rule(tmp_path):
    # a repeat after an empty-prediction row is not detected
    _, (pub, _) = _read(tmp_path, ["a,", "a,1 0.5"])
    assert pub == {"a": (1, 0.5)}
    # a repeat of an ignored id is not detected
    _, (pub, priv) = _read(tmp_path, ["i,1 0.5", "i,2 0.5"])
    assert pub == priv == {}
    # a repeat of a stored prediction is an error, even with an empty cell
    for rows in (["a,1 0.5", "b,1 0.5", "a,2 0.5"], ["a,1 0.5", "b,1 0.5", "a,"]):
        with pytest.raises(InputError, match="repeated.*line 2") as exc:
            _read(tmp_path, rows)
        assert_located(exc, tmp_path / "sub.csv", 4)


def test_ignored_ids_are_skipped_before_the_cell_is_read(tmp_path):
    _, (pub, priv) = _read(tmp_path, ["i,garbage cell here", "i", "a,1 0.5"])
    assert (pub, priv) == ({"a": (1, 0.5)}, {})


def test_empty_cell_is_skipped_whatever_the_id(tmp_path):
    _, (pub, priv) = _read(tmp_path, ["nobody,", "a,"])
    assert pub == priv == {}


@pytest.mark.parametrize("rows, line, message", [
    (["a,1 0.5", "b"], 3, "2 columns"),
    (["a,1 0.5", "zz,1 0.5"], 3, "'zz' is not in the solution"),
    (["a,12.0 0.5"], 2, "'12.0'"),
    (["a,12 high"], 2, "'high'"),
    (["a,12 nan"], 2, "NaN"),
    (["a,12 0.5  "], 2, "3 tokens"),
    (["a, 12 0.5"], 2, "3 tokens"),
    (["a,12  0.5"], 2, "3 tokens"),
    (["a,12"], 2, "1 tokens"),
    (["a,12 0.5 3"], 2, "3 tokens"),
])
def test_read_predictions_errors_name_file_and_line(tmp_path, rows, line, message):
    with pytest.raises(InputError, match=message) as exc:
        _read(tmp_path, rows)
    assert_located(exc, tmp_path / "sub.csv", line)


def test_recognition_one_trailing_space_is_dropped(tmp_path):
    _, (pub, _) = _read(tmp_path, ["a,12 0.5 "])
    assert pub == {"a": (12, 0.5)}


def test_retrieval_tokens_keep_empty_strings(tmp_path):
    _, (pub, priv) = _read(tmp_path, ["a,x y ", "b,x  y", "c, x"], task="retrieval")
    assert pub == {"a": ["x", "y"], "c": ["", "x"]}
    assert priv == {"b": ["x", "", "y"]}
    _, (pub, _) = _read(tmp_path, ["a,x y  ", "c, "], task="retrieval", name="sub2.csv")
    assert pub == {"a": ["x", "y", ""], "c": [""]}


def test_empty_token_takes_a_rank_slot(tmp_path):
    sol = write(tmp_path, "sol.csv", [RET_HEADER, "q,b,Public"])
    sub = write(tmp_path, "sub.csv", ["id,images", "q,a  b"])  # ['a', '', 'b']
    res = score("retrieval", sol, sub)["public"]
    assert close(res["map@100"], Fraction(1, 3))
    assert res["mean_first_position"] == 3.0


# =========================================================================== score end to end
def test_public_and_private_are_scored_separately(tmp_path):
    sol = write(tmp_path, "sol.csv", [REC_HEADER, "a,1,Public", "b,2,Public", "c,3,Private",
                                      "d,,Private"])
    sub = write(tmp_path, "sub.csv", ["id,landmarks", "a,1 0.1", "b,9 0.9", "c,3 0.5",
                                      "d,3 0.7"])
    res = score("recognition", sol, sub)
    # Public: b wrong then a right -> 1/2 / 2; Private: d wrong then c right -> 1/2 / 1
    assert close(res["public"]["gap"], Fraction(1, 4))
    assert close(res["private"]["gap"], Fraction(1, 2))
    assert close(res["private"]["gap_ignoring_non_landmarks"], 1.0)
    assert close(res["public"]["top1_accuracy"], 0.5) and close(res["private"]["top1_accuracy"], 1)
    assert res["private"]["n_queries"] == 2 and res["private"]["n_with_gt"] == 1


def test_ignored_rows_count_in_neither_numerator_nor_denominator(tmp_path):
    base = [RET_HEADER, "a,x,Public", "b,y,Public"]
    sub_rows = ["id,images", "a,x", "b,z"]
    sol1 = write(tmp_path, "sol1.csv", base)
    sol2 = write(tmp_path, "sol2.csv", base + ["i,None,Ignored", "j,None,Ignored"])
    sub1 = write(tmp_path, "sub1.csv", sub_rows)
    sub2 = write(tmp_path, "sub2.csv", sub_rows + ["i,x", "j,"])
    assert score("retrieval", sol1, sub1) == score("retrieval", sol2, sub2)
    assert close(score("retrieval", sol2, sub2)["public"]["map@100"], 0.5)


def test_subset_without_ground_truth_is_none_the_other_is_scored(tmp_path):
    sol = write(tmp_path, "sol.csv", [REC_HEADER, "a,1,Public", "n,,Private", "m,,Private"])
    sub = write(tmp_path, "sub.csv", ["id,landmarks", "a,1 0.3", "n,1 0.9"])
    res = score("recognition", sol, sub)
    assert res["private"] is None
    assert close(res["public"]["gap"], 1.0)
    sol = write(tmp_path, "sol2.csv", [RET_HEADER, "a,x,Private", "i,None,Ignored"])
    sub = write(tmp_path, "sub2.csv", ["id,images", "a,x"])
    res = score("retrieval", sol, sub)
    assert res["public"] is None and close(res["private"]["map@100"], 1.0)


def test_score_errors_name_submission_file_and_line(tmp_path):
    sol = write(tmp_path, "sol.csv", [REC_HEADER, "a,1,Public"])
    sub = write(tmp_path, "sub.csv", ["id,landmarks", "a,1 0.3", "", "b,1 0.2"])
    with pytest.raises(InputError, match="'b'") as exc:
        score("recognition", sol, sub)
    assert_located(exc, sub, 4)


def test_score_result_is_plain_json_and_formats(tmp_path):
    sol = write(tmp_path, "sol.csv", [RET_HEADER, "a,x y,Public"])
    sub = write(tmp_path, "sub.csv", ["id,images", "a,y w x"])
    res = score("retrieval", sol, sub)
    assert json.loads(json.dumps(res)) == res
    assert all(type(v) in (int, float) for v in res["public"].values())
    assert set(res["public"]) == {"map@100", "p@1", "p@5", "p@10", "p@50", "p@100",
                                  "mean_first_position", "median_first_position",
                                  "n_queries", "n_predicted"}
    text = format_score(res)
    assert "Public" in text and "Private" in text and "—" in text
    assert "0.833333" in text  # (1/1 + 2/3) / 2
    assert "mAP@100" in text and "P@100" in text
    rec = {"task": "recognition", "public": None,
           "private": {"gap": 0.25, "gap_ignoring_non_landmarks": 0.5, "top1_accuracy": 1.0,
                       "n_queries": 3, "n_with_gt": 2, "n_predicted": 1}}
    text = format_score(rec)
    assert "0.250000" in text and "GAP" in text and "top-1" in text


# =========================================================================== official test fixtures
# The expectations of the official metrics_test.py / dataset_file_io_test.py, checked on both
# implementations (this also checks the vendored oracle).
OFFICIAL_REC_PREDICTIONS = {"B": {"class": 0, "score": 0.01}, "C": {"class": 1, "score": 10.0},
                            "D": {"class": 150, "score": 15.0}}


def test_official_metric_expectations_both_implementations():
    for gap, top1, preds in ((global_average_precision, top1_accuracy, GAP_PREDICTIONS),
                             (oracle.GlobalAveragePrecision, oracle.Top1Accuracy,
                              OFFICIAL_REC_PREDICTIONS)):
        assert abs(gap(preds, GAP_SOLUTION) - 0.166667) < 1e-6
        assert abs(gap(preds, GAP_SOLUTION, True) - 0.333333) < 1e-6
        assert abs(top1(preds, GAP_SOLUTION) - 0.333333) < 1e-6
    for m_ap, m_p, m_pos in ((mean_average_precision, mean_precisions, mean_median_position),
                             (oracle.MeanAveragePrecision, oracle.MeanPrecisions,
                              oracle.MeanMedianPosition)):
        assert abs(m_ap(RET_PREDICTIONS, RET_SOLUTION) - 0.458333) < 1e-6
        assert m_ap(RET_PREDICTIONS, RET_SOLUTION, max_predictions=1) == 0.5
        assert np.allclose(m_p(RET_PREDICTIONS, RET_SOLUTION, max_predictions=2), [0.5, 0.375])
        assert tuple(m_pos(RET_PREDICTIONS, RET_SOLUTION)) == (26.25, 1.5)
        assert tuple(m_pos(RET_PREDICTIONS, RET_SOLUTION, max_predictions=1)) == (1.5, 1.5)


def test_official_reader_fixtures(tmp_path):
    sol = write(tmp_path, "rec_sol.csv", [REC_HEADER, "0123456789abcdef,0 12,Public",
                                          "0223456789abcdef,,Public",
                                          "0323456789abcdef,100,Ignored",
                                          "0423456789abcdef,1,Private",
                                          "0523456789abcdef,,Ignored"])
    assert read_solution(sol, "recognition") == (
        {"0123456789abcdef": [0, 12], "0223456789abcdef": []}, {"0423456789abcdef": [1]},
        ["0323456789abcdef", "0523456789abcdef"])
    sol = write(tmp_path, "ret_sol.csv", [RET_HEADER, "0123456789abcdef,None,Ignored",
                                          "0223456789abcdef,fedcba9876543210 fedcba9876543200"
                                          ",Public",
                                          "0323456789abcdef,fedcba9876543200,Private",
                                          "0423456789abcdef,fedcba9876543220,Private",
                                          "0523456789abcdef,None,Ignored"])
    assert read_solution(sol, "retrieval") == (
        {"0223456789abcdef": ["fedcba9876543210", "fedcba9876543200"]},
        {"0323456789abcdef": ["fedcba9876543200"], "0423456789abcdef": ["fedcba9876543220"]},
        ["0123456789abcdef", "0523456789abcdef"])
    sub = write(tmp_path, "rec_sub.csv", ["id,landmarks", "0123456789abcdef,12 0.1 ",
                                          "0423456789abcdef,0 19.0", "0223456789abcdef,", "",
                                          "0523456789abcdef,14 0.01"])
    assert read_predictions(sub, ["0123456789abcdef", "0223456789abcdef"], ["0423456789abcdef"],
                            ["0323456789abcdef", "0523456789abcdef"], "recognition") == (
        {"0123456789abcdef": (12, 0.1)}, {"0423456789abcdef": (0, 19.0)})
    sub = write(tmp_path, "ret_sub.csv", ["id,images", "0123456789abcdef,fedcba9876543250 ",
                                          "0423456789abcdef,fedcba9876543260",
                                          "0223456789abcdef,fedcba9876543210 fedcba9876543200 "
                                          "fedcba9876543220", "", "0523456789abcdef,"])
    assert read_predictions(sub, ["0223456789abcdef"], ["0323456789abcdef", "0423456789abcdef"],
                            ["0123456789abcdef", "0523456789abcdef"], "retrieval") == (
        {"0223456789abcdef": ["fedcba9876543210", "fedcba9876543200", "fedcba9876543220"]},
        {"0423456789abcdef": ["fedcba9876543260"]})


# =========================================================================== parity with the official
def _random_files(rng: random.Random, task: str) -> tuple[list[str], list[str]]:
    """Random small solution and submission files (lines), with every reader quirk in play.

    NaN confidences are left out: rejecting them is a deliberate difference (spec §9.10).
    """
    n_test = rng.randint(0, 9)
    test_ids = [f"t{i}" for i in range(n_test)] + rng.sample(["9", "10", "0e1", ""], 2)
    index_ids = [f"x{i}" for i in range(rng.randint(1, 12))]
    big = rng.random() < 0.1  # long lists: > 100 predictions, > 100 relevant
    if big:
        index_ids += [f"y{i}" for i in range(130)]
    sol = [REC_HEADER if task == "recognition" else RET_HEADER]
    truth: dict[str, list[str]] = {}
    for tid in test_ids + rng.sample(test_ids, min(2, len(test_ids))):
        usage = rng.choices(["Public", "Private", "Ignored", "Bogus"], [45, 45, 12, 0.4])[0]
        if usage == "Ignored":
            cell = rng.choice(["None", "", "1 x", "1"])
        elif task == "recognition":
            cell = "" if rng.random() < 0.3 else " ".join(
                str(rng.randint(0, 5)) for _ in range(rng.randint(1, 3)))
            if rng.random() < 0.01:
                cell = rng.choice(["1  2", "1.0", "x"])
        else:
            k = rng.randint(1, len(index_ids))
            cell = "" if rng.random() < 0.1 else " ".join(rng.sample(index_ids, k))
            if rng.random() < 0.05:
                cell = cell.replace(" ", "  ", 1)
        truth[tid] = cell.split(" ")
        sol.append(f"{tid},{cell},{usage}" if rng.random() > 0.1 else f'"{tid}","{cell}",{usage}')
        if rng.random() < 0.005:
            sol.append(rng.choice(["", "only,two"]))
    sub = ["id,landmarks" if task == "recognition" else "id,images"]
    pool = test_ids + ["unknown"] * (rng.random() < 0.1)
    for tid in rng.sample(pool, rng.randint(0, len(pool))) + rng.sample(pool, rng.random() < 0.1):
        r = rng.random()
        if r < 0.15:
            cell = ""
        elif task == "recognition":
            conf = rng.choice(["0.5", "0.5", "1", "2", "-1", "1e-5", "inf", "3.25", "0.5"])
            known = [t for t in truth.get(tid, []) if t.isdigit()]
            label = rng.choice(known) if known and rng.random() < 0.5 else rng.randint(0, 5)
            cell = f"{label} {conf}"
            if rng.random() < 0.03:
                cell = rng.choice([cell + " ", cell + "  ", " " + cell, "12.0 0.5", "a b",
                                   cell.replace(" ", "  ")])
        else:
            n = rng.randint(1, 120 if big else 15)
            tokens = rng.choices(index_ids + [""] * (rng.random() < 0.2), k=n)
            cell = " ".join(tokens) + (" " if rng.random() < 0.1 else "")
        if rng.random() < 0.01:
            sub.append(tid)  # one column
        else:
            sub.append(f"{tid},{cell}" if rng.random() > 0.1 else f'"{tid}","{cell}"')
        if rng.random() < 0.05:
            sub.append("")
    return sol, sub


def _oracle_score(task: str, sol: Path, sub: Path) -> dict:
    public, private, ignored = oracle.ReadSolution(str(sol), task)
    pred_pub, pred_priv = oracle.ReadPredictions(str(sub), set(public), set(private),
                                                 set(ignored), task)
    out = {}
    for name, preds, solution in (("public", pred_pub, public), ("private", pred_priv, private)):
        try:
            if task == "recognition":
                out[name] = {
                    "gap": oracle.GlobalAveragePrecision(preds, solution),
                    "gap_ignoring_non_landmarks": oracle.GlobalAveragePrecision(preds, solution,
                                                                                True),
                    "top1_accuracy": oracle.Top1Accuracy(preds, solution),
                    "n_queries": len(solution),
                    "n_with_gt": sum(1 for v in solution.values() if v),
                    "n_predicted": len(preds),
                }
            else:
                map100 = oracle.MeanAveragePrecision(preds, solution)  # raises first if Q = 0
                precisions = oracle.MeanPrecisions(preds, solution)
                mean, median = oracle.MeanMedianPosition(preds, solution)
                out[name] = {
                    "map@100": map100,
                    **{f"p@{k}": precisions[k - 1] for k in (1, 5, 10, 50, 100)},
                    "mean_first_position": mean, "median_first_position": median,
                    "n_queries": len(solution), "n_predicted": len(preds),
                }
        except ZeroDivisionError:
            out[name] = None
    return out


@pytest.mark.parametrize("task", ["recognition", "retrieval"])
def test_parity_with_official_scorer(tmp_path, task):
    rng = random.Random(20240 + len(task))
    scored = failed = 0
    for case in range(300):
        sol_lines, sub_lines = _random_files(rng, task)
        sol = write(tmp_path, f"sol{case}.csv", sol_lines)
        sub = write(tmp_path, f"sub{case}.csv", sub_lines)
        try:
            expected = _oracle_score(task, sol, sub)
        except (IndexError, KeyError, ValueError):
            with pytest.raises(InputError):
                score(task, sol, sub)
            failed += 1
            continue
        got = score(task, sol, sub)
        for subset in ("public", "private"):
            want, have = expected[subset], got[subset]
            assert (want is None) == (have is None), (case, subset, want, have)
            if want is None:
                continue
            assert set(want) == set(have), case
            for key, value in want.items():
                assert abs(float(value) - have[key]) <= 1e-9, (case, subset, key, value, have)
        scored += 1
    # the generator must exercise both paths, mostly the scoring one
    assert scored >= 180 and failed >= 10, (scored, failed)
