"""Experiments: a backbone plus an ordered list of stages, run from a YAML config; ablations.

An experiment config is flat training options (any field of
:class:`glr.train.config.TrainConfig`, the defaults of every stage) plus a ``stages`` list whose
entries override them::

    experiment: exp010_lite0          # optional, default: the file's stem
    backbone: efficientnet_lite0
    head: subcenter_arcface
    stages:
      - {stage: s1, train_set: clean, image_size: 384, epochs: 10, warmup_epochs: 1, lr: 0.01}
      - {stage: s2, train_set: c2x,   image_size: 384, epochs: 6,  lr: 0.001}

Stage ``n+1`` starts from stage ``n``'s weights only (``init_from``: fresh optimiser and
schedule, its own settings). A config without ``stages`` is a one-stage experiment.
Every value is coerced and checked when the file is parsed (:func:`parse_experiment`), and every
stage's resolved configuration (with the overrides) before the first stage trains
(:func:`plan_experiment`): a typo in the last stage fails at once, naming the file and the stage.

:func:`run_experiment` writes each stage's artifact to ``weights/<experiment>/<stage>.safetensors``
with a manifest (:mod:`glr.model.weights`), runs the CV after every stage when the root has a
solution file, and skips stages whose artifact is already in the manifest (re-running a
crashed experiment continues it: an interrupted stage resumes from its run folder's last
checkpoint, :mod:`glr.train.resume`). Each stage's CV figures also go to the stage's logger
(``cv/public/map@100`` …, :func:`cv_figures`). :func:`ablate` runs the seed's Tables 2 and 3.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from glr.data.root import GLDv2Root
from glr.model.artifact import ARTIFACT_SUFFIX
from glr.model.weights import manifest_entry, read_manifest, update_manifest
from glr.report import ablation_table, draw_ablation
from glr.train.config import TRAIN_DEFAULTS, TrainConfig, check_options, to_yaml
from glr.train.fit import check_config, check_registered
from glr.train.fit import train as train_stage
from glr.utils import InputError, atomic_write, file_sha256
from glr.workflows.cv import cv as run_cv

log = logging.getLogger(__name__)

#: The keys a config or a stage may set (``experiment`` and ``stage`` are the config's own).
_CONFIG_KEYS = tuple(k for k in TRAIN_DEFAULTS if k not in ("experiment", "stage"))


@dataclass
class Experiment:
    """A parsed experiment config.

    Attributes:
        name: experiment id (run folder and weights folder name).
        stages: per stage, ``(stage name, training options)``: the options the config sets for
            it (flat options, then the stage's own), coerced and checked; unset options keep
            :class:`~glr.train.config.TrainConfig`'s defaults.
        source: the YAML file it was read from (None for a mapping).
    """

    name: str
    stages: list[tuple[str, dict[str, Any]]]
    source: str | None = None


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


def _checked(opts: dict[str, Any], source: Path | None, where: str = "") -> dict[str, Any]:
    """One layer of a config coerced and checked (a given backbone is a timm model, a head registered)."""
    out = check_options(opts, source, where, known=_CONFIG_KEYS)
    check_registered(out, source, where)
    return out


def parse_experiment(cfg: dict[str, Any] | str | os.PathLike, name: str | None = None) -> Experiment:
    """Parse an experiment config (a YAML file or an already-loaded mapping).

    Raises:
        InputError: not a mapping, unknown option (naming the stage and the closest known
            name), a value of the wrong type or out of its choices, an unknown backbone, a
            stage that is not a mapping, duplicate stage names, or ``init_from`` after the first stage.
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
    flat = _checked(cfg, source)
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
        given = _checked(st, source, f"stage {n} ({sname}): ")
        if n > 1 and "init_from" in given:
            raise InputError(f"stage {n} ({sname}): init_from is only for the first stage "
                             "(later stages start from the previous one)", source)
        if any(sname == s for s, _ in stages):
            raise InputError(f"stage name {sname!r} is used twice", source)
        stages.append((sname, dict(flat, **given)))
    return Experiment(name=str(exp_name), stages=stages, source=None if source is None else str(source))


def plan_experiment(exp: Experiment, overrides: Mapping[str, Any] | None = None,
                    weights: str | os.PathLike = "weights") -> list[tuple[str, dict[str, Any], TrainConfig]]:
    """Every stage's options as :func:`run_experiment` trains it, checked before anything runs.

    Args:
        exp: the parsed config.
        overrides: options for every stage (coerced and checked; source ``overrides``).
        weights: the weights folder (stage ``n+1``'s ``init_from`` is
            ``weights/<experiment>/<stage n>.safetensors``).

    Returns:
        Per stage: ``(name, options, config)``: the options given to
        :func:`glr.train.fit.train` (the config's, the overrides, ``experiment``, ``stage`` and
        ``init_from``) and the resolved :class:`~glr.train.config.TrainConfig`.

    Raises:
        InputError: a bad override, or a stage whose resolved options do not fit together
            (:func:`glr.train.fit.check_config`), naming the file and the stage.
    """
    extra = check_options(overrides or {}, "overrides")
    check_registered(extra, "overrides")
    plan: list[tuple[str, dict[str, Any], TrainConfig]] = []
    for n, (stage, opts) in enumerate(exp.stages, 1):
        opts = {**opts, **extra, "experiment": exp.name, "stage": stage}
        if plan:
            opts["init_from"] = str(Path(weights) / exp.name / f"{plan[-1][0]}{ARTIFACT_SUFFIX}")
        cfg = TrainConfig.from_options(opts, exp.source, f"stage {n} ({stage}): ")
        check_config(cfg, exp.source, f"stage {n} ({stage}): ")
        plan.append((stage, opts, cfg))
    return plan


def describe_experiment(exp: Experiment, overrides: Mapping[str, Any] | None = None,
                        weights: str | os.PathLike = "weights") -> str:
    """Every stage's resolved options as YAML (``experiment``, then ``stages``: one full mapping
    each, ``stage`` first), as :func:`run_experiment` would train them."""
    stages = [dict(stage=stage, **{k: v for k, v in cfg.to_dict().items() if k != "stage"})
              for stage, _, cfg in plan_experiment(exp, overrides, weights)]
    return to_yaml({"experiment": exp.name, "stages": stages})


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _is_global_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def stage_line(exp: str, stage: str, opts: Mapping[str, Any], cv: dict[str, Any] | None,
               val_leak: bool = False) -> str:
    """One printed line: experiment, stage, training set @ size and its CV figures.

    Args:
        opts: the stage's resolved options (``TrainConfig.to_dict()``).
        cv: the compact figures of a manifest entry (``map@100/public`` …, see
            :func:`glr.model.weights.manifest_entry`), or None when there was no CV.
    """
    head = f"{exp} {stage:4s} {opts['train_set']:>5s}@{opts['image_size']:<4d} {opts['backbone']:22s}"
    if not cv or cv.get("map@100/public") is None:
        return head + " (no solution file: no CV)"
    line = f"{head} mAP@100 {cv['map@100/public']:.4f} / {cv['map@100/private']:.4f}"
    if cv.get("gap/public") is not None:
        line += f"  GAP {cv['gap/public']:.4f} / {cv['gap/private']:.4f}"
    return line + ("  [VAL LEAK: not a valid CV]" if val_leak else "")


def cv_figures(cv: Mapping[str, Any] | None) -> dict[str, float]:
    """The scores of a :func:`glr.workflows.cv.cv` result as logger metrics: ``cv/public/map@100``,
    ``cv/recognition/private/gap``, … (every number of its ``public`` and ``private`` blocks, and of
    its recognition's); empty without a CV."""
    out: dict[str, float] = {}
    for prefix, block in (("cv", cv or {}), ("cv/recognition", (cv or {}).get("recognition") or {})):
        for split in ("public", "private"):
            for key, value in (block.get(split) or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[f"{prefix}/{split}/{key}"] = float(value)
    return out


def run_experiment(config: Experiment | dict[str, Any] | str | os.PathLike, data: str | os.PathLike,
                   runs: str | os.PathLike = "runs", weights: str | os.PathLike = "weights",
                   overrides: dict[str, Any] | None = None, do_cv: bool = True, cv_recognition: bool = True,
                   force: bool = False, progress: bool = True, name: str | None = None) -> list[dict[str, Any]]:
    """Train every stage of an experiment, each from the previous one's weights, with CV.

    Every stage's options are checked (:func:`plan_experiment`) before the data is opened.

    Args:
        config: experiment YAML file, mapping or parsed :class:`Experiment` (see the module docstring).
        data: GLDv2-format root.
        runs: run folders go to ``runs/<experiment>/<stage>`` (logs, the stage's CV).
        weights: artifacts and manifest go to ``weights/<experiment>/``.
        overrides: options applied to every stage (hardware, workers, quick settings).
        do_cv: run :func:`glr.workflows.cv.cv` after every stage (when the root has a solution).
        cv_recognition: include recognition (GAP) in those CVs.
        force: retrain stages that the manifest already holds.
        name: experiment id overriding the config's (not with a parsed :class:`Experiment`).

    Returns:
        Per stage: ``{"experiment", "stage", "artifact", "cv", "skipped"}``; ``cv`` is the
        stage's :func:`glr.workflows.cv.cv` result (for a skipped stage: its ``cv.json`` from the
        run folder, if still there).
    """

    exp = config if isinstance(config, Experiment) else parse_experiment(config, name)
    plan = plan_experiment(exp, overrides, weights)
    root = GLDv2Root.open(data)
    exp_dir = Path(weights) / exp.name
    done: dict[str, dict] = {}
    if (exp_dir / "manifest.json").is_file():
        done = {e["stage"]: e for e in read_manifest(exp_dir).get("stages", [])}
    results: list[dict[str, Any]] = []
    prev: Path | None = None
    for stage, opts, cfg in plan:
        if prev is not None:  # the planned weights/<experiment>/<stage>.safetensors, or this rank's own copy
            opts = dict(opts, init_from=str(prev))
        target = exp_dir / f"{stage}{ARTIFACT_SUFFIX}"
        entry = done.get(stage)
        if not force and entry and target.is_file() and file_sha256(target) == entry.get("sha256"):
            log.info("%s %s: already trained (%s), skipping", exp.name, stage, target)
            print(stage_line(exp.name, stage, cfg.to_dict(), entry.get("cv"), bool(entry.get("val_leak"))))
            cv_json = Path(runs) / exp.name / stage / "cv" / "cv.json"
            results.append(dict(experiment=exp.name, stage=stage, artifact=str(target), skipped=True,
                                cv=json.loads(cv_json.read_text()) if cv_json.is_file() else None))
            prev = target
            continue
        run_dir = Path(runs) / exp.name / stage
        cv_of_stage: dict[str, Any] = {}

        def copy_and_cv(artifact: Path, run_dir: Path = run_dir, target: Path = target,
                        cfg: TrainConfig = cfg, cv_of_stage: dict = cv_of_stage) -> dict[str, float]:
            """On global rank zero: the artifact into the weights folder, then its CV (logged to the stage's logger)."""
            _copy_atomic(artifact, target)
            if do_cv and root.solution_path("retrieval") is not None:
                cv_of_stage["cv"] = run_cv(root.root, run_dir / "cv", artifact=str(target),
                                           num_workers=cfg.num_workers, recognition=cv_recognition,
                                           progress=progress)
            return cv_figures(cv_of_stage.get("cv"))

        artifact = train_stage(root.root, run_dir, progress=progress, after=copy_and_cv, **opts)
        prev = artifact
        result = None
        if _is_global_zero():
            prev = target
            result = cv_of_stage.get("cv")
            entry = manifest_entry(target, cv=result)
            update_manifest(exp_dir, entry)
            print(stage_line(exp.name, stage, cfg.to_dict(), entry["cv"], bool(entry.get("val_leak"))), flush=True)
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

    unknown = [t for t in tables if t not in ABLATIONS]
    if unknown:
        raise InputError(f"unknown ablation table(s) {unknown}; known: {sorted(ABLATIONS)}")
    exp = parse_experiment(base, "ablation")
    base_opts = dict(exp.stages[0][1], **check_options(overrides or {}, "overrides"))
    runs = {t: [(name, delta, dict(base_opts, **delta)) for name, delta in ABLATIONS[t]] for t in tables}
    for t, rows in runs.items():  # every run's options checked before the data is opened
        for name, _, opts in rows:
            where = f"table {t} ({name}): "
            check_config(TrainConfig.from_options(opts, exp.source, where), exp.source, where)
    root = GLDv2Root.open(data)
    if root.solution_path("retrieval") is None:
        raise InputError("ablate needs a retrieval solution file (retrieval_solution_v2.1.csv)", root.root)
    out = Path(out)
    cache: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"base": {k: v for k, v in base_opts.items()}, "tables": {}}
    for t, planned in runs.items():
        rows = []
        for name, delta, opts in planned:
            key = json.dumps(TrainConfig.from_options(opts).to_dict(), sort_keys=True, default=str)
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
