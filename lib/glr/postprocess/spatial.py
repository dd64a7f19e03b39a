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
``cache_size`` images in each process), since the same index image is a candidate of many
queries, and optionally on disk (``cache_dir``; the chain's step uses
``<graph cache folder>/local_features`` when the graph cache has a folder): one plain ``.npz``
per image and setting, ``<cache_dir>/<detector>-side<max_side>-kp<max_keypoints>/<xx>/<stem>-<key>.npz``,
``key`` a hash of the image file's absolute path, size and modification time (an edited image
is a new entry). Files are written atomically and read with ``allow_pickle=False``; SIFT's
descriptors, whole numbers in 0..255, are stored as uint8 (exact, 4x smaller: ~140 KB for
1,000 keypoints). A second call with the same settings extracts nothing; a corrupt file is
logged and recomputed. An image that cannot be read is logged once (naming the file), gives 0
inliers and is never cached.

Queries are verified in ``workers`` processes (0: in this process), one query at a time per
worker, in the same code as in-process, so scores, order and counts do not depend on the
worker count (with ``time_budget_s=None``; a budget is per query in every mode). Workers
share the extracted features through the disk cache (a temporary folder, removed at the end,
when no ``cache_dir`` is given). They are forked where the platform can (a worker is ready in
~0.1 s; ``spawn`` and ``forkserver`` start a fresh interpreter that re-imports glr and the
caller's main module, 1-4 s per worker measured, and would re-run an unguarded script such as
the Kaggle kernel's); a worker sets OpenCV and torch to one thread and runs only OpenCV, PIL
and numpy code, none of the thread pools a fork may leave behind. A worker that dies (killed,
out of memory) loses only the query it was verifying: that row keeps its shortlist as it came,
a warning gives the count, ``stats["failed"]`` counts them, and a fresh worker takes the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import multiprocessing as mp
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from multiprocessing.connection import wait as wait_ready
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image

from glr.postprocess.registry import Env, Option, register_step
from glr.utils import atomic_write, check_writable_dir

log = logging.getLogger(__name__)

__all__ = ["LocalFeatures", "local_features", "count_inliers", "spatial_rerank", "DETECTORS"]

#: Supported local feature detectors: name -> (descriptor dtype, descriptor length).
DETECTORS: dict[str, tuple[type, int]] = {"sift": (np.float32, 128), "orb": (np.uint8, 32)}
#: DELF's RANSAC residual threshold, in pixels of the resized image.
RANSAC_THRESHOLD = 20.0
#: Seed of OpenCV's RNG before each RANSAC.
RANSAC_SEED = 0
#: Layout version of the on-disk feature files (part of their key: older files are not read).
CACHE_VERSION = 1
#: A query image path: the worker that gets it exits at once (tests of dead workers).
DIE_ENV = "GLR_SPATIAL_TEST_DIE_ON"
#: Seconds past its time budget after which a worker's query counts as lost (a hung worker).
STALL_S = 120.0
_STEM_RE = re.compile(r"[^A-Za-z0-9_.-]+")


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


# --------------------------------------------------------------------------- feature cache
def _pack(f: LocalFeatures) -> dict[str, np.ndarray]:
    desc = f.desc
    if desc.dtype != np.uint8 and np.array_equal(desc, np.clip(np.rint(desc), 0, 255)):
        desc = desc.astype(np.uint8)  # SIFT's are whole numbers in 0..255 (OpenCV rounds them): exact
    return {"xy": f.xy, "desc": desc, "desc_dtype": np.array(f.desc.dtype.name), "size": np.array(f.size, np.int64),
            "scale": np.array(f.scale, np.float64), "detector": np.array(f.detector),
            "version": np.array(CACHE_VERSION, np.int64)}


def _unpack(z: Mapping[str, np.ndarray], detector: str) -> LocalFeatures:
    dtype, d = DETECTORS[detector]
    if (int(z["version"]) != CACHE_VERSION or str(z["detector"]) != detector
            or str(z["desc_dtype"]) != np.dtype(dtype).name):
        raise ValueError(f"written for other settings ({z['detector']}, {z['desc_dtype']}, v{z['version']})")
    xy, desc, size = z["xy"], z["desc"].astype(dtype), z["size"]
    if xy.dtype != np.float32 or xy.ndim != 2 or xy.shape[1] != 2 or desc.shape != (len(xy), d) or size.shape != (2,):
        raise ValueError(f"bad arrays: xy {xy.dtype} {xy.shape}, desc {desc.shape}, size {size.shape}")
    return LocalFeatures(xy=np.ascontiguousarray(xy), desc=np.ascontiguousarray(desc),
                         size=(int(size[0]), int(size[1])), scale=float(z["scale"]), detector=detector)


class _DiskCache:
    """Local features on disk: one ``.npz`` per image file and setting (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, detector: str, max_side: int, max_keypoints: int) -> None:
        self.root = Path(folder) / f"{detector}-side{max_side}-kp{max_keypoints}"
        self.detector = detector
        self.writable = True

    def file_for(self, path: str) -> Path | None:
        """The cache file of image ``path`` as the file is now; None if it cannot be stat'ed."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = hashlib.blake2b(f"v{CACHE_VERSION}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode(),
                              digest_size=10).hexdigest()
        stem = _STEM_RE.sub("_", Path(path).stem)[:64] or "image"
        return self.root / key[:2] / f"{stem}-{key}.npz"

    def load(self, file: Path) -> tuple[LocalFeatures | None, str | None]:
        """``(features, None)``; ``(None, None)`` when absent, ``(None, note)`` when unreadable."""
        try:
            with np.load(file, allow_pickle=False) as z:
                return _unpack(z, self.detector), None
        except FileNotFoundError:
            return None, None
        except Exception as e:  # noqa: BLE001  (any damage: the features are recomputed)
            return None, f"spatial feature cache: corrupt file {file} ({type(e).__name__}: {e}); recomputed"

    def save(self, file: Path, f: LocalFeatures) -> str | None:
        """Write ``f`` atomically; returns a note when the folder cannot take it (then stops trying)."""
        if not self.writable:
            return None
        try:
            with atomic_write(file, "wb") as fh:
                np.savez(fh, **_pack(f))
        except OSError as e:
            self.writable = False
            return f"spatial feature cache: cannot write {file} ({e}); features are no longer cached on disk"
        return None


