"""The demo: synth → two staged experiments → ensemble CV with the post-processing sweep →
the Kaggle kernel built and run locally.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from glr.data.root import GLDv2Root
from glr.data.synth import make_synthetic_gldv2
from glr.eval.sweep import DEFAULT_GRID, sweep_table
from glr.kaggle.kernel.build import build_kernel
from glr.kaggle.kernel.local import format_result, run_local
from glr.report import cv_table, draw_retrievals, stages_table, write_report
from glr.utils import InputError, atomic_write
from glr.workflows.cv import cv
from glr.workflows.experiment import Experiment, parse_experiment, plan_experiment, run_experiment

log = logging.getLogger(__name__)

#: The demo's ensemble: two backbones, each trained in two stages with growing image size
#: and training set (the seed's clean → c2x pattern at CPU size). Only efficientnet_lite0
#: has ImageNet weights offline; resnet18 learns from scratch and shows the re-ID
#: switches (last stride 1, BNNeck) and the 1st place head (sub-center ArcFace, dynamic margins).
#: Names of the experiment configs shipped in ``glr/resources/demo/`` (:func:`demo_config`).
DEMO_EXPERIMENTS: tuple[str, ...] = ("demo_lite0", "demo_r18")
#: ``quick`` (tests): tiny timm models, one epoch per stage.
QUICK_EXPERIMENTS: tuple[str, ...] = ("quick_resnet", "quick_effnet")


def demo_config(name: str) -> Path:
    """The YAML config of a demo experiment, shipped as package data: ``glr/resources/demo/NAME.yaml``
    (run one alone with ``glr experiment PATH --data ROOT``)."""
    path = Path(str(resources.files("glr").joinpath("resources", "demo", f"{name}.yaml")))
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        shipped = ", ".join(known) if known else "none: glr was installed without its package data"
        raise InputError(f"no demo experiment config {name!r} (shipped: {shipped})", path)
    return path


def _experiment(cfg: dict[str, Any] | str | os.PathLike) -> Experiment:
    """A demo experiment: a mapping, a YAML file, or the name of a shipped config."""
    if isinstance(cfg, str) and not cfg.endswith((".yaml", ".yml")):
        cfg = demo_config(cfg)
    return parse_experiment(dict(cfg) if isinstance(cfg, dict) else cfg)


def demo(data: str | os.PathLike | None = None, out: str | os.PathLike = "submission",
         work: str | os.PathLike = "runs/demo", quick: bool = False, train_args: dict | None = None,
         baselines: bool = True, num_workers: int = 2, progress: bool = True,
         synth_args: dict | None = None, experiments: Sequence[dict[str, Any] | str | os.PathLike] | None = None,
         weights: str | os.PathLike | None = None, sweep: dict[str, Any] | None | bool = True,
         kernel: str | os.PathLike | None = "kernels/demo") -> dict[str, Any]:
    """synth (unless ``data``) → two staged experiments → ensemble CV with the post-processing
    sweep, plus two reference descriptors → the Kaggle kernel built and run locally.

    Prints the CV after every stage and a table of every stage, the ensemble and the
    baselines at the end.

    Args:
        data: a GLDv2-format root instead of the embedded synthetic one.
        out: receives the ensemble's ``submission.csv`` (retrieval),
            ``submission_recognition.csv``, ``cv.json`` (with ``stages`` and ``baselines``
            entries), ``retrievals.png``, ``ensemble.yaml`` and ``report/report.html`` (:func:`glr.report.write_report`).
        work: data, runs and (unless ``weights``) the weights folder.
        quick: tiny data and models (seconds; tests).
        train_args: options applied to every stage (e.g. ``{"epochs": 1}``).
        experiments: experiment configs: mappings, YAML files or names of shipped configs (default
            :data:`DEMO_EXPERIMENTS`, or :data:`QUICK_EXPERIMENTS` with ``quick``). Every stage's
            options are checked before any data is written or read.
        weights: weights folder (default ``work/weights``).
        sweep: the post-processing grid swept on the ensemble's CV (True: :data:`glr.eval.sweep.DEFAULT_GRID`;
            None/False: plain kNN); the chosen chain writes the submission and ``postprocess.yaml``.
        kernel: where to build the ensemble's Kaggle kernel (:func:`glr.kaggle.kernel.build.build_kernel`),
            which is then run in a simulated ``/kaggle`` in both mount layouts and compared with
            the library's submission (None: skip). The result is ``cv.json``'s ``kernel`` entry.

    Returns:
        The ensemble's cv.json content.
    """

    work, out = Path(work), Path(out)
    exps = [_experiment(c) for c in (experiments or (QUICK_EXPERIMENTS if quick else DEMO_EXPERIMENTS))]
    weights = Path(weights) if weights else work / "weights"
    overrides = dict(num_workers=num_workers, **(train_args or {}))
    plans = [plan_experiment(exp, overrides, weights) for exp in exps]  # every stage checked up front
    if data is None:
        data = work / "data"
        if not (Path(data) / "train.csv").exists():
            synth_kw = dict(n_landmarks=24, scale=0.15, image_size=48) if quick else {}
            make_synthetic_gldv2(data, **dict(synth_kw, seed=0, progress=progress, **(synth_args or {})))
    rows, finals = _train(exps, plans, data, work, weights, overrides, progress)
    figures: dict[str, Any] = {}
    if baselines:
        for kind in ("thumbnail", "imagenet"):
            r = cv(data, work / f"cv_{kind}", kind=kind, image_size=96, num_workers=num_workers,
                   recognition=False, progress=progress)
            figures[kind] = {"public": r["public"], "private": r["private"]}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "ensemble.yaml") as f:
        f.write("# the demo's ensemble: final artifact of each experiment, equal weights\nmembers:\n")
        f.writelines(f"  - artifact: {Path(a).resolve()}\n" for a in finals)
    stage_rows = [{k: r[k] for k in ("name", "train_set", "image_size")} | {"cv": _brief(r["cv"])} for r in rows]

    grid = DEFAULT_GRID if sweep is True else (sweep or None)
    result = cv(data, out, artifact=finals, num_workers=num_workers, progress=progress, sweep=grid,
                extra={"baselines": figures, "artifacts": finals, "stages": stage_rows})
    root = GLDv2Root.open(data)
    if root.solution_path("retrieval") is not None:
        try:
            draw_retrievals(root, out, out / "retrievals.png")
            write_report(out, root, out / "report", title="glr demo: CV of the ensemble")
        except Exception as e:  # a picture must never fail the run
            log.warning("could not draw retrievals or write the report: %s", e)
    chosen = [k for k, v in (result.get("postprocess") or {}).items() if k not in ("k", "shortlist") and v]
    rows.append(dict(name=f"ensemble ({len(finals)} models)" + (" + post-processing" if chosen else ""),
                     cv=result))
    _print_tables(rows, result)
    if kernel is not None:
        result["kernel"] = demo_kernel(data, out, kernel, weights, num_workers, progress)
        with atomic_write(out / "cv.json") as f:
            json.dump(result, f, indent=2, default=str)
    return result


def _train(exps: Sequence[Experiment], plans: Sequence[list], data: str | os.PathLike, work: Path, weights: Path,
           overrides: dict[str, Any], progress: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """Train every experiment (from scratch: the demo's runs are throwaway); returns a table row
    per stage and the final artifact of each experiment."""
    rows: list[dict[str, Any]] = []
    finals: list[str] = []
    for exp, plan in zip(exps, plans):
        res = run_experiment(exp, data, runs=work / "runs", weights=weights, overrides=overrides,
                             force=True, progress=progress)
        for (stage, _, cfg), r in zip(plan, res):
            rows.append(dict(name=f"{exp.name} {stage} ({cfg.backbone})", train_set=cfg.train_set,
                             image_size=cfg.image_size, cv=r["cv"]))
        finals.append(res[-1]["artifact"])
    return rows, finals


def _print_tables(rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
    """Every stage and the ensemble, the ensemble's CV, and its post-processing sweep."""
    print()
    print(stages_table(rows))
    print()
    print(cv_table(result))
    if result.get("sweep"):
        print()
        print("post-processing of the ensemble (tuned on Public, chosen chain in postprocess.yaml):")
        print(sweep_table({"protocol": result.get("protocol", "v2.1"), "pipeline": result["sweep"]["pipeline"]}))


def demo_kernel(data: str | os.PathLike, out: Path, kernel: str | os.PathLike, weights: Path,
                num_workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Build the demo ensemble's kernel (``out/ensemble.yaml`` + ``out/postprocess.yaml``), run it
    locally in both mount layouts and print whether its submission equals the library's."""

    post = out / "postprocess.yaml"
    built = build_kernel(out / "ensemble.yaml", kernel, "glr-demo/glr-demo-kernel", "glr-demo/glr-demo-weights",
                         weights_dir=weights, post=post if post.is_file() else None, overwrite=True,
                         num_workers=num_workers, hidden_test_size=10_000, progress=progress)
    print()
    print(f"kernel built in {built}; running it in a simulated /kaggle (fresh interpreter, glr not importable):")
    res = run_local(data, built, stream=False, progress=progress)
    print(format_result(res))
    timing = next(iter(res["runs"].values()))["report"].get("timing") or []
    if timing:
        total = sum(r["seconds"] for r in timing)
        projected = sum(r["projected_seconds"] for r in timing)
        print(f"  kernel time {total:.1f} s here; projected for 10,000 hidden test images: {projected / 60:.1f} min "
              "(same index, same machine)")
    return {"folder": str(built), "parity": res.get("parity"),
            "runs": {k: {x: v[x] for x in ("returncode", "status", "rows", "seconds")} for k, v in res["runs"].items()}}


def _brief(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The headline figures of a cv result (for cv.json's ``stages`` entry)."""
    if not result:
        return None
    rec = result.get("recognition") or {}
    return {"public": result.get("public"), "private": result.get("private"),
            "recognition": {"public": rec.get("public"), "private": rec.get("private")} if rec else None}
