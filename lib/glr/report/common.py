"""What the report's pieces share: the CV folder's files, the solution, image tiles, saving.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image, ImageDraw

from glr import metrics
from glr.data.root import GLDv2Root
from glr.submission import read_submission
from glr.utils import InputError, atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

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


def _save_image(img: Image.Image, path: str | os.PathLike | None) -> Image.Image:
    """``img``, written to ``path`` first when one is given (atomically; the format from its
    suffix, PNG when unknown)."""
    if path is not None:
        path = Path(path)
        fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
        with atomic_write(path, "wb") as f:
            img.save(f, format=fmt)
    return img


def _new_figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib Figure of its own: no pyplot, no global figure list, no backend chosen (it
    renders through Agg when saved, and inline in a notebook)."""
    from matplotlib.figure import Figure  # noqa: PLC0415

    return Figure(figsize=figsize)


def _save_figure(fig: Figure, path: str | os.PathLike | None, dpi: int = 110) -> Figure:
    """``fig``, written to ``path`` first when one is given (atomically; the format from its
    suffix, PNG by default)."""
    if path is not None:
        path = Path(path)
        fmt = path.suffix.lower().lstrip(".") or "png"
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format=fmt, dpi=dpi)
    return fig


def _tile(root: GLDv2Root, split: str, image_id: str, thumb: int) -> Image.Image:
    """The image resized to ``thumb``², or a light grey tile when it cannot be read."""
    try:
        with Image.open(root.path(split, image_id)) as im:
            return im.convert("RGB").resize((thumb, thumb))
    except (OSError, ValueError) as e:
        log.warning("cannot read %s image %r: %s", split, image_id, e)
        return Image.new("RGB", (thumb, thumb), (225, 225, 225))


def _draw_sheet(root: GLDv2Root, rows: Sequence[tuple[str, Sequence[str], Sequence[str] | None, str | None]],
                path: str | os.PathLike | None, top: int, thumb: int) -> Image.Image:
    """The retrieval sheet shared by :func:`draw_retrievals` and :func:`draw_retrieval_grid`.

    Each row is ``(query id, ranked index ids, ground truth or None, label or None)``: the
    query tile (blue frame, the label written across its bottom) then its first ``top``
    retrievals, framed green when in the ground truth, red when not, grey when the query has
    no ground truth. The sheet is ``(top + 1)·(thumb + 4) + 4`` by ``rows·(thumb + 4) + 4``
    pixels (one empty row's height when there is no row); written to ``path`` when given.
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


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def _subset_map(figures: dict | None, subset: str) -> float | None:
    s = (figures or {}).get(subset)
    v = s.get("map@100") if isinstance(s, dict) else None
    return None if v is None else float(v)