class _FeatureCache:
    """Features per image path: an LRU of ``size`` entries, then ``disk`` (if any), then extraction
    (written to ``disk``); unreadable files are remembered apart and never cached.

    Nothing is logged here (a worker process cannot): ``drain()`` hands over the unreadable files
    (path -> reason) and cache notes found since the last call. ``computed`` / ``loaded`` count
    extractions and disk reads. ``load(path, max_side) -> (gray (h, w) uint8, scale)`` reads an
    image (default :func:`_load_gray`, looked up when called).
    """

    def __init__(self, size: int, detector: str, max_side: int, max_keypoints: int,
                 load: Callable[[str, int], tuple[np.ndarray, float]] | None = None,
                 disk: _DiskCache | None = None) -> None:
        self.size, self.detector, self.max_side, self.max_keypoints = size, detector, max_side, max_keypoints
        self.engine = _make_detector(detector, max_keypoints)
        self.load, self.disk = load, disk
        self.lru: OrderedDict[str, LocalFeatures] = OrderedDict()
        self.bad: dict[str, str] = {}
        self._new_bad: dict[str, str] = {}
        self._notes: list[str] = []
        self.computed = self.loaded = 0

    def get(self, path: str, keep: bool = True) -> LocalFeatures | None:
        """Features of ``path`` (None if unreadable); ``keep=False`` does not insert them in the LRU."""
        if path in self.bad:
            return None
        f = self.lru.get(path)
        if f is not None:
            self.lru.move_to_end(path)
            return f
        f = self._read(path)
        if f is not None and keep and self.size > 0:
            self.lru[path] = f
            if len(self.lru) > self.size:
                self.lru.popitem(last=False)
        return f

    def _read(self, path: str) -> LocalFeatures | None:
        file = None if self.disk is None else self.disk.file_for(path)
        if file is not None:
            f, note = self.disk.load(file)
            if note:
                self._notes.append(note)
            if f is not None:
                self.loaded += 1
                return f
        try:
            gray, scale = (self.load or _load_gray)(path, self.max_side)
            f = _features(gray, scale, self.detector, self.engine, self.max_keypoints)
        except Exception as e:  # noqa: BLE001  (any unreadable image: reported once, 0 inliers)
            self.bad[path] = self._new_bad[path] = f"{type(e).__name__}: {e}"
            return None
        self.computed += 1
        if file is not None:
            note = self.disk.save(file, f)
            if note:
                self._notes.append(note)
        return f

    def drain(self) -> tuple[dict[str, str], list[str]]:
        """The unreadable files and notes found since the last call."""
        out = (self._new_bad, self._notes)
        self._new_bad, self._notes = {}, []
        return out


