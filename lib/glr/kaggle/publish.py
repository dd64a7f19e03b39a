"""Kaggle dataset folders of trained artifacts (``glr weights pack``): the files, ``manifest.json``
(sha256, CV) and ``dataset-metadata.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from glr.kaggle.ids import check_dataset_id, check_licence, check_title
from glr.model.artifact import ARTIFACT_SUFFIX, artifact_kind
from glr.model.weights import MANIFEST, _entry, _safe_name, read_artifact_info, read_manifest
from glr.utils import InputError, file_sha256

log = logging.getLogger(__name__)

KAGGLE_METADATA = "dataset-metadata.json"


def _neighbour_cv(artifact: Path, sha256: str) -> dict | None:
    """CV figures recorded for this exact file in the manifest beside it, if any."""
    if not (artifact.parent / MANIFEST).is_file():
        return None
    try:
        data = read_manifest(artifact.parent)
    except InputError as e:
        log.warning("ignoring the manifest beside %s: %s", artifact, e)
        return None
    for e in data["stages"]:
        if e.get("sha256") == sha256 and isinstance(e.get("cv"), dict):
            return e["cv"]
    return None


def _looks_like_pack(folder: Path) -> bool:
    return (folder / KAGGLE_METADATA).is_file() and (folder / MANIFEST).is_file()


def pack(artifacts: Sequence[str | os.PathLike], out_dir: str | os.PathLike, dataset_id: str,
         title: str | None = None, licence: str = "CC0-1.0", overwrite: bool = False) -> Path:
    """Build a Kaggle dataset folder for ``kaggle datasets create -p out_dir``.

    Each artifact is copied byte for byte as ``<experiment>__<stage>.safetensors`` (its file
    stem when the artifact does not name both; ``.pt`` for a legacy torch file), next to
    ``manifest.json`` (``{"dataset", "title", "entries": [...]}``, one :func:`manifest_entry`
    per packed file, with CV figures carried over from the manifest beside the source when it
    records the same hash; the kernel checks each file against it,
    :func:`glr.model.weights.listed_artifact`) and ``dataset-metadata.json``
    (``{"title", "id", "licenses": [{"name"}]}``). The folder is flat: ``kaggle datasets
    create`` skips sub-folders by default.

    The pack is built in a hidden sibling folder and renamed into place at the end, so a
    failure leaves ``out_dir`` as it was.

    Args:
        artifacts: artifact files, in the order to list them.
        out_dir: the folder to create; must be absent or empty unless ``overwrite``.
        dataset_id: ``owner/slug``; slug 6–50 characters, lower-case letters, digits, hyphens.
        title: 6–50 characters (kaggle's client rule); default from the slug.
        licence: one of :data:`glr.kaggle.ids.KAGGLE_LICENSES`.
        overwrite: replace an existing pack folder (one holding ``dataset-metadata.json`` and
            ``manifest.json``); any other non-empty folder is refused.

    Returns:
        ``out_dir``.

    Raises:
        InputError: bad id, title or licence, no artifacts, a missing or foreign artifact, two
            artifacts packing to the same name, or a non-empty ``out_dir``.
    """
    _, slug = check_dataset_id(dataset_id)
    title = check_title(title if title is not None else slug.replace("-", " ").capitalize())
    check_licence(licence)
    if isinstance(artifacts, (str, os.PathLike)):
        artifacts = [artifacts]
    if not artifacts:
        raise InputError("nothing to pack: no artifacts given")
    out_dir = Path(out_dir)
    _check_pack_folder(out_dir, overwrite)
    plan = _pack_plan(artifacts)  # every source is checked before anything is written
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        _write_pack(tmp, plan, dataset_id, title, licence)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_pack_folder(out_dir: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless ``overwrite`` and it holds a previous pack."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InputError("pack folder is a file", out_dir)
    if any(out_dir.iterdir()):
        if not overwrite:
            raise InputError("pack folder is not empty (pass overwrite=True to replace a previous pack)", out_dir)
        if not _looks_like_pack(out_dir):
            raise InputError(f"pack folder is not empty and holds no previous pack ({KAGGLE_METADATA} "
                             f"and {MANIFEST}); refusing to replace it", out_dir)


def _pack_plan(artifacts: Sequence[str | os.PathLike]) -> list[tuple[Path, str, dict[str, Any]]]:
    """``(source, packed file name, artifact info)`` per artifact; InputError for an unreadable
    artifact or two packing to the same name."""
    plan: list[tuple[Path, str, dict[str, Any]]] = []
    by_name: dict[str, Path] = {}
    for a in artifacts:
        a = Path(a)
        info = read_artifact_info(a)  # refuses a foreign file, or a pickle that is not plain data
        suffix = ARTIFACT_SUFFIX if artifact_kind(a) == "safetensors" else ".pt"
        if info["experiment"] and info["stage"]:
            name = f"{_safe_name(str(info['experiment']))}__{_safe_name(str(info['stage']))}{suffix}"
        else:
            name = f"{_safe_name(a.stem)}{suffix}"
        if name in by_name:
            raise InputError(f"packs to {name}, as {by_name[name]} does; give the artifacts distinct "
                             "meta experiment/stage or file names", a)
        by_name[name] = a
        plan.append((a, name, info))
    return plan


def _write_pack(folder: Path, plan: list[tuple[Path, str, dict[str, Any]]], dataset_id: str, title: str,
                licence: str) -> None:
    """Copy the artifacts into ``folder``, then write ``manifest.json`` and ``dataset-metadata.json``."""
    entries = []
    for src, name, info in plan:
        dst = folder / name
        shutil.copyfile(src, dst)
        digest = file_sha256(dst)
        entries.append(_entry(info, dst, _neighbour_cv(src, digest), sha256=digest))
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump({"dataset": dataset_id, "title": title, "entries": entries}, f, indent=2)
        f.write("\n")
    lines = [f"glr model artifacts ({len(entries)} file{'s' * (len(entries) != 1)}), see {MANIFEST}.", ""]
    for e in entries:
        cv = e["cv"] or {}
        figure = f", CV mAP@100 private {cv['map@100/private']:.4f}" if cv.get("map@100/private") is not None else ""
        lines.append(f"- `{e['file']}`: {e['backbone']} @ {e['image_size']} px, train set {e['train_set']}"
                     f"{figure}")
    metadata = {"title": title, "id": dataset_id, "licenses": [{"name": licence}],
                "description": "\n".join(lines) + "\n"}
    with open(folder / KAGGLE_METADATA, "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
        f.write("\n")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an old pack there is moved aside first and removed only
    once the new one is in (put back if the rename fails)."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
        os.rmdir(old)
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
