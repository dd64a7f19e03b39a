"""Build, validate, write and read Kaggle submissions for GLDv2 retrieval and recognition.

Formats (spec §3): a CSV with header ``id,images`` (retrieval: up to 100 index ids, best
first, single spaces) or ``id,landmarks`` (recognition: ``"landmark_id confidence"``, one
pair); an empty cell means "no prediction". A row is an ``(id, cell)`` pair of strings.

The validator is stricter than the official reader (``ReadPredictions``, spec §3.3), which
silently accepts some malformed rows (empty rank slots, unknown ids in empty rows, repeats after
an empty row) that then score as misses, and stricter than Python's ``int``/``float``, which
accept ``" 5"``, ``"1_0"`` or ``"nan"``. Whatever passes here is read back by the official
reader exactly as written.

Recognition predictions follow the GLDv2 paper's kNN baseline (Weyand et al., CVPR 2020):
sum the cosine similarities of a query's top-k neighbours per landmark label and predict the
label with the largest sum, with that sum as confidence.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from pathlib import Path
from typing import Collection, Iterable, Sequence

import numpy as np

from glr.metrics import HEADERS
from glr.utils import InputError, atomic_write

log = logging.getLogger(__name__)

TASKS = ("retrieval", "recognition")
#: Ranks mAP@100 looks at; Kaggle rejects longer rows.
MAX_IMAGES = 100
#: How many problems a validation error lists before summarising the rest as a count.
MAX_REPORTED = 10

_BAD_ID = re.compile(r'[\s,"\x00-\x1f\x7f]')
_BAD_IMAGES = re.compile(r'[,"\x00-\x1f\x7f]|[^\S ]')  # comma, quote, control, non-space blank
_LABEL = re.compile(r"[0-9]+")
_SCORE = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _check_task(task: str) -> tuple[str, str]:
    if task not in HEADERS:
        raise InputError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return HEADERS[task]


def _str_ids(ids: Iterable, name: str) -> list[str]:
    ids = list(ids)
    for i, x in enumerate(ids):
        if not isinstance(x, str):
            raise TypeError(f"{name}[{i}] is {type(x).__name__} {x!r}; ids must be strings")
    return ids


# --------------------------------------------------------------------------- building rows
def retrieval_rows(
    query_ids: Sequence[str], index_ids: Sequence[str], I: np.ndarray, max_images: int = MAX_IMAGES
) -> list[tuple[str, str]]:
    """One ``(query id, "img1 img2 ...")`` row per query from a kNN result.

    Args:
        query_ids: (Nq,) query ids, in the row order of ``I``.
        index_ids: (Ndb,) index ids, in the row order of the searched database.
        I: (Nq, k) neighbour rows into ``index_ids``, best first; -1 is padding and skipped.
        max_images: keep at most this many distinct images per query (1..100).

    Returns:
        Rows in query order; a query without neighbours gets an empty cell. A repeated image
        (same index row, or two rows with the same id) keeps its first, best, position.
    """
    query_ids = _str_ids(query_ids, "query_ids")
    index_ids = _str_ids(index_ids, "index_ids")
    ok = isinstance(max_images, (int, np.integer)) and not isinstance(max_images, bool)
    if not ok or not 1 <= max_images <= MAX_IMAGES:
        raise ValueError(f"max_images must be an integer in 1..{MAX_IMAGES}, got {max_images!r}")
    I = np.asarray(I)
    if I.ndim != 2 or I.shape[0] != len(query_ids):
        raise ValueError(f"I must have shape ({len(query_ids)}, k), got {I.shape}")
    if I.size and not np.issubdtype(I.dtype, np.integer):
        raise ValueError(f"I must hold integer indices, got dtype {I.dtype}")
    if I.size and (I.min() < -1 or I.max() >= len(index_ids)):
        raise ValueError(f"I holds indices outside -1..{len(index_ids) - 1} (-1 is the only padding value)")
    rows = []
    for qid, row in zip(query_ids, I.tolist()):
        head = row[:max_images]
        if len(set(head)) == len(head) and (not head or min(head) >= 0):
            images = [index_ids[j] for j in head]  # common case: nothing to skip
            if len(set(images)) == len(images):
                rows.append((qid, " ".join(images)))
                continue
        images, seen = [], set()
        for j in row:
            if j < 0 or index_ids[j] in seen:
                continue
            seen.add(index_ids[j])
            images.append(index_ids[j])
            if len(images) == max_images:
                break
        rows.append((qid, " ".join(images)))
    return rows


def recognition_predictions(
    S: np.ndarray, I: np.ndarray, neighbour_labels: np.ndarray | Sequence[int], top_k: int = 5
) -> tuple[np.ndarray, np.ndarray]:
    """kNN label vote: per query, the label whose top-k neighbours' similarities sum highest.

    Args:
        S: (Nq, k) similarities, in the rank order of ``I`` (best first).
        I: (Nq, k) neighbour rows, -1 for padding.
        neighbour_labels: either the (Ndb,) landmark label of every database row, looked up
            through ``I``, or the (Nq, k) labels of the neighbours themselves (same shape as
            ``I``). A negative label (unlabelled image) does not vote.
        top_k: how many leading neighbours vote (the first ``top_k`` columns).

    Returns:
        ``labels`` int64 (Nq,) and ``scores`` float32 (Nq,): the winning label and its summed
        similarity. Ties go to the label whose first voting neighbour ranks first. A query with
        no voting neighbour gets label -1 and score 0.
    """
    S = np.asarray(S)
    I = np.asarray(I)
    if S.ndim != 2 or S.shape != I.shape:
        raise ValueError(f"S and I must be 2-D arrays of the same shape, got {S.shape} and {I.shape}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
    if I.size and not np.issubdtype(I.dtype, np.integer):
        raise ValueError(f"I must hold integer indices, got dtype {I.dtype}")
    t = min(int(top_k), I.shape[1])
    S = S[:, :t].astype(np.float64)
    I = I[:, :t]
    if not np.isfinite(S).all():
        raise ValueError("S contains NaN or infinite similarities")
    lab = np.asarray(neighbour_labels)
    if not (lab.size == 0 or np.issubdtype(lab.dtype, np.integer)):
        raise ValueError(f"neighbour_labels must be integers, got dtype {lab.dtype}")
    if lab.ndim == 2:
        if lab.shape[0] != I.shape[0] or lab.shape[1] < t:
            raise ValueError(f"2-D neighbour_labels must have the shape of I {I.shape}, got {lab.shape}")
        L = lab[:, :t].astype(np.int64)
    elif lab.ndim == 1:
        if I.size and I.max() >= len(lab):
            raise ValueError(f"I refers to row {int(I.max())} but neighbour_labels has {len(lab)} entries")
        L = lab.astype(np.int64)[np.where(I >= 0, I, 0)] if lab.size else np.full(I.shape, -1, np.int64)
    else:
        raise ValueError(f"neighbour_labels must be 1-D (per database row) or 2-D (per neighbour), got {lab.shape}")
    valid = (I >= 0) & (L >= 0)

    nq = I.shape[0]
    labels = np.full(nq, -1, np.int64)
    scores = np.zeros(nq, np.float32)
    step = max(1, (1 << 22) // max(1, t * t))  # bounds the (rows, t, t) temporary
    for a in range(0, nq, step):
        s, l, v = S[a : a + step], L[a : a + step], valid[a : a + step]
        same = (l[:, :, None] == l[:, None, :]) & v[:, None, :]
        # votes[i, j]: total similarity of the label of neighbour j over the voting neighbours;
        # every position of one label gets the same total (same terms, same order).
        votes = np.where(v, (same * s[:, None, :]).sum(axis=2), -np.inf)
        j = np.argmax(votes, axis=1)  # first maximum: the label met first in rank order wins ties
        rows = np.arange(len(j))
        has = v.any(axis=1)
        labels[a : a + step] = np.where(has, l[rows, j], -1)
        scores[a : a + step] = np.where(has, votes[rows, j], 0.0)
    return labels, scores


def recognition_rows(
    query_ids: Sequence[str], labels: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]
) -> list[tuple[str, str]]:
    """One ``(query id, "label score")`` row per query; an empty cell where label < 0.

    Scores are written with the shortest text that reads back to the same value in their
    own precision (``str(np.float32(x))``: ``1.55``, ``3.5e-05``), so ranking is not changed.
    """
    query_ids = _str_ids(query_ids, "query_ids")
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if labels.shape != (len(query_ids),) or scores.shape != (len(query_ids),):
        raise ValueError(
            f"labels and scores must have shape ({len(query_ids)},), got {labels.shape} and {scores.shape}"
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if scores.size and not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    rows = []
    for qid, label, score in zip(query_ids, labels, scores):
        if label < 0:
            rows.append((qid, ""))
            continue
        if not np.isfinite(score):
            raise ValueError(f"query {qid!r}: score {score} is not finite")
        rows.append((qid, f"{int(label)} {str(score)}"))
    return rows


# --------------------------------------------------------------------------- validation
def _as_set(ids: Collection[str] | None) -> Collection[str] | None:
    if ids is None or isinstance(ids, (set, frozenset, dict)):
        return ids
    return set(ids)


def _retrieval_problem(cell: str, index_ids: Collection[str] | None) -> str | None:
    bad = _BAD_IMAGES.search(cell)
    if bad:
        return f"images contain {bad.group()!r} (only ids separated by single spaces are allowed)"
    images = cell.split(" ")
    if "" in images:
        return "empty image token (double, leading or trailing space)"
    if len(images) > MAX_IMAGES:
        return f"{len(images)} images, at most {MAX_IMAGES} are allowed"
    if len(set(images)) != len(images):
        seen: set[str] = set()
        dup = next(x for x in images if x in seen or seen.add(x))
        return f"image {dup!r} appears more than once"
    if index_ids is not None:
        unknown = [x for x in images if x not in index_ids]
        if unknown:
            return f"{len(unknown)} image(s) not in the index, e.g. {unknown[0]!r}"
    return None


def _recognition_problem(cell: str) -> str | None:
    tokens = cell.split(" ")
    if cell != cell.strip() or "" in tokens or any(c.isspace() and c != " " for c in cell):
        return f"extra whitespace in {cell!r}; expected 'label score' separated by one space"
    if len(tokens) != 2:
        return f"expected 'label score', got {len(tokens)} tokens in {cell!r}"
    label, score = tokens
    if not _LABEL.fullmatch(label):
        return f"label {label!r} is not a non-negative integer"
    if not _SCORE.fullmatch(score) or not math.isfinite(float(score)):
        return f"score {score!r} is not a finite decimal number"
    return None


def _problems(
    rows: Iterable[tuple[int, object]], task: str, expected_ids, index_ids
) -> tuple[list[tuple[int | None, str | None, str]], int]:
    """All problems as (line, id, message), the first MAX_REPORTED kept, and their count."""
    found: list[tuple[int | None, str | None, str]] = []
    count = 0

    def add(line, rid, msg):
        nonlocal count
        count += 1
        if len(found) < MAX_REPORTED:
            found.append((line, rid, msg))

    expected_ids = _as_set(expected_ids)
    index_ids = _as_set(index_ids)
    first_line: dict[str, int] = {}
    for line, row in rows:
        if not (isinstance(row, (tuple, list)) and len(row) == 2 and all(isinstance(x, str) for x in row)):
            add(line, None, f"row must be an (id, cell) pair of strings, got {row!r}")
            continue
        rid, cell = row
        if rid == "":
            add(line, rid, "empty id")
            continue
        bad = _BAD_ID.search(rid)
        if bad:
            add(line, rid, f"id contains {bad.group()!r}")
            continue
        if rid in first_line:
            add(line, rid, f"duplicate id (first on line {first_line[rid]})")
            continue
        first_line[rid] = line
        if expected_ids is not None and rid not in expected_ids:
            add(line, rid, "id is not one of the expected query ids")
            continue
        if cell == "":
            continue  # no prediction
        msg = _retrieval_problem(cell, index_ids) if task == "retrieval" else _recognition_problem(cell)
        if msg:
            add(line, rid, msg)
    if expected_ids is not None:
        missing = [x for x in expected_ids if x not in first_line]
        if missing:
            shown = ", ".join(repr(x) for x in sorted(missing)[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            add(None, None, f"{len(missing)} expected id(s) missing: {shown}{more}")
    return found, count


def _message(task: str, found, count) -> str:
    parts = []
    for line, rid, msg in found:
        where = "" if line is None else f"line {line}"
        if rid is not None:
            where += f" (id {rid!r})" if where else f"id {rid!r}"
        parts.append(f"{where}: {msg}" if where else msg)
    text = f"invalid {task} submission: " + "; ".join(parts)
    if count > len(found):
        text += f"; and {count - len(found)} more problem(s)"
    return text


def validate_submission(
    rows: Sequence[tuple[str, str]],
    task: str,
    expected_ids: Collection[str] | None = None,
    index_ids: Collection[str] | None = None,
) -> None:
    """Check in-memory rows against everything a Kaggle submission must satisfy.

    Args:
        rows: ``(id, cell)`` pairs; row ``i`` is line ``i + 2`` of the file (header = line 1).
        task: ``"retrieval"`` or ``"recognition"``.
        expected_ids: the test ids; every one must appear exactly once, no other id may.
        index_ids: the index ids retrieval images must come from.

    Raises:
        InputError: listing up to ``MAX_REPORTED`` problems, each with its line and id; its
            ``line`` is the first bad line (None when only ids are missing).
    """
    _check_task(task)
    found, count = _problems(enumerate(rows, start=2), task, expected_ids, index_ids)
    if found:
        err = InputError(_message(task, found, count))
        err.line = found[0][0]
        raise err


def _read_rows(path: Path, task: str, strict: bool) -> list[tuple[int, tuple[str, str]]]:
    """(line, (id, cell)) of each data row; structural problems raise InputError."""
    header = _check_task(task)
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            start = 1
            for record in reader:
                line, start = start, reader.line_num + 1
                if line == 1:
                    if tuple(record) != header:
                        bom = bool(record) and record[0].startswith("\ufeff")
                        hint = " (the file starts with a byte-order mark)" if bom else ""
                        got = ",".join(record)
                        raise InputError(f"header must be {','.join(header)!r}, got {got!r}{hint}", path, 1)
                    continue
                if not record:
                    if strict:
                        raise InputError("blank line", path, line)
                    continue
                if len(record) != 2:
                    msg = f"expected 2 columns (id and {header[1]}), got {len(record)}: {record!r}"
                    raise InputError(msg, path, line)
                rows.append((line, (record[0], record[1])))
            if start == 1:
                raise InputError(f"empty file; expected the header {','.join(header)!r}", path)
    except FileNotFoundError:
        raise InputError("submission file not found", path) from None
    except OSError as e:
        raise InputError(f"cannot read the submission ({e.strerror or e})", path) from None
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text: {e}", path) from None
    except csv.Error as e:
        raise InputError(f"malformed CSV: {e}", path, start) from None
    return rows


def validate_submission_file(
    path: str | os.PathLike,
    task: str,
    expected_ids: Collection[str] | None = None,
    index_ids: Collection[str] | None = None,
    require_rows: bool = False,
) -> None:
    """Read a submission CSV and check it like :func:`validate_submission`.

    The header must be exactly ``id,images`` (retrieval) or ``id,landmarks`` (recognition);
    every row must have two columns; blank lines are rejected. ``require_rows``: a file with
    the header alone is refused too (what a competition upload needs; a kernel's header-only
    fallback for an empty test set is valid without it).

    Raises:
        InputError: naming the file and the first bad line (with the problems found).
    """
    path = Path(path)
    rows = _read_rows(path, task, strict=True)
    if require_rows and not rows:
        raise InputError(f"no rows: the header {','.join(HEADERS[task])!r} alone would score 0", path)
    found, count = _problems(rows, task, expected_ids, index_ids)
    if found:
        err = InputError(_message(task, found, count), path)
        err.line = found[0][0]
        raise err


def write_submission(
    path: str | os.PathLike,
    rows: Iterable[tuple[str, str]],
    task: str,
    expected_ids: Collection[str] | None = None,
    index_ids: Collection[str] | None = None,
) -> Path:
    """Validate ``rows`` and, only if they are valid, write them atomically to ``path``.

    The file gets the task's header and ``\\n`` line endings. An invalid submission raises
    before anything is written, and a failed write leaves any existing file untouched.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    rows = list(rows)
    validate_submission(rows, task, expected_ids, index_ids)
    path = Path(path)
    with atomic_write(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADERS[task])
        writer.writerows(rows)
    log.info("wrote %s submission with %d rows to %s", task, len(rows), path)
    return path


def read_submission(path: str | os.PathLike, task: str) -> list[tuple[str, str]]:
    """The ``(id, cell)`` rows of a submission CSV, cells verbatim (not stripped).

    Checks the header and that each row has two columns; blank lines are skipped (as the
    official reader does). Use :func:`validate_submission_file` to check the contents.
    """
    return [row for _, row in _read_rows(Path(path), task, strict=False)]