class _Report:
    """What the feature caches (this process's or the workers') found, each logged once."""

    def __init__(self) -> None:
        self.bad: dict[str, str] = {}
        self._notes: set[str] = set()

    def take(self, bad: Mapping[str, str], notes: Sequence[str]) -> None:
        for path, why in bad.items():
            if path not in self.bad:
                self.bad[path] = why
                log.warning("spatial verification: cannot read image %s (%s); its pairs get 0 inliers", path, why)
        for note in notes:
            if note not in self._notes:
                self._notes.add(note)
                log.warning("%s", note)


# --------------------------------------------------------------------------- re-ranking
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


def _resort(S: np.ndarray, I: np.ndarray, i: int) -> None:
    """Stably re-sort row ``i`` by score, padding last (in place)."""
    valid = I[i] >= 0
    order = np.argsort(-S[i], kind="stable")
    order = np.concatenate([order[valid[order]], order[~valid[order]]])
    S[i], I[i] = S[i, order], I[i, order]


def _verify_row(S: np.ndarray, I: np.ndarray, i: int, n_top: int, q_path: str,
                d_paths: Sequence[str] | Mapping[int, str], cache: _FeatureCache, v: _Verify) -> tuple[int, int, int]:
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
        df = cache.get(d_paths[int(I[i, j])])
        if df is None:
            continue
        inl = count_inliers(qf, df, ratio=v.ratio, ransac_threshold=v.ransac_threshold, min_matches=v.min_matches,
                            mutual=v.mutual)
        if inl > 0:
            S[i, j] = np.float32(float(S[i, j]) + min(inl, v.max_inliers) / v.max_inliers)
    _resort(S, I, i)
    return verified, skipped, over


# --------------------------------------------------------------------------- worker processes
@dataclass(frozen=True)
class _Job:
    """What verifying a query needs besides the query: every worker gets one (inherited by a
    fork, pickled by spawn, so ``load_image`` must then be picklable)."""

    verify: _Verify
    n_top: int
    detector: str
    max_side: int
    max_keypoints: int
    cache_size: int
    folder: str | None
    load_image: Callable[[str, int], tuple[np.ndarray, float]] | None = None
    die_on: str | None = None

    def cache(self) -> _FeatureCache:
        disk = None if self.folder is None else _DiskCache(self.folder, self.detector, self.max_side,
                                                             self.max_keypoints)
        return _FeatureCache(self.cache_size, self.detector, self.max_side, self.max_keypoints,
                             load=self.load_image, disk=disk)


def _worker_main(conn: Any, job: _Job) -> None:
    """A worker's loop: ``(i, q_path, S_row, I_row, {row: path})`` in, ``("ok", i, S_row', I_row',
    (verified, skipped, over), (computed, loaded), bad, notes)`` or ``("error", i, traceback)``
    out; None (or the parent gone) ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers
    cv2.setNumThreads(1)
    torch = sys.modules.get("torch")  # inherited by a fork: keep its intra-op pool out of the way
    if torch is not None:
        torch.set_num_threads(1)
    cache = job.cache()
    parent = os.getppid()
    while True:
        try:
            while not conn.poll(1.0):
                if os.getppid() != parent:  # the parent died (a fork's sibling may hold its pipe end open)
                    return
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        i, q_path, s_row, i_row, paths = task
        if job.die_on is not None and q_path == job.die_on:
            os._exit(70)  # the test hook: a worker that dies mid-run
        try:
            S1, I1 = s_row[None].copy(), i_row[None].copy()
            counts = _verify_row(S1, I1, 0, job.n_top, q_path, paths, cache, job.verify)
            bad, notes = cache.drain()
            done = (cache.computed, cache.loaded)
            cache.computed = cache.loaded = 0
            conn.send(("ok", i, S1[0], I1[0], counts, done, bad, notes))
        except Exception:  # noqa: BLE001  (the parent raises it, as in-process verification would)
            conn.send(("error", i, traceback.format_exc()))


class _Worker:
    """One worker process and its pipe; ``task`` is the query row it is verifying (None: idle)."""

    def __init__(self, ctx: Any, job: _Job) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, job), name="glr-spatial", daemon=True)
        self.proc.start()
        child.close()
        self.task: int | None = None
        self.since = 0.0

    def give(self, i: int, message: tuple) -> bool:
        """Send query ``i``; False if the worker is gone."""
        try:
            self.conn.send(message)
        except OSError:
            return False
        self.task, self.since = i, time.monotonic()
        return True

    def receive(self) -> tuple | None:
        """The worker's next message, or None if it died."""
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        return None

    def close(self, kill: bool = False) -> None:
        if not kill:
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.proc.join(5.0)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()


