"""glr.postprocess.labels: landmark–country tags (Eq. 1, Eq. 2 of arXiv 2110.04294), smlyaka's
train-label sort/insert, non-landmark penalty; hand-worked cases, naive loops, input checks."""

from __future__ import annotations

import numpy as np
import pytest

from glr.postprocess import labels as L
from glr.postprocess.labels import (QueryTags, encode_labels, index_tags, landmark_country_rerank,
                                    nonlandmark_penalty, nonlandmark_scores, query_tags, train_label_rerank)

ATOL = 1e-6

# Train set: landmark and country of each train row (country codes via encode_labels).
TRAIN_LM = np.array([7, 7, 3, 9, 7, -1], np.int64)
TRAIN_CO_STR = ["FR", "FR", "IT", "ES", None, " IT "]
TRAIN_CO, VOCAB = encode_labels(TRAIN_CO_STR)
ES, FR, IT = 0, 1, 2


def f32(x):
    return np.array(x, np.float32)


def i64(x):
    return np.array(x, np.int64)


# --------------------------------------------------------------------------- encode_labels
def test_encode_labels():
    assert VOCAB == ["ES", "FR", "IT"]
    np.testing.assert_array_equal(TRAIN_CO, [FR, FR, IT, ES, -1, IT])
    codes, vocab = encode_labels(["b", "", None, "a", float("nan"), "  ", "b"])
    assert vocab == ["a", "b"] and codes.dtype == np.int64
    np.testing.assert_array_equal(codes, [1, -1, -1, 0, -1, -1, 1])
    codes, vocab = encode_labels([])
    assert vocab == [] and codes.shape == (0,) and codes.dtype == np.int64


# --------------------------------------------------------------------------- Eq. 1
def test_query_tags_worked_example():
    S = f32([
        [0.9, 0.6, 0.5, 0.4],   # q0: the brief's example (4th column ignored with k=3)
        [0.5, 0.3, 0.3, 0.0],   # q1: landmark 7 wins on score although 3 comes first
        [0.5, 0.3, 0.2, 0.0],   # q2: an unknown landmark / unknown country neighbour
        [0.8, 0.2, 0.0, 0.0],   # q3: padding neighbour
    ])
    I = i64([
        [0, 1, 2, 3],
        [2, 0, 1, 3],
        [5, 0, 3, 4],
        [4, 3, -1, -1],
    ])
    t = query_tags(S, I, TRAIN_LM, TRAIN_CO, k=3)
    assert isinstance(t, QueryTags) and len(t) == 4
    assert t.landmarks.dtype == np.int64 and t.landmark_scores.dtype == np.float32
    assert t.landmarks.shape == t.countries.shape == (4, 3)
    # q0: sims .9 (7, FR), .6 (7, FR), .5 (3, IT); sum 2.0
    #     L(7) = 1.5 / 2 = .75, L(3) = .5 / 2 = .25; C(FR) = .75, C(IT) = .25
    np.testing.assert_array_equal(t.landmarks[0], [7, 3, -1])
    np.testing.assert_allclose(t.landmark_scores[0], [0.75, 0.25, 0.0], atol=ATOL)
    np.testing.assert_array_equal(t.countries[0], [FR, IT, -1])
    np.testing.assert_allclose(t.country_scores[0], [0.75, 0.25, 0.0], atol=ATOL)
    # q1: .5 (3, IT), .3 (7, FR), .3 (7, FR); sum 1.1: L(7) = .6/1.1 first, L(3) = .5/1.1
    np.testing.assert_array_equal(t.landmarks[1], [7, 3, -1])
    np.testing.assert_allclose(t.landmark_scores[1], [0.6 / 1.1, 0.5 / 1.1, 0.0], atol=ATOL)
    np.testing.assert_array_equal(t.countries[1], [FR, IT, -1])
    np.testing.assert_allclose(t.country_scores[1], [0.6 / 1.1, 0.5 / 1.1, 0.0], atol=ATOL)
    # q2: .5 (landmark -1, IT), .3 (7, FR), .2 (9, ES); sum 1.0 (the unknown counts below the line)
    #     L(7) = .3, L(9) = .2 (no tag for -1); C(IT) = .5, C(FR) = .3, C(ES) = .2
    np.testing.assert_array_equal(t.landmarks[2], [7, 9, -1])
    np.testing.assert_allclose(t.landmark_scores[2], [0.3, 0.2, 0.0], atol=ATOL)
    np.testing.assert_array_equal(t.countries[2], [IT, FR, ES])
    np.testing.assert_allclose(t.country_scores[2], [0.5, 0.3, 0.2], atol=ATOL)
    # q3: .8 (7, country unknown), .2 (9, ES), padding; sum 1.0 (padding not counted)
    np.testing.assert_array_equal(t.landmarks[3], [7, 9, -1])
    np.testing.assert_allclose(t.landmark_scores[3], [0.8, 0.2, 0.0], atol=ATOL)
    np.testing.assert_array_equal(t.countries[3], [ES, -1, -1])
    np.testing.assert_allclose(t.country_scores[3], [0.2, 0.0, 0.0], atol=ATOL)


