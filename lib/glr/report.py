"""What people would rather look at: CV score tables, retrieval pictures, per-query scores,
the data's long tail, and one HTML report of a CV run (:func:`write_report`).

Every ``draw_*`` function writes one picture (PNG unless the path's suffix names another
format) and returns its path, so a notebook can show it inline
(``IPython.display.Image(draw_…(…))``); the table helpers return plain Python values.
"""

from __future__ import annotations

import html
import logging
import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from glr import metrics
from glr.data import GLDv2Root
from glr.submission import read_submission
from glr.utils import InputError, atomic_write, read_json_object

log = logging.getLogger(__name__)

_NAMES = {"thumbnail": "16x16 colour thumbnails, cosine kNN",
          "imagenet": "ImageNet lite0 + GeM, no training",
          "model": "fine-tuned model"}


def _fmt(x: float | None) -> str:
    return "      —" if x is None else f"{x:7.4f}"


def _get(sub: dict | None, key: str) -> float | None:
    return None if not sub else sub.get(key)


def cv_table(result: dict[str, Any]) -> str:
    """A fixed-width table of retrieval mAP@100 (and recognition GAP) per descriptor.

    Args:
        result: :func:`glr.pipeline.cv` output, optionally with a ``baselines`` entry
            ({kind: {"public": …, "private": …}}).
    """
    rows = [(kind, r) for kind, r in result.get("baselines", {}).items()]
    kind = result.get("descriptor", "model")
    if kind == "model" and result.get("ensemble"):
        kind = f"fine-tuned ensemble ({len(result['ensemble'])} models)"
    rows.append((kind, result))
    lines = [f"{'descriptor':38s} {'mAP@100 pub':>11s} {'mAP@100 priv':>12s} {'GAP pub':>8s} {'GAP priv':>8s}",
             "-" * 81]
    for kind, r in rows:
        rec = r.get("recognition") or {}
        lines.append(f"{_NAMES.get(kind, kind):38s} {_fmt(_get(r.get('public'), 'map@100')):>11s} "
                     f"{_fmt(_get(r.get('private'), 'map@100')):>12s} {_fmt(_get(rec.get('public'), 'gap')):>8s} "
                     f"{_fmt(_get(rec.get('private'), 'gap')):>8s}")
    if result.get("all"):
        lines.append(f"protocol 2021 (every query with ground truth, {result['all']['n_queries']}): "
                     f"mAP@100 {_fmt(result['all']['map@100'])}")
    post = result.get("postprocess") or {}
    steps = [s for s, v in post.items() if s not in ("k", "shortlist") and v]
    if steps:
        lines.append("post-processing: " + ", ".join(steps))
    if result.get("val_leak"):
        lines.append("WARNING: trained on this root's validation ground truth (allow_val_leak): "
                     "these figures are not a valid CV")
    return "\n".join(lines)


def stages_table(rows: list[dict[str, Any]]) -> str:
    """Per experiment stage (and the ensemble): training set, image size and CV figures.

    Args:
        rows: dicts with ``name``, ``train_set``, ``image_size`` and a :func:`glr.pipeline.cv`
            result under ``cv`` (or None).
    """
    lines = [f"{'model':34s} {'set@size':>10s} {'mAP@100 pub':>11s} {'mAP@100 priv':>12s} {'GAP pub':>8s} "
             f"{'GAP priv':>8s}", "-" * 88]
    for r in rows:
        cv = r.get("cv") or {}
        rec = cv.get("recognition") or {}
        where = f"{r.get('train_set', '')}@{r.get('image_size', '')}" if r.get("train_set") else ""
        lines.append(f"{r['name']:34s} {where:>10s} {_fmt(_get(cv.get('public'), 'map@100')):>11s} "
                     f"{_fmt(_get(cv.get('private'), 'map@100')):>12s} {_fmt(_get(rec.get('public'), 'gap')):>8s} "
                     f"{_fmt(_get(rec.get('private'), 'gap')):>8s}")
    return "\n".join(lines)