class _Pool:
    """``n`` worker processes verifying query rows, one at a time each, robust to a worker's death.

    :meth:`run` yields the workers' ``"ok"`` messages as they come. A worker that dies (or whose
    query runs ``stall_s`` seconds) loses its query to :attr:`failed` and is replaced while
    queries remain, unless more than ``n + 2`` died in a row (a worker that cannot live: the
    remaining queries then fail too). A worker's ``"error"`` (an exception) is raised here.
    """

    def __init__(self, ctx: Any, job: _Job, n: int, message: Callable[[int], tuple], stall_s: float | None) -> None:
        self.ctx, self.job, self.n, self.message, self.stall_s = ctx, job, n, message, stall_s
        self.live: list[_Worker] = []
        self.pending: deque[int] = deque()
        self.failed: list[int] = []
        self.exits: list[str] = []
        self._deaths = 0

    def run(self, tasks: Sequence[int]) -> Iterator[tuple]:
        self.pending = deque(tasks)
        threads = cv2.getNumThreads()
        # OpenCV's thread pool is stopped before any fork and while workers may be forked: a child
        # inherits a pool whose threads it lacks, and its cv2.setNumThreads(1) would wait on them forever
        cv2.setNumThreads(1)
        try:
            self.live = [_Worker(self.ctx, self.job) for _ in range(min(self.n, len(self.pending)))]
            while self._feed():
                ready = wait_ready([w.conn for w in self.live] + [w.proc.sentinel for w in self.live],
                                   timeout=self._timeout())
                for w in list(self.live):
                    if w.conn in ready or w.proc.sentinel in ready:
                        msg = w.receive()
                        if msg is None:
                            self._lost(w)
                        elif msg[0] == "error":
                            raise RuntimeError(f"spatial verification failed in a worker on query row {msg[1]}:\n"
                                               f"{msg[2]}")
                        else:
                            w.task, self._deaths = None, 0
                            yield msg
                    elif self.stall_s is not None and time.monotonic() - w.since > self.stall_s:
                        self._lost(w, f"no answer in {self.stall_s:g} s")
        finally:
            for w in self.live:
                w.close(kill=True)
            self.live = []
            cv2.setNumThreads(threads)

    def _feed(self) -> bool:
        """Give every idle worker the next query (closing those with none left: a replacement is
        idle too); False when no worker is left."""
        idle = [w for w in self.live if w.task is None]
        while idle:
            for w in idle:
                if not self.pending:
                    self.live.remove(w)
                    w.close()
                elif w.give(self.pending[0], self.message(self.pending[0])):
                    self.pending.popleft()
                else:
                    self._lost(w, "gone before its query")
            idle = [w for w in self.live if w.task is None]
        return bool(self.live)

    def _timeout(self) -> float | None:
        if self.stall_s is None:
            return None
        now = time.monotonic()
        return max(0.01, min(self.stall_s - (now - w.since) for w in self.live if w.task is not None))

    def _lost(self, w: _Worker, why: str | None = None) -> None:
        self.live.remove(w)
        if why is None:  # it died: let it finish exiting, for its exit code
            w.proc.join(1.0)
            why = f"exit code {w.proc.exitcode}"
        w.close(kill=True)
        if w.task is not None:
            self.failed.append(w.task)
        self.exits.append(why)
        self._deaths += 1
        if self.pending and self._deaths <= self.n + 2:
            self.live.append(_Worker(self.ctx, self.job))
        elif not self.live:
            self.failed.extend(self.pending)
            self.pending.clear()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check_workers(workers: Any) -> int | str:
    if isinstance(workers, str) and workers == "auto":
        return "auto"
    if isinstance(workers, (bool, np.bool_)) or not isinstance(workers, (int, np.integer)) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0 or 'auto', got {workers!r}")
    return int(workers)


