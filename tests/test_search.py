"""glr.search.knn: every backend equals brute force, chunking is invisible, inputs are checked."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from glr import search
from glr.search import faiss_available, gpu_available, knn, resolve_backend
from glr.utils import InputError

NQ, NDB, D = 57, 1003, 64


def _normalised(rng: np.random.Generator, n: int, d: int = D) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return _normalised(rng, NQ), _normalised(rng, NDB)


def _available_backends() -> list:
    out = [pytest.param("numpy")]
    out.append(pytest.param("torch", marks=pytest.mark.skipif(search._import_torch() is None, reason="no torch")))
    out.append(pytest.param("faiss", marks=pytest.mark.skipif(not faiss_available(), reason="no faiss")))
    return out


def _assert_matches_brute_force(q, db, S, I, k):
    full = q @ db.T
    order = np.argsort(-full, axis=1, kind="stable")
    ref_S_all = np.take_along_axis(full, order, 1)
    ref_I, ref_S = order[:, :k], ref_S_all[:, :k]
    assert S.dtype == np.float32 and I.dtype == np.int64
    assert S.shape == I.shape == (q.shape[0], k)
    np.testing.assert_allclose(S, ref_S, atol=1e-5, rtol=0)
    # The returned indices really have the returned similarities ...
    np.testing.assert_allclose(np.take_along_axis(full, I, 1), S, atol=1e-5, rtol=0)
    # ... and are the brute-force ones, except at ranks whose similarity ties (within 1e-5)
    # with the previous or next rank (including rank k + 1, just outside the result).
    gap = np.abs(np.diff(ref_S_all, axis=1)) < 1e-5  # gap[:, j]: ranks j and j + 1 tie
    near_tie = np.zeros(ref_S_all.shape, bool)
    near_tie[:, 1:] |= gap
    near_tie[:, :-1] |= gap
    assert np.all((I == ref_I) | near_tie[:, :k])
    assert all(len(set(row)) == k for row in I.tolist())  # no index twice


@pytest.mark.parametrize("backend", _available_backends())
def test_backend_equals_brute_force(data, backend):
    q, db = data
    S, I = knn(q, db, 10, backend=backend, use_gpu=False)
    _assert_matches_brute_force(q, db, S, I, 10)


@pytest.mark.parametrize("backend", _available_backends())
@pytest.mark.parametrize(("query_batch", "db_batch"), [(7, 5), (1, 1000), (50, 3)])
def test_tiny_chunks_merge_to_the_same_result(data, backend, query_batch, db_batch):
    q, db = data
    S, I = knn(q, db, 10, backend=backend, use_gpu=False, query_batch=query_batch, db_batch=db_batch)
    _assert_matches_brute_force(q, db, S, I, 10)


def test_exact_ties_keep_every_tied_index_once():
    db = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # rows 0-2 equal, 3-5 equal, ...
    q = np.eye(4, dtype=np.float32)[:2]
    backends = ["numpy"] + ["torch"] * (search._import_torch() is not None) + ["faiss"] * faiss_available()
    for backend in backends:
        S, I = knn(q, db, 3, backend=backend, use_gpu=False, db_batch=2)
        np.testing.assert_allclose(S, 1.0)
        assert [sorted(r) for r in I.tolist()] == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("backend", _available_backends())
def test_k_larger_than_db_is_clipped(data, backend):
    q, db = data
    S, I = knn(q[:5], db[:8], 20, backend=backend, use_gpu=False, db_batch=3)
    assert S.shape == I.shape == (5, 8)
    _assert_matches_brute_force(q[:5], db[:8], S, I, 8)
    assert sorted(I[0].tolist()) == list(range(8))


@pytest.mark.parametrize("backend", _available_backends())
def test_empty_inputs(data, backend):
    q, db = data
    S, I = knn(q, db[:0], 5, backend=backend, use_gpu=False)
    assert S.shape == I.shape == (NQ, 0) and S.dtype == np.float32 and I.dtype == np.int64
    S, I = knn(q[:0], db, 5, backend=backend, use_gpu=False)
    assert S.shape == I.shape == (0, 5)


def test_inputs_are_cast_to_contiguous_float32(data):
    q, db = data
    S, I = knn(q.astype(np.float64), np.asfortranarray(db), 4, backend="numpy")
    S2, I2 = knn(q, db, 4, backend="numpy")
    np.testing.assert_allclose(S, S2, atol=1e-6)
    assert np.array_equal(I, I2)
    S3, _ = knn(q[:, ::1][::2], db, 4, backend="numpy")  # a strided view works too
    np.testing.assert_allclose(S3, S2[::2], atol=1e-6)


@pytest.mark.parametrize(
    ("q", "db", "k", "match"),
    [
        (np.zeros(4, np.float32), np.zeros((3, 4), np.float32), 1, "2-D"),
        (np.zeros((2, 4), np.float32), np.zeros((3, 4, 1), np.float32), 1, "2-D"),
        (np.zeros((2, 4), np.float32), np.zeros((3, 5), np.float32), 1, "same dimension"),
        (np.zeros((2, 0), np.float32), np.zeros((3, 0), np.float32), 1, "D must be >= 1"),
        (np.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32), 0, "k must be >= 1"),
        (np.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32), 2.0, "k must be an integer"),
        (np.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32), True, "k must be an integer"),
        (np.array([[0, np.nan]], np.float32), np.zeros((3, 2), np.float32), 1, "q contains 1 NaN"),
        (np.zeros((1, 2), np.float32), np.array([[np.inf, 0]]), 1, "db contains 1 NaN or infinite"),
        (np.array([["a", "b"]]), np.zeros((3, 2), np.float32), 1, "real numbers"),
    ],
)
def test_input_validation(q, db, k, match):
    with pytest.raises(ValueError, match=match):
        knn(q, db, k, backend="numpy")


def test_bad_backend_and_batch_sizes(data):
    q, db = data
    with pytest.raises(ValueError, match="unknown knn backend"):
        knn(q, db, 1, backend="annoy")
    with pytest.raises(ValueError, match="query_batch"):
        knn(q, db, 1, backend="numpy", query_batch=0)
    with pytest.raises(ValueError, match="db_batch"):
        knn(q, db, 1, backend="numpy", db_batch=-3)


def test_auto_uses_torch_when_faiss_is_unavailable(data, monkeypatch, caplog):
    q, db = data
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    assert not faiss_available()
    assert resolve_backend("auto") == "torch"

    def no_faiss(*args, **kwargs):
        raise AssertionError("the faiss backend must not be called")

    monkeypatch.setattr(search, "_knn_faiss", no_faiss)
    with caplog.at_level(logging.INFO, logger="glr.search"):
        S, I = knn(q, db, 5, use_gpu=False)
    assert "backend=torch" in caplog.text
    _assert_matches_brute_force(q, db, S, I, 5)


@pytest.mark.skipif(not faiss_available(), reason="no faiss")
def test_auto_prefers_faiss_when_importable():
    assert resolve_backend("auto", use_gpu=False) == "faiss"


def test_use_gpu_without_gpu_is_an_error(data, monkeypatch):
    q, db = data
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA"):
        knn(q, db, 1, backend="torch", use_gpu=True)
    if faiss_available():
        monkeypatch.setattr(search, "_faiss_num_gpus", lambda: 0)
        with pytest.raises(RuntimeError, match="faiss sees no GPU"):
            knn(q, db, 1, backend="faiss", use_gpu=True)


def test_progress_bar_runs(data):
    pytest.importorskip("tqdm")
    q, db = data
    S, I = knn(q, db, 3, backend="numpy", query_batch=20, progress=True)
    _assert_matches_brute_force(q, db, S, I, 3)


@pytest.mark.skipif(not gpu_available(), reason="no GPU")
@pytest.mark.parametrize("backend", _available_backends()[1:])
def test_gpu_equals_brute_force(data, backend):
    q, db = data
    if backend == "faiss" and search._faiss_num_gpus() == 0:
        pytest.skip("faiss has no GPU support")
    if backend == "torch" and not search._torch_cuda():
        pytest.skip("torch has no CUDA")
    S, I = knn(q, db, 10, backend=backend, use_gpu=True, query_batch=16, db_batch=100)
    _assert_matches_brute_force(q, db, S, I, 10)
    S, I = knn(q, db, 10, backend=backend, use_gpu=True)
    _assert_matches_brute_force(q, db, S, I, 10)


# --------------------------------------------------------------------------- exact ties, with_min
def _tied_database(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Queries and a database with every row repeated, on a grid of eighths: each inner product is
    a multiple of 1/64 computed exactly in float32, so duplicated rows tie exactly whatever the
    matmul's blocking."""
    base = rng.integers(-4, 5, (40, 12)).astype(np.float32) / 8
    db = np.repeat(base, 3, axis=0)[rng.permutation(120)]
    q = rng.integers(-4, 5, (30, 12)).astype(np.float32) / 8
    return q, db


