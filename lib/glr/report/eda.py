"""Exploratory figures of a GLDv2-format root: the class long tail, images per continent, samples.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from glr.data.geo import COUNTRY_FILE, load_landmark_continents
from glr.data.root import GLDv2Root
from glr.report.common import _PAD, _as_root, _new_figure, _note, _save_figure, _save_image, _tile

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


def landmark_counts(root: GLDv2Root | str | os.PathLike, subset: str = "full") -> list[tuple[int, int]]:
    """``(landmark_id, train images)`` of ``train.csv`` (``subset`` as
    :meth:`GLDv2Root.train_ids_labels`), most images first, ties by landmark id."""
    counts = Counter(lm for _, lm in _as_root(root).train_ids_labels(subset))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def draw_class_long_tail(root: GLDv2Root | str | os.PathLike, path: str | os.PathLike | None = None,
                         subset: str = "full") -> Figure:
    """Train images per landmark, landmarks sorted by count, log-scale y (GLDv2 paper, Fig. 1).

    Args:
        root: the GLDv2 root (or its folder).
        path: where to save the figure too (format from the suffix).
        subset: ``"full"`` (``train.csv``) or ``"clean"`` (``train_clean.csv``).

    Returns:
        The Figure.
    """
    counts = [n for _, n in landmark_counts(root, subset)]
    fig = _new_figure((7, 3.8))
    ax = fig.subplots()
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

    root = _as_root(root)
    continents = load_landmark_continents(root.root)
    if continents is None:
        return None
    counts = Counter(continents.get(lm) or "unknown" for _, lm in root.train_ids_labels(subset))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def draw_images_per_continent(root: GLDv2Root | str | os.PathLike, path: str | os.PathLike | None = None,
                              subset: str = "full") -> Figure:
    """Bar chart of :func:`images_per_continent`; a note instead of bars when the root has no
    ``train_label_to_country.csv``. Saved to ``path`` when given.

    Returns:
        The Figure.
    """
    counts = images_per_continent(root, subset)
    fig = _new_figure((7, 3.6))
    ax = fig.subplots()
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


def draw_landmark_samples(root: GLDv2Root | str | os.PathLike, path: str | os.PathLike | None = None,
                          n_landmarks: int = 6, per_landmark: int = 4, seed: int = 0, thumb: int = 96,
                          subset: str = "full") -> Image.Image:
    """A grid of train images: one row per landmark (chosen at random with ``seed``), its id
    and image count written on the left, then up to ``per_landmark`` random images of it.

    The picture is ``label + per_landmark·(thumb + 4) + 4`` pixels wide (label: 120 pixels)
    and ``rows·(thumb + 4) + 4`` high, rows = min(``n_landmarks``, landmarks in train).

    Returns:
        The picture (a PIL image), written to ``path`` too when given.
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
