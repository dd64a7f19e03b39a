"""The post-processing chain as one configurable function, over the step registry.

:func:`retrieve` runs a config (see :mod:`glr.postprocess.config`) in three stages, each an
iteration over the registered steps of one kind (:mod:`glr.postprocess.registry`), in chain
order: :func:`expand_features` (the ``features`` steps: whitening, αQE/DBA), :func:`shortlist`
(the kNN of the transformed descriptors, or the ``shortlist`` step that is on: k-reciprocal)
and :func:`rerank` (the ``rerank`` steps: landmark–country, train label, non-landmark,
spatial verification). Graphs and intermediate results go through a
:class:`~glr.postprocess.cache.GraphCache`, which a sweep shares between settings.

Images are tagged through their train-set neighbours with the *original* descriptors (the
train graphs do not depend on the expansion settings, so a sweep searches them once).

Each graph is searched as the config's ``search`` setting says (exact by default);
:func:`check_search` checks an approximate setting against the sizes of a run before any
search (:func:`retrieve` calls it; so can a caller that knows the sizes before embedding).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Mapping, Sequence

import numpy as np

from glr.postprocess.cache import GraphCache
from glr.postprocess.config import normalize_config
from glr.postprocess.labels import encode_labels
from glr.postprocess.registry import GRAPHS, Context, Env, get_step, graph_index, search_setting, steps
from glr.search import check_index_spec
from glr.utils import InputError

log = logging.getLogger(__name__)

__all__ = ["Context", "train_context", "missing_inputs", "check_search", "expand_features", "shortlist", "rerank",
           "retrieve"]


def train_context(train: np.ndarray, landmarks: Sequence[int], countries: Mapping[int, str] | None) -> Context:
    """A :class:`Context` holding the train set: (Ntr, D) descriptors, their landmark ids and,
    through ``countries`` (landmark → country, e.g. ``train_label_to_country.csv``; None if
    unknown), their country codes (-1 where unknown)."""

    lm = np.asarray([int(x) for x in landmarks], np.int64)
    table = countries or {}
    codes, _ = encode_labels([table.get(int(x)) for x in lm])
    return Context(train=train, train_landmarks=lm, train_countries=codes)


def _key(config: Mapping[str, Any], names: Sequence[str], extra: Any = None) -> str:
    return json.dumps([{s: config.get(s) for s in names}, extra], sort_keys=True, default=str)


def missing_inputs(ctx: Context, step: str) -> list[str]:
    """The :class:`Context` inputs ``step`` needs that ``ctx`` lacks."""
    return [n for n in get_step(step).needs if ctx.get(n) is None]


def _check_inputs(config: Mapping[str, Any], ctx: Context) -> None:
    for step in steps("rerank"):
        missing = missing_inputs(ctx, step.name) if config.get(step.name) else []
        if missing:
            raise InputError(f"post-processing step {step.name!r} needs {', '.join(missing)} (not given)")


def _graph_rows(config: Mapping[str, Any], n_q: int, n_db: int, n_train: int, n_distractors: int,
                recognition: bool) -> dict[str, list[int]]:
    """The database rows of every graph ``config`` searches (0 rows: not searched)."""
    e = config.get("expansion")
    expansion = [] if not e else [n_q + n_db] if e["form"] == "joint" else [n_db]
    shortlist_step = any(config.get(s.name) for s in steps("shortlist"))
    tagged = recognition or any(config.get(s) for s in ("landmark_country", "train_label"))
    return {"shortlist": [] if shortlist_step else [n_db], "expansion": expansion,
            # the joint graph of concat(q, db), then the final search of the queries against db
            "kreciprocal": [n_q + n_db, n_db] if config.get("kreciprocal") else [],
            "train": [n_train] if tagged else [], "nonlandmark": [n_distractors] if config.get("nonlandmark") else []}


def check_search(config: Mapping[str, Any], n_q: int, n_db: int, n_train: int = 0, n_distractors: int = 0, *,
                 recognition: bool = False, backend: str = "auto", use_gpu: bool | None = None,
                 source: str = "post-processing config") -> None:
    """Check the ``search`` setting of a normalised ``config`` against the sizes of a run, before
    any search: for each approximate graph the config searches, :func:`glr.search.check_index_spec`
    against its database's rows (the joint graphs' database is concat(q, db)).

    Args:
        n_q, n_db, n_train, n_distractors: rows of each side (upper bounds are fine before
            embedding: unreadable images only make them smaller, so this is checked again).
        recognition: the recognition vote searches queries → train too.

    Raises:
        InputError: ``nlist`` above a database's rows, ``nprobe > nlist``, HNSW on a GPU
            backend, approximate search without faiss; naming the setting and ``source``.
    """
    rows = _graph_rows(config, n_q, n_db, n_train, n_distractors, recognition)
    for graph in GRAPHS:
        spec = graph_index(config, graph)
        for n in rows[graph] if spec is not None else []:
            if n > 0:
                check_index_spec(spec, n, setting=search_setting(config, graph), source=source,
                                 backend=backend, use_gpu=use_gpu)


def _env(q: np.ndarray, db: np.ndarray, config: Mapping[str, Any], cache: GraphCache, ctx: Context | None = None,
         progress: bool = False) -> Env:
    return Env(q=q, db=db, ctx=ctx or Context(), cache=cache, config=config, progress=progress)


def expand_features(q: np.ndarray, db: np.ndarray, config: Mapping[str, Any],
                    cache: GraphCache) -> tuple[np.ndarray, np.ndarray]:
    """The ``features`` steps of ``config`` applied to ``(q, db)`` in chain order; memoised in ``cache.memo``."""
    feature_steps = steps("features")
    key = "features" + _key(config, [s.name for s in feature_steps], (cache.fp(q), cache.fp(db),
                                                                      config.get("search")))
    if key in cache.memo:
        return cache.memo[key]
    env = _env(q, db, config, cache)
    for step in feature_steps:
        if config.get(step.name):
            q, db = step.apply(q, db, config[step.name], env)
    cache.memo[key] = (q, db)
    return q, db


def shortlist(q: np.ndarray, db: np.ndarray, config: Mapping[str, Any], cache: GraphCache,
              progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ranking after the feature steps and the shortlist step: ``(S, I)`` with
    ``config['shortlist']`` columns when a re-ranker follows, else ``config['k']``."""
    n = config["shortlist"] if any(config.get(s.name) for s in steps("rerank")) else config["k"]
    n = max(n, config["k"])
    names = [s.name for s in steps("features") + steps("shortlist")]
    key = "shortlist" + _key(config, names, (cache.fp(q), cache.fp(db), n, config.get("search")))
    if key in cache.memo:
        return cache.memo[key]
    q2, db2 = expand_features(q, db, config, cache)
    on = [s for s in steps("shortlist") if config.get(s.name)]
    if on:
        S, I = on[0].apply(q2, db2, config[on[0].name], n, _env(q, db, config, cache, progress=progress))
    else:
        S, I = cache.knn(q2, db2, n, index=graph_index(config, "shortlist"))
    cache.memo[key] = (S, I)
    return S, I


