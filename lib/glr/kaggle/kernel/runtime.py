"""What runs on Kaggle: inputs found, fallback first, ensemble embedded, post-processed, written.

The generated script (:mod:`glr.kaggle.kernel.build`) unpacks the package's inference modules and
calls :func:`main` with the settings it was built with. Everything here must run offline on
Kaggle's image: no Lightning, no ``glr`` install, faiss only when importable (or installed
from the wheels dataset), torch search otherwise, the GPU with fp16 autocast when present.

Order of work, so that a crash or a time-out never costs the submission:

1. find the competition, weights and wheels folders under either mount layout
   (``/kaggle/input/<slug>`` or ``/kaggle/input/competitions/<slug>`` and
   ``/kaggle/input/datasets/<owner>/<slug>``, then a marker search);
2. list the test and index images (a missing folder counts as empty);
3. detect the phase: ``rerun`` (``KAGGLE_IS_COMPETITION_RERUN`` is set: the hidden test
   set), ``commit`` (as many test images as ``sample_submission.csv`` has rows: the public
   commit run), else ``local``; write the fallback submission (the sample's cells for the
   ids it has, empty cells for the rest) atomically. ``commit_mode: fallback`` stops here
   in the commit run;
4. install from the wheels dataset what the image lacks (faiss) and the packed version of
   ``prefer_wheels`` (timm: the version that built the model) when it differs from the image's;
   record the libraries' versions (``environment.libraries`` of the report);
5. embed test and index (and train, for the landmark–country re-ranking or recognition)
   with every ensemble member; unreadable images are counted and skipped (an unreadable
   query keeps an empty row, an unreadable index image is left out of the index); a member
   trained with another torch or timm major.minor (or NumPy major) than the running one is
   logged as a warning naming it (``version_warnings`` of the report);
6. search and post-process with :mod:`glr.predict`'s chain (the one ``glr cv`` runs),
   then replace the fallback with the real submission, validated, atomically.

Every step is timed; the log ends with a table projecting the total for a hidden set of
``hidden_test_size`` images. ``glr_kernel_report.json`` beside ``submission.csv`` records
the status (``ok``; ``fallback`` with a ``reason`` or an ``error``: the fallback is the
output; ``failed``: a failure before the fallback was written, an empty one is then tried),
counts (with ``test_unreadable``, ``index_unreadable``, ``train_unreadable``) and timings; a
report that cannot be written (a full disk) is only logged. No test image (an empty or
missing ``test/`` folder) is not a failure: the fallback (the sample's rows; the header alone
when the sample has none or is absent) is the output, status ``fallback``, reason
``no test images``, exit status 0.

Any failure after the fallback (a crash, a full disk when writing the real submission, which
is replaced atomically or not at all) leaves the fallback in place; the exit status is then 0
in the rerun (the fallback still scores) and 1 otherwise (so a commit run that fails shows as
failed). Exit status 1 as well when no submission could be written at all.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

log = logging.getLogger("glr.kaggle.kernel")

#: Every kernel setting with its default (the build writes the rest into the script).
SETTINGS_DEFAULTS: dict[str, Any] = dict(
    name="glr-kernel",
    task="retrieval",                    # retrieval (id,images) | recognition (id,landmarks)
    competition="landmark-retrieval-2021",
    weights_dataset=None,                # "owner/slug" of the weights dataset
    wheels_dataset=None,                 # "owner/slug" of the wheels dataset, or None
    members=[],                          # [{"file", "weight", "image_size"}]
    ensemble_mode="concat",
    tta_flip=False,
    tta_scales=[1.0],
    postprocess={},                      # a glr.postprocess.config config
    k=100,
    train_subset="clean",                # the tagging / recognition database
    recognition_top_k=5,
    batch_size=64,
    num_workers="auto",                  # loader workers, or auto: the usable cores less one, at most 8
    precision=None,                      # extraction on CUDA: fp16 (None: the default) | bf16 | fp32; CPU: fp32
    compile=False,                       # wrap each network in torch.compile (its first batches compile)
    commit_mode="full",                  # full | fallback: what the public commit run does
    hidden_test_size=None,               # projection: test images in the hidden set
    hidden_index_size=None,              # projection: index images in the hidden set (default: same)
    modules=["faiss"],                   # modules to install from the wheels dataset when missing
    prefer_wheels=["timm"],              # pure-Python packages whose packed version replaces the image's
    progress=True,
    limit_test=None,                     # local iteration only: the first N test images (ignored in the rerun)
    limit_index=None,                    # local iteration only: the first N index images (ignored in the rerun)
)
REPORT = "glr_kernel_report.json"
SUBMISSION = "submission.csv"
TRAIN_EMBEDDINGS = "train_embeddings.npz"   # optional, in the weights dataset: precomputed train rows
COUNTRIES = "train_label_to_country.csv"    # optional, in the competition or the weights dataset


# --------------------------------------------------------------------------- timing
@dataclass
class StepTimer:
    """Wall time per step, each tagged with what it scales with (``test``, ``index``,
    ``train`` or None for fixed costs)."""

    rows: list[tuple[str, float, str | None]] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def step(self, name: str, scales_with: str | None = None) -> Iterator[None]:
        log.info("step %s ...", name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.rows.append((name, dt, scales_with))
            log.info("step %s: %.1f s (%.1f s so far)", name, dt, time.perf_counter() - self.start)

    def projection(self, counts: Mapping[str, int], hidden: Mapping[str, int | None]) -> list[dict[str, Any]]:
        """Each step's seconds and its projection: seconds × hidden[scales_with] / counts[scales_with]
        (1 when either is unknown). kNN search and the chain are projected with the test count
        (linear in the queries for a fixed index; k-reciprocal's joint graph grows faster)."""
        out = []
        for name, sec, scale in self.rows:
            n, h = counts.get(scale or "", 0), hidden.get(scale or "")
            factor = h / n if scale and n and h else 1.0
            out.append({"step": name, "seconds": round(sec, 3), "scales_with": scale,
                        "projected_seconds": round(sec * factor, 3)})
        return out


def format_projection(rows: Sequence[Mapping[str, Any]], counts: Mapping[str, int],
                      hidden: Mapping[str, int | None]) -> str:
    """The timing table as text, with totals."""
    lines = [f"{'step':<34} {'seconds':>9} {'scales with':>12} {'projected':>10}"]
    for r in rows:
        scale = r["scales_with"] or "-"
        lines.append(f"{r['step']:<34} {r['seconds']:>9.1f} {scale:>12} {r['projected_seconds']:>10.1f}")
    total = sum(r["seconds"] for r in rows)
    proj = sum(r["projected_seconds"] for r in rows)
    sizes = ", ".join(f"{k} {counts.get(k, 0)} → {v}" for k, v in hidden.items() if v)
    lines.append(f"{'total':<34} {total:>9.1f} {'':>12} {proj:>10.1f}")
    if sizes:
        lines.append(f"projected for the hidden set ({sizes}): {proj / 60:.1f} min")
    return "\n".join(lines)


# --------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """The folders the kernel reads; ``layout`` says how they were found."""

    competition: Path | None
    weights: Path | None
    wheels: Path | None
    layout: str


def _dataset_candidates(input_root: Path, dataset: str | None) -> list[Path]:
    if not dataset:
        return []
    owner, _, slug = dataset.rpartition("/")
    out = [input_root / slug, input_root / "datasets" / slug]
    if owner:
        out.insert(1, input_root / "datasets" / owner / slug)
    return out


def _walk_dirs(root: Path, depth: int = 4) -> Iterator[Path]:
    """Folders under ``root`` (``root`` included), breadth first, at most ``depth`` levels down."""
    level = [root]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            yield d
            with contextlib.suppress(OSError):
                nxt += sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        level = nxt


def _is_competition(d: Path) -> bool:
    return (d / "test").is_dir() or (d / "sample_submission.csv").is_file()


def find_inputs(input_root: str | os.PathLike, settings: Mapping[str, Any]) -> Inputs:
    """Locate the competition data, the weights dataset and the wheels dataset.

    Tries the classic mount (``<input>/<slug>``), then the nested one
    (``<input>/competitions/<slug>``, ``<input>/datasets/<owner>/<slug>``), then any folder
    at most four levels down that looks right (competition: ``test/`` or
    ``sample_submission.csv``; weights: every member file; wheels: ``*.whl`` files).
    """
    input_root = Path(input_root)
    slug = settings.get("competition") or ""
    members = [m["file"] for m in settings.get("members", [])]
    layout = []

    def pick(kind: str, candidates: Sequence[Path], ok) -> Path | None:
        for c in candidates:
            if c.is_dir() and ok(c):
                layout.append(f"{kind}: {'nested' if c.parent != input_root else 'classic'}")
                return c
        for d in _walk_dirs(input_root):
            if ok(d):
                layout.append(f"{kind}: found at {d}")
                return d
        return None

    comp = pick("competition", [input_root / slug, input_root / "competitions" / slug] if slug else [],
                _is_competition)
    weights = pick("weights", _dataset_candidates(input_root, settings.get("weights_dataset")),
                   lambda d: bool(members) and all((d / f).is_file() for f in members))
    wheels = pick("wheels", _dataset_candidates(input_root, settings.get("wheels_dataset")),
                  lambda d: any(d.glob("*.whl"))) if settings.get("wheels_dataset") else None
    return Inputs(comp, weights, wheels, "; ".join(layout))


def list_images(folder: Path | None, split: str) -> tuple[list[str], int]:
    """Ids of ``<folder>/<split>/<a>/<b>/<c>/<id>.jpg`` (in ``<split>.csv`` order when there is one,
    else sorted) and the number of ``.jpg`` files elsewhere in that tree (skipped: they could not be
    found by id). A missing folder is empty."""
    base = None if folder is None else folder / split
    if base is None or not base.is_dir():
        log.warning("no %s/ folder%s: 0 %s images", split, "" if folder is None else f" in {folder}", split)
        return [], 0
    ids, misplaced = [], 0
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(base).parts
        for name in filenames:
            if not name.endswith(".jpg") or name.startswith("."):
                continue
            stem = name[:-4]
            if len(rel) == 3 and len(stem) >= 3 and tuple(stem[:3]) == rel:
                ids.append(stem)
            else:
                misplaced += 1
    if misplaced:
        log.warning("%d .jpg files under %s are not at %s/<id[0]>/<id[1]>/<id[2]>/<id>.jpg; skipped",
                    misplaced, base, split)
    return _listed_order(folder / f"{split}.csv", ids), misplaced


def _listed_order(listing: Path, ids: list[str]) -> list[str]:
    """``ids`` in the order of ``<split>.csv`` when the root has one (the order the library uses,
    so that near-ties break the same way), then the unlisted ones sorted; sorted without it."""
    ids = sorted(ids)
    if not listing.is_file():
        return ids
    from glr.data.readers import read_ids  # noqa: PLC0415
    from glr.utils import InputError  # noqa: PLC0415

    try:
        listed = read_ids(listing)
    except InputError as e:
        log.warning("ignoring %s: %s", listing.name, e)
        return ids
    present = set(ids)
    order = [i for i in listed if i in present]
    seen = set(order)
    return order + [i for i in ids if i not in seen]


# --------------------------------------------------------------------------- phase and fallback
def read_sample(comp: Path | None, task: str) -> dict[str, str] | None:
    """``sample_submission.csv`` as id → cell, or None when absent or unreadable."""
    from glr.submission import read_submission  # noqa: PLC0415
    from glr.utils import InputError  # noqa: PLC0415

    path = None if comp is None else comp / "sample_submission.csv"
    if path is None or not path.is_file():
        return None
    try:
        return dict(read_submission(path, task))
    except InputError as e:
        log.warning("ignoring the sample submission: %s", e)
        return None


def detect_phase(n_test: int, sample: Mapping[str, str] | None) -> str:
    """``rerun`` (hidden test set), ``commit`` (the visible sample) or ``local``."""
    if os.environ.get("KAGGLE_IS_COMPETITION_RERUN"):
        return "rerun"
    if sample is not None and len(sample) == n_test:
        return "commit"
    return "local"


def write_fallback(out: Path, task: str, test_ids: Sequence[str], sample: Mapping[str, str] | None) -> int:
    """Write the fallback submission: one row per test id (the sample's cell when it has the
    id and the cell is valid, else empty); the sample's rows when no test image was listed.
    Returns the number of rows."""
    from glr.submission import write_submission  # noqa: PLC0415
    from glr.utils import InputError  # noqa: PLC0415

    sample = dict(sample or {})
    rows = [(i, sample.get(i, "")) for i in test_ids] if test_ids else list(sample.items())
    try:
        write_submission(out, rows, task)  # validates before writing anything
    except InputError:
        write_submission(out, [(i, "") for i, _ in rows], task)
    return len(rows)


# --------------------------------------------------------------------------- wheels and versions
#: The libraries the kernel reports (``glr_kernel_report.json``: ``environment.libraries``), each
#: as its import name → the distributions that provide it.
LIBRARIES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",), "torchvision": ("torchvision",), "timm": ("timm",), "numpy": ("numpy",),
    "PIL": ("pillow",), "cv2": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
                                "opencv-contrib-python"),
    "scipy": ("scipy",), "sklearn": ("scikit-learn",), "faiss": ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu"),
}
#: How much of the version an artifact records (``meta["versions"]``) the running library must match:
#: torch and timm major.minor (kernels, layer defaults and pretrained configs move between minors),
#: numpy major (its ABI and sorting move between majors).
VERSION_PARTS = {"torch": 2, "timm": 2, "numpy": 1}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _dist_key(name: str) -> str:
    """A distribution name as wheel file names spell it (``faiss-cpu`` → ``faiss_cpu``)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def _installed_version(dist: str) -> str | None:
    """The version of ``dist`` first found on ``sys.path`` (None when absent)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str]:
    """Import name → version of each of :data:`LIBRARIES` present: ``__version__`` of an imported
    module (torch's names its build, ``2.14.1+cu130``), else the first distribution found on
    ``sys.path`` (what an import would load)."""
    out = {}
    for module, dists in LIBRARIES.items():
        version = getattr(sys.modules.get(module), "__version__", None)
        version = version or next((v for v in map(_installed_version, dists) if v is not None), None)
        if version is not None:
            out[module] = str(version)
    return out