def ablation_table(report: dict[str, Any]) -> str:
    """Markdown tables of :func:`glr.experiment.ablate` (retrieval mAP@100, validation =
    Public, and Private)."""
    titles = {"2": "Table 2: re-ID tricks (cumulative)", "3": "Table 3: samplers"}
    out = []
    for t, rows in report["tables"].items():
        out += [f"### {titles.get(t, 'Table ' + t)}", "", "| setting | mAP@100 Public (val) | mAP@100 Private |",
                "|---|---|---|"]
        out += [f"| {r['name']} | {r['public']:.4f} | {r['private']:.4f} |" for r in rows]
        out.append("")
    return "\n".join(out).rstrip()


def draw_ablation(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Bar chart of the ablation tables (Public and Private mAP@100 per setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = list(report["tables"].items())
    fig, axes = plt.subplots(1, len(tables), figsize=(5 * len(tables), 3.6), squeeze=False)
    for ax, (t, rows) in zip(axes[0], tables):
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["public"] for r in rows], 0.4, label="Public (val)")
        ax.bar([x + 0.2 for x in xs], [r["private"] for r in rows], 0.4, label="Private")
        ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=15, fontsize=8)
        ax.set_title(f"Table {t}")
        ax.set_ylabel("mAP@100")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def draw_retrievals(root: GLDv2Root, cv_dir: str | os.PathLike, path: str | os.PathLike, n_queries: int = 6,
                    top: int = 8, thumb: int = 96) -> Path:
    """Draw queries (left column) and their top retrievals from ``cv_dir/submission.csv``;
    a green frame marks a correct index image, red a wrong one. Queries with ground truth only.
    """
    public, private, _ = metrics.read_solution(root.solution_path("retrieval"), "retrieval")
    gt = {**public, **private}
    preds = _submission_lists(Path(cv_dir) / "submission.csv")
    queries = [q for q in preds if q in gt][:n_queries]
    return _draw_sheet(root, [(q, preds[q], gt[q], None) for q in queries], path, top, thumb)


# --------------------------------------------------------------------------- shared plumbing
_PAD = 4
_FRAME = {True: "green", False: "red", None: "grey"}
_QUERY_FRAME = "blue"


def _as_root(root: GLDv2Root | str | os.PathLike) -> GLDv2Root:
    """``root`` itself, or the root opened from a folder (InputError naming ``train.csv``)."""
    return root if isinstance(root, GLDv2Root) else GLDv2Root.open(root)


