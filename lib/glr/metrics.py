"""The official GLDv2 metrics: GAP and top-1 accuracy (recognition), mAP@100, P@k and
first-hit position (retrieval), and the readers of solution and submission files.

A re-implementation of the DELF scorer (``tensorflow/models``
``research/delf/delf/python/datasets/google_landmarks_dataset/metrics.py`` and
``dataset_file_io.py``; spec §3.3, §3.4, §4) that gives the same figures (the same floating
point operations in the same order) on every input the official code accepts, and raises
:class:`~glr.utils.InputError` naming the file and 1-based line (the header is line 1), or the
test id, where the official code crashes with ``IndexError`` / ``KeyError`` / ``ValueError``.

Reader quirks kept on purpose, because they change scores (spec §3.3, §3.4, §7):

* line 1 is skipped whatever it says; cells are never stripped; cells are split on the single
  character ``' '`` and only one trailing empty token is dropped, so retrieval rows keep ``''``
  tokens (they take a rank slot) and ``"12  0.5"`` is a malformed recognition row;
* a submission row for an ``Ignored`` id is skipped before its cell is looked at, an empty cell
  is skipped whatever the id, and only a repeat of a *stored* prediction is an error;
* an empty retrieval ground-truth cell is ``['']`` (one expected item, m_q = 1).

Deliberate differences from the official code: bad input raises ``InputError`` (a
``ValueError``) with a location instead of a bare ``IndexError``/``KeyError``; a NaN confidence
is rejected (spec §9.10: it makes the GAP order undefined); empty denominators raise a
``ValueError`` instead of ``ZeroDivisionError`` or returning NaN; :func:`score` reports a
subset without ground truth as ``None`` instead of failing.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from glr.utils import InputError

TASKS = ("retrieval", "recognition")
#: Ranks the retrieval metrics look at (Kaggle's mAP@100).
MAX_PREDICTIONS = 100
#: The ranks k reported as mean precision@k by :func:`score` (as the official script).
PRECISION_RANKS = (1, 5, 10, 50, 100)
USAGES = ("Public", "Private", "Ignored")
#: The header line of each task's submission file (the official reader skips line 1 unread).
HEADERS = {"retrieval": ("id", "images"), "recognition": ("id", "landmarks")}

#: A prediction as read from a submission: ``(landmark_id, confidence)`` for recognition,
#: the ranked index ids for retrieval.
Prediction = Union[tuple[int, float], list[str]]

_RETRIEVAL_KEYS = ("map@100",) + tuple(f"p@{k}" for k in PRECISION_RANKS) + (
    "mean_first_position", "median_first_position", "n_queries", "n_predicted")
_RECOGNITION_KEYS = ("gap", "gap_ignoring_non_landmarks", "top1_accuracy",
                     "n_queries", "n_with_gt", "n_predicted")
_LABELS = {
    "map@100": "mAP@100",
    **{f"p@{k}": f"P@{k}" for k in PRECISION_RANKS},
    "mean_first_position": "mean first-hit position",
    "median_first_position": "median first-hit position",
    "gap": "GAP",
    "gap_ignoring_non_landmarks": "GAP ignoring non-landmarks",
    "top1_accuracy": "top-1 accuracy",
    "n_queries": "queries",
    "n_with_gt": "queries with ground truth",
    "n_predicted": "queries predicted",
}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def _data_records(path: str | os.PathLike) -> list[tuple[int, list[str]]]:
    """(first line, cells) of every CSV record after the first one (the header).

    The file is opened as the official reader opens it (text mode, universal newlines), so
    quoted cells spanning lines read the same; blank lines come back as empty records.
    """
    records = []
    try:
        with open(path, "r", encoding="utf-8") as f:
            reader = csv.reader(f)
            start = 1
            header = True
            for row in reader:
                line, start = start, reader.line_num + 1
                if header:  # skipped whatever it says, as the official reader does
                    header = False
                    continue
                records.append((line, row))
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", path) from e
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text: {e}", path) from None
    except csv.Error as e:
        raise InputError(f"malformed CSV: {e}", path, start) from None
    return records


# --------------------------------------------------------------------------- readers
def submission_warnings(path: str | os.PathLike, task: str) -> list[str]:
    """What in a submission file the official reader scores silently: a line 1 that is not the
    header (it is skipped whatever it holds, so a prediction there goes unscored) and a file
    without rows (every query scores 0). Reads only up to the first data row.

    Returns:
        One message per problem (no file name; ``[]`` for a sound file). The scores
        themselves are :func:`score`'s, unchanged.

    Raises:
        InputError: the file cannot be read, or is not UTF-8 CSV.
    """
    _check_task(task)
    header, first_row = None, None
    try:
        with open(path, "r", encoding="utf-8") as f:
            for row in csv.reader(f):
                if header is None:
                    header = row
                elif row:
                    first_row = row
                    break
    except OSError as e:
        raise InputError(f"cannot read file ({e.strerror or e})", path) from None
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text: {e}", path) from None
    except csv.Error as e:
        raise InputError(f"malformed CSV: {e}", path) from None
    expected = ",".join(HEADERS[task])
    if header is None:
        return [f"empty file: no header '{expected}' and no rows (every query scores 0)"]
    found = []
    if tuple(header) != HEADERS[task]:
        bom = " (it starts with a byte-order mark)" if header and header[0].startswith("\ufeff") else ""
        found.append(f"line 1 is not the header '{expected}' but {','.join(header)[:80]!r}{bom}; the official "
                     "scorer skips line 1 anyway, so a prediction there is not scored")
    if first_row is None:
        found.append("no rows after line 1 (every query scores 0)")
    return found


def read_solution(
    path: str | os.PathLike, task: str
) -> tuple[dict[str, list], dict[str, list], list[str]]:
    """Read a GLDv2 solution file (``id,landmarks,Usage`` or ``id,images,Usage``).

    Mirrors the official ``ReadSolution`` (spec §3.4): line 1 is skipped; an ``Ignored`` row
    only records its id; otherwise the ground-truth cell is parsed (recognition: ``[]`` for an
    empty cell, else ``int`` of each ``' '``-separated token; retrieval: always split, so an
    empty cell gives ``['']``) and the row is stored under its Usage, a later row of the same
    id and subset overwriting the earlier one.

    Args:
        path: the solution CSV.
        task: ``"retrieval"`` or ``"recognition"``.

    Returns:
        ``(public, private, ignored)``: test id -> ground-truth list (landmark ids as ints
        for recognition, index ids as strings for retrieval) for the Public and the Private
        subset, and the ignored test ids in file order.

    Raises:
        InputError: on a blank line, a row with fewer than 3 columns, a non-integer landmark
            id, or a Usage other than Public / Private / Ignored; the message gives the file
            and line.
    """
    _check_task(task)
    public: dict[str, list] = {}
    private: dict[str, list] = {}
    ignored: list[str] = []
    what = "landmarks" if task == "recognition" else "images"
    for line, row in _data_records(path):
        if not row:
            raise InputError("blank line in a solution file", path, line)
        if len(row) < 3:
            raise InputError(f"expected 3 columns (id, {what}, Usage), got {len(row)}: {row!r}",
                             path, line)
        test_id, cell, usage = row[0], row[1], row[2]
        if usage == "Ignored":
            ignored.append(test_id)
            continue
        if task == "recognition":
            gt: list = []
            if cell:
                for token in cell.split(" "):
                    try:
                        gt.append(int(token))
                    except ValueError:
                        raise InputError(
                            f"landmark id {token!r} of test id {test_id!r} is not an integer "
                            f"(ids are separated by single spaces)", path, line) from None
        else:
            gt = cell.split(" ")
        if usage == "Public":
            public[test_id] = gt
        elif usage == "Private":
            private[test_id] = gt
        else:
            raise InputError(f"Usage of test id {test_id!r} must be one of {', '.join(USAGES)}, "
                             f"got {usage!r}", path, line)
    return public, private, ignored


def _recognition_entry(tokens: list[str], cell: str, test_id: str, path: str | os.PathLike,
                       line: int) -> tuple[int, float]:
    """``(landmark_id, confidence)`` of one recognition cell (spec §3.3), or InputError naming the line."""
    if len(tokens) != 2:
        raise InputError(
            f"prediction of test id {test_id!r} must be 'landmark_id confidence' "
            f"separated by one space, got {len(tokens)} tokens in {cell!r}", path, line)
    try:
        label = int(tokens[0])
    except ValueError:
        raise InputError(f"landmark id {tokens[0]!r} of test id {test_id!r} is not an "
                         f"integer", path, line) from None
    try:
        confidence = float(tokens[1])
    except ValueError:
        raise InputError(f"confidence {tokens[1]!r} of test id {test_id!r} is not a "
                         f"number", path, line) from None
    if math.isnan(confidence):
        raise InputError(f"confidence of test id {test_id!r} is NaN (it makes the GAP "
                         f"order undefined)", path, line)
    return label, confidence


def read_predictions(
    path: str | os.PathLike,
    public_ids: Iterable[str],
    private_ids: Iterable[str],
    ignored_ids: Iterable[str],
    task: str,
) -> tuple[dict[str, Prediction], dict[str, Prediction]]:
    """Read a submission file and route its rows to the Public and Private subsets.

    Mirrors the official ``ReadPredictions`` (spec §3.3), in its order: line 1 is skipped,
    blank lines are skipped; a row whose id already has a stored prediction is an error; a
    row whose id is ignored is skipped before its cell is read; an empty cell is skipped
    whatever the id; the cell is split on ``' '`` and one trailing empty token dropped;
    recognition needs exactly ``landmark_id confidence``; the id must then be Public or
    Private.

    Args:
        path: the submission CSV (``id,landmarks`` or ``id,images``, header included).
        public_ids: test ids of the Public subset.
        private_ids: test ids of the Private subset.
        ignored_ids: test ids that are ignored in scoring.
        task: ``"retrieval"`` or ``"recognition"``.

    Returns:
        ``(public, private)``: test id -> prediction, in file order. A recognition
        prediction is ``(landmark_id, confidence)``; a retrieval prediction is the list of
        index ids, best first, ``''`` tokens included.

    Raises:
        InputError: on a repeated id, a row with only one column, a malformed or NaN
            recognition prediction, or an id in neither subset; the message gives the file
            and line.
    """
    _check_task(task)
    public_set, private_set, ignored_set = set(public_ids), set(private_ids), set(ignored_ids)
    public: dict[str, Prediction] = {}
    private: dict[str, Prediction] = {}
    first_line: dict[str, int] = {}
    for line, row in _data_records(path):
        if not row:
            continue
        test_id = row[0]
        if test_id in public or test_id in private:
            raise InputError(f"test id {test_id!r} is repeated (first predicted on line "
                             f"{first_line[test_id]})", path, line)
        if test_id in ignored_set:
            continue
        if len(row) < 2:
            raise InputError(f"expected 2 columns (id and prediction), got 1: {row!r}", path, line)
        cell = row[1]
        if not cell:
            continue
        tokens = cell.split(" ")
        if not tokens[-1]:
            tokens = tokens[:-1]
        entry: Prediction = _recognition_entry(tokens, cell, test_id, path, line) if task == "recognition" else tokens
        if test_id in public_set:
            public[test_id] = entry
        elif test_id in private_set:
            private[test_id] = entry
        else:
            raise InputError(f"test id {test_id!r} is not in the solution (neither Public, "
                             f"Private nor Ignored)", path, line)
        first_line[test_id] = line
    return public, private


# --------------------------------------------------------------------------- recognition
def _count_positives(solution: Mapping[str, Sequence]) -> int:
    return sum(1 for gt in solution.values() if gt)


def global_average_precision(
    predictions: Mapping[str, tuple[int, float]],
    solution: Mapping[str, Sequence[int]],
    ignore_non_gt_test_images: bool = False,
) -> float:
    """Global Average Precision (micro-AP) of recognition predictions (spec §4.1).

    Predictions are walked by confidence descending, ties by test id then label ascending;
    a prediction is correct when its label is any of the query's ground-truth labels. The
    sum of the precisions at the correct ones is divided by the number of solution entries
    with a non-empty ground truth (queries without a prediction count there too).

    Args:
        predictions: test id -> ``(landmark_id, confidence)``.
        solution: test id -> ground-truth landmark ids (empty for non-landmark queries).
        ignore_non_gt_test_images: drop predictions on queries without ground truth instead
            of counting them as wrong (the official "GAP ignoring non-landmark queries").
            Kaggle's metric is ``False``.

    Returns:
        GAP in [0, 1].

    Raises:
        InputError: a prediction's test id is not in ``solution``.
        ValueError: a confidence is NaN, or no solution entry has ground truth.
    """
    for test_id, (_, confidence) in predictions.items():
        if test_id not in solution:
            raise InputError(f"prediction for test id {test_id!r}, which is not in the solution")
        if math.isnan(confidence):
            raise ValueError(f"confidence of test id {test_id!r} is NaN")
    num_positives = _count_positives(solution)
    if num_positives == 0:
        raise ValueError("GAP is undefined: no solution entry has ground truth")
    # The official two-pass sort: by (id, label), then stably by confidence descending.
    ordered = sorted(predictions.items(), key=lambda item: (item[0], item[1][0]))
    ordered.sort(key=lambda item: item[1][1], reverse=True)
    gap = 0.0
    total = 0
    correct = 0
    for test_id, (label, _) in ordered:
        gt = solution[test_id]
        if ignore_non_gt_test_images and not gt:
            continue
        total += 1
        if label in gt:
            correct += 1
            gap += correct / total
    return gap / num_positives


def top1_accuracy(
    predictions: Mapping[str, tuple[int, float]], solution: Mapping[str, Sequence[int]]
) -> float:
    """Share of queries with ground truth whose predicted label is one of their labels.

    Queries without ground truth are left out; a missing prediction counts as wrong;
    predictions for ids outside ``solution`` are ignored (as the official code does).

    Args:
        predictions: test id -> ``(landmark_id, confidence)``.
        solution: test id -> ground-truth landmark ids.

    Returns:
        Accuracy in [0, 1] (a fraction, not a percentage).

    Raises:
        ValueError: no solution entry has ground truth.
    """
    correct = 0
    with_gt = 0
    for test_id, gt in solution.items():
        if gt:
            with_gt += 1
            if test_id in predictions and predictions[test_id][0] in gt:
                correct += 1
    if with_gt == 0:
        raise ValueError("top-1 accuracy is undefined: no solution entry has ground truth")
    return correct / with_gt


# --------------------------------------------------------------------------- retrieval
def _check_retrieval(
    predictions: Mapping[str, Sequence[str]], solution: Mapping[str, Sequence[str]],
    max_predictions: int, what: str,
) -> None:
    if max_predictions < 1:
        raise ValueError(f"max_predictions must be >= 1, got {max_predictions}")
    if not solution:
        raise ValueError(f"{what} is undefined: the solution has no query")
    for test_id in predictions:
        if test_id not in solution:
            raise InputError(f"prediction for test id {test_id!r}, which is not in the solution")


def mean_average_precision(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Sequence[str]],
    max_predictions: int = MAX_PREDICTIONS,
) -> float:
    """mAP@``max_predictions`` of retrieval predictions (spec §4.2).

    Per query, the first ``max_predictions`` raw positions are walked; a repeated id keeps
    its slot and scores nothing; AP is the sum of the precisions at the hits divided by
    ``min(len(ground truth), max_predictions)``. The mean is over all solution queries,
    queries without a prediction adding 0.

    Args:
        predictions: test id -> index ids, best first.
        solution: test id -> relevant index ids.
        max_predictions: the cut-off (100 for GLDv2).

    Returns:
        mAP in [0, 1].

    Raises:
        InputError: a prediction's test id is not in ``solution``.
        ValueError: ``solution`` is empty, a predicted query has an empty ground-truth
            list, or ``max_predictions < 1``.
    """
    _check_retrieval(predictions, solution, max_predictions, "mAP")
    mean_ap = 0.0
    for test_id, prediction in predictions.items():
        gt = solution[test_id]
        expected = min(len(gt), max_predictions)
        if expected == 0:
            raise ValueError(f"AP of test id {test_id!r} is undefined: its ground truth is empty")
        relevant = set(gt)
        seen: set[str] = set()
        ap = 0.0
        correct = 0
        for i in range(min(len(prediction), max_predictions)):
            item = prediction[i]
            if item not in seen:
                if item in relevant:
                    correct += 1
                    ap += correct / (i + 1)
                seen.add(item)
        mean_ap += ap / expected
    return mean_ap / len(solution)


def mean_precisions(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Sequence[str]],
    max_predictions: int = MAX_PREDICTIONS,
) -> np.ndarray:
    """Mean precision@k for k = 1 .. ``max_predictions`` (spec §4.2).

    P@k of a query is the number of distinct relevant ids among its first k slots divided
    by k, also when the list is shorter than k; the mean is over all solution queries
    (a query without a prediction has P@k = 0).

    Args:
        predictions: test id -> index ids, best first.
        solution: test id -> relevant index ids.
        max_predictions: the largest k.

    Returns:
        float64 array of shape (max_predictions,): entry k-1 is the mean P@k.

    Raises:
        InputError: a prediction's test id is not in ``solution``.
        ValueError: ``solution`` is empty or ``max_predictions < 1``.
    """
    _check_retrieval(predictions, solution, max_predictions, "mean precision")
    precisions = np.zeros((len(solution), max_predictions))
    ranks = np.arange(1, max_predictions + 1)
    for row, (test_id, prediction) in enumerate(predictions.items()):
        relevant = set(solution[test_id])
        seen: set[str] = set()
        hits = np.zeros(max_predictions, dtype=np.int64)
        for i in range(min(len(prediction), max_predictions)):
            item = prediction[i]
            if item not in seen:
                if item in relevant:
                    hits[i] = 1
                seen.add(item)
        precisions[row] = np.cumsum(hits) / ranks
    return np.mean(precisions, axis=0)


def mean_median_position(
    predictions: Mapping[str, Sequence[str]],
    solution: Mapping[str, Sequence[str]],
    max_predictions: int = MAX_PREDICTIONS,
) -> tuple[float, float]:
    """Mean and median 1-based position of the first relevant id (spec §4.2).

    Only the first ``max_predictions`` positions are searched; a query without a hit there,
    or without a prediction, counts as ``max_predictions + 1``.

    Args:
        predictions: test id -> index ids, best first.
        solution: test id -> relevant index ids.
        max_predictions: the cut-off.

    Returns:
        ``(mean_position, median_position)`` over all solution queries.

    Raises:
        InputError: a prediction's test id is not in ``solution``.
        ValueError: ``solution`` is empty or ``max_predictions < 1``.
    """
    _check_retrieval(predictions, solution, max_predictions, "first-hit position")
    positions = np.full(len(solution), float(max_predictions + 1))
    for row, (test_id, prediction) in enumerate(predictions.items()):
        relevant = set(solution[test_id])
        for i in range(min(len(prediction), max_predictions)):
            if prediction[i] in relevant:
                positions[row] = i + 1
                break
    return float(np.mean(positions)), float(np.median(positions))


# --------------------------------------------------------------------------- end to end
def _score_recognition(predictions: dict, solution: dict) -> dict[str, Any] | None:
    with_gt = _count_positives(solution)
    if with_gt == 0:
        return None
    return {
        "gap": float(global_average_precision(predictions, solution)),
        "gap_ignoring_non_landmarks": float(
            global_average_precision(predictions, solution, ignore_non_gt_test_images=True)),
        "top1_accuracy": float(top1_accuracy(predictions, solution)),
        "n_queries": len(solution),
        "n_with_gt": with_gt,
        "n_predicted": len(predictions),
    }


def _score_retrieval(predictions: dict, solution: dict) -> dict[str, Any] | None:
    if not solution:
        return None
    precisions = mean_precisions(predictions, solution, MAX_PREDICTIONS)
    mean_position, median_position = mean_median_position(predictions, solution, MAX_PREDICTIONS)
    return {
        "map@100": float(mean_average_precision(predictions, solution, MAX_PREDICTIONS)),
        **{f"p@{k}": float(precisions[k - 1]) for k in PRECISION_RANKS},
        "mean_first_position": mean_position,
        "median_first_position": median_position,
        "n_queries": len(solution),
        "n_predicted": len(predictions),
    }


def score(task: str, solution_path: str | os.PathLike,
          submission_path: str | os.PathLike) -> dict[str, Any]:
    """Score a submission file against a solution file, as the official scripts do.

    Reads both files (:func:`read_solution`, :func:`read_predictions`) and scores the Public
    and the Private subset separately, each with its own solution rows and the predictions
    routed to it; ignored test images take part in neither.

    Args:
        task: ``"retrieval"`` or ``"recognition"``.
        solution_path: the solution CSV (``id,images|landmarks,Usage``).
        submission_path: the submission CSV.

    Returns:
        ``{"task": task, "public": figures or None, "private": figures or None}``. A
        subset's figures are ``None`` when it has no query with ground truth (recognition:
        no entry with a non-empty list; retrieval: no query). Retrieval figures:
        ``map@100``, ``p@1``, ``p@5``, ``p@10``, ``p@50``, ``p@100`` (fractions),
        ``mean_first_position``, ``median_first_position``, ``n_queries``,
        ``n_predicted``. Recognition figures: ``gap``, ``gap_ignoring_non_landmarks``,
        ``top1_accuracy`` (fraction), ``n_queries``, ``n_with_gt``, ``n_predicted``.
        All values are plain Python floats / ints.

    Raises:
        InputError: an unknown task, or a malformed / unreadable file (file and line named).
    """
    _check_task(task)
    public, private, ignored = read_solution(solution_path, task)
    pred_public, pred_private = read_predictions(submission_path, public, private, ignored, task)
    subset = _score_recognition if task == "recognition" else _score_retrieval
    return {"task": task, "public": subset(pred_public, public),
            "private": subset(pred_private, private)}


def format_score(result: Mapping[str, Any]) -> str:
    """A plain-text table of a :func:`score` result: one row per metric, Public / Private.

    Floats are shown with 6 decimals, counts as integers, missing figures as ``—``.
    """
    task = result.get("task")
    keys = _RECOGNITION_KEYS if task == "recognition" else _RETRIEVAL_KEYS

    def cell(figures: Mapping[str, Any] | None, key: str) -> str:
        value = None if figures is None else figures.get(key)
        if value is None:
            return "—"
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return str(int(value))
        return f"{float(value):.6f}"

    rows = [("metric", "Public", "Private")]
    rows += [(_LABELS.get(k, k), cell(result.get("public"), k), cell(result.get("private"), k))
             for k in keys]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"GLDv2 {task} scores"]
    for n, (name, pub, priv) in enumerate(rows):
        lines.append(f"{name:<{width[0]}}  {pub:>{width[1]}}  {priv:>{width[2]}}")
        if n == 0:
            lines.append("-" * (width[0] + width[1] + width[2] + 4))
    return "\n".join(lines)