def rerank(S: np.ndarray, I: np.ndarray, q: np.ndarray, db: np.ndarray, config: Mapping[str, Any],
           ctx: Context, cache: GraphCache, progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """The ``rerank`` steps of ``config`` on the shortlist ``(S, I)``, in chain order.

    ``q``, ``db`` are the original descriptors (the train-set tagging uses them).
    Returns the new ``(S, I)`` and an info dict (per step, what it reports: spatial
    verification statistics).

    Raises:
        InputError: a step that is on needs a :class:`Context` input that ``ctx`` lacks.
    """
    info: dict[str, Any] = {}
    on = [s for s in steps("rerank") if config.get(s.name)]
    _check_inputs(config, ctx)
    env = _env(q, db, config, cache, ctx, progress)
    for step in on:
        out = step.apply(S, I, config[step.name], env)
        S, I = out[0], out[1]
        if len(out) > 2 and out[2] is not None:
            info[step.name] = out[2]
    return S, I, info


def retrieve(q: np.ndarray, db: np.ndarray, config: Mapping[str, Any] | None = None,
             ctx: Context | None = None, cache: GraphCache | None = None, progress: bool = False,
             source: str = "post-processing config") -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Queries against the index through the whole post-processing chain of ``config``.

    Args:
        q: (Nq, D) query descriptors; db: (Ndb, D) index descriptors (L2-normalised).
        config: see :mod:`glr.postprocess.config` (``None``: plain kNN).
        ctx: train set, labels, distractors and image paths for the steps that need them.
        cache: graphs and intermediate results to reuse (a sweep passes one).
        source: where ``config`` came from (its file), named by errors.

    Returns:
        ``S`` float32 (Nq, k') scores, higher is better (their scale depends on the last
        step), ``I`` int64 (Nq, k') index rows, best first, ``k' = min(k, Ndb)``, and an
        info dict with per-step seconds.
    """
    config = normalize_config(config, source)
    ctx = ctx or Context()
    cache = cache or GraphCache()
    _check_inputs(config, ctx)  # before any search
    check_search(config, len(q), len(db), 0 if ctx.train is None else len(ctx.train),
                 0 if ctx.distractors is None else len(ctx.distractors), backend=cache.backend, source=source)
    t0 = time.perf_counter()
    S, I = shortlist(q, db, config, cache, progress=progress)
    t1 = time.perf_counter()
    S, I, info = rerank(S, I, q, db, config, ctx, cache, progress=progress)
    k = min(config["k"], I.shape[1])
    info["seconds"] = {"shortlist": t1 - t0, "rerank": time.perf_counter() - t1}
    return np.ascontiguousarray(S[:, :k]), np.ascontiguousarray(I[:, :k]), info