def _cv_files(cv_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``(cv.json, submission.csv)`` of a CV folder; InputError naming the one missing."""
    cv_dir = Path(cv_dir)
    if not cv_dir.is_dir():
        raise InputError("CV folder not found (expected the output folder of glr cv)", cv_dir)
    paths = cv_dir / "cv.json", cv_dir / "submission.csv"
    for p in paths:
        if not p.is_file():
            raise InputError(f"{p.name} not found: not the output folder of glr cv", p)
    return paths


def _solution(root: GLDv2Root) -> tuple[Path, dict[str, list], dict[str, list], list[str]]:
    sol = root.solution_path("retrieval")
    if sol is None:
        raise InputError("retrieval solution file not found: per-query scores need the ground truth",
                         root.root / "retrieval_solution_v2.1.csv")
    public, private, ignored = metrics.read_solution(sol, "retrieval")
    return sol, public, private, ignored


def _submission_lists(path: Path) -> dict[str, list[str]]:
    """Test id → ranked index ids of a retrieval submission (file order)."""
    return {q: cell.split(" ") if cell else [] for q, cell in read_submission(path, "retrieval")}


def _save_image(img: Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with atomic_write(path, "wb") as f:
        img.save(f, format=fmt)
    return path


def _save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".") or "png"
    try:
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format=fmt, dpi=dpi)
    finally:
        plt.close(fig)
    return path


def _pyplot() -> Any:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _tile(root: GLDv2Root, split: str, image_id: str, thumb: int) -> Image.Image:
    """The image resized to ``thumb``², or a light grey tile when it cannot be read."""
    try:
        with Image.open(root.path(split, image_id)) as im:
            return im.convert("RGB").resize((thumb, thumb))
    except (OSError, ValueError) as e:
        log.warning("cannot read %s image %r: %s", split, image_id, e)
        return Image.new("RGB", (thumb, thumb), (225, 225, 225))


def _draw_sheet(root: GLDv2Root, rows: Sequence[tuple[str, Sequence[str], Sequence[str] | None, str | None]],
                path: str | os.PathLike, top: int, thumb: int) -> Path:
    """The retrieval sheet shared by :func:`draw_retrievals` and :func:`draw_retrieval_grid`.

    Each row is ``(query id, ranked index ids, ground truth or None, label or None)``: the
    query tile (blue frame, the label written across its bottom) then its first ``top``
    retrievals, framed green when in the ground truth, red when not, grey when the query has
    no ground truth. The sheet is ``(top + 1)·(thumb + 4) + 4`` by ``rows·(thumb + 4) + 4``
    pixels (one empty row's height when there is no row).
    """
    pad = _PAD
    sheet = Image.new("RGB", ((top + 1) * (thumb + pad) + pad, max(1, len(rows)) * (thumb + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (q, ranked, gt, label) in enumerate(rows):
        y = pad + r * (thumb + pad)
        relevant = None if gt is None else set(gt)
        cells: list[tuple[str, str, bool | None]] = [("test", q, None)]
        cells += [("index", i, None if relevant is None else i in relevant) for i in ranked[:top]]
        for c, (split, image_id, ok) in enumerate(cells):
            x = pad + c * (thumb + pad)
            sheet.paste(_tile(root, split, image_id, thumb), (x, y))
            colour = _QUERY_FRAME if c == 0 else _FRAME[ok]
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline=colour, width=3)
        if label:
            x = pad
            _, t, _, b = draw.textbbox((0, 0), label)
            h = b - t + 4
            draw.rectangle([x + 3, y + thumb - 3 - h, x + thumb - 4, y + thumb - 4], fill="black")
            draw.text((x + 5, y + thumb - 3 - h + 2 - t), label, fill="white")
    return _save_image(sheet, path)


# --------------------------------------------------------------------------- per-query scores
def _top1_similarity(cv_dir: Path, ids: Iterable[str]) -> dict[str, float]:
    """Query id → inner product with its nearest index image, from ``emb_test.npz`` /
    ``emb_index.npz`` (empty when either file is missing)."""
    from glr.embeddings import load_embeddings  # noqa: PLC0415
    from glr.search import knn  # noqa: PLC0415

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
        cv_dir: the output folder of :func:`glr.pipeline.cv` (``submission.csv``; ``emb_test.npz``
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


# --------------------------------------------------------------------------- retrieval pictures
def draw_retrieval_grid(root: GLDv2Root | str | os.PathLike, cv_dir: str | os.PathLike, path: str | os.PathLike,
                        query_ids: Sequence[str] | None = None, n_queries: int = 8, top: int = 5,
                        which: str = "first", thumb: int = 96,
                        scores: Sequence[dict[str, Any]] | None = None) -> Path:
    """One row per query: the query image (blue frame, its AP or "no GT" written on it), then
    its first ``top`` retrievals of ``cv_dir/submission.csv``, framed green when in the
    query's ground truth, red when not, grey when the query has no ground truth.

    Args:
        root: the GLDv2 root (or its folder).
        cv_dir: a :func:`glr.pipeline.cv` output folder.
        path: the picture to write (PNG unless its suffix names another format).
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
        ``path``.

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
                             path: str | os.PathLike, scores: Sequence[dict[str, Any]] | None = None,
                             bins: int = 30) -> Path:
    """Overlaid histograms of the top-1 similarity of in-domain queries (they have retrieval
    ground truth) and out-of-domain ones (non-landmark / Ignored queries): where a
    non-landmark threshold would be chosen.

    Args:
        root: the GLDv2 root (or its folder), with its retrieval solution file.
        cv_dir: a :func:`glr.pipeline.cv` output folder with ``emb_test.npz`` / ``emb_index.npz``.
        path: the picture to write.
        scores: :func:`per_query_scores` of this run, to avoid recomputing them.
        bins: histogram bins (shared by both groups).

    Returns:
        ``path`` (a note instead of histograms when no similarity is known).
    """
    if scores is None:
        scores = per_query_scores(root, cv_dir)
    groups = {"in-domain (with ground truth)": [r["top1"] for r in scores if r["in_domain"] and r["top1"] is not None],
              "out-of-domain (no ground truth)": [r["top1"] for r in scores
                                                  if not r["in_domain"] and r["top1"] is not None]}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
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


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- stage scores
def _subset_map(figures: dict | None, subset: str) -> float | None:
    s = (figures or {}).get(subset)
    v = s.get("map@100") if isinstance(s, dict) else None
    return None if v is None else float(v)


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
    from glr.sweep import STAGE_NAMES  # noqa: PLC0415

    for r in (cv_json.get("sweep") or {}).get("pipeline") or []:
        add("sweep", f"sweep: {STAGE_NAMES.get(r.get('stage'), r.get('stage'))}", r.get("scores"), r.get("kept"))
    return rows


def draw_stage_scores(cv_json: dict[str, Any], path: str | os.PathLike) -> Path:
    """Horizontal bars of Public / Private mAP@100 (``all`` for protocol 2021) per row of
    :func:`stage_scores`: training stages, the run itself, baselines, then the sweep's
    pipeline (hatched: a step the sweep did not keep).

    Args:
        cv_json: the content of a CV folder's ``cv.json`` (:func:`glr.pipeline.cv`'s result).
        path: the picture to write.

    Returns:
        ``path``.
    """
    rows = stage_scores(cv_json)
    subsets = [s for s in ("public", "private", "all") if any(r[s] is not None for r in rows)]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 1.2 + 0.42 * max(1, len(rows)) * max(1, len(subsets))))
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


