"""``glr kernel run``: a built kernel in a simulated ``/kaggle``, checked against the library.

For each mount layout a temporary folder gets ``kaggle/input`` (the competition data, the
weights dataset and, when collected, the wheels dataset, as symbolic links) and
``kaggle/working``. The script runs in a fresh interpreter (``python -I -S``: no
``PYTHONPATH``, no ``.pth`` files, so neither the installed ``glr`` nor anything it put on
the path is importable; site-packages are added by hand for torch, timm and the rest) in
which importing Lightning fails. Its ``submission.csv`` is validated and compared with the
library's: :mod:`glr.predict`'s chain (the one ``glr cv`` runs) on the same root and settings, in this process
(only when the kernel wrote its own submission: a fallback is reported with its reason instead). The
kernel's temporary folder is inside the simulated ``/kaggle``, so the bundle it unpacks and the wheels
it installs go with it: a run leaves nothing behind.

Layouts: ``classic`` (``input/<competition>``, ``input/<dataset-slug>``) and ``nested``
(``input/competitions/<competition>``, ``input/datasets/<owner>/<slug>``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from glr.kaggle.kernel.build import WEIGHTS_DIR, WHEELS_DIR, read_kernel
from glr.kaggle.kernel.runtime import REPORT, SETTINGS_DEFAULTS, SUBMISSION, StepTimer, list_images, predict
from glr.submission import read_submission, validate_submission_file
from glr.utils import InputError

log = logging.getLogger(__name__)

LAYOUTS = ("classic", "nested")

# Run as `python -I -S -c BOOT SITE_DIRS_JSON SCRIPT HIDDEN_JSON`: site-packages without their
# .pth files, Lightning made unimportable, the HIDDEN modules and glr itself invisible in
# site-packages (found only elsewhere on sys.path: the kernel's unpacked bundle, where it installs
# its wheels), then the script. glr is hidden so that a non-editable install (glr in site-packages
# beside torch) cannot stand in for the bundle.
_BOOT = r"""
import importlib.machinery, json, runpy, sys
site_dirs, script, hidden = json.loads(sys.argv[1]), sys.argv[2], set(json.loads(sys.argv[3])) | {"glr"}
sys.path.extend(site_dirs)
class _Block:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("lightning", "pytorch_lightning"):
            raise ImportError(f"{name} is not available to the kernel (glr kernel run blocks it)")
        if top in hidden and path is None:
            spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if p not in site_dirs])
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by glr kernel run --without)")
            return spec
        return None
sys.meta_path.insert(0, _Block())
sys.argv = [script]
runpy.run_path(script, run_name="__main__")
"""
# glr found outside site-packages (which the kernel's loader hides it in; see _BOOT), e.g. in the cwd
_PROBE = "import importlib.machinery, json, sys; dirs = json.loads(sys.argv[1]); " \
         "spec = importlib.machinery.PathFinder.find_spec('glr', [p for p in sys.path if p not in dirs]); " \
         "print(spec.origin if spec else '')"


def _site_dirs() -> list[str]:
    dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    return [d for d in dirs if "site-packages" in d or "dist-packages" in d]


def fresh_python(args: Sequence[str]) -> list[str]:
    """The command line of an isolated interpreter with site-packages but no ``.pth`` files."""
    return [sys.executable, "-I", "-S", *args]


def check_isolated(site_dirs: Sequence[str] | None = None) -> None:
    """Raise when the fresh interpreter can import ``glr`` (the parity would prove nothing)."""
    dirs = _site_dirs() if site_dirs is None else list(site_dirs)
    done = subprocess.run(fresh_python(["-c", _PROBE, json.dumps(dirs)]), capture_output=True, text=True)
    if done.returncode or done.stdout.strip():
        raise InputError(f"a fresh interpreter still finds glr ({done.stdout.strip() or done.stderr.strip()}); "
                         "install glr editable (pip install -e) or run from a clean environment")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src.resolve(), dst, target_is_directory=True)


def layout_inputs(kaggle: Path, layout: str, data: Path, kernel: Path, settings: Mapping[str, Any]) -> None:
    """Lay out ``kaggle/input`` and ``kaggle/working`` for one mount layout."""
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    inp = kaggle / "input"
    (kaggle / "working").mkdir(parents=True, exist_ok=True)
    comp = settings["competition"]
    _link(data, inp / comp if layout == "classic" else inp / "competitions" / comp)
    for kind, folder in (("weights_dataset", kernel / WEIGHTS_DIR), ("wheels_dataset", kernel / WHEELS_DIR)):
        ident = settings.get(kind)
        if not ident or not folder.is_dir():
            continue
        owner, slug = ident.split("/")
        _link(folder, inp / slug if layout == "classic" else inp / "datasets" / owner / slug)


def run_script(script: Path, kaggle: Path, env: Mapping[str, str] | None = None,
               timeout: float | None = None, stream: bool = True,
               without: Sequence[str] = (), site_dirs: Sequence[str] | None = None) -> tuple[int, float, str]:
    """Run the kernel script in a fresh interpreter with ``GLR_KAGGLE_ROOT=kaggle``, its
    working folder as the current directory and ``kaggle/tmp`` as its temporary folder (where
    the script unpacks its bundle and installs its wheels: removed with ``kaggle``);
    ``without`` names modules hidden from site-packages (an image that lacks them);
    ``site_dirs`` replaces this environment's site-packages (another set of libraries, e.g.
    Kaggle's versions). Returns (exit status, seconds, output); status -9 after ``timeout``."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("PYTHON", "GLR_", "KAGGLE_IS_COMPETITION_RERUN"))}
    (kaggle / "tmp").mkdir(parents=True, exist_ok=True)
    full_env.update(GLR_KAGGLE_ROOT=str(kaggle), TMPDIR=str(kaggle / "tmp"), **(env or {}))
    dirs = _site_dirs() if site_dirs is None else list(site_dirs)
    cmd = fresh_python(["-c", _BOOT, json.dumps(dirs), str(script.resolve()), json.dumps(list(without))])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=kaggle / "working", env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if stream:
                sys.stderr.write(f"  | {line}")
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = -9
    return rc, time.perf_counter() - t0, "".join(lines)


