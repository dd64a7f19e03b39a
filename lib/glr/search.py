"""Exact inner-product k-nearest-neighbour search (cosine similarity on L2-normalised rows).

One entry point, :func:`knn`, with three interchangeable backends:

* ``"faiss"``: ``faiss.IndexFlatIP`` (exact), on the GPU(s) when asked or when faiss sees one;
* ``"torch"``: chunked ``q @ db.T`` + ``topk`` on CUDA when available, else on the CPU;
* ``"numpy"``: the same chunked brute force in numpy, the reference implementation.

Memory stays bounded for GLDv2 sizes (1e5 queries x 1e6 index images x 512..3072 dims):
queries are processed in chunks and, for torch/numpy, the database too; each query chunk keeps a
running top-k that is merged with the top-k of every database chunk, as faiss
``contrib/exhaustive_search.py::knn_ground_truth`` does. Default chunk sizes keep one
chunk's similarity block (and the temporaries of its top-k) under about 256 MB.

Either side may also be a lazy row source (:class:`glr.embeddings.store.ShardedEmbeddings`, a sharded
store on disk, or :class:`glr.arrays.ArrayRows` / :class:`~glr.arrays.ConcatRows`): the database
is then read one shard at a time, each searched by every query block with the backend above,
and the per-shard top-k merged, so only one shard is in memory (rows flagged not ``ok``, the
unreadable images, are never returned).

Results follow the package vocabulary: ``S`` float32 (Nq, k') similarities and ``I`` int64
(Nq, k') database row indices, best first, with ``k' = min(k, Ndb)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator

import numpy as np

from glr.arrays import as_rows, is_rows

log = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "torch", "numpy")
#: Budget in bytes for one chunk's similarity block plus the temporaries of its top-k.
BLOCK_BYTES = 256 << 20
#: Default number of queries per chunk, per backend.
DEFAULT_QUERY_BATCH = {"faiss": 8192, "torch": 4096, "numpy": 1024}
#: Bytes per element of a (query chunk x db chunk) block: the float32 similarities, plus
#: the int64 indices ``np.argpartition`` allocates for numpy.
_BYTES_PER_ELEMENT = {"torch": 4, "numpy": 4 + 8}
#: Largest k faiss GPU indexes accept (``GPU_MAX_SELECTION_K``).
FAISS_GPU_MAX_K = 2048


# --------------------------------------------------------------------------- availability
def _import_faiss() -> Any | None:
    try:
        import faiss  # noqa: PLC0415  (optional and slow to import)
    except ImportError:
        return None
    return faiss


def _import_torch() -> Any | None:
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None
    return torch


def faiss_available() -> bool:
    """Whether ``import faiss`` works."""
    return _import_faiss() is not None


def _faiss_num_gpus() -> int:
    faiss = _import_faiss()
    if faiss is None or not hasattr(faiss, "get_num_gpus"):
        return 0
    return int(faiss.get_num_gpus())


def _torch_cuda() -> bool:
    torch = _import_torch()
    return bool(torch is not None and torch.cuda.is_available())


def gpu_available() -> bool:
    """Whether some backend can search on a GPU (faiss sees a GPU, or torch sees CUDA)."""
    return _faiss_num_gpus() > 0 or _torch_cuda()


def resolve_backend(backend: str = "auto", use_gpu: bool | None = None) -> str:
    """The concrete backend :func:`knn` uses for ``backend`` / ``use_gpu``.

    ``"auto"`` picks faiss when it imports, else torch, else numpy; with one refinement: when
    the GPU is wanted (``use_gpu`` True, or None and torch sees CUDA) and the installed faiss
    has no GPU support (``faiss-cpu``) but torch has CUDA, it picks torch, so that a GPU is not
    left idle while faiss searches on the CPU.

    Raises:
        ValueError: unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown knn backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if faiss_available():
        if use_gpu is False or _faiss_num_gpus() > 0 or not _torch_cuda():
            return "faiss"
        return "torch"
    if _import_torch() is not None:
        return "torch"
    return "numpy"