# --------------------------------------------------------------------------- the data (EDA)
def landmark_counts(root: GLDv2Root | str | os.PathLike, subset: str = "full") -> list[tuple[int, int]]:
    """``(landmark_id, train images)`` of ``train.csv`` (``subset`` as
    :meth:`GLDv2Root.train_ids_labels`), most images first, ties by landmark id."""
    counts = Counter(lm for _, lm in _as_root(root).train_ids_labels(subset))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def draw_class_long_tail(root: GLDv2Root | str | os.PathLike, path: str | os.PathLike,
                         subset: str = "full") -> Path:
    """Train images per landmark, landmarks sorted by count, log-scale y (GLDv2 paper, Fig. 1).

    Args:
        root: the GLDv2 root (or its folder).
        path: the picture to write.
        subset: ``"full"`` (``train.csv``) or ``"clean"`` (``train_clean.csv``).

    Returns:
        ``path``.
    """
    counts = [n for _, n in landmark_counts(root, subset)]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    if counts:
        x = np.arange(1, len(counts) + 1)
        ax.fill_between(x, counts, step="mid", alpha=0.35)
        ax.plot(x, counts, drawstyle="steps-mid")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.8)
        ax.set_xlim(1, max(2, len(counts)))
        ax.set_xlabel("landmark (sorted by number of images)")
        ax.set_ylabel("train images (log)")
        ax.set_title(f"long tail: {sum(counts)} images of {len(counts)} landmarks "
                     f"(max {counts[0]}, median {int(np.median(counts))})")
    else:
        _note(ax, "train.csv has no image")
    fig.tight_layout()
    return _save_figure(fig, path)


