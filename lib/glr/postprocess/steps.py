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

import copy
import hashlib
import json
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from glr.search import knn
from glr.utils import InputError, atomic_write

log = logging.getLogger(__name__)

#: Every step with its options and their defaults, in the order the steps run.
STEP_DEFAULTS: dict[str, dict[str, Any]] = {
    "whitening": {"dim": None, "shrinkage": 0.0},
    "expansion": {"form": "joint", "k": 3, "alpha": 3.0, "qe": True, "dba": True, "qe_n": 2, "dba_n": 10},
    "kreciprocal": {"k1": 20, "k2": 6, "lambda": 0.3},
    "landmark_country": {"alpha": 1.0, "beta": 0.1, "k": 3},
    "train_label": {"insert": False, "k": 5},
    "nonlandmark": {"weight": 1.0, "k": 5},
    "spatial": {"top_n": 20, "max_inliers": 70, "time_budget_s": 2.0, "detector": "sift", "max_side": 512},
}
STEPS = tuple(STEP_DEFAULTS)
#: Top-level options besides the steps.
TOP_DEFAULTS: dict[str, Any] = {"shortlist": 1000, "k": 100}
#: Steps that re-rank a shortlist (they make a shortlist longer than ``k`` worth computing).
RERANKERS = ("landmark_country", "train_label", "nonlandmark", "spatial")
#: The :class:`Context` fields each re-ranker needs.
STEP_NEEDS: dict[str, tuple[str, ...]] = {"landmark_country": ("train", "train_landmarks"),
                                          "train_label": ("train", "train_landmarks"),
                                          "nonlandmark": ("distractors",), "spatial": ("q_paths", "db_paths")}


def normalize_config(config: Mapping[str, Any] | None, source: str = "post-processing config") -> dict[str, Any]:
    """A complete configuration: every step key present (``None`` = off), defaults filled in.

    Raises:
        InputError: an unknown step or option (named, with ``source``), or a bad value.
    """
    config = dict(config or {})
    out: dict[str, Any] = dict(TOP_DEFAULTS)
    for key in list(config):
        if key in TOP_DEFAULTS:
            out[key] = config.pop(key)
    for step in STEPS:
        value = config.pop(step, None)
        if value is None or value is False:
            out[step] = None
            continue
        if value is True:
            value = {}
        if not isinstance(value, Mapping):
            raise InputError(f"step {step!r} must be a mapping of options, null or false; got {value!r}", source)
        unknown = sorted(set(value) - set(STEP_DEFAULTS[step]))
        if unknown:
            raise InputError(f"step {step!r}: unknown option(s) {unknown}; known: {sorted(STEP_DEFAULTS[step])}",
                             source)
        out[step] = {**STEP_DEFAULTS[step], **value}
    if config:
        raise InputError(f"unknown key(s) {sorted(config)}; steps are {list(STEPS)}, options {list(TOP_DEFAULTS)}",
                         source)
    for key in ("shortlist", "k"):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1:
            raise InputError(f"{key} must be an integer >= 1, got {out[key]!r}", source)
    exp = out["expansion"]
    if exp is not None and exp["form"] not in ("joint", "classic"):
        raise InputError(f"expansion.form must be 'joint' or 'classic', got {exp['form']!r}", source)
    return out


def describe(config: Mapping[str, Any], step: str) -> str:
    """A short human label of one step's setting (for tables): ``"joint k=3 α=3 qe+dba"``."""
    opts = config.get(step)
    if not opts:
        return "off"
    if step == "expansion":
        if opts["form"] == "joint":
            sides = "+".join(s for s in ("qe", "dba") if opts[s])
            return f"joint k={opts['k']} α={opts['alpha']:g} {sides}"
        return f"classic qe_n={opts['qe_n']} dba_n={opts['dba_n']} α={opts['alpha']:g}"
    if step == "kreciprocal":
        return f"k1={opts['k1']} k2={opts['k2']} λ={opts['lambda']:g}"
    if step == "landmark_country":
        return f"α={opts['alpha']:g} β={opts['beta']:g} k={opts['k']}"
    return " ".join(f"{k}={v}" for k, v in opts.items())