@pytest.mark.parametrize("backend", _available_backends()[:2])
@pytest.mark.parametrize(("query_batch", "db_batch"), [(None, None), (7, 13), (30, 1), (4, 119)])
def test_exact_ties_come_by_lower_row(backend, query_batch, db_batch):
    q, db = _tied_database(np.random.default_rng(1))
    S, I = knn(q, db, 8, backend=backend, use_gpu=False, query_batch=query_batch, db_batch=db_batch)
    full = q @ db.T
    cols = np.broadcast_to(np.arange(len(db)), full.shape)
    ref = np.lexsort((cols, -full), axis=1)[:, :8]  # by similarity, then by row
    assert np.array_equal(I, ref)
    np.testing.assert_array_equal(S, np.take_along_axis(full, ref, 1))
    assert np.mean(np.diff(S, axis=1) == 0) > 0.3  # the test really has ties inside the top-k


@pytest.mark.parametrize("backend", _available_backends())
@pytest.mark.parametrize("db_batch", [None, 17])
def test_with_min_is_the_minimum_over_the_database(data, backend, db_batch):
    q, db = data
    S, I, smin = knn(q, db, 5, backend=backend, use_gpu=False, db_batch=db_batch, with_min=True)
    _assert_matches_brute_force(q, db, S, I, 5)
    assert smin.dtype == np.float32 and smin.shape == (NQ,)
    np.testing.assert_allclose(smin, (q @ db.T).min(axis=1), atol=1e-5, rtol=0)


