"""k-nearest-neighbour search by inner product (cosine similarity on L2-normalised rows).

One entry point, :func:`knn`, over a database that :func:`build_index` prepares once
(:class:`SearchIndex`, for repeated searches). **Exact** search (the default everywhere) has three
interchangeable backends:

* ``"faiss"``: ``faiss.IndexFlatIP``, on the GPU(s) when asked or when faiss sees one;
* ``"torch"``: chunked ``q @ db.T`` + ``topk`` on CUDA when available, else on the CPU;
* ``"numpy"``: the same chunked brute force in numpy, the reference implementation.

torch and numpy return exactly tied similarities by lower database row, deterministically
(select ``k + 1``; only rows where the k-th and (k+1)-th values tie are resolved column by column);
faiss keeps its own, unspecified, order among ties.

**Approximate** search is opt-in per call through an :class:`IndexSpec` (``index=``): an inverted
file (``ivf``: ``nlist`` lists, ``nprobe`` of them visited) or a graph (``hnsw``: ``M`` links,
``efSearch = ef``), both built with ``faiss.index_factory(d, "IVF{nlist},Flat" | "HNSW{M},Flat",
METRIC_INNER_PRODUCT)`` and trained on the database they search. IVF's k-means is seeded
(``ClusteringParameters.seed``), runs ``TRAIN_NITER`` iterations on a seeded sample of at most
``TRAIN_POINTS_PER_CENTROID · nlist`` rows (cheap against the search: the graphs here are searched
once or twice); for the inner-product metric faiss runs it as spherical k-means (``cp.spherical``). IVF runs as faiss's own index on the GPU when faiss has GPUs and
``use_gpu`` allows. On the CPU the trained quantizer's lists are scanned as matrix products instead
(:class:`_ListScan`: each list against all the queries that probe it, lists spread over threads):
the same probes, lists and neighbours as faiss's ``IndexIVFFlat``, several times faster, since
faiss's per-query scan is bound by memory bandwidth. HNSW always runs on the CPU (faiss has no GPU
HNSW: :func:`check_index_spec` rejects ``use_gpu=True``); its graph costs about as much to build as
an exact search of the same size, so it pays only for a database searched many times. The
similarities returned are exact inner products of the rows found (``Flat`` storage); a query for
which the index finds fewer than ``k`` rows (few small lists probed) is searched again exactly, so
every returned index is a valid row. :func:`recall_at_k` measures an approximate result against
the exact one. :func:`parse_index_spec` / :func:`check_index_spec` turn a config value into a spec
and reject, before any search, settings that cannot work.

``with_min=True`` also returns each query's minimum similarity over the whole database (the
farthest row; k-reciprocal's row maximum of the distance). torch and numpy compute it in the same
pass as the top-k; faiss by a second search of ``-q`` with ``k = 1``; an approximate index by a
search of ``-q`` with ``k = 1`` that is approximate and, for IVF, narrow (the ``MIN_NPROBE`` lists of
the centroids farthest from the query: a small fraction of the top-k search; k-reciprocal, its user,
only needs the row minimum as a scale, see :data:`MIN_NPROBE`). For an exact search with ``backend="auto"``, ``with_min`` makes the
CPU use the torch backend (one pass instead of two, and ties by lower row) unless faiss has a GPU.

Memory stays bounded for GLDv2 sizes (1e5 queries x 1e6 index images x 512..3072 dims):
queries are processed in chunks and, for torch/numpy, the database too; each query chunk keeps a
running top-k that is merged with the top-k of every database chunk, as faiss
``contrib/exhaustive_search.py::knn_ground_truth`` does. Default chunk sizes keep one
chunk's similarity block (and the temporaries of its top-k) under about 256 MB.

Either side of an exact search may also be a lazy row source
(:class:`glr.embeddings.store.ShardedEmbeddings`, a sharded store on disk, or
:class:`glr.arrays.ArrayRows` / :class:`~glr.arrays.ConcatRows`): the database is then read one
shard at a time, each searched by every query block with the backend above, and the per-shard
top-k merged, so only one shard is in memory (rows flagged not ``ok``, the unreadable images, are
never returned). An approximate index needs its database in memory (queries may be lazy).

Results follow the package vocabulary: ``S`` float32 (Nq, k') similarities and ``I`` int64
(Nq, k') database row indices, best first, with ``k' = min(k, Ndb)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from glr.arrays import as_rows, is_rows
from glr.utils import InputError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "torch", "numpy")
#: Budget in bytes for one chunk's similarity block plus the temporaries of its top-k.
BLOCK_BYTES = 256 << 20
#: Default number of queries per chunk, per backend.
DEFAULT_QUERY_BATCH = {"faiss": 8192, "torch": 4096, "numpy": 1024}
#: Bytes per element of a (query chunk x db chunk) block: the float32 similarities, plus
#: the int64 indices ``np.argpartition`` allocates for numpy.
_BYTES_PER_ELEMENT = {"torch": 4, "numpy": 4 + 8}
#: Largest k (and IVF nprobe) faiss GPU indexes accept (``GPU_MAX_SELECTION_K``).
FAISS_GPU_MAX_K = 2048


# --------------------------------------------------------------------------- index specs
INDEX_KINDS = ("exact", "ivf", "hnsw")
#: The options each index kind takes, in the order its key names them.
INDEX_OPTIONS: dict[str, tuple[str, ...]] = {"exact": (), "ivf": ("nlist", "nprobe"), "hnsw": ("M", "ef")}
#: IVF k-means trains on at most this many sampled rows per list (faiss's own cap is 256). The
#: graphs here are searched once or twice, so training must cost little against the search
#: (``rows · nlist · D · niter`` multiply-adds: at nlist 1024, D 512 the faiss defaults, 64 rows
#: per list and 25 iterations, cost as much as the search itself); 32 rows per list still place
#: the centroids well enough for recall@k >= 0.99 at nprobe = nlist / 32 (bench/bench_search.py).
TRAIN_POINTS_PER_CENTROID = 32
#: k-means iterations of the IVF training (faiss's default is 25): spherical k-means on
#: clustered rows barely moves after ~10, and the lists only need to be coherent, not optimal.
TRAIN_NITER = 10
#: faiss warns below this many training rows per list; the automatic ``nlist`` stays above it
#: (the training itself samples ``TRAIN_POINTS_PER_CENTROID`` per list and silences the warning).
MIN_POINTS_PER_CENTROID = 39
#: IVF lists the search for each query's *farthest* row (``with_min``) probes: those of the
#: centroids farthest from the query. k-reciprocal only needs the row minimum to normalise a
#: row's distances, and a near-farthest row changes that scale by a few 1e-3 at most, so this
#: is a small fraction of the top-k search instead of a second one (all lists when the top-k
#: search probes all of them: then the minimum is exact).
MIN_NPROBE = 2
#: HNSW defaults: links per node and the search beam ``efSearch``.
HNSW_M = 32
HNSW_EF = 128
#: HNSW construction beam ``efConstruction`` (faiss's default is 40).
HNSW_EF_CONSTRUCTION = 64


@dataclass(frozen=True)
class IndexSpec:
    """How one database is searched: exactly (the default) or through an approximate faiss index.

    Attributes:
        kind: ``"exact"``, ``"ivf"`` or ``"hnsw"``.
        nlist: IVF lists (default: about ``sqrt(Ndb)``, see :meth:`resolved`).
        nprobe: IVF lists visited per query (default: ``nlist / 8``, at least 1).
        M: HNSW links per node (default ``HNSW_M``).
        ef: HNSW ``efSearch`` (default ``HNSW_EF``; never below ``k``).
    """

    kind: str = "exact"
    nlist: int | None = None
    nprobe: int | None = None
    M: int | None = None
    ef: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}; expected one of {', '.join(INDEX_KINDS)}")
        for name in ("nlist", "nprobe", "M", "ef"):
            value = getattr(self, name)
            if value is not None and name not in INDEX_OPTIONS[self.kind]:
                raise ValueError(f"index kind {self.kind!r} takes no {name!r}")
            if value is not None:
                _as_positive_int(value, name)

    @property
    def exact(self) -> bool:
        return self.kind == "exact"

    def resolved(self, n_db: int) -> IndexSpec:
        """This spec with every default filled in for a database of ``n_db`` rows."""
        if self.kind == "ivf":
            nlist = self.nlist or max(1, min(round(math.sqrt(max(n_db, 1))), n_db // MIN_POINTS_PER_CENTROID))
            return IndexSpec("ivf", nlist=nlist, nprobe=self.nprobe or max(1, nlist // 8))
        if self.kind == "hnsw":
            return IndexSpec("hnsw", M=self.M or HNSW_M, ef=self.ef or HNSW_EF)
        return self

    def key(self) -> str:
        """Stable short text for cache keys: ``"exact"``, ``"ivf1024-np32"``, ``"hnsw32-ef128"``
        (``auto`` for an IVF option left to :meth:`resolved`)."""
        if self.kind == "ivf":
            return f"ivf{self.nlist or 'auto'}-np{self.nprobe or 'auto'}"
        if self.kind == "hnsw":
            return f"hnsw{self.M or HNSW_M}-ef{self.ef or HNSW_EF}"
        return "exact"

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``"IVF approximate (nlist 1024, nprobe 32)"``."""
        if self.kind == "exact":
            return "exact"
        opts = ", ".join(f"{o} {getattr(self, o) or 'auto'}" for o in INDEX_OPTIONS[self.kind])
        return f"{self.kind.upper()} approximate ({opts})"


