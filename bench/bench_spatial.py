"""Spatial verification in worker processes and with the on-disk local-feature cache, against
today's one-query-at-a-time path: time ratios from one run.

    python bench/bench_spatial.py [--queries 40] [--db 200] [--landmarks 20] [--top-n 20]
                                  [--size 384] [--max-side 512] [--workers auto] [--seed 0]
                                  [--torch] [--out DIR]

Images are views of the synthetic landmarks of :mod:`glr.data.synth` (``render_image``: scale,
rotation, shear, crops, occluders, lighting), ``--size`` pixels on their longer side, written as
JPEGs (quality 90) to ``--out`` (default: a temporary folder). Each query's shortlist holds up
to 3 index views of its own landmark at random ranks among random others (``--top-n``
candidates, all verified: no time budget, so every run must give the same scores).

Runs, each timed on its own: ``in-process`` (workers 0, no disk cache: the code before issue 16),
``workers cold`` (``--workers``, a fresh ``cache_dir``), ``workers warm`` (the same
``cache_dir`` again: no extraction), ``in-process warm`` and ``in-process cold+write`` (a fresh
``cache_dir``: the cost of writing it). The start-up of a pool (``--workers`` processes, one
one-pair query each) is timed with ``fork`` (the default) and ``spawn``. ``--torch`` imports
torch and runs a matmul on its threads first, as the chain's process would have.

Prints the seconds and the ratios to ``in-process`` of this one run (the machine is noisy).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from glr.data.synth import make_blueprints, render_image
from glr.postprocess import spatial
from glr.postprocess.spatial import spatial_rerank


def _images(out: Path, n_q: int, n_db: int, n_lm: int, size: int, seed: int) -> tuple[list[str], list[str],
                                                                                      np.ndarray, np.ndarray]:
    """JPEG views: ``(query paths, index paths, query landmarks, index landmarks)``."""
    rng = np.random.default_rng(seed)
    blueprints = {uid: make_blueprints(seed, uid) for uid in range(n_lm)}
    lm_db = np.arange(n_db) % n_lm
    lm_q = rng.integers(0, n_lm, n_q)
    paths: dict[str, list[str]] = {"test": [], "index": []}
    for split, lms in (("test", lm_q), ("index", lm_db)):
        for i, uid in enumerate(lms):
            p = out / split / f"{split}{i:05d}.jpg"
            if not p.exists():
                p.parent.mkdir(parents=True, exist_ok=True)
                render_image(seed, split, i, int(uid), size, blueprints).save(p, quality=90)
            paths[split].append(str(p))
    return paths["test"], paths["index"], lm_q, lm_db


def _shortlists(lm_q: np.ndarray, lm_db: np.ndarray, top_n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(Nq, top_n) descending scores and index rows: up to 3 true views at random ranks."""
    rng = np.random.default_rng(seed + 1)
    S = np.sort(rng.uniform(0.3, 0.9, (len(lm_q), top_n)).astype(np.float32), axis=1)[:, ::-1].copy()
    I = np.empty((len(lm_q), top_n), np.int64)
    for r, lm in enumerate(lm_q):
        same, other = np.flatnonzero(lm_db == lm), np.flatnonzero(lm_db != lm)
        true = rng.choice(same, min(3, len(same), top_n), replace=False)
        row = rng.choice(other, top_n - len(true), replace=False)
        I[r] = np.insert(row, np.sort(rng.choice(top_n - len(true) + 1, len(true))), true)[:top_n]
    return S, I


def _timed(label: str, ref: tuple | None, *args, **kwargs) -> tuple[float, tuple]:
    t = time.perf_counter()
    out = spatial_rerank(*args, **kwargs)
    dt = time.perf_counter() - t
    st = out[2]
    extra = "" if "features_computed" not in st else \
        f", features computed {st['features_computed']}, loaded {st['features_loaded']}"
    print(f"  {label:24s} {dt:7.2f} s   workers {st['workers']}, pairs {st['verified']}, failed {st['failed']}{extra}",
          flush=True)
    if ref is not None:
        same = np.array_equal(out[0], ref[0]) and np.array_equal(out[1], ref[1])
        assert same, f"{label}: scores or order differ from the in-process run"
    return dt, out


