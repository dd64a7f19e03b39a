"""``glr kernel wheels``: the wheels the kernel needs that Kaggle's image lacks, as a dataset.

Kaggle's image has torch, timm, numpy, scipy, scikit-learn, OpenCV, Pillow and safetensors; it
lacks faiss, and its timm is whatever version the image was built with. ``pip download
--only-binary=:all: --no-deps`` fetches the wheels for Kaggle's platform and Python (not this
machine's) into a flat dataset folder with ``dataset-metadata.json``; the kernel installs them
with ``pip install --no-index --no-deps`` (:func:`glr.kaggle.kernel.runtime.ensure_modules`):
faiss when it does not import, timm when the image's version differs from the packed one.

The defaults (:func:`default_packages`):

- ``faiss-cpu`` at the version of ``requirements.txt``: on a GPU the kernel searches with torch
  (:func:`glr.search.resolve_backend` prefers torch on CUDA when faiss has no GPU build), so
  faiss is only the CPU path. Pass ``--package faiss-gpu-cu12 …`` to search with faiss on the GPU.
- ``timm`` at the version that built the kernel's models (their artifacts'
  ``meta["versions"]["timm"]``; this environment's timm when they do not record it): a pure
  Python wheel, so it runs on the image's torch; a model's layer defaults and pretrained
  configs are then the ones it was trained with.

safetensors is not packed: the image has it (timm needs it) and its file format does not
change between versions; it is a compiled wheel, so packing it would tie the dataset to
Kaggle's platform for nothing (``--package safetensors==X`` does it if an image ever lacks it).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from glr.kaggle.kernel.build import WEIGHTS_DIR, _check_id, read_kernel
from glr.model.artifact import read_artifact
from glr.utils import InputError

log = logging.getLogger(__name__)

FAISS = "faiss-cpu==1.15.1"
DEFAULT_PACKAGES = (FAISS,)  # plus timm: see default_packages
DEFAULT_PYTHON = "3.11"
#: Kaggle's image is glibc 2.35 on x86_64: any of these tags installs (faiss 1.15 ships manylinux_2_28 only).
DEFAULT_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64")


def collect_wheels(out: str | os.PathLike, dataset_id: str, packages: Sequence[str] = DEFAULT_PACKAGES,
                   python_version: str = DEFAULT_PYTHON, platforms: Sequence[str] = DEFAULT_PLATFORMS,
                   find_links: Sequence[str | os.PathLike] = (), no_index: bool = False,
                   title: str | None = None, overwrite: bool = False) -> list[Path]:
    """Download ``packages`` as wheels for Kaggle into ``out`` (a dataset folder).

    Args:
        out: the folder (built in a hidden sibling and renamed into place; an existing one
            is replaced only with ``overwrite`` and only if it holds ``dataset-metadata.json``).
        dataset_id: ``owner/slug`` of the wheels dataset.
        packages: pip requirement strings.
        python_version, platforms: Kaggle's (``pip download --python-version/--platform``).
        find_links, no_index: where pip looks (a local folder of wheels, offline).

    Returns:
        The wheel files in ``out``.

    Raises:
        InputError: bad id, no packages, an unsafe ``out``, or pip failing (its message).
    """

    _check_id("wheels dataset", dataset_id)
    if not packages:
        raise InputError("no packages to collect")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError("wheels folder is not empty (pass --overwrite to replace it)", out)
        if not (out / "dataset-metadata.json").is_file():
            raise InputError("wheels folder holds no dataset-metadata.json; refusing to replace it", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
               "--no-deps", "--python-version", python_version, "--implementation", "cp", "--dest", str(tmp)]
        for platform in platforms:
            cmd += ["--platform", platform]
        if no_index:
            cmd.append("--no-index")
        for link in find_links:
            cmd += ["--find-links", str(link)]
        done = subprocess.run([*cmd, *packages], capture_output=True, text=True)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise InputError(f"pip download failed for {' '.join(packages)}: {' / '.join(tail)}")
        wheels = sorted(tmp.glob("*.whl"))
        slug = dataset_id.split("/")[1]
        meta = {"title": title or slug.replace("-", " ").capitalize()[:50], "id": dataset_id,
                "licenses": [{"name": "other"}],
                "description": "Wheels for the glr kernel (pip install --no-index --no-deps): "
                               + ", ".join(w.name for w in wheels) + "\n"}
        (tmp / "dataset-metadata.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(out.glob("*.whl"))


def model_timm_version(kernel: str | os.PathLike | None) -> str:
    """The timm version the kernel's models were built with: the one their artifacts record
    (``meta["versions"]["timm"]``) when they agree, else this environment's (logged when they
    disagree or do not record it)."""
    recorded: dict[str, str] = {}
    if kernel is not None:
        _, settings, _ = read_kernel(kernel)
        for m in settings.get("members", []):
            path = Path(kernel) / WEIGHTS_DIR / m["file"]
            version = ((read_artifact(path).get("meta") or {}).get("versions") or {}).get("timm")
            if version:
                recorded[m["file"]] = str(version)
    here = importlib.metadata.version("timm")
    if len(set(recorded.values())) == 1:
        return next(iter(recorded.values()))
    if not recorded and kernel is not None:
        log.info("the kernel's artifacts record no timm version: packing this environment's timm %s", here)
    elif recorded:
        log.warning("the kernel's members were built with different timm versions (%s): packing this "
                    "environment's timm %s", ", ".join(f"{f} {v}" for f, v in recorded.items()), here)
    return here


def default_packages(kernel: str | os.PathLike | None = None) -> list[str]:
    """What ``glr kernel wheels`` packs by default: ``faiss-cpu`` (pinned) and ``timm`` at
    :func:`model_timm_version`."""
    return [FAISS, f"timm=={model_timm_version(kernel)}"]
