"""k-reciprocal re-ranking (GLDV2_SPEC §5.3): hand-computed tiny cases for the exact port,
the scalable form against the exact one, the joint graph against brute force, and errors."""

import math

import numpy as np
import pytest

from glr.postprocess import kreciprocal as kr
from glr.postprocess.kreciprocal import (joint_graph, k_reciprocal_dist, k_reciprocal_exact,
                                         k_reciprocal_rerank)
from glr.search import IndexSpec, knn

F32 = np.float32


def line_dists(pos, nq=1):
    """(q_g, q_q, g_g) distance blocks of points on a line, queries first."""
    p = np.asarray(pos, np.float64)
    d = np.abs(p[:, None] - p[None, :])
    return d[:nq, nq:], d[:nq, :nq], d[nq:, nq:]


def from_sets(pos, E, lam, nq=1):
    """The final distances given the expansion sets E[i] (k2 = 1), by the formulas of §5.3:
    Dn = squared distance / its column max (symmetric here), V[i, E_i] = softmax(-Dn[i, E_i]),
    Jaccard = 1 - Σmin / (2 - Σmin), final = (1-λ)·jac + λ·Dn."""
    p = np.asarray(pos, np.float64)
    d2 = ((p[:, None] - p[None, :]) ** 2).astype(F32)
    dn = (d2 / d2.max(axis=0)).T
    V = np.zeros_like(dn)
    for i, e in E.items():
        w = np.exp(-dn[i, e])
        V[i, e] = w / w.sum()
    m = np.minimum(V[:nq, None, :], V[None, :, :]).sum(axis=2)
    jac = 1 - m / (2 - m)
    return ((1 - lam) * jac + lam * dn[:nq])[:, nq:]


# --------------------------------------------------------------------------- hand-computed
# Points on a line, query q = 0 first, gallery g1 = 1, g2 = 3, g3 = 4 (rows 0..3).
# Squared distances (symmetric, so column max = row max):
#   row0 [0, 1, 9, 16] /16   row1 [1, 0, 4, 9] /9   row2 [9, 4, 0, 1] /9   row3 [16, 9, 1, 0] /16
#   Dn row0 = [0, 1/16, 9/16, 1], row1 = [1/9, 0, 4/9, 1], row2 = [1, 4/9, 0, 1/9], row3 = [1, 9/16, 1/16, 0]
# Ranks: R0 = [0,1,2,3], R1 = [1,0,2,3], R2 = [2,3,1,0], R3 = [3,2,1,0].
# k1 = 1: two slots. N(0) = {0,1}, N(1) = {1,0}, N(2) = {2,3}, N(3) = {3,2} (all reciprocal).
# round(1/2) = 0 (half to even): one slot, N(c, 0) = {c} ⊆ N(i): the expansion adds nothing.
# V0 = softmax(-[0, 1/16]) on {0,1} = [a, 1-a],  a = 1/(1+e^{-1/16}) ≈ 0.51562
# V1 = softmax(-[1/9, 0])  on {0,1} = [1-b, b],  b = 1/(1+e^{-1/9})  ≈ 0.52775
# V2 = [.., .., b, 1-b] on {2,3}; V3 = [.., .., 1-a, a] on {2,3}.
# Jaccard(0,1): m = min(a, 1-b) + min(1-a, b) = (1-b) + (1-a) = 2 - a - b  → jac = 1 - m/(2-m)
# Jaccard(0,2) = Jaccard(0,3) = 1 (no common support).
POS_A = [0, 1, 3, 4]
A = 1 / (1 + math.exp(-1 / 16))
B = 1 / (1 + math.exp(-1 / 9))
JAC01 = 1 - (2 - A - B) / (A + B)


def test_exact_hand_computed_line_k1_1():
    out = k_reciprocal_exact(*line_dists(POS_A), k1=1, k2=1, lambda_value=0.3)
    assert out.shape == (1, 3) and out.dtype == np.float32
    expected = [0.7 * JAC01 + 0.3 / 16, 0.7 * 1 + 0.3 * 9 / 16, 0.7 * 1 + 0.3 * 1]
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out, from_sets(POS_A, {0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}, 0.3),
                               atol=1e-6)


