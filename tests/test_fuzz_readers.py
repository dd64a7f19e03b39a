"""Property-based (hypothesis) fuzzing of the CSV readers with malformed files.

Each test generates a valid file, checks it reads back to exactly what was written, then
applies one random corruption and checks that the reader either raises ``InputError`` whose
path is the file and whose line is the 1-based line of the corrupted row (header = line 1),
or -- when the corruption is legal per GLDV2_SPEC.md / the existing tests -- returns exactly
the expected result. Never a silently different result.

Semantics relied on (spec §1, §3.3, §3.4, §7 and tests/test_data.py, test_metrics.py,
test_submission.py):

* ids are exact strings: ``0000000000000e12`` stays a string, ``nan`` / ``None`` / ``NaN`` as
  an id are just those strings (never NaN); an empty id is an error in the dataset readers;
* dataset readers (glr.data) locate columns by header name, skip blank lines, reject wrong
  field counts, empty / duplicate ids and non-integer landmark ids;
* solution reader (glr.metrics.read_solution) mirrors the official ``ReadSolution``: line 1
  is skipped whatever it says, blank lines are errors, extra trailing fields are ignored, an
  ``Ignored`` row is not parsed further, a repeated id overwrites the earlier row of its
  subset, Usage must be exactly Public / Private / Ignored;
* submission readers (glr.submission): the header must be exact; read_submission skips blank
  lines, validate_submission_file rejects them; every row has exactly two fields.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from glr import metrics, submission
from glr.data import readers as data
from glr.utils import InputError

# GLR_FUZZ_EXAMPLES=2000 for a longer hunt; the default keeps the file to a few seconds.
SETTINGS = settings(max_examples=int(os.environ.get("GLR_FUZZ_EXAMPLES", "60")), deadline=None,
                    database=None,  # no example database folder in the repo
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

HEX = "0123456789abcdef"
TRICKY_IDS = ["0000000000000e12", "0000000000000001", "1e10000000000000", "00000000000000e5",
              "0000000000000000", "1234567890123456"]
NAN_LIKE = ["nan", "NaN", "NAN", "None", "null", "NULL", "NA", "<NA>", "inf", "-nan", "#NA"]
BAD_USAGE = ["public", "Pubic", "", "PUBLIC", "Public ", " Private", "private", "ignored",
             "None", "nan", "Publicc"]
BAD_LANDMARK = ["", "x", "1.0", "nan", "NaN", "None", "-1", "+1", " 1", "1 ", "1e3", "0x1f", "12a",
                "\u0661"]

hex_id = st.one_of(st.text(HEX, min_size=16, max_size=16), st.sampled_from(TRICKY_IDS))
landmark = st.integers(min_value=0, max_value=250_000)

_counter = itertools.count()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def write_lines(folder: Path, name: str, lines: list[str]) -> Path:
    """A fresh file (one per hypothesis example) holding ``lines`` joined by ``\\n``."""
    path = folder / f"{next(_counter):06d}_{name}"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="")
    return path


def csv_line(fields: list[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(fields)
    return buf.getvalue()


def assert_input_error(fn, path: Path, line: int):
    with pytest.raises(InputError) as exc:
        fn()
    err = exc.value
    assert err.path == str(path), str(err)
    assert err.line == line, str(err)
    assert f"{path}:{line}:" in str(err), str(err)
    return err


def first_repeat(keys: list) -> int | None:
    """0-based position of the first key equal to an earlier one."""
    seen = set()
    for i, k in enumerate(keys):
        if k in seen:
            return i
        seen.add(k)
    return None


def insert_blank_lines(draw, rows: list) -> tuple[list, list[int]]:
    """Rows with 1-3 blank lines (``None``) inserted after the header; their 0-based positions."""
    rows = list(rows)
    for _ in range(draw(st.integers(1, 3))):
        rows.insert(draw(st.integers(0, len(rows))), None)
    return rows, [i for i, r in enumerate(rows) if r is None]


def render(header: list[str], rows: list) -> list[str]:
    return [csv_line(header)] + ["" if r is None else csv_line(r) for r in rows]


# =========================================================================== glr.data
DATA_CORRUPTIONS = ["none", "drop_column", "blank_lines", "nan_id", "empty_id", "space_id",
                    "duplicate_row", "add_field", "remove_field", "bad_landmark"]


def structural(draw, corruption: str, header: list[str], rows: list, k: int, key: int,
               required: list[str], lm: int | None = None) -> tuple[list[str], list, int | None] | None:
    """The corruptions every headed file shares, on row ``k`` (line k + 2): a dropped required
    column (error at line 1), blank lines (legal), a repeated row (error at the second copy of its
    ``key`` column), a field added or removed (error at that row) and, with ``lm``, a bad landmark
    id (error at that row). Returns ``(header, rows, error_line)``, None for any other corruption."""
    line = k + 2
    if corruption == "drop_column":
        gone = draw(st.sampled_from(required))
        return [h for h in header if h != gone], rows, 1
    if corruption == "blank_lines":
        return header, insert_blank_lines(draw, rows)[0], None
    if corruption == "duplicate_row":
        rows.insert(draw(st.integers(0, len(rows))), list(rows[k]))
        return header, rows, first_repeat([r[key] for r in rows]) + 2
    if corruption == "add_field":
        rows[k].insert(draw(st.integers(0, len(rows[k]))), "extra")
        return header, rows, line
    if corruption == "remove_field" and len(rows[k]) > 1:
        del rows[k][draw(st.integers(0, len(rows[k]) - 1))]
        return header, rows, line
    if corruption == "bad_landmark" and lm is not None:
        rows[k][lm] = draw(st.sampled_from(BAD_LANDMARK))
        return header, rows, line
    return None


@st.composite
def train_file(draw):
    """(header, rows, column of id, column of landmark_id) of a valid train.csv."""
    official = draw(st.booleans())
    names = ["id", "url", "landmark_id"] if official else ["id", "landmark_id"]
    order = draw(st.permutations(names))
    ids = draw(st.lists(hex_id, min_size=1, max_size=8, unique=True))
    rows = []
    for image_id in ids:
        value = {"id": image_id, "landmark_id": str(draw(landmark)),
                 "url": f"https://upload.wikimedia.org/wikipedia/commons/a/ab/{image_id},x.jpg"}
        rows.append([value[n] for n in order])
    return list(order), rows


@SETTINGS
@given(train_file(), st.sampled_from(DATA_CORRUPTIONS), st.data())
def test_read_train_fuzz(fuzz_dir, spec, corruption, draw):
    header, rows = spec
    draw = draw.draw
    i_id, i_lm = header.index("id"), header.index("landmark_id")
    expected = [(r[i_id], int(r[i_lm])) for r in rows]
    path = write_lines(fuzz_dir, "train.csv", render(header, rows))
    assert data.read_train(path) == expected  # round trip

    k = draw(st.integers(0, len(rows) - 1))
    line = k + 2
    rows = [list(r) for r in rows]
    error_line: int | None = None
    shared = structural(draw, corruption, header, rows, k, i_id, ["id", "landmark_id"], i_lm)
    if shared is not None:
        header, rows, error_line = shared
    elif corruption == "nan_id":
        rows[k][i_id] = draw(st.sampled_from(NAN_LIKE))  # a legal, exact-string id
        expected[k] = (rows[k][i_id], expected[k][1])
    elif corruption == "empty_id":
        rows[k][i_id] = ""
        error_line = line
    elif corruption == "space_id":
        rows[k][i_id] = draw(st.sampled_from([" ", " " + rows[k][i_id], rows[k][i_id] + " ", "a b",
                                               "a/b", "..\\x", "a\tb"]))
        error_line = line
    path = write_lines(fuzz_dir, "train.csv", render(header, rows))
    if error_line is None:
        assert data.read_train(path) == expected
    else:
        assert_input_error(lambda: data.read_train(path), path, error_line)


@st.composite
def ids_file(draw):
    extra = draw(st.booleans())  # index.csv / test.csv may carry extra columns
    header = ["id", "url"] if extra else ["id"]
    if extra and draw(st.booleans()):
        header.reverse()
    ids = draw(st.lists(hex_id, min_size=1, max_size=8, unique=True))
    rows = [[i if h == "id" else f"https://x/{i}.jpg" for h in header] for i in ids]
    return header, rows


@SETTINGS
@given(ids_file(), st.sampled_from(DATA_CORRUPTIONS), st.data())
def test_read_ids_fuzz(fuzz_dir, spec, corruption, draw):
    header, rows = spec
    draw = draw.draw
    i_id = header.index("id")
    expected = [r[i_id] for r in rows]
    path = write_lines(fuzz_dir, "index.csv", render(header, rows))
    assert data.read_ids(path) == expected

    k = draw(st.integers(0, len(rows) - 1))
    line = k + 2
    rows = [list(r) for r in rows]
    error_line: int | None = None
    shared = structural(draw, corruption, header, rows, k, i_id, ["id"])
    if shared is not None:
        header, rows, error_line = shared
    elif corruption == "nan_id":
        rows[k][i_id] = expected[k] = draw(st.sampled_from(NAN_LIKE))
    elif corruption == "empty_id":
        rows[k][i_id] = ""
        error_line = line
    elif corruption == "space_id":
        rows[k][i_id] = draw(st.sampled_from([" ", " " + rows[k][i_id], rows[k][i_id] + " ", "a b",
                                               "a/b", "a\\b"]))
        error_line = line
    elif corruption == "remove_field":
        # a one-column row without its field is a blank line, skipped like any other
        rows[k] = None
        del expected[k]
    # "bad_landmark": no landmark column, the file is unchanged
    path = write_lines(fuzz_dir, "index.csv", render(header, rows))
    if error_line is None:
        assert data.read_ids(path) == expected
    else:
        assert_input_error(lambda: data.read_ids(path), path, error_line)


@st.composite
def train_clean_file(draw):
    landmarks = draw(st.lists(landmark, min_size=1, max_size=6, unique=True))
    ids = draw(st.lists(hex_id, min_size=len(landmarks), max_size=len(landmarks) + 12, unique=True))
    # split ids into one non-empty group per landmark
    cuts = sorted(draw(st.lists(st.integers(1, len(ids) - 1), max_size=len(landmarks) - 1,
                                min_size=len(landmarks) - 1, unique=True))) if len(landmarks) > 1 else []
    bounds = [0] + cuts + [len(ids)]
    groups = [ids[a:b] for a, b in zip(bounds, bounds[1:])]
    return landmarks, groups


@SETTINGS
@given(train_clean_file(), st.sampled_from(DATA_CORRUPTIONS + ["shared_image", "twice_image"]),
       st.data())
def test_read_train_clean_fuzz(fuzz_dir, spec, corruption, draw):
    landmarks, groups = spec
    draw = draw.draw
    header = ["landmark_id", "images"]
    rows = [[str(lm), " ".join(g)] for lm, g in zip(landmarks, groups)]
    expected = dict(zip(landmarks, groups))
    path = write_lines(fuzz_dir, "train_clean.csv", render(header, rows))
    assert data.read_train_clean(path) == expected

    k = draw(st.integers(0, len(rows) - 1))
    line = k + 2
    error_line: int | None = None
    shared = structural(draw, corruption, header, rows, k, 0, header, 0)
    if shared is not None:
        header, rows, error_line = shared
    elif corruption == "nan_id":
        j = draw(st.integers(0, len(groups[k]) - 1))
        new = list(groups[k])
        new[j] = draw(st.sampled_from(NAN_LIKE))
        rows[k][1] = " ".join(new)
        expected[landmarks[k]] = new
    elif corruption in ("space_id", "empty_id"):
        rows[k][1] = rows[k][1] + " a/b"
        error_line = line
    elif corruption == "shared_image":  # one image under two landmarks
        assume(len(rows) > 1)
        other = draw(st.integers(0, len(rows) - 1).filter(lambda j: j != k))
        rows[k][1] += " " + groups[other][0]
        error_line = max(k, other) + 2
    elif corruption == "twice_image":
        rows[k][1] += " " + groups[k][-1]
        error_line = line
    path = write_lines(fuzz_dir, "train_clean.csv", render(header, rows))
    if error_line is None:
        assert data.read_train_clean(path) == expected
    else:
        assert_input_error(lambda: data.read_train_clean(path), path, error_line)


category = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=20)


@SETTINGS
@given(st.lists(st.tuples(landmark, category), min_size=1, max_size=8, unique_by=lambda t: t[0]),
       st.sampled_from(DATA_CORRUPTIONS), st.data())
def test_read_label_table_fuzz(fuzz_dir, table, corruption, draw):
    draw = draw.draw
    header = ["landmark_id", "category"]
    rows = [[str(lm), cat] for lm, cat in table]
    expected = dict(table)
    path = write_lines(fuzz_dir, "label.csv", render(header, rows))
    assert data.read_label_table(path) == expected  # commas, quotes, unicode round-trip

    k = draw(st.integers(0, len(rows) - 1))
    shared = structural(draw, corruption, header, rows, k, 0, header, 0)
    if shared is not None:
        header, rows, error_line = shared
    else:
        error_line = None
        if corruption in ("nan_id", "empty_id", "space_id"):  # values are free text: kept verbatim
            rows[k][1] = draw(st.sampled_from(NAN_LIKE + ["", " "]))
            expected[table[k][0]] = rows[k][1]
    path = write_lines(fuzz_dir, "label.csv", render(header, rows))
    if error_line is None:
        assert data.read_label_table(path) == expected
    else:
        assert_input_error(lambda: data.read_label_table(path), path, error_line)


# =========================================================================== glr.metrics
USAGE = st.sampled_from(["Public", "Private", "Ignored"])


@st.composite
def solution_rows(draw, task: str):
    """Rows ``[id, cell, Usage]`` of a valid solution file with distinct ids."""
    ids = draw(st.lists(hex_id, min_size=1, max_size=8, unique=True))
    rows = []
    for test_id in ids:
        usage = draw(USAGE)
        if usage == "Ignored":
            cell = draw(st.sampled_from(["None", "", "1 x", "garbage"]))
        elif task == "recognition":
            cell = " ".join(map(str, draw(st.lists(landmark, max_size=3))))
        else:
            cell = " ".join(draw(st.lists(hex_id, min_size=0, max_size=4)))
        rows.append([test_id, cell, usage])
    return rows


def model_solution(rows: list, task: str):
    """What spec §3.4 says ReadSolution returns for well-formed rows."""
    public, private, ignored = {}, {}, []
    for test_id, cell, usage, *_ in rows:
        if usage == "Ignored":
            ignored.append(test_id)
            continue
        gt = ([int(t) for t in cell.split(" ")] if cell else []) if task == "recognition" else cell.split(" ")
        (public if usage == "Public" else private)[test_id] = gt
    return public, private, ignored


SOLUTION_CORRUPTIONS = ["none", "drop_column", "blank_lines", "nan_id", "empty_id", "duplicate_row",
                        "wrong_usage", "add_field", "remove_field", "bad_landmark"]


def corrupt_solution(draw, rows: list, task: str, corruption: str):
    """(header, rows, error line or None, expected parse or None)."""
    header = ["id", "landmarks" if task == "recognition" else "images", "Usage"]
    rows = [list(r) for r in rows]
    k = draw(st.integers(0, len(rows) - 1))
    line = k + 2
    error_line = None
    if corruption == "drop_column":  # line 1 is skipped whatever it says (§3.4.1)
        del header[draw(st.integers(0, 2))]
    elif corruption == "blank_lines":  # blank lines are errors in a solution (§3.4.1)
        rows, blanks = insert_blank_lines(draw, rows)
        error_line = blanks[0] + 2
    elif corruption == "nan_id":  # ids are exact strings
        rows[k][0] = draw(st.sampled_from(NAN_LIKE))
    elif corruption == "empty_id":
        rows[k][0] = ""
    elif corruption == "duplicate_row":  # a repeat overwrites its subset's earlier row (§3.4.4)
        rows.insert(draw(st.integers(0, len(rows))), list(rows[k]))
    elif corruption == "wrong_usage":
        rows[k][2] = draw(st.sampled_from(BAD_USAGE))
        error_line = line
    elif corruption == "add_field":  # the official reader reads the first three cells only
        rows[k].append(draw(st.sampled_from(["extra", "", "Public", "Private"])))
    elif corruption == "remove_field":
        del rows[k][draw(st.integers(0, 2))]
        error_line = line
    elif corruption == "bad_landmark":
        rows[k][1] = draw(st.sampled_from(["x", "1.0", "nan", "None", "1  2", " 1", "1e3", "12a"]))
        if task == "recognition" and rows[k][2] != "Ignored":
            error_line = line
    expected = None if error_line is not None else model_solution(rows, task)
    return header, rows, error_line, expected


@SETTINGS
@given(st.sampled_from(metrics.TASKS), st.data(), st.sampled_from(SOLUTION_CORRUPTIONS))
def test_read_solution_fuzz(fuzz_dir, task, draw, corruption):
    draw = draw.draw
    rows = draw(solution_rows(task))
    header = ["id", "landmarks" if task == "recognition" else "images", "Usage"]
    path = write_lines(fuzz_dir, "solution.csv", render(header, rows))
    assert metrics.read_solution(path, task) == model_solution(rows, task)

    header, rows, error_line, expected = corrupt_solution(draw, rows, task, corruption)
    path = write_lines(fuzz_dir, "solution.csv", render(header, rows))
    if error_line is None:
        assert metrics.read_solution(path, task) == expected
    else:
        assert_input_error(lambda: metrics.read_solution(path, task), path, error_line)


def same_score(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_score(a[x], b[x]) for x in a)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@SETTINGS
@given(st.sampled_from(metrics.TASKS), st.data(),
       st.sampled_from(["drop_column", "blank_lines", "duplicate_row", "wrong_usage", "add_field",
                        "remove_field", "bad_landmark"]))
def test_score_on_corrupted_solution_fails_loudly_or_is_unchanged(fuzz_dir, task, draw, corruption):
    """Corruptions that keep the ids: score either raises naming the solution file and line,
    or equals the score of the uncorrupted solution (the change is a no-op per the spec)."""
    draw = draw.draw
    rows = draw(solution_rows(task))
    header = ["id", "landmarks" if task == "recognition" else "images", "Usage"]
    sol = write_lines(fuzz_dir, "solution.csv", render(header, rows))
    sub_rows = []
    for test_id, cell, usage in rows:
        if usage == "Ignored" or not draw(st.booleans()):
            continue
        if task == "recognition":
            gt = cell.split(" ") if cell else []
            label = draw(st.sampled_from(gt)) if gt and draw(st.booleans()) else str(draw(landmark))
            sub_rows.append([test_id, f"{label} {draw(st.floats(0, 10, allow_nan=False))!r}"])
        else:
            pool = (cell.split(" ") if cell else []) + draw(st.lists(hex_id, max_size=3))
            sub_rows.append([test_id, " ".join(draw(st.permutations(pool)))])
    sub = write_lines(fuzz_dir, "submission.csv",
                      render(["id", header[1]], sub_rows))
    try:
        want = metrics.score(task, sol, sub)
    except ValueError as e:  # e.g. GAP undefined: no query with ground truth
        assume(not isinstance(e, InputError))
        raise

    header, bad_rows, error_line, expected = corrupt_solution(draw, rows, task, corruption)
    bad = write_lines(fuzz_dir, "solution.csv", render(header, bad_rows))
    if error_line is None:
        got = metrics.score(task, bad, sub)
        # a legal change scores exactly as a clean file holding what the spec says it means...
        public, private, ignored = expected
        clean = ([[i, " ".join(map(str, gt)), "Public"] for i, gt in public.items()]
                 + [[i, " ".join(map(str, gt)), "Private"] for i, gt in private.items()]
                 + [[i, "None", "Ignored"] for i in ignored])
        assert same_score(got, metrics.score(task, write_lines(fuzz_dir, "clean.csv",
                                                                render(header, clean)), sub))
        # ...which, for everything but a changed retrieval cell, is the original score
        if corruption != "bad_landmark":
            assert same_score(got, want)
    else:
        assert_input_error(lambda: metrics.score(task, bad, sub), bad, error_line)


PREDICTION_CORRUPTIONS = ["none", "blank_lines", "duplicate_row", "unknown_id", "nan_id",
                          "remove_field", "add_field", "nan_confidence", "bad_label"]


@SETTINGS
@given(st.sampled_from(metrics.TASKS), st.data(), st.sampled_from(PREDICTION_CORRUPTIONS))
def test_read_predictions_fuzz(fuzz_dir, task, draw, corruption):
    draw = draw.draw
    ids = draw(st.lists(hex_id, min_size=1, max_size=8, unique=True))
    split = draw(st.lists(st.sampled_from(["Public", "Private"]), min_size=len(ids), max_size=len(ids)))
    public_ids = [i for i, u in zip(ids, split) if u == "Public"]
    private_ids = [i for i, u in zip(ids, split) if u == "Private"]
    rows = []
    for test_id in ids:
        if task == "recognition":
            rows.append([test_id, f"{draw(landmark)} {draw(st.floats(-5, 5, allow_nan=False))!r}"])
        else:
            rows.append([test_id, " ".join(draw(st.lists(hex_id, min_size=1, max_size=4)))])

    def model(rows):
        pub, pri = {}, {}
        for r in rows:
            if r is None or not r[1]:
                continue
            if task == "recognition":
                lab, conf = r[1].split(" ")
                entry = (int(lab), float(conf))
            else:
                entry = r[1].split(" ")
            (pub if r[0] in public_ids else pri)[r[0]] = entry
        return pub, pri

    header = ["id", "landmarks" if task == "recognition" else "images"]
    path = write_lines(fuzz_dir, "submission.csv", render(header, rows))
    read = lambda p: metrics.read_predictions(p, public_ids, private_ids, [], task)  # noqa: E731
    assert read(path) == model(rows)

    k = draw(st.integers(0, len(rows) - 1))
    line = k + 2
    error_line = None
    if corruption == "blank_lines":  # skipped (§3.3.3)
        rows, _ = insert_blank_lines(draw, rows)
    elif corruption == "duplicate_row":  # a repeat of a stored prediction (§3.3.4)
        rows.insert(draw(st.integers(0, len(rows))), list(rows[k]))
        error_line = first_repeat([r[0] for r in rows]) + 2
    elif corruption in ("unknown_id", "nan_id"):  # not in the solution (§3.3.9)
        rows[k][0] = draw(st.sampled_from(NAN_LIKE + ["", "ffffffffffffffff0"]))
        error_line = line
    elif corruption == "remove_field":  # a row with only one column (§3.3.6)
        rows[k] = rows[k][:1]
        error_line = line
    elif corruption == "add_field":  # the official reader reads the first two cells only
        rows[k].append("extra")
    elif corruption == "nan_confidence":
        if task == "recognition":
            rows[k][1] = rows[k][1].split(" ")[0] + " " + draw(st.sampled_from(["nan", "NaN", "x", ""]))
            error_line = line
    elif corruption == "bad_label":
        if task == "recognition":
            rows[k][1] = draw(st.sampled_from(["x", "1.0", "nan", "None", "1e3"])) + " 0.5"
            error_line = line
    path = write_lines(fuzz_dir, "submission.csv", render(header, rows))
    if error_line is None:
        assert read(path) == model(rows)
    else:
        assert_input_error(lambda: read(path), path, error_line)


# =========================================================================== glr.submission
SUBMISSION_CORRUPTIONS = ["none", "drop_column", "blank_lines", "nan_id", "empty_id", "duplicate_row",
                          "add_field", "remove_field", "bad_label"]


@SETTINGS
@given(st.sampled_from(submission.TASKS), st.data(), st.sampled_from(SUBMISSION_CORRUPTIONS))
def test_submission_readers_fuzz(fuzz_dir, task, draw, corruption):
    draw = draw.draw
    ids = draw(st.lists(hex_id, min_size=1, max_size=8, unique=True))
    index = draw(st.lists(hex_id, min_size=1, max_size=10, unique=True))
    rows = []
    for test_id in ids:
        if not draw(st.integers(0, 4)):
            cell = ""
        elif task == "recognition":
            cell = f"{draw(landmark)} {draw(st.sampled_from(['0.5', '1', '3.5e-05', '-2.25', '12.0']))}"
        else:
            cell = " ".join(draw(st.lists(st.sampled_from(index), min_size=1, max_size=5, unique=True)))
        rows.append((test_id, cell))
    path = fuzz_dir / f"{next(_counter):06d}_submission.csv"
    submission.write_submission(path, rows, task, expected_ids=ids, index_ids=index)
    assert submission.read_submission(path, task) == rows  # round trip
    submission.validate_submission_file(path, task, expected_ids=ids, index_ids=index)

    header = list(submission.HEADERS[task])
    lines = [list(r) for r in rows]
    k = draw(st.integers(0, len(lines) - 1))
    line = k + 2
    read_error = None  # error line expected from read_submission
    valid_error = None  # error line expected from validate_submission_file
    expected = [tuple(r) for r in lines]
    if corruption == "drop_column":
        del header[draw(st.integers(0, 1))]
        read_error = valid_error = 1
    elif corruption == "blank_lines":  # read_submission skips them, the validator rejects them
        lines, blanks = insert_blank_lines(draw, lines)
        valid_error = blanks[0] + 2
    elif corruption in ("nan_id", "empty_id"):
        lines[k][0] = "" if corruption == "empty_id" else draw(st.sampled_from(NAN_LIKE))
        expected[k] = tuple(lines[k])
        valid_error = line  # empty id / not an expected query id
    elif corruption == "duplicate_row":
        lines.insert(draw(st.integers(0, len(lines))), list(lines[k]))
        expected = [tuple(r) for r in lines]
        valid_error = first_repeat([r[0] for r in lines]) + 2
    elif corruption == "add_field":
        lines[k].insert(draw(st.integers(0, 2)), "extra")
        read_error = valid_error = line
    elif corruption == "remove_field":
        lines[k] = lines[k][:1]
        read_error = valid_error = line
    elif corruption == "bad_label":
        bad = draw(st.sampled_from(["x 0.5", "1.0 0.5", "1 nan", "1 inf", "1  0.5", " 1 0.5", "1 0.5 ",
                                    "1", "1 0.5 2", "-1 0.5", "1_0 0.5"] if task == "recognition"
                                   else ["a  b", " a", "a ", "a\tb", "a a", "not_in_index"]))
        lines[k][1] = bad
        expected[k] = tuple(lines[k])
        valid_error = line
    path = write_lines(fuzz_dir, "submission.csv", render(header, lines))
    if read_error is None:
        assert submission.read_submission(path, task) == [r for r in expected if r is not None]
    else:
        assert_input_error(lambda: submission.read_submission(path, task), path, read_error)
    if valid_error is None:
        submission.validate_submission_file(path, task, expected_ids=ids, index_ids=index)
    else:
        with pytest.raises(InputError) as exc:
            submission.validate_submission_file(path, task, expected_ids=ids, index_ids=index)
        assert exc.value.path == str(path) and exc.value.line == valid_error, str(exc.value)
        assert str(path) in str(exc.value)
        if valid_error > 1:
            text = str(exc.value)
            assert f"{path}:{valid_error}:" in text or f"line {valid_error}" in text, text


# =========================================================================== regressions
@pytest.mark.parametrize("reader", [
    lambda p: submission.read_submission(p, "retrieval"),
    lambda p: submission.validate_submission_file(p, "retrieval"),
])
def test_submission_csv_error_names_the_line(tmp_path, reader):
    # Before: a csv-level error (here: csv's field size limit) raised InputError naming only
    # the file; now the record's first line is named too, as glr.metrics does.
    path = tmp_path / "sub.csv"
    path.write_text("id,images\nq1,a\nq2," + "x" * 2000 + "\n", encoding="utf-8")
    old = csv.field_size_limit(1000)  # another module may have raised it process-wide
    try:
        with pytest.raises(InputError, match="malformed CSV") as exc:
            reader(path)
    finally:
        csv.field_size_limit(old)
    assert exc.value.path == str(path) and exc.value.line == 3
    assert f"{path}:3:" in str(exc.value)