def test_query_tags_guard_and_clipping():
    S = f32([[-0.1, -0.2, -0.3], [0.4, -0.2, -0.3], [0.0, 0.0, 0.0]])
    I = i64([[0, 2, 3], [0, 2, 3], [0, 2, 3]])
    t = query_tags(S, I, TRAIN_LM, TRAIN_CO, k=3)
    # q0: every similarity <= 0 -> Σ max(s, 0) = 0 -> no tag at all
    np.testing.assert_array_equal(t.landmarks[0], [-1, -1, -1])
    np.testing.assert_array_equal(t.landmark_scores[0], [0, 0, 0])
    np.testing.assert_array_equal(t.countries[0], [-1, -1, -1])
    # q1: weights max(s, 0) = .4, 0, 0 -> L(7) = 1, no tag for 3 or 9 (weight 0)
    np.testing.assert_array_equal(t.landmarks[1], [7, -1, -1])
    np.testing.assert_allclose(t.landmark_scores[1], [1.0, 0, 0], atol=ATOL)
    np.testing.assert_array_equal(t.countries[1], [FR, -1, -1])
    # q2: all zero -> no tags either
    np.testing.assert_array_equal(t.landmarks[2], [-1, -1, -1])


def test_query_tags_k_and_narrow_input():
    S, I = f32([[0.9, 0.6, 0.5]]), i64([[0, 1, 2]])
    t1 = query_tags(S, I, TRAIN_LM, TRAIN_CO, k=1)
    np.testing.assert_array_equal(t1.landmarks, [[7]])
    np.testing.assert_allclose(t1.landmark_scores, [[1.0]])
    # fewer columns than k (train set smaller than k): the available ones, output still k wide
    t5 = query_tags(S, I, TRAIN_LM, None, k=5)
    assert t5.landmarks.shape == (1, 5)
    np.testing.assert_array_equal(t5.landmarks[0], [7, 3, -1, -1, -1])
    np.testing.assert_array_equal(t5.countries, np.full((1, 5), -1))  # None: no country tags
    t0 = query_tags(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), TRAIN_LM, TRAIN_CO)
    assert t0.landmarks.shape == (0, 3)


def test_index_tags():
    lm, co = index_tags(i64([[2, 0], [4, 1], [-1, -1], [5, 0]]), TRAIN_LM, TRAIN_CO)
    np.testing.assert_array_equal(lm, [3, 7, -1, -1])
    np.testing.assert_array_equal(co, [IT, -1, -1, IT])
    lm1, co1 = index_tags(i64([2, 4]), TRAIN_LM, None)
    np.testing.assert_array_equal(lm1, [3, 7])
    np.testing.assert_array_equal(co1, [-1, -1])


# --------------------------------------------------------------------------- Eq. 2
# Index rows:        0    1    2    3    4
DB_LM = i64([5, 7, 3, -1, 8])
DB_CO = i64([IT, FR, IT, FR, -1])


