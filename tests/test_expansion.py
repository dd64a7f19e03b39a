"""αQE / DBA (both conventions of GLDV2_SPEC §5), ensemble combination and whitening,
against hand-computed tiny cases."""

import numpy as np
import pytest

from glr.postprocess.expansion import alpha_dba, alpha_qe, combine_embeddings, fit_whitening, qe_dba_joint
from glr.arrays import l2_normalize
from glr.search import knn

# Three unit vectors in 2-D: sims  row0 [1, .6, 0], row1 [.6, 1, .8], row2 [0, .8, 1]
Q = np.array([[1.0, 0.0]], np.float32)
DB = np.array([[0.6, 0.8], [0.0, 1.0]], np.float32)


def unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def test_joint_qe_dba_hand_computed_alpha1():
    q2, db2 = qe_dba_joint(Q, DB, k=2, alpha=1.0, qe=True, dba=True, backend="numpy")
    # query: itself (1) + db0 (.6):  [1,0] + .6*[.6,.8] = [1.36, .48]
    np.testing.assert_allclose(q2[0], unit([1.36, 0.48]), atol=1e-6)
    # db0: itself + db1 (.8):  [.6,.8] + .8*[0,1] = [.6, 1.6]
    np.testing.assert_allclose(db2[0], unit([0.6, 1.6]), atol=1e-6)
    # db1: itself + db0 (.8):  [0,1] + .8*[.6,.8] = [.48, 1.64]
    np.testing.assert_allclose(db2[1], unit([0.48, 1.64]), atol=1e-6)


def test_joint_alpha3_and_sides():
    q2, db2 = qe_dba_joint(Q, DB, k=2, alpha=3.0, qe=True, dba=False, backend="numpy")
    np.testing.assert_allclose(q2[0], unit([1 + 0.216 * 0.6, 0.216 * 0.8]), atol=1e-6)
    np.testing.assert_array_equal(db2, DB)  # dba=False leaves the database alone
    q3, db3 = qe_dba_joint(Q, DB, k=2, alpha=3.0, qe=False, dba=True, backend="numpy")
    np.testing.assert_array_equal(q3, Q)
    np.testing.assert_allclose(db3[0], unit([0.6, 0.8 + 0.512]), atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        qe_dba_joint(Q, DB, qe=False, dba=False)


def test_joint_form_lets_queries_see_each_other_classic_does_not():
    q = np.array([[1.0, 0.0], [0.8, 0.6]], np.float32)
    db = np.array([[0.0, 1.0]], np.float32)
    q2, _ = qe_dba_joint(q, db, k=2, alpha=1.0, backend="numpy")
    # query 0's 2nd neighbour in A is query 1 (.8), not db0 (0)
    np.testing.assert_allclose(q2[0], unit([1 + 0.8 * 0.8, 0.8 * 0.6]), atol=1e-6)
    q3 = alpha_qe(q, db, n=1, alpha=1.0, backend="numpy")
    # classic: query 0 only sees db0, with sim 0 -> weight 0 -> unchanged
    np.testing.assert_allclose(q3[0], [1.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(q3[1], unit([0.8, 0.6 + 0.6]), atol=1e-6)


def test_classic_equals_joint_with_k_plus_one_when_no_query_neighbours():
    rng = np.random.default_rng(0)
    db = l2_normalize(rng.normal(size=(40, 8)))
    q = l2_normalize(rng.normal(size=(1, 8)))
    for n, alpha in [(1, 3.0), (4, 1.0)]:
        np.testing.assert_allclose(alpha_qe(q, db, n=n, alpha=alpha, backend="numpy"),
                                   qe_dba_joint(q, db, k=n + 1, alpha=alpha, backend="numpy")[0], atol=1e-5)
        # DBA: joint with queries absent == classic (the row itself is the best neighbour)
        empty = np.zeros((0, 8), np.float32)
        np.testing.assert_allclose(alpha_dba(db, n=n, alpha=alpha, backend="numpy"),
                                   qe_dba_joint(empty, db, k=n + 1, alpha=alpha, qe=False, dba=True,
                                                backend="numpy")[1], atol=1e-5)


def test_classic_dba_hand_computed_and_self_removed_by_index():
    db2 = alpha_dba(np.concatenate([Q, DB]), n=1, alpha=1.0, backend="numpy")
    np.testing.assert_allclose(db2[0], unit([1.36, 0.48]), atol=1e-6)  # row0 + .6 row1
    np.testing.assert_allclose(db2[2], unit([0.48, 1.64]), atol=1e-6)  # row2 + .8 row1
    # a graph where ties put another row before the row itself: self still removed by index
    db = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)
    S = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0]], np.float32)
    I = np.array([[1, 0, 2], [0, 1, 2], [2, 0, 1]], np.int64)
    out = alpha_dba(db, n=1, alpha=1.0, graph=(S, I))
    np.testing.assert_allclose(out[0], [1, 0], atol=1e-7)
    np.testing.assert_allclose(out[2], [0, 1], atol=1e-7)  # 2 + 0*row0


def test_negative_similarity_gets_zero_weight():
    q = np.array([[1.0, 0.0]], np.float32)
    db = np.array([[-0.6, 0.8]], np.float32)
    out = alpha_qe(q, db, n=1, alpha=3.0, backend="numpy")  # reference: weight (-.6)^3 = -.216
    np.testing.assert_allclose(out[0], [1.0, 0.0], atol=1e-7)
    out = alpha_qe(q, db, n=1, alpha=2.5, backend="numpy")  # reference: NaN
    assert np.isfinite(out).all()


def test_graph_argument_is_used_and_checked():
    A = np.concatenate([Q, DB])
    S, I = knn(A, A, 3, backend="numpy")
    a = qe_dba_joint(Q, DB, k=2, alpha=3.0, dba=True, graph=(S, I))
    b = qe_dba_joint(Q, DB, k=2, alpha=3.0, dba=True, backend="numpy")
    np.testing.assert_allclose(a[0], b[0]), np.testing.assert_allclose(a[1], b[1])
    with pytest.raises(ValueError, match="neighbours per row"):
        qe_dba_joint(Q, DB, k=3, graph=(S[:, :2], I[:, :2]))
    with pytest.raises(ValueError, match="must both be"):
        alpha_qe(Q, DB, n=1, graph=(S, I))  # 3 rows, 1 query


def test_combine_concat_and_sum():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 4)), rng.normal(size=(5, 3))
    ca, cb = l2_normalize(a) @ l2_normalize(a).T, l2_normalize(b) @ l2_normalize(b).T
    c = combine_embeddings([a, b], [1.0, 2.0], mode="concat")
    np.testing.assert_allclose(c @ c.T, (1 * ca + 4 * cb) / 5, atol=1e-6)
    s = combine_embeddings([a, b], [1.0, 2.0], mode="sum")
    np.testing.assert_allclose(s @ s.T, (1 * ca + 2 * cb) / 3, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1, atol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        combine_embeddings([a, b[:4]])
    with pytest.raises(ValueError, match="weights"):
        combine_embeddings([a, b], [1.0])
    with pytest.raises(ValueError, match="mode"):
        combine_embeddings([a], mode="max")


def test_whitening_decorrelates_fit_data():
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))).astype(np.float32) + 3
    w = fit_whitening(x)
    z = (x - w.mean) @ w.proj
    np.testing.assert_allclose(np.cov(z.T), np.eye(6), atol=1e-2)
    out = w(x)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)
    assert fit_whitening(x, dim=3)(x).shape == (500, 3)
    with pytest.raises(ValueError, match="fitted on 6-d"):
        w(x[:, :5])
