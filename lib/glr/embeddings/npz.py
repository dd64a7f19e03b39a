"""Embeddings on disk as one ``.npz`` (ids + (N, D) float32) and the merge of per-process parts.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from glr.utils import InputError, atomic_write

log = logging.getLogger(__name__)

def save_embeddings(path: str | os.PathLike, ids: Sequence[str], emb: np.ndarray) -> Path:
    """Save ids + (N, D) embeddings as ``.npz`` (atomically)."""
    if len(ids) != len(emb):
        raise ValueError(f"{len(ids)} ids for {len(emb)} embeddings")
    with atomic_write(path, "wb") as f:
        np.savez(f, ids=np.asarray(ids, dtype=str), emb=np.asarray(emb, np.float32))
    return Path(path)


def load_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Inverse of :func:`save_embeddings`: ``(ids, (N, D) float32)``.

    Never unpickles: an ``.npz`` holding object arrays is refused, as is anything but
    ``ids`` (N,) strings and ``emb`` (N, D) real numbers, all finite.

    Raises:
        InputError: naming the file: missing or unreadable, not an ``.npz`` (another format,
            or truncated), object arrays, ``ids`` / ``emb`` missing or of the wrong shape or
            type, or non-finite embeddings (the first id named).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("embeddings file not found", path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip archive: a local file header, or empty
            raise InputError("not an .npz file (it does not start as a zip archive; expected "
                             "glr embed's ids + emb)", path)
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            arrays = {k: z[k] for k in ("ids", "emb") if k in names}
    except InputError:
        raise
    except OSError as e:
        raise InputError(f"cannot read the embeddings ({e.strerror or e})", path) from None
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise InputError("holds object arrays (pickled Python objects), which glr never unpickles; "
                             "save ids as strings and emb as float32 (glr.embeddings.npz.save_embeddings)",
                             path) from None
        raise InputError(f"corrupt .npz ({e})", path) from None
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:  # the last: unknown compression
        raise InputError(f"truncated or corrupt .npz ({e or type(e).__name__})", path) from None
    missing = [k for k in ("ids", "emb") if k not in arrays]
    if missing:
        raise InputError(f"no {' or '.join(map(repr, missing))} array in this .npz (it holds "
                         f"{', '.join(map(repr, names)) or 'nothing'}; expected glr embed's ids + emb)", path)
    ids, emb = arrays["ids"], arrays["emb"]
    return _checked(path, ids, emb)


def _checked(path: Path, ids: np.ndarray, emb: np.ndarray) -> tuple[list[str], np.ndarray]:
    """``load_embeddings``' shape and type checks of the two arrays read from ``path``."""
    if ids.ndim != 1 or ids.dtype.kind not in "USiu":
        raise InputError(f"'ids' must be (N,) strings, got {ids.dtype} of shape {ids.shape}", path)
    if len(ids) == 0 and emb.size == 0:  # save_embeddings of nothing stores emb as (0,)
        return [], np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.dtype.kind not in "fiu":
        raise InputError(f"'emb' must be (N, D) real numbers, got {emb.dtype} of shape {emb.shape}", path)
    if len(emb) != len(ids):
        raise InputError(f"{len(ids)} ids for {len(emb)} embedding rows", path)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    bad = ~np.isfinite(emb.sum(axis=1))  # NaN or ±inf anywhere in a row (or values near 1e38: no embedding either)
    if bad.any():
        first = str(ids[int(np.argmax(bad))])
        raise InputError(f"{int(bad.sum())} embedding row(s) hold NaN or infinity (first: id {first!r})", path)
    return (ids if ids.dtype.kind == "U" else ids.astype(str)).tolist(), emb


def merge_parts(parts: Sequence[dict], ids: Sequence[str], split: str | None = None,
                dup_atol: float = 1e-2) -> np.ndarray:
    """Merge per-rank ``{"index", "emb", "failed", "errors"}`` parts into (N, D) rows in ``ids`` order.

    Positions seen more than once (the distributed sampler pads by repeating images) keep
    their first embedding; a repeat that differs by more than ``dup_atol`` is logged.

    Raises:
        InputError: some images could not be read (``failed``), or positions of ``ids``
            are missing from every part; the message names (up to 5 of) the ids.
    """
    n = len(ids)
    what = f"{split} image" if split else "image"
    failed = sorted({int(i) for p in parts for i in np.asarray(p.get("failed", ()), np.int64)})
    if failed:
        first = next(str(e) for p in parts for i, e in zip(p.get("failed", ()), p.get("errors", ()))
                     if int(i) == failed[0])
        shown = ", ".join(repr(ids[i]) for i in failed[:5]) + (", …" if len(failed) > 5 else "")
        raise InputError(f"{len(failed)} of {n} {what}s could not be read ({shown}); first: {first}")
    index = [np.asarray(p["index"], np.int64) for p in parts if len(p["index"])]
    emb = [np.asarray(p["emb"], np.float32) for p in parts if len(p["index"])]
    if not index:
        index, emb = [np.zeros(0, np.int64)], [np.zeros((0, 0), np.float32)]
    dims = {e.shape[1] for e in emb if len(e)}
    if len(dims) > 1:
        raise ValueError(f"parts disagree on the embedding size: {sorted(dims)}")
    index_all = np.concatenate(index)
    emb_all = np.concatenate(emb) if dims else np.zeros((0, 0), np.float32)
    if len(index_all) and (index_all.min() < 0 or index_all.max() >= n):
        raise ValueError(f"positions outside 0..{n - 1} in the parts")
    uniq, first = np.unique(index_all, return_index=True)  # first occurrence of each position
    if len(uniq) != len(index_all):
        keep = emb_all[first]
        pos = np.searchsorted(uniq, index_all)
        worst = float(np.abs(emb_all - keep[pos]).max()) if len(emb_all) else 0.0
        if worst > dup_atol:
            log.warning("repeated %ss differ by up to %.3g between ranks; kept the first", what, worst)
        log.debug("dropped %d repeated positions", len(index_all) - len(uniq))
    if len(uniq) != n:
        missing = np.setdiff1d(np.arange(n), uniq)
        shown = ", ".join(repr(ids[i]) for i in missing[:5]) + (", …" if len(missing) > 5 else "")
        raise InputError(f"{len(missing)} of {n} {what}s are missing from the gathered embeddings ({shown})")
    return np.ascontiguousarray(emb_all[first], dtype=np.float32)  # uniq == arange(n): ids order