def test_with_min_over_a_lazy_database_skips_rows_not_ok(data):
    from glr.arrays import ArrayRows

    q, db = data
    ok = np.ones(NDB, bool)
    ok[::3] = False
    rows = ArrayRows(db, ok=ok, block_rows=100)
    S, I, smin = knn(q, rows, 6, backend="numpy", with_min=True)
    assert ok[I].all()
    np.testing.assert_allclose(smin, (q @ db[ok].T).min(axis=1), atol=1e-5, rtol=0)
    _assert_matches_brute_force(q, db[ok], S, np.searchsorted(np.flatnonzero(ok), I), 6)


@pytest.mark.skipif(not faiss_available() or search._import_torch() is None, reason="needs faiss and torch")
def test_with_min_on_the_cpu_makes_auto_take_torch(data, caplog, monkeypatch):
    q, db = data
    monkeypatch.setattr(search, "_faiss_num_gpus", lambda: 0)
    with caplog.at_level(logging.INFO, logger="glr.search"):
        knn(q, db, 3, with_min=True)
        assert "backend=torch" in caplog.text
        caplog.clear()
        knn(q, db, 3)
        assert "backend=faiss" in caplog.text


# --------------------------------------------------------------------------- index specs
SOURCE = "configs/post.yaml"


@pytest.mark.parametrize(
    ("value", "expected", "key"),
    [
        (None, search.EXACT, "exact"),
        ("exact", search.EXACT, "exact"),
        ({"exact": None}, search.EXACT, "exact"),
        ({"exact": {}}, search.EXACT, "exact"),
        ({"ivf": {"nlist": 1024, "nprobe": 32}}, search.IndexSpec("ivf", nlist=1024, nprobe=32), "ivf1024-np32"),
        ({"ivf": {"nlist": 64}}, search.IndexSpec("ivf", nlist=64), "ivf64-npauto"),
        ("hnsw", search.IndexSpec("hnsw"), "hnsw32-ef128"),
        ({"hnsw": {"M": 16, "ef": 64}}, search.IndexSpec("hnsw", M=16, ef=64), "hnsw16-ef64"),
    ],
)
def test_parse_index_spec(value, expected, key):
    spec = search.parse_index_spec(value, "search.kreciprocal", SOURCE)
    assert spec == expected and spec.key() == key
    assert spec.exact == (key == "exact")
    assert search.parse_index_spec(spec) is spec


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("annoy", "search.kreciprocal: unknown index kind 'annoy'"),
        ({"ivf": {"nlist": 8}, "hnsw": {}}, "search.kreciprocal must name one index kind"),
        ({}, "search.kreciprocal must name one index kind"),
        (3, "search.kreciprocal must be one of exact, ivf, hnsw"),
        ({"ivf": 1024}, "search.kreciprocal.ivf must be a mapping"),
        ({"ivf": {"nlists": 8}}, "search.kreciprocal.ivf.nlists: unknown option; ivf takes nlist, nprobe"),
        ({"exact": {"nprobe": 8}}, "search.kreciprocal.exact.nprobe: unknown option"),
        ({"ivf": {"nlist": 0}}, r"search.kreciprocal.ivf.nlist must be an integer >= 1, got 0"),
        ({"ivf": {"nprobe": 2.5}}, r"search.kreciprocal.ivf.nprobe must be an integer >= 1, got 2.5"),
        ({"hnsw": {"M": True}}, r"search.kreciprocal.hnsw.M must be an integer >= 1, got True"),
        ({"hnsw": {"ef": "64"}}, r"search.kreciprocal.hnsw.ef must be an integer >= 1"),
        ({"ivf": {"nlist": 8, "nprobe": 9}}, r"search.kreciprocal.ivf.nprobe = 9 is larger than .*nlist = 8"),
    ],
)
def test_parse_index_spec_errors_name_the_setting_and_the_file(value, match):
    with pytest.raises(InputError, match=match) as info:
        search.parse_index_spec(value, "search.kreciprocal", SOURCE)
    assert str(info.value).startswith(f"{SOURCE}: ")


