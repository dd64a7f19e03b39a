"""Small shared plumbing: the input error type, output-path checks and atomic file writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


class InputError(ValueError):
    """Bad input: the message names the file and line (or the offending id).

    Args:
        message: what is wrong.
        path: the file the problem is in, if any.
        line: 1-based line number in ``path`` (the header is line 1), if known.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(where + message)


def check_writable_dir(path: str | os.PathLike, what: str = "--out", replace: bool = False) -> Path:
    """Check, before any long work, that the folder ``path`` can be created (or written into).

    Walks up from ``path`` to its first existing ancestor: anything but a folder on the way (a
    regular file) is refused, and that ancestor must take a new file. That is tried for real (a
    temporary dotfile, removed at once) rather than asked of ``os.access``, which answers yes to
    root for a ``chmod 0555`` folder.

    Args:
        path: the output folder (need not exist yet).
        what: how the messages name it (the option, e.g. ``"--out"``).
        replace: the folder is built next to ``path`` and renamed over it, so what must take
            new files is its parent (the walk starts there).

    Returns:
        ``Path(path)``.

    Raises:
        InputError: naming the file in the way, or the folder that cannot be written and why
            (read-only file system, permission denied…), and ``what`` with its path.
    """
    path = Path(path)
    if replace and os.path.lexists(path) and not path.is_dir():
        raise InputError(f"exists and is not a folder ({what})", path)
    return _check_writable(path.parent if replace else path, path, what)


def check_writable_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """:func:`check_writable_dir` for an output *file*: ``path`` must not be a folder and its
    folder must take new files (files are written next to their target, then renamed).
    Returns ``Path(path)``."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"is a folder, but {what} names a file to write", path)
    return _check_writable(path.parent, path, what)


def _check_writable(folder: Path, target: Path, what: str) -> Path:
    for parent in (folder, *folder.parents):
        if not os.path.lexists(parent):
            continue
        if not parent.is_dir():
            tail = f" ({what})" if parent == target else f", so {what} {target} cannot be created"
            raise InputError(f"exists and is not a folder{tail}", parent)
        try:
            fd, probe = tempfile.mkstemp(dir=parent, prefix=".glr-write-probe-")
        except OSError as e:
            tail = f" ({what})" if parent == target else f", so {what} {target} cannot be written"
            raise InputError(f"cannot write here ({e.strerror or e}){tail}", parent) from None
        os.close(fd)
        os.unlink(probe)
        break
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success rename it over ``path``.

    Nothing is written to ``path`` if the block raises, so an existing file is never
    left half-overwritten.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file what open() would
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict:
    """The JSON object in ``path``. Raises :class:`InputError` naming the file (and the line of
    a syntax error) when it is missing, unreadable, not JSON, or not an object; ``what`` names
    the file in the messages (``"manifest"`` → "manifest not found", "corrupt manifest (…)")."""
    import json  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found", path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"corrupt {what} (not valid JSON: {e.msg}, column {e.colno})", path, e.lineno) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {what} ({e})", path) from None
    if not isinstance(data, dict):
        raise InputError(f"corrupt {what}: expected a JSON object, got {type(data).__name__}", path)
    return data


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