def _check_start_method(method: str | None) -> str:
    methods = mp.get_all_start_methods()
    if method is None:
        return "fork" if "fork" in methods else "spawn"
    if method not in methods:
        raise ValueError(f"start_method must be one of {methods} on this platform, got {method!r}")
    return method


def _worker_count(workers: int | str, n_queries: int) -> int:
    """Processes for ``n_queries`` queries to verify: ``"auto"`` is one per usable CPU, none when one is enough."""
    n = min(_cpus() if workers == "auto" else int(workers), n_queries)
    if workers == "auto" and n < 2:
        return 0
    if n and mp.current_process().daemon:  # a daemonic process may not have children
        log.warning("spatial verification: called in a daemonic process, so verifying in it (workers=%s ignored)",
                    workers)
        return 0
    return n


@contextlib.contextmanager
def _feature_folder(cache_dir: str | os.PathLike | None, workers: int) -> Iterator[str | None]:
    """The disk cache's folder: ``cache_dir``; else, for workers to share features, a temporary one."""
    if cache_dir is not None or workers == 0:
        yield None if cache_dir is None else os.fspath(cache_dir)
        return
    with tempfile.TemporaryDirectory(prefix="glr-spatial-") as tmp:
        yield tmp


# --------------------------------------------------------------------------- re-ranking
def _verify_here(S: np.ndarray, I: np.ndarray, q_paths: Sequence[str], d_paths: Sequence[str], job: _Job,
                 report: _Report, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Every row verified in this process; ``(verified, skipped, over), (computed, loaded)``."""
    cache = job.cache()
    totals = np.zeros(3, np.int64)
    for i in _progress(range(S.shape[0]), S.shape[0], progress):
        totals += _verify_row(S, I, i, job.n_top, q_paths[i], d_paths, cache, job.verify)
        report.take(*cache.drain())
    return totals, np.array([cache.computed, cache.loaded], np.int64)


def _verify_in_workers(S: np.ndarray, I: np.ndarray, rows: Sequence[int], q_paths: Sequence[str],
                       d_paths: Sequence[str], job: _Job, report: _Report, progress: bool, n: int,
                       start_method: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """``rows`` verified by ``n`` worker processes (the other rows only re-sorted); as
    :func:`_verify_here`, plus the rows lost to dead workers (left as they came)."""

    def message(i: int) -> tuple:
        cols = I[i, :job.n_top]
        return i, q_paths[i], S[i], I[i], {int(j): d_paths[j] for j in cols[cols >= 0]}

    stall = None if job.verify.budget is None else job.verify.budget + STALL_S
    pool = _Pool(mp.get_context(start_method), job, n, message, stall)
    totals, counts = np.zeros(3, np.int64), np.zeros(2, np.int64)
    with contextlib.closing(pool.run(rows)) as results:  # closed (workers stopped) on any error
        for _, i, s_row, i_row, c, done, bad, notes in _progress(results, len(rows), progress):
            S[i], I[i] = s_row, i_row
            totals += c
            counts += done
            report.take(bad, notes)
    sent = set(rows)
    for i in range(S.shape[0]):
        if i not in sent:
            _resort(S, I, i)
    if pool.failed:
        log.warning("spatial verification: %d of %d queries lost to worker processes that died (%s); they keep "
                    "their shortlist order (first: %s)", len(pool.failed), len(rows),
                    ", ".join(sorted(set(pool.exits))), q_paths[min(pool.failed)])
    return totals, counts, sorted(pool.failed)


def spatial_rerank(query_paths: Sequence[str | os.PathLike], db_paths: Sequence[str | os.PathLike],
                   S: np.ndarray, I: np.ndarray, top_n: int = 100, max_inliers: int = 70,
                   time_budget_s: float | None = 2.0, detector: str = "sift", max_side: int = 512,
                   max_keypoints: int = 1000, cache_size: int = 2048, progress: bool = False,
                   ratio: float | None = 0.8, ransac_threshold: float = RANSAC_THRESHOLD,
                   min_matches: int = 4, mutual: bool = True,
                   load_image: Callable[[str, int], tuple[np.ndarray, float]] | None = None,
                   workers: int | str = 0, cache_dir: str | os.PathLike | None = None,
                   start_method: str | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Re-rank the top results of a global ranking by local-feature spatial verification.

    For each query row, its first ``top_n`` candidates (padding skipped) are verified in rank
    order with :func:`count_inliers`; a verified candidate's score becomes
    ``sim + min(inliers, max_inliers) / max_inliers``. Every other candidate keeps its score.
    The row is then stably re-sorted by score, padding (``I == -1``, scores untouched) last.

    The time budget is per query and checked before each pair (a pair that has started is
    finished): once ``time_budget_s`` seconds have passed since the query began, its remaining
    candidates are skipped (bonus 0). ``time_budget_s=0`` verifies nothing (and reads no
    image); ``None`` means no limit. Results therefore depend on the machine's speed unless
    the budget is None. Parallelism and caches (module docstring) never change a result.

    Args:
        query_paths, db_paths: (Nq,) / (Ndb,) image file of each query / database row.
        S: (Nq, K) global similarities, higher is better.
        I: (Nq, K) int64 database rows, best first; -1 is padding and ignored.
        top_n: candidates verified per query at most (0 verifies nothing).
        max_inliers: inlier count that earns the full bonus of 1 (the paper's 70).
        time_budget_s: seconds of verification per query, or None for no limit.
        detector, max_side, max_keypoints: the local features (see :func:`local_features`).
        cache_size: images whose features are kept in memory (LRU, per process); 0 keeps none.
        progress: show a tqdm bar over queries.
        ratio, ransac_threshold, min_matches, mutual: the matching (see :func:`count_inliers`).
        load_image: ``(path, max_side) -> (gray (h, w) uint8, scale)``, how an image is read
            (default: PIL, as :func:`local_features`); an exception counts as unreadable. Not
            part of the disk cache's key.
        workers: processes verifying queries: 0 in this one, ``"auto"`` one per usable CPU
            (0 when that is 1), or a number (at most one per query to verify).
        cache_dir: folder of the on-disk feature cache (created if needed), or None.
        start_method: multiprocessing start method of the workers (default ``"fork"`` where
            available, else ``"spawn"``).

    Returns:
        ``(S', I', stats)``: ``S'`` float32 (Nq, K) new scores and ``I'`` int64 (Nq, K) rows,
        best first; ``stats`` a dict of plain numbers: ``verified`` (pairs verified, those with
        an unreadable image included), ``skipped`` (pairs within ``top_n`` left unverified by
        the time budget), ``unreadable`` (distinct image files that could not be read),
        ``seconds`` (wall time of the call), ``queries``, ``over_budget`` (queries whose
        budget ran out before all their candidates were verified), ``failed`` (queries lost
        to a dead worker: their rows are returned as given, their pairs not counted above),
        ``workers`` (processes used); with a disk cache also ``features_computed`` (images
        whose features were extracted) and ``features_loaded`` (read from the cache).

    Raises:
        ValueError: inconsistent shapes or lengths, rows out of range, NaN scores or bad
            parameters (:class:`glr.utils.InputError` for a ``cache_dir`` that cannot be written).
        RuntimeError: verification raised in a worker (with the worker's traceback).
    """
    t_start = time.perf_counter()
    job = _job(top_n, max_inliers, time_budget_s, detector, max_side, max_keypoints, cache_size, ratio,
               ransac_threshold, min_matches, mutual, load_image, S)
    workers, start_method = _check_workers(workers), _check_start_method(start_method)
    q_paths, d_paths = [os.fspath(p) for p in query_paths], [os.fspath(p) for p in db_paths]
    S, I = _check_ranking(S, I, len(q_paths), len(d_paths))
    if cache_dir is not None:
        check_writable_dir(cache_dir, "the spatial feature cache (cache_dir)")
    stats = _dispatch(S, I, q_paths, d_paths, job, cache_dir, workers, start_method, progress)
    stats["seconds"] = round(float(time.perf_counter() - t_start), 3)
    log.info("spatial_rerank: %s", stats)
    return S, I, stats


def _dispatch(S: np.ndarray, I: np.ndarray, q_paths: Sequence[str], d_paths: Sequence[str], job: _Job,
              cache_dir: str | os.PathLike | None, workers: int | str, start_method: str,
              progress: bool) -> dict[str, Any]:
    """Verify every row of ``S, I`` (in place) here or in workers; the stats (``seconds`` left 0)."""
    nq, k = S.shape
    rows = [] if job.verify.budget == 0 else [i for i in range(nq) if (I[i, :job.n_top] >= 0).any()]
    n_workers = _worker_count(workers, len(rows))
    log.info("spatial_rerank: %d queries x top %d of %d, detector=%s max_side=%d budget=%s s, %d worker(s)", nq,
             job.n_top, k, job.detector, job.max_side, job.verify.budget, n_workers)
    report, failed = _Report(), []
    with _feature_folder(cache_dir, n_workers) as folder:
        job = replace(job, folder=folder, die_on=os.environ.get(DIE_ENV))
        if n_workers == 0:
            totals, counts = _verify_here(S, I, q_paths, d_paths, job, report, progress)
        else:
            totals, counts, failed = _verify_in_workers(S, I, rows, q_paths, d_paths, job, report, progress,
                                                        n_workers, start_method)
    stats = {"verified": int(totals[0]), "skipped": int(totals[1]), "unreadable": len(report.bad), "seconds": 0.0,
             "queries": int(nq), "over_budget": int(totals[2]), "failed": len(failed), "workers": n_workers}
    if folder is not None:
        stats.update(features_computed=int(counts[0]), features_loaded=int(counts[1]))
    return stats


def _job(top_n: Any, max_inliers: Any, time_budget_s: Any, detector: Any, max_side: Any, max_keypoints: Any,
         cache_size: Any, ratio: Any, ransac_threshold: Any, min_matches: Any, mutual: bool,
         load_image: Callable[[str, int], tuple[np.ndarray, float]] | None, S: Any) -> _Job:
    """The checked settings of a :func:`spatial_rerank` call (no folder yet)."""
    v = _settings(top_n, max_inliers, time_budget_s, ratio, ransac_threshold, min_matches, mutual)
    k = int(np.shape(S)[1]) if np.ndim(S) == 2 else 0
    return _Job(verify=v, n_top=min(v.top_n, k), detector=_check_detector(detector),
                max_side=_int_at_least(max_side, "max_side", 1),
                max_keypoints=_int_at_least(max_keypoints, "max_keypoints", 1),
                cache_size=_int_at_least(cache_size, "cache_size", 0), folder=None, load_image=load_image)


# --------------------------------------------------------------------------- the chain's step
class _WorkersOption(Option):
    """The step's ``workers``: an integer >= 0 or ``"auto"``."""

    def expected(self) -> str:
        return "an integer >= 0 or 'auto'"

    def coerce(self, value: Any) -> Any:
        if isinstance(value, str) and value == "auto":
            return "auto"
        return super().coerce(value)


#: The options that change the step's result (its label in sweep tables): not workers or cache_dir.
_RESULT_OPTIONS = ("top_n", "max_inliers", "time_budget_s", "detector", "max_side")


def _describe(opts: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={opts[k]}" for k in _RESULT_OPTIONS if k in opts)


@register_step("spatial", kind="rerank", order=40, label="+ spatial verification", needs=("q_paths", "db_paths"),
               describe=_describe,
               options={"top_n": Option(20, int, minimum=0, help="candidates verified per query"),
                        "max_inliers": Option(70, int, minimum=1, help="inliers that earn the full bonus of 1"),
                        "time_budget_s": Option(2.0, float, nullable=True, minimum=0.0,
                                                help="seconds per query (null: no limit)"),
                        "detector": Option("sift", str, choices=tuple(DETECTORS)),
                        "max_side": Option(512, int, minimum=1, help="longest image side for the features"),
                        "workers": _WorkersOption(0, int, minimum=0, help="processes verifying queries "
                                                                          "(0: in-process; auto: one per CPU)"),
                        "cache_dir": Option(None, str, help="on-disk local-feature cache (null: "
                                                            "<graph cache folder>/local_features when it has one)")})
def _step(S: np.ndarray, I: np.ndarray, opts: dict[str, Any], env: Env) -> tuple[np.ndarray, np.ndarray, dict]:
    """Spatial verification of each query's top candidates; its statistics go to the chain's info."""
    folder = opts["cache_dir"]
    if folder is None and getattr(env.cache, "folder", None) is not None:
        folder = os.path.join(os.fspath(env.cache.folder), "local_features")
    return spatial_rerank(env.ctx.q_paths, env.ctx.db_paths, S, I, top_n=opts["top_n"],
                          max_inliers=opts["max_inliers"], time_budget_s=opts["time_budget_s"],
                          detector=opts["detector"], max_side=opts["max_side"], progress=env.progress,
                          workers=opts["workers"], cache_dir=folder)