def _startup(q: list[str], db: list[str], S: np.ndarray, I: np.ndarray, workers: int, max_side: int) -> None:
    """Wall time of a pool that verifies one pair per worker, by start method, minus in-process."""
    n = max(workers, 2)
    args = (q[:n], db, S[:n], I[:n])
    kw = {"top_n": 1, "time_budget_s": None, "max_side": max_side}
    base = min(_quiet(*args, **kw) for _ in range(2))
    for method in ("fork", "spawn"):
        dt = _quiet(*args, workers=n, start_method=method, **kw)
        print(f"  pool start-up, {method:5s}    {dt - base:7.2f} s for {n} workers ({dt:.2f} s against "
              f"{base:.2f} s in-process)", flush=True)


def _quiet(*args, **kwargs) -> float:
    t = time.perf_counter()
    spatial_rerank(*args, **kwargs)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--db", type=int, default=200)
    ap.add_argument("--landmarks", type=int, default=20)
    ap.add_argument("--top-n", type=int, default=20)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--workers", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch", action="store_true", help="import torch and use its threads first")
    ap.add_argument("--out", type=Path, default=None, help="image folder (kept; default a temporary one)")
    a = ap.parse_args()
    workers = a.workers if a.workers == "auto" else int(a.workers)
    logging.basicConfig(level=logging.WARNING)
    if a.torch:
        import torch  # noqa: PLC0415

        x = torch.randn(2000, 2000)
        (x @ x).sum().item()
    with tempfile.TemporaryDirectory(prefix="bench-spatial-") as tmp:
        root = a.out or Path(tmp) / "images"
        t = time.perf_counter()
        q, db, lm_q, lm_db = _images(root, a.queries, a.db, a.landmarks, a.size, a.seed)
        S, I = _shortlists(lm_q, lm_db, a.top_n, a.seed)
        n_workers = spatial._worker_count(workers, len(q))
        print(f"{len(q)} queries x top {a.top_n} of {len(db)} index images ({a.size} px, max_side {a.max_side}), "
              f"{n_workers} workers of {spatial._cpus()} CPUs; images in {time.perf_counter() - t:.1f} s", flush=True)
        common = {"top_n": a.top_n, "time_budget_s": None, "max_side": a.max_side}
        base, ref = _timed("in-process", None, q, db, S, I, **common)
        cold, _ = _timed("workers cold", ref, q, db, S, I, workers=workers, cache_dir=Path(tmp) / "A", **common)
        warm, _ = _timed("workers warm", ref, q, db, S, I, workers=workers, cache_dir=Path(tmp) / "A", **common)
        here_warm, _ = _timed("in-process warm", ref, q, db, S, I, cache_dir=Path(tmp) / "A", **common)
        here_cold, _ = _timed("in-process cold+write", ref, q, db, S, I, cache_dir=Path(tmp) / "B", **common)
        files = list((Path(tmp) / "A").rglob("*.npz"))
        mb = sum(f.stat().st_size for f in files) / 2**20
        print(f"  cache: {len(files)} files, {mb:.1f} MiB ({1024 * mb / max(1, len(files)):.0f} KiB per image)")
        _startup(q, db, S, I, n_workers, a.max_side)
    print(f"ratios to in-process ({base:.2f} s): workers cold {base / cold:.2f}x faster, workers warm "
          f"{base / warm:.2f}x, in-process warm {base / here_warm:.2f}x, in-process cold+write "
          f"{here_cold / base:.2f}x the time; results identical in every run")


if __name__ == "__main__":
    main()
