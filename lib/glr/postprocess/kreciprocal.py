"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), exact and scalable.

Mirrors ``re_ranking_ranklist.py`` as described in ``GLDV2_SPEC.md`` §5.3: the version that
takes query-gallery / query-query / gallery-gallery **distance** matrices and works in
**float32** (not the feature-input ``re_ranking_feature`` script, whose float16 arrays change
the numbers at the 1e-3 level). Parameters ``k1=20, k2=6, lambda_value=0.3`` are the paper's.

Two implementations of the same algorithm:

* :func:`k_reciprocal_exact`: a clean-room port of the reference on dense ``(N, N)`` distances
  (``N = Nq + Ng``, queries first). Every detail of §5.3 is kept: the input distances are
  squared, each *column* is divided by its maximum and the result transposed, ranks come from
  numpy's default ``argsort``, k-reciprocal sets use ``k + 1`` slots, the candidate sets use
  ``int(np.around(k1 / 2))`` (half to even: ``k1 = 5 → 2``, ``k1 = 1 → 0``), a candidate
  expands the set only when ``|C ∩ N(i, k1)| > 2/3 · |C|`` (strict), the expansion set is the
  ``np.unique`` of the union, ``k2 == 1`` means no local query expansion, the Jaccard distance
  is computed for the query rows against all N columns, and the result is
  ``final = (1 - λ)·jac + λ·D[:Nq]`` restricted to the gallery columns. O(N²) memory: for
  small inputs and as the ground truth of the tests.