@pytest.mark.skipif(not faiss_available(), reason="no faiss")
def test_check_index_spec():
    check = search.check_index_spec
    for spec in (search.EXACT, search.IndexSpec("ivf", nlist=100, nprobe=100), search.IndexSpec("hnsw")):
        check(spec, 100, "search.joint", SOURCE)
    check(search.IndexSpec("hnsw"), 100, "search.joint", SOURCE, use_gpu=False)
    check(search.IndexSpec("ivf", nlist=50), 0, "search.joint", SOURCE)  # empty database: nothing to search
    with pytest.raises(InputError, match=r"search.joint.ivf.nlist = 101 is larger than the 100 rows") as info:
        check(search.IndexSpec("ivf", nlist=101), 100, "search.joint", SOURCE)
    assert SOURCE in str(info.value)
    # the automatic nlist: about sqrt(rows), at least 39 training rows per list; nprobe nlist / 8
    assert search.IndexSpec("ivf").resolved(2000) == search.IndexSpec("ivf", nlist=45, nprobe=5)
    assert search.IndexSpec("ivf").resolved(500) == search.IndexSpec("ivf", nlist=12, nprobe=1)
    with pytest.raises(InputError, match=r"search.joint.ivf.nprobe = 46 is larger than nlist = 45 \(the automatic"):
        check(search.IndexSpec("ivf", nprobe=46), 2000, "search.joint", SOURCE)
    with pytest.raises(InputError, match=f"{SOURCE}: search.joint.hnsw cannot run on the GPU"):
        check(search.IndexSpec("hnsw", M=8), 100, "search.joint", SOURCE, use_gpu=True)
    with pytest.raises(ValueError, match="unknown knn backend"):
        check(search.EXACT, 100, "search.joint", SOURCE, backend="annoy")