def _q0_tags():
    # q0 of the worked example: L(7) = .75, L(3) = .25, C(FR) = .75, C(IT) = .25
    return query_tags(f32([[0.9, 0.6, 0.5]]), i64([[0, 1, 2]]), TRAIN_LM, TRAIN_CO)


def test_landmark_country_rerank_worked_example():
    S, I = f32([[0.80, 0.70, 0.60, 0.50]]), i64([[0, 1, 2, 3]])
    S2, I2 = landmark_country_rerank(S, I, _q0_tags(), DB_LM, DB_CO)  # default α = 1, β = .1
    # row 0 (5, IT): .80 + 0         + .1 * .25 = .825
    # row 1 (7, FR): .70 + 1 * .75   + .1 * .75 = 1.525
    # row 2 (3, IT): .60 + 1 * .25   + .1 * .25 = .875
    # row 3 (-1, FR): .50 + 0 (unknown landmark never matches the -1 padding tag) + .075 = .575
    assert S2.dtype == np.float32 and I2.dtype == np.int64
    np.testing.assert_array_equal(I2, [[1, 2, 0, 3]])
    np.testing.assert_allclose(S2, [[1.525, 0.875, 0.825, 0.575]], atol=ATOL)
    # α = 2, β = 0: row 1: .7 + 1.5 = 2.2, row 2: .6 + .5 = 1.1, row 0 .8, row 3 .5
    S3, I3 = landmark_country_rerank(S, I, _q0_tags(), DB_LM, DB_CO, alpha=2.0, beta=0.0)
    np.testing.assert_array_equal(I3, [[1, 2, 0, 3]])
    np.testing.assert_allclose(S3, [[2.2, 1.1, 0.8, 0.5]], atol=ATOL)


def test_beta_flips_an_order():
    S, I = f32([[0.55, 0.50]]), i64([[4, 3]])
    # row 4 (8, unknown country): .55 + 0 = .55;  row 3 (-1, FR): .50 + .1 * .75 = .575
    S2, I2 = landmark_country_rerank(S, I, _q0_tags(), DB_LM, DB_CO, alpha=1.0, beta=0.1)
    np.testing.assert_array_equal(I2, [[3, 4]])
    np.testing.assert_allclose(S2, [[0.575, 0.55]], atol=ATOL)
    S3, I3 = landmark_country_rerank(S, I, _q0_tags(), DB_LM, DB_CO, alpha=1.0, beta=0.0)
    np.testing.assert_array_equal(I3, [[4, 3]])
    np.testing.assert_allclose(S3, S, atol=0)
    # no countries at all: same as β = 0
    S4, I4 = landmark_country_rerank(S, I, _q0_tags(), DB_LM, None)
    np.testing.assert_array_equal(I4, [[4, 3]])


def test_landmark_country_rerank_padding_and_ties():
    # padding stays last with its score; row 1: .3 + .75 + .075 = 1.125
    S2, I2 = landmark_country_rerank(f32([[0.0, 0.3, -5.0]]), i64([[-1, 1, -1]]), _q0_tags(), DB_LM, DB_CO)
    np.testing.assert_array_equal(I2, [[1, -1, -1]])
    np.testing.assert_allclose(S2, [[1.125, 0.0, -5.0]], atol=ATOL)
    # ties keep the old order: .75 + 0 = .5 + .25 = .5 + .25 (exact in binary)
    tags = QueryTags(i64([[7]]), f32([[0.25]]), i64([[-1]]), f32([[0.0]]))
    S3, I3 = landmark_country_rerank(f32([[0.75, 0.5, 0.5]]), i64([[0, 1, 2]]), tags, i64([5, 7, 7]), None)
    np.testing.assert_array_equal(I3, [[0, 1, 2]])
    np.testing.assert_array_equal(S3, [[0.75, 0.75, 0.75]])
    S4, I4 = landmark_country_rerank(f32([[0.75, 0.5, 0.5]]), i64([[1, 0, 2]]), tags, i64([5, 7, 7]), None)
    np.testing.assert_array_equal(I4, [[1, 2, 0]])  # 1.0, .75 (row 2), .5 (row 0)