def _version_key(version: str, parts: int) -> tuple[int, ...] | None:
    """The first ``parts`` numbers of a version (``"2.14.1+cu130"`` → ``(2, 14)``), None if unparsable."""
    m = re.match(r"(\d+)(?:\.(\d+))?", str(version))
    return None if m is None else tuple(int(x or 0) for x in m.groups())[:parts]


def version_warnings(member: str, recorded: Mapping[str, Any], running: Mapping[str, str]) -> list[str]:
    """One line per library of :data:`VERSION_PARTS` whose running version differs from the one
    ``member`` was trained with (``recorded``: the artifact's ``meta["versions"]``; an artifact
    without it, or a library it does not record, is not compared)."""
    out = []
    for lib, parts in VERSION_PARTS.items():
        want, have = recorded.get(lib), running.get(lib)
        if want and have and _version_key(want, parts) != _version_key(have, parts):
            level = "major.minor" if parts == 2 else "major"
            out.append(f"member {member} was trained with {lib} {want}; the kernel runs {lib} {have} "
                       f"(another {level} version: embeddings may differ)")
    return out


def packed_wheels(wheels: Path | None) -> dict[str, tuple[str, Path]]:
    """The wheels dataset's wheels as distribution (normalised, see :func:`_dist_key`) → (version,
    file), read from the names (``{name}-{version}(-{build})-{python}-{abi}-{platform}.whl``)."""
    out: dict[str, tuple[str, Path]] = {}
    for f in sorted(wheels.glob("*.whl")) if wheels is not None else []:
        parts = f.name[: -len(".whl")].split("-")
        if len(parts) in (5, 6):
            out[_dist_key(parts[0])] = (parts[1], f)
    return out


