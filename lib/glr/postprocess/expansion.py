"""Descriptor-level post-processing: ensemble combination, PCA whitening, αQE and DBA.

Everything takes and returns float32 ``(N, D)`` row arrays (never D x N). αQE / DBA come in
the two conventions of ``GLDV2_SPEC.md`` section 5:

* the joint Kaggle form (lyakaap's ``qe_dba``, §5.1): one kNN graph over
  ``A = concat(queries, database)``, each row replaced by the ``sim^α``-weighted sum of its
  ``k`` nearest rows of ``A`` (itself included, normally at column 0; a query's neighbours
  may be other queries). :func:`qe_dba_joint` does what the reference *intends*: its
  row-slicing bug (``sims[:n_qe]``) is not reproduced;
* the classic form (Radenović et al., TPAMI 2018, §5.2): αDBA replaces each database vector
  by itself plus the weighted sum of its ``n`` nearest *other* database vectors; αQE replaces
  each query by itself plus the weighted sum of its ``n`` nearest database vectors.
  Queries never see each other. :func:`alpha_dba` then :func:`alpha_qe` (on the new
  database) is the usual order.

Weights are ``max(sim, 0) ** α``: the reference has no guard and gives NaN (non-integer α)
or negative weights (odd α) for negative similarities; clipping keeps every weight
non-negative and changes nothing when the neighbours' similarities are ≥ 0, the only case
that matters in practice. Both forms accept a precomputed kNN graph so a parameter sweep
searches once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from glr.arrays import ConcatRows, as_rows, is_rows, l2_normalize
from glr.postprocess.registry import Env, Option, register_step
from glr.search import _as_matrix as _matrix
from glr.search import knn

log = logging.getLogger(__name__)

#: Rows per block when gathering neighbour vectors ((rows, k, D) float32 temporaries).
GATHER_BYTES = 128 << 20


# --------------------------------------------------------------------------- ensembles
def combine_embeddings(blocks: Sequence[np.ndarray], weights: Sequence[float] | None = None,
                       mode: str = "concat") -> np.ndarray:
    """One descriptor from several models' descriptors of the same images.

    Args:
        blocks: M arrays (N, D_m), row i of each describing the same image.
        weights: M non-negative weights (default 1 each).
        mode: ``"concat"``: each block L2-normalised, scaled by its weight, concatenated and
            re-normalised, so the cosine is ``Σ w_m² cos_m / Σ w_m²``. ``"sum"``: the
            seed's weighted sum of per-model similarity matrices, as a descriptor: blocks
            scaled by ``sqrt(w_m / Σ w)``, so the inner product is ``Σ w_m cos_m / Σ w_m``
            exactly (rows stay unit norm). ``sum`` with weights ``w`` ranks like ``concat``
            with weights ``sqrt(w)``.

    Returns:
        (N, Σ D_m) float32, rows of unit norm.
    """
    if not blocks:
        raise ValueError("combine_embeddings needs at least one block")
    mats = [_matrix(b, f"blocks[{i}]") for i, b in enumerate(blocks)]
    n = mats[0].shape[0]
    for i, m in enumerate(mats):
        if m.shape[0] != n:
            raise ValueError(f"blocks[{i}] has {m.shape[0]} rows, blocks[0] has {n}")
    w = np.ones(len(mats)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(mats),) or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be {len(mats)} non-negative numbers, not all zero; got {weights!r}")
    if mode == "concat":
        out = np.concatenate([l2_normalize(m) * np.float32(wi) for m, wi in zip(mats, w)], axis=1)
        return l2_normalize(out)
    if mode == "sum":
        scale = np.sqrt(w / w.sum())
        out = np.concatenate([l2_normalize(m) * np.float32(s) for m, s in zip(mats, scale)], axis=1)
        return np.ascontiguousarray(out, dtype=np.float32)
    raise ValueError(f"mode must be 'concat' or 'sum', got {mode!r}")


# --------------------------------------------------------------------------- whitening
@dataclass
class Whitening:
    """A learned PCA whitening: ``x → normalise((x - mean) @ proj)``.

    ``mean`` (D,) float32, ``proj`` (D, d) float32 (principal axes scaled by
    ``1/sqrt(eigenvalue + shrinkage)``).
    """

    mean: np.ndarray
    proj: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = _matrix(x, "x")
        if x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"whitening was fitted on {self.mean.shape[0]}-d descriptors, got {x.shape[1]}-d")
        return l2_normalize((x - self.mean) @ self.proj)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "proj": self.proj}


def fit_whitening(x: np.ndarray, dim: int | None = None, shrinkage: float = 0.0, seed: int = 0) -> Whitening:
    """Fit PCA whitening (scikit-learn's PCA) on ``x`` (N, D), typically the index or train set.

    Args:
        dim: output dimension (default min(N, D)).
        shrinkage: added to every eigenvalue before ``1/sqrt``; > 0 damps the noisy tail
            (plain whitening, 0, can amplify it).
        seed: for the randomised solver sklearn picks on large inputs.
    """
    from sklearn.decomposition import PCA  # noqa: PLC0415  (import cost only when used)

    x = _matrix(x, "x")
    if x.shape[0] < 2:
        raise ValueError("fit_whitening needs at least 2 rows")
    d = min(x.shape) if dim is None else int(dim)
    if not 1 <= d <= min(x.shape):
        raise ValueError(f"dim must be in [1, {min(x.shape)}], got {dim}")
    if shrinkage < 0:
        raise ValueError(f"shrinkage must be >= 0, got {shrinkage}")
    pca = PCA(n_components=d, random_state=seed).fit(x)
    scale = 1.0 / np.sqrt(pca.explained_variance_ + shrinkage + 1e-12)
    proj = (pca.components_.T * scale[None, :]).astype(np.float32)
    return Whitening(mean=pca.mean_.astype(np.float32), proj=np.ascontiguousarray(proj))


# --------------------------------------------------------------------------- αQE / DBA
def _check_graph(S: np.ndarray, I: np.ndarray, rows: int, k: int, n_db: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    S, I = np.asarray(S), np.asarray(I)
    if S.shape != I.shape or S.ndim != 2 or S.shape[0] != rows:
        raise ValueError(f"{name}: S and I must both be ({rows}, >= {k}); got {S.shape} and {I.shape}")
    if S.shape[1] < k:
        raise ValueError(f"{name}: the graph has {S.shape[1]} neighbours per row, {k} are needed")
    if I.size and (I[:, :k].min() < 0 or I[:, :k].max() >= n_db):
        raise ValueError(f"{name}: neighbour indices must lie in [0, {n_db})")
    return S[:, :k].astype(np.float32), I[:, :k].astype(np.int64)


def _weighted_block(base: Any, S: np.ndarray, I: np.ndarray, pool: Any, alpha: float, a: int, b: int) -> np.ndarray:
    """Rows ``a:b`` of ``normalise(base[i] + Σ_j max(S[i,j],0)^α pool[I[i,j]])`` (``base`` may be None);
    ``base`` and ``pool`` are arrays or lazy row sources (:mod:`glr.embeddings.store`)."""
    w = np.power(np.maximum(S[a:b], 0.0), np.float32(alpha)).astype(np.float32)
    nbrs = pool.take(I[a:b]) if is_rows(pool) else pool[I[a:b]]
    acc = np.einsum("rk,rkd->rd", w, nbrs, dtype=np.float32)
    if base is not None:
        acc += base.take(np.arange(a, b)) if is_rows(base) else base[a:b]
    return l2_normalize(acc)


def _gather_step(k: int, d: int) -> int:
    return max(1, GATHER_BYTES // max(1, 4 * k * d))


def _weighted_sum(base: Any, S: np.ndarray, I: np.ndarray, pool: Any, alpha: float) -> np.ndarray:
    """Rows ``normalise(base[i] + Σ_j max(S[i,j],0)^α pool[I[i,j]])`` (``base`` may be None), in blocks."""
    n, k = I.shape
    d = pool.shape[1]
    out = np.empty((n, d), np.float32)
    step = _gather_step(k, d)
    for a in range(0, n, step):
        b = min(n, a + step)
        out[a:b] = _weighted_block(base, S, I, pool, alpha, a, b)
    return out


def _weighted_store(base: Any, S: np.ndarray, I: np.ndarray, pool: Any, alpha: float, like: Any,
                    out: str | os.PathLike, what: str) -> Any:
    """:func:`_weighted_sum` written shard by shard into a new store at ``out`` with ``like``'s
    ids, shard size and dtype (``like`` a sharded store, which writes it: its ``write_like``;
    no file is opened here); its unreadable rows stay zero and flagged. Returns the new store."""
    if not callable(getattr(like, "write_like", None)):
        raise ValueError(f"{what}: out= needs the database as a sharded store "
                         "(glr.embeddings.store.ShardedEmbeddings)")
    step = _gather_step(I.shape[1], like.dim)

    def rows(a: int, b: int) -> np.ndarray:
        return np.concatenate([_weighted_block(base, S, I, pool, alpha, c, min(b, c + step))
                               for c in range(a, b, step)])

    return like.write_like(out, rows, what)


def qe_dba_joint(q: np.ndarray, db: np.ndarray, k: int = 10, alpha: float = 3.0, qe: bool = True,
                 dba: bool = False, graph: tuple[np.ndarray, np.ndarray] | None = None,
                 backend: str = "auto", out: str | os.PathLike | None = None) -> tuple[np.ndarray, Any]:
    """αQE and/or DBA in the joint Kaggle form (GLDV2_SPEC §5.1).

    ``A = concat(q, db)``; each row of ``A`` becomes ``normalise(Σ_{j<k} max(s_ij,0)^α A[n_ij])``
    over its ``k`` nearest rows of ``A`` by inner product (itself included). ``qe`` replaces
    the query rows, ``dba`` the database rows; both are computed from the same original ``A``.

    Args:
        q: (Nq, D) queries. db: (Ndb, D) database.
        k: neighbours per row, the row itself counted (the reference's ``n_qe``).
        alpha: similarity exponent (0 = plain average).
        graph: precomputed ``(S, I)`` kNN of ``A`` against ``A`` with ≥ k columns
            (best first); only the first k are used.
        backend: kNN backend when ``graph`` is None (see :func:`glr.search.knn`).
        out: with ``db`` a sharded store (:class:`glr.embeddings.store.ShardedEmbeddings`), ``db'`` is
            written as a new store in this folder, one shard at a time, and returned opened;
            ``db`` is then never loaded whole (the graph is searched shard by shard too).

    Returns:
        ``(q', db')`` float32 (``db'`` a store with ``out``); the side not asked for is returned
        unchanged.

    Raises:
        ValueError: ``qe`` and ``dba`` both False (as the reference), bad shapes or k.
    """
    if not (qe or dba):
        raise ValueError("qe_dba_joint: at least one of qe and dba must be True")
    q = _matrix(q, "q")
    lazy = is_rows(db)
    db = as_rows(db) if lazy else _matrix(db, "db")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"q is {q.shape[1]}-d but db is {db.shape[1]}-d")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    A = ConcatRows([q, db]) if lazy else np.concatenate([q, db])
    k = min(int(k), len(A))
    if graph is None:
        S, I = knn(A, A, k, backend=backend)
    else:
        S, I = _check_graph(*graph, rows=len(A), k=k, n_db=len(A), name="graph")
    nq = len(q)
    new_q = _weighted_sum(None, S[:nq, :k], I[:nq, :k], A, alpha) if qe else q
    if not dba:
        return new_q, db
    if out is not None:
        return new_q, _weighted_store(None, S[nq:, :k], I[nq:, :k], A, alpha, db, out, f"joint qe/dba k={k}")
    return new_q, _weighted_sum(None, S[nq:, :k], I[nq:, :k], A, alpha)


def alpha_qe(q: np.ndarray, db: np.ndarray, n: int = 2, alpha: float = 3.0,
             graph: tuple[np.ndarray, np.ndarray] | None = None, backend: str = "auto") -> np.ndarray:
    """Classic αQE (GLDV2_SPEC §5.2): ``q' = normalise(q + Σ_{j≤n} max(q·x_j,0)^α x_j)``.

    Args:
        q: (Nq, D) queries; db: (Ndb, D) database (after αDBA if used), or a sharded store
            (searched and gathered shard by shard).
        n: database neighbours added (0 returns ``q`` normalised).
        graph: precomputed ``(S, I)`` of ``q`` against ``db`` with ≥ n columns.

    Returns:
        (Nq, D) float32 expanded queries.
    """
    q = _matrix(q, "q")
    db = as_rows(db) if is_rows(db) else _matrix(db, "db")
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    n = min(int(n), len(db))
    if n == 0:
        return l2_normalize(q)
    S, I = knn(q, db, n, backend=backend) if graph is None else _check_graph(*graph, rows=len(q), k=n,
                                                                          n_db=len(db), name="graph")
    return _weighted_sum(q, S[:, :n], I[:, :n], db, alpha)


def alpha_dba(db: Any, n: int = 10, alpha: float = 3.0,
              graph: tuple[np.ndarray, np.ndarray] | None = None, backend: str = "auto",
              out: str | os.PathLike | None = None) -> Any:
    """Classic αDBA (GLDV2_SPEC §5.2): ``x' = normalise(x + Σ_{j≤n} max(x·x_j,0)^α x_j)`` over
    the ``n`` nearest *other* database vectors (the row itself is removed by index, wherever
    ties put it).

    Args:
        db: (Ndb, D) database.
        n: other neighbours added per row.
        graph: precomputed ``(S, I)`` of ``db`` against itself with ≥ n + 1 columns.
        out: with ``db`` a sharded store, write the result as a new store here, one shard
            at a time, and return it opened (``db`` is never loaded whole).

    Returns:
        (Ndb, D) float32, or the new store with ``out``.
    """
    lazy = is_rows(db)
    db = as_rows(db) if lazy else _matrix(db, "db")
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    n = min(int(n), len(db) - 1)
    if n <= 0 and not lazy:
        return l2_normalize(db)
    if n <= 0:
        S, I = np.zeros((len(db), 0), np.float32), np.zeros((len(db), 0), np.int64)
    elif graph is None:
        S, I = knn(db, db, n + 1, backend=backend)
    else:
        S, I = _check_graph(*graph, rows=len(db), k=n + 1, n_db=len(db), name="graph")
    if n > 0:
        S, I = _drop_self(S[:, : n + 1], I[:, : n + 1], n)
    if out is not None:
        return _weighted_store(db, S, I, db, alpha, db, out, f"alpha_dba n={n} alpha={alpha}")
    return _weighted_sum(db, S, I, db, alpha)


def _drop_self(S: np.ndarray, I: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` neighbours of each row other than the row itself; (N, n+1) → (N, n)."""
    rows = np.arange(len(I))[:, None]
    other = I != rows
    # rows whose n+1 neighbours do not include themselves (ties): keep the first n
    keep = other & (np.cumsum(other, axis=1) <= n)
    return S[keep].reshape(len(I), n), I[keep].reshape(len(I), n)


# --------------------------------------------------------------------------- the chain's steps
@register_step("whitening", kind="features", order=10, label="+ PCA whitening",
               options={"dim": Option(None, int, minimum=1, help="output dimension (None: min(N, D))"),
                        "shrinkage": Option(0.0, float, minimum=0.0, help="added to every eigenvalue")})
def _whitening_step(q: np.ndarray, db: np.ndarray, opts: dict[str, Any], env: Env) -> tuple[np.ndarray, np.ndarray]:
    """PCA whitening fitted on the index, applied to both sides."""
    white = fit_whitening(db, dim=opts["dim"], shrinkage=opts["shrinkage"])
    return white(q), white(db)


def _describe_expansion(opts: dict[str, Any]) -> str:
    if opts["form"] == "joint":
        sides = "+".join(s for s in ("qe", "dba") if opts[s])
        return f"joint k={opts['k']} α={opts['alpha']:g} {sides}"
    return f"classic qe_n={opts['qe_n']} dba_n={opts['dba_n']} α={opts['alpha']:g}"


def _prewarm_expansion(cands: list[dict[str, Any]], q: np.ndarray, db: np.ndarray, env: Env) -> None:
    ks = [c["k"] for c in cands if c["form"] == "joint"]
    index = env.index("expansion")
    if ks:
        A = np.concatenate([q, db])
        env.cache.knn(A, A, max(ks), index=index)
    dba = [c["dba_n"] + 1 for c in cands if c["form"] == "classic" and c["dba_n"] > 0]
    if dba:
        env.cache.knn(db, db, max(dba), index=index)


@register_step("expansion", kind="features", order=20, label="+ DBA/αQE", describe=_describe_expansion,
               prewarm=_prewarm_expansion,
               options={"form": Option("joint", str, choices=("joint", "classic")),
                        "k": Option(3, int, minimum=1, help="joint: neighbours of concat(q, db) averaged"),
                        "alpha": Option(3.0, float, minimum=0.0, help="similarity exponent"),
                        "qe": Option(True, bool, help="joint: expand the queries"),
                        "dba": Option(True, bool, help="joint: expand the index"),
                        "qe_n": Option(2, int, minimum=0, help="classic: index neighbours of a query (0: off)"),
                        "dba_n": Option(10, int, minimum=0, help="classic: other index rows of a row (0: off)")})
def _expansion_step(q: np.ndarray, db: np.ndarray, opts: dict[str, Any], env: Env) -> tuple[np.ndarray, np.ndarray]:
    """αQE / DBA in the joint (one graph over concat(q, db)) or the classic form; the graphs are
    searched as the config's ``search.expansion`` says."""
    cache, index = env.cache, env.index("expansion")
    if opts["form"] == "joint":
        A = np.concatenate([q, db])
        graph = cache.knn(A, A, opts["k"], index=index)
        return qe_dba_joint(q, db, k=opts["k"], alpha=opts["alpha"], qe=opts["qe"], dba=opts["dba"], graph=graph)
    if opts["dba_n"] > 0:
        db = alpha_dba(db, n=opts["dba_n"], alpha=opts["alpha"],
                       graph=cache.knn(db, db, opts["dba_n"] + 1, index=index))
    if opts["qe_n"] > 0:
        q = alpha_qe(q, db, n=opts["qe_n"], alpha=opts["alpha"], graph=cache.knn(q, db, opts["qe_n"], index=index))
    return q, db
