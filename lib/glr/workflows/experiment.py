"""Experiments: a backbone plus an ordered list of stages, run from a YAML config; ablations.

An experiment config is flat training options (any key of
:data:`glr.train.fit.TRAIN_DEFAULTS`, the defaults of every stage) plus a ``stages`` list whose
entries override them::

    experiment: exp010_lite0          # optional, default: the file's stem
    backbone: efficientnet_lite0
    head: subcenter_arcface
    stages:
      - {stage: s1, train_set: clean, image_size: 384, epochs: 10, warmup_epochs: 1, lr: 0.01}
      - {stage: s2, train_set: c2x,   image_size: 384, epochs: 6,  lr: 0.001}

Stage ``n+1`` starts from stage ``n``'s weights only (``init_from``: fresh optimiser and
schedule, its own settings). A config without ``stages`` is a one-stage experiment.

:func:`run_experiment` writes each stage's artifact to ``weights/<experiment>/<stage>.pt``
with a manifest (:mod:`glr.weights`), runs the CV after every stage when the root has a
solution file, and skips stages whose artifact is already in the manifest (re-running a
crashed experiment continues it). :func:`ablate` runs the seed's Tables 2 and 3.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from glr.data.root import GLDv2Root
from glr.model.weights import manifest_entry, read_manifest, update_manifest
from glr.report import ablation_table, draw_ablation
from glr.train.fit import TRAIN_DEFAULTS
from glr.train.fit import train as train_stage
from glr.utils import InputError, atomic_write, file_sha256
from glr.workflows.cv import cv as run_cv

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    """A parsed experiment config.

    Attributes:
        name: experiment id (run folder and weights folder name).
        stages: per stage, ``(stage name, training options)`` with the defaults merged in.
    """

    name: str
    stages: list[tuple[str, dict[str, Any]]]


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise InputError(f"cannot read config ({e.strerror})", path) from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise InputError(f"not valid YAML: {getattr(e, 'problem', e)}", path,
                         None if line is None else line + 1) from None


def _normalise_keys(d: dict[str, Any]) -> dict[str, Any]:
    return {str(k).replace("-", "_"): v for k, v in d.items()}


def parse_experiment(cfg: dict[str, Any] | str | os.PathLike, name: str | None = None) -> Experiment:
    """Parse an experiment config (a YAML file or an already-loaded mapping).

    Raises:
        InputError: not a mapping, unknown option (naming the stage), a stage that is not
            a mapping, duplicate stage names, or ``init_from`` after the first stage.
    """

    source = None
    if not isinstance(cfg, dict):
        source = Path(cfg)
        cfg = _read_yaml(source)
        if not isinstance(cfg, dict):
            raise InputError("an experiment config must be a mapping of option: value", source)
    cfg = _normalise_keys(cfg)
    stages_cfg = cfg.pop("stages", None)
    exp_name = name or cfg.pop("experiment", None) or cfg.pop("exp_id", None) \
        or (source.stem if source else "experiment")
    cfg.pop("experiment", None), cfg.pop("exp_id", None)
    known = set(TRAIN_DEFAULTS) - {"experiment", "stage"}
    bad = sorted(set(cfg) - known)
    if bad:
        raise InputError(f"unknown option(s) {bad}", source)
    if stages_cfg is None:
        stages_cfg = [{}]
    if not isinstance(stages_cfg, list) or not stages_cfg:
        raise InputError("'stages' must be a non-empty list of mappings", source)
    stages: list[tuple[str, dict[str, Any]]] = []
    for n, st in enumerate(stages_cfg, 1):
        if not isinstance(st, dict):
            raise InputError(f"stage {n} is not a mapping", source)
        st = _normalise_keys(st)
        sname = str(st.pop("stage", None) or st.pop("name", None) or f"s{n}")
        bad = sorted(set(st) - known)
        if bad:
            raise InputError(f"stage {n} ({sname}): unknown option(s) {bad}", source)
        if n > 1 and "init_from" in st:
            raise InputError(f"stage {n} ({sname}): init_from is only for the first stage "
                             "(later stages start from the previous one)", source)
        if any(sname == s for s, _ in stages):
            raise InputError(f"stage name {sname!r} is used twice", source)
        stages.append((sname, dict(cfg, **st)))
    return Experiment(name=str(exp_name), stages=stages)


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _is_global_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def stage_line(exp: str, stage: str, opts: dict[str, Any], cv: dict[str, Any] | None,
               val_leak: bool = False) -> str:
    """One printed line: experiment, stage, training set @ size and its CV figures.

    Args:
        cv: the compact figures of a manifest entry (``map@100/public`` …, see
            :func:`glr.weights.manifest_entry`), or None when there was no CV.
    """
    head = f"{exp} {stage:4s} {opts['train_set']:>5s}@{opts['image_size']:<4d} {opts['backbone']:22s}"
    if not cv or cv.get("map@100/public") is None:
        return head + " (no solution file: no CV)"
    line = f"{head} mAP@100 {cv['map@100/public']:.4f} / {cv['map@100/private']:.4f}"
    if cv.get("gap/public") is not None:
        line += f"  GAP {cv['gap/public']:.4f} / {cv['gap/private']:.4f}"
    return line + ("  [VAL LEAK: not a valid CV]" if val_leak else "")


def run_experiment(config: dict[str, Any] | str | os.PathLike, data: str | os.PathLike,
                   runs: str | os.PathLike = "runs", weights: str | os.PathLike = "weights",
                   overrides: dict[str, Any] | None = None, do_cv: bool = True, cv_recognition: bool = True,
                   force: bool = False, progress: bool = True, name: str | None = None) -> list[dict[str, Any]]:
    """Train every stage of an experiment, each from the previous one's weights, with CV.

    Args:
        config: experiment YAML file or mapping (see the module docstring).
        data: GLDv2-format root.
        runs: run folders go to ``runs/<experiment>/<stage>`` (logs, the stage's CV).
        weights: artifacts and manifest go to ``weights/<experiment>/``.
        overrides: options applied to every stage (hardware, workers, quick settings).
        do_cv: run :func:`glr.workflows.cv.cv` after every stage (when the root has a solution).
        cv_recognition: include recognition (GAP) in those CVs.
        force: retrain stages that the manifest already holds.
        name: experiment id overriding the config's.

    Returns:
        Per stage: ``{"experiment", "stage", "artifact", "cv", "skipped"}``; ``cv`` is the
        stage's :func:`glr.workflows.cv.cv` result (for a skipped stage: its ``cv.json`` from the
        run folder, if still there).
    """

    exp = parse_experiment(config, name)
    root = GLDv2Root.open(data)
    exp_dir = Path(weights) / exp.name
    done: dict[str, dict] = {}
    if (exp_dir / "manifest.json").is_file():
        done = {e["stage"]: e for e in read_manifest(exp_dir).get("stages", [])}
    results: list[dict[str, Any]] = []
    prev: Path | None = None
    for i, (stage, opts) in enumerate(exp.stages):
        opts = dict(opts, **(overrides or {}), experiment=exp.name, stage=stage)
        if i > 0:
            opts["init_from"] = str(prev)
        target = exp_dir / f"{stage}.pt"
        entry = done.get(stage)
        if not force and entry and target.is_file() and file_sha256(target) == entry.get("sha256"):
            log.info("%s %s: already trained (%s), skipping", exp.name, stage, target)
            print(stage_line(exp.name, stage, opts, entry.get("cv"), bool(entry.get("val_leak"))))
            cv_json = Path(runs) / exp.name / stage / "cv" / "cv.json"
            results.append(dict(experiment=exp.name, stage=stage, artifact=str(target), skipped=True,
                                cv=json.loads(cv_json.read_text()) if cv_json.is_file() else None))
            prev = target
            continue
        run_dir = Path(runs) / exp.name / stage
        artifact = train_stage(root.root, run_dir, progress=progress, **opts)
        prev = artifact
        result = None
        if _is_global_zero():
            _copy_atomic(artifact, target)
            prev = target
            if do_cv and root.solution_path("retrieval") is not None:
                result = run_cv(root.root, run_dir / "cv", artifact=str(target),
                                     num_workers=opts.get("num_workers", 2), recognition=cv_recognition,
                                     progress=progress)
            entry = manifest_entry(target, cv=result)
            update_manifest(exp_dir, entry)
            print(stage_line(exp.name, stage, opts, entry["cv"], bool(entry.get("val_leak"))), flush=True)
        results.append(dict(experiment=exp.name, stage=stage, artifact=str(prev), cv=result, skipped=False))
    return results


# --------------------------------------------------------------------------- ablations
#: The seed's ablation tables (Zhang et al. 2021): Table 2 adds re-ID tricks one after
#: the other, Table 3 compares samplers on the baseline.
ABLATIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "2": [("baseline", {}),
          ("+ random erasing", {"random_erasing": 0.5}),
          ("+ label smoothing", {"random_erasing": 0.5, "label_smoothing": 0.1})],
    "3": [("shuffle", {"sampler": "shuffle"}),
          ("id-uniform (P×K)", {"sampler": "id_uniform"}),
          ("continent-aware", {"sampler": "continent"})],
}


def ablate(data: str | os.PathLike, out: str | os.PathLike, base: dict[str, Any] | str | os.PathLike,
           tables: Sequence[str] = ("2", "3"), overrides: dict[str, Any] | None = None,
           progress: bool = True) -> dict[str, Any]:
    """Run the ablation tables on a root: one training run + retrieval CV per row.

    Args:
        data: GLDv2-format root with a retrieval solution file.
        out: folder for the runs, ``ablation.json``, ``ablation.md`` and ``ablation.png``.
        base: the baseline's training options (a one-stage experiment config or mapping;
            for a staged config the first stage is used).
        tables: which of :data:`ABLATIONS` to run.
        overrides: options applied to every run.

    Returns:
        ``{"tables": {table: [{"name", "options", "public", "private"}]}}``; rows with the
        same effective options are trained once.
    """

    root = GLDv2Root.open(data)
    if root.solution_path("retrieval") is None:
        raise InputError("ablate needs a retrieval solution file (retrieval_solution_v2.1.csv)", root.root)
    unknown = [t for t in tables if t not in ABLATIONS]
    if unknown:
        raise InputError(f"unknown ablation table(s) {unknown}; known: {sorted(ABLATIONS)}")
    exp = parse_experiment(base, "ablation")
    base_opts = dict(exp.stages[0][1], **(overrides or {}))
    out = Path(out)
    cache: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"base": {k: v for k, v in base_opts.items()}, "tables": {}}
    for t in tables:
        rows = []
        for name, delta in ABLATIONS[t]:
            opts = dict(base_opts, **delta)
            key = json.dumps(dict(TRAIN_DEFAULTS, **opts), sort_keys=True, default=str)
            if key not in cache:
                run = out / f"run{len(cache):02d}"
                artifact = train_stage(root.root, run, progress=progress, experiment="ablation",
                                          stage=f"run{len(cache):02d}", **opts)
                r = run_cv(root.root, run / "cv", artifact=str(artifact), recognition=False,
                                num_workers=opts.get("num_workers", 2), progress=progress)
                cache[key] = {"public": r["public"]["map@100"], "private": r["private"]["map@100"],
                              "run": str(run)}
                log.info("ablation %s %s: %s", t, name, cache[key])
            rows.append(dict(name=name, options=delta, **cache[key]))
        report["tables"][t] = rows
    with atomic_write(out / "ablation.json") as f:
        json.dump(report, f, indent=2, default=str)
    text = ablation_table(report)
    with atomic_write(out / "ablation.md") as f:
        f.write(text + "\n")
    try:
        draw_ablation(report, out / "ablation.png")
    except Exception as e:  # a picture must never fail the run
        log.warning("could not draw the ablation chart: %s", e)
    print(text)
    return report