def test_approximate_search_without_faiss_is_an_input_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    search.check_index_spec(search.EXACT, 10, "search.labels", SOURCE)
    with pytest.raises(InputError, match=f"{SOURCE}: search.labels.ivf .*needs faiss, which is not installed"):
        search.check_index_spec(search.IndexSpec("ivf"), 10, "search.labels", SOURCE)


def test_index_spec_rejects_options_of_another_kind():
    with pytest.raises(ValueError, match="takes no 'nlist'"):
        search.IndexSpec("hnsw", nlist=4)
    with pytest.raises(ValueError, match="unknown index kind"):
        search.IndexSpec("lsh")
    assert search.IndexSpec("ivf", nlist=8, nprobe=2).describe() == "IVF approximate (nlist 8, nprobe 2)"


# --------------------------------------------------------------------------- approximate search
def _clustered(rng: np.random.Generator, n: int, d: int = 64, centres: int = 40, sub: int = 12) -> np.ndarray:
    """Rows around ``centres`` centres in a ``sub``-dimensional subspace plus small full-dimensional
    noise (learned embeddings have a low intrinsic dimension; isotropic noise is every ANN's worst case)."""
    basis = np.linalg.qr(np.random.default_rng(99).standard_normal((d, sub)))[0].T.astype(np.float32)
    c = np.random.default_rng(98).standard_normal((centres, sub)).astype(np.float32)
    x = (c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, sub)).astype(np.float32)) @ basis
    x += 0.03 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    q, db = _clustered(rng, 200), _clustered(rng, 4000)
    return q, db, knn(q, db, 10, backend="numpy")[1]


def _assert_valid_rows(q, db, S, I, k):
    assert S.shape == I.shape == (len(q), k) and S.dtype == np.float32 and I.dtype == np.int64
    assert I.min() >= 0 and I.max() < len(db)
    assert all(len(set(row)) == k for row in I.tolist())
    np.testing.assert_allclose(S, np.einsum("nd,nkd->nk", q, db[I]), atol=1e-5, rtol=0)
    assert np.all(np.diff(S, axis=1) <= 1e-6)  # best first


needs_faiss = pytest.mark.skipif(not faiss_available(), reason="no faiss")


@needs_faiss
@pytest.mark.parametrize(("generous", "poor"), [
    (search.IndexSpec("ivf", nlist=64, nprobe=16), search.IndexSpec("ivf", nlist=64, nprobe=1)),
    (search.IndexSpec("hnsw", M=16, ef=64), search.IndexSpec("hnsw", M=2, ef=1)),
])
def test_approximate_index_recall(clustered, generous, poor):
    q, db, exact = clustered
    S, I = knn(q, db, 10, index=generous)
    _assert_valid_rows(q, db, S, I, 10)
    assert search.recall_at_k(I, exact) >= 0.99
    S, I = knn(q, db, 10, index=poor)  # the spec is really applied: a poor one loses neighbours
    _assert_valid_rows(q, db, S, I, 10)
    assert search.recall_at_k(I, exact) < 0.95


@needs_faiss
def test_ivf_is_deterministic_for_a_seed_and_reusable(clustered):
    q, db, _ = clustered
    spec = search.IndexSpec("ivf", nlist=50, nprobe=3)
    first = knn(q, db, 10, index=spec)
    with search.build_index(db, spec, seed=0) as index:
        assert index.train_rows == 50 * search.TRAIN_POINTS_PER_CENTROID and index.spec == spec
        again = index.search(q, 10)
        S, I, smin = index.search(q[:20], 4, with_min=True)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(I, first[1][:20, :4])
    assert np.all(smin >= (q[:20] @ db.T).min(axis=1) - 1e-6) and np.all(smin <= S[:, -1])


