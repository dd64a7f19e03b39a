"""The post-processing sweep's figure and files (``sweep.{json,md,png}``, ``postprocess.yaml``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from glr.eval.sweep import STAGE_NAMES, _figure, sweep_table
from glr.postprocess.config import write_config
from glr.report.common import _new_figure, _save_figure
from glr.utils import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


def draw_sweep(result: Mapping[str, Any], path: str | os.PathLike | None = None) -> Figure:
    """Two panels: the pipeline's mAP@100 per stage (bars, tuning and held-out subsets), and
    every setting's tuning-subset mAP@100 per stage (dots). Saved to ``path`` (PNG) when given.

    Returns:
        The Figure.
    """
    subsets = ["public", "private"] if result["protocol"] == "v2.1" else ["all"]
    pipe = result["pipeline"]
    fig = _new_figure((12, 4.2))
    a, b = fig.subplots(1, 2)
    x = np.arange(len(pipe))
    w = 0.8 / len(subsets)
    for j, s in enumerate(subsets):
        vals = [max(_figure(r["scores"], s), 0) for r in pipe]
        bars = a.bar(x + (j - (len(subsets) - 1) / 2) * w, vals, w, label=s.capitalize())
        for r, bar in zip(pipe, bars):
            if not r.get("kept"):
                bar.set_hatch("//")
    a.set_xticks(x, [STAGE_NAMES.get(r["stage"], r["stage"]).replace(" ", "\n", 1) for r in pipe], fontsize=8)
    a.set_ylabel("mAP@100")
    a.set_title("pipeline (hatched: not kept)")
    a.legend()
    stages = [r["stage"] for r in pipe]
    for i, st in enumerate(stages):
        ys = [_figure(r["scores"], result["tune"]) for r in result["rows"] if r["stage"] == st]
        b.scatter(np.full(len(ys), i) + np.linspace(-0.2, 0.2, len(ys)), ys, s=12)
    b.set_xticks(range(len(stages)), [STAGE_NAMES.get(s, s).replace(" ", "\n", 1) for s in stages], fontsize=8)
    b.set_ylabel(f"mAP@100 {result['tune'].capitalize()} (tuning)")
    b.set_title("every setting")
    fig.tight_layout()
    return _save_figure(fig, path)


def write_sweep(result: Mapping[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """``sweep.json``, ``sweep.md`` (pipeline and every setting), ``sweep.png`` and the chosen
    ``postprocess.yaml`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "sweep.json", "md": out / "sweep.md", "png": out / "sweep.png",
             "config": out / "postprocess.yaml"}
    with atomic_write(files["json"]) as f:
        json.dump(result, f, indent=2, default=str)
    with atomic_write(files["md"]) as f:
        f.write(f"# Post-processing sweep (protocol {result['protocol']}, tuned on {result['tune']})\n\n")
        f.write(sweep_table(result) + "\n\n## Every setting\n\n" + sweep_table(result, all_rows=True) + "\n")
    try:
        draw_sweep(result, files["png"])
    except Exception as e:  # a picture must never fail the run
        log.warning("could not draw the sweep: %s", e)
        files.pop("png")
    write_config(files["config"], result["config"],
                 comment=f"chosen by glr cv --sweep (protocol {result['protocol']}, tuned on {result['tune']})")
    return files
