"""The demo's CV mAP@100 with the exact post-processing chain and with approximate graphs.

    python bench/bench_approx_cv.py                                   # runs `glr demo --quick` first (~2 min)
    python bench/bench_approx_cv.py --run submission --data runs/demo/data   # reuse a demo's outputs
    python bench/bench_approx_cv.py --run DIR --search hnsw
    python bench/bench_approx_cv.py --run DIR --data ROOT --post P.yaml   # another chain than the run chose

``--run`` is a ``glr cv`` / ``glr demo`` output folder: its ``emb_{test,index,train}.npz`` (the trained
ensemble's embeddings) and the chain it chose (``postprocess.yaml``, else ``cv.json``'s
``postprocess``); ``--data`` the GLDv2 root it was scored on (default: ``DIR/../work/data``, the
demo's layout). Without ``--run`` the quick demo is run into a temporary folder: the synthetic
root, two tiny models trained in two stages, the ensemble's embeddings and the swept chain.

The same ``glr cv`` then runs twice on those embeddings (nothing is embedded again): with the
chain as chosen (exact search, the default) and with the same chain plus a ``search`` setting that
makes every graph it searches approximate, scaled to the demo's small databases (``ivf``: nlist ≈
sqrt(rows) of each graph's database, nprobe = ``--nprobe-frac`` of it; ``hnsw``: M 16, ef
``--ef``). Spatial verification is left out of both (``--keep-spatial`` keeps it): its time
budget per query makes it depend on the machine's load, which would blur the comparison.
Prints both mAP@100 figures (Public and Private) and their difference; target |Δ| ≤ 0.002.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from glr.embeddings.npz import load_embeddings
from glr.postprocess.config import describe, normalize_config, read_config
from glr.workflows.cv import cv


def _ivf(rows: int, frac: float) -> dict:
    nlist = max(1, min(rows, round(math.sqrt(rows))))
    return {"ivf": {"nlist": nlist, "nprobe": max(1, min(nlist, round(frac * nlist)))}}


def search_setting(config: dict, rows: dict[str, int], kind: str, frac: float, ef: int) -> dict:
    """Per graph the chain searches, an approximate spec scaled to the rows of its database."""
    nq, ndb, ntr = rows["test"], rows["index"], rows.get("train", 0)
    e = config.get("expansion")
    sizes = {"shortlist": ndb, "kreciprocal": ndb, "train": ntr}  # k-reciprocal: its final search q → db
    if e:
        sizes["expansion"] = nq + ndb if e["form"] == "joint" else ndb
    if kind == "hnsw":
        return {g: {"hnsw": {"M": 16, "ef": ef}} for g, n in sizes.items() if n}
    return {g: _ivf(n, frac) for g, n in sizes.items() if n}


def _demo(folder: Path) -> tuple[Path, Path]:
    from glr.workflows.demo import demo  # noqa: PLC0415  (only without --run)

    out, work = folder / "submission", folder / "work"
    demo(out=out, work=work, quick=True, baselines=False, kernel=None, progress=False)
    return out, work / "data"


def _chain(run: Path) -> dict:
    if (run / "postprocess.yaml").is_file():
        return read_config(run / "postprocess.yaml")
    return normalize_config(json.loads((run / "cv.json").read_text()).get("postprocess"))


def _map(result: dict) -> tuple[float, float]:
    return result["public"]["map@100"], result["private"]["map@100"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a glr cv / demo output folder (default: run the quick demo)")
    ap.add_argument("--data", type=Path, help="its GLDv2 root (default: RUN/../work/data)")
    ap.add_argument("--search", choices=("ivf", "hnsw"), default="ivf")
    ap.add_argument("--nprobe-frac", type=float, default=0.5, help="ivf: nprobe = this x nlist")
    ap.add_argument("--ef", type=int, default=32, help="hnsw: efSearch")
    ap.add_argument("--keep-spatial", action="store_true")
    ap.add_argument("--post", type=Path, help="this post-processing chain instead of the one the run chose")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_approx_cv_") as tmp:
        run, data = (a.run, a.data or a.run.parent / "work" / "data") if a.run else _demo(Path(tmp))
        config = read_config(a.post) if a.post else _chain(run)
        if not a.keep_spatial:
            config["spatial"] = None
        rows = {}
        for s in ("test", "index", "train"):
            if (run / f"emb_{s}.npz").is_file():
                rows[s] = int((np.linalg.norm(load_embeddings(run / f"emb_{s}.npz")[1], axis=1) > 0).sum())
        approx = normalize_config({**config, "search": search_setting(config, rows, a.search, a.nprobe_frac, a.ef)})
        results = {}
        for name, post in (("exact", config), ("approximate", approx)):
            results[name] = cv(data, Path(tmp) / f"cv_{name}", embeddings=run, post=post, recognition=False,
                               progress=False)
    print(f"the demo's CV ({run}), {rows}: chain "
          + ", ".join(f"{s} {describe(config, s)}" for s in config if s not in ("k", "shortlist", "search")
                      and config[s]))
    print(f"  search: {describe(approx, 'search')}")
    (ep, eq), (ap_, aq) = _map(results["exact"]), _map(results["approximate"])
    for subset, e, x in (("public", ep, ap_), ("private", eq, aq)):
        d = x - e
        print(f"  {subset:8s} mAP@100 exact {e:.4f}  approximate {x:.4f}  Δ {d:+.4f}  "
              f"(target |Δ| <= 0.002: {'PASS' if abs(d) <= 0.002 else 'FAIL'})")


if __name__ == "__main__":
    main()
