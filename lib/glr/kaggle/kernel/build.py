"""``glr kernel build``: one self-contained script, the weights dataset and kernel-metadata.json.

The script is generated, never written by hand: the package's inference modules (the
import closure of :mod:`glr.kaggle.kernel.runtime` inside ``glr``) are zipped with fixed
timestamps, base64-encoded and embedded, followed by the settings and three lines that put
the zip on ``sys.path`` and call :func:`glr.kaggle.kernel.runtime.main`. The same sources give the
same script byte for byte. A module of the closure that imports Lightning is an error.

Layout of ``kernels/NAME/`` (built in a hidden sibling folder and renamed into place)::

    <slug>.py             the kernel (code_file of the metadata)
    kernel-metadata.json  id, title, code_file, script, GPU on, internet off, sources
    settings.json         the settings embedded in the script, for reading
    weights/              the weights dataset (glr weights pack) + optional extras
"""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import json
import os
import pprint
import re
import shutil
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import glr
from glr.kaggle.kernel.runtime import COUNTRIES, SETTINGS_DEFAULTS, TRAIN_EMBEDDINGS
from glr.kaggle.publish import pack
from glr.model.weights import read_artifact_info, read_ensemble
from glr.postprocess.config import normalize_config, read_config
from glr.utils import InputError, check_writable_dir, read_json_object

ENTRY = "glr.kaggle.kernel.runtime"
METADATA = "kernel-metadata.json"
SETTINGS_FILE = "settings.json"
WEIGHTS_DIR = "weights"
WHEELS_DIR = "wheels"
#: Modules the kernel must never import (it runs without them).
FORBIDDEN = ("lightning", "pytorch_lightning")
_SLUG_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


# --------------------------------------------------------------------------- the bundle
def _module_file(name: str) -> Path | None:
    base = Path(glr.__file__).parent
    parts = name.split(".")[1:]
    pkg = base.joinpath(*parts, "__init__.py")
    mod = base.joinpath(*parts[:-1], f"{parts[-1]}.py") if parts else pkg
    return pkg if pkg.is_file() else mod if mod.is_file() else None


def _imports(tree: ast.AST, name: str, is_pkg: bool) -> set[str]:
    """Every module ``name``'s code imports, at any depth (lazy imports in functions included)."""
    out: set[str] = set()
    package = name if is_pkg else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # "from glr import metrics"
    return out


def bundle_modules(entry: str = ENTRY) -> dict[str, Path]:
    """The ``glr`` modules ``entry`` needs (its import closure inside the package, parents
    included), as module name → source file.

    Raises:
        InputError: a module of the closure imports one of :data:`FORBIDDEN`.
    """
    parts = entry.split(".")
    todo, found = [".".join(parts[:i]) for i in range(1, len(parts) + 1)], {}
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = _module_file(name)
        if path is None:
            continue  # "from glr.x import function" names a function, not a module
        found[name] = path
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for mod in _imports(tree, name, path.name == "__init__.py"):
            top = mod.split(".")[0]
            if top in FORBIDDEN:
                raise InputError(f"{name} imports {mod}: the kernel must run without it", path)
            if top == "glr":
                todo.append(mod)
                parts = mod.split(".")
                todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
    return dict(sorted(found.items()))


def make_bundle(modules: Mapping[str, Path]) -> bytes:
    """A deflated zip of the modules' sources at their package paths, with fixed timestamps
    (same sources, same bytes)."""
    buf = io.BytesIO()
    root = Path(glr.__file__).parent.parent
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for path in sorted(modules.values()):
            info = zipfile.ZipInfo(path.relative_to(root).as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, path.read_bytes())
    return buf.getvalue()


_TEMPLATE = '''\
#!/usr/bin/env python3
# glr inference kernel {name!r}: generated by `glr kernel build` (glr {version}) on {date}.
# Do not edit: change the package or the settings and rebuild. BUNDLE is a zip of the
# package's own inference modules ({count} files, sha256 {digest}):
# {module_list}
# It is unpacked into a temporary folder, put first on sys.path, and glr.kaggle.kernel.runtime.main
# runs with SETTINGS (set GLR_KERNEL_SETTINGS to a JSON object to override some of them).
import base64
import os
import sys
import tempfile

SETTINGS = {settings}

BUNDLE = (
{bundle}
)


def _unpack():
    folder = tempfile.mkdtemp(prefix="glr_kernel_")
    path = os.path.join(folder, "glr_bundle.zip")
    with open(path, "wb") as f:
        f.write(base64.b64decode("".join(BUNDLE)))
    sys.path.insert(0, path)
    for name in [m for m in sys.modules if m == "glr" or m.startswith("glr.")]:
        del sys.modules[name]  # never mix with an installed glr


_unpack()
from glr.kaggle.kernel.runtime import main  # noqa: E402

sys.exit(main(SETTINGS))
'''


