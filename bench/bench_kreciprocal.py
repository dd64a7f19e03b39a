"""Scalable k-reciprocal re-ranking at GLDv2 size: wall time per phase and peak RSS.

    python bench/bench_kreciprocal.py [--nq 1129] [--ng 76176] [--dim 512] [--k1 20] [--k2 6]
                                      [--lam 0.3] [--seed 0] [--topk 100] [--small]

Random unit vectors (float32) go through :func:`glr.postprocess.kreciprocal.k_reciprocal_rerank`;
the phases (joint graph, reciprocal sets, V, Jaccard+final) are timed from the module's log
records. Target: peak RSS ≤ 8 GB (the dense reference needs ~100 GB at 1129 + 76176).
``--small`` instead cross-checks the scalable form against ``k_reciprocal_exact`` on a small
size (default 50 + 1000 rows, 64 dims). Prints the numbers of this one run (the machine is noisy).
"""

from __future__ import annotations

import argparse
import logging
import resource
import time

import numpy as np

from glr.postprocess import kreciprocal
from glr.postprocess.kreciprocal import k_reciprocal_dist, k_reciprocal_exact, k_reciprocal_rerank

TARGET_GB = 8.0


def _normed(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _Phases(logging.Handler):
    """Collects the ``kr_phase`` / ``kr_seconds`` the module attaches to its log records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        phase = getattr(record, "kr_phase", None)
        if phase is not None:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + record.kr_seconds


def _small(a: argparse.Namespace) -> None:
    nq, ng = a.nq if a.nq != 1129 else 50, a.ng if a.ng != 76176 else 1000
    dim = a.dim if a.dim != 512 else 64
    rng = np.random.default_rng(a.seed)
    q, db = _normed(rng, nq, dim), _normed(rng, ng, dim)
    x = np.concatenate([q, db]).astype(np.float64)
    d = np.sqrt(np.maximum(2 - 2 * (x @ x.T), 0))
    t = time.perf_counter()
    ref = k_reciprocal_exact(d[:nq, nq:], d[:nq, :nq], d[nq:, nq:], a.k1, a.k2, a.lam)
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    got = k_reciprocal_dist(q, db, a.k1, a.k2, a.lam)
    t_got = time.perf_counter() - t
    err = float(np.abs(got - ref).max())
    # rankings: the exact order read on the scalable values must be ascending up to near-ties
    order = np.argsort(ref, axis=1, kind="stable")
    worst = float(np.diff(np.take_along_axis(got, order, 1), axis=1).min())
    ok = err <= 1e-5 and worst >= -1e-6
    print(f"small cross-check nq={nq} ng={ng} dim={dim} k1={a.k1} k2={a.k2} lambda={a.lam}")
    print(f"  exact {t_ref:7.2f} s   scalable {t_got:7.2f} s   ratio {t_got / t_ref:5.2f}")
    print(f"  max |scalable - exact| = {err:.2e}   worst rank inversion {min(worst, 0.0):.2e}   "
          f"{'PASS' if ok else 'FAIL'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nq", type=int, default=1129)
    ap.add_argument("--ng", type=int, default=76176)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k1", type=int, default=20)
    ap.add_argument("--k2", type=int, default=6)
    ap.add_argument("--lam", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--small", action="store_true", help="cross-check against k_reciprocal_exact on a small size")
    a = ap.parse_args()
    if a.small:
        _small(a)
        return
    rng = np.random.default_rng(a.seed)
    q, db = _normed(rng, a.nq, a.dim), _normed(rng, a.ng, a.dim)
    rss_inputs = _peak_rss_gb()
    phases = _Phases()
    logger = logging.getLogger(kreciprocal.__name__)
    logger.addHandler(phases)
    logger.setLevel(logging.INFO)
    t = time.perf_counter()
    S, I = k_reciprocal_rerank(q, db, a.k1, a.k2, a.lam, topk=a.topk, progress=a.progress)
    total = time.perf_counter() - t
    logger.removeHandler(phases)
    peak = _peak_rss_gb()
    n = a.nq + a.ng
    print(f"nq={a.nq} ng={a.ng} dim={a.dim} k1={a.k1} k2={a.k2} lambda={a.lam} topk={a.topk} -> S{S.shape} I{I.shape}")
    for name in ("joint graph", "reciprocal sets", "V", "Jaccard+final"):
        print(f"  {name:16s} {phases.seconds.get(name, float('nan')):8.1f} s")
    print(f"  {'total':16s} {total:8.1f} s")
    print(f"  peak RSS {peak:.2f} GB (inputs alone {rss_inputs:.2f} GB); dense reference would hold "
          f"{n * n * 4 * 3 / 2**30:.0f} GB in (N, N) float32 arrays alone")
    print(f"  peak / {TARGET_GB:g} GB = {peak / TARGET_GB:.3f}   {'PASS' if peak <= TARGET_GB else 'FAIL'}")


if __name__ == "__main__":
    main()
