"""Re-ranking through train-set neighbours: landmark–country tags, train-label sort/insert,
non-landmark penalty.

Three re-rankers of a shortlist ``(S, I)`` (``S`` float32 (Nq, K) scores, higher is better,
``I`` int64 (Nq, K) database rows, best first, -1 = padding). Labels are int64 arrays with
-1 = unknown: an unknown label never matches anything and never votes. Countries are int64
codes too (-1 unknown); :func:`encode_labels` turns country strings into codes.

* Landmark–country aware re-ranking (2nd place, Google Landmark Retrieval 2021, Zhang et al.,
  arXiv 2110.04294): :func:`query_tags` (Eq. 1) gives each query weighted landmark and
  country tags from its top-k train neighbours, :func:`index_tags` gives each index image the
  landmark and country of its top-1 train neighbour, :func:`landmark_country_rerank` (Eq. 2)
  adds ``α · L_q(landmark_x) + β · C_q(country_x)`` to every shortlist score and re-sorts.
* Train-label re-ranking (Ozaki & Yokoo, "Large-scale Landmark Retrieval/Recognition under a
  Noisy and Diverse Dataset", GLR 2019 1st place retrieval): :func:`train_label_rerank`
  moves the index images whose label equals the query's before the others (sort step) and
  optionally inserts the same-label images missing from the shortlist (insert step).
* Non-landmark penalty (distractors, as in the 3rd place 2021 recognition solution):
  :func:`nonlandmark_scores` measures how close each image is to a set of out-of-domain
  images, :func:`nonlandmark_penalty` subtracts it from the shortlist scores and re-sorts.

Everything is numpy, vectorised over queries, with O(Nq · K) memory (never Nq × Ndb). All
re-sorts are stable: entries whose new scores are equal keep their previous order; padding
(-1) entries always go last and keep their score.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from glr.postprocess.registry import Env, Option, register_step
from glr.search import IndexSpec, knn
from glr.submission import recognition_predictions

log = logging.getLogger(__name__)

#: Budget in elements for one block of work: the (queries, K) rows re-scored and re-sorted at
#: a time, the (queries, k, k) temporaries of :func:`query_tags` and the (queries, rows)
#: similarity blocks of the insert step of :func:`train_label_rerank`.
BLOCK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- validation
def _ranking(S: Any, I: Any, name: str = "S, I") -> tuple[np.ndarray, np.ndarray]:
    """``(S, I)`` as float32 / int64 (N, K) arrays of the same shape, checked."""
    S = np.asarray(S)
    I = np.asarray(I)
    if S.ndim != 2 or S.shape != I.shape:
        raise ValueError(f"{name} must be 2-D arrays of the same shape, got {S.shape} and {I.shape}")
    if I.size and not np.issubdtype(I.dtype, np.integer):
        raise ValueError(f"the row indices of {name} must be integers, got dtype {I.dtype}")
    if S.size and not (np.issubdtype(S.dtype, np.floating) or np.issubdtype(S.dtype, np.integer)):
        raise ValueError(f"the scores of {name} must be real numbers, got dtype {S.dtype}")
    S = S.astype(np.float32, copy=False)
    I = I.astype(np.int64, copy=False)
    if S.size and not np.isfinite(S).all():
        raise ValueError(f"the scores of {name} contain NaN or infinite values")
    if I.size and I.min() < -1:
        raise ValueError(f"the row indices of {name} must be >= 0 (or -1 for padding), got {int(I.min())}")
    return S, I


def _labels(x: Any, name: str, n: int | None = None) -> np.ndarray:
    """A 1-D int64 label array (negative values mean unknown), of length ``n`` when given."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integer labels, got shape {x.shape}")
    if x.size and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels (-1 = unknown), got dtype {x.dtype}")
    if n is not None and len(x) != n:
        raise ValueError(f"{name} must have {n} entries (one per row), got {len(x)}")
    return x.astype(np.int64)


def _check_refs(I: np.ndarray, n: int, what: str, name: str) -> None:
    if I.size and I.max() >= n:
        raise ValueError(f"{what} refers to row {int(I.max())} but {name} has {n} entries")


def _lookup(table: np.ndarray, I: np.ndarray) -> np.ndarray:
    """``table[I]`` with -1 where ``I`` is padding (-1) or ``table`` is empty."""
    if table.size == 0:
        return np.full(I.shape, -1, np.int64)
    return np.where(I >= 0, table[np.maximum(I, 0)], -1)


