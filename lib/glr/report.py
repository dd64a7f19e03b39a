"""What people would rather look at: the CV score table and a retrieval picture."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from glr import metrics
from glr.data import GLDv2Root
from glr.submission import read_submission

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
    preds = {q: cell.split(" ") if cell else [] for q, cell in read_submission(Path(cv_dir) / "submission.csv",
                                                                               "retrieval")}
    queries = [q for q in preds if q in gt][:n_queries]
    pad = 4
    sheet = Image.new("RGB", ((top + 1) * (thumb + pad) + pad, max(1, len(queries)) * (thumb + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r, q in enumerate(queries):
        y = pad + r * (thumb + pad)
        cells = [("test", q, None)] + [("index", i, i in gt[q]) for i in preds[q][:top]]
        for c, (split, image_id, ok) in enumerate(cells):
            x = pad + c * (thumb + pad)
            with Image.open(root.path(split, image_id)) as im:
                sheet.paste(im.convert("RGB").resize((thumb, thumb)), (x, y))
            colour = "blue" if ok is None else ("green" if ok else "red")
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], outline=colour, width=3)
    sheet.save(path)
    return Path(path)
