"""Start-up time and memory of the command line against ``python -c "import numpy"``.

    python bench/bench_startup.py [--repeats 7]

Each command runs in a fresh interpreter (``subprocess``), the commands interleaved, ``--repeats``
times after one warm-up round; the wall time (``time.perf_counter``) and the peak RSS (``wait4``)
are medians. Prints each command's figures and its ratio to the numpy baseline; target: ``glr --help``
within 3x the baseline's time. The behaviour behind it (building the parser imports no torch,
timm, Lightning, faiss, matplotlib or kaggle client) is tested in ``tests/test_cli.py``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 3.0


def _glr() -> list[str]:
    """The ``glr`` console script beside this interpreter (what a user types), else ``python -m glr``."""
    script = Path(sys.executable).with_name("glr")
    if script.is_file():
        return [str(script)]
    found = shutil.which("glr")
    return [found] if found else [sys.executable, "-m", "glr"]


def _run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one run of ``cmd`` (output discarded; it must exit 0)."""
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (peak RSS)
        seconds = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{err.read().decode(errors='replace')}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (after one warm-up round)")
    a = ap.parse_args(argv)
    glr = _glr()
    commands = {
        'python -c "import numpy"': [sys.executable, "-c", "import numpy"],
        'python -c "import glr"': [sys.executable, "-c", "import glr"],
        "glr --help": glr + ["--help"],
        "glr score --help": glr + ["score", "--help"],
        "glr submit --help": glr + ["submit", "--help"],
        "glr submit file --help": glr + ["submit", "file", "--help"],
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for r in range(a.repeats + 1):
        for name, cmd in commands.items():
            result = _run(cmd)
            if r:  # round 0 warms the file cache
                runs[name].append(result)
    base_name = next(iter(commands))
    base_s = statistics.median(s for s, _ in runs[base_name])
    base_mb = statistics.median(m for _, m in runs[base_name])
    print(f"{' '.join(glr)}; median of {a.repeats} runs each")
    print(f"{'command':28s} {'seconds':>8s} {'x numpy':>8s} {'peak MiB':>9s} {'x numpy':>8s}")
    for name in commands:
        s = statistics.median(x for x, _ in runs[name])
        mb = statistics.median(m for _, m in runs[name])
        print(f"{name:28s} {s:8.3f} {s / base_s:8.2f} {mb:9.1f} {mb / base_mb:8.2f}")
    ratio = statistics.median(s for s, _ in runs["glr --help"]) / base_s
    print(f"glr --help: {ratio:.2f}x the numpy import (target <= {TARGET:g}x: {'PASS' if ratio <= TARGET else 'FAIL'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
