"""Local-feature spatial verification of the top results ("global + SP" re-ranking).

The GLDv2 paper (Weyand et al., CVPR 2020, section 5.3) re-ranks the top results of a global
descriptor search by geometric verification with local features: the query and each of its
top ``top_n`` candidates are matched with local descriptors, an affine model is fitted with
RANSAC, and the candidate's score becomes ::

    score = sim + min(inliers, max_inliers) / max_inliers        (max_inliers = 70)

so a verified candidate gains a bonus in ``[0, 1]`` over its global similarity ``sim``.
Candidates that are not verified (beyond ``top_n``, past the per-query time budget, or
padding) keep ``sim``; every row is then stably re-sorted by score, so the output is again a
valid descending ranking ``(S, I)`` (``S`` float32 (Nq, K) scores, ``I`` int64 (Nq, K)
database rows, best first, -1 = padding).

Local features come from OpenCV: SIFT (default, ``cv2.SIFT_create``) or ORB, on the image in
grey levels, reduced so that its longer side is at most ``max_side`` pixels. Tentative matches
are nearest neighbours (``cv2.BFMatcher``, L2 for SIFT, Hamming for ORB) that pass Lowe's
ratio test and are mutual nearest neighbours (either filter can be switched off); the
inliers are those of ``cv2.estimateAffine2D(..., method=cv2.RANSAC)`` with DELF's residual
threshold of 20 pixels (in the resized image). OpenCV's RNG is re-seeded before every RANSAC, so a pair always
gives the same count, whatever was verified before it.

Features are cached per image path within one :func:`spatial_rerank` call (an LRU of
``cache_size`` images), since the same index image is a candidate of many queries. An image
that cannot be read is logged once (naming the file) and gives 0 inliers.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import cv2
import numpy as np
from PIL import Image

from glr.postprocess.registry import Env, Option, register_step

log = logging.getLogger(__name__)

__all__ = ["LocalFeatures", "local_features", "count_inliers", "spatial_rerank", "DETECTORS"]

#: Supported local feature detectors: name -> (descriptor dtype, descriptor length).
DETECTORS: dict[str, tuple[type, int]] = {"sift": (np.float32, 128), "orb": (np.uint8, 32)}
#: DELF's RANSAC residual threshold, in pixels of the resized image.
RANSAC_THRESHOLD = 20.0
#: Seed of OpenCV's RNG before each RANSAC.
RANSAC_SEED = 0


@dataclass(frozen=True)
class LocalFeatures:
    """Local features of one image.

    Attributes:
        xy: (n, 2) float32 keypoint coordinates (x, y) in pixels of the resized image.
        desc: (n, d) descriptors: float32 (d = 128) for SIFT, uint8 (d = 32, packed bits) for ORB.
        size: (width, height) of the resized image the keypoints live in.
        scale: resized / original side length (1.0 when the image was not reduced).
        detector: ``"sift"`` or ``"orb"``.
    """

    xy: np.ndarray
    desc: np.ndarray
    size: tuple[int, int]
    scale: float
    detector: str

    def __len__(self) -> int:
        return int(self.xy.shape[0])


# --------------------------------------------------------------------------- validation
def _check_detector(detector: Any) -> str:
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; expected one of {', '.join(DETECTORS)}")
    return str(detector)


def _int_at_least(v: Any, name: str, lo: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


def _positive_float(v: Any, name: str, allow_zero: bool = False) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {v}")
    return v


def _make_detector(detector: str, max_keypoints: int) -> Any:
    if detector == "sift":
        return cv2.SIFT_create(nfeatures=max_keypoints)
    return cv2.ORB_create(nfeatures=max_keypoints)


# --------------------------------------------------------------------------- features
def _load_gray(path: str | os.PathLike, max_side: int) -> tuple[np.ndarray, float]:
    """The image as (h, w) uint8 grey levels, longer side <= ``max_side``, and its scale."""
    with Image.open(path) as im:
        w, h = im.size
        s = min(1.0, max_side / max(w, h, 1))
        size = (max(1, round(w * s)), max(1, round(h * s)))
        if s < 1.0:
            im.draft(None, size)  # JPEG: let the decoder reduce by 1/2..1/8 (never below `size`)
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        g = im.convert("L")
    if g.size != size:
        g = g.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(g, dtype=np.uint8), size[0] / max(w, 1)


def _features(gray: np.ndarray, scale: float, detector: str, engine: Any, max_keypoints: int) -> LocalFeatures:
    dtype, d = DETECTORS[detector]
    kps, desc = engine.detectAndCompute(gray, None)
    if desc is None or not kps:
        xy, desc = np.zeros((0, 2), np.float32), np.zeros((0, d), dtype)
    else:
        xy = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
        desc = np.ascontiguousarray(desc, dtype=dtype)
        if len(kps) > max_keypoints:  # SIFT keeps ties at the cut: keep the strongest, stably
            resp = np.array([k.response for k in kps], np.float32)
            keep = np.sort(np.argsort(-resp, kind="stable")[:max_keypoints])
            xy, desc = xy[keep], desc[keep]
    h, w = gray.shape[:2]
    return LocalFeatures(xy=np.ascontiguousarray(xy), desc=desc, size=(int(w), int(h)), scale=float(scale),
                         detector=detector)


def local_features(path: str | os.PathLike, max_side: int = 512, max_keypoints: int = 1000,
                   detector: str = "sift") -> LocalFeatures:
    """Keypoints and descriptors of one image file.

    The image is read with PIL, converted to grey levels (RGB luma) and reduced, keeping its
    aspect ratio, so that its longer side is at most ``max_side`` pixels (never enlarged).

    Args:
        path: image file (anything PIL reads).
        max_side: longest side, in pixels, of the image the features are computed on.
        max_keypoints: at most this many keypoints, the strongest (``nfeatures`` of the
            OpenCV detector).
        detector: ``"sift"`` (``cv2.SIFT_create``) or ``"orb"`` (``cv2.ORB_create``).

    Returns:
        :class:`LocalFeatures`: ``xy`` float32 (n, 2) in the resized image, ``desc`` (n, d),
        the resized size and scale; n may be 0 (a flat image).

    Raises:
        ValueError: bad ``max_side``, ``max_keypoints`` or ``detector``.
        OSError: the file is missing or is not a readable image.
    """
    detector = _check_detector(detector)
    max_side = _int_at_least(max_side, "max_side", 1)
    max_keypoints = _int_at_least(max_keypoints, "max_keypoints", 1)
    gray, scale = _load_gray(path, max_side)
    return _features(gray, scale, detector, _make_detector(detector, max_keypoints), max_keypoints)


# --------------------------------------------------------------------------- matching
def _matches(a: LocalFeatures, b: LocalFeatures, ratio: float | None, mutual: bool) -> np.ndarray:
    """(m, 2) int64 tentative matches (row of ``a``, row of ``b``)."""
    norm = cv2.NORM_L2 if a.detector == "sift" else cv2.NORM_HAMMING
    matcher = cv2.BFMatcher(norm, crossCheck=False)
    k = 2 if (ratio is not None and len(b) >= 2) else 1
    pairs = []
    for cand in matcher.knnMatch(a.desc, b.desc, k=k):
        if not cand:
            continue
        m = cand[0]
        if k == 2 and len(cand) > 1 and not m.distance < ratio * cand[1].distance:
            continue
        pairs.append((m.queryIdx, m.trainIdx))
    out = np.array(pairs, np.int64).reshape(-1, 2)
    if mutual and len(out):
        back = np.full(len(b), -1, np.int64)
        for m in matcher.match(b.desc, a.desc):
            back[m.queryIdx] = m.trainIdx
        out = out[back[out[:, 1]] == out[:, 0]]
    return out


def count_inliers(a: LocalFeatures, b: LocalFeatures, ratio: float | None = 0.8,
                  ransac_threshold: float = RANSAC_THRESHOLD, min_matches: int = 4, mutual: bool = True,
                  max_iters: int = 1000, confidence: float = 0.99, seed: int = RANSAC_SEED) -> int:
    """Inliers of an affine model fitted by RANSAC to the local feature matches of two images.

    Tentative matches are the nearest neighbours (in ``b``) of ``a``'s descriptors that pass
    Lowe's ratio test (best distance < ``ratio`` x second best; ``ratio=None`` skips it) and,
    with ``mutual=True``, are also mutual nearest neighbours. ``cv2.estimateAffine2D`` with
    ``method=cv2.RANSAC`` then fits ``b.xy ~ A @ a.xy + t``; OpenCV's RNG is seeded with
    ``seed`` first, so the count is reproducible.

    Args:
        a: features of the first image (the query).
        b: features of the second image, from the same detector.
        ratio: Lowe's ratio, in (0, 1]; None for no ratio test.
        ransac_threshold: maximum reprojection error of an inlier, in pixels of the resized
            images (DELF's 20 by default).
        min_matches: fewer tentative matches, or fewer inliers, than this gives 0 (an affine
            model from 3 points always has 3 inliers). At least 3.
        mutual: also require mutual nearest neighbours (on by default: on 200-pixel test
            images it halves the inliers of unrelated pairs and costs ~7% of a true pair's).
        max_iters: RANSAC iterations at most.
        confidence: RANSAC confidence, in (0, 1).
        seed: OpenCV RNG seed set before RANSAC.

    Returns:
        The number of inlier matches (0 when the images do not match).

    Raises:
        ValueError: features of different detectors or descriptor sizes, or bad parameters.
    """
    if ratio is not None and not (0 < float(ratio) <= 1):
        raise ValueError(f"ratio must be in (0, 1] or None, got {ratio!r}")
    ransac_threshold = _positive_float(ransac_threshold, "ransac_threshold")
    min_matches = _int_at_least(min_matches, "min_matches", 3)
    max_iters = _int_at_least(max_iters, "max_iters", 1)
    if not (0 < float(confidence) < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if a.detector != b.detector or a.desc.shape[1:] != b.desc.shape[1:] or a.desc.dtype != b.desc.dtype:
        raise ValueError(f"cannot match {a.detector} features {a.desc.shape[1:]} {a.desc.dtype} with "
                         f"{b.detector} features {b.desc.shape[1:]} {b.desc.dtype}")
    if len(a) < min_matches or len(b) < min_matches:
        return 0
    m = _matches(a, b, None if ratio is None else float(ratio), mutual)
    if len(m) < min_matches:
        return 0
    src = np.ascontiguousarray(a.xy[m[:, 0]], np.float32)
    dst = np.ascontiguousarray(b.xy[m[:, 1]], np.float32)
    cv2.setRNGSeed(int(seed))
    model, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=ransac_threshold,
                                       maxIters=max_iters, confidence=float(confidence))
    if model is None or mask is None:
        return 0
    n = int(np.count_nonzero(mask))
    return n if n >= min_matches else 0


# --------------------------------------------------------------------------- re-ranking
class _FeatureCache:
    """Features per image path: an LRU of ``size`` entries; unreadable files remembered apart.

    ``load(path, max_side) -> (gray (h, w) uint8, scale)`` reads an image (default
    :func:`_load_gray`, looked up when called).
    """

    def __init__(self, size: int, detector: str, max_side: int, max_keypoints: int,
                 load: Callable[[str, int], tuple[np.ndarray, float]] | None = None) -> None:
        self.size, self.detector, self.max_side, self.max_keypoints = size, detector, max_side, max_keypoints
        self.engine = _make_detector(detector, max_keypoints)
        self.load = load
        self.lru: OrderedDict[str, LocalFeatures] = OrderedDict()
        self.bad: set[str] = set()

    def get(self, path: str, keep: bool = True) -> LocalFeatures | None:
        """Features of ``path`` (None if unreadable); ``keep=False`` does not insert them."""
        if path in self.bad:
            return None
        f = self.lru.get(path)
        if f is not None:
            self.lru.move_to_end(path)
            return f
        try:
            gray, scale = (self.load or _load_gray)(path, self.max_side)
            f = _features(gray, scale, self.detector, self.engine, self.max_keypoints)
        except Exception as e:  # noqa: BLE001  (any unreadable image: warn once, 0 inliers)
            self.bad.add(path)
            log.warning("spatial verification: cannot read image %s (%s: %s); its pairs get 0 inliers",
                        path, type(e).__name__, e)
            return None
        if keep and self.size > 0:
            self.lru[path] = f
            if len(self.lru) > self.size:
                self.lru.popitem(last=False)
        return f


def _check_ranking(S: Any, I: Any, nq: int, ndb: int) -> tuple[np.ndarray, np.ndarray]:
    S, I = np.asarray(S), np.asarray(I)
    if S.ndim != 2 or I.ndim != 2 or S.shape != I.shape:
        raise ValueError(f"S and I must be 2-D arrays of the same shape (Nq, K), got S {S.shape} and I {I.shape}")
    if not np.issubdtype(I.dtype, np.integer):
        raise ValueError(f"I must hold integer database rows, got dtype {I.dtype}")
    if not (np.issubdtype(S.dtype, np.floating) or np.issubdtype(S.dtype, np.integer)):
        raise ValueError(f"S must hold real scores, got dtype {S.dtype}")
    if S.shape[0] != nq:
        raise ValueError(f"query_paths has {nq} entries but S, I have {S.shape[0]} rows")
    I = np.array(I, dtype=np.int64)  # a copy: the caller's arrays are never modified
    S = np.array(S, dtype=np.float32)
    if I.size and (I.min() < -1 or I.max() >= ndb):
        raise ValueError(f"I holds rows outside -1..{ndb - 1} (db_paths has {ndb} entries; -1 is padding)")
    if not np.isfinite(S[I >= 0]).all():
        raise ValueError("S contains NaN or infinite scores at non-padding positions")
    return S, I


def _progress(iterable: Any, total: int, enabled: bool) -> Any:
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm  # noqa: PLC0415
    except ImportError:
        log.warning("progress=True but tqdm is not installed; no progress bar")
        return iterable
    return tqdm(iterable, total=total, desc="spatial", unit="query")


@dataclass(frozen=True)
class _Verify:
    """The checked settings of one :func:`spatial_rerank` call."""

    top_n: int
    max_inliers: float
    budget: float | None
    ratio: float | None
    ransac_threshold: float
    min_matches: int
    mutual: bool


def _settings(top_n: Any, max_inliers: Any, time_budget_s: Any, ratio: Any, ransac_threshold: Any,
              min_matches: Any, mutual: bool) -> _Verify:
    budget = None if time_budget_s is None else _positive_float(time_budget_s, "time_budget_s", allow_zero=True)
    if ratio is not None and not (0 < float(ratio) <= 1):
        raise ValueError(f"ratio must be in (0, 1] or None, got {ratio!r}")
    return _Verify(top_n=_int_at_least(top_n, "top_n", 0), max_inliers=_positive_float(max_inliers, "max_inliers"),
                   budget=budget, ratio=ratio, ransac_threshold=_positive_float(ransac_threshold, "ransac_threshold"),
                   min_matches=_int_at_least(min_matches, "min_matches", 3), mutual=mutual)


def _verify_row(S: np.ndarray, I: np.ndarray, i: int, n_top: int, q_path: str, d_paths: Sequence[str],
                cache: _FeatureCache, v: _Verify) -> tuple[int, int, int]:
    """Verify query row ``i``'s first ``n_top`` candidates in rank order (``S[i]`` gets the
    bonuses in place) and re-sort the row; returns ``(verified, skipped, over_budget)``."""
    cols = np.flatnonzero(I[i, :n_top] >= 0)
    t0 = time.perf_counter()
    qf: LocalFeatures | None = None
    q_loaded = False
    verified = skipped = over = 0
    for c, j in enumerate(cols):
        if v.budget is not None and time.perf_counter() - t0 >= v.budget:
            skipped, over = len(cols) - c, 1
            break
        if not q_loaded:
            # a query is seen once: its features are not kept, so they evict no index image
            qf, q_loaded = cache.get(q_path, keep=False), True
        verified += 1
        if qf is None:
            continue  # unreadable query: every pair has 0 inliers
        df = cache.get(d_paths[I[i, j]])
        if df is None:
            continue
        inl = count_inliers(qf, df, ratio=v.ratio, ransac_threshold=v.ransac_threshold, min_matches=v.min_matches,
                            mutual=v.mutual)
        if inl > 0:
            S[i, j] = np.float32(float(S[i, j]) + min(inl, v.max_inliers) / v.max_inliers)
    valid = I[i] >= 0
    order = np.argsort(-S[i], kind="stable")
    order = np.concatenate([order[valid[order]], order[~valid[order]]])
    S[i], I[i] = S[i, order], I[i, order]
    return verified, skipped, over


def spatial_rerank(query_paths: Sequence[str | os.PathLike], db_paths: Sequence[str | os.PathLike],
                   S: np.ndarray, I: np.ndarray, top_n: int = 100, max_inliers: int = 70,
                   time_budget_s: float | None = 2.0, detector: str = "sift", max_side: int = 512,
                   max_keypoints: int = 1000, cache_size: int = 2048, progress: bool = False,
                   ratio: float | None = 0.8, ransac_threshold: float = RANSAC_THRESHOLD,
                   min_matches: int = 4, mutual: bool = True,
                   load_image: Callable[[str, int], tuple[np.ndarray, float]] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Re-rank the top results of a global ranking by local-feature spatial verification.

    For each query row, its first ``top_n`` candidates (padding skipped) are verified in rank
    order with :func:`count_inliers`; a verified candidate's score becomes
    ``sim + min(inliers, max_inliers) / max_inliers``. Every other candidate keeps its score.
    The row is then stably re-sorted by score, padding (``I == -1``, scores untouched) last.

    The time budget is per query and checked before each pair (a pair that has started is
    finished): once ``time_budget_s`` seconds have passed since the query began, its remaining
    candidates are skipped (bonus 0). ``time_budget_s=0`` verifies nothing (and reads no
    image); ``None`` means no limit. Results therefore depend on the machine's speed unless
    the budget is None.

    Args:
        query_paths: (Nq,) image file of each query row.
        db_paths: (Ndb,) image file of each database row.
        S: (Nq, K) global similarities, higher is better.
        I: (Nq, K) int64 database rows, best first; -1 is padding and ignored.
        top_n: candidates verified per query at most (0 verifies nothing).
        max_inliers: inlier count that earns the full bonus of 1 (the paper's 70).
        time_budget_s: seconds of verification per query, or None for no limit.
        detector: ``"sift"`` or ``"orb"`` (see :func:`local_features`).
        max_side: longest image side, in pixels, for the local features.
        max_keypoints: keypoints per image at most.
        cache_size: images whose features are kept (LRU) during the call; 0 keeps none.
        progress: show a tqdm bar over queries.
        ratio: Lowe's ratio test threshold, or None (see :func:`count_inliers`).
        ransac_threshold: RANSAC inlier threshold in pixels of the resized images.
        min_matches: fewer matches or inliers than this count as 0 inliers.
        mutual: also require mutual nearest neighbours (see :func:`count_inliers`).
        load_image: ``(path, max_side) -> (gray (h, w) uint8, scale)``, how an image is read
            (default: PIL, as :func:`local_features`); an exception counts as unreadable.

    Returns:
        ``(S', I', stats)``: ``S'`` float32 (Nq, K) new scores and ``I'`` int64 (Nq, K) rows,
        best first; ``stats`` a dict of plain numbers: ``verified`` (pairs verified, those with
        an unreadable image included), ``skipped`` (pairs within ``top_n`` left unverified by
        the time budget), ``unreadable`` (distinct image files that could not be read),
        ``seconds`` (wall time of the call), ``queries`` and ``over_budget`` (queries whose
        budget ran out before all their candidates were verified).

    Raises:
        ValueError: inconsistent shapes or lengths, rows out of range, NaN scores or bad
            parameters.
    """
    t_start = time.perf_counter()
    detector = _check_detector(detector)
    max_side = _int_at_least(max_side, "max_side", 1)
    max_keypoints = _int_at_least(max_keypoints, "max_keypoints", 1)
    cache_size = _int_at_least(cache_size, "cache_size", 0)
    v = _settings(top_n, max_inliers, time_budget_s, ratio, ransac_threshold, min_matches, mutual)
    q_paths = [os.fspath(p) for p in query_paths]
    d_paths = [os.fspath(p) for p in db_paths]
    S, I = _check_ranking(S, I, len(q_paths), len(d_paths))
    nq, k = S.shape
    n_top = min(v.top_n, k)
    cache = _FeatureCache(cache_size, detector, max_side, max_keypoints, load=load_image)
    totals = np.zeros(3, np.int64)  # verified, skipped, over budget
    log.info("spatial_rerank: %d queries x top %d of %d, detector=%s max_side=%d budget=%s s", nq, n_top, k,
             detector, max_side, v.budget)
    for i in _progress(range(nq), nq, progress):
        totals += _verify_row(S, I, i, n_top, q_paths[i], d_paths, cache, v)
    seconds = time.perf_counter() - t_start
    stats = {"verified": int(totals[0]), "skipped": int(totals[1]), "unreadable": len(cache.bad),
             "seconds": round(float(seconds), 3), "queries": int(nq), "over_budget": int(totals[2])}
    log.info("spatial_rerank: %s", stats)
    return S, I, stats


# --------------------------------------------------------------------------- the chain's step
@register_step("spatial", kind="rerank", order=40, label="+ spatial verification", needs=("q_paths", "db_paths"),
               options={"top_n": Option(20, int, minimum=0, help="candidates verified per query"),
                        "max_inliers": Option(70, int, minimum=1, help="inliers that earn the full bonus of 1"),
                        "time_budget_s": Option(2.0, float, nullable=True, minimum=0.0,
                                                help="seconds per query (null: no limit)"),
                        "detector": Option("sift", str, choices=tuple(DETECTORS)),
                        "max_side": Option(512, int, minimum=1, help="longest image side for the features")})
def _step(S: np.ndarray, I: np.ndarray, opts: dict[str, Any], env: Env) -> tuple[np.ndarray, np.ndarray, dict]:
    """Spatial verification of each query's top candidates; its statistics go to the chain's info."""
    return spatial_rerank(env.ctx.q_paths, env.ctx.db_paths, S, I, top_n=opts["top_n"],
                          max_inliers=opts["max_inliers"], time_budget_s=opts["time_budget_s"],
                          detector=opts["detector"], max_side=opts["max_side"], progress=env.progress)