EXACT = IndexSpec()


def _spec_error(message: str, source: str) -> InputError:
    return InputError(message, path=source)


def parse_index_spec(value: Any, setting: str = "search", source: str = "post-processing config") -> IndexSpec:
    """An :class:`IndexSpec` from a config value.

    Args:
        value: None or ``"exact"`` (exact search); ``"ivf"`` / ``"hnsw"`` (default options); a
            mapping with one kind as its only key, e.g. ``{"exact": None}``,
            ``{"ivf": {"nlist": 1024, "nprobe": 32}}``, ``{"hnsw": {"M": 32, "ef": 128}}``;
            or an :class:`IndexSpec` (returned as it is).
        setting: the setting's dotted name in messages, e.g. ``"search.kreciprocal"``.
        source: the file (or other source) the value comes from, named in messages.

    Raises:
        InputError: unknown kind or option, an option that is not an integer >= 1, or
            ``nprobe > nlist``; the message names ``f"{setting}.{kind}.{option}"`` and ``source``.
    """
    if isinstance(value, IndexSpec):
        return value
    if value is None:
        return EXACT
    if isinstance(value, str):
        kind, opts = value, None
    elif isinstance(value, Mapping):
        if len(value) != 1:
            raise _spec_error(f"{setting} must name one index kind ({', '.join(INDEX_KINDS)}), "
                              f"got {sorted(map(str, value)) or 'an empty mapping'}", source)
        kind, opts = next(iter(value.items()))
    else:
        raise _spec_error(f"{setting} must be one of {', '.join(INDEX_KINDS)} or a mapping such as "
                          f"{{ivf: {{nlist: 1024, nprobe: 32}}}}, got {value!r}", source)
    if kind not in INDEX_KINDS:
        raise _spec_error(f"{setting}: unknown index kind {kind!r}; expected one of {', '.join(INDEX_KINDS)}",
                          source)
    opts = {} if opts is None else opts
    if not isinstance(opts, Mapping):
        raise _spec_error(f"{setting}.{kind} must be a mapping of options "
                          f"({', '.join(INDEX_OPTIONS[kind]) or 'none'}), got {opts!r}", source)
    for name, v in opts.items():
        where = f"{setting}.{kind}.{name}"
        if name not in INDEX_OPTIONS[kind]:
            allowed = ", ".join(INDEX_OPTIONS[kind]) or "no options"
            raise _spec_error(f"{where}: unknown option; {kind} takes {allowed}", source)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
            raise _spec_error(f"{where} must be an integer >= 1, got {v!r}", source)
    spec = IndexSpec(kind, **{n: int(v) for n, v in opts.items()})
    if spec.nlist is not None and spec.nprobe is not None and spec.nprobe > spec.nlist:
        raise _spec_error(f"{setting}.ivf.nprobe = {spec.nprobe} is larger than {setting}.ivf.nlist = "
                          f"{spec.nlist} (a query cannot visit more lists than there are)", source)
    return spec


