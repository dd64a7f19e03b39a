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

  - one chunked pass over ``x @ x.T`` (:func:`joint_graph`) keeps each row's ``k1 + 1`` best
    neighbours and its minimum similarity (for the row maximum of ``d2``);
  - the k-reciprocal sets, the expansion test and the ``np.unique`` of the union are
    vectorised over all rows in chunks, on the neighbour lists alone;
  - ``V`` is a ``scipy.sparse`` CSR matrix whose weights come from gathered dot products;
    the local query expansion is a sparse product;
  - the Jaccard overlap ``Σ_t min(V[i,t], V[j,t])`` of a query with every row is accumulated
    through the CSC columns of ``V`` (an inverted index) with ``np.bincount``;
  - the ``λ``-weighted normalised distance to the index comes from ``q_chunk @ db.T`` blocks,
    and :func:`k_reciprocal_rerank` keeps only each query's top-k.

  Nothing changes in the numbers: the result equals :func:`k_reciprocal_exact` fed with
  ``sqrt(max(2 - 2s, 0))`` up to float32 rounding (sums are accumulated in another order,
  the Jaccard overlap in float64). Two documented differences concern exact ties only: the
  neighbour order among exactly equal similarities is "lower index first" here and
  numpy's unspecified quicksort order in the reference; and the graph must hold
  ``max(k1 + 1, k2)`` neighbours (``k2`` rows are averaged by the query expansion).

Memory of the scalable form: the features, one dense block (≤ ``BLOCK_BYTES``) and the sparse
``V`` (at most ``N · k2 · |E|`` entries, in practice a few times ``N · |E|``), stored as CSR
and CSC; at 1,129 + 76,176 rows × 512 dims the whole process peaks at about 1.5 GB RSS
(``bench/bench_kreciprocal.py``). Time is dominated by the joint graph (``N² · D``
multiply-adds: about 80 s on 2 CPU cores at that size).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import numpy as np
import scipy.sparse as sp

from glr.postprocess.registry import Env, Option, register_step
from glr.search import _as_matrix as _features
from glr.search import _as_positive_int as _positive_int
from glr.search import _chunks, _exact_fp32_matmul, _import_torch, _progress

__all__ = ["joint_graph", "k_reciprocal_dist", "k_reciprocal_exact", "k_reciprocal_rerank"]

log = logging.getLogger(__name__)

#: Budget in bytes for one dense float32 block (``x[a:b] @ x.T`` or ``q[a:b] @ db.T``).
BLOCK_BYTES = 256 << 20
#: Budget in bytes for the temporaries of the vectorised set computations.
SET_BYTES = 64 << 20
#: Budget in bytes for one chunk of gathered vectors (dot products of (i, E_i) pairs).
GATHER_BYTES = 128 << 20
#: Entries gathered from the inverted index per query chunk of the Jaccard step.
JACCARD_ENTRIES = 4_000_000

_F32 = np.float32


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


