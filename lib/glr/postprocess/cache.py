"""The kNN-graph cache the chain and the sweep share: graphs memoised by the content of their
inputs and how they were searched (exact, or an approximate :class:`~glr.search.IndexSpec`), in
memory and optionally on disk (the only file I/O of post-processing). Approximate indexes are
built once per database and spec and kept in memory, so the queries → train and the index →
train searches train one index.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glr.postprocess.kreciprocal import joint_graph
from glr.search import IndexSpec, SearchIndex, build_index, knn
from glr.utils import atomic_write

log = logging.getLogger(__name__)


def fingerprint(x: np.ndarray) -> str:
    """A content hash of an array (shape, dtype and bytes)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{x.shape}{x.dtype}".encode())
    h.update(np.ascontiguousarray(x).data)
    return h.hexdigest()


@dataclass
class GraphCache:
    """Memoises kNN graphs by the content of their inputs, in memory and optionally on disk.

    A graph asked for with ``k`` is served from any stored graph of the same arrays, searched
    the same way, with ``k' >= k`` (its first k columns; for an approximate index these are at
    least as good as a k-search's: the same candidates, or more). An approximate graph is never
    served for an exact request, nor one spec's for another's. ``searches`` counts the searches
    really run, ``hits`` the ones served from memory or disk, ``builds`` the approximate indexes
    trained, ``seconds`` the time spent building and searching. ``memo`` holds intermediate
    results a sweep reuses (expanded descriptors, shortlists); it is never written to disk.

    Args:
        folder: where graphs are stored as ``.npz`` (None: memory only).
        backend: kNN backend (see :func:`glr.search.knn`).
        progress: progress bars on searches.
    """

    folder: str | os.PathLike | None = None
    backend: str = "auto"
    progress: bool = False
    searches: int = 0
    hits: int = 0
    builds: int = 0
    seconds: float = 0.0
    memo: dict[str, Any] = field(default_factory=dict)
    _graphs: dict[tuple[str, str], tuple[int, tuple[np.ndarray, ...]]] = field(default_factory=dict)
    _fps: dict[int, tuple[Any, str]] = field(default_factory=dict)
    _indexes: dict[tuple[str, str], SearchIndex] = field(default_factory=dict)

    def fp(self, x: np.ndarray) -> str:
        """The :func:`fingerprint` of ``x``, remembered per array object (while it lives)."""
        got = self._fps.get(id(x))
        if got is not None and got[0]() is x:
            return got[1]
        h = fingerprint(x)
        self._fps[id(x)] = (weakref.ref(x), h)
        return h

    def _lookup(self, kind: str, key: str, k: int) -> tuple[np.ndarray, ...] | None:
        got = self._graphs.get((kind, key))
        if got is not None and got[0] >= k:
            return got[1]
        if self.folder is not None:
            best = None
            for p in Path(self.folder).glob(f"{kind}_{key}_k*.npz"):
                kk = int(p.stem.rsplit("_k", 1)[1])
                if kk >= k and (best is None or kk < best[0]):
                    best = (kk, p)
            if best is not None:
                with np.load(best[1]) as z:
                    arrays = tuple(z[f"a{i}"] for i in range(len(z.files)))
                self._graphs[(kind, key)] = (best[0], arrays)
                return arrays
        return None

    def _store(self, kind: str, key: str, k: int, arrays: tuple[np.ndarray, ...]) -> None:
        self._graphs[(kind, key)] = (k, arrays)
        if self.folder is not None:
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            with atomic_write(Path(self.folder) / f"{kind}_{key}_k{k}.npz", "wb") as f:
                np.savez(f, **{f"a{i}": a for i, a in enumerate(arrays)})

    def index(self, db: np.ndarray, spec: IndexSpec) -> SearchIndex:
        """The :func:`glr.search.build_index` of ``db`` for ``spec``, built once per (content of
        ``db``, spec) and kept in memory."""
        key = (self.fp(db), spec.key())
        got = self._indexes.get(key)
        if got is None:
            t = time.perf_counter()
            got = build_index(db, spec, backend=self.backend)
            self.builds += 1
            self.seconds += time.perf_counter() - t
            log.info("graph cache: built %s over %d rows in %.1fs", spec.describe(), len(db), time.perf_counter() - t)
            self._indexes[key] = got
        return got

    def knn(self, q: np.ndarray, db: np.ndarray, k: int,
            index: IndexSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(S, I)`` of :func:`glr.search.knn` for ``q`` against ``db``, k clipped to ``len(db)``;
        ``index``: an approximate spec (searched through :meth:`index`), None or exact: exact."""
        spec = _approximate(index)
        k = min(int(k), len(db))
        key = f"{self.fp(q)}-{self.fp(db)}" + _suffix(spec)
        got = self._lookup("knn", key, k)
        if got is None:
            self.searches += 1
            prepared = None if spec is None else self.index(db, spec)  # its build is timed by index()
            t = time.perf_counter()
            if prepared is None:
                got = knn(q, db, k, backend=self.backend, progress=self.progress)
            else:
                got = tuple(prepared.search(q, k, progress=self.progress))
            self.seconds += time.perf_counter() - t
            log.info("graph cache: searched %d x %d, k=%d (%s) in %.1fs", len(q), len(db), k,
                     "exact" if spec is None else spec.key(), time.perf_counter() - t)
            self._store("knn", key, k, got)
        else:
            self.hits += 1
        return got[0][:, :k], got[1][:, :k]

    def joint(self, x: np.ndarray, k: int,
              index: IndexSpec | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The joint graph of :func:`glr.postprocess.kreciprocal.joint_graph` of ``x``:
        ``(S, I, min_similarity)``; ``index`` as for :meth:`knn`."""

        spec = _approximate(index)
        k = min(int(k), len(x))
        key = self.fp(x) + _suffix(spec)
        got = self._lookup("joint", key, k)
        if got is None:
            self.searches += 1
            t = time.perf_counter()
            got = joint_graph(x, k, progress=self.progress, index=spec, backend=self.backend)
            self.seconds += time.perf_counter() - t
            log.info("graph cache: joint graph of %d rows, k=%d (%s) in %.1fs", len(x), k,
                     "exact" if spec is None else spec.key(), time.perf_counter() - t)
            self._store("joint", key, k, tuple(got))
        else:
            self.hits += 1
        return got[0][:, :k], got[1][:, :k], got[2]


def _approximate(index: IndexSpec | None) -> IndexSpec | None:
    return None if index is None or index.exact else index


def _suffix(spec: IndexSpec | None) -> str:
    """The part of a graph's key that says how it was searched: nothing when exact (the keys,
    and the files of a disk cache, stay those of exact graphs); a file-name-safe spec key else."""
    return "" if spec is None else "-" + re.sub(r"[^A-Za-z0-9.-]", "-", spec.key())