def compare_submissions(kernel_csv: Path, library_csv: Path, task: str) -> dict[str, Any]:
    """Row-by-row comparison keyed by id: counts of equal rows, ids in one file only, and up
    to five differing ids."""

    a, b = dict(read_submission(kernel_csv, task)), dict(read_submission(library_csv, task))
    common = sorted(set(a) & set(b))
    differ = [i for i in common if a[i] != b[i]]
    return {"kernel_rows": len(a), "library_rows": len(b), "equal_rows": len(common) - len(differ),
            "only_kernel": len(set(a) - set(b)), "only_library": len(set(b) - set(a)),
            "differ": differ[:5], "identical": not differ and set(a) == set(b)}


def library_submission(data: Path, kernel: Path, settings: Mapping[str, Any], out: Path,
                       progress: bool = True, rerun: bool = False) -> Path:
    """The library's submission on ``data`` with the kernel's settings and weights: the kernel's own
    :func:`~glr.kaggle.kernel.runtime.predict` (:mod:`glr.predict`'s chain, which ``glr cv`` runs too),
    run in this process by the installed package, on the test and index images the kernel lists
    (``limit_test`` / ``limit_index`` applied as the kernel applies them). Equal submissions then
    say that the bundle, the fresh interpreter and the mount layouts changed nothing."""
    s = {**SETTINGS_DEFAULTS, **settings, "progress": progress}
    test_ids, _ = list_images(data, "test")
    index_ids = list_images(data, "index")[0] if s["task"] == "retrieval" else []
    if not rerun:
        test_ids, index_ids = test_ids[: s["limit_test"] or None], index_ids[: s["limit_index"] or None]
    out.mkdir(parents=True, exist_ok=True)
    predict(s, data, kernel / WEIGHTS_DIR, out / SUBMISSION, test_ids, index_ids, StepTimer())
    return out / SUBMISSION


def _run_layout(layout: str, tmp: Path, data: Path, kernel: Path, script: Path, settings: Mapping[str, Any],
                env: Mapping[str, str], rerun: bool, timeout: float | None, stream: bool, without: Sequence[str],
                site_dirs: Sequence[str] | None) -> tuple[dict[str, Any], Path | None]:
    """One run of the kernel in ``tmp/<layout>/kaggle``: its record (see :func:`run_local`) and its
    submission, validated against the test images it listed (None when it wrote none)."""
    kaggle = tmp / layout / "kaggle"
    layout_inputs(kaggle, layout, data, kernel, settings)
    rc, seconds, output = run_script(script, kaggle, env, timeout, stream, without, site_dirs)
    working = kaggle / "working"
    report = json.loads((working / REPORT).read_text()) if (working / REPORT).is_file() else {}
    sub = working / SUBMISSION
    status = report.get("status", "no report")
    run: dict[str, Any] = {"returncode": rc, "timed_out": rc == -9 and timeout is not None, "seconds": round(seconds, 1),
                           "status": status, "fallback": status == "fallback" and sub.is_file(),
                           "why": report.get("reason") or report.get("error"), "report": report,
                           "rows": 0, "log_tail": output[-3000:]}
    if not sub.is_file():
        run["error"] = "no submission.csv written"
        return run, None
    test_ids, _ = list_images(data, "test")
    if settings.get("limit_test") and not rerun:
        test_ids = test_ids[: settings["limit_test"]]
    validate_submission_file(sub, settings["task"], expected_ids=test_ids or None)
    run["rows"] = len(read_submission(sub, settings["task"]))
    return run, sub


