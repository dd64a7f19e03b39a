"""kNN backends: time ratios, the chunked search's memory bound, and approximate indexes (IVF, HNSW)
against exact search (time ratios and recall@k).

    python bench/bench_search.py [--nq 2000] [--ndb 50000] [--dim 512] [--k 100]
                                 [--ann-k 20] [--intrinsic 48] [--specs ivf:256:16 ivf:256:32 hnsw:32:64]
                                 [--skip-backends]

The backends compare on isotropic random rows. The approximate indexes run on clustered rows of a
low intrinsic dimension instead (``--intrinsic`` dims: centres plus noise in a random subspace, plus
small noise in all ``--dim`` dims; queries drawn around the same centres): learned GLDv2 embeddings
are far from isotropic noise, which is the worst case of every approximate method. Each index's
time includes its build (IVF k-means training, HNSW graph) since every graph of the chain builds
its index for one search (each index is built and searched twice: once for the split into build
and search, once timed as one ``knn`` call). One run, ratios only: the machine is shared and noisy,
so both wall and process CPU seconds (all threads) are printed.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from glr.search import IndexSpec, build_index, faiss_available, knn, recall_at_k


def _normed(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, nq: int, ndb: int, d: int, intrinsic: int,
              per_centre: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Queries and database around ``ndb / per_centre`` shared centres in an ``intrinsic``-dim subspace."""
    basis = np.linalg.qr(rng.standard_normal((d, intrinsic)))[0].T.astype(np.float32)
    centres = rng.standard_normal((max(1, ndb // per_centre), intrinsic), dtype=np.float32)

    def draw(n: int) -> np.ndarray:
        x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, intrinsic), dtype=np.float32)
        x = x @ basis + 0.1 * rng.standard_normal((n, d), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return draw(nq), draw(ndb)


def parse_spec(text: str) -> IndexSpec:
    kind, a, b = text.split(":")
    return IndexSpec("ivf", nlist=int(a), nprobe=int(b)) if kind == "ivf" else IndexSpec("hnsw", M=int(a), ef=int(b))


def backends(a: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    q, db = _normed(rng, a.nq, a.dim), _normed(rng, a.ndb, a.dim)
    times, results = {}, {}
    for backend in (["faiss"] if faiss_available() else []) + ["torch", "numpy"]:
        t = time.perf_counter()
        results[backend] = knn(q, db, a.k, backend=backend)
        times[backend] = time.perf_counter() - t
    ref = next(iter(times))
    print(f"backends, isotropic rows: nq={a.nq} ndb={a.ndb} dim={a.dim} k={a.k}")
    for b, t in times.items():
        same = np.allclose(results[b][0], results[ref][0], atol=1e-4)
        print(f"  {b:6s} {t:7.3f} s   ratio to {ref}: {t / times[ref]:5.2f}   same similarities: {same}")
    t = time.perf_counter()
    knn(q, db, a.k, backend="torch", use_gpu=False, with_min=True)
    print(f"  torch with_min (top-k and row minimum in one pass): ratio to torch {(time.perf_counter() - t) / times['torch']:5.2f}")
    # memory: numpy backend with a small db chunk vs. the full (nq, ndb) similarity matrix
    full_bytes = a.nq * a.ndb * 4
    tracemalloc.start()
    knn(q, db, a.k, backend="numpy", query_batch=256, db_batch=8192)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"  chunked numpy peak {peak / 2**20:.1f} MiB vs one similarity matrix {full_bytes / 2**20:.1f} MiB "
          f"(ratio {peak / full_bytes:.3f})")


def _timed(fn):
    """``(result, wall seconds, process CPU seconds)``: on a shared machine the CPU time (all threads)
    is the steadier measure of work; both are printed."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def approximate(a: argparse.Namespace) -> None:
    q, db = clustered(np.random.default_rng(1), a.nq, a.ndb, a.dim, a.intrinsic)
    print(f"approximate, clustered rows (intrinsic dim {a.intrinsic} of {a.dim}): nq={a.nq} ndb={a.ndb} "
          f"k={a.ann_k}, CPU; times include each index's build; ratios to exact {'faiss' if faiss_available() else 'torch'}")
    exact = {}
    for backend in (["faiss"] if faiss_available() else []) + ["torch"]:
        exact[backend] = _timed(lambda: knn(q, db, a.ann_k, backend=backend, use_gpu=False)[1])
    ref = next(iter(exact))
    I_ref, wall0, cpu0 = exact[ref]
    for backend, (_, wall, cpu) in exact.items():
        print(f"  exact {backend:8s} wall {wall:7.3f} s ({wall / wall0:5.2f})  cpu {cpu:7.3f} s ({cpu / cpu0:5.2f})")
    if not faiss_available():
        print("  (no faiss: approximate indexes skipped)")
        return
    for spec in map(parse_spec, a.specs):
        index, built, _ = _timed(lambda: build_index(db, spec, use_gpu=False))
        (_, I), search_s, _ = _timed(lambda: index.search(q, a.ann_k))
        index.close()
        _, wall, cpu = _timed(lambda: knn(q, db, a.ann_k, index=spec, use_gpu=False))
        print(f"  {spec.key():14s} wall {wall:7.3f} s ({wall / wall0:5.3f})  cpu {cpu:7.3f} s ({cpu / cpu0:5.3f})  "
              f"[build {built:.2f} s + search {search_s:.2f} s, {index.train_rows} training rows]  "
              f"recall@{a.ann_k} {recall_at_k(I, I_ref):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nq", type=int, default=2000)
    ap.add_argument("--ndb", type=int, default=50000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--ann-k", type=int, default=20, help="k of the approximate section (the chain's graphs: 3-21)")
    ap.add_argument("--intrinsic", type=int, default=48)
    ap.add_argument("--specs", nargs="+", default=["ivf:224:8", "ivf:224:32", "ivf:224:64", "hnsw:32:64"],
                    help="ivf:NLIST:NPROBE or hnsw:M:EF")
    ap.add_argument("--skip-backends", action="store_true", help="only the approximate section")
    a = ap.parse_args()
    if not a.skip_backends:
        backends(a)
    approximate(a)


if __name__ == "__main__":
    main()
