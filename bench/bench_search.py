"""kNN backends on one random database: time ratios and the chunked search's memory bound.

    python bench/bench_search.py [--nq 2000] [--ndb 50000] [--dim 512] [--k 100]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from glr.search import faiss_available, knn


def _normed(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nq", type=int, default=2000)
    ap.add_argument("--ndb", type=int, default=50000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=100)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    q, db = _normed(rng, a.nq, a.dim), _normed(rng, a.ndb, a.dim)
    times, results = {}, {}
    for backend in (["faiss"] if faiss_available() else []) + ["torch", "numpy"]:
        t = time.perf_counter()
        results[backend] = knn(q, db, a.k, backend=backend)
        times[backend] = time.perf_counter() - t
    ref = min(times, key=lambda b: list(times).index(b))
    print(f"nq={a.nq} ndb={a.ndb} dim={a.dim} k={a.k}")
    for b, t in times.items():
        same = np.allclose(results[b][0], results[ref][0], atol=1e-4)
        print(f"  {b:6s} {t:7.3f} s   ratio to {ref}: {t / times[ref]:5.2f}   same similarities: {same}")
    # memory: numpy backend with a small db chunk vs. the full (nq, ndb) similarity matrix
    full_bytes = a.nq * a.ndb * 4
    tracemalloc.start()
    knn(q, db, a.k, backend="numpy", query_batch=256, db_batch=8192)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"  chunked numpy peak {peak / 2**20:.1f} MiB vs one similarity matrix {full_bytes / 2**20:.1f} MiB "
          f"(ratio {peak / full_bytes:.3f})")


if __name__ == "__main__":
    main()
