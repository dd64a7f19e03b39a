"""Search and αQE/DBA over a sharded store on disk against the same work on arrays in memory.

    python bench/bench_shards.py [--nq 10000] [--ndb 100000] [--dim 512] [--shard-size 10000]

Writes ``--ndb`` clustered unit vectors as a float16 store (:mod:`glr.embeddings.store`) and the
queries beside it, then runs each job in a fresh process so that each peak RSS is its own:

* ``memory``:   the whole database loaded (``to_array``), then ``knn(q, db, 100)``;
* ``streamed``: ``knn(q, store, 100)``, one shard in memory at a time;
* ``dba-memory`` / ``dba-streamed``: joint αQE+DBA (k = 3) then the kNN of the expanded
  queries, in memory, or shard by shard writing the DBA'd database as a new store.

Prints time and peak RSS of each and the streamed/in-memory ratios, from this one run (the
machine is noisy). The process baseline (Python, numpy, torch, faiss imports) is printed too:
what a job adds is its peak minus the baseline.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_gb() -> float:
    """This process's peak RSS (VmHWM: unlike ``ru_maxrss`` it does not carry the parent's peak
    across ``exec``)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(job: str, folder: Path, backend: str) -> dict:
    from glr.postprocess.expansion import qe_dba_joint
    from glr.search import knn
    from glr.embeddings.store import ShardedEmbeddings

    q = np.load(folder / "q.npy")
    knn(q[:2], q[:50], 5, backend=backend)  # the backend's import and first call
    base = _peak_gb()
    store = ShardedEmbeddings.open(folder / "db")
    t = time.perf_counter()
    if job == "memory":
        S, I = knn(q, store.to_array(), 100, backend=backend)
    elif job == "streamed":
        S, I = knn(q, store, 100, backend=backend)
    elif job == "dba-memory":
        q2, db2 = qe_dba_joint(q, store.to_array(), k=3, alpha=3.0, qe=True, dba=True, backend=backend)
        S, I = knn(q2, db2, 100, backend=backend)
    else:
        out = folder / "dba"
        shutil.rmtree(out, ignore_errors=True)
        q2, db2 = qe_dba_joint(q, store, k=3, alpha=3.0, qe=True, dba=True, backend=backend, out=out)
        S, I = knn(q2, db2, 100, backend=backend)
    seconds = time.perf_counter() - t
    np.save(folder / f"I_{job}.npy", I)
    np.save(folder / f"S_{job}.npy", S)
    return {"seconds": seconds, "peak_gb": _peak_gb(), "baseline_gb": base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nq", type=int, default=10_000)
    ap.add_argument("--ndb", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--jobs", nargs="+", default=["memory", "streamed", "dba-memory", "dba-streamed"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, Path(a.folder), a.backend)))
        return

    from glr.embeddings.store import save_store

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_postprocess import clustered

    folder = Path(tempfile.mkdtemp(prefix="glr_bench_shards_"))
    try:
        rng = np.random.default_rng(0)
        centres = rng.standard_normal((max(1, a.ndb // 5), a.dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        q, _ = clustered(rng, centres, a.nq, 1.0)
        db, _ = clustered(rng, centres, a.ndb, 1.0)
        np.save(folder / "q.npy", q)
        t = time.perf_counter()
        save_store(folder / "db", [f"{i:08x}" for i in range(a.ndb)], db, dtype="float16", shard_size=a.shard_size)
        write = time.perf_counter() - t
        del db, centres
        size = sum(p.stat().st_size for p in (folder / "db").glob("shard_*.npy"))
        print(f"nq={a.nq:,} ndb={a.ndb:,} dim={a.dim}: store of {a.ndb // a.shard_size} shards, "
              f"{size / 2**20:.0f} MB float16 on disk (the database as float32 in memory: "
              f"{a.ndb * a.dim * 4 / 2**20:.0f} MB), written in {write:.1f} s")
        res = {}
        for job in a.jobs:
            out = subprocess.run([sys.executable, __file__, "--child", job, "--folder", str(folder),
                                  "--backend", a.backend], capture_output=True, text=True, check=True)
            res[job] = json.loads(out.stdout.strip().splitlines()[-1])
            r = res[job]
            print(f"  {job:13s} {r['seconds']:7.1f} s   peak RSS {r['peak_gb']:5.2f} GB "
                  f"(baseline {r['baseline_gb']:.2f} GB, +{r['peak_gb'] - r['baseline_gb']:.2f} GB)")
        for mem, st in (("memory", "streamed"), ("dba-memory", "dba-streamed")):
            if mem in res and st in res:
                m, s = res[mem], res[st]
                Im, Is = np.load(folder / f"I_{mem}.npy"), np.load(folder / f"I_{st}.npy")
                same = np.mean(Im == Is)
                overlap = np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(Im.tolist(), Is.tolist())])
                ds = np.abs(np.load(folder / f"S_{mem}.npy") - np.load(folder / f"S_{st}.npy")).max()
                print(f"  {st} / {mem}: time {s['seconds'] / m['seconds']:.2f}x, memory added "
                      f"{(s['peak_gb'] - s['baseline_gb']) / max(m['peak_gb'] - m['baseline_gb'], 1e-9):.2f}x; "
                      f"{100 * same:.3f}% of ranks hold the same image, top-100 overlap {100 * overlap:.3f}%, "
                      f"max |ΔS| {ds:.1e}")
        print("  (ranks differ at exact ties; after DBA also by the float16 storage of the expanded index)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
