"""glr.postprocess.spatial: local features, RANSAC inlier counts and the "global + SP" re-ranking."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from glr.postprocess import spatial
from glr.postprocess.spatial import LocalFeatures, count_inliers, local_features, spatial_rerank

SIZE = 200
N_UNRELATED = 4


# --------------------------------------------------------------------------- images
def _textured(path: Path, seed: int, size: int = SIZE, n_shapes: int = 80) -> Path:
    """A random collage of rectangles, ellipses, triangles and letters."""
    rng = np.random.default_rng(seed)
    col = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    im = Image.new("RGB", (size, size), col())
    d = ImageDraw.Draw(im)
    for _ in range(n_shapes):
        x0, y0 = (int(v) for v in rng.integers(-20, size, 2))
        w, h = (int(v) for v in rng.integers(8, 60, 2))
        kind = int(rng.integers(4))
        if kind == 0:
            d.rectangle([x0, y0, x0 + w, y0 + h], fill=col())
        elif kind == 1:
            d.ellipse([x0, y0, x0 + w, y0 + h], fill=col())
        elif kind == 2:
            d.polygon([tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(3)], fill=col())
        else:
            d.text((x0, y0), "".join(chr(c) for c in rng.integers(65, 91, 5)), fill=col())
    im.save(path)
    return path


def _warped(src: Path, dst: Path, angle: float = 20.0, scale: float = 0.8, shift=(10.0, -10.0)) -> Path:
    """``src`` under a rotation + scale + translation (an affine map), same canvas size."""
    a = np.asarray(Image.open(src).convert("RGB"))
    h, w = a.shape[:2]
    M = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    M[:, 2] += shift
    Image.fromarray(cv2.warpAffine(a, M, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)).save(dst)
    return dst


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("spatial")
    out = {"q": _textured(d / "q.png", 1)}
    out["qw"] = _warped(out["q"], d / "qw.jpg")
    for k in range(N_UNRELATED):
        out[f"u{k}"] = _textured(d / f"u{k}.png", 100 + k)
    out["broken"] = d / "broken.jpg"
    out["broken"].write_bytes(b"this is not a JPEG")
    out["missing"] = d / "missing.jpg"
    return out


@pytest.fixture(scope="module")
def feats(images) -> dict[str, LocalFeatures]:
    return {k: local_features(p) for k, p in images.items() if k not in ("broken", "missing")}


def _expected(sim: float, inliers: int, max_inliers: float = 70) -> np.float32:
    return np.float32(sim + min(inliers, max_inliers) / max_inliers)


def _assert_ranking(S: np.ndarray, I: np.ndarray) -> None:
    assert S.dtype == np.float32 and I.dtype == np.int64
    for s, i in zip(S, I):
        valid = i >= 0
        n = int(valid.sum())
        assert valid[:n].all(), "padding must come last"
        assert np.all(np.diff(s[:n]) <= 0), f"scores not descending: {s}"


# --------------------------------------------------------------------------- features
@pytest.mark.parametrize("detector, dtype, d", [("sift", np.float32, 128), ("orb", np.uint8, 32)])
def test_local_features_shapes(images, detector, dtype, d):
    f = local_features(images["q"], detector=detector)
    assert f.detector == detector and f.size == (SIZE, SIZE) and f.scale == 1.0
    assert f.xy.dtype == np.float32 and f.xy.shape == (len(f), 2) and len(f) > 30
    assert f.desc.dtype == dtype and f.desc.shape == (len(f), d)
    assert (f.xy >= 0).all() and (f.xy < SIZE).all()
    few = local_features(images["q"], max_keypoints=20, detector=detector)
    assert 0 < len(few) <= 20


def test_local_features_resize_keeps_aspect(tmp_path):
    p = tmp_path / "wide.jpg"
    Image.open(_textured(tmp_path / "a.png", 7, size=400)).crop((0, 100, 400, 300)).save(p)  # 400 x 200
    f = local_features(p, max_side=100)
    assert f.size == (100, 50) and f.scale == pytest.approx(0.25)
    assert (f.xy[:, 0] < 100).all() and (f.xy[:, 1] < 50).all()
    assert local_features(p, max_side=1000).size == (400, 200)  # never enlarged


def test_local_features_flat_image_and_errors(tmp_path, images):
    p = tmp_path / "flat.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(p)
    f = local_features(p)
    assert f.xy.shape == (0, 2) and f.desc.shape == (0, 128) and f.desc.dtype == np.float32
    assert count_inliers(f, f) == 0
    with pytest.raises(OSError):
        local_features(images["missing"])
    with pytest.raises(OSError):
        local_features(images["broken"])
    with pytest.raises(ValueError, match="detector"):
        local_features(images["q"], detector="surf")
    with pytest.raises(ValueError, match="max_side"):
        local_features(images["q"], max_side=0)


# --------------------------------------------------------------------------- inliers
@pytest.mark.parametrize("detector", ["sift", "orb"])
def test_inliers_matching_vs_unrelated(images, detector):
    f = {k: local_features(images[k], detector=detector) for k in ["q", "qw"] + [f"u{k}" for k in range(N_UNRELATED)]}
    assert count_inliers(f["q"], f["qw"]) > 20
    assert count_inliers(f["qw"], f["q"]) > 20
    unrelated = [count_inliers(f[a], f[b]) for a in ("q", "u0", "u1") for b in f if b not in (a, "qw", "q")]
    assert max(unrelated) < 8, unrelated


def test_count_inliers_options_and_determinism(feats):
    a, b = feats["q"], feats["qw"]
    n = count_inliers(a, b)
    assert all(count_inliers(a, b) == n for _ in range(3))
    assert count_inliers(a, b, ratio=None) > 20 and count_inliers(a, b, mutual=False) >= n - 5
    assert count_inliers(a, b, min_matches=10_000) == 0
    with pytest.raises(ValueError, match="cannot match"):
        count_inliers(a, LocalFeatures(a.xy, a.desc[:, :32].astype(np.uint8), a.size, 1.0, "orb"))
    with pytest.raises(ValueError, match="ratio"):
        count_inliers(a, b, ratio=1.5)
    with pytest.raises(ValueError, match="min_matches"):
        count_inliers(a, b, min_matches=2)


# --------------------------------------------------------------------------- re-ranking
@pytest.fixture(scope="module")
def setup(images, feats):
    """db rows 0..3 unrelated, row 4 the warped query, row 5 the query itself."""
    db_keys = [f"u{k}" for k in range(N_UNRELATED)] + ["qw", "q"]
    db_paths = [str(images[k]) for k in db_keys]
    q_paths = [str(images["q"]), str(images["qw"])]
    # query 0: true match (row 4) ranked 3rd with a lower score; query 1: padded row
    S = np.array([[0.9, 0.85, 0.8, 0.7], [0.5, 0.4, 0.3, 0.0]], np.float32)
    I = np.array([[0, 1, 4, 2], [1, 5, 0, -1]], np.int64)
    inl = {(q, j): count_inliers(feats[["q", "qw"][q]], feats[db_keys[j]]) for q in (0, 1) for j in range(6)}
    return q_paths, db_paths, S, I, inl


def test_true_match_moves_first_with_paper_scores(setup):
    q_paths, db_paths, S, I, inl = setup
    S0, I0 = S.copy(), I.copy()
    S2, I2, st = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=None)
    np.testing.assert_array_equal(S, S0)  # inputs untouched
    np.testing.assert_array_equal(I, I0)
    _assert_ranking(S2, I2)
    assert I2[0, 0] == 4 and I2[1, 0] == 5  # the true matches come first
    for q in (0, 1):
        for s, j in zip(S[q], I[q]):
            if j >= 0:
                pos = int(np.flatnonzero(I2[q] == j)[0])
                assert S2[q, pos] == _expected(float(s), inl[(q, int(j))])
    assert I2[1, 3] == -1 and S2[1, 3] == 0.0  # padding stays last, untouched
    assert st["verified"] == 7 and st["skipped"] == 0 and st["unreadable"] == 0
    assert st["queries"] == 2 and st["over_budget"] == 0 and st["seconds"] >= 0


def test_max_inliers_caps_the_bonus(setup):
    q_paths, db_paths, S, I, inl = setup
    S2, I2, _ = spatial_rerank(q_paths, db_paths, S, I, max_inliers=5, time_budget_s=None)
    _assert_ranking(S2, I2)
    assert S2[0, 0] == np.float32(0.8 + 1.0) and I2[0, 0] == 4
    for q in (0, 1):
        for s, j in zip(S[q], I[q]):
            if j >= 0:
                pos = int(np.flatnonzero(I2[q] == j)[0])
                assert S2[q, pos] == _expected(float(s), inl[(q, int(j))], 5)


def test_top_n_limits_verification(setup):
    q_paths, db_paths, S, I, inl = setup
    S2, I2, st = spatial_rerank(q_paths, db_paths, S, I, top_n=2, time_budget_s=None)
    _assert_ranking(S2, I2)
    assert st["verified"] == 4
    assert S2[0][I2[0] == 4][0] == np.float32(0.8)  # beyond top_n: global score kept
    assert S2[1][I2[1] == 5][0] == _expected(0.4, inl[(1, 5)])


def test_zero_budget_verifies_nothing(setup):
    q_paths, db_paths, S, I, _ = setup
    S2, I2, st = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=0)
    np.testing.assert_array_equal(S2, S)
    np.testing.assert_array_equal(I2, I)
    assert st["verified"] == 0 and st["skipped"] == 7 and st["over_budget"] == 2


def test_budget_is_spent_in_rank_order(setup, monkeypatch):
    q_paths, db_paths, S, I, inl = setup

    class Clock:  # every reading is one second later
        t = 0.0

        def perf_counter(self) -> float:
            self.t += 1.0
            return self.t

    monkeypatch.setattr(spatial, "time", Clock())
    S2, I2, st = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=2.5)
    _assert_ranking(S2, I2)
    assert st["verified"] == 4 and st["skipped"] == 3 and st["over_budget"] == 2  # 2 pairs per query
    assert S2[0][I2[0] == 4][0] == np.float32(0.8)  # 3rd candidate: out of budget
    assert S2[0][I2[0] == 0][0] == _expected(0.9, inl[(0, 0)])


def test_unreadable_images_give_zero_and_warn_once(setup, images, caplog):
    q_paths, db_paths, S, I, inl = setup
    db = db_paths + [str(images["missing"]), str(images["broken"])]  # rows 6, 7
    qp = q_paths + [str(images["missing"])]
    S3 = np.array([[0.9, 0.85, 0.8, 0.7], [0.95, 0.5, 0.4, 0.3], [0.9, 0.8, 0.7, 0.6]], np.float32)
    I3 = np.array([[6, 1, 4, 7], [7, 1, 5, 6], [4, 5, 0, 1]], np.int64)
    with caplog.at_level(logging.WARNING, logger="glr.postprocess.spatial"):
        S2, I2, st = spatial_rerank(qp, db, S3, I3, time_budget_s=None)
    _assert_ranking(S2, I2)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert sum(str(images["missing"]) in m for m in warned) == 1
    assert sum(str(images["broken"]) in m for m in warned) == 1
    assert st["unreadable"] == 2 and st["verified"] == 12
    assert I2[0, 0] == 4 and S2[0, 0] == _expected(0.8, inl[(0, 4)])
    assert S2[0][I2[0] == 6][0] == np.float32(0.9) and S2[0][I2[0] == 7][0] == np.float32(0.7)
    assert I2[1, 0] == 5
    np.testing.assert_array_equal(S2[2], S3[2])  # unreadable query: nothing changes
    np.testing.assert_array_equal(I2[2], I3[2])


def test_deterministic_and_cache_independent(setup, monkeypatch):
    q_paths, db_paths, S, I, _ = setup
    a = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=None)
    b = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=None, progress=True)
    loads: list[str] = []
    real = spatial._load_gray
    monkeypatch.setattr(spatial, "_load_gray", lambda p, m: (loads.append(p), real(p, m))[1])
    c = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=None, cache_size=1)
    n_tiny = len(loads)
    loads.clear()
    spatial_rerank(q_paths, db_paths, S, I, time_budget_s=None)
    assert loads.count(q_paths[0]) == 2  # query 0 (not cached), then index row 5 of query 1
    assert len(set(loads)) == len(loads) - 1  # default cache: every other image read once
    assert n_tiny > len(loads)
    for r in (b, c):
        np.testing.assert_array_equal(r[0], a[0])
        np.testing.assert_array_equal(r[1], a[1])
        assert {k: v for k, v in r[2].items() if k != "seconds"} == {k: v for k, v in a[2].items() if k != "seconds"}


def test_orb_detector_reranks(setup):
    q_paths, db_paths, S, I, _ = setup
    S2, I2, st = spatial_rerank(q_paths, db_paths, S, I, detector="orb", time_budget_s=None)
    _assert_ranking(S2, I2)
    assert I2[0, 0] == 4 and I2[1, 0] == 5 and st["verified"] == 7


def test_rerank_input_checks(setup):
    q_paths, db_paths, S, I, _ = setup
    with pytest.raises(ValueError, match="same shape"):
        spatial_rerank(q_paths, db_paths, S[:, :3], I)
    with pytest.raises(ValueError, match="query_paths"):
        spatial_rerank(q_paths[:1], db_paths, S, I)
    with pytest.raises(ValueError, match="outside"):
        spatial_rerank(q_paths, db_paths[:3], S, I)
    with pytest.raises(ValueError, match="integer"):
        spatial_rerank(q_paths, db_paths, S, I.astype(np.float32))
    bad = S.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        spatial_rerank(q_paths, db_paths, bad, I)
    with pytest.raises(ValueError, match="time_budget_s"):
        spatial_rerank(q_paths, db_paths, S, I, time_budget_s=-1)
    with pytest.raises(ValueError, match="max_inliers"):
        spatial_rerank(q_paths, db_paths, S, I, max_inliers=0)
    with pytest.raises(ValueError, match="detector"):
        spatial_rerank(q_paths, db_paths, S, I, detector="akaze")
    S0, I0, st = spatial_rerank(q_paths[:0], db_paths, S[:0], I[:0])
    assert S0.shape == (0, 4) and st["verified"] == 0


def test_output_is_a_valid_ranking_even_for_unsorted_input(setup):
    q_paths, db_paths, _, _, _ = setup
    S = np.array([[0.2, 0.0, 0.9, 0.2], [0.1, 0.3, 0.3, 0.7]], np.float32)
    I = np.array([[0, -1, 1, 2], [3, 0, 1, -1]], np.int64)
    S2, I2, st = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=0)
    _assert_ranking(S2, I2)
    np.testing.assert_array_equal(I2, [[1, 0, 2, -1], [0, 1, 3, -1]])  # ties keep their order
    np.testing.assert_array_equal(S2, np.array([[0.9, 0.2, 0.2, 0.0], [0.3, 0.3, 0.1, 0.7]], np.float32))
    assert st["skipped"] == 6


# --------------------------------------------------------------------------- workers and the disk cache
def _same_stats(a: dict, b: dict) -> None:
    """The counts of two runs, but wall time, process count and disk-cache counters."""
    drop = {"seconds", "workers", "features_computed", "features_loaded"}
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def _unreadable_case(setup, images):
    q_paths, db_paths, _, _, _ = setup
    db = db_paths + [str(images["missing"]), str(images["broken"])]  # rows 6, 7
    qp = q_paths + [str(images["missing"]), str(images["qw"])]
    S = np.array([[0.9, 0.85, 0.8, 0.7], [0.95, 0.5, 0.4, 0.3], [0.9, 0.8, 0.7, 0.6], [0.5, 0.4, 0.3, 0.0]],
                 np.float32)
    I = np.array([[6, 1, 4, 7], [7, 1, 5, 6], [4, 5, 0, 1], [1, 5, 0, -1]], np.int64)
    return qp, db, S, I


def test_workers_give_the_in_process_result(setup, images, caplog):
    qp, db, S, I = _unreadable_case(setup, images)
    ref = spatial_rerank(qp, db, S, I, time_budget_s=None)
    assert ref[2]["workers"] == 0 and ref[2]["failed"] == 0 and "features_computed" not in ref[2]
    for workers in (2, "auto", 1):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="glr.postprocess.spatial"):
            S2, I2, st = spatial_rerank(qp, db, S, I, time_budget_s=None, workers=workers)
        np.testing.assert_array_equal(S2, ref[0])
        np.testing.assert_array_equal(I2, ref[1])
        _same_stats(st, ref[2])
        assert st["workers"] == {2: 2, 1: 1}.get(workers, spatial._worker_count("auto", 4))
        assert st["unreadable"] == 2 and st["failed"] == 0
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 2, warned  # each unreadable file once, though two workers met them
    # a 1-CPU machine or a single query: "auto" verifies in this process
    assert spatial._worker_count("auto", 1) == 0 and spatial._worker_count(3, 2) == 2


def test_disk_cache_second_run_extracts_nothing(setup, tmp_path, monkeypatch):
    q_paths, db_paths, S, I, _ = setup
    ref = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=None)
    cache = tmp_path / "features"
    first = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=None, cache_dir=cache)
    # q, qw, u0, u1, u2 (u3 is never a candidate); q is read back once (query 0, then index row 5)
    assert first[2]["features_computed"] == 5 and first[2]["features_loaded"] == 1
    files = sorted(cache.rglob("*.npz"))
    assert len(files) == 5 and all(f.parent.parent.name == "sift-side512-kp1000" for f in files)
    with np.load(files[0], allow_pickle=False) as z:
        assert z["desc"].dtype == np.uint8 and z["xy"].dtype == np.float32
    loads: list[str] = []
    real = spatial._load_gray
    monkeypatch.setattr(spatial, "_load_gray", lambda p, m: (loads.append(p), real(p, m))[1])
    for workers in (0, 2):
        S2, I2, st = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=None, cache_dir=cache, workers=workers)
        assert st["features_computed"] == 0 and st["features_loaded"] >= 5 and not loads
        np.testing.assert_array_equal(S2, ref[0])
        np.testing.assert_array_equal(I2, ref[1])
        _same_stats(st, ref[2])
    # another setting is another entry; an edited image (new mtime) is extracted again
    assert spatial_rerank(q_paths, db_paths, S, I, time_budget_s=None, cache_dir=cache,
                          max_side=100)[2]["features_computed"] == 5
    loads.clear()
    os.utime(db_paths[0], ns=(os.stat(db_paths[0]).st_atime_ns, os.stat(db_paths[0]).st_mtime_ns + 10**9))
    st = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=None, cache_dir=cache)[2]
    assert st["features_computed"] == 1 and loads == [db_paths[0]]


def test_corrupt_cache_file_is_recomputed_with_a_warning(setup, tmp_path, caplog):
    q_paths, db_paths, S, I, _ = setup
    cache = tmp_path / "features"
    ref = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=None, cache_dir=cache)
    files = sorted(cache.rglob("*.npz"))
    files[0].write_bytes(b"not a zip file")
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="glr.postprocess.spatial"):
        S2, I2, st = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=None, cache_dir=cache)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and all("corrupt" in m for m in warned)
    assert {str(files[0]), str(files[1])} == {m.split("corrupt file ")[1].split(" (")[0] for m in warned}
    assert st["features_computed"] == 2
    np.testing.assert_array_equal(S2, ref[0])
    np.testing.assert_array_equal(I2, ref[1])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="glr.postprocess.spatial"):  # rewritten: clean again
        assert spatial_rerank(q_paths, db_paths, S, I, time_budget_s=None, cache_dir=cache)[2]["features_computed"] == 0
    assert not caplog.records


def test_a_dead_worker_leaves_its_queries_as_they_came(setup, monkeypatch, caplog):
    q_paths, db_paths, S, I, _ = setup
    qp, S4, I4 = q_paths * 2, np.concatenate([S, S]), np.concatenate([I, I])
    ref = spatial_rerank(qp, db_paths, S4, I4, time_budget_s=None)
    monkeypatch.setenv(spatial.DIE_ENV, q_paths[1])  # every worker given query rows 1 and 3 exits
    for workers in (1, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="glr.postprocess.spatial"):
            S2, I2, st = spatial_rerank(qp, db_paths, S4, I4, time_budget_s=None, workers=workers)
        for i in (1, 3):  # the shortlist as it came
            np.testing.assert_array_equal(S2[i], S4[i])
            np.testing.assert_array_equal(I2[i], I4[i])
        for i in (0, 2):  # verified as usual (by a fresh worker after a death, with workers=1)
            np.testing.assert_array_equal(S2[i], ref[0][i])
            np.testing.assert_array_equal(I2[i], ref[1][i])
        assert st["failed"] == 2 and st["verified"] == 8 and st["queries"] == 4
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "2 of 4 queries lost" in warned[0] and q_paths[1] in warned[0]


def test_workers_and_cache_dir_are_checked(setup, tmp_path):
    from glr.postprocess.registry import get_step
    from glr.utils import InputError

    q_paths, db_paths, S, I, _ = setup
    for bad in (-1, 1.5, "many", True, None):
        with pytest.raises(ValueError, match="workers must be an integer >= 0 or 'auto'"):
            spatial_rerank(q_paths, db_paths, S, I, workers=bad)
    with pytest.raises(ValueError, match="start_method"):
        spatial_rerank(q_paths, db_paths, S, I, workers=2, start_method="thread")
    step = get_step("spatial")
    assert step.normalize({"workers": "auto"})["workers"] == "auto" and step.normalize({})["workers"] == 0
    assert step.normalize({"workers": 3, "cache_dir": "x"})["cache_dir"] == "x"
    for bad in ("many", -2, 1.5):
        with pytest.raises(InputError, match=r"step 'spatial', option 'workers': expected an integer >= 0 or 'auto'"):
            step.normalize({"workers": bad}, "pp.yaml")
    assert step.summary(step.normalize({"workers": 2})) == "top_n=20 max_inliers=70 time_budget_s=2.0 detector=sift " \
                                                          "max_side=512"  # the label ignores how it runs
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cache_dir"):
        spatial_rerank(q_paths, db_paths, S, I, cache_dir=blocker / "features")


def test_step_caches_under_the_graph_cache_folder(setup, tmp_path):
    from glr.postprocess.cache import GraphCache
    from glr.postprocess.registry import Context, Env, get_step

    q_paths, db_paths, S, I, _ = setup
    step = get_step("spatial")
    opts = step.normalize({"time_budget_s": None, "workers": 2})
    env = Env(q=np.zeros((2, 4), np.float32), db=np.zeros((6, 4), np.float32),
              ctx=Context(q_paths=q_paths, db_paths=db_paths), cache=GraphCache(folder=tmp_path / "graphs"), config={})
    S2, I2, st = step.apply(S, I, opts, env)
    # two workers may both extract an image they meet at the same time: at least once each
    assert st["features_computed"] >= 5 and len(list((tmp_path / "graphs" / "local_features").rglob("*.npz"))) == 5
    ref = spatial_rerank(q_paths, db_paths, S, I, top_n=20, time_budget_s=None)
    np.testing.assert_array_equal(S2, ref[0])
    np.testing.assert_array_equal(I2, ref[1])
    assert step.apply(S, I, opts, env)[2]["features_computed"] == 0


def test_a_hung_worker_is_stopped(setup, monkeypatch, caplog):
    q_paths, db_paths, S, I, _ = setup
    q_paths = [q_paths[0], db_paths[3]]  # query 1: u3, which no query has as a candidate
    ref = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=5.0)
    real = spatial._load_gray

    def load(path: str, max_side: int):
        if path == q_paths[1]:
            time.sleep(60)  # query 1's worker hangs (a deadlock, a stuck file system)
        return real(path, max_side)

    monkeypatch.setattr(spatial, "STALL_S", 1.0)  # a query counts as lost 1 s past its 5 s budget
    t = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="glr.postprocess.spatial"):
        S2, I2, st = spatial_rerank(q_paths, db_paths, S, I, time_budget_s=5.0, workers=2, load_image=load)
    assert time.perf_counter() - t < 30
    assert st["failed"] == 1 and "no answer in 6 s" in caplog.text
    np.testing.assert_array_equal(S2[1], S[1])
    np.testing.assert_array_equal(I2[1], I[1])
    np.testing.assert_array_equal(S2[0], ref[0][0])
    np.testing.assert_array_equal(I2[0], ref[1][0])