def _pip_target(files: Sequence[Path]) -> Path | None:
    """``pip install --no-index --no-deps --target`` of ``files`` into a new temporary folder
    (removed when the interpreter exits); the folder, or None when pip fails (logged)."""
    target = Path(tempfile.mkdtemp(prefix="glr_wheels_"))
    atexit.register(shutil.rmtree, target, True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check",
           "--target", str(target), *map(str, files)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        log.warning("pip could not install %s (exit %d): %s", ", ".join(f.name for f in files), done.returncode,
                    done.stderr.strip()[-500:])
        return None
    return target


def _forget(module: str) -> None:
    for name in [m for m in sys.modules if m == module or m.startswith(f"{module}.")]:
        del sys.modules[name]


def prefer_packed(names: Sequence[str], wheels: Path | None) -> list[str]:
    """Run the wheels dataset's version of each of ``names`` instead of the image's when the two
    differ: the version that built the model (``glr kernel wheels`` packs it).

    Only for pure-Python distributions imported under their own name (timm): installed with
    ``--no-deps`` into their own folder put first on ``sys.path``, they run on the image's torch,
    NumPy and the rest. A package already imported stays the image's; so does one whose packed
    version fails to import (its folder is taken off ``sys.path`` again). Both are logged.

    Returns:
        The names now imported from the wheels dataset.
    """
    packed, used = packed_wheels(wheels), []
    for name in names:
        want, file = packed.get(_dist_key(name), (None, None))
        have = _installed_version(name)
        if file is None or want == have:
            continue
        if name in sys.modules:
            log.warning("%s %s is already imported: the packed %s %s cannot replace it", name, have, name, want)
            continue
        target = _pip_target([file])
        if target is None:
            continue
        sys.path.insert(0, str(target))
        importlib.invalidate_caches()
        try:
            origin = str(getattr(importlib.import_module(name), "__file__", ""))
            problem = None if origin.startswith(str(target)) else f"imported from {origin}"
        except Exception as e:  # noqa: BLE001 - a packed version that breaks on this image is not used
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            used.append(name)
            log.info("%s %s from the wheels dataset replaces the image's %s", name, want, have or "(none)")
            continue
        log.warning("the packed %s %s does not import (%s): using the image's %s", name, want, problem, have)
        sys.path.remove(str(target))
        _forget(name)
        importlib.invalidate_caches()
    return used


def ensure_modules(modules: Sequence[str], wheels: Path | None, prefer: Sequence[str] = ()) -> list[str]:
    """Make ``modules`` importable and ``prefer`` the packed versions.

    First :func:`prefer_packed` for ``prefer``; then, when one of ``modules`` does not import, every
    other wheel of ``wheels`` is installed (``pip --no-index --no-deps --target``, into a temporary
    folder put first on ``sys.path``). Returns the modules still missing (the kernel then falls
    back: torch search instead of faiss)."""
    prefer_packed(prefer, wheels)
    missing = [m for m in modules if not _importable(m)]
    if not missing:
        return []
    skip = {_dist_key(p) for p in prefer}
    files = [f for f in (sorted(wheels.glob("*.whl")) if wheels is not None else [])
             if _dist_key(f.name.split("-")[0]) not in skip]
    if not files:
        log.warning("%s not importable and no wheels for it: falling back", ", ".join(missing))
        return missing
    target = _pip_target(files)
    if target is not None:
        sys.path.insert(0, str(target))
        importlib.invalidate_caches()
    still = [m for m in missing if not _importable(m)]
    log.info("installed %d wheel(s) from %s; %s", len(files), wheels,
             f"still missing: {', '.join(still)}" if still else f"{', '.join(missing)} now import(s)")
    return still


# --------------------------------------------------------------------------- the work
def _environment() -> dict[str, Any]:
    import torch  # noqa: PLC0415

    from glr.search import resolve_backend  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "fp16": cuda,
            "search": resolve_backend("auto"), "libraries": library_versions()}