# --------------------------------------------------------------------------- validation
def _as_matrix(x: Any, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    # A float64 sum of float32 values cannot overflow, so it is finite iff every value is;
    # this avoids a full-size boolean temporary on a 1e6 x 3072 database.
    if x.size and not math.isfinite(float(np.sum(x, dtype=np.float64))):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")
    return x


def _as_positive_int(v: Any, name: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return int(v)


def _validate(q: Any, db: Any, k: Any) -> tuple[np.ndarray, np.ndarray, int]:
    q = _as_matrix(q, "q")
    db = _as_matrix(db, "db")
    k = _as_positive_int(k, "k")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"q and db must have the same dimension D, got q {q.shape} and db {db.shape}")
    if q.shape[1] < 1:
        raise ValueError(f"the dimension D must be >= 1, got q {q.shape} and db {db.shape}")
    return q, db, k


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, max(1, size))]


def _progress(total: int, enabled: bool, desc: str, unit: str = "chunk"):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415
    except ImportError:
        log.warning("progress=True but tqdm is not installed; no progress bar")
        return None
    return tqdm(total=total, desc=desc, unit=unit)


# --------------------------------------------------------------------------- entry point
def knn(
    q: np.ndarray,
    db: np.ndarray,
    k: int,
    backend: str = "auto",
    use_gpu: bool | None = None,
    query_batch: int | None = None,
    db_batch: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product of every query against the database.

    Args:
        q: (Nq, D) queries; cast to C-contiguous float32 (a copy only when needed); or a lazy
            row source (see the module docstring).
        db: (Ndb, D) database, or a lazy row source (a sharded store: streamed shard by shard).
        k: neighbours wanted per query (>= 1); clipped to Ndb.
        backend: ``"auto"``, ``"faiss"``, ``"torch"`` or ``"numpy"`` (see :func:`resolve_backend`).
        use_gpu: True forces the GPU (error if the backend has none), False forces the CPU,
            None uses a GPU when the backend sees one. Ignored by ``"numpy"``.
        query_batch: queries per chunk (default per backend, see ``DEFAULT_QUERY_BATCH``).
        db_batch: database rows per chunk for torch/numpy (default: what keeps one block
            within ``BLOCK_BYTES``); faiss does its own blocking and ignores it.
        progress: show a tqdm bar over query chunks.

    Returns:
        ``S`` float32 (Nq, k') similarities and ``I`` int64 (Nq, k') row indices into ``db``,
        best first, ``k' = min(k, Ndb)``. Order among exactly tied similarities is unspecified.

    Raises:
        ValueError: bad shapes, dimensions, k, batch sizes, NaN/inf values or backend.
        RuntimeError: ``use_gpu=True`` and the backend has no GPU.
    """

    name = resolve_backend(backend, use_gpu)
    if query_batch is not None:
        query_batch = _as_positive_int(query_batch, "query_batch")
    if db_batch is not None:
        db_batch = _as_positive_int(db_batch, "db_batch")
    if is_rows(q) or is_rows(db):
        return _knn_rows(q, db, _as_positive_int(k, "k"), name, use_gpu, query_batch, db_batch, progress)
    q, db, k = _validate(q, db, k)
    nq, ndb = q.shape[0], db.shape[0]
    kk = min(k, ndb)
    if nq == 0 or kk == 0:
        return np.zeros((nq, kk), np.float32), np.zeros((nq, kk), np.int64)
    log.info("knn: backend=%s nq=%d ndb=%d d=%d k=%d", name, nq, ndb, q.shape[1], kk)
    return _knn_arrays(q, db, kk, name, use_gpu, query_batch, db_batch, progress)


def _knn_arrays(q: np.ndarray, db: np.ndarray, kk: int, name: str, use_gpu: bool | None,
                query_batch: int | None, db_batch: int | None, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn` on validated arrays with ``1 <= kk <= len(db)`` and a resolved backend."""
    nq, ndb = q.shape[0], db.shape[0]
    qb = query_batch or min(nq, DEFAULT_QUERY_BATCH[name])
    if name == "faiss":
        if db_batch is not None:
            log.debug("knn: db_batch is ignored by the faiss backend")
        return _knn_faiss(q, db, kk, use_gpu, qb, progress)
    dbb = db_batch or max(1, BLOCK_BYTES // (_BYTES_PER_ELEMENT[name] * qb))
    dbb = min(dbb, ndb)
    if name == "torch":
        return _knn_torch(q, db, kk, use_gpu, qb, dbb, progress)
    return _knn_numpy(q, db, kk, qb, dbb, progress)


def _knn_rows(q: Any, db: Any, k: int, name: str, use_gpu: bool | None, query_batch: int | None,
              db_batch: int | None, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn` over lazy row sources: database blocks outside, query blocks inside, running top-k."""

    q, db = as_rows(q), as_rows(db)
    if len(q) and len(db) and q.shape[1] != db.shape[1]:
        raise ValueError(f"q and db must have the same dimension D, got q {q.shape} and db {db.shape}")
    nq = len(q)
    kk = min(k, int(np.count_nonzero(db.ok)))
    S = np.full((nq, kk), -np.inf, np.float32)
    I = np.full((nq, kk), -1, np.int64)
    if nq == 0 or kk == 0:
        return S, I
    log.info("knn: backend=%s nq=%d ndb=%d d=%d k=%d, streamed over database blocks", name, nq, len(db),
             db.shape[1], kk)
    bar = _progress(len(db), progress, f"knn[{name}, streamed]", unit="row")
    try:
        for c, block in db.blocks():
            rows = np.flatnonzero(db.ok[c:c + len(block)])
            if len(rows):
                sub = _as_matrix(block if len(rows) == len(block) else block[rows], "db")
                for a, qblock in q.blocks():
                    qblock = _as_matrix(qblock, "q")
                    s, i = _knn_arrays(qblock, sub, min(kk, len(sub)), name, use_gpu, query_batch, db_batch,
                                       False)
                    b = a + len(qblock)
                    cand_s = np.concatenate([S[a:b], s], axis=1)
                    cand_i = np.concatenate([I[a:b], rows[i] + c], axis=1)
                    # stable: among equal similarities the earlier (lower) database row stays first
                    order = np.argsort(-cand_s, axis=1, kind="stable")[:, :kk]
                    S[a:b] = np.take_along_axis(cand_s, order, 1)
                    I[a:b] = np.take_along_axis(cand_i, order, 1)
            if bar is not None:
                bar.update(len(block))
    finally:
        if bar is not None:
            bar.close()
    return S, I


# --------------------------------------------------------------------------- faiss
def _faiss_index(faiss: Any, d: int, use_gpu: bool | None, k: int) -> tuple[Any, bool, Any]:
    """An empty exact inner-product index, on the GPU(s) or the CPU, and what must outlive it."""
    ngpu = _faiss_num_gpus()
    on_gpu = bool(ngpu) if use_gpu is None else use_gpu
    if on_gpu and ngpu == 0:
        raise RuntimeError("use_gpu=True but faiss sees no GPU (is faiss-cpu installed?)")
    if on_gpu and k > FAISS_GPU_MAX_K:
        log.warning("knn: k=%d exceeds the faiss GPU limit %d; searching on the CPU", k, FAISS_GPU_MAX_K)
        on_gpu = False
    index = faiss.IndexFlatIP(d)
    if not on_gpu:
        return index, False, None
    if ngpu == 1:
        res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(res, 0, index), True, res
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True  # split a large database over the GPUs instead of copying it to each
    return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=ngpu), True, None


def _knn_faiss(
    q: np.ndarray, db: np.ndarray, k: int, use_gpu: bool | None, qb: int, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    faiss = _import_faiss()
    if faiss is None:
        raise ValueError("backend 'faiss' requested but faiss is not installed")
    # The index is moved to the GPU while empty, so the database is copied once, to the GPU.
    index, on_gpu, _resources = _faiss_index(faiss, q.shape[1], use_gpu, k)
    log.debug("knn: faiss index on %s", "gpu" if on_gpu else "cpu")
    index.add(db)
    S = np.empty((q.shape[0], k), np.float32)
    I = np.empty((q.shape[0], k), np.int64)
    chunks = _chunks(q.shape[0], qb)
    bar = _progress(len(chunks), progress, "knn[faiss]")
    try:
        for a, b in chunks:
            S[a:b], I[a:b] = index.search(q[a:b], k)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        index.reset()
    return S, I


# --------------------------------------------------------------------------- torch
@contextlib.contextmanager
def _exact_fp32_matmul(torch: Any) -> Iterator[None]:
    """Disable TF32 / bf16 matmul shortcuts a training script may have enabled."""
    old = torch.get_float32_matmul_precision()
    if old != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if old != "highest":
            torch.set_float32_matmul_precision(old)


def _torch_device(torch: Any, use_gpu: bool | None) -> Any:
    cuda = torch.cuda.is_available()
    if use_gpu and not cuda:
        raise RuntimeError("use_gpu=True but torch sees no CUDA device")
    return torch.device("cuda" if (cuda if use_gpu is None else use_gpu) else "cpu")


def _knn_torch(
    q: np.ndarray, db: np.ndarray, k: int, use_gpu: bool | None, qb: int, dbb: int, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    torch = _import_torch()
    if torch is None:
        raise ValueError("backend 'torch' requested but torch is not installed")
    device = _torch_device(torch, use_gpu)
    db_t = torch.from_numpy(db)  # shares memory on the CPU
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if db.nbytes < free // 2:
            db_t = db_t.to(device)  # whole database resident: each chunk is then a view
        log.debug("knn: torch on %s, database %s", device, "resident" if db_t.is_cuda else "streamed")
    nq, ndb = q.shape[0], db.shape[0]
    S = np.empty((nq, k), np.float32)
    I = np.empty((nq, k), np.int64)
    chunks = _chunks(nq, qb)
    db_chunks = _chunks(ndb, dbb)
    bar = _progress(len(chunks), progress, "knn[torch]")
    try:
        with torch.inference_mode(), _exact_fp32_matmul(torch):
            for a, b in chunks:
                qc = torch.from_numpy(q[a:b]).to(device)
                best_s = torch.empty((b - a, 0), dtype=torch.float32, device=device)
                best_i = torch.empty((b - a, 0), dtype=torch.int64, device=device)
                for c, d in db_chunks:
                    block = qc @ db_t[c:d].to(device, non_blocking=True).T
                    s, i = torch.topk(block, min(k, d - c), dim=1)
                    del block
                    cand_s = torch.cat([best_s, s], dim=1)
                    cand_i = torch.cat([best_i, i + c], dim=1)
                    best_s, pos = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
                    best_i = torch.gather(cand_i, 1, pos)
                S[a:b] = best_s.cpu().numpy()
                I[a:b] = best_i.cpu().numpy()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return S, I


# --------------------------------------------------------------------------- numpy
def _topk_rows(s: np.ndarray, k: int) -> np.ndarray:
    """Column positions of the k largest values of each row of ``s``, in no order."""
    if k >= s.shape[1]:
        return np.broadcast_to(np.arange(s.shape[1]), s.shape).copy()
    return np.argpartition(s, s.shape[1] - k, axis=1)[:, s.shape[1] - k :]


def _knn_numpy(
    q: np.ndarray, db: np.ndarray, k: int, qb: int, dbb: int, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    nq, ndb = q.shape[0], db.shape[0]
    S = np.empty((nq, k), np.float32)
    I = np.empty((nq, k), np.int64)
    chunks = _chunks(nq, qb)
    db_chunks = _chunks(ndb, dbb)
    bar = _progress(len(chunks), progress, "knn[numpy]")
    try:
        for a, b in chunks:
            qc = q[a:b]
            best_s = np.empty((b - a, 0), np.float32)
            best_i = np.empty((b - a, 0), np.int64)
            for c, d in db_chunks:
                block = qc @ db[c:d].T
                pos = _topk_rows(block, k)
                cand_s = np.concatenate([best_s, np.take_along_axis(block, pos, 1)], axis=1)
                cand_i = np.concatenate([best_i, pos + c], axis=1)
                del block
                keep = _topk_rows(cand_s, k)
                best_s = np.take_along_axis(cand_s, keep, 1)
                best_i = np.take_along_axis(cand_i, keep, 1)
            order = np.argsort(-best_s, axis=1, kind="stable")
            S[a:b] = np.take_along_axis(best_s, order, 1)
            I[a:b] = np.take_along_axis(best_i, order, 1)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return S, I
