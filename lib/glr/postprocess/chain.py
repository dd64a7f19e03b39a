"""The post-processing chain as one configurable function, and the kNN-graph cache it shares.

A post-processing configuration is a plain dict (YAML in files), one key per step, in the
order the steps run; a step that is absent, ``null`` or ``false`` is off::

    whitening:        {dim: null, shrinkage: 0.0}            # PCA whitening fitted on the index
    expansion:        {form: joint, k: 3, alpha: 3.0, qe: true, dba: true}
                      # or {form: classic, qe_n: 2, dba_n: 10, alpha: 3.0}
    kreciprocal:      {k1: 20, k2: 6, lambda: 0.3}
    landmark_country: {alpha: 1.0, beta: 0.1, k: 3}           # needs train embeddings + labels
    train_label:      {insert: false, k: 5}                   # needs train embeddings + labels
    nonlandmark:      {weight: 1.0, k: 5}                     # needs distractor embeddings
    spatial:          {top_n: 20, max_inliers: 70, time_budget_s: 2.0, detector: sift, max_side: 512}
    shortlist: 1000   # candidates kept for the re-rankers after the kNN / k-reciprocal stage
    k: 100            # results per query returned

Images are tagged through their train-set neighbours with the *original* descriptors (the
train graphs do not depend on the expansion settings, so a sweep searches them once).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from glr.postprocess import labels
from glr.postprocess.cache import GraphCache
from glr.postprocess.config import RERANKERS, STEP_NEEDS, normalize_config
from glr.postprocess.expansion import alpha_dba, alpha_qe, fit_whitening, qe_dba_joint
from glr.postprocess.kreciprocal import k_reciprocal_rerank
from glr.postprocess.labels import encode_labels
from glr.postprocess.spatial import spatial_rerank
from glr.submission import recognition_predictions
from glr.utils import InputError

log = logging.getLogger(__name__)

@dataclass
class Context:
    """What the re-ranking steps may need besides the query and index descriptors.

    All optional; a step that needs a missing piece raises :class:`InputError` naming it.
    ``train`` (Ntr, D) descriptors of the train set (same model as q/db),
    ``train_landmarks`` (Ntr,) int64 landmark ids, ``train_countries`` (Ntr,) int64 codes
    (-1 unknown; see :func:`glr.postprocess.labels.encode_labels`), ``distractors``
    (Nd, D) out-of-domain descriptors, ``q_paths`` / ``db_paths`` the image files of the
    query and index rows (spatial verification).
    """

    train: np.ndarray | None = None
    train_landmarks: np.ndarray | None = None
    train_countries: np.ndarray | None = None
    distractors: np.ndarray | None = None
    q_paths: Sequence[str] | None = None
    db_paths: Sequence[str] | None = None


def train_context(train: np.ndarray, landmarks: Sequence[int], countries: Mapping[int, str] | None) -> Context:
    """A :class:`Context` holding the train set: (Ntr, D) descriptors, their landmark ids and,
    through ``countries`` (landmark → country, e.g. ``train_label_to_country.csv``; None if
    unknown), their country codes (-1 where unknown)."""

    lm = np.asarray([int(x) for x in landmarks], np.int64)
    table = countries or {}
    codes, _ = encode_labels([table.get(int(x)) for x in lm])
    return Context(train=train, train_landmarks=lm, train_countries=codes)


def _key(config: Mapping[str, Any], steps: Sequence[str], extra: Any = None) -> str:
    return json.dumps([{s: config.get(s) for s in steps}, extra], sort_keys=True, default=str)


def missing_inputs(ctx: Context, step: str) -> list[str]:
    """The :class:`Context` fields ``step`` needs that ``ctx`` lacks."""
    return [n for n in STEP_NEEDS.get(step, ()) if getattr(ctx, n) is None]


def _need(ctx: Context, step: str) -> None:
    missing = missing_inputs(ctx, step)
    if missing:
        raise InputError(f"post-processing step {step!r} needs {', '.join(missing)} (not given)")


def expand_features(q: np.ndarray, db: np.ndarray, config: Mapping[str, Any],
                    cache: GraphCache) -> tuple[np.ndarray, np.ndarray]:
    """Whitening and αQE/DBA of ``config`` applied to ``(q, db)``; memoised in ``cache.memo``."""

    key = "features" + _key(config, ("whitening", "expansion"), (cache._fp(q), cache._fp(db)))
    if key in cache.memo:
        return cache.memo[key]
    w = config.get("whitening")
    if w:
        white = fit_whitening(db, dim=w["dim"], shrinkage=w["shrinkage"])
        q, db = white(q), white(db)
    e = config.get("expansion")
    if e and e["form"] == "joint":
        A = np.concatenate([q, db])
        graph = cache.knn(A, A, e["k"])
        q, db = qe_dba_joint(q, db, k=e["k"], alpha=e["alpha"], qe=e["qe"], dba=e["dba"], graph=graph)
    elif e:
        if e["dba_n"] > 0:
            db = alpha_dba(db, n=e["dba_n"], alpha=e["alpha"], graph=cache.knn(db, db, e["dba_n"] + 1))
        if e["qe_n"] > 0:
            q = alpha_qe(q, db, n=e["qe_n"], alpha=e["alpha"], graph=cache.knn(q, db, e["qe_n"]))
    cache.memo[key] = (q, db)
    return q, db


def shortlist(q: np.ndarray, db: np.ndarray, config: Mapping[str, Any], cache: GraphCache,
              progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ranking after expansion and k-reciprocal re-ranking: ``(S, I)`` with
    ``config['shortlist']`` columns when a re-ranker follows, else ``config['k']``."""
    n = config["shortlist"] if any(config.get(s) for s in RERANKERS) else config["k"]
    n = max(n, config["k"])
    key = "shortlist" + _key(config, ("whitening", "expansion", "kreciprocal"), (cache._fp(q), cache._fp(db), n))
    if key in cache.memo:
        return cache.memo[key]
    q2, db2 = expand_features(q, db, config, cache)
    kr = config.get("kreciprocal")
    if kr:

        A = np.concatenate([q2, db2])
        graph = cache.joint(A, max(kr["k1"] + 1, kr["k2"]))  # the local expansion averages k2 rows
        S, I = k_reciprocal_rerank(q2, db2, k1=kr["k1"], k2=kr["k2"], lambda_value=kr["lambda"], topk=n,
                                   graph=graph, progress=progress)
    else:
        S, I = cache.knn(q2, db2, n)
    cache.memo[key] = (S, I)
    return S, I