# --------------------------------------------------------------------------- graph cache
def fingerprint(x: np.ndarray) -> str:
    """A content hash of an array (shape, dtype and bytes)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{x.shape}{x.dtype}".encode())
    h.update(np.ascontiguousarray(x).data)
    return h.hexdigest()


@dataclass
class GraphCache:
    """Memoises kNN graphs by the content of their inputs, in memory and optionally on disk.

    A graph asked for with ``k`` is served from any stored graph of the same arrays with
    ``k' >= k`` (its first k columns). ``searches`` counts the searches really run,
    ``hits`` the ones served from memory or disk, ``seconds`` the time spent searching. ``memo`` holds intermediate results a
    sweep reuses (expanded descriptors, shortlists); it is never written to disk.

    Args:
        folder: where graphs are stored as ``.npz`` (None: memory only).
        backend: kNN backend (see :func:`glr.search.knn`).
        progress: progress bars on searches.
    """

    folder: str | os.PathLike | None = None
    backend: str = "auto"
    progress: bool = False
    searches: int = 0
    hits: int = 0
    seconds: float = 0.0
    memo: dict[str, Any] = field(default_factory=dict)
    _graphs: dict[tuple[str, str], tuple[int, tuple[np.ndarray, ...]]] = field(default_factory=dict)
    _fps: dict[int, tuple[Any, str]] = field(default_factory=dict)

    def _fp(self, x: np.ndarray) -> str:
        got = self._fps.get(id(x))
        if got is not None and got[0]() is x:
            return got[1]
        fp = fingerprint(x)
        self._fps[id(x)] = (weakref.ref(x), fp)
        return fp

    def _lookup(self, kind: str, key: str, k: int) -> tuple[np.ndarray, ...] | None:
        got = self._graphs.get((kind, key))
        if got is not None and got[0] >= k:
            return got[1]
        if self.folder is not None:
            best = None
            for p in Path(self.folder).glob(f"{kind}_{key}_k*.npz"):
                kk = int(p.stem.rsplit("_k", 1)[1])
                if kk >= k and (best is None or kk < best[0]):
                    best = (kk, p)
            if best is not None:
                with np.load(best[1]) as z:
                    arrays = tuple(z[f"a{i}"] for i in range(len(z.files)))
                self._graphs[(kind, key)] = (best[0], arrays)
                return arrays
        return None

    def _store(self, kind: str, key: str, k: int, arrays: tuple[np.ndarray, ...]) -> None:
        self._graphs[(kind, key)] = (k, arrays)
        if self.folder is not None:
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            with atomic_write(Path(self.folder) / f"{kind}_{key}_k{k}.npz", "wb") as f:
                np.savez(f, **{f"a{i}": a for i, a in enumerate(arrays)})

    def knn(self, q: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(S, I)`` of :func:`glr.search.knn` for ``q`` against ``db``, k clipped to ``len(db)``."""
        k = min(int(k), len(db))
        key = f"{self._fp(q)}-{self._fp(db)}"
        got = self._lookup("knn", key, k)
        if got is None:
            self.searches += 1
            t = time.perf_counter()
            got = knn(q, db, k, backend=self.backend, progress=self.progress)
            self.seconds += time.perf_counter() - t
            log.info("graph cache: searched %d x %d, k=%d in %.1fs", len(q), len(db), k, time.perf_counter() - t)
            self._store("knn", key, k, got)
        else:
            self.hits += 1
        return got[0][:, :k], got[1][:, :k]

    def joint(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The joint graph of :func:`glr.postprocess.kreciprocal.joint_graph` of ``x``:
        ``(S, I, min_similarity)``."""
        from glr.postprocess.kreciprocal import joint_graph  # noqa: PLC0415

        k = min(int(k), len(x))
        key = self._fp(x)
        got = self._lookup("joint", key, k)
        if got is None:
            self.searches += 1
            t = time.perf_counter()
            got = joint_graph(x, k, progress=self.progress)
            self.seconds += time.perf_counter() - t
            log.info("graph cache: joint graph of %d rows, k=%d in %.1fs", len(x), k, time.perf_counter() - t)
            self._store("joint", key, k, tuple(got))
        else:
            self.hits += 1
        return got[0][:, :k], got[1][:, :k], got[2]


# --------------------------------------------------------------------------- the chain
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
    from glr.postprocess.labels import encode_labels  # noqa: PLC0415

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
    from glr.postprocess.expansion import alpha_dba, alpha_qe, fit_whitening, qe_dba_joint  # noqa: PLC0415

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
        from glr.postprocess.kreciprocal import k_reciprocal_rerank  # noqa: PLC0415

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
    from glr.postprocess import labels  # noqa: PLC0415

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
            from glr.submission import recognition_predictions  # noqa: PLC0415

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
        from glr.postprocess.spatial import spatial_rerank  # noqa: PLC0415

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


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A post-processing config from a YAML file (a top-level ``postprocess:`` key is allowed)."""
    import yaml  # noqa: PLC0415

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"cannot read post-processing config ({e})", path) from e
    if isinstance(data, Mapping) and "postprocess" in data:
        data = data["postprocess"]
    if not isinstance(data, Mapping):
        raise InputError("a post-processing config must be a mapping of steps", path)
    return normalize_config(data, source=str(path))


def write_config(path: str | os.PathLike, config: Mapping[str, Any], comment: str = "") -> Path:
    """Write a (normalised) post-processing config as YAML, atomically; off steps are ``null``."""
    import yaml  # noqa: PLC0415

    config = normalize_config(copy.deepcopy(dict(config)))
    with atomic_write(path) as f:
        if comment:
            f.writelines(f"# {line}\n" for line in comment.splitlines())
        yaml.safe_dump({"postprocess": config}, f, sort_keys=False)
    return Path(path)
