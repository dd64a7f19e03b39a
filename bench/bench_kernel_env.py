"""The demo's kernel run with other library versions than ours (Kaggle's image lags our pins), compared
with the library's submission; then one library at a time, to find which one moves the near-ties.

    .venv/bin/python bench/bench_kernel_env.py                   # quick demo's kernel, cached in --work
    .venv/bin/python bench/bench_kernel_env.py --kernel kernels/demo --data runs/demo/data   # the full demo's

What it builds (under ``--work``, default ``/tmp/glr_bench_kernel_env``, reused by the next run):

- the demo's kernel and data (``glr demo --quick --kernel``), unless ``--kernel`` and ``--data`` are given;
- ``old-site/``: the older libraries (:data:`OLD`, the versions of issue 15: timm 1.0.15, NumPy 1.26,
  pandas 2.2, SciPy 1.14, scikit-learn 1.5, OpenCV 4.10, Pillow 11.3), ``pip install --no-deps --target``;
- ``envs/<name>/``: site-packages folders made of symbolic links, each entry to this environment's
  site-packages or to ``old-site/``, distribution by distribution (torch and everything not listed
  stays this environment's: the same torch as Kaggle's is close, and a second torch is gigabytes).

Each environment runs the kernel with ``glr kernel run``'s machinery (``run_local(site_dirs=…)``:
a fresh ``python -I -S`` that sees only that folder), and its submission is compared with the
library's (``glr.predict``'s chain in this environment, as ``glr kernel run`` does): mAP@100
(Public / Private) of both, the top-1 of every query, the overlap of the top-100 sets (the mean
over queries of |kernel ∩ library| / |library|) and the rows identical. The libraries the kernel
imported are read back from its report (``environment.libraries``) and checked against the plan.

Environments: ``pins`` (ours: must be identical), ``old`` (all of :data:`OLD`), ``old:<lib>`` (ours
with only ``lib`` old), ``pin:<lib>`` (all old but ``lib`` at our pin), and ``old+wheels`` (all old, with
the wheels dataset ``glr kernel wheels --kernel`` collects: the kernel then runs our timm).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import site
import subprocess
import sys
import time
from importlib.metadata import distributions
from pathlib import Path

from glr import metrics
from glr.kaggle.kernel.build import WHEELS_DIR, read_kernel
from glr.kaggle.kernel.local import library_submission, run_local
from glr.kaggle.kernel.wheels import collect_wheels, default_packages
from glr.submission import read_submission

#: The older libraries, by name: pip requirement and the import name the kernel reports.
OLD = {
    "timm": ("timm==1.0.15", "timm"),
    "numpy": ("numpy==1.26.4", "numpy"),
    "pandas": ("pandas==2.2.3", None),  # the kernel does not import pandas: a control
    "scipy": ("scipy==1.14.1", "scipy"),
    "scikit-learn": ("scikit-learn==1.5.2", "sklearn"),
    "opencv": ("opencv-python-headless==4.10.0.84", "cv2"),
    "pillow": ("pillow==11.3.0", "PIL"),
}
OPENCV = {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _lib_of(dist: str) -> str | None:
    """The :data:`OLD` name a distribution belongs to (all OpenCV builds are ``opencv``)."""
    d = _norm(dist)
    if d in OPENCV:
        return "opencv"
    return d if d in OLD else None


def _entries(site_dir: Path) -> dict[str, set[str]]:
    """Distribution (normalised) → its top-level entries in ``site_dir`` (from RECORD), dist-info included."""
    out: dict[str, set[str]] = {}
    for dist in distributions(path=[str(site_dir)]):
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        out.setdefault(_norm(dist.metadata["Name"]), set()).update(t for t in tops if (site_dir / t).exists())
    return out


def _our_site() -> Path:
    return Path(next(d for d in site.getsitepackages() if d.endswith("site-packages")))


def build_old(work: Path) -> Path:
    """``work/old-site``: :data:`OLD` installed for this Python (cached by the requirement list)."""
    old, reqs = work / "old-site", sorted(r for r, _ in OLD.values())
    stamp = old / ".bench-requirements.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == reqs:
        return old
    shutil.rmtree(old, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
                    "--only-binary=:all:", "--target", str(old), *reqs], check=True, capture_output=True)
    stamp.write_text(json.dumps(reqs))
    print(f"installed {', '.join(reqs)} into {old} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return old


def compose(work: Path, name: str, old_libs: set[str], ours: Path, old: Path) -> Path:
    """``work/envs/<name>``: every entry of our site-packages as a link, but the distributions of
    ``old_libs`` linked from ``old`` instead. glr itself is left out (the kernel brings its own)."""
    env = work / "envs" / name.replace(":", "_").replace("+", "_")
    shutil.rmtree(env, ignore_errors=True)
    env.mkdir(parents=True)
    ours_by_dist, old_by_dist = _entries(ours), _entries(old)
    replaced = {e for d, es in ours_by_dist.items() if _lib_of(d) in old_libs for e in es}
    for entry in sorted(os.listdir(ours)):
        if entry in replaced or entry.startswith(("__editable__", "glr-", "glr.", "__pycache__")) or entry == "glr":
            continue
        os.symlink(ours / entry, env / entry)
    for dist, es in old_by_dist.items():
        if _lib_of(dist) in old_libs:
            for entry in es:
                if not (env / entry).exists():
                    os.symlink(old / entry, env / entry)
    return env


def _rows(path: Path) -> dict[str, list[str]]:
    return {i: cell.split() for i, cell in read_submission(path, "retrieval")}


def compare(kernel_csv: Path, library_csv: Path, solution: Path) -> dict:
    """mAP@100 of both, top-1 equal, top-100 overlap and rows identical."""
    a, b = _rows(kernel_csv), _rows(library_csv)
    common = sorted(set(a) & set(b))
    overlap = [len(set(a[i]) & set(b[i])) / len(b[i]) for i in common if b[i]]
    maps = {}
    for tag, path in (("kernel", kernel_csv), ("library", library_csv)):
        s = metrics.score("retrieval", solution, path)
        maps[tag] = tuple(round(s[p]["map@100"], 4) if s.get(p) else None for p in ("public", "private"))
    return {"queries": len(common), "rows_identical": sum(a[i] == b[i] for i in common),
            "top1_equal": sum(a[i][:1] == b[i][:1] for i in common),
            "top100_overlap": round(sum(overlap) / max(len(overlap), 1), 5), "map": maps}


def demo_kernel(work: Path) -> tuple[Path, Path]:
    """The quick demo's kernel and data in ``work`` (built once)."""
    kernel, data = work / "demo" / "kernel", work / "demo" / "work" / "data"
    if not (kernel / "kernel-metadata.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "glr", "demo", "--quick", "--out", str(work / "demo" / "submission"),
                        "--work", str(work / "demo" / "work"), "--kernel", str(kernel)], check=True,
                       capture_output=True)
        print(f"built the quick demo's kernel in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return kernel, data


def with_wheels(work: Path, kernel: Path) -> tuple[Path, dict]:
    """A copy of ``kernel`` with the wheels dataset ``glr kernel wheels --kernel`` collects (cached)."""
    copy = work / "kernel+wheels"
    if not (copy / WHEELS_DIR / "dataset-metadata.json").is_file():
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(kernel, copy, symlinks=True)
        collect_wheels(copy / WHEELS_DIR, "glr-demo/glr-demo-wheels", default_packages(kernel))
    return copy, {"wheels_dataset": "glr-demo/glr-demo-wheels"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/glr_bench_kernel_env")
    p.add_argument("--kernel", help="a built kernel (default: the quick demo's, built in --work)")
    p.add_argument("--data", help="its competition data (with --kernel)")
    p.add_argument("--envs", nargs="+", help="only these environments (pins, old, old:LIB, pin:LIB, old+wheels)")
    p.add_argument("--json", help="write the table as JSON here too")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    kernel, data = (Path(args.kernel), Path(args.data)) if args.kernel else demo_kernel(work)
    ours, old = _our_site(), build_old(work)
    libs = list(OLD)
    plan = {"pins": set(), "old": set(libs), **{f"old:{x}": {x} for x in libs},
            **{f"pin:{x}": set(libs) - {x} for x in libs}, "old+wheels": set(libs)}
    names = args.envs or list(plan)
    _, settings, _ = read_kernel(kernel)
    library = library_submission(data, kernel, settings, work / "library", progress=False)
    solution = data / "retrieval_solution_v2.1.csv"
    table = []
    for name in names:
        env = compose(work, name, plan[name], ours, old)
        k, overrides = with_wheels(work, kernel) if name == "old+wheels" else (kernel, None)
        keep = work / "runs" / env.name
        res = run_local(data, k, layouts=["classic"], overrides=overrides, parity=False, keep=keep,
                        stream=False, progress=False, site_dirs=[str(env)])
        run = res["runs"]["classic"]
        got = run["report"].get("environment", {}).get("libraries", {})
        row = {"env": name, "exit": run["returncode"], "status": run["status"], "seconds": run["seconds"],
               "libraries": got}
        want = {OLD[x][1]: OLD[x][0].split("==")[1] for x in plan[name] if OLD[x][1]}
        if name == "old+wheels":
            want.pop("timm")  # the packed timm (ours) replaces the old one
        wrong = {m: got.get(m) for m, v in want.items() if got.get(m) != v}
        if wrong:
            row["wrong_versions"] = wrong
        if run["status"] == "ok":
            row.update(compare(keep / "classic" / "submission.csv", library, solution))
        else:
            row["why"] = run.get("why") or run["log_tail"][-400:]
        table.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "libraries"}), file=sys.stderr)
    print(format_table(table))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    return 0


def format_table(table: list[dict]) -> str:
    lines = ["| environment | kernel's libraries (where not ours) | exit / status | rows identical | top-1 equal | "
             "top-100 overlap | mAP@100 kernel (Pub / Priv) | library |", "|---|---|---|---|---|---|---|---|"]
    ours = next((r["libraries"] for r in table if r["env"] == "pins"), {})
    for r in table:
        diff = ", ".join(f"{m} {v}" for m, v in r["libraries"].items() if ours and ours.get(m) != v) or "ours"
        if "wrong_versions" in r:
            diff += f" (NOT AS PLANNED: {r['wrong_versions']})"
        if "rows_identical" not in r:
            lines.append(f"| {r['env']} | {diff} | {r['exit']} / {r['status']}: {r.get('why', '')[:80]} | | | | | |")
            continue
        m = r["map"]
        lines.append(f"| {r['env']} | {diff} | {r['exit']} / {r['status']} | {r['rows_identical']} / {r['queries']} | "
                     f"{r['top1_equal']} / {r['queries']} | {100 * r['top100_overlap']:.2f}% | "
                     f"{m['kernel'][0]} / {m['kernel'][1]} | {m['library'][0]} / {m['library'][1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
