"""GLDv2 metadata readers (GLDV2_SPEC.md sections 1-3): strict CSV rows, ids, labels.

Every CSV is read with the stdlib ``csv`` module, so ids stay exact strings (``0000000000000e12``
is not a float, leading zeros survive) and quoted fields work. A malformed row raises
:class:`glr.utils.InputError` naming the file and the 1-based line (header = line 1).
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from glr.utils import InputError

log = logging.getLogger(__name__)

SPLITS = ("train", "index", "test")


# train_clean.csv packs all ids of a landmark into one field (17 chars per id); the csv
# module's default limit (131072 chars) would stop at ~7700 images per landmark.
_FIELD_LIMIT = 1 << 28


# Characters that can never be part of an image id (they would break space-separated
# id lists or escape the image folder).
_BAD_ID_CHARS = re.compile(r"[\s/\\]")


def _csv_rows(path: str | os.PathLike, required: Sequence[str]) -> Iterator[tuple[int, list[str], dict[str, int]]]:
    """Yield ``(line, row, columns)`` for every non-blank data row of a headed CSV.

    ``columns`` maps header names to field positions. The header must contain every
    name in ``required``; each row must have as many fields as the header.
    """
    path = Path(path)
    if csv.field_size_limit() < _FIELD_LIMIT:
        csv.field_size_limit(_FIELD_LIMIT)
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except OSError as e:
        raise InputError(f"cannot open file: {e.strerror or e}", path) from None
    with f:
        reader = csv.reader(f)
        try:
            try:
                header = next(reader)
            except StopIteration:
                raise InputError(f"empty file, expected a header with {','.join(required)}", path, 1) from None
            columns: dict[str, int] = {}
            for i, name in enumerate(header):
                columns.setdefault(name.strip(), i)
            missing = [c for c in required if c not in columns]
            if missing:
                raise InputError(
                    f"missing column(s) {', '.join(missing)}; header is {','.join(header)!r}", path, 1
                )
            n = len(header)
            for row in reader:
                if len(row) != n:
                    if not row:  # blank line
                        continue
                    raise InputError(
                        f"expected {n} fields ({','.join(header)}), got {len(row)}", path, reader.line_num
                    )
                yield reader.line_num, row, columns
        except (csv.Error, UnicodeDecodeError) as e:
            raise InputError(f"unreadable CSV: {e}", path, reader.line_num + 1) from None


def _header(path: Path) -> list[str]:
    """The stripped header names of a CSV file (missing file → InputError)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise InputError(f"cannot read header: {e}", path, 1) from None


def _parse_landmark(cell: str, path: Path, line: int) -> int:
    # int() would also accept " 12", "+12", "1_000" and "-3".
    if not (cell.isascii() and cell.isdigit()):
        raise InputError(f"landmark id must be a non-negative integer, got {cell!r}", path, line)
    return int(cell)


def _check_id(image_id: str, path: Path, line: int) -> str:
    if not image_id:
        raise InputError("empty image id", path, line)
    if _BAD_ID_CHARS.search(image_id):
        raise InputError(f"image id {image_id!r} contains whitespace or a path separator", path, line)
    return image_id


def _read_id_landmark(path: str | os.PathLike) -> Iterator[tuple[str, int]]:
    """``(id, landmark_id)`` pairs of a file with ``id`` and ``landmark_id`` columns."""
    path = Path(path)
    seen: set[str] = set()
    for line, row, cols in _csv_rows(path, ("id", "landmark_id")):
        image_id = _check_id(row[cols["id"]], path, line)
        landmark = _parse_landmark(row[cols["landmark_id"]], path, line)
        if image_id in seen:
            _duplicate_id(path, image_id, line)
        seen.add(image_id)
        yield image_id, landmark


def _duplicate_id(path: Path, image_id: str, line: int) -> None:
    """Raise the duplicate-id error; the first occurrence is found by re-reading (rare path)."""
    first = next(ln for ln, row, cols in _csv_rows(path, ("id",)) if row[cols["id"]] == image_id)
    raise InputError(f"duplicate image id {image_id!r} (first on line {first})", path, line)


def image_path(root: str | os.PathLike, split: str, image_id: str) -> Path:
    """Path of an image: ``root/split/id[0]/id[1]/id[2]/id.jpg``.

    Raises:
        InputError: the id is shorter than 3 characters or contains a path separator.
    """
    if len(image_id) < 3 or _BAD_ID_CHARS.search(image_id):
        raise InputError(f"invalid image id {image_id!r}: need at least 3 characters and no separators")
    return Path(root, split, image_id[0], image_id[1], image_id[2], image_id + ".jpg")