@needs_faiss
def test_approximate_with_min_and_few_rows_per_list(clustered, caplog):
    """nprobe=1 over 20 lists of about 40 rows, k=40: many queries find < k rows; they are searched
    again exactly, so every returned index is a real row."""
    q, db, _ = clustered
    with caplog.at_level(logging.INFO, logger="glr.search"):
        S, I, smin = knn(q, db[::5], 40, index=search.IndexSpec("ivf", nlist=20, nprobe=1), with_min=True)
    assert "queries found < 40 rows through ivf20-np1; searched exactly" in caplog.text
    _assert_valid_rows(q, db[::5], S, I, 40)
    S2, I2, smin2 = knn(q, db, 10, index=search.IndexSpec("ivf", nlist=16, nprobe=16), with_min=True)
    np.testing.assert_allclose(smin2, (q @ db.T).min(axis=1), atol=1e-5, rtol=0)  # all lists: exact


@needs_faiss
def test_approximate_index_needs_an_in_memory_database(clustered):
    from glr.arrays import ArrayRows

    q, db, exact = clustered
    spec = search.IndexSpec("ivf", nlist=32, nprobe=32)
    with pytest.raises(ValueError, match="needs the database in memory"):
        knn(q, ArrayRows(db), 10, index=spec)
    S, I = knn(ArrayRows(q, block_rows=64), db, 10, index=spec)  # lazy queries are fine
    assert search.recall_at_k(I, exact) == 1.0
    with pytest.raises(InputError, match="index.ivf.nlist = 5000 is larger than the 4000 rows"):
        knn(q, db, 10, index=search.IndexSpec("ivf", nlist=5000))
    S, I = knn(q, db[:0], 10, index=spec)
    assert S.shape == I.shape == (len(q), 0)


def test_recall_at_k():
    exact = np.array([[0, 1, 2], [3, 4, 5]])
    assert search.recall_at_k(exact, exact) == 1.0
    assert search.recall_at_k(np.array([[2, 1, 9, 0], [5, -1, -1, 6]]), exact) == pytest.approx(3 / 6)
    assert search.recall_at_k(np.zeros((0, 3), int), np.zeros((0, 3), int)) == 1.0
    with pytest.raises(ValueError, match="must be"):
        search.recall_at_k(exact[:, :2], exact)


@needs_faiss
def test_ivf_list_scan_finds_what_faiss_ivf_finds(clustered):
    """The CPU IVF scans lists as matrix products: same probes and lists as faiss's IndexIVFFlat,
    so the same neighbours and similarities."""
    import faiss

    q, db, _ = clustered
    with search.build_index(db, search.IndexSpec("ivf", nlist=40, nprobe=3), use_gpu=False) as index:
        S, I = index.search(q, 10)
        assert isinstance(index._ann, search._ListScan)
        ref = faiss.clone_index(index._ann.ivf)
    ref.add(db)
    ref.nprobe = 3
    S_ref, I_ref = ref.search(q, 10)
    np.testing.assert_allclose(S, S_ref, atol=1e-5, rtol=0)
    assert search.recall_at_k(I, I_ref) > 0.999  # only exact ties may differ


@needs_faiss
def test_the_farthest_row_search_is_narrow_and_leaves_the_index_as_it_was(clustered):
    """with_min through IVF probes MIN_NPROBE lists for -q (an upper bound of the true minimum, close
    to it), and the top-k of the same index is unchanged before and after it."""
    q, db, _ = clustered
    spec = search.IndexSpec("ivf", nlist=32, nprobe=8)
    with search.build_index(db, spec) as index:
        before = index.search(q, 10)
        S, I, smin = index.search(q, 10, with_min=True)
        assert index._ann.nprobe == 8
        after = index.search(q, 10)
    for a, b, c in zip(before, (S, I), after):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    true_min = (q @ db.T).min(axis=1)
    assert np.all(smin >= true_min - 1e-6) and np.all(smin <= S[:, -1])
    assert float(np.mean(smin - true_min)) < 0.1