def images_per_continent(root: GLDv2Root | str | os.PathLike, subset: str = "full") -> dict[str, int] | None:
    """Train images per continent (``geo.load_landmark_continents``; landmarks without a
    country count as ``"unknown"``), most first; None when the root has no country file."""
    from glr.geo import load_landmark_continents  # noqa: PLC0415

    root = _as_root(root)
    continents = load_landmark_continents(root.root)
    if continents is None:
        return None
    counts = Counter(continents.get(lm) or "unknown" for _, lm in root.train_ids_labels(subset))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def draw_images_per_continent(root: GLDv2Root | str | os.PathLike, path: str | os.PathLike,
                              subset: str = "full") -> Path:
    """Bar chart of :func:`images_per_continent`; a note instead of bars when the root has no
    ``train_label_to_country.csv``.

    Returns:
        ``path``.
    """
    from glr.geo import COUNTRY_FILE  # noqa: PLC0415

    counts = images_per_continent(root, subset)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if counts is None:
        _note(ax, f"no {COUNTRY_FILE} in the root:\ncontinents unknown")
    elif not counts:
        _note(ax, "train.csv has no image")
    else:
        bars = ax.bar(list(counts), list(counts.values()), color="tab:blue")
        total = sum(counts.values())
        for bar, n in zip(bars, counts.values()):
            ax.text(bar.get_x() + bar.get_width() / 2, n, f"{n}\n{100 * n / total:.0f}%", ha="center",
                    va="bottom", fontsize=8)
        ax.set_ylabel("train images")
        ax.set_ylim(0, max(counts.values()) * 1.25)
    ax.set_title("train images per continent")
    fig.tight_layout()
    return _save_figure(fig, path)