# --------------------------------------------------------------------------- top-k helpers
def _topk_largest(block: np.ndarray, k: int, torch: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest values of each row of ``block`` and their columns, best first,
    exactly tied values by lower column.

    With ``torch``, ``torch.topk`` (no copy of the block) picks ``k + 1`` candidates; a row is
    recomputed in full only where the k-th and (k+1)-th values are equal (a tie that the
    selection may have cut arbitrarily). Without, ``np.argpartition`` and a count of the values
    ``>=`` the k-th one find those rows.
    """
    n, m = block.shape
    k = min(k, m)
    if k == m:
        idx = np.broadcast_to(np.arange(m), (n, m)).copy()
        ambiguous = np.zeros(n, bool)
    elif torch is not None:
        with torch.inference_mode():
            top = torch.topk(torch.from_numpy(block), k + 1, dim=1)
        tv, ti = top.values.numpy(), top.indices.numpy()
        idx = np.ascontiguousarray(ti[:, :k])
        ambiguous = tv[:, k] == tv[:, k - 1]
    else:
        idx = np.argpartition(block, m - k, axis=1)[:, m - k:]
        kth = np.take_along_axis(block, idx, 1).min(axis=1)
        ambiguous = np.count_nonzero(block >= kth[:, None], axis=1) > k
    for r in np.nonzero(ambiguous)[0]:
        kth = np.take_along_axis(block[r], idx[r], 0).min()
        cols = np.flatnonzero(block[r] >= kth)
        idx[r] = cols[np.lexsort((cols, -block[r, cols]))[:k]]
    vals = np.take_along_axis(block, idx, 1)
    order = np.lexsort((idx, -vals), axis=1)
    return np.take_along_axis(vals, order, 1), np.take_along_axis(idx, order, 1).astype(np.int64, copy=False)


class _Matmul:
    """``a @ b.T`` blocks in float32, with torch on the CPU when it imports (multi-threaded,
    exact fp32), else numpy."""

    def __init__(self, b: np.ndarray) -> None:
        self.torch = _import_torch()
        self.b = b
        self.bt = self.torch.from_numpy(b) if self.torch is not None else None

    def dot(self, a: np.ndarray) -> np.ndarray:
        """(len(a), len(b)) float32 ``a @ b.T``."""
        if self.torch is None:
            return a @ self.b.T
        torch = self.torch
        with torch.inference_mode(), _exact_fp32_matmul(torch):
            return (torch.from_numpy(a) @ self.bt.T).numpy()

    def min_topk(self, a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Row minimum and top-k (values, columns; ties by lower column) of ``a @ b.T``."""
        block = self.dot(a)
        vals, idx = _topk_largest(block, k, self.torch)
        return block.min(axis=1), vals, idx


def _block_rows(n_cols: int, batch: int | None, budget: int = BLOCK_BYTES) -> int:
    if batch is not None:
        return _positive_int(batch, "batch")
    return max(1, budget // (4 * max(1, n_cols)))


# --------------------------------------------------------------------------- joint graph
def joint_graph(
    x: np.ndarray, k: int, batch: int | None = None, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k neighbours and minimum similarity of every row of ``x`` among all rows of ``x``.

    One chunked pass over ``x @ x.T`` (torch on the CPU when available, else numpy); each
    block holds ``batch`` rows of similarities (default: ≤ ``BLOCK_BYTES``).

    Args:
        x: (N, D) features, normally ``concat(q, db)`` of L2-normalised rows.
        k: neighbours per row (>= 1), the row itself included; clipped to N.
        batch: rows of ``x`` per block.
        progress: show a tqdm bar over the blocks.

    Returns:
        ``S`` float32 (N, k') inner products and ``I`` int64 (N, k') row indices, best first
        (exactly tied similarities by lower index), ``k' = min(k, N)``; and ``smin`` float32
        (N,), each row's minimum similarity over all N rows (itself included).

    Raises:
        ValueError: bad shape, NaN/inf values, ``k`` or ``batch`` < 1.
    """
    x = _features(x, "x")
    k = _positive_int(k, "k")
    n = x.shape[0]
    kk = min(k, n)
    S = np.empty((n, kk), np.float32)
    I = np.empty((n, kk), np.int64)
    smin = np.empty(n, np.float32)
    if n == 0:
        return S, I, smin
    rows = min(_block_rows(n, batch), n)
    mm = _Matmul(x)
    log.info("joint_graph: n=%d d=%d k=%d rows/block=%d backend=%s", n, x.shape[1], kk, rows,
             "torch" if mm.torch is not None else "numpy")
    chunks = _chunks(n, rows)
    bar = _progress(len(chunks), progress, "joint graph")
    try:
        for a, b in chunks:
            smin[a:b], S[a:b], I[a:b] = mm.min_topk(x[a:b], kk)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return S, I, smin


# --------------------------------------------------------------------------- scalable form
def _check_graph(graph: Any, n: int, need: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``need`` first neighbour columns and the min similarities of a precomputed graph."""
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
    if I.size and (I.min() < 0 or I.max() >= n):
        raise ValueError(f"graph I holds row indices outside [0, {n})")
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


def _pair_dots(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``x[rows[p]] · x[cols[p]]`` for every pair p, float32, in bounded chunks."""
    out = np.empty(len(rows), np.float32)
    step = max(1, GATHER_BYTES // (8 * max(1, x.shape[1])))
    for a, b in _chunks(len(rows), step):
        out[a:b] = np.einsum("ij,ij->i", x[rows[a:b]], x[cols[a:b]])
    return out


class _Prepared:
    """What the query chunks need: the features, row maxima of ``d2`` and the (expanded) ``V``."""

    def __init__(self, q: np.ndarray, db: np.ndarray, k1: int, k2: int, graph: Any, batch: int | None,
                 progress: bool) -> None:
        t0 = time.perf_counter()
        self.q, self.db = q, db
        self.nq, self.ng = len(q), len(db)
        x = np.concatenate([q, db])
        n = self.n = len(x)
        need = min(max(k1 + 1, k2), n)
        norms = np.linalg.norm(x, axis=1)
        if n and float(np.max(np.abs(norms - 1.0))) > 1e-3:
            log.warning("k-reciprocal: rows are not L2-normalised (norms in [%.4g, %.4g]); distances are "
                        "computed as sqrt(max(2 - 2s, 0))", float(norms.min()), float(norms.max()))
        del norms
        if graph is None:
            _, I, smin = joint_graph(x, need, batch=batch, progress=progress)
        else:
            I, smin = _check_graph(graph, n, need)
        t0 = _phase("joint graph", t0, n=n, k=need, precomputed=graph is not None)

        self.rowmax = _sq_dist(smin)  # max_j d2[i, j] = 2 - 2 min_j s_ij
        if np.any(self.rowmax == 0):
            log.warning("k-reciprocal: a row has all distances 0 (identical rows); the reference gives NaN")
        indptr, cols = _expansion_sets(I, k1)
        t0 = _phase("reciprocal sets", t0, nnz=len(cols), mean_E=f"{len(cols) / max(1, n):.1f}")

        rows = np.repeat(np.arange(n, dtype=cols.dtype), np.diff(indptr))
        with np.errstate(invalid="ignore", divide="ignore"):
            dn = _sq_dist(_pair_dots(x, rows, cols)) / self.rowmax[rows]
        w = np.exp(-dn)
        del dn
        wsum = np.bincount(rows, weights=w, minlength=n).astype(np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            w /= wsum[rows]
        del rows, wsum, x
        V = sp.csr_array((w, cols, indptr), shape=(n, n))
        del w, cols, indptr
        k2 = min(k2, n)
        if k2 != 1:
            # V_qe[i] = mean of the V rows R[i, :k2]: a 0/1 sparse product, then / k2 in float32.
            A = sp.csr_array((np.ones(n * k2, np.float32), I[:, :k2].ravel(),
                              np.arange(0, n * k2 + 1, k2, dtype=np.int64)), shape=(n, n))
            V = (A @ V).tocsr()
            del A
            np.divide(V.data, k2, out=V.data)
        self.V = V
        self.Vc = V.tocsc()
        t0 = _phase("V", t0, nnz=V.nnz, MB=f"{2 * (V.data.nbytes + V.indices.nbytes) / 2**20:.0f}")

    def query_chunks(self, batch: int | None) -> list[tuple[int, int]]:
        """Query ranges whose Jaccard gathers stay within ``JACCARD_ENTRIES`` and whose dense
        blocks within ``BLOCK_BYTES``."""
        V, Vc, nq = self.V, self.Vc, self.nq
        lens = np.diff(Vc.indptr)
        row_of = np.repeat(np.arange(nq), np.diff(V.indptr[: nq + 1]))
        work = np.bincount(row_of, weights=lens[V.indices[: V.indptr[nq]]], minlength=nq).astype(np.int64)
        most = min(_block_rows(self.ng, batch), max(1, BLOCK_BYTES // (8 * max(1, self.ng))))
        out, a = [], 0
        while a < nq:
            b, total = a + 1, int(work[a])
            while b < nq and b - a < most and total + work[b] <= JACCARD_ENTRIES:
                total += int(work[b])
                b += 1
            out.append((a, b))
            a = b
        return out

    def final(self, a: int, b: int, lam: float, mm: _Matmul) -> np.ndarray:
        """(b - a, Ng) float32 final distances of queries ``a:b``."""
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
        m = np.bincount(key, weights=mins, minlength=(b - a) * ng).astype(np.float32).reshape(b - a, ng)
        del key, mins
        jac = 1 - m / (2.0 - m)
        del m
        with np.errstate(invalid="ignore", divide="ignore"):
            dn = _sq_dist(mm.dot(self.q[a:b])) / self.rowmax[a:b, None]
        return _combine(jac, dn, lam)


def _prepare_inputs(q: Any, db: Any, k1: Any, k2: Any, lambda_value: Any
                    ) -> tuple[np.ndarray, np.ndarray, int, int, float]:
    k1, k2, lam = _params(k1, k2, lambda_value)
    q = _features(q, "q")
    db = _features(db, "db")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"q and db must have the same dimension D, got q {q.shape} and db {db.shape}")
    return q, db, k1, k2, lam


def _run(q: np.ndarray, db: np.ndarray, k1: int, k2: int, lam: float, graph: Any, batch: int | None,
         progress: bool) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(a, b, final[a:b])`` over query chunks."""
    log.info("k-reciprocal: nq=%d ng=%d d=%d k1=%d k2=%d lambda=%g", len(q), len(db), q.shape[1], k1, k2, lam)
    prep = _Prepared(q, db, k1, k2, graph, batch, progress)
    t0 = time.perf_counter()
    chunks = prep.query_chunks(batch)
    mm = _Matmul(db)
    bar = _progress(len(q), progress, "k-reciprocal", unit="query")
    try:
        for a, b in chunks:
            yield a, b, prep.final(a, b, lam, mm)
            if bar is not None:
                bar.update(b - a)
    finally:
        if bar is not None:
            bar.close()
    _phase("Jaccard+final", t0, chunks=len(chunks))


def k_reciprocal_dist(
    q: np.ndarray,
    db: np.ndarray,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    graph: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    batch: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Dense k-reciprocal final distances by the scalable path (for small inputs and tests).

    Same computation as :func:`k_reciprocal_rerank`, keeping every column; equals
    :func:`k_reciprocal_exact` fed with ``sqrt(max(2 - 2 q·db, 0))`` etc. up to float32 rounding.

    Args:
        q: (Nq, D) L2-normalised queries.
        db: (Ng, D) L2-normalised index rows.
        k1, k2, lambda_value: as :func:`k_reciprocal_exact`.
        graph: optional ``joint_graph(concat(q, db), k)`` result with ``k >= max(k1 + 1, k2)``
            (``k = N`` suffices when N is smaller); extra columns are ignored.
        batch: rows per dense block (default: one float32 block ≤ ``BLOCK_BYTES``).
        progress: show tqdm bars.

    Returns:
        (Nq, Ng) float32 final distances, smaller = better.

    Raises:
        ValueError: bad shapes or values, bad parameters, a graph of the wrong size.
    """
    q, db, k1, k2, lam = _prepare_inputs(q, db, k1, k2, lambda_value)
    out = np.zeros((len(q), len(db)), np.float32)
    if len(q) == 0 or len(db) == 0:
        return out
    for a, b, final in _run(q, db, k1, k2, lam, graph, batch, progress):
        out[a:b] = final
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
) -> tuple[np.ndarray, np.ndarray]:
    """k-reciprocal re-ranking of every index row for every query, top-k kept.

    The scalable form of :func:`k_reciprocal_exact` on features (see the module docstring):
    no (N, N) matrix is built, N = Nq + Ng.

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
        batch: rows per dense block (default: one float32 block ≤ ``BLOCK_BYTES``).
        progress: show tqdm bars.

    Returns:
        ``S`` float32 (Nq, k') = ``1 - final`` (higher is better) and ``I`` int64 (Nq, k') index
        rows, best first (exact ties by lower row), ``k' = min(topk, Ng)``.

    Raises:
        ValueError: bad shapes or values, bad parameters, a graph of the wrong size.
    """
    q, db, k1, k2, lam = _prepare_inputs(q, db, k1, k2, lambda_value)
    topk = _positive_int(topk, "topk")
    kk = min(topk, len(db))
    S = np.zeros((len(q), kk), np.float32)
    I = np.zeros((len(q), kk), np.int64)
    if len(q) == 0 or kk == 0:
        return S, I
    torch = _import_torch()
    for a, b, final in _run(q, db, k1, k2, lam, graph, batch, progress):
        S[a:b], I[a:b] = _topk_largest(_F32(1.0) - final, kk, torch)
    return S, I


# --------------------------------------------------------------------------- the chain's step
def _graph_k(opts: dict[str, Any]) -> int:
    return max(opts["k1"] + 1, opts["k2"])  # the local expansion averages k2 rows


def _prewarm(cands: list[dict[str, Any]], q: np.ndarray, db: np.ndarray, env: Env) -> None:
    env.cache.joint(np.concatenate([q, db]), max(_graph_k(c) for c in cands))


@register_step("kreciprocal", kind="shortlist", order=10, label="+ k-reciprocal", prewarm=_prewarm,
               describe=lambda o: f"k1={o['k1']} k2={o['k2']} λ={o['lambda']:g}",
               options={"k1": Option(20, int, minimum=1, help="size of the k-reciprocal neighbourhoods"),
                        "k2": Option(6, int, minimum=1, help="rows averaged by the local query expansion"),
                        "lambda": Option(0.3, float, minimum=0.0, maximum=1.0,
                                         help="weight of the original distance")})
def _step(q: np.ndarray, db: np.ndarray, opts: dict[str, Any], n: int, env: Env) -> tuple[np.ndarray, np.ndarray]:
    """The top ``n`` index rows of every query by k-reciprocal re-ranking of the whole index."""
    graph = env.cache.joint(np.concatenate([q, db]), _graph_k(opts))
    return k_reciprocal_rerank(q, db, k1=opts["k1"], k2=opts["k2"], lambda_value=opts["lambda"], topk=n,
                               graph=graph, progress=env.progress)