def _check_versions(member: Any, warnings: list[str]) -> None:
    """Log (and append to ``warnings``) each library ``member`` was trained with at another version."""
    for line in version_warnings(member.name, member.meta.get("versions") or {}, library_versions()):
        log.warning("%s", line)
        warnings.append(line)


def _members(settings: Mapping[str, Any], weights: Path) -> list[Any]:
    """The ensemble of the settings as :class:`glr.predict.MemberSpec` (files in the weights dataset,
    each checked against the sha256 its ``manifest.json`` records)."""
    from glr.model.weights import listed_artifact  # noqa: PLC0415
    from glr.predict import MemberSpec  # noqa: PLC0415

    return [MemberSpec(listed_artifact(weights, m["file"]), float(m.get("weight", 1.0)), m.get("image_size"))
            for m in settings["members"]]


def _train_rows(settings: Mapping[str, Any], comp: Path, weights: Path,
                timer: StepTimer) -> tuple[list[str], list[int], np.ndarray | None]:
    """Train ids and landmarks of the tagging / recognition database, and their precomputed
    embeddings when the weights dataset has ``train_embeddings.npz`` covering every id."""
    from glr.data.root import GLDv2Root  # noqa: PLC0415
    from glr.embeddings.npz import load_embeddings  # noqa: PLC0415

    pairs = GLDv2Root.open(comp).train_ids_labels(settings["train_subset"])
    ids, landmarks = [i for i, _ in pairs], [lm for _, lm in pairs]
    pre = weights / TRAIN_EMBEDDINGS
    if pre.is_file():
        with timer.step("load train embeddings"):
            got, e = load_embeddings(pre)
            row = {i: r for r, i in enumerate(got)}
            if all(i in row for i in ids):
                return ids, landmarks, np.ascontiguousarray(e[[row[i] for i in ids]])
            log.warning("%s lacks some train ids; embedding the train images instead", pre)
    return ids, landmarks, None


