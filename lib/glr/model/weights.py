"""Trained artifacts as a catalogue: per-experiment manifests, ensembles, Kaggle dataset packs.

An experiment (``exp010_lite0``) is a sequence of stages (``s1`` clean@384 → ``s2`` c2x@384 →
``s3`` full@512), each producing one artifact (:func:`glr.model.artifact.save_artifact`). Its folder
``weights/<experiment>/`` holds the stage artifacts and a ``manifest.json``::

    {"experiment": "exp010_lite0",
     "stages": [{"experiment": ..., "stage": "s1", "file": "s1.safetensors", "bytes": ..., "sha256": ...,
                 "backbone": ..., "image_size": ..., "train_set": ..., "num_classes": ...,
                 "embedding_size": ..., "val_leak": ..., "epochs": ..., "cv": {...}, "created": ...},
                ...]}

Stages are kept in the order they were first added; the last one is the experiment's final
model (:func:`final_artifact`), checked against its recorded SHA-256 before use. A Kaggle pack's
``manifest.json`` (:func:`glr.kaggle.publish.pack`) lists ``entries`` of the same shape;
:func:`listed_artifact` checks a file against either kind.

An ensemble file (:func:`read_ensemble`) names its members by experiment (optionally a stage)
or by artifact path, each with a block weight. :func:`pack` turns artifacts into a folder
ready for ``kaggle datasets create -p DIR``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from glr.model.artifact import jsonable, read_artifact
from glr.utils import InputError, atomic_write, file_sha256, read_json_object

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


#: The fields :func:`read_artifact_info` returns (``None`` where the artifact does not say).
INFO_KEYS = ("experiment", "stage", "backbone", "image_size", "train_set", "num_classes", "embedding_size",
             "val_leak", "epochs")


_SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._-]+")


#: A JSON-friendly copy of a value (see :func:`glr.model.artifact.jsonable`).
_jsonable = jsonable


def _first(*values: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return None


def read_artifact_info(path: str | os.PathLike) -> dict[str, Any]:
    """Describe an artifact (``glr-artifact-v2``, or a legacy v1 ``.pt``) without building its network.

    Reads ``meta`` first and falls back to what every artifact has: ``model_args["backbone"]``,
    ``data_config["image_size"]`` / ``["train_subset"]``, and the head's class count.

    Returns:
        ``{experiment, stage, backbone, image_size, train_set, num_classes, embedding_size,
        val_leak, epochs}``, ``None`` where unknown (no label map, no tensors).

    Raises:
        InputError: the file is missing, unreadable or not an artifact (the message names it).
    """

    payload = read_artifact(path)
    meta = payload.get("meta") or {}
    model_args = payload.get("model_args") or {}
    data_config = payload.get("data_config") or {}
    head = payload.get("head_state_dict") or {}
    head_classes = int(head["weight"].shape[0]) if "weight" in head else None
    info = {
        "experiment": meta.get("experiment"),
        "stage": meta.get("stage"),
        "backbone": _first(meta.get("backbone"), model_args.get("backbone")),
        "image_size": _first(meta.get("image_size"), data_config.get("image_size")),
        "train_set": _first(meta.get("train_set"), data_config.get("train_set"), data_config.get("train_subset")),
        "num_classes": _first(meta.get("num_classes"), head_classes),
        "embedding_size": model_args.get("embedding_size"),
        "val_leak": meta.get("val_leak"),
        "epochs": meta.get("epochs"),
    }
    return {k: _jsonable(v) for k, v in info.items()}


def _compact_cv(cv: dict[str, Any]) -> dict[str, float | None] | None:
    """``{"map@100/public", "map@100/private", "gap/public", "gap/private"}`` from a CV result.

    Accepts the ``cv.json`` shape (``{"public": {"map@100": …}, "private": …, "recognition":
    {"public": {"gap": …}, "private": …}}``) or an already compact dict. A figure is kept when its
    subset is present (``None`` if the subset was not scored); ``None`` when nothing is found.
    """
    if not isinstance(cv, dict):
        raise InputError(f"cv must be a dict of CV figures, not {type(cv).__name__}")
    out: dict[str, float | None] = {}

    def take(section: Any, subset: str, metric: str) -> None:
        key = f"{metric}/{subset}"
        if key in cv:  # compact input
            out[key] = cv[key]
        elif isinstance(section, dict) and subset in section:
            figures = section[subset]
            if figures is None:
                out[key] = None
            elif isinstance(figures, dict) and metric in figures:
                out[key] = figures[metric]

    for subset in ("public", "private"):
        take(cv, subset, "map@100")
    for subset in ("public", "private"):
        take(cv.get("recognition"), subset, "gap")
    for k, v in out.items():
        if v is not None:
            try:
                out[k] = float(v)
            except (TypeError, ValueError) as e:
                raise InputError(f"cv figure {k} is not a number: {v!r}") from e
    return out or None


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _entry(info: dict[str, Any], file: Path, cv: dict | None, sha256: str | None = None) -> dict[str, Any]:
    return {
        "experiment": info.get("experiment"),
        "stage": info.get("stage"),
        "file": file.name,
        "bytes": file.stat().st_size,
        "sha256": sha256 or file_sha256(file),
        **{k: info.get(k) for k in INFO_KEYS if k not in ("experiment", "stage")},
        "cv": None if cv is None else _compact_cv(cv),
        "created": _utc_now(),
    }


def manifest_entry(artifact: str | os.PathLike, cv: dict | None = None) -> dict[str, Any]:
    """One manifest row for ``artifact``: :func:`read_artifact_info` plus ``file`` (the file
    name), ``bytes``, ``sha256``, ``cv`` (compact CV figures, see :func:`_compact_cv`, or
    ``None``) and ``created`` (UTC, ISO 8601)."""
    artifact = Path(artifact)
    return _entry(read_artifact_info(artifact), artifact, cv)


def read_manifest(exp_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``exp_dir/manifest.json``.

    Raises:
        InputError: the manifest is missing, not JSON, or not ``{"experiment", "stages": [...]}``
            with ``stage``, ``file`` and ``sha256`` in every entry (the message names the file).
    """
    path = Path(exp_dir) / MANIFEST
    data = read_json_object(path, "manifest")
    if not isinstance(data.get("stages"), list):
        raise InputError('corrupt manifest: expected {"experiment": ..., "stages": [...]}', path)
    seen = set()
    for i, e in enumerate(data["stages"], 1):
        if not isinstance(e, dict):
            raise InputError(f"corrupt manifest: stage entry {i} is not an object", path)
        for key in ("stage", "file", "sha256"):
            if not isinstance(e.get(key), str) or not e[key]:
                raise InputError(f"corrupt manifest: stage entry {i} has no {key}", path)
        if e["stage"] in seen:
            raise InputError(f"corrupt manifest: stage {e['stage']!r} listed twice", path)
        seen.add(e["stage"])
    return data