def test_exact_lambda_1_is_the_squared_normalised_distance():
    out = k_reciprocal_exact(*line_dists(POS_A), k1=1, k2=1, lambda_value=1.0)
    # Dn row 0 of the *squared* distances: [1/16, 9/16, 1] (exact in binary)
    np.testing.assert_array_equal(out[0], F32([1 / 16, 9 / 16, 1]))
    # unsquared distances would give [1/4, 3/4, 1]
    assert not np.allclose(out[0], [0.25, 0.75, 1.0], atol=1e-3)
    # float64 input is squared in float64 then cast: same numbers
    qg, qq, gg = line_dists(POS_A)
    np.testing.assert_array_equal(k_reciprocal_exact(qg.astype(F32), qq.astype(F32), gg.astype(F32), 1, 1, 1.0),
                                  out)


def test_exact_lambda_0_is_pure_jaccard():
    out = k_reciprocal_exact(*line_dists(POS_A), k1=1, k2=1, lambda_value=0.0)
    np.testing.assert_allclose(out[0], [JAC01, 1.0, 1.0], rtol=0, atol=1e-6)


def test_exact_k2_local_query_expansion():
    # k2 = 2: V_qe[i] = mean(V[R[i, :2]]); R0[:2] = [0,1] and R1[:2] = [1,0] give the same row
    # (a+1-b, 1-a+b)/2 on {0,1}: Σmin = 1 → Jaccard(0,1) = 0; no overlap with rows 2, 3 (still 1).
    out2 = k_reciprocal_exact(*line_dists(POS_A), k1=1, k2=2, lambda_value=0.3)
    np.testing.assert_allclose(out2[0], [0.3 / 16, 0.7 + 0.3 * 9 / 16, 1.0], rtol=0, atol=1e-6)
    out1 = k_reciprocal_exact(*line_dists(POS_A), k1=1, k2=1, lambda_value=0.3)
    assert abs(out2[0, 0] - out1[0, 0]) > 0.05  # k2 = 1 means no expansion


def test_exact_column_max_then_transpose_on_non_symmetric_input():
    # Nq = 2, Ng = 2, q-q block not symmetric. D (rows = [q0, q1, g0, g1]):
    #   [0 1 2 3]          squared  [ 0  1  4  9]
    #   [5 0 4 1]                   [25  0 16  1]
    #   [2 4 0 2]                   [ 4 16  0  4]
    #   [3 1 2 0]                   [ 9  1  4  0]
    # column maxima 25, 16, 16, 9; row i of the result = column i / its max:
    #   row q0 = [0, 25, 4, 9] / 25,  row q1 = [1, 0, 16, 1] / 16
    # λ = 1 → final = those rows at the gallery columns.
    qq = np.array([[0, 1], [5, 0]])
    qg = np.array([[2, 3], [4, 1]])
    gg = np.array([[0, 2], [2, 0]])
    out = k_reciprocal_exact(qg, qq, gg, k1=1, k2=1, lambda_value=1.0)
    np.testing.assert_array_equal(out, [[F32(4) / F32(25), F32(9) / F32(25)], [F32(16) / F32(16), F32(1) / F32(16)]])
    # a row-max normalisation would give [[4/9, 1], [16/25, 1/25]]; column-max without the
    # transpose [[4/16, 9/9], [16/16, 1/9]]
    assert not np.allclose(out, [[4 / 9, 1], [16 / 25, 1 / 25]], atol=1e-3)
    assert not np.allclose(out, [[4 / 16, 1], [1, 1 / 9]], atol=1e-3)