def test_landmark_country_matches_naive_loops(monkeypatch):
    monkeypatch.setattr(L, "BLOCK_ELEMENTS", 50)  # several row blocks
    rng = np.random.default_rng(1)
    ntr, ndb, nq, K, k = 60, 40, 25, 12, 4
    tr_lm = rng.integers(-1, 6, ntr)
    tr_co = rng.integers(-1, 3, ntr)
    St = np.sort(rng.uniform(-0.2, 1.0, (nq, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    It = rng.integers(-1, ntr, (nq, k))
    tags = query_tags(St, It, tr_lm, tr_co, k=k)
    db_lm, db_co = rng.integers(-1, 6, ndb), rng.integers(-1, 3, ndb)
    S = np.sort(rng.uniform(0, 1, (nq, K)).astype(np.float32), axis=1)[:, ::-1].copy()
    I = rng.integers(-1, ndb, (nq, K))
    S2, I2 = landmark_country_rerank(S, I, tags, db_lm, db_co, alpha=0.7, beta=0.3)
    for i in range(nq):
        w = [max(float(s), 0.0) if j >= 0 else 0.0 for s, j in zip(St[i], It[i])]
        den = sum(w)
        Lq, Cq = {}, {}
        for wj, j in zip(w, It[i]):
            if j >= 0 and den > 0 and wj > 0:
                if tr_lm[j] >= 0:
                    Lq[tr_lm[j]] = Lq.get(tr_lm[j], 0.0) + wj / den
                if tr_co[j] >= 0:
                    Cq[tr_co[j]] = Cq.get(tr_co[j], 0.0) + wj / den
        for lab, sc, d in ((tags.landmarks[i], tags.landmark_scores[i], Lq), (tags.countries[i], tags.country_scores[i], Cq)):
            got = {int(a): float(b) for a, b in zip(lab, sc) if a >= 0}
            assert got.keys() == d.keys()
            for key in d:
                assert got[key] == pytest.approx(d[key], abs=1e-6)
            assert np.all(np.diff(sc) <= 0)
        new = []
        for s, j in zip(S[i], I[i]):
            if j < 0:
                new.append(-np.inf)
                continue
            new.append(np.float32(s + 0.7 * Lq.get(db_lm[j], 0.0) * (db_lm[j] >= 0)
                                  + 0.3 * Cq.get(db_co[j], 0.0) * (db_co[j] >= 0)))
        order = np.argsort(-np.array(new), kind="stable")
        np.testing.assert_array_equal(I2[i], I[i][order])
        valid = I2[i] >= 0
        np.testing.assert_allclose(S2[i][valid], np.array(new)[order][valid], atol=1e-6)
        assert np.all(np.diff(S2[i][valid]) <= 0)


# --------------------------------------------------------------------------- smlyaka
#                a        b              c             d           e        f           g
DB_VEC = f32([[1, 0], [0.28, 0.96], [0.96, 0.28], [0.6, 0.8], [0, 1], [0.8, 0.6], [0.8, -0.6]])
DB_LAB = i64([2, 1, 0, 1, 1, 1, -1])
A, B, C, D, E, F, G = range(7)
Q_VEC = f32([[1, 0], [1, 0], [1, 0]])


def test_train_label_sort_step():
    S = f32([[0.9, 0.8, 0.7, 0.6]] * 3)
    I = i64([[A, B, C, D]] * 3)
    S2, I2 = train_label_rerank(S, I, i64([1, -1, 9]), DB_LAB)
    # q0 (label 1): positives b, d first, then a, c; gap = 1 + .9 - .6 = 1.3
    np.testing.assert_array_equal(I2[0], [B, D, A, C])
    np.testing.assert_allclose(S2[0], [0.8 + 1.3, 0.6 + 1.3, 0.9, 0.7], atol=ATOL)
    # q1 (unknown label) and q2 (label without any index image): unchanged
    np.testing.assert_array_equal(I2[1:], I[1:])
    np.testing.assert_array_equal(S2[1:], S[1:])


def test_train_label_insert_step():
    S = f32([[0.9, 0.8, 0.7, 0.6]] * 2)
    I = i64([[A, B, C, D]] * 2)
    S2, I2 = train_label_rerank(S, I, i64([1, -1]), DB_LAB, q=Q_VEC[:2], db=DB_VEC, insert=True)
    # q0: shortlist positives b, d; outside the list: e (sim 0) and f (sim .8) -> f, e;
    # [b, d, f, e, a, c] cut to 4; base scores of the kept entries .8, .6, .8, 0 ->
    # gap = 1 + .8 - 0 = 1.8: b .8 + 2 * 1.8, d .6 + 3.6, f .8 + 1.8, e 0 + 1.8
    np.testing.assert_array_equal(I2[0], [B, D, F, E])
    np.testing.assert_allclose(S2[0], [4.4, 4.2, 2.6, 1.8], atol=ATOL)
    np.testing.assert_array_equal(I2[1], I[1])  # unknown label: unchanged
    np.testing.assert_array_equal(S2[1], S[1])


def test_train_label_insert_longer_list_padding_and_cut():
    # K = 6 with g (unknown label) and padding: [b, d, f, e, a, c]; g and the padding fall off;
    # kept bases .8, .6, .8, 0, .9, .7 -> gap = 1 + .9 - 0 = 1.9
    S = f32([[0.9, 0.8, 0.7, 0.6, 0.5, 0.0]])
    I = i64([[A, B, C, D, G, -1]])
    S2, I2 = train_label_rerank(S, I, i64([1]), DB_LAB, q=Q_VEC[:1], db=DB_VEC, insert=True)
    np.testing.assert_array_equal(I2[0], [B, D, F, E, A, C])
    np.testing.assert_allclose(S2[0], [4.6, 4.4, 2.7, 1.9, 0.9, 0.7], atol=ATOL)
    # K = 2: b, then the best of d (.6), e (0), f (.8) by exact similarity: f
    S3, I3 = train_label_rerank(f32([[0.9, 0.8]]), i64([[A, B]]), i64([1]), DB_LAB, q=Q_VEC[:1], db=DB_VEC,
                                insert=True)
    np.testing.assert_array_equal(I3, [[B, F]])
    # kept bases .8 (b), .8 (f): gap = 1 + 0 = 1
    np.testing.assert_allclose(S3, [[0.8 + 2.0, 0.8 + 1.0]], atol=ATOL)
    # sort only with padding in the middle: padding goes last for a labelled query
    S4, I4 = train_label_rerank(f32([[0.9, 0.0, 0.6]]), i64([[A, -1, D]]), i64([1]), DB_LAB)
    np.testing.assert_array_equal(I4, [[D, A, -1]])
    np.testing.assert_allclose(S4, [[0.6 + 1.3, 0.9, 0.0]], atol=ATOL)


def _naive_train_label(S, I, ql, dl, q, db, insert):
    K = S.shape[1]
    outI, outS = [], []
    for i in range(len(S)):
        if ql[i] < 0:
            outI.append(list(I[i]))
            outS.append(list(S[i]))
            continue
        pos = [(s, j) for s, j in zip(S[i], I[i]) if j >= 0 and dl[j] == ql[i]]
        neg = [(s, j) for s, j in zip(S[i], I[i]) if j >= 0 and dl[j] != ql[i]]
        ins = []
        if insert:
            rows = [r for r in range(len(dl)) if dl[r] == ql[i] and r not in set(I[i].tolist())]
            sims = q[i] @ db[rows].T if rows else np.zeros(0)
            ins = sorted(zip(sims, rows), key=lambda t: (-t[0], t[1]))[:K]
        lst = [(s, j, 2) for s, j in pos] + [(s, j, 1) for s, j in ins] + [(s, j, 0) for s, j in neg]
        lst = (lst + [(s, -1, 0) for s, j in zip(S[i], I[i]) if j < 0])[:K]
        base = [s for s, j, _ in lst if j >= 0]
        gap = 1 + max(base) - min(base) if base else 1.0
        lst = [(s + (tier * gap if insert else min(tier, 1) * gap), j) for s, j, tier in lst]
        outI.append([j for _, j in lst])
        outS.append([s for s, _ in lst])
    return np.array(outS, np.float64), np.array(outI, np.int64)


@pytest.mark.parametrize("insert", [False, True])
def test_train_label_matches_naive_loops(insert, monkeypatch):
    monkeypatch.setattr(L, "BLOCK_ELEMENTS", 37)  # many small query blocks in the insert step
    rng = np.random.default_rng(2)
    nq, ndb, K, d = 30, 80, 10, 8
    q = rng.standard_normal((nq, d)).astype(np.float32)
    db = rng.standard_normal((ndb, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    dl = rng.integers(-1, 6, ndb)
    ql = rng.integers(-1, 7, nq)
    I = np.stack([rng.permutation(ndb)[:K] for _ in range(nq)])
    I[:3, -2:] = -1
    S = np.sort(rng.uniform(-0.5, 2.0, (nq, K)).astype(np.float32), axis=1)[:, ::-1].copy()
    S2, I2 = train_label_rerank(S, I, ql, dl, q=q, db=db, insert=insert)
    Sr, Ir = _naive_train_label(S, I, ql, dl, q, db, insert)
    np.testing.assert_array_equal(I2, Ir)
    np.testing.assert_allclose(S2, Sr, atol=1e-5)
    for i in range(nq):
        v = I2[i] >= 0
        assert np.all(np.diff(S2[i][v]) <= 0)  # sorted descending whatever the range of S


# --------------------------------------------------------------------------- non-landmark
def test_nonlandmark_penalty_by_hand():
    nl = f32([0.1, 0.5, 0.0, 0.2])
    S, I = f32([[0.9, 0.8, 0.7, 0.6]]), i64([[0, 1, 2, 3]])
    # weight 1: .8, .3, .7, .4 -> rows 0, 2, 3, 1
    S2, I2 = nonlandmark_penalty(S, I, nl)
    np.testing.assert_array_equal(I2, [[0, 2, 3, 1]])
    np.testing.assert_allclose(S2, [[0.8, 0.7, 0.4, 0.3]], atol=ATOL)
    # weight .5: .85, .55, .7, .5 -> rows 0, 2, 1, 3
    S3, I3 = nonlandmark_penalty(S, I, nl, weight=0.5)
    np.testing.assert_array_equal(I3, [[0, 2, 1, 3]])
    np.testing.assert_allclose(S3, [[0.85, 0.7, 0.55, 0.5]], atol=ATOL)
    # padding stays last and keeps its score; ties keep their order (.5 - 0 = .75 - .25)
    S4, I4 = nonlandmark_penalty(f32([[0.75, 0.5, 0.1]]), i64([[1, 0, -1]]), f32([0.0, 0.25]))
    np.testing.assert_array_equal(I4, [[1, 0, -1]])
    np.testing.assert_array_equal(S4, f32([[0.5, 0.5, 0.1]]))


def test_nonlandmark_scores():
    x = f32([[1, 0], [0, 1]])
    dis = f32([[1, 0], [0.6, 0.8], [0, 1]])
    # row 0: top-2 of (1, .6, 0) -> .8;  row 1: top-2 of (0, .8, 1) -> .9
    np.testing.assert_allclose(nonlandmark_scores(x, dis, k=2, backend="numpy"), [0.8, 0.9], atol=ATOL)
    # k larger than the number of distractors: the mean of all of them
    np.testing.assert_allclose(nonlandmark_scores(x, dis, k=10, backend="numpy"), [1.6 / 3, 1.8 / 3], atol=ATOL)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((23, 16)).astype(np.float32)
    dis = rng.standard_normal((41, 16)).astype(np.float32)
    got = nonlandmark_scores(x, dis, k=5, batch=4, backend="numpy")
    ref = -np.sort(-(x.astype(np.float64) @ dis.T.astype(np.float64)), axis=1)[:, :5].mean(axis=1)
    assert got.dtype == np.float32 and got.shape == (23,)
    np.testing.assert_allclose(got, ref, atol=1e-4)


# --------------------------------------------------------------------------- errors
def test_errors_on_bad_inputs():
    S, I = f32([[0.9, 0.8]]), i64([[0, 1]])
    tags = _q0_tags()
    with pytest.raises(ValueError, match="same shape"):
        query_tags(f32([[0.9, 0.8]]), i64([[0, 1, 2]]), TRAIN_LM, TRAIN_CO)
    with pytest.raises(ValueError, match="train_countries must have 6"):
        query_tags(S, I, TRAIN_LM, TRAIN_CO[:3])
    with pytest.raises(ValueError, match="refers to row 9"):
        query_tags(S, i64([[0, 9]]), TRAIN_LM, TRAIN_CO)
    with pytest.raises(ValueError, match="k must be"):
        query_tags(S, I, TRAIN_LM, TRAIN_CO, k=0)
    with pytest.raises(ValueError, match="integer labels"):
        query_tags(S, I, TRAIN_LM.astype(float), TRAIN_CO)
    with pytest.raises(ValueError, match="I_train"):
        index_tags(np.zeros((2, 2, 2), np.int64), TRAIN_LM, TRAIN_CO)
    with pytest.raises(ValueError, match="same shape"):
        landmark_country_rerank(S, i64([[0, 1, 2]]), tags, DB_LM, DB_CO)
    with pytest.raises(ValueError, match="one row per query"):
        landmark_country_rerank(f32([[0.9], [0.8]]), i64([[0], [1]]), tags, DB_LM, DB_CO)
    with pytest.raises(ValueError, match="db_countries must have 5"):
        landmark_country_rerank(S, I, tags, DB_LM, DB_CO[:2])
    with pytest.raises(ValueError, match="refers to row 7"):
        landmark_country_rerank(S, i64([[0, 7]]), tags, DB_LM, DB_CO)
    with pytest.raises(ValueError, match="NaN"):
        landmark_country_rerank(f32([[np.nan, 0.1]]), I, tags, DB_LM, DB_CO)
    with pytest.raises(ValueError, match="alpha"):
        landmark_country_rerank(S, I, tags, DB_LM, DB_CO, alpha=float("inf"))
    with pytest.raises(ValueError, match="q_labels must have 1"):
        train_label_rerank(S, I, i64([1, 2]), DB_LAB)
    with pytest.raises(ValueError, match="needs the descriptors"):
        train_label_rerank(S, I, i64([1]), DB_LAB, insert=True)
    with pytest.raises(ValueError, match="same D"):
        train_label_rerank(S, I, i64([1]), DB_LAB, q=f32([[1, 0, 0]]), db=DB_VEC, insert=True)
    with pytest.raises(ValueError, match=">= 0"):
        train_label_rerank(S, i64([[0, -2]]), i64([1]), DB_LAB)
    with pytest.raises(ValueError, match="same shape"):
        nonlandmark_penalty(S, i64([[0]]), f32([0.1, 0.2]))
    with pytest.raises(ValueError, match="refers to row 1"):
        nonlandmark_penalty(S, I, f32([0.1]))
    with pytest.raises(ValueError, match="1-D"):
        nonlandmark_penalty(S, I, f32([[0.1, 0.2]]))
    with pytest.raises(ValueError, match="non-empty"):
        nonlandmark_scores(f32([[1, 0]]), np.zeros((0, 2), np.float32))
    with pytest.raises(ValueError, match="same dimension"):
        nonlandmark_scores(f32([[1, 0]]), f32([[1, 0, 0]]), backend="numpy")