* :func:`k_reciprocal_rerank` / :func:`k_reciprocal_dist`: the same numbers from L2-normalised
  features without any ``(N, N)`` matrix, for GLDv2 sizes (1e3 queries + 1e5 index images).
  The distance fed to the reference is taken to be the Euclidean distance of unit vectors, so
  its square is ``d2 = max(2 - 2s, 0)`` (``s`` = inner product) and, the matrix being
  symmetric, the column-max-then-transpose normalisation is a row maximum
  ``2 - 2·min_j s_ij``. What changes is only *how* things are computed:

  - the joint graph (:func:`joint_graph`: each row's ``k1 + 1`` best neighbours and its
    minimum similarity, for the row maximum of ``d2``) is one search of ``concat(q, db)``
    against itself through :func:`glr.search.knn`, the kit's one search path (faiss GPU,
    torch CUDA, faiss / torch CPU, numpy), exact by default or through an approximate
    :class:`~glr.search.IndexSpec` (``index=``);
  - the k-reciprocal sets, the expansion test and the ``np.unique`` of the union are
    vectorised over all rows in chunks, on the neighbour lists alone;
  - ``V`` is a ``scipy.sparse`` CSR matrix whose weights come from gathered dot products;
    the local query expansion is a sparse product;
  - the Jaccard overlap ``Σ_t min(V[i,t], V[j,t])`` of a query with the rows it shares a
    column of ``V`` with (its *support*) is accumulated through the CSC columns of ``V`` (an
    inverted index) with ``np.bincount``;
  - :func:`k_reciprocal_rerank` never forms a dense ``(queries, Ng)`` block: the final
    distance of a column outside the support is ``(1 - λ) + λ·d2(s_ij)/rowmax_i``, decreasing
    in ``s_ij``, so the top-k lies in the support ∪ the query's nearest index rows, which one
    more search (``knn(q, db, k')``, the same path, always exact) gives; the final values of
    that union are computed exactly and the best kept (see :meth:`_Prepared.top` for why this
    is exact).

  Nothing changes in the numbers: the result equals :func:`k_reciprocal_exact` fed with
  ``sqrt(max(2 - 2s, 0))`` up to float32 rounding (sums are accumulated in another order,
  the Jaccard overlap in float64). Two documented differences concern exact ties only: the
  neighbour order among exactly equal similarities is "lower index first" here (for the torch
  and numpy backends; faiss keeps its own order) and numpy's unspecified quicksort order in the
  reference; and the graph must hold ``max(k1 + 1, k2)`` neighbours (``k2`` rows are averaged
  by the query expansion). With an approximate index the joint graph and the minimum
  similarities are those the index finds: an approximation of the above. The final search stays
  exact: it costs ``Nq · Ng · D``, ``(Nq / N)`` of the joint graph's ``N · N · D``, while an
  approximate one would build an index of its own on ``db`` (at 1,129 + 76,176 × 512 an HNSW
  build costs 7× the exact search) and miss candidates at ``k = topk + margin``, where
  approximate recall is lowest (0.91 for HNSW M 24 ef 40, ``bench/bench_kreciprocal.py``).

Memory of the scalable form: the features, the search's blocks (``glr.search.BLOCK_BYTES``)
and the sparse ``V`` (at most ``N · k2 · |E|`` entries, in practice a few times ``N · |E|``),
stored as CSR and CSC; see ``bench/bench_kreciprocal.py`` for the figures at 1,129 + 76,176
rows × 512 dims. Time is dominated by the exact joint graph (``N² · D`` multiply-adds) unless
its search is approximate.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import numpy as np
import scipy.sparse as sp

from glr.postprocess.registry import Env, Option, register_step
from glr.search import IndexSpec, knn
from glr.search import _as_matrix as _features
from glr.search import _as_positive_int as _positive_int
from glr.search import _chunks, _progress

__all__ = ["joint_graph", "k_reciprocal_dist", "k_reciprocal_exact", "k_reciprocal_rerank"]

log = logging.getLogger(__name__)

#: Budget in bytes for the per-pair temporaries of one dense chunk of :func:`k_reciprocal_dist`.
BLOCK_BYTES = 256 << 20
#: Budget in bytes for the temporaries of the vectorised set computations.
SET_BYTES = 64 << 20
#: Budget in bytes for one chunk of gathered vectors (dot products of (i, j) pairs): two reused
#: buffers small enough to stay in cache between the gather, the product and the sum.
GATHER_BYTES = 8 << 20
#: Mean pairs per run of one row above which :func:`_pair_dots` multiplies each run by its row
#: instead of gathering the row once per pair.
RUN_PAIRS = 32
#: Entries gathered from the inverted index per query chunk of the Jaccard step.
JACCARD_ENTRIES = 4_000_000
#: Index rows the final search of :func:`k_reciprocal_rerank` fetches beyond ``topk``
#: (at least this many, or ``topk // 4``): the margin that lets it prove a query's top-k
#: without computing its whole row (see :meth:`_Prepared.top`).
SHORTLIST_MARGIN = 16

_F32 = np.float32
#: Unit roundoff of float32.
_U32 = 2.0**-24


# --------------------------------------------------------------------------- helpers
def _phase(name: str, t0: float, **sizes: Any) -> float:
    """Log the end of a phase (its wall time in ``record.seconds``); return the new clock."""
    t = time.perf_counter()
    extra = "".join(f" {k}={v}" for k, v in sizes.items())
    log.info("k-reciprocal: %s in %.2fs%s", name, t - t0, extra,
             extra={"kr_phase": name, "kr_seconds": t - t0})
    return t


def _distances(d: Any, name: str, shape: tuple[int, int]) -> np.ndarray:
    d = np.asarray(d)
    if d.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {d.shape}")
    if d.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {d.shape}")
    if not (np.issubdtype(d.dtype, np.floating) or np.issubdtype(d.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {d.dtype}")
    if d.size and not np.isfinite(d).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return d


def _params(k1: Any, k2: Any, lambda_value: Any) -> tuple[int, int, float]:
    k1 = _positive_int(k1, "k1")
    k2 = _positive_int(k2, "k2")
    if isinstance(lambda_value, (bool, np.bool_)) or not isinstance(lambda_value, (int, float, np.integer,
                                                                                  np.floating)):
        raise ValueError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}")
    lam = float(lambda_value)
    if not 0.0 <= lam <= 1.0:  # also rejects NaN
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}")
    return k1, k2, lam


def _half_k(k1: int) -> int:
    """The candidates' k of the reference: ``int(np.around(k1 / 2))``, half to even."""
    return int(np.around(k1 / 2.0))


def _combine(jac: np.ndarray, dist: np.ndarray, lam: float) -> np.ndarray:
    """``jac·(1-λ) + dist·λ`` in float32, as the reference (python floats are weak scalars)."""
    return jac * _F32(1.0 - lam) + dist * _F32(lam)


# --------------------------------------------------------------------------- exact form
def k_reciprocal_exact(
    q_g_dist: np.ndarray,
    q_q_dist: np.ndarray,
    g_g_dist: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """k-reciprocal re-ranking on dense distance matrices, as ``re_ranking_ranklist.py``.

    A float32 port of the reference (``GLDV2_SPEC.md`` §5.3), O(N²) memory with
    ``N = Nq + Ng``; intended for small inputs and as ground truth.

    Args:
        q_g_dist: (Nq, Ng) query-gallery distances (plain, not squared: they are squared here).
        q_q_dist: (Nq, Nq) query-query distances.
        g_g_dist: (Ng, Ng) gallery-gallery distances.
        k1: size of the k-reciprocal neighbourhoods (``k1 + 1`` slots, the row itself included).
        k2: rows averaged by the local query expansion; 1 means no expansion.
        lambda_value: weight of the normalised original distance, in [0, 1]
            (0 = pure Jaccard distance).

    Returns:
        (Nq, Ng) float32 final distances, smaller = better.

    Raises:
        ValueError: bad shapes, non-finite distances, ``k1``/``k2`` < 1, ``lambda_value``
            outside [0, 1].
    """
    k1, k2, lam = _params(k1, k2, lambda_value)
    qg = np.asarray(q_g_dist)
    if qg.ndim != 2:
        raise ValueError(f"q_g_dist must be a 2-D (Nq, Ng) array, got shape {qg.shape}")
    nq, ng = qg.shape
    qg = _distances(qg, "q_g_dist", (nq, ng))
    qq = _distances(q_q_dist, "q_q_dist", (nq, nq))
    gg = _distances(g_g_dist, "g_g_dist", (ng, ng))
    if nq == 0 or ng == 0:
        return np.zeros((nq, ng), np.float32)

    D = np.concatenate([np.concatenate([qq, qg], axis=1), np.concatenate([qg.T, gg], axis=1)], axis=0)
    D = np.power(D, 2).astype(np.float32)
    # Column j divided by the max of column j, then transposed: row i <- column i.
    D = np.transpose(D / np.max(D, axis=0))
    R = np.argsort(D).astype(np.int32)  # numpy's default sort, as the reference
    V = _exact_V(D, R, k1, k2)
    final = _combine(_exact_jaccard(V, nq), D[:nq], lam)
    return np.ascontiguousarray(final[:, nq:])


def _exact_V(D: np.ndarray, R: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """The reference's (N, N) float32 ``V`` from the normalised squared distances ``D`` and
    their ranks ``R``: k-reciprocal sets, their expansion, then the local query expansion."""
    n = len(D)

    def reciprocal(i: int, k: int) -> np.ndarray:
        fwd = R[i, : k + 1]
        bwd = R[fwd, : k + 1]
        return fwd[np.nonzero((bwd == i).any(axis=1))[0]]

    kh = _half_k(k1)
    V = np.zeros((n, n), np.float32)
    for i in range(n):
        Ni = reciprocal(i, k1)
        E = Ni
        for c in Ni:
            C = reciprocal(int(c), kh)
            if len(np.intersect1d(C, Ni)) > 2.0 / 3 * len(C):
                E = np.append(E, C)
        E = np.unique(E)
        w = np.exp(-D[i, E])
        V[i, E] = w / np.sum(w)

    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(n):
            V_qe[i, :] = np.mean(V[R[i, :k2], :], axis=0)
        V = V_qe
    return V


def _exact_jaccard(V: np.ndarray, nq: int) -> np.ndarray:
    """(nq, N) float32 Jaccard distances of the first ``nq`` rows of ``V`` to all N rows.

    The reference adds, in float32 and in increasing t over the query's non-zero columns,
    min(V[i,t], V[j,t]) to temp[j] for the rows j with V[j,t] != 0; adding the exact zeros of
    the other rows changes nothing, so a float32 cumulative sum (sequential) over those
    columns gives the same bits.
    """
    n = len(V)
    jac = np.zeros((nq, n), np.float32)
    for i in range(nq):
        nz = np.nonzero(V[i, :])[0]
        if len(nz):
            temp = np.cumsum(np.minimum(V[i, nz][None, :], V[:, nz]), axis=1, dtype=np.float32)[:, -1]
        else:
            temp = np.zeros(n, np.float32)
        jac[i] = 1 - temp / (2.0 - temp)
    return jac


# --------------------------------------------------------------------------- joint graph
def joint_graph(
    x: np.ndarray,
    k: int,
    batch: int | None = None,
    progress: bool = False,
    index: IndexSpec | None = None,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k neighbours and minimum similarity of every row of ``x`` among all rows of ``x``.

    One search of ``x`` against itself through :func:`glr.search.knn` with ``with_min=True``:
    on the GPU when the backend sees one, else on the CPU (exact search with ``with_min``
    resolves ``"auto"`` to torch there: one pass gives the top-k and the minimum).

    Args:
        x: (N, D) features, normally ``concat(q, db)`` of L2-normalised rows.
        k: neighbours per row (>= 1), the row itself included; clipped to N.
        batch: rows of ``x`` per search block (``query_batch`` of :func:`glr.search.knn`).
        progress: show a progress bar.
        index: how to search (None / exact: exact; IVF / HNSW: an approximate index trained
            on ``x``).
        backend: the :func:`glr.search.knn` backend.

    Returns:
        ``S`` float32 (N, k') inner products and ``I`` int64 (N, k') row indices, best first,
        ``k' = min(k, N)``; exactly tied similarities by lower index for the exact torch and
        numpy backends (faiss keeps its own order); an approximate index may leave ``-1``
        where it found fewer than k' rows. ``smin`` float32 (N,): each row's minimum
        similarity over all N rows (itself included; approximate with an approximate index).

    Raises:
        ValueError: bad shape, NaN/inf values, ``k`` or ``batch`` < 1.
    """
    x = _features(x, "x")
    k = _positive_int(k, "k")
    if batch is not None:
        batch = _positive_int(batch, "batch")
    n = x.shape[0]
    kk = min(k, n)
    if n == 0:
        return np.empty((0, kk), np.float32), np.empty((0, kk), np.int64), np.empty(0, np.float32)
    S, I, smin = knn(x, x, kk, backend=backend, query_batch=batch, progress=progress, index=index, with_min=True)
    return S, I, np.asarray(smin, np.float32)


# --------------------------------------------------------------------------- scalable form
def _check_graph(graph: Any, n: int, need: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``need`` first neighbour columns and the min similarities of a (precomputed) graph.

    ``-1`` (a neighbour an approximate index did not find) is taken to be the row itself."""
    if not isinstance(graph, (tuple, list)) or len(graph) != 3:
        raise ValueError("graph must be the (S, I, smin) tuple returned by joint_graph")
    S, I, smin = (np.asarray(g) for g in graph)
    if I.ndim != 2 or S.shape != I.shape:
        raise ValueError(f"graph S and I must be 2-D arrays of one shape, got {S.shape} and {I.shape}")
    if I.shape[0] != n:
        raise ValueError(f"graph has {I.shape[0]} rows but q and db have {n} rows together")
    if I.shape[1] < need:
        raise ValueError(f"graph has {I.shape[1]} neighbour columns; k1 and k2 need {need} "
                         "(max(k1 + 1, k2), at most N)")
    if not np.issubdtype(I.dtype, np.integer):
        raise ValueError(f"graph I must hold integer row indices, got dtype {I.dtype}")
    if smin.shape != (n,):
        raise ValueError(f"graph smin must have shape ({n},), got {smin.shape}")
    I = np.ascontiguousarray(I[:, :need], dtype=np.int64)
    if I.size and (I.min() < -1 or I.max() >= n):
        raise ValueError(f"graph I holds row indices outside [0, {n})")
    missing = I < 0
    if missing.any():
        log.warning("k-reciprocal: %d neighbour(s) of the joint graph are missing (-1: the index found fewer "
                    "than %d rows); each counts as the row itself", int(missing.sum()), need)
        I = np.where(missing, np.arange(n)[:, None], I)
    return I, np.asarray(smin, np.float32)


def _sq_dist(s: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of unit vectors from their inner product, float32."""
    return np.maximum(_F32(2.0) - _F32(2.0) * s, _F32(0.0))

def _reciprocal_mask(R: np.ndarray, slots: int) -> np.ndarray:
    """``M[i, a]``: is ``i`` among the first ``slots`` neighbours of ``R[i, a]`` (a < slots)."""
    n = R.shape[0]
    Rs = np.ascontiguousarray(R[:, :slots])
    M = np.empty((n, slots), bool)
    rows = max(1, SET_BYTES // (9 * slots * slots))
    for a, b in _chunks(n, rows):
        back = Rs[Rs[a:b]]  # (m, slots, slots)
        M[a:b] = (back == np.arange(a, b)[:, None, None]).any(axis=2)
    return M


def _expansion_sets(R: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorted expansion sets ``E_i`` of all rows as CSR ``(indptr, cols)``.

    ``N(i, k)`` = the entries ``j`` of ``R[i, :k+1]`` with ``i`` in ``R[j, :k+1]``; a candidate
    ``c`` in ``N(i, k1)`` adds ``C = N(c, round(k1/2))`` when ``|C ∩ N(i, k1)| > 2/3 · |C|``;
    ``E_i`` is the unique union.
    """
    n = R.shape[0]
    K = min(k1 + 1, n)
    Kh = min(_half_k(k1) + 1, n)
    M = _reciprocal_mask(R, K)
    Mh = _reciprocal_mask(R, Kh)
    Rk = np.ascontiguousarray(R[:, :K])
    Rh = np.ascontiguousarray(R[:, :Kh])
    counts = np.empty(n, np.int64)
    parts: list[np.ndarray] = []
    rows = max(1, SET_BYTES // (3 * K * Kh * K + 24 * K * Kh))
    two_thirds = 2.0 / 3
    for a, b in _chunks(n, rows):
        Ri, Mi = Rk[a:b], M[a:b]  # N(i, k1): Ri where Mi
        C = Rh[Ri]  # (m, K, Kh): the candidates' first Kh neighbours
        Cm = Mh[Ri]  # ... and which of them are reciprocal: C = N(c, kh)
        member = ((C[..., None] == Ri[:, None, None, :]) & Mi[:, None, None, :]).any(axis=3)
        inter = np.count_nonzero(member & Cm, axis=2)
        size = np.count_nonzero(Cm, axis=2)
        grow = Mi & (inter > two_thirds * size)  # strict, 2/3 in float64 as the reference
        cand = np.concatenate([np.where(Mi, Ri, n), np.where(Cm & grow[..., None], C, n).reshape(b - a, -1)],
                              axis=1)
        cand.sort(axis=1)
        keep = cand < n
        keep[:, 1:] &= cand[:, 1:] != cand[:, :-1]
        counts[a:b] = np.count_nonzero(keep, axis=1)
        parts.append(cand[keep].astype(np.int32 if n < 2**31 else np.int64))
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    cols = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return indptr, cols



def _gather(q: np.ndarray, db: np.ndarray, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``idx`` of ``concat(q, db)`` (which is never built), float32 (len(idx), D), into ``out``
    when given (a reused buffer: a fresh one costs its page faults, as much as the gather)."""
    nq = len(q)
    if out is None:
        out = np.empty((len(idx), q.shape[1]), np.float32)
    # np.take of the index rows, then the (few) query rows by position: boolean-mask
    # assignment of whole rows is several times slower than these two gathers
    if len(db):
        np.take(db, np.maximum(idx - nq, 0), axis=0, out=out)
    low = np.flatnonzero(idx < nq)
    if len(low):
        out[low] = q[idx[low]]
    return out


def _pair_dots(q: np.ndarray, db: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``x[rows[p]] · x[cols[p]]`` for every pair p, ``x = concat(q, db)``, float32, in bounded chunks.

    The products, then numpy's (pairwise) sum over D: a pair's value depends on its two
    vectors only, not on the other pairs computed with it, so the sparse and the dense final
    paths give the same bits for the same pair.
    """
    out = np.empty(len(rows), np.float32)
    step = min(len(rows), max(1, GATHER_BYTES // (8 * max(1, q.shape[1]))))
    left = np.empty((step, q.shape[1]), np.float32)
    right = np.empty_like(left)
    for a, b in _chunks(len(rows), step):
        prod = _gather(q, db, cols[a:b], right[:b - a])
        r = rows[a:b]
        cut = np.flatnonzero(r[1:] != r[:-1]) + 1
        if len(cut) * RUN_PAIRS < b - a:
            # long runs of one row (the final step's pairs, by query): each run multiplied by its
            # row vector, which is not gathered once per pair (the same products, so the same bits)
            for s, e in zip(np.concatenate([[0], cut]), np.concatenate([cut, [b - a]])):
                i = int(r[s])
                prod[s:e] *= q[i] if i < len(q) else db[i - len(q)]
        else:
            prod *= _gather(q, db, r, left[:b - a])
        np.sum(prod, axis=1, out=out[a:b])
    return out


def _weights(q: np.ndarray, db: np.ndarray, I: np.ndarray, indptr: np.ndarray, cols: np.ndarray,
             rowmax: np.ndarray, k2: int) -> sp.csr_array:
    """The (N, N) CSR ``V``: softmax(-d2/rowmax) over each expansion set, then the local query
    expansion (the mean of the ``V`` rows of the first ``k2`` neighbours) when ``k2 != 1``."""
    n = len(indptr) - 1
    rows = np.repeat(np.arange(n, dtype=cols.dtype), np.diff(indptr))
    with np.errstate(invalid="ignore", divide="ignore"):
        dn = _sq_dist(_pair_dots(q, db, rows, cols)) / rowmax[rows]
    w = np.exp(-dn)
    del dn
    wsum = np.bincount(rows, weights=w, minlength=n).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        w /= wsum[rows]
    del rows, wsum
    V = sp.csr_array((w, cols, indptr), shape=(n, n))
    del w
    k2 = min(k2, n)
    if k2 != 1:
        # V_qe[i] = mean of the V rows R[i, :k2]: a 0/1 sparse product, then / k2 in float32.
        A = sp.csr_array((np.ones(n * k2, np.float32), I[:, :k2].ravel(),
                          np.arange(0, n * k2 + 1, k2, dtype=np.int64)), shape=(n, n))
        V = (A @ V).tocsr()
        del A
        np.divide(V.data, k2, out=V.data)
    return V


def _best(score: np.ndarray, cols: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest ``score`` of one row and their ``cols``, exact ties by lower column."""
    order = np.lexsort((cols, -score))[:k]
    return score[order], cols[order]


class _Prepared:
    """What the query chunks need: the features, the row maxima of ``d2`` and the (expanded) ``V``."""

    def __init__(self, q: np.ndarray, db: np.ndarray, k1: int, k2: int, graph: Any, batch: int | None,
                 progress: bool, index: IndexSpec | None, backend: str) -> None:
        t0 = time.perf_counter()
        self.q, self.db = q, db
        self.nq, self.ng = len(q), len(db)
        n = self.n = self.nq + self.ng
        need = min(max(k1 + 1, k2), n)
        if graph is not None:  # checked before any long work
            I, smin = _check_graph(graph, n, need)
        self.qnorm = np.linalg.norm(q, axis=1)
        dbnorm = np.linalg.norm(db, axis=1)
        self.dbnorm = float(dbnorm.max()) if self.ng else 0.0
        lo, hi = float(min(self.qnorm.min(), dbnorm.min())), float(max(self.qnorm.max(), self.dbnorm))
        del dbnorm
        if max(abs(lo - 1.0), abs(hi - 1.0)) > 1e-3:
            log.warning("k-reciprocal: rows are not L2-normalised (norms up to %.4g); distances are computed "
                        "as sqrt(max(2 - 2s, 0))", hi)
        if graph is None:
            x = np.concatenate([q, db])  # the one full-size copy, dropped after the search
            I, smin = _check_graph(joint_graph(x, need, batch=batch, progress=progress, index=index,
                                               backend=backend), n, need)
            del x
        t0 = _phase("joint graph", t0, n=n, k=need, precomputed=graph is not None)

        self.rowmax = _sq_dist(smin)  # max_j d2[i, j] = 2 - 2 min_j s_ij
        if np.any(self.rowmax == 0):
            log.warning("k-reciprocal: a row has all distances 0 (identical rows); the reference gives NaN")
        indptr, cols = _expansion_sets(I, k1)
        t0 = _phase("reciprocal sets", t0, nnz=len(cols), mean_E=f"{len(cols) / max(1, n):.1f}")
        self.V = _weights(q, db, I, indptr, cols, self.rowmax, k2)
        del indptr, cols
        self.Vc = self.V.tocsc()
        _phase("V", t0, nnz=self.V.nnz, MB=f"{2 * (self.V.data.nbytes + self.V.indices.nbytes) / 2**20:.0f}")

    def query_chunks(self, batch: int | None, dense: bool) -> list[tuple[int, int]]:
        """Query ranges whose Jaccard gathers stay within ``JACCARD_ENTRIES``, of at most
        ``batch`` queries; ``dense``: also within ``BLOCK_BYTES`` of (queries, Ng) pairs."""
        V, Vc, nq = self.V, self.Vc, self.nq
        lens = np.diff(Vc.indptr)
        row_of = np.repeat(np.arange(nq), np.diff(V.indptr[: nq + 1]))
        work = np.bincount(row_of, weights=lens[V.indices[: V.indptr[nq]]], minlength=nq).astype(np.int64)
        most = _positive_int(batch, "batch") if batch is not None else nq
        if dense:
            most = min(most, max(1, BLOCK_BYTES // (48 * max(1, self.ng))))
        out, a = [], 0
        while a < nq:
            b, total = a + 1, int(work[a])
            while b < nq and b - a < most and total + work[b] <= JACCARD_ENTRIES:
                total += int(work[b])
                b += 1
            out.append((a, b))
            a = b
        return out

    def support(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """The Jaccard overlaps of queries ``a:b`` with the index rows they share a column of V with.

        Returns ``keys`` int64, sorted and unique, ``(query - a) · Ng + index row``, and ``m``
        float32, ``Σ_t min(V[i,t], V[j,t])`` of each (summed in float64 in the order of the
        inverted index, whatever the other queries of the chunk: a pair gets the same bits in
        any chunk). Every other (query, index row) pair has ``m = 0``.
        """
        V, Vc, nq, ng = self.V, self.Vc, self.nq, self.ng
        p0, p1 = V.indptr[a], V.indptr[b]
        sup, vi = V.indices[p0:p1], V.data[p0:p1]
        qloc = np.repeat(np.arange(b - a), np.diff(V.indptr[a:b + 1]))
        starts = Vc.indptr[sup].astype(np.int64)
        lens = Vc.indptr[sup + 1].astype(np.int64) - starts
        total = int(lens.sum())
        pos = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(total)
        j = Vc.indices[pos].astype(np.int64)
        keep = j >= nq  # only the gallery columns are returned
        mins = np.minimum(np.repeat(vi, lens)[keep], Vc.data[pos][keep])
        key = np.repeat(qloc, lens)[keep] * ng + (j[keep] - nq)
        del pos, j, keep
        keys, inv = np.unique(key, return_inverse=True)
        return keys, np.bincount(inv, weights=mins, minlength=len(keys)).astype(np.float32)

    def finals(self, a: int, ql: np.ndarray, cols: np.ndarray, m: np.ndarray, lam: float) -> np.ndarray:
        """float32 final distances of the pairs (query ``a + ql``, index row ``cols``) whose
        Jaccard overlap is ``m``."""
        jac = 1 - m / (2.0 - m)
        rows = a + ql
        # λ = 0: the distance term is dn·0 = +0 whatever s is (or NaN when rowmax = 0, for any s)
        s = _pair_dots(self.q, self.db, rows, cols + self.nq) if lam else np.zeros(len(rows), np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            dn = _sq_dist(s) / self.rowmax[rows]
        return _combine(jac, dn, lam)

    def dense(self, a: int, b: int, lam: float) -> np.ndarray:
        """(b - a, Ng) float32 final distances of queries ``a:b`` against every index row."""
        keys, m = self.support(a, b)
        full = np.zeros((b - a) * self.ng, np.float32)
        full[keys] = m
        ql, cols = np.divmod(np.arange((b - a) * self.ng), self.ng)
        return self.finals(a, ql, cols, full, lam).reshape(b - a, self.ng)

    def bound(self, a: int, b: int, s_last: np.ndarray, lam: float) -> np.ndarray:
        """(b - a,) the largest score ``1 - final`` an index row outside a query's support and
        its shortlist can have, given the shortlist's lowest similarity ``s_last``."""
        # Two float32 dot products of the same vectors (the search's and _pair_dots') differ
        # by at most 2·γ_D·|q||db| (γ_D = D·u/(1 - D·u), recursive summation; blocked and
        # pairwise sums do better): a row the search ranked below s_last has s <= s_last + tol.
        d = self.q.shape[1]
        tol = 4.0 * d * _U32 * self.qnorm[a:b] * self.dbnorm
        s = (s_last.astype(np.float64) + tol).astype(np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            dn = _sq_dist(s) / self.rowmax[a:b]
        return _F32(1.0) - _combine(np.ones(b - a, np.float32), dn, lam)

    def top(self, a: int, b: int, s_short: np.ndarray, i_short: np.ndarray, k: int,
            lam: float) -> tuple[np.ndarray, np.ndarray, int]:
        """The top ``k`` (score ``1 - final``, exact ties by lower row) of queries ``a:b``.

        Candidates: the query's support (``m > 0``) and its shortlist ``i_short`` (its
        nearest index rows by similarity, ``s_short``, from an exact search). Why this is
        exact: outside the support ``m = 0``, so ``jac = 1`` and
        ``final = (1 - λ) + λ·d2(s)/rowmax``, non-decreasing as ``s`` decreases in float32 as
        in the reals (each operation rounds monotonically). A row left out has a similarity at
        most the shortlist's lowest, up to the rounding of two dot products: its score is at
        most :meth:`bound`. Where the k-th candidate's score is strictly above that bound, the
        k candidates ahead of it beat every row left out, so the top-k of the candidates,
        ordered like the full row, is the top-k of the full row. Where it is not (exact ties
        at the shortlist's end, λ = 0, rowmax = 0), or the candidates number fewer than k (a
        given shortlist with missing rows, -1), the query's whole row is computed
        (:meth:`dense`), as :func:`k_reciprocal_dist` does. Returns ``(S, I, dense rows)``.
        """
        ng = self.ng
        m_keys, m = self.support(a, b)
        flat = i_short.ravel()
        found = flat >= 0
        short_keys = np.repeat(np.arange(b - a), i_short.shape[1])[found] * ng + flat[found]
        keys = np.union1d(m_keys, short_keys)
        mu = np.zeros(len(keys), np.float32)
        mu[np.searchsorted(keys, m_keys)] = m
        ql, cols = np.divmod(keys, ng)
        score = _F32(1.0) - self.finals(a, ql, cols, mu, lam)
        counts = np.bincount(ql, minlength=b - a)
        S = np.zeros((b - a, k), np.float32)
        I = np.zeros((b - a, k), np.int64)
        dense = counts < k
        if len(keys):
            order = np.lexsort((cols, -score, ql))  # by query, then best first, ties by lower row
            take = order[np.minimum((np.cumsum(counts) - counts)[:, None] + np.arange(k), len(keys) - 1)]
            S[:], I[:] = score[take], cols[take]
            if i_short.shape[1] < ng:
                dense |= ~(S[:, -1] > self.bound(a, b, s_short.min(axis=1), lam))
        for r in np.flatnonzero(dense):
            S[r], I[r] = _best(_F32(1.0) - self.dense(a + r, a + r + 1, lam)[0], np.arange(ng), k)
        return S, I, int(dense.sum())


def _prepare_inputs(q: Any, db: Any, k1: Any, k2: Any, lambda_value: Any
                    ) -> tuple[np.ndarray, np.ndarray, int, int, float]:
    k1, k2, lam = _params(k1, k2, lambda_value)
    q = _features(q, "q")
    db = _features(db, "db")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"q and db must have the same dimension D, got q {q.shape} and db {db.shape}")
    return q, db, k1, k2, lam


def _with_bar(chunks: list[tuple[int, int]], progress: bool) -> Iterator[tuple[int, int]]:
    """The query chunks, with a progress bar over their queries."""
    bar = _progress(sum(b - a for a, b in chunks), progress, "k-reciprocal", unit="query")
    try:
        for a, b in chunks:
            yield a, b
            if bar is not None:
                bar.update(b - a)
    finally:
        if bar is not None:
            bar.close()


def _shortlist_k(topk: int, ng: int) -> int:
    """Index rows the final search fetches for ``topk`` results (see ``SHORTLIST_MARGIN``)."""
    return min(ng, topk + max(SHORTLIST_MARGIN, topk // 4))


def _check_shortlist(shortlist: Any, nq: int, ng: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(shortlist, (tuple, list)) or len(shortlist) != 2:
        raise ValueError("shortlist must be the (S, I) tuple of knn(q, db, k)")
    S, I = (np.asarray(g) for g in shortlist)
    if I.ndim != 2 or S.shape != I.shape or I.shape[0] != nq or not np.issubdtype(I.dtype, np.integer):
        raise ValueError(f"shortlist S and I must be ({nq}, k) arrays (I integer), got {S.shape} and {I.shape}")
    if I.shape[1] < k:
        raise ValueError(f"shortlist has {I.shape[1]} columns; topk needs {k}")
    if I.size and (I.min() < -1 or I.max() >= ng):
        raise ValueError(f"shortlist I holds index rows outside [0, {ng})")
    return np.asarray(S, np.float32), I.astype(np.int64, copy=False)


def k_reciprocal_dist(
    q: np.ndarray,
    db: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    graph: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    batch: int | None = None,
    progress: bool = False,
    index: IndexSpec | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """Dense k-reciprocal final distances by the scalable path (for small inputs and tests).

    Same computation as :func:`k_reciprocal_rerank`, keeping every column (the same bits for
    every (query, index row) pair); equals :func:`k_reciprocal_exact` fed with
    ``sqrt(max(2 - 2 q·db, 0))`` etc. up to float32 rounding.

    Args:
        q: (Nq, D) L2-normalised queries.
        db: (Ng, D) L2-normalised index rows.
        k1, k2, lambda_value: as :func:`k_reciprocal_exact`.
        graph: optional ``joint_graph(concat(q, db), k)`` result with ``k >= max(k1 + 1, k2)``
            (``k = N`` suffices when N is smaller); extra columns are ignored.
        batch: queries per chunk (and rows per block of the joint graph's search).
        progress: show progress bars.
        index: how the joint graph is searched (see :func:`joint_graph`); exact by default.
        backend: the :func:`glr.search.knn` backend.

    Returns:
        (Nq, Ng) float32 final distances, smaller = better.

    Raises:
        ValueError: bad shapes or values, bad parameters, a graph of the wrong size.
    """
    q, db, k1, k2, lam = _prepare_inputs(q, db, k1, k2, lambda_value)
    out = np.zeros((len(q), len(db)), np.float32)
    if len(q) == 0 or len(db) == 0:
        return out
    log.info("k-reciprocal (dense): nq=%d ng=%d d=%d k1=%d k2=%d lambda=%g", len(q), len(db), q.shape[1], k1,
             k2, lam)
    prep = _Prepared(q, db, k1, k2, graph, batch, progress, index, backend)
    for a, b in _with_bar(prep.query_chunks(batch, dense=True), progress):
        out[a:b] = prep.dense(a, b, lam)
    return out


def k_reciprocal_rerank(
    q: np.ndarray,
    db: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    topk: int = 100,
    graph: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    batch: int | None = None,
    progress: bool = False,
    index: IndexSpec | None = None,
    backend: str = "auto",
    shortlist: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k-reciprocal re-ranking of every index row for every query, top-k kept.

    The scalable form of :func:`k_reciprocal_exact` on features (see the module docstring):
    no (N, N) matrix and no dense (queries, Ng) block is built, N = Nq + Ng. Two searches,
    both through :func:`glr.search.knn`: the joint graph of ``concat(q, db)`` (as ``index``
    says) and, exactly, the queries' nearest ``topk + max(SHORTLIST_MARGIN, topk // 4)`` index
    rows (the final candidates beside each query's Jaccard support). The result is the top-k of
    :func:`k_reciprocal_dist` with the same graph, bit for bit.

    Args:
        q: (Nq, D) L2-normalised queries.
        db: (Ng, D) L2-normalised index rows.
        k1: size of the k-reciprocal neighbourhoods (>= 1).
        k2: rows averaged by the local query expansion (>= 1; 1 = none).
        lambda_value: weight of the normalised original distance, in [0, 1].
        topk: results kept per query (>= 1); clipped to Ng.
        graph: optional precomputed ``joint_graph(concat(q, db), k)`` with
            ``k >= max(k1 + 1, k2)`` (``k = N`` suffices when N is smaller); extra columns are
            ignored, so a sweep over k1/k2/λ computes it once.
        batch: queries per chunk (and rows per block of the joint graph's search).
        progress: show progress bars.
        index: how the joint graph is searched: None / exact, or an approximate
            :class:`~glr.search.IndexSpec` (IVF / HNSW, trained on ``concat(q, db)``); the
            final search is exact either way (see the module docstring).
        backend: the :func:`glr.search.knn` backend.
        shortlist: optional precomputed exact ``knn(q, db, k)`` ``(S, I)`` with
            ``k >= min(topk, Ng)``; a few more columns than ``topk`` spare whole-row
            computations at ties.

    Returns:
        ``S`` float32 (Nq, k') = ``1 - final`` (higher is better) and ``I`` int64 (Nq, k') index
        rows, best first (exact ties by lower row), ``k' = min(topk, Ng)``.

    Raises:
        ValueError: bad shapes or values, bad parameters, a graph or shortlist of the wrong size.
    """
    q, db, k1, k2, lam = _prepare_inputs(q, db, k1, k2, lambda_value)
    topk = _positive_int(topk, "topk")
    nq, ng = len(q), len(db)
    kk = min(topk, ng)
    S = np.zeros((nq, kk), np.float32)
    I = np.zeros((nq, kk), np.int64)
    if nq == 0 or kk == 0:
        return S, I
    if shortlist is not None:
        shortlist = _check_shortlist(shortlist, nq, ng, kk)
    log.info("k-reciprocal: nq=%d ng=%d d=%d k1=%d k2=%d lambda=%g topk=%d search=%s", nq, ng, q.shape[1], k1, k2,
             lam, kk, "exact" if index is None else index.key())
    prep = _Prepared(q, db, k1, k2, graph, batch, progress, index, backend)
    t0 = time.perf_counter()
    if shortlist is None:
        shortlist = knn(q, db, _shortlist_k(kk, ng), backend=backend, progress=progress)
    t0 = _phase("shortlist", t0, k=shortlist[1].shape[1])
    chunks = prep.query_chunks(batch, dense=False)
    dense = 0
    for a, b in _with_bar(chunks, progress):
        S[a:b], I[a:b], nd = prep.top(a, b, shortlist[0][a:b], shortlist[1][a:b], kk, lam)
        dense += nd
    _phase("Jaccard+final", t0, chunks=len(chunks), dense_rows=dense)
    return S, I


# --------------------------------------------------------------------------- the chain's step
def _final_candidates(q: np.ndarray, db: np.ndarray, k: int, env: Env) -> tuple[np.ndarray, np.ndarray]:
    """The exact ``knn(q, db, k)`` of the final step, memoised in ``env.cache.memo`` per (q, db, k)
    like the chain's shortlists: a sweep over k1/k2/λ searches once."""
    key = f"kreciprocal-final-{env.cache.fp(q)}-{env.cache.fp(db)}-k{k}"
    got = env.cache.memo.get(key)
    if got is None:
        backend = getattr(env.cache, "backend", "auto")  # the cache's backend, as for its own searches
        got = env.cache.memo[key] = knn(q, db, k, backend=backend, progress=env.progress)
    return got


def _graph_k(opts: dict[str, Any]) -> int:
    return max(opts["k1"] + 1, opts["k2"])  # the local expansion averages k2 rows


def _prewarm(cands: list[dict[str, Any]], q: np.ndarray, db: np.ndarray, env: Env) -> None:
    env.cache.joint(np.concatenate([q, db]), max(_graph_k(c) for c in cands), index=env.index("kreciprocal"))


@register_step("kreciprocal", kind="shortlist", order=10, label="+ k-reciprocal", prewarm=_prewarm,
               describe=lambda o: f"k1={o['k1']} k2={o['k2']} λ={o['lambda']:g}",
               options={"k1": Option(20, int, minimum=1, help="size of the k-reciprocal neighbourhoods"),
                        "k2": Option(6, int, minimum=1, help="rows averaged by the local query expansion"),
                        "lambda": Option(0.3, float, minimum=0.0, maximum=1.0,
                                         help="weight of the original distance")})
def _step(q: np.ndarray, db: np.ndarray, opts: dict[str, Any], n: int, env: Env) -> tuple[np.ndarray, np.ndarray]:
    """The top ``n`` index rows of every query by k-reciprocal re-ranking of the whole index; the
    joint graph through the cache, searched as the config's ``search.kreciprocal`` says, the
    final candidates exactly."""
    index = env.index("kreciprocal")
    graph = env.cache.joint(np.concatenate([q, db]), _graph_k(opts), index=index)
    shortlist = _final_candidates(q, db, _shortlist_k(min(n, len(db)), len(db)), env)
    return k_reciprocal_rerank(q, db, k1=opts["k1"], k2=opts["k2"], lambda_value=opts["lambda"], topk=n,
                               graph=graph, progress=env.progress, index=index, shortlist=shortlist)