# Points 0:23 (query), 1:21, 2:35, 3:38, 4:34; k1 = 3 (4 slots), round(3/2) = 2 (3 slots).
# distances: d01=2 d02=12 d03=15 d04=11 d12=14 d13=17 d14=13 d23=3 d24=1 d34=4
# R0 = [0,1,4,2,3]  R1 = [1,0,4,2,3]  R2 = [2,4,3,0,1]  R3 = [3,2,4,0,1]  R4 = [4,2,3,0,1]
# N(0,3): R0[:4] = {0,1,4,2}; 0 is in R0[:4], R1[:4], R4[:4], R2[:4] → N(0) = {0,1,4,2}
# candidates (3 slots): N(0,2) = {0,1} (0 ∉ R4[:3]), N(1,2) = {1,0}: inside N(0)
#   N(4,2) = {4,2,3}: |∩ N(0)| = |{4,2}| = 2, and 2 > 2/3·3 = 2 is FALSE → 3 not added
#   N(2,2) = {2,4,3}: same, 2 > 2 false.            → E0 = {0,1,2,4}   (with ≥: {0,1,2,3,4})
# N(1,3) = {1,0} (1 ∉ R4[:4], R2[:4]) → E1 = {0,1}
# N(2,3) = {2,4,3,0}; N(2,2), N(4,2), N(3,2) = {2,3,4} ⊆ N(2); N(0,2) = {0,1}: 1 > 4/3 false → E2 = {0,2,3,4}
# N(3,3) = {3,2,4} (3 ∉ R0[:4]); its candidates' sets are {2,3,4} → E3 = {2,3,4}
# N(4,3) = {4,2,3,0}; like row 2 → E4 = {0,2,3,4}
POS_STRICT = [23, 21, 35, 38, 34]
E_STRICT = {0: [0, 1, 2, 4], 1: [0, 1], 2: [0, 2, 3, 4], 3: [2, 3, 4], 4: [0, 2, 3, 4]}


def test_exact_two_thirds_is_strict():
    out = k_reciprocal_exact(*line_dists(POS_STRICT), k1=3, k2=1, lambda_value=0.0)
    np.testing.assert_allclose(out, from_sets(POS_STRICT, E_STRICT, 0.0), atol=1e-6)
    non_strict = from_sets(POS_STRICT, {**E_STRICT, 0: [0, 1, 2, 3, 4]}, 0.0)
    assert np.abs(out - non_strict).max() > 0.05


# Points 0:15 (query), 1:13, 2:31, 3:7, 4:20, 5:35, 6:32; k1 = 5 (6 slots).
# R0 = [0,1,4,3,2,6,5], R2 = [2,6,5,4,0,1,3], R4 = [4,0,1,2,6,3,5], R5 = [5,6,2,4,0,1,3], R6 = [6,2,5,4,0,1,3]
# N(0,5) = {0,1,4,3,2,6} (0 is in the first 6 slots of each). Candidate 2:
#   round(5/2) = 2 (half to even) → 3 slots: R2[:3] = {2,6,5}, all reciprocal (2 ∈ R6[:3], R5[:3]);
#     |{2,6,5} ∩ N(0)| = 2 > 2 false → 5 ∉ E0
#   half-up would give 3 → 4 slots: {2,6,5,4} (2 ∈ R4[:4]), |∩| = 3 > 8/3 → 5 ∈ E0
POS_ROUND = [15, 13, 31, 7, 20, 35, 32]
# The other rows follow the same way (listed, not derived here):
E_ROUND_2 = {0: [0, 1, 2, 3, 4, 6], 1: [0, 1, 2, 3, 4, 6], 2: [0, 1, 2, 4, 5, 6], 3: [0, 1, 3, 4],
             4: [0, 1, 2, 3, 4, 6], 5: [2, 5, 6], 6: [0, 1, 2, 4, 5, 6]}
E_ROUND_3 = {0: list(range(7)), 1: list(range(7)), 2: list(range(7)), 3: [0, 1, 2, 3, 4],
             4: list(range(7)), 5: [2, 4, 5, 6], 6: list(range(7))}


def test_half_k_rounds_half_to_even():
    assert [kr._half_k(k) for k in (1, 2, 3, 5, 7, 9, 20)] == [0, 1, 2, 2, 4, 4, 10]


