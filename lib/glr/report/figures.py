"""Figures of a CV run: retrieval grids, score distributions, stage scores, ablations.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from glr import metrics
from glr.data.root import GLDv2Root
from glr.report.common import (_as_root, _cv_files, _draw_sheet, _new_figure, _note, _save_figure, _solution,
                               _submission_lists)
from glr.report.scores import _query_scores, per_query_scores, stage_scores, worst_queries
from glr.utils import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


def draw_ablation(report: dict[str, Any], path: str | os.PathLike | None = None) -> Figure:
    """Bar chart of the ablation tables (Public and Private mAP@100 per setting), one panel per
    table; saved to ``path`` when given. Returns the Figure."""
    tables = list(report["tables"].items())
    fig = _new_figure((5 * len(tables), 3.6))
    axes = fig.subplots(1, len(tables), squeeze=False)
    for ax, (t, rows) in zip(axes[0], tables):
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["public"] for r in rows], 0.4, label="Public (val)")
        ax.bar([x + 0.2 for x in xs], [r["private"] for r in rows], 0.4, label="Private")
        ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=15, fontsize=8)
        ax.set_title(f"Table {t}")
        ax.set_ylabel("mAP@100")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)


def draw_retrievals(root: GLDv2Root, cv_dir: str | os.PathLike, path: str | os.PathLike | None = None,
                    n_queries: int = 6, top: int = 8, thumb: int = 96) -> Image.Image:
    """Draw queries (left column) and their top retrievals from ``cv_dir/submission.csv``;
    a green frame marks a correct index image, red a wrong one. Queries with ground truth only.
    Returns the picture (saved to ``path`` when given).
    """
    public, private, _ = metrics.read_solution(root.solution_path("retrieval"), "retrieval")
    gt = {**public, **private}
    preds = _submission_lists(Path(cv_dir) / "submission.csv")
    queries = [q for q in preds if q in gt][:n_queries]
    return _draw_sheet(root, [(q, preds[q], gt[q], None) for q in queries], path, top, thumb)


def draw_retrieval_grid(root: GLDv2Root | str | os.PathLike, cv_dir: str | os.PathLike,
                        path: str | os.PathLike | None = None, query_ids: Sequence[str] | None = None,
                        n_queries: int = 8, top: int = 5, which: str = "first", thumb: int = 96,
                        scores: Sequence[dict[str, Any]] | None = None) -> Image.Image:
    """One row per query: the query image (blue frame, its AP or "no GT" written on it), then
    its first ``top`` retrievals of ``cv_dir/submission.csv``, framed green when in the
    query's ground truth, red when not, grey when the query has no ground truth.

    Args:
        root: the GLDv2 root (or its folder).
        cv_dir: a :func:`glr.workflows.cv.cv` output folder.
        path: where to write the picture too (PNG unless its suffix names another format).
        query_ids: the queries to draw, in this order (any test ids of the submission);
            overrides ``which`` / ``n_queries``.
        n_queries: rows when ``query_ids`` is None.
        top: retrievals per row.
        which: ``"first"``: the first in-domain queries of the submission (every query when
            the root has no solution file); ``"worst"``: the in-domain queries with the lowest
            AP, lowest first; ``"ood"``: the out-of-domain queries most similar to an index
            image (the non-landmarks hardest to reject).
        thumb: tile side in pixels. The picture is ``(top + 1)·(thumb + 4) + 4`` pixels wide
            and ``rows·(thumb + 4) + 4`` high.
        scores: :func:`per_query_scores` of this run, to avoid recomputing them.

    Returns:
        The picture (a PIL image; a notebook shows it inline).

    Raises:
        InputError: missing files, an unknown ``which``, ``"worst"`` / ``"ood"`` without a
            solution file, or a query id that is not in the submission.
    """
    if which not in ("first", "worst", "ood"):
        raise InputError(f"which must be 'first', 'worst' or 'ood', got {which!r}")
    root, cv_dir = _as_root(root), Path(cv_dir)
    _, sub = _cv_files(cv_dir)
    preds = _submission_lists(sub)
    has_solution = root.solution_path("retrieval") is not None
    gt: dict[str, list] = {}
    if has_solution:
        _, public, private, _ = _solution(root)
        gt = {**public, **private}
    elif which != "first" and query_ids is None:
        _solution(root)  # raises, naming the missing file
    if scores is None and has_solution:
        scores = _query_scores(root, cv_dir, top1=which == "ood")
    by_id = {r["id"]: r for r in scores or ()}
    if query_ids is not None:
        missing = [q for q in query_ids if q not in preds]
        if missing:
            raise InputError(f"query id(s) {', '.join(map(repr, missing[:5]))} are not in the submission", sub)
        chosen = list(query_ids)
    elif which == "first":
        chosen = [q for q in preds if q in gt or not has_solution][:n_queries]
    elif which == "worst":
        chosen = [r["id"] for r in worst_queries(list(scores or ()), n_queries)]
    else:
        ood = [r for r in scores or () if not r["in_domain"] and r["top1"] is not None]
        chosen = [r["id"] for r in sorted(ood, key=lambda r: -r["top1"])[:n_queries]]

    def label(q: str) -> str | None:
        r = by_id.get(q)
        if r is None:
            return None
        if r["in_domain"]:
            return f"AP {r['ap']:.3f}"
        return "no GT" + ("" if r["top1"] is None else f" s={r['top1']:.2f}")

    rows = [(q, preds.get(q, []), gt.get(q), label(q)) for q in chosen]
    return _draw_sheet(root, rows, path, top, thumb)


def draw_score_distributions(root: GLDv2Root | str | os.PathLike, cv_dir: str | os.PathLike,
                             path: str | os.PathLike | None = None, scores: Sequence[dict[str, Any]] | None = None,
                             bins: int = 30) -> Figure:
    """Overlaid histograms of the top-1 similarity of in-domain queries (they have retrieval
    ground truth) and out-of-domain ones (non-landmark / Ignored queries): where a
    non-landmark threshold would be chosen.

    Args:
        root: the GLDv2 root (or its folder), with its retrieval solution file.
        cv_dir: a :func:`glr.workflows.cv.cv` output folder with ``emb_test.npz`` / ``emb_index.npz``.
        path: where to save the figure too (format from the suffix).
        scores: :func:`per_query_scores` of this run, to avoid recomputing them.
        bins: histogram bins (shared by both groups).

    Returns:
        The Figure (a note instead of histograms when no similarity is known).
    """
    if scores is None:
        scores = per_query_scores(root, cv_dir)
    groups = {"in-domain (with ground truth)": [r["top1"] for r in scores if r["in_domain"] and r["top1"] is not None],
              "out-of-domain (no ground truth)": [r["top1"] for r in scores
                                                  if not r["in_domain"] and r["top1"] is not None]}
    fig = _new_figure((7, 3.8))
    ax = fig.subplots()
    values = [v for vs in groups.values() for v in vs]
    if values:
        lo, hi = min(values), max(values)
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-3, bins + 1)
        for (name, vs), colour in zip(groups.items(), ("tab:green", "tab:red")):
            if vs:
                ax.hist(vs, bins=edges, alpha=0.55, color=colour,
                        label=f"{name}: {len(vs)}, median {float(np.median(vs)):.3f}")
        ax.legend(fontsize=8)
        ax.set_xlabel("top-1 cosine similarity to the index")
        ax.set_ylabel("queries")
    else:
        _note(ax, "no top-1 similarity known\n(no emb_test.npz / emb_index.npz in the CV folder)")
    ax.set_title("top-1 similarity: landmark vs non-landmark queries")
    fig.tight_layout()
    return _save_figure(fig, path)


def draw_stage_scores(cv_json: dict[str, Any], path: str | os.PathLike | None = None) -> Figure:
    """Horizontal bars of Public / Private mAP@100 (``all`` for protocol 2021) per row of
    :func:`stage_scores`: training stages, the run itself, baselines, then the sweep's
    pipeline (hatched: a step the sweep did not keep).

    Args:
        cv_json: the content of a CV folder's ``cv.json`` (:func:`glr.workflows.cv.cv`'s result).
        path: where to save the figure too (format from the suffix).

    Returns:
        The Figure.
    """
    rows = stage_scores(cv_json)
    subsets = [s for s in ("public", "private", "all") if any(r[s] is not None for r in rows)]
    fig = _new_figure((8.5, 1.2 + 0.42 * max(1, len(rows)) * max(1, len(subsets))))
    ax = fig.subplots()
    if not subsets:
        _note(ax, "no retrieval scores (the root has no solution file)")
    else:
        y = np.arange(len(rows))
        h = 0.8 / len(subsets)
        for j, s in enumerate(subsets):
            vals = [np.nan if r[s] is None else r[s] for r in rows]
            bars = ax.barh(y + (j - (len(subsets) - 1) / 2) * h, vals, h, label=s.capitalize())
            for r, bar, v in zip(rows, bars, vals):
                if r["kept"] is False:
                    bar.set_hatch("//")
                if not math.isnan(v):
                    ax.text(v, bar.get_y() + bar.get_height() / 2, f" {v:.3f}", va="center", fontsize=7)
        for yy, r in zip(y, rows):
            if all(r[s] is None for s in subsets):
                ax.text(0, yy, " no CV figures", va="center", fontsize=7, color="grey")
        ax.set_yticks(y, [r["name"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("mAP@100")
        ax.set_xlim(0, min(1.0, max(r[s] or 0 for r in rows for s in subsets) * 1.15 + 0.02))
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("retrieval mAP@100 per stage" + ("\n(hatched: a sweep step not kept)"
                                                 if any(r["kept"] is False for r in rows) else ""))
    fig.tight_layout()
    return _save_figure(fig, path)
