"""Row sources: in-memory arrays and lazy stores behind one interface (``blocks``, ``take``,
``to_array``, ``ok``), so search and αQE/DBA stream a database without loading it.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_BLOCK_ROWS = 65_536


class ArrayRows:
    """An in-memory (N, D) array with the interface of :class:`ShardedEmbeddings`.

    Args:
        x: (N, D) array, kept as float32 (a copy only when needed).
        ok: (N,) bool, rows that hold a real embedding (default all).
        block_rows: rows per block of :meth:`blocks`.
    """

    def __init__(self, x: np.ndarray, ok: np.ndarray | None = None, block_rows: int = DEFAULT_BLOCK_ROWS):
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"expected an (N, D) array, got shape {x.shape}")
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.ok = np.ones(len(x), bool) if ok is None else np.asarray(ok, bool)
        if self.ok.shape != (len(x),):
            raise ValueError(f"ok must be ({len(x)},), got {self.ok.shape}")
        self.block_rows = max(1, int(block_rows))

    @property
    def shape(self) -> tuple[int, int]:
        return self.x.shape  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.x)

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, (rows, D) float32)`` consecutive blocks covering every row."""
        for a in range(0, len(self.x), self.block_rows):
            yield a, self.x[a:a + self.block_rows]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any shape of int indices) → float32 ``rows.shape + (D,)``."""
        return self.x[np.asarray(rows, np.int64)]

    def to_array(self) -> np.ndarray:
        return self.x


class ConcatRows:
    """Rows of several sources one after another (the joint ``[q; db]`` of αQE/DBA), lazily."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = [as_rows(p) for p in parts]
        dims = {p.shape[1] for p in self.parts if len(p)}
        if len(dims) > 1:
            raise ValueError(f"sources disagree on the dimension: {sorted(dims)}")
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.ok = np.concatenate([p.ok for p in self.parts]) if self.parts else np.zeros(0, bool)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.offsets[-1]), max((p.shape[1] for p in self.parts), default=0)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        for off, p in zip(self.offsets, self.parts):
            for a, block in p.blocks():
                yield int(off) + a, block

    def take(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        flat = rows.reshape(-1)
        out = np.empty((len(flat), self.shape[1]), np.float32)
        part = np.searchsorted(self.offsets, flat, side="right") - 1
        for j in np.unique(part):
            sel = part == j
            out[sel] = self.parts[j].take(flat[sel] - self.offsets[j])
        return out.reshape(rows.shape + (self.shape[1],))

    def to_array(self) -> np.ndarray:
        return np.concatenate([p.to_array() for p in self.parts]) if self.parts else np.zeros((0, 0), np.float32)


def is_rows(x: Any) -> bool:
    """True for a lazy row source (a store, :class:`ArrayRows`, :class:`ConcatRows`), not a plain array."""
    return hasattr(x, "blocks") and hasattr(x, "take") and not isinstance(x, np.ndarray)


def as_rows(x: Any) -> Any:
    """A row source: lazy sources as they are, arrays wrapped in :class:`ArrayRows`."""
    return x if is_rows(x) else ArrayRows(x)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm; (N, D) → (N, D) float32 C-contiguous (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, eps), dtype=np.float32)