def test_exact_k1_5_uses_two_not_three(monkeypatch):
    out = k_reciprocal_exact(*line_dists(POS_ROUND), k1=5, k2=1, lambda_value=0.0)
    np.testing.assert_allclose(out, from_sets(POS_ROUND, E_ROUND_2, 0.0), atol=1e-6)
    monkeypatch.setattr(kr, "_half_k", lambda k1: 3)
    up = k_reciprocal_exact(*line_dists(POS_ROUND), k1=5, k2=1, lambda_value=0.0)
    np.testing.assert_allclose(up, from_sets(POS_ROUND, E_ROUND_3, 0.0), atol=1e-6)
    assert np.abs(out - up).max() > 0.05


# --------------------------------------------------------------------------- scalable vs exact
def normed(rng, n, d):
    x = rng.standard_normal((n, d)).astype(F32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_from_features(q, db, k1, k2, lam):
    x = np.concatenate([q, db]).astype(np.float64)
    d = np.sqrt(np.maximum(2 - 2 * (x @ x.T), 0))
    nq = len(q)
    return k_reciprocal_exact(d[:nq, nq:], d[:nq, :nq], d[nq:, nq:], k1, k2, lam)


PARAMS = [(20, 6, 0.3), (5, 1, 0.3), (2, 6, 0.0), (3, 3, 1.0)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scalable_equals_exact(seed):
    rng = np.random.default_rng(seed)
    q, db = normed(rng, 7, 16), normed(rng, 60, 16)
    for k1, k2, lam in PARAMS:
        ref = exact_from_features(q, db, k1, k2, lam)
        got = k_reciprocal_dist(q, db, k1, k2, lam, batch=3 if seed == 1 else None)
        assert got.shape == (7, 60) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
        # the exact ranking read on the scalable values is ascending, up to near-ties
        order = np.argsort(ref, axis=1, kind="stable")
        assert np.diff(np.take_along_axis(got, order, 1), axis=1).min() >= -1e-6


def test_rerank_is_top_k_of_one_minus_dense_and_accepts_a_wider_graph():
    rng = np.random.default_rng(3)
    q, db = normed(rng, 5, 8), normed(rng, 40, 8)
    dense = k_reciprocal_dist(q, db, 6, 3, 0.3)
    S, I = k_reciprocal_rerank(q, db, 6, 3, 0.3, topk=10)
    assert S.shape == I.shape == (5, 10) and S.dtype == np.float32 and I.dtype == np.int64
    score = F32(1) - dense
    expected = np.lexsort((np.broadcast_to(np.arange(40), score.shape), -score), axis=1)[:, :10]
    np.testing.assert_array_equal(I, expected)
    np.testing.assert_array_equal(S, np.take_along_axis(score, I, 1))
    graph = joint_graph(np.concatenate([q, db]), 15)
    S2, I2 = k_reciprocal_rerank(q, db, 6, 3, 0.3, topk=10, graph=graph)
    np.testing.assert_array_equal(S2, S)
    np.testing.assert_array_equal(I2, I)
    np.testing.assert_array_equal(k_reciprocal_dist(q, db, 6, 3, 0.3, graph=graph), dense)
    S3, I3 = k_reciprocal_rerank(q, db, 6, 3, 0.3, topk=100)  # clipped to Ng
    assert S3.shape == (5, 40)
    np.testing.assert_array_equal(I3[:, :10], I)


def test_tiny_joint_set_smaller_than_k1():
    rng = np.random.default_rng(4)
    q, db = normed(rng, 2, 4), normed(rng, 3, 4)
    np.testing.assert_allclose(k_reciprocal_dist(q, db, 20, 6, 0.3), exact_from_features(q, db, 20, 6, 0.3),
                               atol=1e-5)


# --------------------------------------------------------------------------- joint graph
@pytest.mark.parametrize("backend", ["torch", "numpy", "auto"])
def test_joint_graph_against_brute_force_with_ties(backend):
    rng = np.random.default_rng(5)
    x = rng.integers(-2, 3, size=(40, 6)).astype(F32)  # integer dot products: exact ties
    x[7] = x[3]
    x[20] = x[3]
    s = x @ x.T
    for k, batch in [(5, None), (5, 7), (40, 9), (50, None)]:
        S, I, smin = joint_graph(x, k, batch=batch, backend=backend)
        kk = min(k, 40)
        order = np.lexsort((np.broadcast_to(np.arange(40), s.shape), -s), axis=1)[:, :kk]
        np.testing.assert_array_equal(I, order)
        np.testing.assert_array_equal(S, np.take_along_axis(s, order, 1))
        np.testing.assert_array_equal(smin, s.min(axis=1))
        assert S.dtype == np.float32 and I.dtype == np.int64 and smin.dtype == np.float32


# --------------------------------------------------------------------------- errors
def test_errors():
    rng = np.random.default_rng(6)
    q, db = normed(rng, 3, 4), normed(rng, 10, 4)
    qg, qq, gg = line_dists(POS_A)
    with pytest.raises(ValueError, match="q_q_dist"):
        k_reciprocal_exact(qg, np.zeros((2, 2)), gg)
    with pytest.raises(ValueError, match="g_g_dist"):
        k_reciprocal_exact(qg, qq, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="q_g_dist"):
        k_reciprocal_exact(qg[0], qq, gg)
    with pytest.raises(ValueError, match="q must be"):
        k_reciprocal_rerank(q[0], db)
    with pytest.raises(ValueError, match="same dimension"):
        k_reciprocal_rerank(q, db[:, :3])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k1"):
            k_reciprocal_rerank(q, db, k1=bad)
        with pytest.raises(ValueError, match="k1"):
            k_reciprocal_exact(qg, qq, gg, k1=bad)
    with pytest.raises(ValueError, match="k2"):
        k_reciprocal_dist(q, db, k2=0)
    for lam in (-0.1, 1.1, float("nan"), "0.3"):
        with pytest.raises(ValueError, match="lambda_value"):
            k_reciprocal_rerank(q, db, lambda_value=lam)
        with pytest.raises(ValueError, match="lambda_value"):
            k_reciprocal_exact(qg, qq, gg, lambda_value=lam)
    with pytest.raises(ValueError, match="topk"):
        k_reciprocal_rerank(q, db, topk=0)
    x = np.concatenate([q, db])
    with pytest.raises(ValueError, match="columns"):
        k_reciprocal_rerank(q, db, k1=5, k2=3, graph=joint_graph(x, 5))
    with pytest.raises(ValueError, match="columns"):  # k2 = 8 rows averaged, graph of k1 + 1 = 6
        k_reciprocal_rerank(q, db, k1=5, k2=8, graph=joint_graph(x, 6))
    with pytest.raises(ValueError, match="rows"):
        k_reciprocal_rerank(q, db, k1=5, k2=3, graph=joint_graph(x[1:], 6))
    with pytest.raises(ValueError, match="graph"):
        k_reciprocal_rerank(q, db, k1=5, k2=3, graph=joint_graph(x, 6)[:2])
    with pytest.raises(ValueError, match="x must be"):
        joint_graph(x[0], 3)
    with pytest.raises(ValueError, match="k must be"):
        joint_graph(x, 0)
    with pytest.raises(ValueError, match="NaN"):
        joint_graph(np.full((3, 2), np.nan, F32), 2)


# --------------------------------------------------------------------------- the sparse final step
def clustered(rng, n, d=32, sub=6, n_centres=8, noise=0.3):
    """Unit rows around centres in a ``sub``-dimensional subspace plus small full-d noise."""
    basis = np.linalg.qr(np.random.default_rng(99).normal(size=(d, sub)))[0].T
    centres = np.random.default_rng(98).normal(size=(n_centres, sub))
    x = (centres[rng.integers(0, n_centres, n)] + noise * rng.normal(size=(n, sub))) @ basis
    x += 0.02 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(F32)


def dense_top(q, db, k1, k2, lam, topk, **kw):
    """The top-k of ``1 - k_reciprocal_dist`` with exact ties by lower row: the reference of the sparse path."""
    score = F32(1) - k_reciprocal_dist(q, db, k1, k2, lam, **kw)
    order = np.lexsort((np.broadcast_to(np.arange(score.shape[1]), score.shape), -score), axis=1)[:, :topk]
    return np.take_along_axis(score, order, 1), order


def dense_rows(caplog):
    """The ``dense_rows`` the last k-reciprocal run logged (queries computed over their whole row)."""
    msgs = [r.getMessage() for r in caplog.records if getattr(r, "kr_phase", None) == "Jaccard+final"]
    return int(msgs[-1].rsplit("dense_rows=", 1)[1])


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_final_equals_the_dense_top_k(seed, caplog):
    caplog.set_level("INFO", logger=kr.__name__)
    rng = np.random.default_rng(10 + seed)
    q, db = clustered(rng, 9), clustered(rng, 300)
    if seed == 1:
        q, db = normed(rng, 9, 16), normed(rng, 300, 16)  # isotropic too
    for k1, k2, lam, topk in [(20, 6, 0.3, 10), (5, 1, 0.3, 25), (3, 3, 1.0, 7), (8, 2, 0.05, 40)]:
        S, I = k_reciprocal_rerank(q, db, k1, k2, lam, topk=topk, batch=25 if seed else None)
        S0, I0 = dense_top(q, db, k1, k2, lam, topk)
        np.testing.assert_array_equal(I, I0)
        np.testing.assert_array_equal(S, S0)  # the same bits: one computation per pair
        assert dense_rows(caplog) == 0  # decided from the candidates alone
        # and against the O(N²) reference, up to float32 rounding
        ref = exact_from_features(q, db, k1, k2, lam)
        np.testing.assert_allclose(S, F32(1) - np.take_along_axis(ref, I, 1), atol=1e-5, rtol=0)
        kth = np.sort(ref, axis=1)[:, topk - 1]
        assert np.all(F32(1) - S <= kth[:, None] + 1e-5)  # every kept row is within the reference's top-k


def test_sparse_final_with_ties_and_small_index(caplog):
    caplog.set_level("INFO", logger=kr.__name__)
    rng = np.random.default_rng(12)
    q, db = clustered(rng, 6), clustered(rng, 120)
    db[40:100] = db[7]  # 61 equal rows: exactly tied similarities across the shortlist's end
    q[2] = db[7]
    S, I = k_reciprocal_rerank(q, db, 6, 3, 0.3, topk=20)
    S0, I0 = dense_top(q, db, 6, 3, 0.3, 20)
    np.testing.assert_array_equal(I, I0)
    np.testing.assert_array_equal(S, S0)
    assert dense_rows(caplog) >= 1  # the tie at the end of the shortlist: that row was computed in full
    # tied rows come by lower row
    row = I[2][np.isin(I[2], np.r_[7, 40:100])]
    assert np.all(np.diff(row) > 0)
    # Ng < topk: every index row, in order
    S1, I1 = k_reciprocal_rerank(q, db[:30], 6, 3, 0.3, topk=100)
    S2, I2 = dense_top(q, db[:30], 6, 3, 0.3, 30)
    assert I1.shape == (6, 30)
    np.testing.assert_array_equal(I1, I2)
    np.testing.assert_array_equal(S1, S2)
    # λ = 0: outside the support every row has final 1, so lower rows win: computed in full
    S3, I3 = k_reciprocal_rerank(q, db, 6, 1, 0.0, topk=20)
    S4, I4 = dense_top(q, db, 6, 1, 0.0, 20)
    np.testing.assert_array_equal(I3, I4)
    np.testing.assert_array_equal(S3, S4)
    assert dense_rows(caplog) == len(q)


def test_sparse_final_takes_a_precomputed_shortlist():
    rng = np.random.default_rng(13)
    q, db = clustered(rng, 8), clustered(rng, 200)
    S0, I0 = k_reciprocal_rerank(q, db, 10, 3, 0.3, topk=15)
    for k in (15, 40, 200):  # k = topk: fewer candidates, more rows in full, the same result
        got = k_reciprocal_rerank(q, db, 10, 3, 0.3, topk=15, shortlist=knn(q, db, k, backend="numpy"))
        np.testing.assert_array_equal(got[1], I0)
        np.testing.assert_array_equal(got[0], S0)
    with pytest.raises(ValueError, match="shortlist has 14 columns"):
        k_reciprocal_rerank(q, db, 10, 3, 0.3, topk=15, shortlist=knn(q, db, 14))
    with pytest.raises(ValueError, match="shortlist"):
        k_reciprocal_rerank(q, db, 10, 3, 0.3, topk=15, shortlist=knn(q[1:], db, 20))


# --------------------------------------------------------------------------- approximate search
def test_approximate_index_reaches_the_joint_graph_and_generous_settings_equal_exact(monkeypatch):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(14)
    q, db = clustered(rng, 12), clustered(rng, 400)
    exact = k_reciprocal_rerank(q, db, 10, 3, 0.3, topk=20)
    seen = []
    real_knn = kr.knn

    def spy(*args, **kw):
        seen.append((len(args[1]), kw.get("index"), kw.get("with_min", False)))
        return real_knn(*args, **kw)

    monkeypatch.setattr(kr, "knn", spy)
    for spec in (IndexSpec("ivf", nlist=8, nprobe=8), IndexSpec("hnsw", M=16, ef=400)):
        seen.clear()
        S, I = k_reciprocal_rerank(q, db, 10, 3, 0.3, topk=20, index=spec)
        # the joint graph (with its min similarity) through the index, the final search exact
        assert seen == [(len(q) + len(db), spec, True), (len(db), None, False)]
        np.testing.assert_array_equal(I, exact[1])
        np.testing.assert_allclose(S, exact[0], atol=1e-5, rtol=0)
        d = k_reciprocal_dist(q, db, 10, 3, 0.3, index=spec)
        np.testing.assert_allclose(d, k_reciprocal_dist(q, db, 10, 3, 0.3), atol=1e-5, rtol=0)
    # a stingy IVF really is another search: its joint graph differs from the exact one
    x = np.concatenate([q, db])
    _, Ia, _ = joint_graph(x, 11, index=IndexSpec("ivf", nlist=32, nprobe=1))
    _, Ie, _ = joint_graph(x, 11)
    assert (Ia != Ie).any()


def test_missing_neighbours_of_an_approximate_graph_count_as_the_row_itself(caplog):
    rng = np.random.default_rng(15)
    q, db = clustered(rng, 5), clustered(rng, 60)
    S, I, smin = joint_graph(np.concatenate([q, db]), 8)
    I[3, 5:] = -1
    S[3, 5:] = -np.inf
    got = k_reciprocal_rerank(q, db, 6, 2, 0.3, topk=10, graph=(S, I, smin))
    assert got[1].shape == (5, 10) and "missing" in caplog.text
    I[3, 5] = -2
    with pytest.raises(ValueError, match="outside"):
        k_reciprocal_rerank(q, db, 6, 2, 0.3, topk=10, graph=(S, I, smin))


def test_pair_dots_give_the_same_bits_by_runs_and_by_gathers(monkeypatch):
    rng = np.random.default_rng(3)
    q, db = clustered(rng, 30), clustered(rng, 300)
    x = np.concatenate([q, db])
    rows = np.sort(rng.integers(0, 330, 5000))  # long runs of one row: multiplied by runs
    cols = rng.integers(0, 330, 5000)
    want = np.sum(x[rows] * x[cols], axis=1)
    np.testing.assert_array_equal(kr._pair_dots(q, db, rows, cols), want)
    monkeypatch.setattr(kr, "RUN_PAIRS", 10**9)  # every row gathered
    np.testing.assert_array_equal(kr._pair_dots(q, db, rows, cols), want)
    np.testing.assert_array_equal(kr._pair_dots(q, db, cols, rows), np.sum(x[cols] * x[rows], axis=1))