def check_index_spec(spec: IndexSpec, n_db: int, setting: str = "search", source: str = "post-processing config",
                     backend: str = "auto", use_gpu: bool | None = None) -> None:
    """Reject, before any search starts, an approximate index that cannot work on this database.

    Checks: faiss installed; IVF ``nlist`` at most the ``n_db`` database rows and ``nprobe`` at
    most ``nlist`` (after :meth:`IndexSpec.resolved`); HNSW not asked on the GPU (``use_gpu=True``:
    faiss has no GPU HNSW; with ``use_gpu=None`` HNSW simply runs on the CPU). Exact search always
    passes. ``backend`` selects the exact search only (an approximate index is always faiss), so
    it is checked for being a known name and nothing else.

    Raises:
        InputError: naming ``f"{setting}.{kind}..."`` and ``source``.
    """
    resolve_backend(backend, use_gpu)
    if spec.exact:
        return
    if not faiss_available():
        raise _spec_error(f"{setting}.{spec.kind} (approximate search) needs faiss, which is not installed "
                          f"(pip install faiss-cpu, or faiss-gpu); or set {setting}: exact", source)
    if spec.kind == "hnsw":
        if use_gpu:
            raise _spec_error(f"{setting}.hnsw cannot run on the GPU (use_gpu is true): faiss has no GPU HNSW "
                              f"index; use {setting}.ivf, or search on the CPU", source)
        return
    if n_db < 1:
        return  # nothing to train on, nothing to find: the search returns no neighbours
    if spec.nlist is not None and spec.nlist > n_db:
        raise _spec_error(f"{setting}.ivf.nlist = {spec.nlist} is larger than the {n_db} rows of the database "
                          f"it searches", source)
    r = spec.resolved(n_db)
    if r.nprobe > r.nlist:
        auto = "" if spec.nlist is not None else " (the automatic nlist for this database)"
        raise _spec_error(f"{setting}.ivf.nprobe = {r.nprobe} is larger than nlist = {r.nlist}{auto}", source)


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


# --------------------------------------------------------------------------- prepared database
Result = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


