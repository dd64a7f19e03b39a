"""Per-query figures of a CV run: AP@100 per query, the worst queries, top-1 similarities.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from glr import metrics
from glr.data.root import GLDv2Root
from glr.embeddings.npz import load_embeddings
from glr.eval.sweep import STAGE_NAMES
from glr.report.common import _as_root, _cv_files, _solution, _submission_lists, _subset_map
from glr.report.tables import _NAMES
from glr.search import knn

log = logging.getLogger(__name__)

def _top1_similarity(cv_dir: Path, ids: Iterable[str]) -> dict[str, float]:
    """Query id → inner product with its nearest index image, from ``emb_test.npz`` /
    ``emb_index.npz`` (empty when either file is missing)."""

    ft, fi = cv_dir / "emb_test.npz", cv_dir / "emb_index.npz"
    if not (ft.is_file() and fi.is_file()):
        log.warning("%s: no emb_test.npz / emb_index.npz: top-1 similarities are unknown", cv_dir)
        return {}
    test_ids, q = load_embeddings(ft)
    index_ids, db = load_embeddings(fi)
    if not len(index_ids) or not len(test_ids):
        return {}
    row = {t: i for i, t in enumerate(test_ids)}
    wanted = [t for t in dict.fromkeys(ids) if t in row]
    if not wanted:
        return {}
    S, _ = knn(q[[row[t] for t in wanted]], db, 1)
    return {t: float(s) for t, s in zip(wanted, S[:, 0])}


def _query_scores(root: GLDv2Root, cv_dir: Path, top1: bool) -> list[dict[str, Any]]:
    _, sub = _cv_files(cv_dir)
    sol, public, private, ignored = _solution(root)
    pred_public, pred_private = metrics.read_predictions(sub, public, private, ignored, "retrieval")
    order = list(_submission_lists(sub))
    listed = set(order)
    order += [t for t in list(public) + list(private) if t not in listed]
    sims = _top1_similarity(cv_dir, order) if top1 else {}
    rows = []
    for t in order:
        subset, gt, preds = ((("public", public[t], pred_public) if t in public else
                              ("private", private[t], pred_private) if t in private else (None, None, None)))
        ap: float | None = None
        if gt is not None:
            # the official per-query AP: mAP of a one-query solution
            ap = float(metrics.mean_average_precision({t: preds[t]}, {t: gt})) if t in preds else 0.0
        rows.append({"id": t, "subset": subset, "in_domain": gt is not None, "n_gt": len(gt) if gt else 0,
                     "ap": ap, "top1": sims.get(t)})
    return rows


def per_query_scores(root: GLDv2Root | str | os.PathLike, cv_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Per test query of a CV run: its retrieval AP@100 and its top-1 similarity.

    Args:
        root: the GLDv2 root the CV ran on (or its folder); needs ``retrieval_solution_v2.1.csv``.
        cv_dir: the output folder of :func:`glr.workflows.cv.cv` (``submission.csv``; ``emb_test.npz``
            and ``emb_index.npz`` for the similarities).

    Returns:
        One dict per query, in ``submission.csv`` order (then any scored query the submission
        lacks): ``id``; ``subset`` (``"public"`` / ``"private"``, None out of domain);
        ``in_domain`` (the query has retrieval ground truth, i.e. is a Public or Private row of
        the solution); ``n_gt`` (ground-truth index images, 0 out of domain); ``ap`` (AP@100
        exactly as :func:`glr.metrics.mean_average_precision` scores the query, 0.0 for a scored
        query without a prediction, None out of domain: Ignored and non-landmark queries);
        ``top1`` (inner product of the stored L2-normalised embeddings, i.e. cosine, of the
        query and its nearest index image, before any post-processing; None without the
        embedding files). The mean of ``ap`` over a subset is that subset's ``map@100``.

    Raises:
        InputError: no ``submission.csv`` / ``cv.json`` in ``cv_dir``, no solution file in the
            root, or a malformed file (named).
    """
    return _query_scores(_as_root(root), Path(cv_dir), top1=True)


def worst_queries(scores: Sequence[dict[str, Any]], n: int = 20) -> list[dict[str, Any]]:
    """The ``n`` in-domain rows of :func:`per_query_scores` with the lowest AP (ties: input order)."""
    return sorted((r for r in scores if r["in_domain"]), key=lambda r: r["ap"])[:n]


def stage_scores(cv_json: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of :func:`draw_stage_scores`: ``{"group", "name", "public", "private", "all",
    "kept"}`` (mAP@100 or None) for each training stage (cv.json ``stages``), the run itself
    (``final``), each baseline descriptor (``baselines``) and each step of the
    post-processing sweep (``sweep``; ``kept`` False for a step the sweep rejected)."""
    rows: list[dict[str, Any]] = []

    def add(group: str, name: str, figures: dict | None, kept: bool | None = None) -> None:
        rows.append({"group": group, "name": name, "kept": kept,
                     **{s: _subset_map(figures, s) for s in ("public", "private", "all")}})

    for st in cv_json.get("stages") or []:
        where = f" {st.get('train_set')}@{st.get('image_size')}" if st.get("train_set") else ""
        add("stage", f"{st.get('name', '?')}{where}", st.get("cv"))
    kind = cv_json.get("descriptor", "model")
    name = _NAMES.get(kind, kind)
    if kind == "model" and cv_json.get("ensemble"):
        name = f"fine-tuned ensemble ({len(cv_json['ensemble'])} models)"
    post = [s for s, v in (cv_json.get("postprocess") or {}).items() if s not in ("k", "shortlist") and v]
    add("final", "this run: " + name + (" + " + ", ".join(post) if post else ""), cv_json)
    for k, figures in (cv_json.get("baselines") or {}).items():
        add("baseline", "baseline: " + _NAMES.get(k, k), figures)

    for r in (cv_json.get("sweep") or {}).get("pipeline") or []:
        add("sweep", f"sweep: {STAGE_NAMES.get(r.get('stage'), r.get('stage'))}", r.get("scores"), r.get("kept"))
    return rows