def run_local(data: str | os.PathLike, kernel: str | os.PathLike, layouts: Sequence[str] = LAYOUTS,
              rerun: bool = False, overrides: Mapping[str, Any] | None = None, parity: bool = True,
              keep: str | os.PathLike | None = None, timeout: float | None = None,
              stream: bool = True, progress: bool = True, without: Sequence[str] = (),
              site_dirs: Sequence[str] | None = None) -> dict[str, Any]:
    """Run a built kernel on ``data`` once per layout, validate each submission and compare it
    with the library's.

    Args:
        data: the competition data (a GLDv2-format root).
        kernel: the built kernel folder.
        rerun: set ``KAGGLE_IS_COMPETITION_RERUN`` (the hidden-set phase).
        overrides: kernel settings to override (``GLR_KERNEL_SETTINGS``).
        parity: also run the library pipeline and compare (only when every run's status is
            ``ok``: a fallback is not the library's submission, and says so itself).
        keep: copy each run's ``kaggle/working`` to ``keep/<layout>``.
        without: modules to hide from site-packages (e.g. ``faiss``: Kaggle's image lacks it,
            so the kernel must install it from the wheels dataset or search with torch).
        site_dirs: the kernel's site-packages instead of this environment's (other library
            versions; the library's submission is still this environment's).

    Returns:
        ``{"kernel", "runs": {layout: {"returncode", "timed_out", "seconds", "status",
        "fallback" (whether the fallback is the output), "why" (its reason or error),
        "report", "rows", "log_tail"}}, "parity": … or "parity_skipped": why}``. Everything the
        runs write (their ``/kaggle``, the bundle the script unpacks, the wheels it installs)
        is removed afterwards.
    """

    data, kernel = Path(data), Path(kernel)
    if not data.is_dir():
        raise InputError("competition data folder not found", data)
    meta, settings, script = read_kernel(kernel)
    settings = {**settings, **(overrides or {})}
    check_isolated(site_dirs)
    env = {"GLR_KERNEL_SETTINGS": json.dumps(dict(overrides))} if overrides else {}
    if rerun:
        env["KAGGLE_IS_COMPETITION_RERUN"] = "1"
    result: dict[str, Any] = {"kernel": meta["id"], "runs": {}}
    with tempfile.TemporaryDirectory(prefix="glr_kaggle_") as tmp:
        first: Path | None = None  # the first layout's submission; the others must equal it
        for layout in layouts:
            log.info("kernel %s, %s layout: running %s", meta["id"], layout, script.name)
            run, sub = _run_layout(layout, Path(tmp), data, kernel, script, settings, env, rerun, timeout, stream,
                                   without, site_dirs)
            if sub is not None and first is None:
                first = Path(tmp) / "first_submission.csv"
                shutil.copyfile(sub, first)
            elif sub is not None:
                run["same_as_first_layout"] = compare_submissions(sub, first, settings["task"])["identical"]
            if keep is not None:
                dst = Path(keep) / layout
                shutil.rmtree(dst, ignore_errors=True)
                shutil.copytree(Path(tmp) / layout / "kaggle" / "working", dst)
            result["runs"][layout] = run
        not_ok = [f"{layout}: {r['status']}" for layout, r in result["runs"].items() if r["status"] != "ok"]
        if parity and not_ok:
            result["parity_skipped"] = f"the kernel's output is not its own submission ({', '.join(not_ok)})"
        elif parity and first is not None:
            lib = library_submission(data, kernel, settings, Path(tmp) / "library", progress=progress, rerun=rerun)
            result["parity"] = compare_submissions(first, lib, settings["task"])
    return result


def exit_status(result: Mapping[str, Any]) -> int:
    """``glr kernel run``'s exit status: the kernel's own (the first non-zero one over the layouts;
    1 for a run killed at its time-out), else 1 when the parity found a difference, else 0. A
    fallback the kernel exits 0 with (the rerun, a commit run with ``commit_mode: fallback``,
    no test image) is then 0."""
    for r in result["runs"].values():
        if r["returncode"]:
            return r["returncode"] if r["returncode"] > 0 else 1
    p = result.get("parity")
    return 1 if p is not None and not p["identical"] else 0


def format_result(result: Mapping[str, Any]) -> str:
    """A few lines for the terminal: each layout's exit status, status (with the reason or the
    error of a fallback) and time, and the parity."""
    lines = [f"kernel {result['kernel']}:"]
    for layout, r in result["runs"].items():
        extra = "" if "same_as_first_layout" not in r else \
            (", same submission as the first layout" if r["same_as_first_layout"] else ", DIFFERENT from the first layout")
        exit_ = "timed out" if r.get("timed_out") else f"exit {r['returncode']}"
        lines.append(f"  {layout:<8} {exit_}, status {r['status']}, {r.get('rows', 0)} rows, {r['seconds']:.1f} s{extra}")
        if r.get("fallback"):
            lines.append(f"           the fallback submission is the output: {r.get('why') or 'no reason given'}")
        elif r["status"] != "ok" and r.get("why"):
            lines.append(f"           {r['why']}")
        if r.get("error"):
            lines.append(f"           {r['error']}")
    p = result.get("parity")
    if result.get("parity_skipped"):
        lines.append(f"  parity: not checked: {result['parity_skipped']}")
    elif p is not None:
        if p["identical"]:
            lines.append(f"  parity: the kernel's submission.csv equals the library's ({p['equal_rows']} rows identical)")
        else:
            lines.append(f"  parity: DIFFERENT: {p['equal_rows']} equal rows, kernel {p['kernel_rows']} rows, "
                         f"library {p['library_rows']} rows, differing ids {p['differ']}")
    return "\n".join(lines)