def update_manifest(exp_dir: str | os.PathLike, entry: dict[str, Any]) -> Path:
    """Add ``entry`` (from :func:`manifest_entry`) to ``exp_dir/manifest.json``, written atomically.

    A new stage goes at the end; an entry for a stage already listed replaces it in place. The
    manifest's experiment is the first entry's (else the folder name). The artifact is expected
    in ``exp_dir`` under ``entry["file"]`` (that is where :func:`final_artifact` looks).

    Raises:
        InputError: the entry has no stage, names another experiment, reuses another stage's
            file name, or the existing manifest is corrupt (it is never overwritten then).
    """
    exp_dir = Path(exp_dir)
    path = exp_dir / MANIFEST
    stage = entry.get("stage")
    if not isinstance(stage, str) or not stage:
        raise InputError(f"manifest entry for {entry.get('file')!r} has no stage "
                         "(set meta['stage'] when saving the artifact)", path)
    for key in ("file", "sha256"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise InputError(f"manifest entry for stage {stage!r} has no {key}", path)
    if path.exists():
        data = read_manifest(exp_dir)
    else:
        data = {"experiment": entry.get("experiment") or exp_dir.name, "stages": []}
    exp = entry.get("experiment")
    if exp is not None and data.get("experiment") is not None and exp != data["experiment"]:
        raise InputError(f"entry for experiment {exp!r} does not belong in the manifest of "
                         f"{data['experiment']!r}", path)
    stages = data["stages"]
    for other in stages:
        if other["stage"] != stage and other["file"] == entry["file"]:
            raise InputError(f"stage {stage!r} and stage {other['stage']!r} both use the file "
                             f"{entry['file']!r}", path)
    entry = _jsonable(dict(entry))
    for i, other in enumerate(stages):
        if other["stage"] == stage:
            stages[i] = entry
            break
    else:
        stages.append(entry)
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return path


def _stage_entry(exp_dir: Path, stage: str | None) -> tuple[Path, dict[str, Any]]:
    data = read_manifest(exp_dir)
    stages = data["stages"]
    if not stages:
        raise InputError("manifest lists no stages", exp_dir / MANIFEST)
    if stage is None:
        entry = stages[-1]
    else:
        found = [e for e in stages if e["stage"] == stage]
        if not found:
            raise InputError(f"no stage {stage!r} in the manifest (stages: "
                             f"{', '.join(e['stage'] for e in stages)})", exp_dir / MANIFEST)
        entry = found[0]
    file = exp_dir / entry["file"]
    if not file.is_file():
        raise InputError(f"artifact of stage {entry['stage']!r} listed in {exp_dir / MANIFEST} is missing", file)
    _check_digest(file, entry["sha256"], exp_dir / MANIFEST)
    return file, entry


def _check_digest(file: Path, expected: str, manifest: Path) -> None:
    digest = file_sha256(file)
    if digest != expected:
        raise InputError(f"sha256 {digest[:12]}… differs from the manifest's {expected[:12]}… "
                         f"(the file changed after it was recorded in {manifest})", file)


def listed_artifact(folder: str | os.PathLike, file: str) -> Path:
    """``folder/file`` after checking it against the SHA-256 that ``folder/manifest.json`` records
    for it: an experiment manifest (``stages``) or a weights pack's (``entries``, see
    :func:`glr.kaggle.publish.pack`; the kernel's weights dataset is one).

    Raises:
        InputError: no or corrupt manifest, ``file`` not listed in it, missing, or its hash
            differs (the message names the file).
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    data = read_json_object(manifest, "manifest")
    entries = data.get("entries", data.get("stages"))
    if not isinstance(entries, list):
        raise InputError('corrupt manifest: expected a list of "entries" (a pack) or "stages" (an experiment)',
                         manifest)
    found = [e for e in entries if isinstance(e, dict) and e.get("file") == file]
    path = folder / file
    if not found:
        raise InputError(f"not listed in {manifest}: refusing an artifact whose sha256 is not recorded", path)
    expected = found[0].get("sha256")
    if not isinstance(expected, str) or not expected:
        raise InputError(f"corrupt manifest: the entry of {file!r} has no sha256", manifest)
    if not path.is_file():
        raise InputError(f"artifact listed in {manifest} is missing", path)
    _check_digest(path, expected, manifest)
    return path


def stage_artifact(exp_dir: str | os.PathLike, stage: str | None = None) -> Path:
    """The artifact of ``stage`` (default: the last stage) listed in ``exp_dir/manifest.json``,
    after checking that it exists and that its SHA-256 is the recorded one.

    Raises:
        InputError: no manifest, no stages, no such stage, the file is missing, or its hash
            differs from the manifest (the message names the file).
    """
    return _stage_entry(Path(exp_dir), stage)[0]


def final_artifact(exp_dir: str | os.PathLike) -> Path:
    """The last stage's artifact of an experiment, verified (see :func:`stage_artifact`)."""
    return stage_artifact(exp_dir, None)


_MEMBER_KEYS = {"experiment", "stage", "artifact", "weight"}


def _member_lines(text: str) -> list[int | None]:
    """1-based line of each item under ``members`` (best effort; ``[]`` when not found)."""
    import yaml

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return []
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if getattr(key, "value", None) == "members" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def _safe_name(s: str) -> str:
    return _SAFE_NAME_RE.sub("-", s).strip("-") or "model"


def read_ensemble(path: str | os.PathLike, weights_dir: str | os.PathLike = "weights") -> list[dict[str, Any]]:
    """Resolve an ensemble file into verified artifacts.

    The YAML file holds ``members:``, a list of mappings with either ``experiment`` (its last
    stage, or ``stage``, from ``weights_dir/<experiment>/manifest.json``, hash-checked) or
    ``artifact`` (a file path relative to the ensemble file's folder, else as given), and an
    optional ``weight`` (> 0, default 1.0): the weight of that member's block in the
    concatenated descriptor.

    Returns:
        ``[{"name", "artifact": Path, "weight": float, "experiment", "stage"}]`` in file order;
        ``name`` is ``<experiment>__<stage>`` (the artifact's file stem when unknown).

    Raises:
        InputError: unreadable YAML, no members, unknown keys, both or neither of
            ``experiment``/``artifact``, a bad weight, a missing stage or artifact, or two
            members resolving to the same name. The message names the file, the member number
            and (when known) its line.
    """
    path = Path(path)
    text, members = _ensemble_members(path)
    lines = _member_lines(text)
    out: list[dict[str, Any]] = []
    names: dict[str, int] = {}
    for i, m in enumerate(members, 1):
        line = lines[i - 1] if len(lines) == len(members) else None

        def fail(msg: str) -> InputError:
            return InputError(f"member {i}: {msg}", path, line)

        artifact, experiment, stage, weight = _resolve_member(m, path, Path(weights_dir), fail)
        name = (f"{_safe_name(str(experiment))}__{_safe_name(str(stage))}" if experiment and stage
                else _safe_name(artifact.stem))
        if name in names:
            raise fail(f"same model as member {names[name]} ({name}); raise its weight instead")
        names[name] = i
        out.append({"name": name, "artifact": artifact, "weight": weight,
                    "experiment": experiment, "stage": stage})
    return out


def _ensemble_members(path: Path) -> tuple[str, list]:
    """The text of an ensemble file and its non-empty ``members`` list (InputError otherwise)."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise InputError("ensemble file not found", path) from e
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read ensemble file ({e})", path) from e
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(f"not valid YAML ({getattr(e, 'problem', None) or e})", path,
                         None if mark is None else mark.line + 1) from e
    if not isinstance(doc, dict) or "members" not in doc:
        raise InputError("expected a mapping with a 'members' list", path)
    extra = sorted(set(map(str, doc)) - {"members"})
    if extra:
        raise InputError(f"unknown top-level key(s): {', '.join(extra)} (only 'members')", path)
    members = doc["members"]
    if not isinstance(members, list) or not members:
        raise InputError("'members' must be a non-empty list", path)
    return text, members


def _resolve_member(m: Any, path: Path, weights_dir: Path,
                    fail: Callable[[str], InputError]) -> tuple[Path, Any, Any, float]:
    """``(artifact, experiment, stage, weight)`` of one member of the ensemble file ``path``;
    ``fail(message)`` builds the error naming the member."""
    if not isinstance(m, dict):
        raise fail("expected a mapping with 'experiment' or 'artifact'")
    unknown = sorted(set(map(str, m)) - _MEMBER_KEYS)
    if unknown:
        raise fail(f"unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_MEMBER_KEYS))})")
    has_exp, has_art = "experiment" in m, "artifact" in m
    if has_exp == has_art:
        raise fail("give exactly one of 'experiment' and 'artifact'")
    weight = m.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise fail(f"weight must be a number, not {weight!r}")
    if weight <= 0:
        raise fail(f"weight must be > 0, not {weight} (drop the member instead of weighting it 0)")
    stage = m.get("stage")
    if stage is not None and (not isinstance(stage, str) or not stage):
        raise fail(f"stage must be a name such as 's1', not {stage!r}")
    if has_exp:
        exp = m["experiment"]
        if not isinstance(exp, str) or not exp or "/" in exp or "\\" in exp or exp in (".", ".."):
            raise fail(f"experiment must be an experiment folder name, not {exp!r}")
        try:
            artifact, entry = _stage_entry(weights_dir / exp, stage)
        except InputError as e:
            raise fail(f"experiment {exp!r}: {e}") from e
        return artifact, exp, entry["stage"], float(weight)
    if stage is not None:
        raise fail("'stage' goes with 'experiment', not with 'artifact'")
    raw = m["artifact"]
    if not isinstance(raw, str) or not raw:
        raise fail(f"artifact must be a file path, not {raw!r}")
    artifact = path.parent / raw
    if not artifact.is_file():
        artifact = Path(raw)
    try:
        info = read_artifact_info(artifact)
    except InputError as e:
        raise fail(str(e)) from e
    return artifact, info["experiment"], info["stage"], float(weight)