def _finite(v: Any, name: str) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {v!r}")
    if not math.isfinite(float(v)):
        raise ValueError(f"{name} must be finite, got {v!r}")
    return float(v)


def _positive_int(v: Any, name: str) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


def _row_blocks(nq: int, width: int) -> list[tuple[int, int]]:
    """Query-row blocks of about ``BLOCK_ELEMENTS`` entries (bounds the temporaries)."""
    step = max(1, BLOCK_ELEMENTS // max(1, width))
    return [(a, min(a + step, nq)) for a in range(0, nq, step)]


def _resort(S_new: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``(S_new, I)`` stably sorted by ``S_new`` descending, padding (-1) last."""
    key = np.where(I >= 0, S_new, np.float32(-np.inf))
    order = np.argsort(-key, axis=1, kind="stable")
    return np.take_along_axis(S_new, order, 1), np.take_along_axis(I, order, 1)


# --------------------------------------------------------------------------- encoding
def encode_labels(values: Sequence[str | None]) -> tuple[np.ndarray, list[str]]:
    """Integer codes for string labels (e.g. ISO country codes), -1 for missing ones.

    Args:
        values: N strings; ``None``, a float NaN (what pandas gives for an empty cell) and
            strings that are empty after stripping whitespace are missing. Other values are
            used through ``str(v).strip()``.

    Returns:
        ``codes`` int64 (N,) and ``vocabulary``: the sorted distinct strings, so that
        ``vocabulary[codes[i]] == values[i].strip()`` wherever ``codes[i] >= 0``.
    """
    keys: list[str | None] = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            keys.append(None)
            continue
        s = str(v).strip()
        keys.append(s if s else None)
    vocabulary = sorted({k for k in keys if k is not None})
    index = {s: i for i, s in enumerate(vocabulary)}
    codes = np.fromiter((-1 if k is None else index[k] for k in keys), np.int64, len(keys))
    return codes, vocabulary


# --------------------------------------------------------------------------- landmark–country
@dataclass
class QueryTags:
    """Weighted landmark and country tags of each query (Eq. 1 of arXiv 2110.04294).

    Each row lists the query's distinct tags by decreasing score (ties: the tag whose first
    neighbour ranks first), padded with label -1 and score 0.

    Attributes:
        landmarks: int64 (Nq, k) landmark ids, -1 = padding.
        landmark_scores: float32 (Nq, k) ``L_q(l)`` in [0, 1], 0 for padding.
        countries: int64 (Nq, k) country codes, -1 = padding.
        country_scores: float32 (Nq, k) ``C_q(c)`` in [0, 1], 0 for padding.
    """

    landmarks: np.ndarray
    landmark_scores: np.ndarray
    countries: np.ndarray
    country_scores: np.ndarray

    def __len__(self) -> int:
        return int(self.landmarks.shape[0])


def _tags(X: np.ndarray, w: np.ndarray, den: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct non-negative values of each row of ``X`` (Nq, t) with score Σ w / den,
    sorted by score descending (stable), padded to ``width`` columns with (-1, 0)."""
    nq, t = X.shape
    tags = np.full((nq, width), -1, np.int64)
    scores = np.zeros((nq, width), np.float32)
    if nq == 0 or t == 0:
        return tags, scores
    earlier = np.tri(t, t, -1, dtype=bool).T  # earlier[j, m]: m < j
    step = max(1, BLOCK_ELEMENTS // (t * t))
    for a in range(0, nq, step):
        x, ww, d = X[a : a + step], w[a : a + step], den[a : a + step]
        eq = x[:, :, None] == x[:, None, :]
        total = (eq * ww[:, None, :]).sum(axis=2)  # total[i, j]: weight of the value of column j
        first = ~(eq & earlier).any(axis=2)
        ok = first & (x >= 0) & (total > 0) & (d[:, None] > 0)
        score = np.where(ok, total / np.where(d > 0, d, 1.0)[:, None], 0.0)
        order = np.argsort(np.where(ok, -score, np.inf), axis=1, kind="stable")
        ok = np.take_along_axis(ok, order, 1)
        tags[a : a + step, :t] = np.where(ok, np.take_along_axis(x, order, 1), -1)[:, :width]
        scores[a : a + step, :t] = np.where(ok, np.take_along_axis(score, order, 1), 0.0)[:, :width]
    return tags, scores


def query_tags(
    S_train: np.ndarray,
    I_train: np.ndarray,
    train_landmarks: np.ndarray | Sequence[int],
    train_countries: np.ndarray | Sequence[int] | None,
    k: int = 3,
) -> QueryTags:
    """Landmark and country tags of each query from its top-k train neighbours (Eq. 1).

    With the query's first ``k`` train neighbours ``j`` and weights ``w_j = max(s_j, 0)``:
    ``L_q(l) = Σ_{j: landmark_j = l} w_j / Σ_j w_j`` and likewise ``C_q(c)`` for countries.

    Choices where the paper is silent:

    * similarities are clipped at 0 (``w_j = max(s_j, 0)``), like the αQE weights of
      :mod:`glr.postprocess.expansion`: this changes nothing when the neighbours'
      similarities are >= 0 (the practical case) and keeps every tag score in [0, 1];
    * guard: when ``Σ_j w_j = 0`` (every similarity <= 0, or no neighbour) the query gets no
      tag at all (every bonus of Eq. 2 is then 0);
    * a neighbour with an unknown landmark (or country) creates no tag for it but its weight
      still counts in the denominator (it is evidence for "something unlabelled");
    * padding neighbours (``I_train == -1``) are ignored entirely (not in the denominator);
    * when ``S_train`` has fewer than ``k`` columns (a train set smaller than ``k``) the
      available columns are used.

    Args:
        S_train: (Nq, >=k) query → train similarities, best first.
        I_train: (Nq, >=k) train rows, -1 = padding.
        train_landmarks: (Ntr,) int64 landmark id of each train image, -1 = unknown.
        train_countries: (Ntr,) int64 country code of each train image (-1 = unknown; see
            :func:`encode_labels`), or None: no country tags.
        k: neighbours used (the paper's default 3).

    Returns:
        :class:`QueryTags` with (Nq, k) arrays.

    Raises:
        ValueError: mismatched shapes, non-integer labels, k < 1, rows out of range.
    """
    S, I = _ranking(S_train, I_train, "S_train, I_train")
    k = _positive_int(k, "k")
    lm = _labels(train_landmarks, "train_landmarks")
    co = np.full(len(lm), -1, np.int64) if train_countries is None else _labels(
        train_countries, "train_countries", len(lm))
    _check_refs(I, len(lm), "I_train", "train_landmarks")
    t = min(k, I.shape[1])
    S, I = S[:, :t].astype(np.float64), I[:, :t]
    w = np.where(I >= 0, np.maximum(S, 0.0), 0.0)
    den = w.sum(axis=1)
    L, Ls = _tags(_lookup(lm, I), w, den, k)
    C, Cs = _tags(_lookup(co, I), w, den, k)
    log.info("query_tags: %d queries, k=%d: %d with a landmark tag, %d with a country tag",
             len(I), t, int((L[:, 0] >= 0).sum()), int((C[:, 0] >= 0).sum()))
    return QueryTags(L, Ls, C, Cs)


def index_tags(
    I_train: np.ndarray,
    train_landmarks: np.ndarray | Sequence[int],
    train_countries: np.ndarray | Sequence[int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Landmark and country of each index image: those of its top-1 train neighbour.

    Args:
        I_train: (Ndb, >=1) index → train neighbour rows, best first (only the first column
            is used), or (Ndb,) the top-1 rows; -1 = no neighbour.
        train_landmarks: (Ntr,) int64 landmark ids, -1 = unknown.
        train_countries: (Ntr,) int64 country codes, -1 = unknown; or None.

    Returns:
        ``landmarks`` int64 (Ndb,) and ``countries`` int64 (Ndb,), -1 = unknown.

    Raises:
        ValueError: bad shapes, non-integer labels or rows out of range.
    """
    I = np.asarray(I_train)
    if I.ndim == 2:
        if I.shape[1] < 1 and I.shape[0]:
            raise ValueError(f"I_train must have at least one column, got shape {I.shape}")
        I = I[:, 0] if I.shape[1] else np.zeros(0, np.int64)
    elif I.ndim != 1:
        raise ValueError(f"I_train must be (Ndb, k) or (Ndb,) train rows, got shape {I.shape}")
    if I.size and not np.issubdtype(I.dtype, np.integer):
        raise ValueError(f"I_train must hold integer rows, got dtype {I.dtype}")
    I = I.astype(np.int64)
    if I.size and I.min() < -1:
        raise ValueError(f"I_train rows must be >= 0 (or -1), got {int(I.min())}")
    lm = _labels(train_landmarks, "train_landmarks")
    co = np.full(len(lm), -1, np.int64) if train_countries is None else _labels(
        train_countries, "train_countries", len(lm))
    _check_refs(I, len(lm), "I_train", "train_landmarks")
    return _lookup(lm, I), _lookup(co, I)


def _check_tags(tags: QueryTags, nq: int) -> tuple[np.ndarray, ...]:
    arrays = []
    for name in ("landmarks", "landmark_scores", "countries", "country_scores"):
        a = np.asarray(getattr(tags, name))
        if a.ndim != 2 or a.shape[0] != nq:
            raise ValueError(f"tags.{name} must be a 2-D array with one row per query ({nq}), got {a.shape}")
        arrays.append(a)
    L, Ls, C, Cs = arrays
    if L.shape != Ls.shape or C.shape != Cs.shape:
        raise ValueError(f"tags: labels and scores must have the same shape, got landmarks {L.shape} / "
                         f"{Ls.shape} and countries {C.shape} / {Cs.shape}")
    for a, name in ((L, "landmarks"), (C, "countries")):
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"tags.{name} must hold integer labels, got dtype {a.dtype}")
    Ls, Cs = Ls.astype(np.float64), Cs.astype(np.float64)
    if not (np.isfinite(Ls).all() and np.isfinite(Cs).all()):
        raise ValueError("tags contain NaN or infinite scores")
    return L.astype(np.int64), Ls, C.astype(np.int64), Cs


def _tag_bonus(tag: np.ndarray, tag_score: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(Nq, K) score of the tag equal to ``x`` (Nq, K) in each query's tag list, 0 if none."""
    out = np.zeros(x.shape, np.float64)
    known = x >= 0
    for c in range(tag.shape[1]):
        hit = known & (x == tag[:, c : c + 1]) & (tag[:, c : c + 1] >= 0)
        out += np.where(hit, tag_score[:, c : c + 1], 0.0)
    return out


def landmark_country_rerank(
    S: np.ndarray,
    I: np.ndarray,
    tags: QueryTags,
    db_landmarks: np.ndarray | Sequence[int],
    db_countries: np.ndarray | Sequence[int] | None,
    alpha: float = 1.0,
    beta: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 2: ``score'(q, x) = score(q, x) + α · L_q(landmark_x) + β · C_q(country_x)``.

    ``L_q`` / ``C_q`` are 0 for a tag the query does not have and for an index image whose
    landmark / country is unknown (-1). Only the given shortlist is re-scored and re-sorted
    (stably: equal new scores keep the old order; padding stays last, unchanged), so an
    index image of the query's landmark can only move up from inside it: pass a longer
    shortlist than the one submitted (e.g. 1000 for a top-100 submission).

    Args:
        S: (Nq, K) float32 scores, best first.
        I: (Nq, K) int64 database rows, -1 = padding.
        tags: :func:`query_tags` of the same Nq queries.
        db_landmarks: (Ndb,) int64 landmark of each database row (:func:`index_tags`).
        db_countries: (Ndb,) int64 country code of each database row, or None (no country
            bonus).
        alpha: weight of the landmark tags (paper: 1.0).
        beta: weight of the country tags (paper: 0.1).

    Returns:
        ``(S', I')`` float32 / int64 (Nq, K), sorted by ``S'`` descending.

    Raises:
        ValueError: mismatched shapes, non-integer labels, rows out of range, non-finite
            weights.
    """
    S, I = _ranking(S, I)
    alpha, beta = _finite(alpha, "alpha"), _finite(beta, "beta")
    L, Ls, C, Cs = _check_tags(tags, S.shape[0])
    db_lm = _labels(db_landmarks, "db_landmarks")
    db_co = np.full(len(db_lm), -1, np.int64) if db_countries is None else _labels(
        db_countries, "db_countries", len(db_lm))
    _check_refs(I, len(db_lm), "I", "db_landmarks")
    S_out, I_out = np.empty_like(S), np.empty_like(I)
    boosted = 0
    for a, b in _row_blocks(*S.shape):
        Ib = I[a:b]
        bonus = (alpha * _tag_bonus(L[a:b], Ls[a:b], _lookup(db_lm, Ib))
                 + beta * _tag_bonus(C[a:b], Cs[a:b], _lookup(db_co, Ib)))
        S_new = np.where(Ib >= 0, S[a:b].astype(np.float64) + bonus, S[a:b]).astype(np.float32)
        boosted += int(np.count_nonzero((bonus != 0) & (Ib >= 0)))
        S_out[a:b], I_out[a:b] = _resort(S_new, Ib)
    log.info("landmark_country_rerank: %d queries x %d, alpha=%g beta=%g, %d entries boosted",
             S.shape[0], S.shape[1], alpha, beta, boosted)
    return S_out, I_out


# --------------------------------------------------------------------------- train labels
def _inverted_index(db_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label → database rows, from one stable argsort: ``rows[starts[u]:ends[u]]`` (ascending)
    are the rows of label ``uniq[u]``; unknown (negative) labels are left out."""
    order = np.argsort(db_labels, kind="stable")
    sorted_labels = db_labels[order]
    keep = sorted_labels >= 0
    order, sorted_labels = order[keep], sorted_labels[keep]
    uniq, starts = np.unique(sorted_labels, return_index=True)
    ends = np.append(starts[1:], len(order)).astype(np.int64)
    return order.astype(np.int64), uniq, np.column_stack([starts, ends]).astype(np.int64)


def _inserted(I: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray, q: np.ndarray,
              db: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per query, up to K database rows of the query's label that are not in its shortlist,
    by exact similarity ``q[i] @ db[rows]`` descending (ties: lower row first); -1 padded."""
    nq, K = I.shape
    ins_I = np.full((nq, K), -1, np.int64)
    ins_S = np.zeros((nq, K), np.float32)
    rows_all, uniq, bounds = _inverted_index(db_labels)
    if K == 0 or not len(uniq):
        return ins_I, ins_S, 0
    queries = np.flatnonzero(q_labels >= 0)
    u = np.searchsorted(uniq, q_labels[queries])
    found = (u < len(uniq)) & (uniq[np.minimum(u, len(uniq) - 1)] == q_labels[queries])
    queries, u = queries[found], u[found]
    by_label = np.argsort(u, kind="stable")
    queries, u = queries[by_label], u[by_label]
    group_starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]]) if len(u) else np.zeros(0, np.int64)
    group_ends = np.r_[group_starts[1:], len(u)].astype(np.int64)
    groups = 0
    for gs, ge in zip(group_starts, group_ends):
        a, b = bounds[u[gs]]
        rows = rows_all[a:b]  # ascending
        members = queries[gs:ge]
        step = max(1, BLOCK_ELEMENTS // max(1, len(rows)))
        groups += 1
        for c in range(0, len(members), step):
            qs = members[c : c + step]
            sims = q[qs] @ db[rows].T  # (g, |rows|) float32
            # Rows already in the shortlist are not candidates.
            sl = I[qs]
            p = np.minimum(np.searchsorted(rows, sl), len(rows) - 1)
            hit = (sl >= 0) & (rows[p] == sl)
            cand = np.ones(sims.shape, bool)
            gi = np.broadcast_to(np.arange(len(qs))[:, None], sl.shape)
            cand[gi[hit], p[hit]] = False
            key = np.where(cand, -sims, np.inf)
            m = min(K, len(rows))
            order = np.argsort(key, axis=1, kind="stable")[:, :m]  # ties: lower row first
            ok = np.take_along_axis(cand, order, 1)
            ins_I[qs, :m] = np.where(ok, rows[order], -1)
            ins_S[qs, :m] = np.where(ok, np.take_along_axis(sims, order, 1), 0.0)
    return ins_I, ins_S, groups


def _insert_descriptors(q: Any, db: Any, nq: int, ndb: int) -> tuple[np.ndarray, np.ndarray]:
    """``q`` (nq, D) and ``db`` (ndb, D) checked, as C-contiguous float32."""
    if q is None or db is None:
        raise ValueError("train_label_rerank(insert=True) needs the descriptors q and db")
    q, db = np.asarray(q), np.asarray(db)
    if q.ndim != 2 or db.ndim != 2 or q.shape[0] != nq or db.shape[0] != ndb or q.shape[1] != db.shape[1]:
        raise ValueError(f"q must be (Nq={nq}, D) and db (Ndb={ndb}, D) with the same D, "
                         f"got q {q.shape} and db {db.shape}")
    return np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(db, dtype=np.float32)


def _tiered(S: np.ndarray, I: np.ndarray, ins_S: np.ndarray, ins_I: np.ndarray, ql: np.ndarray, dl: np.ndarray,
            top: float) -> tuple[np.ndarray, np.ndarray, int, int]:
    """One block of queries of :func:`train_label_rerank`: ``(S', I', shortlist positives,
    inserted positives)``; ``top`` is the tier offset of the shortlist's positives in gaps."""
    K = S.shape[1]
    kn = ql >= 0
    valid = I >= 0
    pos = valid & kn[:, None] & (_lookup(dl, I) == ql[:, None])
    # Tiers: 0 shortlist positives, 1 inserted, 2 negatives, 3 padding (both parts).
    tier = np.concatenate([np.where(pos, 0, np.where(valid, 2, 3)), np.where(ins_I >= 0, 1, 3)], axis=1)
    tier[~kn] = 0  # unknown label: every entry in one tier, the stable sort is the identity
    order = np.argsort(tier, axis=1, kind="stable")[:, :K]
    tier = np.take_along_axis(tier, order, 1)
    I_new = np.take_along_axis(np.concatenate([I, ins_I], axis=1), order, 1)
    base = np.take_along_axis(np.concatenate([S, ins_S], axis=1), order, 1).astype(np.float64)
    kept = I_new >= 0
    hi = np.where(kept, base, -np.inf).max(axis=1, initial=-np.inf)
    lo = np.where(kept, base, np.inf).min(axis=1, initial=np.inf)
    gap = np.where(np.isfinite(hi), 1.0 + hi - lo, 1.0)[:, None]
    offset = np.select([tier == 0, tier == 1], [top * gap, gap], 0.0)
    offset[~kn] = 0.0
    return (base + offset).astype(np.float32), I_new, int(pos.sum()), int(np.count_nonzero(tier[kn] == 1))


def train_label_rerank(
    S: np.ndarray,
    I: np.ndarray,
    q_labels: np.ndarray | Sequence[int],
    db_labels: np.ndarray | Sequence[int],
    q: np.ndarray | None = None,
    db: np.ndarray | None = None,
    insert: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Train-label re-ranking of smlyaka (GLR 2019 1st place retrieval): sort and insert steps.

    For a query with a known label (>= 0), "positives" are the index rows whose label equals
    it (an unknown index label never does):

    * sort step: the shortlist's positives move before its negatives, each group keeping
      its order;
    * insert step (``insert=True``): the positives *not* in the shortlist come right after
      the shortlist's positives, by exact similarity ``q[i] @ db[rows]`` descending (ties:
      lower row first), then the negatives; the list is cut to the original length K.

    A query with an unknown label (-1) keeps its list and scores unchanged. Elsewhere padding
    (-1) goes last.

    Scores: each entry keeps a *base* score (its ``S``; the exact similarity for an inserted
    row) plus a tier offset, so that ``S'`` is sorted descending whatever the range of ``S``:
    with ``gap = 1 + max − min`` of the base scores of the returned row (padding aside),
    negatives get ``+0``, inserted positives ``+gap``, and the shortlist's positives ``+gap``
    (sort only) or ``+2·gap`` (insert). (For cosine scores in [0, 1] this is roughly "+1 for
    positives"; subtracting the offset gives the base score back.)

    Args:
        S: (Nq, K) float32 scores, best first.
        I: (Nq, K) int64 database rows, -1 = padding.
        q_labels: (Nq,) int64 label of each query (e.g. the kNN vote of
            :func:`glr.submission.recognition_predictions` over its train neighbours), -1
            unknown.
        db_labels: (Ndb,) int64 label of each database row (e.g. its top-1 train neighbour's),
            -1 unknown.
        q: (Nq, D) float32 query descriptors; needed only for ``insert``.
        db: (Ndb, D) float32 database descriptors; needed only for ``insert``.
        insert: also run the insert step.

    Returns:
        ``(S', I')`` float32 / int64 (Nq, K).

    Raises:
        ValueError: mismatched shapes, non-integer labels, rows out of range, ``insert``
            without ``q`` / ``db``.
    """
    S, I = _ranking(S, I)
    nq, K = S.shape
    ql = _labels(q_labels, "q_labels", nq)
    dl = _labels(db_labels, "db_labels")
    _check_refs(I, len(dl), "I", "db_labels")
    known = ql >= 0
    if insert:
        q, db = _insert_descriptors(q, db, nq, len(dl))
        ins_I, ins_S, groups = _inserted(I, ql, dl, q, db)
    else:
        ins_I, ins_S, groups = np.full((nq, 0), -1, np.int64), np.zeros((nq, 0), np.float32), 0

    S_out, I_out = np.empty_like(S), np.empty_like(I)
    n_pos = n_ins = 0
    top = 2.0 if insert else 1.0
    for a, b in _row_blocks(nq, K + ins_I.shape[1]):
        S_out[a:b], I_out[a:b], p, n = _tiered(S[a:b], I[a:b], ins_S[a:b], ins_I[a:b], ql[a:b], dl, top)
        n_pos += p
        n_ins += n
    log.info("train_label_rerank: %d queries x %d (%d with a label), %d shortlist positives moved up, "
             "%d positives inserted (%d label groups)", nq, K, int(known.sum()), n_pos, n_ins, groups)
    return S_out, I_out


# --------------------------------------------------------------------------- non-landmark
def nonlandmark_scores(
    x: np.ndarray,
    distractors: np.ndarray,
    k: int = 5,
    batch: int | None = None,
    backend: str = "auto",
    index: IndexSpec | None = None,
) -> np.ndarray:
    """How much each image looks like an out-of-domain (non-landmark) image.

    Args:
        x: (N, D) float32 L2-normalised descriptors (typically the index).
        distractors: (Nd, D) descriptors of non-landmark images (same model).
        k: number of nearest distractors averaged (clipped to Nd).
        batch: queries per chunk of the exact search (default: :func:`glr.search.knn`'s).
        backend: :func:`glr.search.knn` backend.
        index: how the distractors are searched (:class:`~glr.search.IndexSpec`; None: exactly).

    Returns:
        float32 (N,): the mean of each row's top-k inner products with the distractors.

    Raises:
        ValueError: bad shapes, dimensions, k, no distractors.
    """
    k = _positive_int(k, "k")
    d = np.asarray(distractors)
    if d.ndim != 2 or d.shape[0] == 0:
        raise ValueError(f"distractors must be a non-empty 2-D (Nd, D) array, got shape {d.shape}")
    Sd, _ = knn(x, d, k, backend=backend, query_batch=batch, index=index)
    out = Sd.astype(np.float64).mean(axis=1) if Sd.shape[1] else np.zeros(len(Sd))
    log.info("nonlandmark_scores: %d rows against %d distractors, k=%d", len(Sd), d.shape[0], Sd.shape[1])
    return out.astype(np.float32)


def nonlandmark_penalty(
    S: np.ndarray,
    I: np.ndarray,
    db_nonlandmark: np.ndarray | Sequence[float],
    weight: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``S' = S − weight · db_nonlandmark[I]``, re-sorted (stably; padding last, unchanged).

    Args:
        S: (Nq, K) float32 scores, best first.
        I: (Nq, K) int64 database rows, -1 = padding.
        db_nonlandmark: (Ndb,) float32 :func:`nonlandmark_scores` of the database rows.
        weight: penalty weight.

    Returns:
        ``(S', I')`` float32 / int64 (Nq, K), sorted by ``S'`` descending.

    Raises:
        ValueError: mismatched shapes, rows out of range, non-finite values.
    """
    S, I = _ranking(S, I)
    weight = _finite(weight, "weight")
    nl = np.asarray(db_nonlandmark)
    if nl.ndim != 1:
        raise ValueError(f"db_nonlandmark must be a 1-D (Ndb,) array, got shape {nl.shape}")
    if nl.size and not (np.issubdtype(nl.dtype, np.floating) or np.issubdtype(nl.dtype, np.integer)):
        raise ValueError(f"db_nonlandmark must hold real numbers, got dtype {nl.dtype}")
    nl = nl.astype(np.float64)
    if not np.isfinite(nl).all():
        raise ValueError("db_nonlandmark contains NaN or infinite values")
    _check_refs(I, len(nl), "I", "db_nonlandmark")
    S_out, I_out = np.empty_like(S), np.empty_like(I)
    for a, b in _row_blocks(*S.shape):
        Ib = I[a:b]
        pen = np.where(Ib >= 0, nl[np.maximum(Ib, 0)] if nl.size else 0.0, 0.0)
        S_out[a:b], I_out[a:b] = _resort((S[a:b].astype(np.float64) - weight * pen).astype(np.float32), Ib)
    log.info("nonlandmark_penalty: %d queries x %d, weight=%g", S.shape[0], S.shape[1], weight)
    return S_out, I_out


# --------------------------------------------------------------------------- the chain's steps
#: Steps that tag the queries through their train neighbours: they share one query → train graph.
TRAIN_TAGGERS = ("landmark_country", "train_label")


def _train_neighbours(env: Env) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(Sq, Iq)`` the queries' top train neighbours (as many as the train-tagging steps on
    need at most) and ``Idb`` (Ndb, 1) each index row's top-1 train neighbour."""
    kq = max(env.config[s]["k"] if env.config.get(s) else 1 for s in TRAIN_TAGGERS)
    index = env.index("train")  # approximate: one index over the train set serves both searches
    Sq, Iq = env.cache.knn(env.q, env.ctx.train, kq, index=index)
    _, Idb = env.cache.knn(env.db, env.ctx.train, 1, index=index)
    return Sq, Iq, Idb


def _prewarm_train(cands: list[dict[str, Any]], q: np.ndarray, db: np.ndarray, env: Env) -> None:
    if env.ctx.train is not None:
        env.cache.knn(q, env.ctx.train, max(c["k"] for c in cands), index=env.index("train"))


@register_step("landmark_country", kind="rerank", order=10, label="+ landmark–country",
               needs=("train", "train_landmarks"), prewarm=_prewarm_train,
               describe=lambda o: f"α={o['alpha']:g} β={o['beta']:g} k={o['k']}",
               options={"alpha": Option(1.0, float, help="weight of the landmark tag"),
                        "beta": Option(0.1, float, help="weight of the country tag"),
                        "k": Option(3, int, minimum=1, help="train neighbours that vote")})
def _landmark_country_step(S: np.ndarray, I: np.ndarray, opts: dict[str, Any], env: Env
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Landmark–country aware re-ranking (Eq. 2) with tags from the train neighbours."""
    Sq, Iq, Idb = _train_neighbours(env)
    ctx = env.ctx
    countries = ctx.train_countries
    if countries is None:
        countries = np.full(len(ctx.train_landmarks), -1, np.int64)
    tags = query_tags(Sq, Iq, ctx.train_landmarks, countries, k=opts["k"])
    db_lm, db_c = index_tags(Idb, ctx.train_landmarks, countries)
    return landmark_country_rerank(S, I, tags, db_lm, db_c, alpha=opts["alpha"], beta=opts["beta"])


@register_step("train_label", kind="rerank", order=20, label="+ train-label sort/insert",
               needs=("train", "train_landmarks"), prewarm=_prewarm_train,
               options={"insert": Option(False, bool, help="also insert same-label images missing from the list"),
                        "k": Option(5, int, minimum=1, help="train neighbours of the query's label vote")})
def _train_label_step(S: np.ndarray, I: np.ndarray, opts: dict[str, Any], env: Env) -> tuple[np.ndarray, np.ndarray]:
    """Train-label sort (and insert): same-label index images first."""
    Sq, Iq, Idb = _train_neighbours(env)
    q_lab, _ = recognition_predictions(Sq, Iq, env.ctx.train_landmarks, top_k=opts["k"])
    db_lab = np.asarray(env.ctx.train_landmarks, np.int64)[Idb[:, 0]]
    return train_label_rerank(S, I, q_lab, db_lab, q=env.q, db=env.db, insert=opts["insert"])


@register_step("nonlandmark", kind="rerank", order=30, label="+ non-landmark penalty", needs=("distractors",),
               options={"weight": Option(1.0, float, help="penalty weight"),
                        "k": Option(5, int, minimum=1, help="nearest distractors averaged")})
def _nonlandmark_step(S: np.ndarray, I: np.ndarray, opts: dict[str, Any], env: Env) -> tuple[np.ndarray, np.ndarray]:
    """Non-landmark penalty: scores minus the index rows' closeness to the distractors."""
    cache, d, index = env.cache, env.ctx.distractors, env.index("nonlandmark")
    key = "nonlandmark" + json.dumps([cache.fp(env.db), cache.fp(d), opts["k"], index and index.key()])
    if key not in cache.memo:  # the same for every setting of the weight
        cache.memo[key] = nonlandmark_scores(env.db, d, k=opts["k"], index=index)
    return nonlandmark_penalty(S, I, cache.memo[key], weight=opts["weight"])