def read_train(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Read ``train.csv``: official ``id,url,landmark_id`` or Kaggle ``id,landmark_id``.

    Columns are located by header name; extra columns are ignored.

    Returns:
        ``(image_id, landmark_id)`` in file order.

    Raises:
        InputError: missing file or column, wrong field count, empty/duplicate id,
            landmark id that is not a non-negative integer.
    """
    return list(_read_id_landmark(path))


def read_image_to_landmark(path: str | os.PathLike) -> dict[str, int]:
    """Read ``index_image_to_landmark.csv`` (``id,landmark_id``, index numbering).

    Returns:
        image id → landmark id, in file order.
    """
    return dict(_read_id_landmark(path))


def landmark_rows(path: str | os.PathLike, column: str) -> Iterator[tuple[int, int, str]]:
    """``(line, landmark_id, cell of column)`` of a per-landmark table (one row per landmark):
    a bad or repeated landmark id raises :class:`InputError` naming the file and line."""
    path = Path(path)
    lines: dict[int, int] = {}
    for line, row, cols in _csv_rows(path, ("landmark_id", column)):
        landmark = _parse_landmark(row[cols["landmark_id"]], path, line)
        if landmark in lines:
            raise InputError(f"duplicate landmark id {landmark} (first on line {lines[landmark]})", path, line)
        lines[landmark] = line
        yield line, landmark, row[cols[column]]


def read_train_clean(path: str | os.PathLike) -> dict[int, list[str]]:
    """Read ``train_clean.csv`` (``landmark_id,images``; images space-separated).

    Returns:
        landmark id → its image ids, in file order.

    Raises:
        InputError: malformed row, duplicate landmark id, bad image id, or an image
            listed under two landmarks.
    """
    path = Path(path)
    out: dict[int, list[str]] = {}
    owner: dict[str, int] = {}
    for line, landmark, cell in landmark_rows(path, "images"):
        ids = cell.split()
        for image_id in ids:
            _check_id(image_id, path, line)
            prev = owner.setdefault(image_id, landmark)
            if prev != landmark:
                raise InputError(
                    f"image id {image_id!r} listed under landmarks {prev} and {landmark}", path, line
                )
        if len(set(ids)) != len(ids):
            dup = next(i for i, c in Counter(ids).items() if c > 1)
            raise InputError(f"image id {dup!r} listed twice for landmark {landmark}", path, line)
        out[landmark] = ids
    return out


def read_label_table(path: str | os.PathLike, column: str = "category") -> dict[int, str]:
    """Read a per-landmark table such as ``train_label_to_category.csv``.

    Also reads the non-official ``train_label_to_country.csv``
    (``landmark_id,country,continent``) with ``column="country"`` or ``"continent"``.

    Args:
        path: the CSV file.
        column: the value column to return.

    Returns:
        landmark id → the string in ``column``.
    """
    path = Path(path)
    out: dict[int, str] = {}
    for _, landmark, cell in landmark_rows(path, column):
        out[landmark] = cell
    return out


def read_ids(path: str | os.PathLike) -> list[str]:
    """Read the ``id`` column of ``index.csv`` / ``test.csv`` (extra columns ignored).

    Returns:
        Image ids in file order.
    """
    path = Path(path)
    out: list[str] = []
    seen: set[str] = set()
    for line, row, cols in _csv_rows(path, ("id",)):
        image_id = _check_id(row[cols["id"]], path, line)
        if image_id in seen:
            _duplicate_id(path, image_id, line)
        seen.add(image_id)
        out.append(image_id)
    return out


def scan_image_ids(root: str | os.PathLike, split: str) -> list[str]:
    """Ids of all ``<root>/<split>/*/*/*/*.jpg`` files, sorted.

    Dot-files are skipped. A ``.jpg`` whose folders do not match its id's first three
    characters raises InputError (it could never be found again by :func:`image_path`).
    """
    base = Path(root, split)
    if not base.is_dir():
        raise InputError(f"image folder for split {split!r} not found", base)
    ids: list[str] = []

    def subdirs(p: str) -> list[os.DirEntry]:
        with os.scandir(p) as it:
            return [e for e in it if e.is_dir() and not e.name.startswith(".")]

    for d1 in subdirs(str(base)):
        for d2 in subdirs(d1.path):
            for d3 in subdirs(d2.path):
                with os.scandir(d3.path) as it:
                    for e in it:
                        name = e.name
                        if not name.endswith(".jpg") or name.startswith(".") or not e.is_file():
                            continue
                        stem = name[:-4]
                        if len(stem) < 3 or (stem[0], stem[1], stem[2]) != (d1.name, d2.name, d3.name):
                            raise InputError(
                                f"image {stem!r} is not under {split}/<id[0]>/<id[1]>/<id[2]>/", e.path
                            )
                        ids.append(stem)
    ids.sort()
    return ids


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