def rerank(S: np.ndarray, I: np.ndarray, q: np.ndarray, db: np.ndarray, config: Mapping[str, Any],
           ctx: Context, cache: GraphCache, progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """The label, non-landmark and spatial re-rankers of ``config`` on the shortlist ``(S, I)``.

    ``q``, ``db`` are the original descriptors (the train-set tagging uses them).
    Returns the new ``(S, I)`` and an info dict (spatial verification statistics).
    """
    info: dict[str, Any] = {}
    if not any(config.get(s) for s in RERANKERS):
        return S, I, info

    lc, tl = config.get("landmark_country"), config.get("train_label")
    if lc or tl:
        _need(ctx, "landmark_country" if lc else "train_label")
        kq = max(lc["k"] if lc else 1, tl["k"] if tl else 1)
        Sq, Iq = cache.knn(q, ctx.train, kq)
        _, Idb = cache.knn(db, ctx.train, 1)
        countries = ctx.train_countries
        if countries is None:
            countries = np.full(len(ctx.train_landmarks), -1, np.int64)
        if lc:
            tags = labels.query_tags(Sq, Iq, ctx.train_landmarks, countries, k=lc["k"])
            db_lm, db_c = labels.index_tags(Idb, ctx.train_landmarks, countries)
            S, I = labels.landmark_country_rerank(S, I, tags, db_lm, db_c, alpha=lc["alpha"], beta=lc["beta"])
        if tl:

            q_lab, _ = recognition_predictions(Sq, Iq, ctx.train_landmarks, top_k=tl["k"])
            db_lab = np.asarray(ctx.train_landmarks, np.int64)[Idb[:, 0]]
            S, I = labels.train_label_rerank(S, I, q_lab, db_lab, q=q, db=db, insert=tl["insert"])
    nl = config.get("nonlandmark")
    if nl:
        _need(ctx, "nonlandmark")
        key = "nonlandmark" + json.dumps([cache._fp(db), cache._fp(ctx.distractors), nl["k"]])
        if key not in cache.memo:
            cache.memo[key] = labels.nonlandmark_scores(db, ctx.distractors, k=nl["k"])
        S, I = labels.nonlandmark_penalty(S, I, cache.memo[key], weight=nl["weight"])
    sp = config.get("spatial")
    if sp:

        _need(ctx, "spatial")
        S, I, info["spatial"] = spatial_rerank(ctx.q_paths, ctx.db_paths, S, I, top_n=sp["top_n"],
                                               max_inliers=sp["max_inliers"], time_budget_s=sp["time_budget_s"],
                                               detector=sp["detector"], max_side=sp["max_side"], progress=progress)
    return S, I, info


def retrieve(q: np.ndarray, db: np.ndarray, config: Mapping[str, Any] | None = None,
             ctx: Context | None = None, cache: GraphCache | None = None,
             progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Queries against the index through the whole post-processing chain of ``config``.

    Args:
        q: (Nq, D) query descriptors; db: (Ndb, D) index descriptors (L2-normalised).
        config: see the module docstring (``None``: plain kNN).
        ctx: train set, labels, distractors and image paths for the steps that need them.
        cache: graphs and intermediate results to reuse (a sweep passes one).

    Returns:
        ``S`` float32 (Nq, k') scores, higher is better (their scale depends on the last
        step), ``I`` int64 (Nq, k') index rows, best first, ``k' = min(k, Ndb)``, and an
        info dict with per-step seconds.
    """
    config = normalize_config(config)
    ctx = ctx or Context()
    cache = cache or GraphCache()
    t0 = time.perf_counter()
    S, I = shortlist(q, db, config, cache, progress=progress)
    t1 = time.perf_counter()
    S, I, info = rerank(S, I, q, db, config, ctx, cache, progress=progress)
    k = min(config["k"], I.shape[1])
    info["seconds"] = {"shortlist": t1 - t0, "rerank": time.perf_counter() - t1}
    return np.ascontiguousarray(S[:, :k]), np.ascontiguousarray(I[:, :k]), info
