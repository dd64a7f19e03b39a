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
    rows.append((result.get("descriptor", "model"), result))
    lines = [f"{'descriptor':38s} {'mAP@100 pub':>11s} {'mAP@100 priv':>12s} {'GAP pub':>8s} {'GAP priv':>8s}",
             "-" * 81]
    for kind, r in rows:
        rec = r.get("recognition") or {}
        lines.append(f"{_NAMES.get(kind, kind):38s} {_fmt(_get(r.get('public'), 'map@100')):>11s} "
                     f"{_fmt(_get(r.get('private'), 'map@100')):>12s} {_fmt(_get(rec.get('public'), 'gap')):>8s} "
                     f"{_fmt(_get(rec.get('private'), 'gap')):>8s}")
    return "\n".join(lines)


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
