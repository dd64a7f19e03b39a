"""The demo: synth → two staged experiments → ensemble CV with the post-processing sweep →
the Kaggle kernel built and run locally.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from glr.data.root import GLDv2Root
from glr.data.synth import make_synthetic_gldv2
from glr.eval.sweep import DEFAULT_GRID, sweep_table
from glr.kaggle.kernel.build import build_kernel
from glr.kaggle.kernel.local import format_result, run_local
from glr.model.net import LITE0_PACKAGE
from glr.report import cv_table, draw_retrievals, stages_table, write_report
from glr.utils import atomic_write
from glr.workflows.cv import cv
from glr.workflows.experiment import parse_experiment, run_experiment

log = logging.getLogger(__name__)

#: The demo's ensemble: two backbones, each trained in two stages with growing image size
#: and training set (the seed's clean → c2x pattern at CPU size). Only efficientnet_lite0
#: has ImageNet weights offline; resnet18 learns from scratch and shows the re-ID
#: switches (last stride 1, BNNeck) and the 1st place head (sub-center ArcFace, dynamic margins).
DEMO_EXPERIMENTS: list[dict[str, Any]] = [
    dict(experiment="demo_lite0", backbone="efficientnet_lite0", pretrained=LITE0_PACKAGE, batch_size=32,
         lr=2e-3, backbone_lr_mult=0.5, arcface_s=30.0, arcface_m=0.2,
         stages=[dict(stage="s1", train_set="clean", image_size=96, epochs=6),
                 dict(stage="s2", train_set="c2x", image_size=128, epochs=2, lr=5e-4, warmup_frac=0.0)]),
    dict(experiment="demo_r18", backbone="resnet18", pretrained=None, last_stride=True, bnneck=True,
         head="subcenter_arcface", subcenter_k=3, dynamic_margin=True, margin_a=0.3, margin_b=0.1,
         batch_size=32, lr=3e-3, backbone_lr_mult=1.0,
         stages=[dict(stage="s1", train_set="clean", image_size=80, epochs=10),
                 dict(stage="s2", train_set="c2x", image_size=96, epochs=4, lr=1e-3, warmup_frac=0.0)]),
]


#: ``quick`` (tests): tiny timm models, one epoch per stage.
QUICK_EXPERIMENTS: list[dict[str, Any]] = [
    dict(experiment="quick_resnet", backbone="test_resnet", pretrained=None, batch_size=16, lr=2e-3,
         stages=[dict(stage="s1", train_set="clean", image_size=32, epochs=1),
                 dict(stage="s2", train_set="c2x", image_size=40, epochs=1, lr=5e-4)]),
    dict(experiment="quick_effnet", backbone="test_efficientnet", pretrained=None, batch_size=16, lr=2e-3,
         head="subcenter_arcface", dynamic_margin=True,
         stages=[dict(stage="s1", train_set="clean", image_size=32, epochs=1),
                 dict(stage="s2", train_set="c2x", image_size=40, epochs=1, lr=5e-4)]),
]


def demo(data: str | os.PathLike | None = None, out: str | os.PathLike = "submission",
         work: str | os.PathLike = "runs/demo", quick: bool = False, train_args: dict | None = None,
         baselines: bool = True, num_workers: int = 2, progress: bool = True,
         synth_args: dict | None = None, experiments: Sequence[dict[str, Any]] | None = None,
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
        experiments: experiment configs (default :data:`DEMO_EXPERIMENTS`).
        weights: weights folder (default ``work/weights``).
        sweep: the post-processing grid swept on the ensemble's CV (True: :data:`glr.sweep.DEFAULT_GRID`;
            None/False: plain kNN); the chosen chain writes the submission and ``postprocess.yaml``.
        kernel: where to build the ensemble's Kaggle kernel (:func:`glr.kaggle.kernel.build.build_kernel`),
            which is then run in a simulated ``/kaggle`` in both mount layouts and compared with
            the library's submission (None: skip). The result is ``cv.json``'s ``kernel`` entry.

    Returns:
        The ensemble's cv.json content.
    """

    work, out = Path(work), Path(out)
    if data is None:
        data = work / "data"
        if not (Path(data) / "train.csv").exists():
            synth_kw = dict(n_landmarks=24, scale=0.15, image_size=48) if quick else {}
            make_synthetic_gldv2(data, **dict(synth_kw, seed=0, progress=progress, **(synth_args or {})))
    exps = list(experiments or (QUICK_EXPERIMENTS if quick else DEMO_EXPERIMENTS))
    weights = Path(weights) if weights else work / "weights"
    overrides = dict(num_workers=num_workers, **(train_args or {}))
    rows: list[dict[str, Any]] = []
    finals: list[str] = []
    for cfg in exps:
        exp = parse_experiment(dict(cfg))
        # the demo retrains from scratch each time (force): its runs are throwaway
        res = run_experiment(dict(cfg), data, runs=work / "runs", weights=weights, overrides=overrides,
                             force=True, progress=progress)
        for (stage, opts), r in zip(exp.stages, res):
            rows.append(dict(name=f"{exp.name} {stage} ({opts['backbone']})", train_set=opts["train_set"],
                             image_size=opts["image_size"], cv=r["cv"]))
        finals.append(res[-1]["artifact"])
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
    print()
    print(stages_table(rows))
    print()
    print(cv_table(result))
    if result.get("sweep"):
        print()
        print("post-processing of the ensemble (tuned on Public, chosen chain in postprocess.yaml):")
        print(sweep_table({"protocol": result.get("protocol", "v2.1"), "pipeline": result["sweep"]["pipeline"]}))
    if kernel is not None:
        result["kernel"] = demo_kernel(data, out, kernel, weights, num_workers, progress)
        with atomic_write(out / "cv.json") as f:
            json.dump(result, f, indent=2, default=str)
    return result


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