class SearchIndex:
    """A database prepared once (validated; for an approximate spec trained and filled) for
    repeated searches. Build it with :func:`build_index`; :meth:`close` frees a faiss index early.

    Attributes:
        spec: the :class:`IndexSpec`, resolved for this database.
        ntotal: database rows (searchable rows for a lazy source: those flagged ``ok``).
        on_gpu: whether the approximate faiss index lives on a GPU.
        train_rows, build_s: rows the IVF k-means trained on and seconds spent building.
    """

    def __init__(self, db: Any, spec: IndexSpec, backend: str, use_gpu: bool | None,
                 query_batch: int | None = None, db_batch: int | None = None) -> None:
        self.db, self.spec, self.backend, self.use_gpu = db, spec, backend, use_gpu
        self.query_batch, self.db_batch = query_batch, db_batch
        self.ntotal = int(np.count_nonzero(db.ok)) if is_rows(db) else len(db)
        self.on_gpu, self.train_rows, self.build_s = False, 0, 0.0
        self._ann: Any = None  # the approximate faiss index
        self._flat: dict[bool, Any] = {}  # exact faiss indexes by on-GPU, built on first use
        self._keep: list[Any] = []  # GPU resources that must outlive their index

    @property
    def dim(self) -> int:
        return int(self.db.shape[1])

    def __enter__(self) -> SearchIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Free the faiss indexes (the database array itself belongs to the caller)."""
        for index in [self._ann, *self._flat.values()]:
            if index is not None:
                index.reset()
        self._ann, self._flat, self._keep = None, {}, []

    def search(self, q: Any, k: int, with_min: bool = False, progress: bool = False
               ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k of every query by inner product.

        Args:
            q: (Nq, D) queries (cast to C-contiguous float32), or a lazy row source.
            k: neighbours per query (>= 1), clipped to the database rows.
            with_min: also return ``smin`` (Nq,) float32, each query's minimum similarity over
                the database (approximate through an approximate index; see the module docstring).
            progress: show a tqdm bar.

        Returns:
            ``(S, I)`` or ``(S, I, smin)``: ``S`` float32 (Nq, k'), ``I`` int64 (Nq, k'), best first,
            ``k' = min(k, ntotal)``.
        """
        k = _as_positive_int(k, "k")
        if is_rows(self.db) or is_rows(q):
            S, I, smin = self._search_rows(q, k, with_min, progress)
        else:
            q = _as_matrix(q, "q")
            if q.shape[1] != self.dim:
                raise ValueError(f"q and db must have the same dimension D, got q {q.shape} and db {self.db.shape}")
            S, I, smin = self._search_arrays(q, min(k, self.ntotal), with_min, progress)
        return (S, I, smin) if with_min else (S, I)

    # ------------------------------------------------------------------ internals
    def _empty(self, nq: int, kk: int, with_min: bool) -> Result:
        smin = np.full(nq, np.inf, np.float32) if with_min else None
        return np.zeros((nq, kk), np.float32), np.zeros((nq, kk), np.int64), smin

    def _search_arrays(self, q: np.ndarray, kk: int, with_min: bool, progress: bool) -> Result:
        nq = q.shape[0]
        if nq == 0 or kk == 0:
            return self._empty(nq, kk, with_min)
        if not self.spec.exact:
            return self._search_ann(q, kk, with_min, progress)
        name = self._exact_backend(with_min)
        log.info("knn: backend=%s nq=%d ndb=%d d=%d k=%d", name, nq, self.ntotal, q.shape[1], kk)
        return _knn_exact(q, self.db, kk, name, self.use_gpu, self.query_batch, self.db_batch, progress,
                          with_min, self._faiss_flat)

    def _exact_backend(self, with_min: bool) -> str:
        name = resolve_backend(self.backend, self.use_gpu)
        if (with_min and self.backend == "auto" and name == "faiss" and _import_torch() is not None
                and (self.use_gpu is False or _faiss_num_gpus() == 0)):
            return "torch"  # one pass gives the top-k and the minimum; faiss on the CPU needs two
        return name

    def _faiss_flat(self, k: int) -> Any:
        """The exact faiss index for a search of ``k`` neighbours (built once per device)."""
        faiss = _import_faiss()
        if faiss is None:
            raise ValueError("backend 'faiss' requested but faiss is not installed")
        on_gpu = _faiss_on_gpu(self.use_gpu, k)
        if on_gpu not in self._flat:
            # The index is moved to the GPU while empty, so the database is copied once, to the GPU.
            index, resources = _faiss_flat_index(faiss, self.dim, on_gpu)
            index.add(self.db)
            self._flat[on_gpu] = index
            self._keep.append(resources)
            log.debug("knn: faiss flat index on %s", "gpu" if on_gpu else "cpu")
        return self._flat[on_gpu]

    def _search_ann(self, q: np.ndarray, kk: int, with_min: bool, progress: bool) -> Result:
        index = self._ann
        if self.on_gpu and kk > FAISS_GPU_MAX_K:
            log.warning("knn: k=%d exceeds the faiss GPU limit %d; searching a CPU copy", kk, FAISS_GPU_MAX_K)
            index = _import_faiss().index_gpu_to_cpu(index)
        if self.spec.kind == "hnsw":
            index.hnsw.efSearch = max(self.spec.ef, kk)
        qb = self.query_batch or min(q.shape[0], DEFAULT_QUERY_BATCH["faiss"])
        if isinstance(index, _ListScan):
            # its (chunk, nprobe, k) candidates within BLOCK_BYTES; by default the largest such
            # chunk: each list's product then meets more queries, and there are fewer of them
            most = max(1, BLOCK_BYTES // (12 * index.nprobe * kk))
            qb = min(self.query_batch or most, most)
        S, I = _faiss_search(index, q, kk, qb, progress, f"knn[{self.spec.key()}]")
        missing = np.flatnonzero((I < 0).any(axis=1))
        if len(missing):
            # a query whose probed lists hold fewer than k rows: searched again exactly
            log.info("knn: %d of %d queries found < %d rows through %s; searched exactly", len(missing),
                     len(q), kk, self.spec.key())
            S[missing], I[missing], _ = self._exact_cpu(q[missing], kk, False)
        smin = self._farthest(index, q, qb) if with_min else None
        log.info("knn: %s nq=%d ndb=%d d=%d k=%d", self.spec.describe(), len(q), self.ntotal, q.shape[1], kk)
        return S, I, smin

    def _farthest(self, index: Any, q: np.ndarray, qb: int) -> np.ndarray:
        """(Nq,) float32 approximate minimum similarity of each query over the database: a k = 1
        search of ``-q``, for IVF through ``MIN_NPROBE`` lists (HNSW: the spec's ``ef``; a graph
        walk towards the farthest row is poor with a narrow beam); a query whose probed lists
        are empty is searched exactly."""
        spec = self.spec
        if spec.kind == "hnsw":
            index.hnsw.efSearch = spec.ef
            neg, far = _faiss_search(index, -q, 1, qb, False, "")
        else:
            narrow = spec.nlist if spec.nprobe >= spec.nlist else min(spec.nprobe, MIN_NPROBE)
            with _ivf_nprobe(index, narrow, spec.nprobe):
                neg, far = _faiss_search(index, -q, 1, qb, False, "")
        smin = np.ascontiguousarray(-neg[:, 0])
        lost = np.flatnonzero(far[:, 0] < 0)
        if len(lost):
            smin[lost] = self._exact_cpu(q[lost], 1, True)[2]
        return smin

    def _exact_cpu(self, q: np.ndarray, kk: int, with_min: bool) -> Result:
        """Exact search of a few queries on the CPU (torch, else numpy): the approximate index's fallback."""
        name = "numpy" if _import_torch() is None else "torch"
        return _knn_exact(q, self.db, kk, name, False, None, self.db_batch, False, with_min, None)

    def _search_rows(self, q: Any, k: int, with_min: bool, progress: bool) -> Result:
        if is_rows(self.db):
            return _knn_rows(q, self.db, k, resolve_backend(self.backend, self.use_gpu), self.use_gpu,
                             self.query_batch, self.db_batch, progress, with_min)
        q = as_rows(q)  # lazy queries against an in-memory database: one query block at a time
        if len(q) and q.shape[1] != self.dim:
            raise ValueError(f"q and db must have the same dimension D, got q {q.shape} and db {self.db.shape}")
        kk = min(k, self.ntotal)
        parts = [self._search_arrays(_as_matrix(block, "q"), kk, with_min, progress) for _, block in q.blocks()]
        if not parts:
            return self._empty(0, kk, with_min)
        smin = np.concatenate([p[2] for p in parts]) if with_min else None
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), smin