def _countries(comp: Path, weights: Path) -> dict[int, str] | None:
    from glr.data.readers import read_label_table  # noqa: PLC0415

    for folder in (comp, weights):
        if (folder / COUNTRIES).is_file():
            return read_label_table(folder / COUNTRIES, "country")
    return None


def predict(settings: Mapping[str, Any], comp: Path, weights: Path, out: Path, test_ids: Sequence[str],
            index_ids: Sequence[str], timer: StepTimer, warnings: list[str] | None = None) -> dict[str, Any]:
    """Embed, search, post-process and write ``out`` (validated, atomically) with :mod:`glr.predict`'s
    chain, the one ``glr cv`` runs. Returns counts; each member trained with other library versions
    than these (:func:`version_warnings`) is logged and appended to ``warnings``."""
    from glr.data.readers import image_path  # noqa: PLC0415
    from glr import predict as chain  # noqa: PLC0415
    from glr.postprocess.cache import GraphCache  # noqa: PLC0415
    from glr.postprocess.chain import check_search  # noqa: PLC0415
    from glr.postprocess.config import normalize_config  # noqa: PLC0415
    from glr.submission import write_submission  # noqa: PLC0415
    from glr.data.images import resolve_num_workers  # noqa: PLC0415

    task = settings["task"]
    workers = resolve_num_workers(settings["num_workers"], "num_workers", "the kernel's settings")
    source = "the kernel's post-processing settings"
    config = normalize_config(settings.get("postprocess") or {}, source)
    config["k"] = int(settings["k"])
    needs_train = chain.needs_train(config, recognition=task == "recognition")
    splits: dict[str, Sequence[str]] = {"test": list(test_ids)}
    if task == "retrieval" and index_ids:
        splits["index"] = list(index_ids)
    train_ids, train_lm, train_emb = ([], [], None)
    if needs_train:
        train_ids, train_lm, train_emb = _train_rows(settings, comp, weights, timer)
        if train_emb is None:
            splits["train"] = train_ids
    check_search(config, len(test_ids), len(splits.get("index", ())), len(train_ids),
                 recognition=task == "recognition", source=source)  # before the embedding
    progress = bool(settings["progress"])
    emb, ok = chain.embed_ensemble(_members(settings, weights), comp, splits, mode=settings["ensemble_mode"],
                                   batch_size=int(settings["batch_size"]), num_workers=workers,
                                   tta=chain.TTA(bool(settings["tta_flip"]), tuple(settings["tta_scales"])),
                                   progress=progress, step=timer.step, precision=settings["precision"],
                                   compile=bool(settings["compile"]), on_load=lambda m: _check_versions(m, [] if warnings is None else warnings))
    t_emb, t_ok = (None, None)
    if needs_train:
        t_emb, t_ok = (train_emb, np.ones(len(train_ids), bool)) if train_emb is not None else (emb["train"], ok["train"])
    q_ids, q = chain.readable(test_ids, emb["test"], ok["test"])
    counts = {"test": len(test_ids), "test_unreadable": int((~ok["test"]).sum())}
    cache = GraphCache(progress=progress)
    if task == "retrieval":
        db_ids, db = (chain.readable(index_ids, emb["index"], ok["index"]) if "index" in splits
                      else ([], np.zeros((0, q.shape[1]), np.float32)))
        counts.update(index=len(index_ids), index_unreadable=len(index_ids) - len(db_ids))
        if not db_ids:
            log.warning("no readable index image: every query gets an empty row")
        ctx = chain.chain_context(t_emb, t_ok, train_lm if needs_train else None, _countries(comp, weights)
                                  if needs_train else None,
                                  q_paths=[str(image_path(comp, "test", i)) for i in q_ids] if config.get("spatial") else None,
                                  db_paths=[str(image_path(comp, "index", i)) for i in db_ids] if config.get("spatial") else None)
        with timer.step("search + post-processing", scales_with="test"):
            I, _ = chain.rank(q, db, config, ctx=ctx, cache=cache, progress=progress, source=source)
        with timer.step("write submission"):
            write_submission(out, chain.retrieval_rows(test_ids, q_ids, db_ids, I), "retrieval",
                             expected_ids=test_ids, index_ids=set(db_ids))
    else:
        ctx = chain.chain_context(t_emb, t_ok, train_lm, _countries(comp, weights))
        with timer.step("recognition vote", scales_with="test"):
            rows = chain.recognition_rows(test_ids, q_ids, q, ctx, top_k=int(settings["recognition_top_k"]),
                                          cache=cache, config=config, source=source)
        with timer.step("write submission"):
            write_submission(out, rows, "recognition", expected_ids=test_ids)
    if needs_train:
        counts.update(train=len(train_ids), train_unreadable=int(len(train_ids) - t_ok.sum()))
    return counts