def render_script(settings: Mapping[str, Any], modules: Mapping[str, Path] | None = None) -> str:
    """The kernel script's text for ``settings`` (JSON types only)."""
    modules = bundle_modules() if modules is None else modules
    data = make_bundle(modules)
    encoded = base64.b64encode(data).decode("ascii")
    lines = "\n".join(f'    "{encoded[i:i + 96]}"' for i in range(0, len(encoded), 96))
    names = ", ".join(n.removeprefix("glr.") for n in modules if n != "glr")
    wrapped = "\n# ".join(_wrap(names, 92))
    if json.loads(json.dumps(settings)) != dict(settings):
        raise InputError("kernel settings must be plain JSON values")
    return _TEMPLATE.format(name=settings.get("name", "glr-kernel"), version=glr.__version__,
                            date=settings.get("built", ""), count=len(modules),
                            digest=hashlib.sha256(data).hexdigest()[:16], module_list=wrapped,
                            settings=pprint.pformat(dict(settings), indent=1, width=100, sort_dicts=False),
                            bundle=lines)


def _wrap(text: str, width: int) -> list[str]:
    out, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return out + ([line] if line else [])


# --------------------------------------------------------------------------- the kernel folder
def _check_id(kind: str, value: str | None, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or value.count("/") != 1 or not all(value.split("/")):
        raise InputError(f"{kind} must be 'owner/slug', got {value!r}")
    slug = value.split("/")[1]
    if not _SLUG_RE.fullmatch(slug) or not 5 <= len(slug) <= 50:
        raise InputError(f"{kind} slug {slug!r} must be 5-50 lower-case letters, digits and single hyphens")
    return value


def kernel_metadata(kernel_id: str, title: str | None, code_file: str, competition: str,
                    datasets: Sequence[str], enable_gpu: bool = True) -> dict[str, Any]:
    """``kernel-metadata.json`` for a code competition. ``enable_internet`` is written as
    false explicitly: the kaggle client defaults it to true, and a code competition
    rejects kernels with internet on. The title must slugify to the id's slug (the client
    warns and Kaggle renames the kernel otherwise)."""
    from slugify import slugify  # python-slugify, the kaggle client's own rule (glr submit checks the same)

    slug = kernel_id.split("/")[1]
    title = title or slug.replace("-", " ")
    if slugify(title) != slug:
        raise InputError(f"kernel title {title!r} does not turn into the slug {slug!r}; "
                         "Kaggle would give the kernel another id")
    return {"id": kernel_id, "title": title, "code_file": code_file, "language": "python",
            "kernel_type": "script", "is_private": True, "enable_gpu": bool(enable_gpu), "enable_tpu": False,
            "enable_internet": False, "dataset_sources": list(datasets), "competition_sources": [competition],
            "kernel_sources": [], "model_sources": []}


def _check_build(kernel_id: str, weights_dataset: str, wheels_dataset: str | None, settings: Mapping[str, Any],
                 out: Path, overwrite: bool) -> Path:
    """The ids, the settings and the kernel folder, checked before anything is written."""
    _check_id("kernel id", kernel_id)
    _check_id("weights dataset", weights_dataset)
    _check_id("wheels dataset", wheels_dataset, required=False)
    unknown = sorted(set(settings) - set(SETTINGS_DEFAULTS))
    if unknown:
        raise InputError(f"unknown kernel setting(s): {', '.join(unknown)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise InputError("kernel folder exists and is not empty (pass --overwrite to rebuild it)", out)
        if not (out / METADATA).is_file():
            raise InputError(f"kernel folder holds no {METADATA}: not a previous build, refusing to replace it", out)
    return check_writable_dir(out, "--out", replace=True)  # built beside it, then renamed


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished build ``tmp`` at ``out``, replacing a previous build whole (its collected
    wheels are kept)."""
    if out.exists() and (out / WHEELS_DIR).is_dir():
        shutil.move(str(out / WHEELS_DIR), tmp / WHEELS_DIR)
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
        os.rmdir(old)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def build_kernel(ensemble: str | os.PathLike, out: str | os.PathLike, kernel_id: str, weights_dataset: str,
                 weights_dir: str | os.PathLike = "weights", post: str | os.PathLike | Mapping | None = None,
                 competition: str = "landmark-retrieval-2021", wheels_dataset: str | None = None,
                 title: str | None = None, enable_gpu: bool = True, overwrite: bool = False,
                 countries: str | os.PathLike | None = None, train_embeddings: str | os.PathLike | None = None,
                 **settings: Any) -> Path:
    """Build ``out`` (``kernels/NAME``): script, metadata, settings and the weights dataset.

    Args:
        ensemble: ensemble YAML (:func:`glr.model.weights.read_ensemble`); each member's artifact
            is packed into ``out/weights`` and its weight and image size go into the settings.
        out: the kernel folder; must be absent or empty unless ``overwrite`` (then it must be
            a previous build: holding ``kernel-metadata.json``).
        kernel_id, weights_dataset, wheels_dataset: ``owner/slug`` ids on Kaggle.
        post: post-processing config (YAML file or dict, e.g. ``glr cv``'s ``postprocess.yaml``).
        countries: ``train_label_to_country.csv`` copied into the weights dataset (the
            competitions do not ship it; landmark–country re-ranking needs it).
        train_embeddings: ``.npz`` of train embeddings (ids + rows) copied into the weights
            dataset, so the kernel does not embed the train set.
        settings: any other key of :data:`glr.kaggle.kernel.runtime.SETTINGS_DEFAULTS`.

    Returns:
        ``Path(out)``.
    """

    out = _check_build(kernel_id, weights_dataset, wheels_dataset, settings, Path(out), overwrite)
    members = read_ensemble(ensemble, weights_dir)
    config = read_config(post) if isinstance(post, (str, os.PathLike)) else normalize_config(post)
    for extra in (countries, train_embeddings):
        if extra is not None and not Path(extra).is_file():
            raise InputError("file not found", extra)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        pack([m["artifact"] for m in members], tmp / WEIGHTS_DIR, weights_dataset)
        packed = json.loads((tmp / WEIGHTS_DIR / "manifest.json").read_text())["entries"]
        if countries is not None:
            shutil.copyfile(countries, tmp / WEIGHTS_DIR / COUNTRIES)
        if train_embeddings is not None:
            shutil.copyfile(train_embeddings, tmp / WEIGHTS_DIR / TRAIN_EMBEDDINGS)
        slug = kernel_id.split("/")[1]
        s = dict(SETTINGS_DEFAULTS)
        s.update(settings)
        s.update(name=slug, competition=competition, weights_dataset=weights_dataset,
                 wheels_dataset=wheels_dataset, postprocess={k: v for k, v in config.items() if v is not None},
                 members=[{"file": e["file"], "weight": m["weight"],
                           "image_size": int(read_artifact_info(m["artifact"])["image_size"])}
                          for m, e in zip(members, packed)],
                 glr_version=glr.__version__,
                 built=datetime.now(timezone.utc).replace(microsecond=0).isoformat())
        s["tta_scales"] = [float(x) for x in s["tta_scales"]]
        code_file = f"{slug}.py"
        (tmp / code_file).write_text(render_script(s), encoding="utf-8")
        datasets = [weights_dataset] + ([wheels_dataset] if wheels_dataset else [])
        meta = kernel_metadata(kernel_id, title, code_file, competition, datasets, enable_gpu)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / SETTINGS_FILE).write_text(json.dumps(s, indent=2) + "\n", encoding="utf-8")
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_kernel(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """``(metadata, settings, script path)`` of a built kernel folder."""
    folder = Path(folder)
    if not (folder / METADATA).is_file():
        raise InputError(f"not a built kernel folder (no {METADATA}; run glr kernel build)", folder)
    meta = read_json_object(folder / METADATA, "kernel metadata")
    settings = read_json_object(folder / SETTINGS_FILE, "kernel settings")
    script = folder / meta.get("code_file", "")
    if not script.is_file():
        raise InputError(f"code file {meta.get('code_file')!r} named by {METADATA} is missing", folder)
    return meta, settings, script