def build_index(db: Any, index: IndexSpec | None = None, backend: str = "auto", use_gpu: bool | None = None,
                seed: int = 0, query_batch: int | None = None, db_batch: int | None = None) -> SearchIndex:
    """Prepare ``db`` for repeated searches.

    Args:
        db: (Ndb, D) database (cast to C-contiguous float32), or for exact search a lazy row source.
        index: the :class:`IndexSpec` (None: exact).
        backend: exact search backend (see :func:`resolve_backend`); an approximate index is faiss.
        use_gpu: True forces the GPU (error if the backend has none; an IVF index without faiss
            GPU support falls back to the CPU with a warning), False the CPU, None a GPU if seen.
        seed: seeds the IVF training sample and k-means.
        query_batch: queries per chunk (default per backend, see ``DEFAULT_QUERY_BATCH``).
        db_batch: database rows per chunk for torch/numpy (default: what keeps one block
            within ``BLOCK_BYTES``); faiss does its own blocking and ignores it.

    Raises:
        ValueError: bad array, batch size or backend; an approximate index over a lazy source;
            an approximate spec that cannot work (:func:`check_index_spec`, as an InputError).
    """
    spec = EXACT if index is None else index
    resolve_backend(backend, use_gpu)
    if query_batch is not None:
        query_batch = _as_positive_int(query_batch, "query_batch")
    if db_batch is not None:
        db_batch = _as_positive_int(db_batch, "db_batch")
    if is_rows(db):
        if not spec.exact:
            raise ValueError(f"an approximate index ({spec.key()}) needs the database in memory, not a lazy "
                             f"row source; load it (to_array()) or search it exactly")
        return SearchIndex(as_rows(db), spec, backend, use_gpu, query_batch, db_batch)
    db = _as_matrix(db, "db")
    if db.shape[1] < 1:
        raise ValueError(f"the dimension D must be >= 1, got db {db.shape}")
    out = SearchIndex(db, spec, backend, use_gpu, query_batch, db_batch)
    if not spec.exact and len(db):
        check_index_spec(spec, len(db), "index", "build_index", backend, use_gpu)
        out.spec = spec.resolved(len(db))
        _train_ann(out, seed)
    return out


def _train_ann(out: SearchIndex, seed: int) -> None:
    """Build ``out``'s approximate index over ``out.db`` (trained on a seeded sample for IVF)."""
    spec, db = out.spec, out.db
    t0 = time.perf_counter()
    out._ann = _build_hnsw(out) if spec.kind == "hnsw" else _build_ivf(out, seed)
    out.build_s = time.perf_counter() - t0
    log.info("knn: built %s over %d rows (d=%d) on %s: trained on %d rows, %.2f s", spec.describe(), len(db),
             db.shape[1], "gpu" if out.on_gpu else "cpu", out.train_rows, out.build_s)