def _settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    s = {**SETTINGS_DEFAULTS, **(settings or {})}
    extra = os.environ.get("GLR_KERNEL_SETTINGS")  # local runs override settings without a rebuild
    if extra:
        s.update(json.loads(extra))
    unknown = sorted(set(s) - set(SETTINGS_DEFAULTS) - {"glr_version", "built"})
    if unknown:
        raise ValueError(f"unknown kernel setting(s): {', '.join(unknown)}")
    if s["task"] not in ("retrieval", "recognition"):
        raise ValueError(f"task must be retrieval or recognition, got {s['task']!r}")
    return s


def main(settings: Mapping[str, Any] | None = None, kaggle_root: str | os.PathLike | None = None) -> int:
    """Run the kernel; returns the exit status (see the module docstring). Logs to stdout with
    timestamps while it runs; the root logger's handlers are put back afterwards."""
    root_logger = logging.getLogger()
    saved = root_logger.handlers[:], root_logger.level
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    root_logger.handlers[:] = [handler]
    root_logger.setLevel(logging.INFO)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        return _main(settings, kaggle_root)
    finally:
        root_logger.handlers[:] = saved[0]
        root_logger.setLevel(saved[1])


def _main(settings: Mapping[str, Any] | None, kaggle_root: str | os.PathLike | None) -> int:
    if not sys.stderr.isatty():  # Kaggle's log: a progress line every 20 s, not every update
        os.environ.setdefault("TQDM_MININTERVAL", "20")
    timer = StepTimer()
    root = Path(kaggle_root or os.environ.get("GLR_KAGGLE_ROOT", "/kaggle"))
    working = root / "working"
    working.mkdir(parents=True, exist_ok=True)
    out = working / SUBMISSION
    report: dict[str, Any] = {"status": "started", "counts": {}}
    phase = "rerun" if os.environ.get("KAGGLE_IS_COMPETITION_RERUN") else "local"
    s: dict[str, Any] = dict(SETTINGS_DEFAULTS)
    test_ids: list[str] = []
    try:
        s = _settings(settings)
        report["settings"] = {k: s[k] for k in ("name", "task", "competition", "glr_version") if k in s}
        log.info("glr kernel %s (glr %s), task %s", s["name"], s.get("glr_version", "?"), s["task"])
        inputs = find_inputs(root / "input", s)
        report["inputs"] = {"competition": str(inputs.competition), "weights": str(inputs.weights),
                            "wheels": str(inputs.wheels), "layout": inputs.layout}
        log.info("inputs: %s", report["inputs"])
        with timer.step("list images"):
            test_ids, skipped_test = list_images(inputs.competition, "test")
            index_ids, skipped_index = (list_images(inputs.competition, "index") if s["task"] == "retrieval"
                                        else ([], 0))
        sample = read_sample(inputs.competition, s["task"])
        phase = detect_phase(len(test_ids), sample)
        if s["limit_test"] or s["limit_index"]:
            if phase == "rerun":
                log.warning("limit_test / limit_index are for local iteration: ignored in the rerun")
            else:
                test_ids = test_ids[: s["limit_test"] or None]
                index_ids = index_ids[: s["limit_index"] or None]
                log.info("local iteration: limited to %d test and %d index images", len(test_ids), len(index_ids))
        report["counts"] = {"test": len(test_ids), "index": len(index_ids), "test_misplaced": skipped_test,
                            "index_misplaced": skipped_index}
        log.info("phase %s: %d test, %d index images", phase, len(test_ids), len(index_ids))
        with timer.step("fallback submission"):
            report["fallback_rows"] = write_fallback(out, s["task"], test_ids, sample)
        report["status"] = "fallback"
        if phase == "commit" and s["commit_mode"] == "fallback":
            log.info("commit run with commit_mode=fallback: the fallback submission is the output")
            report["reason"] = "commit_mode fallback"
            return 0
        if not test_ids:
            log.warning("no test images: the fallback submission (%d rows) is the output", report["fallback_rows"])
            report["reason"] = "no test images"
            return 0
        if inputs.competition is None or inputs.weights is None:
            raise FileNotFoundError(f"competition data or weights dataset not found under {root / 'input'} "
                                    f"(looked for {s['competition']!r} and {s['weights_dataset']!r})")
        with timer.step("wheels"):
            report["missing_modules"] = ensure_modules(s["modules"], inputs.wheels, s["prefer_wheels"])
        log.info("environment: %s", report.setdefault("environment", _environment()))
        report["counts"].update(predict(s, inputs.competition, inputs.weights, out, test_ids, index_ids, timer,
                                        report.setdefault("version_warnings", [])))
        report["status"] = "ok"
        return 0
    except Exception as e:  # noqa: BLE001 - the fallback must survive anything
        report["status"] = "failed" if report["status"] == "started" else "fallback"
        report["error"] = f"{type(e).__name__}: {e}"
        log.error("KERNEL FAILED (%s); %s\n%s", report["error"],
                  "the fallback submission stays" if out.is_file() else "writing an empty one", traceback.format_exc())
        if not out.is_file():
            with contextlib.suppress(Exception):
                write_fallback(out, s.get("task", "retrieval"), test_ids, None)
        return 0 if phase == "rerun" and out.is_file() else 1
    finally:
        counts = {k: v for k, v in report.get("counts", {}).items() if k in ("test", "index", "train")}
        hidden = {"test": s.get("hidden_test_size"), "index": s.get("hidden_index_size")}
        report["phase"] = phase
        report["timing"] = timer.projection(counts, hidden)
        report["seconds"] = round(time.perf_counter() - timer.start, 3)
        log.info("timing (status %s):\n%s", report["status"], format_projection(report["timing"], counts, hidden))
        try:  # atomically: a failed write (a full disk) leaves no partial file and must not end the kernel
            from glr.utils import atomic_write  # noqa: PLC0415

            with atomic_write(working / REPORT) as f:
                f.write(json.dumps(report, indent=2, default=str))
        except Exception as e:  # noqa: BLE001
            log.error("could not write %s: %s", REPORT, e)
