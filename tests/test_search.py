"""glr.search.knn: every backend equals brute force, chunking is invisible, inputs are checked."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

from glr import search
from glr.search import faiss_available, gpu_available, knn, resolve_backend

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
