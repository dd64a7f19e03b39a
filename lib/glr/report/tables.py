"""Tables as text (markdown): CV results, stages, ablations.
"""

from __future__ import annotations

import logging
from typing import Any

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
        result: :func:`glr.workflows.cv.cv` output, optionally with a ``baselines`` entry
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
        rows: dicts with ``name``, ``train_set``, ``image_size`` and a :func:`glr.workflows.cv.cv`
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
    """Markdown tables of :func:`glr.workflows.experiment.ablate` (retrieval mAP@100, validation =
    Public, and Private)."""
    titles = {"2": "Table 2: re-ID tricks (cumulative)", "3": "Table 3: samplers"}
    out = []
    for t, rows in report["tables"].items():
        out += [f"### {titles.get(t, 'Table ' + t)}", "", "| setting | mAP@100 Public (val) | mAP@100 Private |",
                "|---|---|---|"]
        out += [f"| {r['name']} | {r['public']:.4f} | {r['private']:.4f} |" for r in rows]
        out.append("")
    return "\n".join(out).rstrip()