def draw_landmark_samples(root: GLDv2Root | str | os.PathLike, path: str | os.PathLike, n_landmarks: int = 6,
                          per_landmark: int = 4, seed: int = 0, thumb: int = 96,
                          subset: str = "full") -> Path:
    """A grid of train images: one row per landmark (chosen at random with ``seed``), its id
    and image count written on the left, then up to ``per_landmark`` random images of it.

    The picture is ``label + per_landmark·(thumb + 4) + 4`` pixels wide (label: 120 pixels)
    and ``rows·(thumb + 4) + 4`` high, rows = min(``n_landmarks``, landmarks in train).

    Returns:
        ``path``.
    """
    root = _as_root(root)
    by_lm: dict[int, list[str]] = {}
    for image_id, lm in root.train_ids_labels(subset):
        by_lm.setdefault(lm, []).append(image_id)
    rng = np.random.default_rng(seed)
    lms = sorted(by_lm)
    picked = [lms[i] for i in sorted(rng.choice(len(lms), size=min(n_landmarks, len(lms)), replace=False))]
    pad, label_w = _PAD, 120
    sheet = Image.new("RGB", (label_w + per_landmark * (thumb + pad) + pad,
                              max(1, len(picked)) * (thumb + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, lm in enumerate(picked):
        y = pad + r * (thumb + pad)
        ids = by_lm[lm]
        take = [ids[i] for i in sorted(rng.choice(len(ids), size=min(per_landmark, len(ids)), replace=False))]
        draw.text((pad, y + thumb // 2 - 12), f"landmark {lm}\n{len(ids)} image{'s' * (len(ids) != 1)}",
                  fill="black")
        for c, image_id in enumerate(take):
            sheet.paste(_tile(root, "train", image_id, thumb), (label_w + pad + c * (thumb + pad), y))
    return _save_image(sheet, path)


# --------------------------------------------------------------------------- the HTML report
_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}img{max-width:100%;border:1px solid #eee}
.note{color:#975}"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _md_cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_tables_html(text: str) -> str:
    """Markdown of the kind ``sweep.md`` holds (``#`` headings, pipe tables, paragraphs) as
    HTML, every text escaped (headings shifted down two levels)."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        m = re.match(r"^(#{1,4})\s+(.*)$", line)
        if m:
            level = min(6, len(m.group(1)) + 2)
            out.append(f"<h{level}>{_e(m.group(2))}</h{level}>")
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append(lines[i].strip())
                i += 1
            rows = [_md_cells(b) for b in block if not re.fullmatch(r"\|?[\s:|-]+\|?", b)]
            if rows:
                out.append("<table><tr>" + "".join(f"<th>{_e(c)}</th>" for c in rows[0]) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows[1:]]
                out.append("</table>")
            continue
        elif line:
            out.append(f"<p>{_e(line)}</p>")
        i += 1
    return "\n".join(out)


def _num(x: float | None, digits: int = 4) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _query_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["#", "query id", "subset", "ground truth", "AP@100", "top-1 similarity"]
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for n, r in enumerate(rows, 1):
        out.append(f"<tr class=\"query\"><td class=\"n\">{n}</td><td><code>{_e(r['id'])}</code></td>"
                   f"<td>{_e(r['subset'] or '')}</td><td class=\"n\">{r['n_gt']}</td>"
                   f"<td class=\"n\">{_num(r['ap'])}</td><td class=\"n\">{_num(r['top1'])}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _write_per_query_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    import csv  # noqa: PLC0415

    with atomic_write(path, newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "subset", "in_domain", "n_gt", "ap", "top1"])
        for r in rows:
            w.writerow([r["id"], r["subset"] or "", int(r["in_domain"]), r["n_gt"],
                        "" if r["ap"] is None else repr(r["ap"]), "" if r["top1"] is None else repr(r["top1"])])
    return path


def write_report(cv_dir: str | os.PathLike, root: GLDv2Root | str | os.PathLike, out_dir: str | os.PathLike,
                 title: str | None = None, progress: bool = True, n_worst: int = 20, data: bool = True) -> Path:
    """One HTML page of a CV run, its pictures beside it.

    Writes to ``out_dir``: ``report.html`` (atomically; self-contained apart from the pictures,
    linked by relative name; every text escaped), ``stage_scores.png``
    (:func:`draw_stage_scores`), ``retrievals_first.png`` / ``retrievals_worst.png``
    (:func:`draw_retrieval_grid`), ``score_distributions.png``
    (:func:`draw_score_distributions`), ``per_query.csv`` (:func:`per_query_scores`), a copy
    of the run's ``sweep.png`` when it has one, and with ``data`` the data pictures
    ``long_tail.png``, ``continents.png``, ``landmark_samples.png``. The page holds the CV
    table (:func:`cv_table`), the stage table when cv.json has ``stages``, the sweep
    (``sweep.md`` as HTML tables) and the ``n_worst`` in-domain queries with the lowest AP
    (id, subset, ground-truth count, AP@100, top-1 similarity). A root without a retrieval
    solution file gets the pictures that need none and a note. A picture that fails is
    replaced by a note (and a logged warning); the report is still written.

    Args:
        cv_dir: the output folder of :func:`glr.pipeline.cv` (``cv.json``, ``submission.csv``).
        root: the GLDv2 root the CV ran on (or its folder).
        out_dir: where the report goes (created).
        title: the page title (default: "CV report: <cv_dir name>").
        progress: a tqdm bar over the pictures.
        n_worst: rows of the worst-queries table.
        data: include the data pictures (train long tail, continents, samples).

    Returns:
        The path of ``report.html``.

    Raises:
        InputError: ``cv_dir`` lacks ``cv.json`` or ``submission.csv``, ``root`` is not a
            GLDv2 root (no ``train.csv``), or a file is malformed; the message names the file.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    cv_dir, out_dir = Path(cv_dir), Path(out_dir)
    cv_json_path, _ = _cv_files(cv_dir)
    root = _as_root(root)
    cv_json = read_json_object(cv_json_path, "cv.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    title = title if title is not None else f"CV report: {cv_dir.resolve().name}"
    has_solution = root.solution_path("retrieval") is not None
    scores = _query_scores(root, cv_dir, top1=True) if has_solution else None

    figures: list[tuple[str, str, str, Any]] = [  # (section, file, caption, draw)
        ("scores", "stage_scores.png", "Retrieval mAP@100 per stage, the run, baselines and the sweep's steps",
         lambda p: draw_stage_scores(cv_json, p)),
        ("retrievals", "retrievals_first.png",
         "The first queries with ground truth and their top 5 (green: in the ground truth, red: not)"
         if has_solution else "The first queries and their top 5 (no ground truth: grey frames)",
         lambda p: draw_retrieval_grid(root, cv_dir, p, which="first", scores=scores)),
    ]
    if has_solution:
        figures += [
            ("retrievals", "retrievals_worst.png", "The in-domain queries with the lowest AP@100, lowest first",
             lambda p: draw_retrieval_grid(root, cv_dir, p, which="worst", scores=scores)),
            ("queries", "score_distributions.png",
             "Top-1 similarity of queries with and without ground truth (a non-landmark threshold lies between)",
             lambda p: draw_score_distributions(root, cv_dir, p, scores=scores)),
        ]
    if (cv_dir / "sweep.png").is_file():
        figures.append(("sweep", "sweep.png", "The post-processing sweep (left: the pipeline; right: every setting)",
                        lambda p: Path(shutil.copyfile(cv_dir / "sweep.png", p))))
    if data:
        figures += [
            ("data", "long_tail.png", "Train images per landmark, sorted (log scale)",
             lambda p: draw_class_long_tail(root, p)),
            ("data", "continents.png", "Train images per continent", lambda p: draw_images_per_continent(root, p)),
            ("data", "landmark_samples.png", "Train images of random landmarks",
             lambda p: draw_landmark_samples(root, p)),
        ]
    drawn: dict[str, list[str]] = {}
    for section, name, caption, draw in tqdm(figures, desc="report", disable=not progress, leave=False):
        try:
            draw(out_dir / name)
            drawn.setdefault(section, []).append(
                f"<figure><img src=\"{_e(name)}\" alt=\"{_e(caption)}\"><figcaption>{_e(caption)}</figcaption>"
                "</figure>")
        except InputError:
            raise
        except Exception as e:  # a picture must never lose the rest of the report
            log.warning("report: could not draw %s: %s", name, e)
            drawn.setdefault(section, []).append(f"<p class=\"note\">could not draw {_e(name)}: {_e(e)}</p>")

    body = [f"<h1>{_e(title)}</h1>",
            f"<p>CV folder <code>{_e(cv_dir)}</code>, dataset root <code>{_e(root.root)}</code> "
            f"({_e(root.layout)} layout), descriptor {_e(cv_json.get('descriptor', '?'))}, "
            f"protocol {_e(cv_json.get('protocol', 'v2.1'))}.</p>"]
    if cv_json.get("val_leak"):
        body.append("<p class=\"note\">Trained on this root's validation ground truth (allow_val_leak): "
                    "these figures are not a valid CV.</p>")
    body += ["<h2>Scores</h2>", f"<pre>{_e(cv_table(cv_json))}</pre>"]
    if cv_json.get("stages"):
        body.append(f"<pre>{_e(stages_table(cv_json['stages']))}</pre>")
    body += drawn.get("scores", [])
    sweep_md = cv_dir / "sweep.md"
    if sweep_md.is_file() or "sweep" in drawn:
        body.append("<h2>Post-processing sweep</h2>")
        if sweep_md.is_file():
            body.append(markdown_tables_html(sweep_md.read_text(encoding="utf-8")))
        body += drawn.get("sweep", [])
    body += ["<h2>Retrievals</h2>"] + drawn.get("retrievals", [])
    body.append("<h2>Queries</h2>")
    if scores is None:
        body.append(f"<p class=\"note\">no {_e('retrieval_solution_v2.1.csv')} in the root: per-query scores, "
                    "the worst queries and the similarity distributions need the ground truth.</p>")
    else:
        _write_per_query_csv(scores, out_dir / "per_query.csv")
        ind = [r for r in scores if r["in_domain"]]
        lines = []
        for s in ("public", "private"):
            aps = [r["ap"] for r in ind if r["subset"] == s]
            if aps:
                lines.append(f"{s.capitalize()}: {len(aps)} queries, mean AP@100 {sum(aps) / len(aps):.4f}, "
                             f"{sum(a == 0 for a in aps)} with AP 0")
        lines.append(f"{len(scores) - len(ind)} queries without retrieval ground truth (non-landmark or Ignored)")
        body.append("<ul>" + "".join(f"<li>{_e(x)}</li>" for x in lines) + "</ul>")
        body += drawn.get("queries", [])
        worst = worst_queries(scores, n_worst)
        body.append(f"<h3>The {len(worst)} in-domain queries with the lowest AP@100</h3>")
        body.append(_query_table(worst))
        body.append("<p>Every query: <a href=\"per_query.csv\">per_query.csv</a>.</p>")
    if data:
        body += ["<h2>The data</h2>"] + drawn.get("data", [])
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    path = out_dir / "report.html"
    with atomic_write(path, encoding="utf-8") as f:
        f.write(page)
    return path