def _build_hnsw(out: SearchIndex) -> Any:
    faiss = _import_faiss()
    spec, db = out.spec, out.db
    if out.use_gpu is None and _faiss_num_gpus() > 0:
        log.info("knn: %s runs on the CPU (faiss has no GPU HNSW)", spec.describe())
    index = faiss.index_factory(db.shape[1], f"HNSW{spec.M},Flat", faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = max(HNSW_EF_CONSTRUCTION, spec.M)
    index.hnsw.efSearch = spec.ef
    index.add(db)
    return index


def _build_ivf(out: SearchIndex, seed: int) -> Any:
    """A trained IVF: faiss's own index on the GPU; on the CPU its trained coarse quantizer drives
    :class:`_ListScan` (the same lists and probes, scanned as matrix products)."""
    faiss = _import_faiss()
    spec, db = out.spec, out.db
    index = faiss.index_factory(db.shape[1], f"IVF{spec.nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    on_gpu = _faiss_num_gpus() > 0 and out.use_gpu is not False and spec.nprobe <= FAISS_GPU_MAX_K
    if out.use_gpu and not on_gpu:
        log.warning("knn: use_gpu=True but faiss has no GPU (or nprobe > %d); %s runs on the CPU",
                    FAISS_GPU_MAX_K, spec.describe())
    if on_gpu:
        res = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(res, 0, index)  # still empty: trained and filled on the GPU
        out._keep.append(res)
    if hasattr(index, "cp"):
        index.cp.seed = int(seed)
        index.cp.spherical = True  # inner product: centroids on the unit sphere (faiss's IP default)
        index.cp.niter = TRAIN_NITER
        index.cp.min_points_per_centroid = min(TRAIN_POINTS_PER_CENTROID, MIN_POINTS_PER_CENTROID)
    n_train = min(len(db), TRAIN_POINTS_PER_CENTROID * spec.nlist)
    rows = np.sort(np.random.default_rng(seed).choice(len(db), n_train, replace=False))
    index.train(db if n_train == len(db) else db[rows])
    out.on_gpu, out.train_rows = on_gpu, n_train
    if not on_gpu:
        return _ListScan(index, db, spec.nprobe)
    index.add(db)
    faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", spec.nprobe)
    return index


class _ListScan:
    """IVF search on the CPU as matrix products.

    faiss's CPU ``IndexIVFFlat`` scans each (query, probed list) pair on its own, which is bound
    by memory bandwidth (about 2 GMAC/s per core at D 512, against 15-20 for a matrix product).
    Here the database is sorted by list once; a query chunk's probes are grouped by list and each
    list meets all the queries that probe it in one ``(queries, list rows)`` product, whose top-k
    are merged per query. Same probes (the trained quantizer's ``nprobe`` nearest centroids),
    same lists and exact similarities as faiss's ``IndexIVFFlat``, so the same neighbours (up to
    the order of exactly tied similarities, which an approximate search does not specify). The
    chunks are as large as ``BLOCK_BYTES`` of candidates allows, so each list's product meets
    many queries; per list the selection is an unsorted ``topk``, the merge one ``topk`` per
    chunk (most of the cost at small lists is these selections, not the products).

    Interface of a faiss index: ``search(q, k) -> (S, I)`` (``-inf`` / ``-1`` where fewer than
    ``k`` rows were scanned), ``reset()``, ``ntotal``.
    """

    def __init__(self, ivf: Any, db: np.ndarray, nprobe: int) -> None:
        self.ivf = ivf  # owns the quantizer: it must outlive it
        self.quantizer, self.nprobe = ivf.quantizer, nprobe
        quantizer = self.quantizer
        _, assign = quantizer.search(db, 1)
        self.ids = np.argsort(assign[:, 0], kind="stable")  # by list, rows in order within a list
        self.x = db[self.ids]
        self.bounds = np.searchsorted(assign[self.ids, 0], np.arange(quantizer.ntotal + 1))
        self.ntotal = len(db)
        self._torch = _import_torch()
        self._buffers: tuple[np.ndarray, np.ndarray] | None = None

    def reset(self) -> None:
        self.x = np.zeros((0, self.x.shape[1]), np.float32)
        self.ntotal, self._buffers = 0, None

    def _candidates(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Two flat buffers of ``size`` similarities (-inf) and rows (-1), reused from chunk to
        chunk: a fresh pair costs its page faults, about as much as the scans of a chunk."""
        if self._buffers is None or len(self._buffers[0]) < size:
            self._buffers = (np.empty(size, np.float32), np.empty(size, np.int64))
        cand_s, cand_i = self._buffers[0][:size], self._buffers[1][:size]
        cand_s.fill(-np.inf)
        cand_i.fill(-1)
        return cand_s, cand_i

    def _topk(self, qx: np.ndarray, lo: int, hi: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        if torch is None:
            return _numpy_topk(qx @ self.x[lo:hi].T, k)
        with torch.inference_mode(), _exact_fp32_matmul(torch):
            # unsorted, ties as topk leaves them: the merge in search() orders the candidates, and
            # an approximate search promises no tie order (this topk is most of a list's cost)
            s, c = torch.topk(torch.from_numpy(qx) @ torch.from_numpy(self.x[lo:hi]).T, k, dim=1, sorted=False)
        return s.numpy(), c.numpy()

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        nq, npr = len(q), self.nprobe
        _, probes = self.quantizer.search(q, npr)
        flat = probes.ravel()
        order = np.argsort(flat, kind="stable")
        starts = np.searchsorted(flat[order], np.arange(len(self.bounds)))
        cand_s, cand_i = self._candidates(nq * npr * k)
        cand_s, cand_i = cand_s.reshape(nq, npr, k), cand_i.reshape(nq, npr, k)

        def scan(lst: int) -> None:  # each (query, probe) pair belongs to one list: no two scans collide
            lo, hi = self.bounds[lst], self.bounds[lst + 1]
            pairs = order[starts[lst]:starts[lst + 1]]
            qs, slot = pairs // npr, pairs % npr
            kk = min(k, hi - lo)
            s, c = self._topk(q[qs], lo, hi, kk)
            cand_s[qs, slot, :kk] = s
            cand_i[qs, slot, :kk] = self.ids[lo + c]

        lists = np.flatnonzero((np.diff(starts) > 0) & (np.diff(self.bounds) > 0))
        _run_parallel(self._torch, scan, lists[np.argsort(-np.diff(starts)[lists], kind="stable")])
        cand_s, cand_i = cand_s.reshape(nq, -1), cand_i.reshape(nq, -1)
        if self._torch is None:
            top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
        with self._torch.inference_mode():  # a multi-threaded selection instead of a full sort
            vals, top = self._torch.topk(self._torch.from_numpy(cand_s), k, dim=1)
        return vals.numpy(), np.take_along_axis(cand_i, top.numpy(), 1)


@contextlib.contextmanager
def _ivf_nprobe(index: Any, nprobe: int, old: int) -> Iterator[None]:
    """``index`` (a :class:`_ListScan`, or faiss's IVF on the GPU or its CPU copy) probing
    ``nprobe`` lists inside the block, ``old`` (its setting) again after it."""
    if isinstance(index, _ListScan):
        index.nprobe = nprobe
        try:
            yield
        finally:
            index.nprobe = old
        return
    params = _import_faiss().GpuParameterSpace()  # also sets a CPU index's nprobe
    params.set_index_parameter(index, "nprobe", nprobe)
    try:
        yield
    finally:
        params.set_index_parameter(index, "nprobe", old)


def _run_parallel(torch: Any | None, fn: Any, items: np.ndarray) -> None:
    """``fn(item)`` for every item, largest first, on torch's intra-op thread count of Python threads,
    each product single-threaded: many small products parallelise far better across threads than
    within each (on a busy machine a multi-threaded small product mostly waits for its threads)."""
    workers = 1 if torch is None else torch.get_num_threads()
    if workers <= 1 or len(items) < 2:
        for item in items:
            fn(int(item))
        return
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fn, (int(i) for i in items)))
    finally:
        torch.set_num_threads(workers)


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
    index: IndexSpec | None = None,
    with_min: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k by inner product of every query against the database: exact by default.

    ``build_index(db, index, ...).search(q, k, with_min, progress)`` for one search.

    Args:
        q: (Nq, D) queries; cast to C-contiguous float32 (a copy only when needed); or a lazy
            row source (see the module docstring).
        db: (Ndb, D) database, or a lazy row source (a sharded store: streamed shard by shard).
        k: neighbours wanted per query (>= 1); clipped to Ndb.
        backend: ``"auto"``, ``"faiss"``, ``"torch"`` or ``"numpy"`` (see :func:`resolve_backend`;
            with ``with_min`` on the CPU, ``"auto"`` takes torch).
        use_gpu: True forces the GPU (error if the backend has none), False forces the CPU,
            None uses a GPU when the backend sees one. Ignored by ``"numpy"``.
        query_batch: queries per chunk (default per backend, see ``DEFAULT_QUERY_BATCH``).
        db_batch: database rows per chunk for torch/numpy (default: what keeps one block
            within ``BLOCK_BYTES``); faiss does its own blocking and ignores it.
        progress: show a tqdm bar over query chunks.
        index: an approximate :class:`IndexSpec` (IVF / HNSW, trained on ``db``, seed 0); None or
            :data:`EXACT` for exact search.
        with_min: also return each query's minimum similarity over the database.

    Returns:
        ``S`` float32 (Nq, k') similarities and ``I`` int64 (Nq, k') row indices into ``db``,
        best first, ``k' = min(k, Ndb)``; and with ``with_min`` ``smin`` float32 (Nq,). Exactly
        tied similarities come by lower row from torch and numpy, in faiss's order from faiss.

    Raises:
        ValueError: bad shapes, dimensions, k, batch sizes, NaN/inf values or backend; an
            approximate index that cannot work on ``db`` (an InputError).
        RuntimeError: ``use_gpu=True`` and the backend has no GPU.
    """
    k = _as_positive_int(k, "k")
    with build_index(db, index, backend, use_gpu, query_batch=query_batch, db_batch=db_batch) as prepared:
        return prepared.search(q, k, with_min=with_min, progress=progress)


def recall_at_k(I_approx: np.ndarray, I_exact: np.ndarray) -> float:
    """Mean over rows of ``|top-k approx ∩ top-k exact| / k``, ``k`` = the columns of ``I_exact``.

    Args:
        I_approx: (N, k_a) int indices, ``k_a >= k`` (only the first k columns count; -1 never matches).
        I_exact: (N, k) int indices of the exact search (distinct within a row).

    Returns:
        The recall in [0, 1]; 1.0 when there is nothing to find (N or k zero).
    """
    a, e = np.asarray(I_approx), np.asarray(I_exact)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0] or a.shape[1] < e.shape[1]:
        raise ValueError(f"I_approx {a.shape} and I_exact {e.shape} must be (N, k_a) and (N, k), k_a >= k")
    n, k = e.shape
    if n == 0 or k == 0:
        return 1.0
    both = np.sort(np.concatenate([a[:, :k], e], axis=1), axis=1)
    hits = (both[:, 1:] == both[:, :-1]) & (both[:, 1:] >= 0)
    return float(hits.sum() / (n * k))


def _knn_exact(q: np.ndarray, db: np.ndarray, kk: int, name: str, use_gpu: bool | None, query_batch: int | None,
               db_batch: int | None, progress: bool, with_min: bool, faiss_flat: Any) -> Result:
    """Exact search of validated arrays, ``1 <= kk <= len(db)``, resolved backend ``name``;
    ``faiss_flat(k)`` gives the faiss index (None: a fresh one)."""
    nq, ndb = q.shape[0], db.shape[0]
    qb = query_batch or min(nq, DEFAULT_QUERY_BATCH[name])
    if name == "faiss":
        if db_batch is not None:
            log.debug("knn: db_batch is ignored by the faiss backend")
        if faiss_flat is None:
            with build_index(db, EXACT, "faiss", use_gpu) as prepared:
                return _knn_faiss(q, prepared._faiss_flat(kk), kk, qb, progress, with_min)
        return _knn_faiss(q, faiss_flat(kk), kk, qb, progress, with_min)
    dbb = db_batch or max(1, BLOCK_BYTES // (_BYTES_PER_ELEMENT[name] * qb))
    dbb = min(dbb, ndb)
    if name == "torch":
        return _knn_torch(q, db, kk, use_gpu, qb, dbb, progress, with_min)
    return _knn_numpy(q, db, kk, qb, dbb, progress, with_min)


def _knn_rows(q: Any, db: Any, k: int, name: str, use_gpu: bool | None, query_batch: int | None,
              db_batch: int | None, progress: bool, with_min: bool = False) -> Result:
    """Exact search over lazy row sources: database blocks outside, query blocks inside, running top-k."""

    q, db = as_rows(q), as_rows(db)
    if len(q) and len(db) and q.shape[1] != db.shape[1]:
        raise ValueError(f"q and db must have the same dimension D, got q {q.shape} and db {db.shape}")
    nq = len(q)
    kk = min(k, int(np.count_nonzero(db.ok)))
    S = np.full((nq, kk), -np.inf, np.float32)
    I = np.full((nq, kk), -1, np.int64)
    smin = np.full(nq, np.inf, np.float32) if with_min else None
    if nq == 0 or kk == 0:
        return S, I, smin
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
                    s, i, m = _knn_exact(qblock, sub, min(kk, len(sub)), name, use_gpu, query_batch, db_batch,
                                         False, with_min, None)
                    b = a + len(qblock)
                    if with_min:
                        np.minimum(smin[a:b], m, out=smin[a:b])
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
    return S, I, smin


# --------------------------------------------------------------------------- faiss
def _faiss_on_gpu(use_gpu: bool | None, k: int) -> bool:
    ngpu = _faiss_num_gpus()
    on_gpu = bool(ngpu) if use_gpu is None else use_gpu
    if on_gpu and ngpu == 0:
        raise RuntimeError("use_gpu=True but faiss sees no GPU (is faiss-cpu installed?)")
    if on_gpu and k > FAISS_GPU_MAX_K:
        log.warning("knn: k=%d exceeds the faiss GPU limit %d; searching on the CPU", k, FAISS_GPU_MAX_K)
        on_gpu = False
    return on_gpu


def _faiss_flat_index(faiss: Any, d: int, on_gpu: bool) -> tuple[Any, Any]:
    """An empty exact inner-product index, on the GPU(s) or the CPU, and what must outlive it."""
    index = faiss.IndexFlatIP(d)
    if not on_gpu:
        return index, None
    ngpu = _faiss_num_gpus()
    if ngpu == 1:
        res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(res, 0, index), res
    co = faiss.GpuMultipleClonerOptions()
    co.shard = True  # split a large database over the GPUs instead of copying it to each
    return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=ngpu), None


def _faiss_search(index: Any, q: np.ndarray, k: int, qb: int, progress: bool, desc: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` over query chunks of ``qb`` rows."""
    S = np.empty((q.shape[0], k), np.float32)
    I = np.empty((q.shape[0], k), np.int64)
    chunks = _chunks(q.shape[0], qb)
    bar = _progress(len(chunks), progress, desc)
    try:
        for a, b in chunks:
            S[a:b], I[a:b] = index.search(q[a:b], k)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return S, I


def _knn_faiss(q: np.ndarray, index: Any, k: int, qb: int, progress: bool, with_min: bool) -> Result:
    """Exact search through a filled faiss flat index; the minimum by a search of ``-q`` with k=1."""
    S, I = _faiss_search(index, q, k, qb, progress, "knn[faiss]")
    smin = None
    if with_min:
        neg, _ = _faiss_search(index, -q, 1, qb, False, "")
        smin = np.ascontiguousarray(-neg[:, 0])
    return S, I, smin


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


def _torch_topk(torch: Any, block: Any, k: int) -> tuple[Any, Any]:
    """The ``k`` largest values of each row of a tensor and their columns, best first, exactly
    tied values by lower column: ``topk`` picks ``k + 1``; rows whose k-th and (k+1)-th values are
    equal (a tie the selection may have cut anywhere) are redone with :func:`_tied_cut`."""
    m = block.shape[1]
    if k >= m:
        return torch.sort(block, dim=1, descending=True, stable=True)
    vals, cols = torch.topk(block, k + 1, dim=1)
    cut = torch.nonzero(vals[:, k] == vals[:, k - 1]).flatten()
    vals, cols = vals[:, :k], cols[:, :k]
    if len(cut):
        cols[cut] = _tied_cut(torch, block[cut], vals[cut, k - 1], k)
        vals[cut] = torch.gather(block[cut], 1, cols[cut])
    cols, pos = torch.sort(cols, dim=1)  # by column, then stably by value: ties by lower column
    vals, pos = torch.sort(torch.gather(vals, 1, pos), dim=1, descending=True, stable=True)
    return vals, torch.gather(cols, 1, pos)


def _tied_cut(xp: Any, rows: Any, kth: Any, k: int) -> Any:
    """Columns (n, k) of the ``k`` largest values of each of ``rows`` (n, m), in column order,
    where ``kth`` (n,) is the k-th largest value: every column above it and the lowest-numbered
    columns equal to it. ``xp`` is numpy or torch."""
    above = rows > kth[:, None]
    tied = rows == kth[:, None]
    need = k - above.sum(1)
    take = above | (tied & (xp.cumsum(tied, 1) <= need[:, None]))
    if xp is np:
        return np.nonzero(take)[1].reshape(len(rows), k)
    return xp.nonzero(take)[:, 1].reshape(len(rows), k)


def _merge_sorted(xp: Any, best_s: Any, best_i: Any, s: Any, i: Any, k: int) -> tuple[Any, Any]:
    """Top-k of two sorted candidate lists whose first holds only lower rows: a stable sort keeps
    ties by lower row."""
    cand_s = xp.concatenate([best_s, s], 1) if xp is np else xp.cat([best_s, s], 1)
    cand_i = xp.concatenate([best_i, i], 1) if xp is np else xp.cat([best_i, i], 1)
    if xp is np:
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    vals, order = xp.sort(cand_s, dim=1, descending=True, stable=True)
    return vals[:, :k], xp.gather(cand_i, 1, order[:, :k])


def _knn_torch(q: np.ndarray, db: np.ndarray, k: int, use_gpu: bool | None, qb: int, dbb: int, progress: bool,
               with_min: bool = False) -> Result:
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
    smin = np.empty(nq, np.float32) if with_min else None
    chunks = _chunks(nq, qb)
    db_chunks = _chunks(ndb, dbb)
    bar = _progress(len(chunks), progress, "knn[torch]")
    try:
        with torch.inference_mode(), _exact_fp32_matmul(torch):
            for a, b in chunks:
                qc = torch.from_numpy(q[a:b]).to(device)
                best_s = torch.empty((b - a, 0), dtype=torch.float32, device=device)
                best_i = torch.empty((b - a, 0), dtype=torch.int64, device=device)
                low = torch.full((b - a,), math.inf, dtype=torch.float32, device=device)
                for c, d in db_chunks:
                    block = qc @ db_t[c:d].to(device, non_blocking=True).T
                    if with_min:
                        low = torch.minimum(low, block.amin(dim=1))
                    s, i = _torch_topk(torch, block, min(k, d - c))
                    del block
                    best_s, best_i = _merge_sorted(torch, best_s, best_i, s, i + c, k)
                S[a:b] = best_s.cpu().numpy()
                I[a:b] = best_i.cpu().numpy()
                if with_min:
                    smin[a:b] = low.cpu().numpy()
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return S, I, smin


# --------------------------------------------------------------------------- numpy
def _numpy_topk(block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_torch_topk` in numpy: ``argpartition`` places the k-th and (k+1)-th largest values;
    rows where they are equal are redone with :func:`_tied_cut`."""
    n, m = block.shape
    if k >= m:
        cols = np.broadcast_to(np.arange(m), (n, m)).copy()
    else:
        part = np.argpartition(block, (m - k - 1, m - k), axis=1)
        cols = part[:, m - k:]
        kth = np.take_along_axis(block, part[:, m - k:m - k + 1], 1)[:, 0]
        nxt = np.take_along_axis(block, part[:, m - k - 1:m - k], 1)[:, 0]
        cut = np.flatnonzero(kth == nxt)
        if len(cut):
            cols[cut] = _tied_cut(np, block[cut], kth[cut], k)
    vals = np.take_along_axis(block, cols, 1)
    order = np.lexsort((cols, -vals), axis=1)
    return np.take_along_axis(vals, order, 1), np.take_along_axis(cols, order, 1).astype(np.int64, copy=False)


def _knn_numpy(q: np.ndarray, db: np.ndarray, k: int, qb: int, dbb: int, progress: bool,
               with_min: bool = False) -> Result:
    nq, ndb = q.shape[0], db.shape[0]
    S = np.empty((nq, k), np.float32)
    I = np.empty((nq, k), np.int64)
    smin = np.empty(nq, np.float32) if with_min else None
    chunks = _chunks(nq, qb)
    db_chunks = _chunks(ndb, dbb)
    bar = _progress(len(chunks), progress, "knn[numpy]")
    try:
        for a, b in chunks:
            qc = q[a:b]
            best_s = np.empty((b - a, 0), np.float32)
            best_i = np.empty((b - a, 0), np.int64)
            low = np.full(b - a, np.inf, np.float32)
            for c, d in db_chunks:
                block = qc @ db[c:d].T
                if with_min:
                    np.minimum(low, block.min(axis=1), out=low)
                s, i = _numpy_topk(block, min(k, d - c))
                del block
                best_s, best_i = _merge_sorted(np, best_s, best_i, s, i + c, k)
            S[a:b], I[a:b] = best_s, best_i
            if with_min:
                smin[a:b] = low
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return S, I, smin
