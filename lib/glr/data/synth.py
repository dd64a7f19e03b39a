"""The embedded GLDv2-shaped dataset: procedurally drawn landmarks, written as a v2.1 root.

:func:`make_synthetic_gldv2` writes the official file set of ``GLDV2_SPEC.md`` §1.1
(``train.csv``, ``train_clean.csv``, ``train_label_to_category.csv``, ``index.csv``,
``index_image_to_landmark.csv``, ``index_label_to_category.csv``, ``test.csv``,
``recognition_solution_v2.1.csv``, ``retrieval_solution_v2.1.csv``), the non-official
``train_label_to_country.csv`` (``landmark_id,country``, ISO 3166-1 alpha-2 codes) and
``synth_summary.json``, with JPEGs at ``<split>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg`` (§2), and
the marker ``.glr-synth.json`` (its arguments, and whether it finished): a folder already
holding a GLDv2 root is only ever replaced when that marker says glr synth wrote it.

What it poses, at CPU size, of the GLDv2 paper's challenges:

* **Instance-level scenes.** Every landmark is a fixed random blueprint (body, towers,
  domes, spires, gables, colonnades, window grids, arches, bridges, pagoda tiers ...) in
  scene coordinates; every image is a fresh view of it: scale, translation, rotation,
  horizontal shear and squeeze, partial crops, lighting, occluders (people, trees, cars,
  signs), noise and blur. About a quarter of the landmarks also own an *interior*
  blueprint that some of their images show instead of the exterior.
* **Country style.** Ten countries on five continents each fix a palette (sky, ground,
  building material, accent, roof) and preferred building types, so landmarks of one
  country look alike in style and differ in layout.
* **Long tail.** Train class sizes follow a clipped Pareto law (about half the classes
  have at most 10 images, a few have 80).
* **Noisy labels.** About 12% of ``train.csv`` rows show another landmark or no landmark
  at all under the class's label; ``train_clean.csv`` lists only the clean images, and
  only for classes that keep at least two.
* **Index ≠ train.** The index holds some train landmarks plus landmarks never seen in
  train, under a separate landmark numbering drawn from the same integer range (the same
  number names different landmarks in the two numberings).
* **Out-of-domain queries.** Half of the test images are textures, landscapes without
  buildings, indoor clutter with people or close-ups; with the index-only landmarks
  about 60% of the recognition rows have an empty ``landmarks`` cell.

Everything is deterministic for a seed: the plan comes from one ``numpy`` Generator and
every image from its own Generator seeded with ``(seed, split, index)``; JPEG quality is
fixed, so the same arguments give the same bytes (with the same Pillow build).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from glr.utils import InputError, atomic_write, check_writable_dir, read_json_object

log = logging.getLogger(__name__)

__all__ = ["make_synthetic_gldv2", "sample_class_sizes", "contact_sheet", "COUNTRIES"]

JPEG_QUALITY = 90
CATEGORY_URL = "http://commons.wikimedia.org/wiki/Category:Synthetic_Landmark_{}"
URL = "https://synthetic.glr/{split}/{id}.jpg"

# Image counts at scale=1 (train is set by the class-size law, ~20 per class).
N_INDEX_PER_LANDMARK = (4, 18)  # uniform integer range, [lo, hi)
N_TEST = 400
NOISE_RATE = 0.12
INTERIOR_LANDMARKS = 0.25  # fraction of landmarks with an interior blueprint
INTERIOR_VIEWS = 0.35  # fraction of such a landmark's images that show the interior
SHARED_FRACTION = 0.2  # train landmarks that also have index images (x n_landmarks)
INDEX_ONLY_FRACTION = 0.2  # landmarks only in the index (x n_landmarks)
DISTRACTOR_FRACTION = 0.1  # landmarks seen only as label noise in train
# Test groups, as fractions of the test size: out-of-domain, train landmark with an
# index twin, train-only landmark, index-only landmark.
TEST_GROUPS = {"ood": 0.5, "shared": 0.2, "train_only": 0.2, "index_only": 0.1}
TEST_GROUP_MIN = {"ood": 6, "shared": 6, "train_only": 6, "index_only": 4}
_SPLIT_CODE = {"train": 1, "index": 2, "test": 3}

Color = tuple[int, int, int]


# --------------------------------------------------------------------------- countries
@dataclass(frozen=True)
class Country:
    """A visual style shared by all landmarks of one country."""

    name: str
    continent: str
    sky: tuple[Color, Color]  # top, horizon
    ground: Color
    materials: tuple[Color, ...]  # building materials, one picked per landmark
    accent: Color
    roof: Color
    window: Color
    roofs: dict[str, float]  # roof shape preference
    types: dict[str, float]  # building type preference


#: ISO 3166-1 alpha-2 code of each synthetic country (what ``train_label_to_country.csv`` holds).
ALPHA2 = {"France": "FR", "Italy": "IT", "Russia": "RU", "Japan": "JP", "India": "IN", "Egypt": "EG",
          "Morocco": "MA", "Mexico": "MX", "United States": "US", "Peru": "PE"}

COUNTRIES: tuple[Country, ...] = (
    Country("France", "Europe", ((105, 145, 200), (205, 215, 228)), (105, 118, 92), ((218, 204, 170), (200, 190, 175)),
            (85, 88, 110), (70, 80, 98), (45, 50, 70), {"spire": 3, "gable": 2, "flat": 1, "dome": 1},
            {"cathedral": 3, "palace": 3, "gate": 2, "bridge": 1, "tower": 1}),
    Country("Italy", "Europe", ((70, 135, 220), (195, 215, 238)), (168, 150, 104), ((205, 125, 85), (226, 200, 160)),
            (238, 232, 215), (172, 72, 50), (70, 45, 35), {"dome": 4, "gable": 2, "flat": 1},
            {"cathedral": 3, "tower": 2, "temple": 2, "bridge": 1, "palace": 1}),
    Country("Russia", "Europe", ((140, 155, 178), (212, 214, 220)), (222, 226, 232), ((188, 62, 58), (236, 226, 205)),
            (245, 245, 240), (46, 130, 80), (60, 40, 40), {"onion": 5, "spire": 2, "dome": 1},
            {"cathedral": 4, "palace": 2, "tower": 2}),
    Country("Japan", "Asia", ((125, 170, 215), (228, 226, 234)), (88, 118, 70), ((172, 42, 36), (120, 82, 58)),
            (242, 236, 222), (52, 52, 62), (235, 225, 200), {"pagoda": 5, "gable": 2},
            {"pagoda": 4, "gate": 2, "temple": 2, "tower": 1}),
    Country("India", "Asia", ((198, 172, 128), (236, 218, 184)), (158, 128, 88), ((236, 232, 226), (206, 128, 108)),
            (196, 80, 58), (236, 232, 226), (70, 50, 40), {"onion": 3, "dome": 3, "flat": 1},
            {"mosque": 4, "palace": 2, "gate": 2}),
    Country("Egypt", "Africa", ((88, 160, 230), (232, 226, 200)), (216, 186, 130), ((212, 178, 122), (196, 160, 110)),
            (120, 92, 62), (190, 150, 100), (60, 45, 30), {"flat": 3, "pyramid": 3},
            {"pyramid": 3, "temple": 3, "tower": 1, "mosque": 1}),
    Country("Morocco", "Africa", ((58, 128, 210), (200, 220, 236)), (186, 118, 80), ((214, 142, 92), (230, 215, 190)),
            (28, 128, 128), (40, 110, 80), (40, 40, 50), {"flat": 3, "dome": 2, "gable": 1},
            {"mosque": 3, "gate": 3, "palace": 2}),
    Country("Mexico", "North America", ((48, 118, 222), (172, 210, 245)), (120, 140, 72),
            ((232, 202, 64), (225, 225, 215)),
            (40, 120, 200), (200, 82, 62), (50, 40, 40), {"dome": 3, "flat": 2, "gable": 1},
            {"cathedral": 3, "pyramid": 2, "palace": 2}),
    Country("United States", "North America", ((98, 160, 230), (212, 226, 240)), (90, 130, 72),
            ((172, 176, 182), (222, 222, 225)), (60, 92, 125), (100, 100, 112), (110, 150, 190),
            {"flat": 4, "spire": 2, "dome": 1}, {"skyscraper": 4, "temple": 2, "bridge": 2, "tower": 1}),
    Country("Peru", "South America", ((38, 88, 190), (160, 190, 230)), (98, 110, 70),
            ((150, 136, 116), (200, 195, 180)),
            (182, 62, 42), (140, 92, 60), (40, 35, 30), {"gable": 3, "flat": 3},
            {"pyramid": 3, "cathedral": 2, "gate": 2}),
)


# --------------------------------------------------------------------------- blueprints
@dataclass
class Blueprint:
    """A scene in scene coordinates (x right, y down; the building spans about [0, 1]²).

    ``bg`` is the background: ``("sky", top, horizon)`` or ``("flat", colour, colour)``.
    ``polys`` are drawn in order (back to front) as ``(points (K, 2), fill, outline)``.
    ``bbox`` frames the building (x0, y0, x1, y1); partial views zoom into it.
    """

    bg: tuple[str, Color, Color]
    polys: list[tuple[np.ndarray, Color, Color | None]] = field(default_factory=list)
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    anchors: np.ndarray | None = None  # (A, 2) centres of building parts, for partial views


def _jit(rng: np.random.Generator, c: Color, s: float = 12.0) -> Color:
    return tuple(int(v) for v in np.clip(np.asarray(c) + rng.normal(0, s, 3), 0, 255))


def _shade(c: Color, f: float) -> Color:
    return tuple(int(min(255, max(0, v * f))) for v in c)


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.asarray([weights[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


class _Builder:
    """Collects polygons; all sizes in scene units."""

    def __init__(self) -> None:
        self.polys: list[tuple[np.ndarray, Color, Color | None]] = []
        self.box = [np.inf, np.inf, -np.inf, -np.inf]
        self.anchors: list[np.ndarray] = []

    def poly(self, pts, fill: Color, outline: Color | None = None, frame: bool = True) -> None:
        a = np.asarray(pts, np.float64)
        self.polys.append((a, fill, outline))
        if frame:
            self.anchors.append(a.mean(0))
            self.box = [min(self.box[0], a[:, 0].min()), min(self.box[1], a[:, 1].min()),
                        max(self.box[2], a[:, 0].max()), max(self.box[3], a[:, 1].max())]

    def rect(self, x0, y0, x1, y1, fill, outline=None, frame=True) -> None:
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], fill, outline, frame)

    def ellipse(self, cx, cy, rx, ry, fill, a0=0.0, a1=2 * math.pi, n=20, frame=True) -> None:
        t = np.linspace(a0, a1, n)
        pts = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)
        if a1 - a0 < 2 * math.pi - 1e-6:
            pts = np.vstack([pts, [[cx, cy]]])
        self.poly(pts, fill, None, frame)

    def arch(self, x0, x1, y_bottom, height, fill, frame=True) -> None:
        """An arched opening: a rectangle topped by a half circle."""
        r = (x1 - x0) / 2
        t = np.linspace(math.pi, 2 * math.pi, 12)
        top = y_bottom - max(height - r, 0.0)
        pts = [(x0, y_bottom)] + [(x0 + r + r * math.cos(a), top + r * math.sin(a)) for a in t] + [(x1, y_bottom)]
        self.poly(pts, fill, None, frame)

    def windows(self, rng, x0, x1, y0, y1, rows, cols, fill, arched=False) -> None:
        cw, rh = (x1 - x0) / cols, (y1 - y0) / rows
        fw, fh = rng.uniform(0.35, 0.6), rng.uniform(0.4, 0.65)
        for r in range(rows):
            for c in range(cols):
                cx, cy = x0 + (c + 0.5) * cw, y0 + (r + 0.5) * rh
                if arched:
                    self.arch(cx - fw * cw / 2, cx + fw * cw / 2, cy + fh * rh / 2, fh * rh, fill, frame=False)
                else:
                    self.rect(cx - fw * cw / 2, cy - fh * rh / 2, cx + fw * cw / 2, cy + fh * rh / 2, fill, frame=False)

    def roof(self, rng, kind, x0, x1, y, col, trim: Color) -> None:
        w, cx = x1 - x0, (x0 + x1) / 2
        if kind == "gable":
            self.poly([(x0 - 0.01, y), (x1 + 0.01, y), (cx, y - w * rng.uniform(0.2, 0.45))], col)
        elif kind == "spire":
            self.poly([(x0, y), (x1, y), (cx, y - w * rng.uniform(1.3, 2.6))], col)
        elif kind == "pyramid":
            self.poly([(x0, y), (x1, y), (cx, y - w * rng.uniform(0.45, 0.7))], col)
        elif kind == "dome":
            dh = w * rng.uniform(0.1, 0.3)
            self.rect(x0 + 0.08 * w, y - dh, x1 - 0.08 * w, y, trim)
            rx = w * 0.42
            ry = rx * rng.uniform(0.7, 1.15)
            self.ellipse(cx, y - dh, rx, ry, col, math.pi, 2 * math.pi)
            self.rect(cx - 0.05 * w, y - dh - ry - 0.12 * w, cx + 0.05 * w, y - dh - ry + 0.01, trim)
        elif kind == "onion":
            t = np.linspace(0, 1, 14)
            half = w * 0.5 * (1.1 * np.sin(np.pi * np.clip(t * 1.25, 0, 1)) ** 0.8) * (1 - t) ** 0.6 + 0.004
            h = w * rng.uniform(0.75, 1.05)
            right = np.stack([cx + half, y - t * h], 1)
            left = np.stack([cx - half[::-1], y - t[::-1] * h], 1)
            self.poly(np.vstack([right, left]), col)
            self.rect(cx - 0.01, y - h - 0.05, cx + 0.01, y - h, trim)
        elif kind == "pagoda":
            fl = w * 0.22
            self.poly([(x0 - fl, y + 0.01), (x1 + fl, y + 0.01), (x1 + fl * 0.4, y - w * 0.12),
                       (x0 - fl * 0.4, y - w * 0.12)], col)
        else:  # flat: cornice and merlons
            self.rect(x0 - 0.01, y - 0.015, x1 + 0.01, y + 0.005, trim)
            n = max(3, int(w / 0.035))
            if rng.random() < 0.6:
                for i in range(0, n, 2):
                    a = x0 + i * w / n
                    self.rect(a, y - 0.04, a + w / n, y - 0.014, trim)


def _extras_back(b: _Builder, rng, st: Country, gy: float) -> None:
    if rng.random() < 0.5:  # distant hills
        xs = np.linspace(-1.5, 2.5, 14)
        ys = gy - rng.uniform(0.03, 0.18) - 0.05 * np.sin(xs * rng.uniform(2, 6) + rng.uniform(0, 6))
        hill = _shade(st.ground, rng.uniform(0.75, 0.95))
        hill = tuple(int(0.55 * h + 0.45 * s) for h, s in zip(hill, st.sky[1]))
        b.poly(np.vstack([np.stack([xs, ys], 1), [[2.5, gy + 0.01], [-1.5, gy + 0.01]]]), hill, frame=False)


def _extras_front(b: _Builder, rng, st: Country, gy: float, x0: float, x1: float) -> None:
    for _ in range(rng.integers(0, 4)):  # trees beside the building
        tx = rng.choice([rng.uniform(-0.3, x0 - 0.02), rng.uniform(x1 + 0.02, 1.3)])
        th = rng.uniform(0.08, 0.2)
        b.rect(tx - 0.008, gy - th * 0.5, tx + 0.008, gy, (80, 60, 40), frame=False)
        b.ellipse(tx, gy - th * 0.7, th * rng.uniform(0.25, 0.45), th * 0.4,
                  _jit(rng, (60, 110, 55), 20), frame=False)
    if rng.random() < 0.35:  # low wall / fence in front
        b.rect(-1.0, gy - rng.uniform(0.02, 0.05), 2.0, gy + 0.01, _shade(_jit(rng, st.materials[0]), 0.8), frame=False)
    if rng.random() < 0.3:  # statue / obelisk on a plinth
        sx = rng.uniform(x0, x1)
        b.rect(sx - 0.025, gy - 0.04, sx + 0.025, gy + 0.02, (150, 150, 150), frame=False)
        b.poly([(sx - 0.012, gy - 0.04), (sx + 0.012, gy - 0.04), (sx, gy - rng.uniform(0.1, 0.2))],
               _jit(rng, (90, 90, 80)), frame=False)


class _Site(NamedTuple):
    """What drawing one building needs: the builder, the image's generator, the country, the
    ground line ``gy``, the building's centre ``cx`` and its colours (material, accent, roof,
    window, trim)."""

    b: _Builder
    rng: np.random.Generator
    st: Country
    gy: float
    cx: float
    mat: Color
    acc: Color
    roof: Color
    win: Color
    trim: Color

    def roof_kind(self) -> str:
        """A roof shape drawn from the country's preference."""
        return _pick(self.rng, self.st.roofs)


def _cathedral(s: _Site) -> tuple[float, float]:
    """A nave with a gable or the country's roof, a rose window, up to two towers."""
    b, rng, gy, cx, mat, acc, roof, win, trim = s.b, s.rng, s.gy, s.cx, s.mat, s.acc, s.roof, s.win, s.trim
    rpref = s.roof_kind
    w, h = rng.uniform(0.32, 0.55), rng.uniform(0.22, 0.38)
    x0, x1 = cx - w / 2, cx + w / 2
    b.rect(x0, gy - h, x1, gy, mat, trim)
    b.roof(rng, rng.choice(["gable", rpref()]), x0, x1, gy - h, roof, trim)
    b.windows(rng, x0 + 0.03, x1 - 0.03, gy - h + 0.03, gy - 0.1, rng.integers(1, 3), rng.integers(3, 7), win, True)
    b.arch(cx - w * 0.09, cx + w * 0.09, gy, h * 0.45, _shade(win, 0.7))
    if rng.random() < 0.6:
        b.ellipse(cx, gy - h * 0.7, w * 0.08, w * 0.08, acc)
    ntow = rng.choice([0, 1, 2, 2])
    tw, th = w * rng.uniform(0.18, 0.3), h + rng.uniform(0.1, 0.3)
    rk = rpref()
    sides = [x0 - tw * 0.5, x1 - tw * 0.5]
    if ntow == 1:
        sides = [rng.choice([x0 - tw * 0.5, cx - tw / 2, x1 - tw * 0.5])]
    for tx in sides[:ntow]:
        b.rect(tx, gy - th, tx + tw, gy, _shade(mat, 0.95), trim)
        b.windows(rng, tx, tx + tw, gy - th + 0.02, gy - h * 0.6, rng.integers(2, 5), 1, win, True)
        b.roof(rng, rk, tx, tx + tw, gy - th, roof, trim)
    return x0 - 0.1, x1 + 0.1


def _palace(s: _Site) -> tuple[float, float]:
    """A long block of window rows, a taller central pavilion, sometimes two wings."""
    b, rng, gy, cx, mat, roof, win, trim = s.b, s.rng, s.gy, s.cx, s.mat, s.roof, s.win, s.trim
    rpref = s.roof_kind
    w, h = rng.uniform(0.6, 0.9), rng.uniform(0.13, 0.24)
    x0, x1 = cx - w / 2, cx + w / 2
    b.rect(x0, gy - h, x1, gy, mat, trim)
    b.windows(rng, x0 + 0.01, x1 - 0.01, gy - h + 0.02, gy - 0.01, rng.integers(2, 5), rng.integers(7, 15), win,
              rng.random() < 0.4)
    b.roof(rng, "flat", x0, x1, gy - h, roof, trim)
    pw, ph = w * rng.uniform(0.15, 0.3), h * rng.uniform(1.15, 1.6)
    b.rect(cx - pw / 2, gy - ph, cx + pw / 2, gy, _shade(mat, 1.06), trim)
    b.windows(rng, cx - pw / 2, cx + pw / 2, gy - ph + 0.02, gy - 0.02, rng.integers(2, 4), rng.integers(2, 4),
              win, True)
    b.roof(rng, rpref(), cx - pw / 2, cx + pw / 2, gy - ph, roof, trim)
    if rng.random() < 0.5:
        for sx in (x0, x1 - pw * 0.6):
            b.rect(sx, gy - h * 1.2, sx + pw * 0.6, gy, _shade(mat, 0.95), trim)
            b.roof(rng, "gable", sx, sx + pw * 0.6, gy - h * 1.2, roof, trim)
    return x0, x1


def _temple(s: _Site) -> tuple[float, float]:
    """Steps, a colonnade before a dark cella, a pediment; sometimes a dome behind (a capitol)."""
    b, rng, gy, cx, mat, acc, roof, trim = s.b, s.rng, s.gy, s.cx, s.mat, s.acc, s.roof, s.trim
    rpref = s.roof_kind
    w, h = rng.uniform(0.4, 0.7), rng.uniform(0.16, 0.28)
    x0, x1 = cx - w / 2, cx + w / 2
    if rng.random() < 0.35:  # dome behind (capitol)
        b.rect(cx - w * 0.15, gy - h * 1.6, cx + w * 0.15, gy - h, _shade(mat, 0.9), trim)
        b.roof(rng, "dome", cx - w * 0.15, cx + w * 0.15, gy - h * 1.6, roof, trim)
    for i in range(3):  # steps
        b.rect(x0 - 0.03 + i * 0.01, gy - 0.012 * (i + 1), x1 + 0.03 - i * 0.01, gy - 0.012 * i,
               _shade(mat, 0.9 + 0.04 * i))
    top = gy - h
    b.rect(x0, top + 0.03, x1, gy - 0.036, _shade(mat, 0.55))  # dark cella behind columns
    n = rng.integers(4, 11)
    cw = w / (2 * n - 1)
    for i in range(n):
        b.rect(x0 + 2 * i * cw, top + 0.03, x0 + (2 * i + 1) * cw, gy - 0.036, mat, trim)
    b.rect(x0 - 0.01, top, x1 + 0.01, top + 0.03, acc if rng.random() < 0.5 else mat, trim)
    b.roof(rng, "gable" if rng.random() < 0.8 else rpref(), x0 - 0.01, x1 + 0.01, top, roof, trim)
    return x0 - 0.03, x1 + 0.03


def _tower(s: _Site) -> tuple[float, float]:
    """Stacked shrinking stages with cornices and a roof; sometimes a low building beside it."""
    b, rng, gy, cx, mat, acc, roof, win, trim = s.b, s.rng, s.gy, s.cx, s.mat, s.acc, s.roof, s.win, s.trim
    rpref = s.roof_kind
    w, h = rng.uniform(0.08, 0.16), rng.uniform(0.45, 0.68)
    stages = rng.integers(2, 5)
    y, x0, x1 = gy, cx - w / 2, cx + w / 2
    for s in range(stages):
        sh = h / stages
        b.rect(x0, y - sh, x1, y, _shade(mat, 1 - 0.05 * s), trim)
        b.windows(rng, x0, x1, y - sh + 0.01, y - 0.01, 1 + (sh > 0.15), rng.integers(1, 3), win,
                  rng.random() < 0.5)
        b.rect(x0 - 0.01, y - sh - 0.008, x1 + 0.01, y - sh + 0.004, acc)
        y -= sh
        shrink = w * rng.uniform(0.0, 0.12)
        x0, x1 = x0 + shrink, x1 - shrink
    b.roof(rng, rpref(), x0, x1, y, roof, trim)
    if rng.random() < 0.6:
        bw = rng.uniform(0.25, 0.45)
        bx = cx + rng.choice([-1, 1]) * (w / 2 + bw / 2)
        b.rect(bx - bw / 2, gy - h * 0.22, bx + bw / 2, gy, _shade(mat, 0.9), trim)
        b.windows(rng, bx - bw / 2, bx + bw / 2, gy - h * 0.2, gy - 0.01, 2, rng.integers(3, 7), win)
        b.roof(rng, "gable", bx - bw / 2, bx + bw / 2, gy - h * 0.22, roof, trim)
    return cx - 0.25, cx + 0.25


def _gate(s: _Site) -> tuple[float, float]:
    """A torii (Japan, mostly) or a block pierced by one or three arches."""
    b, rng, st, gy, cx, mat, acc, roof, trim = s.b, s.rng, s.st, s.gy, s.cx, s.mat, s.acc, s.roof, s.trim
    rpref = s.roof_kind
    w, h = rng.uniform(0.3, 0.55), rng.uniform(0.28, 0.45)
    x0, x1 = cx - w / 2, cx + w / 2
    if st.name == "Japan" and rng.random() < 0.7:  # torii
        pw = w * 0.07
        for px in (x0 + 0.1 * w, x1 - 0.1 * w - pw):
            b.rect(px, gy - h, px + pw, gy, mat)
        b.poly([(x0 - 0.05, gy - h - 0.02), (x1 + 0.05, gy - h - 0.02), (x1 + 0.03, gy - h + 0.02),
                (x0 - 0.03, gy - h + 0.02)], st.roof)
        b.rect(x0, gy - h * 0.8, x1, gy - h * 0.8 + 0.02, mat)
        return x0 - 0.05, x1 + 0.05
    b.rect(x0, gy - h, x1, gy, mat, trim)
    n = rng.choice([1, 3])
    ow = w * (0.35 if n == 1 else 0.2)
    for i in range(n):
        ocx = cx + (i - (n - 1) / 2) * w * 0.3
        hh = h * (0.65 if i == (n - 1) / 2 else 0.45)
        b.arch(ocx - ow / 2, ocx + ow / 2, gy, hh, _jit(rng, st.sky[1], 8))
    b.rect(x0, gy - h, x1, gy - h + 0.035, acc)
    if rng.random() < 0.6:
        b.roof(rng, rpref(), x0 + 0.03, x1 - 0.03, gy - h, roof, trim)
    return x0, x1


def _bridge(s: _Site) -> tuple[float, float]:
    """Water, a deck on piers, sometimes two towers (a suspension or tower bridge)."""
    b, rng, gy, mat, acc, roof, trim = s.b, s.rng, s.gy, s.mat, s.acc, s.roof, s.trim
    rpref = s.roof_kind
    water = _jit(rng, (60, 110, 150), 15)
    b.rect(-2.0, gy - 0.02, 3.0, gy + 0.3, water, frame=False)
    dy = gy - rng.uniform(0.12, 0.22)
    b.rect(-0.3, dy - 0.035, 1.3, dy, mat, trim)
    n = rng.integers(3, 7)
    span = 1.6 / n
    for i in range(n + 1):
        px = -0.3 + i * span
        b.rect(px - 0.02, dy, px + 0.02, gy + 0.02, _shade(mat, 0.9))
    if rng.random() < 0.6:  # suspension/tower bridge
        for px in (-0.3 + span * (n // 3 or 1), -0.3 + span * (n - (n // 3 or 1))):
            th = rng.uniform(0.25, 0.4)
            b.rect(px - 0.03, dy - th, px + 0.03, dy, acc)
            b.roof(rng, rpref(), px - 0.035, px + 0.035, dy - th, roof, trim)
    return 0.0, 1.0


def _pagoda(s: _Site) -> tuple[float, float]:
    """Shrinking tiers, each with its upturned roof, and a finial."""
    b, rng, st, gy, cx, mat, roof, trim = s.b, s.rng, s.st, s.gy, s.cx, s.mat, s.roof, s.trim
    tiers = rng.integers(3, 8)
    w = rng.uniform(0.18, 0.3)
    y = gy
    th = rng.uniform(0.06, 0.1)
    for t in range(tiers):
        ww = w * (1 - 0.08 * t)
        b.rect(cx - ww / 2, y - th, cx + ww / 2, y, mat, trim)
        b.rect(cx - ww / 4, y - th * 0.8, cx + ww / 4, y - th * 0.2, st.accent)
        b.roof(rng, "pagoda", cx - ww / 2, cx + ww / 2, y - th, roof, trim)
        y -= th + ww * 0.12
    b.rect(cx - 0.006, y - 0.12, cx + 0.006, y, trim)
    return cx - w, cx + w


def _mosque(s: _Site) -> tuple[float, float]:
    """A prayer hall under a dome or onion dome, arched windows, one to four minarets."""
    b, rng, gy, cx, mat, acc, roof, win, trim = s.b, s.rng, s.gy, s.cx, s.mat, s.acc, s.roof, s.win, s.trim
    w, h = rng.uniform(0.3, 0.5), rng.uniform(0.16, 0.26)
    x0, x1 = cx - w / 2, cx + w / 2
    b.rect(x0, gy - h, x1, gy, mat, trim)
    dw = w * rng.uniform(0.18, 0.3)
    b.roof(rng, rng.choice(["dome", "onion"]), cx - dw, cx + dw, gy - h, roof, trim)
    b.arch(cx - w * 0.12, cx + w * 0.12, gy, h * 0.8, _shade(mat, 0.6))
    b.windows(rng, x0, cx - w * 0.14, gy - h + 0.03, gy - 0.03, 2, 2, win, True)
    b.windows(rng, cx + w * 0.14, x1, gy - h + 0.03, gy - 0.03, 2, 2, win, True)
    nm = rng.choice([1, 2, 2, 4])
    mh = h + rng.uniform(0.2, 0.4)
    xs = [x0 - 0.05, x1 + 0.02][: min(nm, 2)] + ([x0 + 0.03, x1 - 0.06] if nm == 4 else [])
    for i, mx in enumerate(xs):
        hh = mh * (1 if i < 2 else 0.75)
        b.rect(mx, gy - hh, mx + 0.03, gy, _shade(mat, 0.95), trim)
        b.rect(mx - 0.006, gy - hh * 0.75, mx + 0.036, gy - hh * 0.75 + 0.01, acc)
        b.roof(rng, rng.choice(["spire", "onion"]), mx, mx + 0.03, gy - hh, roof, trim)
    return x0 - 0.05, x1 + 0.05


def _pyramid(s: _Site) -> tuple[float, float]:
    """A smooth pyramid (Egypt, mostly) with a shaded face, or a stepped one with a shrine on top."""
    b, rng, st, gy, cx, mat, acc, roof, trim = s.b, s.rng, s.st, s.gy, s.cx, s.mat, s.acc, s.roof, s.trim
    rpref = s.roof_kind
    w = rng.uniform(0.4, 0.75)
    if st.name == "Egypt" and rng.random() < 0.6:
        h = w * rng.uniform(0.5, 0.65)
        b.poly([(cx - w / 2, gy), (cx + w / 2, gy), (cx, gy - h)], mat, trim)
        b.poly([(cx, gy - h), (cx + w / 2, gy), (cx + w * 0.1, gy)], _shade(mat, 0.8))
        if rng.random() < 0.6:
            w2 = w * rng.uniform(0.4, 0.7)
            c2 = cx + rng.choice([-1, 1]) * w * 0.6
            b.poly([(c2 - w2 / 2, gy), (c2 + w2 / 2, gy), (c2, gy - w2 * 0.6)], _shade(mat, 0.92), trim)
        return cx - w, cx + w
    steps = rng.integers(4, 8)
    sh = rng.uniform(0.035, 0.06)
    for s in range(steps):
        ww = w * (1 - s / (steps + 1.5))
        b.rect(cx - ww / 2, gy - sh * (s + 1), cx + ww / 2, gy - sh * s, _shade(mat, 1 - 0.03 * (s % 2)), trim)
    top = gy - sh * steps
    b.poly([(cx - w * 0.06, gy), (cx + w * 0.06, gy), (cx + w * 0.04, top), (cx - w * 0.04, top)], acc)
    tw = w * 0.2
    b.rect(cx - tw / 2, gy - sh * steps - 0.07, cx + tw / 2, gy - sh * steps, _shade(mat, 0.85), trim)
    b.roof(rng, rpref(), cx - tw / 2, cx + tw / 2, gy - sh * steps - 0.07, roof, trim)
    return cx - w / 2, cx + w / 2


def _skyscrapers(s: _Site) -> tuple[float, float]:
    """Two to five window-gridded towers, the tallest with a spire or flat top (any other kind)."""
    b, rng, gy, mat, acc, roof = s.b, s.rng, s.gy, s.mat, s.acc, s.roof
    n = rng.integers(2, 6)
    xs = np.sort(rng.uniform(0.15, 0.85, n))
    tallest = int(rng.integers(n))
    for i, tx in enumerate(xs):
        tw = rng.uniform(0.07, 0.15)
        th = rng.uniform(0.25, 0.5) + (0.2 if i == tallest else 0)
        col = _jit(rng, mat, 10)
        b.rect(tx - tw / 2, gy - th, tx + tw / 2, gy, col, _shade(col, 0.8))
        b.windows(rng, tx - tw / 2, tx + tw / 2, gy - th + 0.01, gy - 0.01, int(th / 0.03), rng.integers(3, 6), acc)
        if i == tallest:
            b.roof(rng, rng.choice(["spire", "flat"]), tx - tw / 4, tx + tw / 4, gy - th, roof, col)
    return 0.1, 0.9


#: Building kind -> its drawer, each returning the building's x extent; any other kind is a cluster of
#: skyscrapers.
_BUILDINGS = {"cathedral": _cathedral, "palace": _palace, "temple": _temple, "tower": _tower, "gate": _gate,
              "bridge": _bridge, "pagoda": _pagoda, "mosque": _mosque, "pyramid": _pyramid}


def _building(b: _Builder, rng, kind: str, st: Country, gy: float, mat: Color, acc: Color,
              roof: Color) -> tuple[float, float]:
    """Draw one building of ``kind`` standing on ``gy``; returns its x extent."""
    site = _Site(b, rng, st, gy, rng.uniform(0.4, 0.6), mat, acc, roof, st.window, _shade(mat, 0.8))
    return _BUILDINGS.get(kind, _skyscrapers)(site)


def _exterior(rng: np.random.Generator, st: Country) -> tuple[Blueprint, Color]:
    gy = rng.uniform(0.74, 0.84)
    mat = _jit(rng, st.materials[int(rng.integers(len(st.materials)))], 14)
    acc, roof = _jit(rng, st.accent, 14), _jit(rng, st.roof, 14)
    b = _Builder()
    _extras_back(b, rng, st, gy)
    b.rect(-3.0, gy, 4.0, gy + 3.0, _jit(rng, st.ground, 8), frame=False)
    kind = _pick(rng, st.types)
    x0, x1 = _building(b, rng, kind, st, gy, mat, acc, roof)
    if rng.random() < 0.3 and kind not in ("bridge", "skyscraper"):  # a lower annex building
        aw, ah = rng.uniform(0.15, 0.3), rng.uniform(0.08, 0.16)
        ax = x1 - 0.02 if rng.random() < 0.5 else x0 - aw + 0.02
        annex = [(ax, gy - ah), (ax + aw, gy - ah), (ax + aw, gy), (ax, gy)]
        b.polys.insert(2, (np.asarray(annex, float), _shade(mat, 0.85), None))
    _extras_front(b, rng, st, gy, x0, x1)
    bx = b.box
    sky = ("sky", _jit(rng, st.sky[0], 6), _jit(rng, st.sky[1], 6))
    return Blueprint(sky, b.polys, (bx[0], bx[1], bx[2], bx[3]), np.asarray(b.anchors)), mat


def _interior(rng: np.random.Generator, st: Country, ext_mat: Color) -> Blueprint:
    wall = _shade(ext_mat, rng.uniform(0.55, 0.8))
    acc = _jit(rng, st.accent, 14)
    b = _Builder()
    floor_a, floor_b = _jit(rng, (200, 190, 170), 25), _jit(rng, st.accent, 20)
    gy = rng.uniform(0.7, 0.8)
    if rng.random() < 0.5:  # nave in perspective
        vx, vy = rng.uniform(0.4, 0.6), rng.uniform(0.35, 0.5)
        b.poly([(-0.5, 1.5), (1.5, 1.5), (vx + 0.12, vy + 0.2), (vx - 0.12, vy + 0.2)], floor_a, frame=False)
        for k in range(1, 6):  # floor bands
            t = k / 6
            y = vy + 0.2 + (1.5 - vy - 0.2) * t ** 2
            b.rect(-0.5, y, 1.5, y + 0.012 * (1 + 3 * t), floor_b, frame=False)
        b.poly([(-0.5, -0.5), (1.5, -0.5), (vx + 0.12, vy - 0.25), (vx - 0.12, vy - 0.25)], _shade(wall, 0.7),
               frame=False)
        b.rect(vx - 0.12, vy - 0.25, vx + 0.12, vy + 0.2, _shade(wall, 1.1))
        b.arch(vx - 0.06, vx + 0.06, vy + 0.1, 0.25, _jit(rng, (230, 210, 150), 20))
        n = rng.integers(3, 7)
        for side in (-1, 1):
            for k in range(n):
                t = (k + 1) / (n + 1)
                x = vx + side * (0.12 + (0.75 - 0.12) * (1 - t) ** 1.5)
                half = 0.01 + 0.04 * (1 - t) ** 1.5
                top = vy - 0.25 - 0.7 * (1 - t) ** 1.5
                bot = vy + 0.2 + 1.1 * (1 - t) ** 1.5
                b.rect(x - half, top, x + half, bot, _shade(wall, 1.15 - 0.2 * t), frame=False)
        bbox = (vx - 0.3, vy - 0.3, vx + 0.3, vy + 0.3)
    else:  # frontal arcade hall
        b.rect(-1.0, gy, 2.0, 2.0, floor_a, frame=False)
        for i in range(-20, 30):
            if i % 2:
                b.rect(i * 0.06, gy, i * 0.06 + 0.06, gy + 0.04, floor_b, frame=False)
        n = rng.integers(3, 8)
        aw = 0.9 / n
        ah = rng.uniform(0.35, 0.55)
        for i in range(n):
            x = 0.05 + i * aw
            glass = _jit(rng, [(200, 60, 60), (60, 90, 200), (230, 200, 80), (80, 160, 90)][int(rng.integers(4))], 25)
            b.arch(x + 0.15 * aw, x + 0.85 * aw, gy, ah, glass)
            b.rect(x - 0.012, gy - ah - 0.05, x + 0.012, gy, _shade(wall, 1.2))
        b.rect(-1.0, gy - ah - 0.09, 2.0, gy - ah - 0.05, acc, frame=False)
        for i in range(rng.integers(0, 4)):  # chandeliers
            cx = rng.uniform(0.1, 0.9)
            b.rect(cx - 0.002, -1.0, cx + 0.002, 0.1, (60, 50, 40), frame=False)
            b.ellipse(cx, 0.12, 0.04, 0.02, (240, 220, 140))
        if rng.random() < 0.6:  # altar / fountain
            b.rect(0.4, gy - 0.08, 0.6, gy + 0.03, _jit(rng, acc))
        bbox = (0.0, 0.1, 1.0, gy + 0.05)
    return Blueprint(("flat", wall, _shade(wall, 0.85)), b.polys, bbox, np.asarray(b.anchors))


def make_blueprints(seed: int, uid: int) -> tuple[Country, Blueprint, Blueprint | None]:
    """The country, exterior and (for ~25% of landmarks) interior of landmark ``uid``."""
    rng = np.random.default_rng([seed, 100, uid])
    st = COUNTRIES[int(rng.integers(len(COUNTRIES)))]
    ext, mat = _exterior(rng, st)
    inte = _interior(rng, st, mat) if rng.random() < INTERIOR_LANDMARKS else None
    return st, ext, inte


# --------------------------------------------------------------------------- rendering
def _background(S: int, bg: tuple[str, Color, Color], rng) -> Image.Image:
    top, bot = np.asarray(bg[1], np.float32), np.asarray(bg[2], np.float32)
    t = np.linspace(0, 1, S, dtype=np.float32)[:, None] ** rng.uniform(0.6, 1.5)
    col = top + (bot - top) * t  # (S, 3)
    arr = np.broadcast_to(col[:, None, :], (S, S, 3)).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _draw_scene(bp: Blueprint, S: int, rng: np.random.Generator) -> Image.Image:
    img = _background(S, bp.bg, rng)
    d = ImageDraw.Draw(img)
    if bp.bg[0] == "sky":  # clouds
        for _ in range(rng.poisson(1.5)):
            cx, cy, r = rng.uniform(0, S), rng.uniform(0, S * 0.4), rng.uniform(0.05, 0.15) * S
            c = int(rng.uniform(225, 250))
            d.ellipse([cx - r, cy - r * 0.4, cx + r, cy + r * 0.4], fill=(c, c, c))
    x0, y0, x1, y1 = bp.bbox
    if rng.random() < 0.2:  # partial view: zoom into a part of the building
        s = rng.uniform(1.7, 2.8)
        focus = bp.anchors[rng.integers(len(bp.anchors))] + rng.normal(0, 0.03, 2)
    else:
        s = math.exp(rng.uniform(math.log(0.75), math.log(1.35)))
        focus = np.array([(x0 + x1) / 2, (y0 + y1) / 2]) + rng.normal(0, 0.05, 2)
    ext = max(x1 - x0, y1 - y0, 0.3)
    rot = math.radians(float(np.clip(rng.normal(0, 3), -8, 8)))
    shear, squeeze = rng.uniform(-0.2, 0.2), math.exp(rng.uniform(-0.2, 0.2))
    R = np.array([[math.cos(rot), -math.sin(rot)], [math.sin(rot), math.cos(rot)]])
    M = R @ np.array([[squeeze, shear], [0.0, 1.0]]) * (s * 0.9 * S / ext)
    off = np.array([S / 2, S / 2]) + rng.normal(0, 0.05 * S, 2)
    lw = max(1, S // 96)
    for pts, fill, outline in bp.polys:
        p = (pts - focus) @ M.T + off
        xy = [tuple(q) for q in p.tolist()]
        d.polygon(xy, fill=fill, outline=outline, width=lw if outline else 1)
    return img


def _occluders(img: Image.Image, rng: np.random.Generator) -> None:
    S = img.size[0]
    d = ImageDraw.Draw(img)
    for _ in range(min(4, rng.poisson(0.8))):
        kind = rng.choice(["person", "person", "tree", "car", "sign"])
        h = rng.uniform(0.15, 0.45) * S
        x, y = rng.uniform(0, S), rng.uniform(0.75, 1.1) * S
        if kind == "person":
            cloth = tuple(int(v) for v in rng.integers(20, 235, 3))
            skin = tuple(int(v) for v in np.array([200, 160, 130]) * rng.uniform(0.5, 1.1))
            w = h * 0.3
            d.polygon([(x - w / 2, y - h * 0.8), (x + w / 2, y - h * 0.8), (x + w * 0.6, y), (x - w * 0.6, y)],
                      fill=cloth)
            d.ellipse([x - w * 0.3, y - h, x + w * 0.3, y - h * 0.8], fill=skin)
        elif kind == "tree":
            d.rectangle([x - h * 0.04, y - h * 0.6, x + h * 0.04, y], fill=(85, 62, 40))
            g = tuple(int(v) for v in np.array([50, 110, 45]) * rng.uniform(0.6, 1.2))
            d.ellipse([x - h * 0.35, y - h * 1.2, x + h * 0.35, y - h * 0.45], fill=g)
        elif kind == "car":
            c = tuple(int(v) for v in rng.integers(20, 235, 3))
            w = h * 1.4
            d.rectangle([x - w / 2, y - h * 0.4, x + w / 2, y - h * 0.1], fill=c)
            d.rectangle([x - w * 0.3, y - h * 0.65, x + w * 0.25, y - h * 0.38], fill=tuple(int(v * 0.7) for v in c))
            for wx in (x - w * 0.3, x + w * 0.3):
                d.ellipse([wx - h * 0.12, y - h * 0.22, wx + h * 0.12, y + h * 0.02], fill=(25, 25, 25))
        else:
            c = tuple(int(v) for v in rng.integers(0, 255, 3))
            y = rng.uniform(0.2, 0.9) * S
            d.rectangle([x - h * 0.3, y - h * 0.2, x + h * 0.3, y + h * 0.2], fill=c)


def _photometric(img: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.1) * size / 96))
    a = np.asarray(img, np.float32) / 255.0
    mean = a.mean()
    a = (a - mean) * rng.uniform(0.7, 1.3) + mean
    cast = rng.uniform(0.88, 1.12, 3).astype(np.float32)
    bright = rng.uniform(0.7, 1.25)
    if rng.random() < 0.1:  # dusk
        cast *= np.array([1.15, 0.9, 0.75], np.float32)
        bright *= 0.7
    a = np.clip(a * bright * cast, 0, 1) ** rng.uniform(0.75, 1.35)
    sigma = rng.uniform(0, 0.035)
    if sigma > 0.005:
        a = a + rng.normal(0, sigma, a.shape).astype(np.float32)
    return Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


OOD_KINDS = ("texture", "nature", "clutter", "closeup")


def _draw_ood(kind: str, S: int, rng: np.random.Generator) -> Image.Image:
    """An image with no landmark: texture, building-free landscape, indoor clutter or close-up."""
    c = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))  # noqa: E731
    if kind == "texture":
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
        mode = rng.integers(3)
        if mode == 0:  # stripes / waves
            th = rng.uniform(0, math.pi)
            f = rng.uniform(3, 20)
            v = 0.5 + 0.5 * np.sin(2 * math.pi * f * (xx * math.cos(th) + yy * math.sin(th)) + rng.uniform(0, 6))
        elif mode == 1:  # upsampled noise
            g = rng.integers(3, 12)
            small = Image.fromarray((rng.random((g, g)) * 255).astype(np.uint8))
            v = np.asarray(small.resize((S, S), Image.Resampling.BICUBIC), np.float32) / 255
        else:  # checker / tiles
            f = rng.integers(3, 14)
            v = ((np.floor(xx * f) + np.floor(yy * f)) % 2).astype(np.float32)
        c0, c1 = np.asarray(c(), np.float32), np.asarray(c(), np.float32)
        arr = c0 + (c1 - c0) * v[..., None]
        return Image.fromarray(arr.astype(np.uint8), "RGB")
    if kind == "nature":
        top = tuple(int(v) for v in np.array([90, 150, 220]) * rng.uniform(0.6, 1.1))
        img = _background(S, ("sky", top, (220, 225, 230)), rng)
        d = ImageDraw.Draw(img)
        hz = rng.uniform(0.35, 0.7) * S
        for k in range(rng.integers(1, 4)):  # mountain ranges
            xs = np.linspace(-10, S + 10, rng.integers(4, 12))
            ys = hz - rng.uniform(0.05, 0.4, len(xs)) * S / (k + 1)
            col = tuple(int(v) for v in np.array([100, 110, 120]) * rng.uniform(0.6, 1.3))
            d.polygon([(x, y) for x, y in zip(xs, ys)] + [(S + 10, hz), (-10, hz)], fill=col)
        ground = tuple(int(v) for v in np.array([80, 130, 60]) * rng.uniform(0.6, 1.4))
        d.rectangle([0, hz, S, S], fill=ground)
        if rng.random() < 0.5:
            d.ellipse([rng.uniform(-S, S * 0.5), hz + 5, rng.uniform(S * 0.5, 2 * S), hz + rng.uniform(10, S * 0.3)],
                      fill=(60, 110, 160))
        for _ in range(rng.integers(0, 12)):
            x, y, h = rng.uniform(0, S), rng.uniform(hz, S * 1.1), rng.uniform(0.1, 0.4) * S
            d.rectangle([x - h * 0.03, y - h * 0.5, x + h * 0.03, y], fill=(80, 60, 40))
            d.ellipse([x - h * 0.25, y - h, x + h * 0.25, y - h * 0.4],
                      fill=tuple(int(v) for v in np.array([50, 110, 45]) * rng.uniform(0.6, 1.3)))
        return img
    if kind == "clutter":
        img = Image.new("RGB", (S, S), c())
        d = ImageDraw.Draw(img)
        fy = rng.uniform(0.55, 0.8) * S
        d.rectangle([0, fy, S, S], fill=c())
        for _ in range(rng.integers(2, 7)):  # furniture, posters
            x, y = rng.uniform(0, S), rng.uniform(0.2, 0.9) * S
            w, h = rng.uniform(0.1, 0.4) * S, rng.uniform(0.1, 0.35) * S
            d.rectangle([x - w / 2, y - h / 2, x + w / 2, y + h / 2], fill=c())
        _occluders(img, rng)
        for _ in range(rng.integers(1, 5)):  # people, larger
            x, h = rng.uniform(0, S), rng.uniform(0.4, 0.9) * S
            w = h * 0.35
            d.polygon([(x - w / 2, S - h * 0.75), (x + w / 2, S - h * 0.75), (x + w * 0.6, S), (x - w * 0.6, S)],
                      fill=c())
            skin = tuple(int(v) for v in np.array([200, 160, 130]) * rng.uniform(0.5, 1.1))
            d.ellipse([x - w * 0.3, S - h, x + w * 0.3, S - h * 0.73], fill=skin)
        return img
    img = Image.new("RGB", (S, S), c())  # close-up: objects on a table
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(2, 8)):
        x, y, r = rng.uniform(0, S), rng.uniform(0, S), rng.uniform(0.08, 0.3) * S
        d.ellipse([x - r, y - r * rng.uniform(0.5, 1), x + r, y + r * rng.uniform(0.5, 1)], fill=c())
    return img


def render_image(seed: int, split: str, index: int, content: int | str, size: int,
                 blueprints: dict[int, tuple[Country, Blueprint, Blueprint | None]]) -> Image.Image:
    """One view: ``content`` is a landmark uid (int) or an out-of-domain kind (str)."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    S = 2 * size
    if isinstance(content, str):
        img = _draw_ood(content, S, rng)
    else:
        _, ext, inte = blueprints[content]
        bp = inte if inte is not None and rng.random() < INTERIOR_VIEWS else ext
        img = _draw_scene(bp, S, rng)
        _occluders(img, rng)
    return _photometric(img, rng, size)


# --------------------------------------------------------------------------- plan
def sample_class_sizes(rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
    """Train images per class (noisy rows included): ``floor(4 · U^(-1/0.75))`` clipped to [2, 80].

    A Pareto law (x_m = 4, α = 0.75): at scale 1 about 53% of the classes have at most 10
    images, ~10% sit at the cap and the mean is ~21. ``scale`` multiplies the sizes (never below 2).
    """
    s = np.clip(np.floor(4.0 * rng.random(n) ** (-1 / 0.75)), 2, 80)
    return np.maximum(2, np.round(s * scale)).astype(int)


def _new_id(rng: np.random.Generator, used: set[str]) -> str:
    while True:
        i = rng.bytes(8).hex()
        if i not in used:
            used.add(i)
            return i


def _usage(rng: np.random.Generator, n: int) -> list[str]:
    """Public for ~1/3 of ``n`` rows in random order (at least one of each when n ≥ 2)."""
    n_pub = int(round(n / 3))
    if n >= 2:
        n_pub = min(max(n_pub, 1), n - 1)
    u = np.array(["Private"] * n, dtype=object)
    u[rng.permutation(n)[:n_pub]] = "Public"
    return list(u)


def _plan(seed: int, n_landmarks: int, scale: float) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 0])
    n_tr = n_landmarks
    n_sh = max(3, int(round(SHARED_FRACTION * n_tr)))
    n_io = max(3, int(round(INDEX_ONLY_FRACTION * n_tr)))
    n_dis = max(2, int(round(DISTRACTOR_FRACTION * n_tr)))
    train_u = list(range(n_tr))
    io_u = list(range(n_tr, n_tr + n_io))
    dis_u = list(range(n_tr + n_io, n_tr + n_io + n_dis))
    shared_u = sorted(rng.choice(n_tr, min(n_sh, n_tr), replace=False).tolist())
    index_u = shared_u + io_u
    # Two numberings drawn from one integer range: the same number names different landmarks.
    hi = 10 * (n_tr + n_io)
    train_lid = dict(zip(train_u, rng.choice(hi, n_tr, replace=False).tolist()))
    index_lid = dict(zip(index_u, rng.choice(hi, len(index_u), replace=False).tolist()))
    for u in shared_u:  # a shared landmark never keeps its train number
        if index_lid[u] == train_lid[u]:
            taken = set(index_lid.values())
            index_lid[u] = next(v for v in range(hi, 2 * hi) if v not in taken)
    used: set[str] = set()
    # train: (id, label uid, content, clean)
    sizes = sample_class_sizes(rng, n_tr, scale)
    train = []
    for u, n in zip(train_u, sizes):
        for _ in range(n):
            if rng.random() < NOISE_RATE:
                r = rng.random()
                if r < 0.45 and n_tr > 1:
                    other = int(rng.integers(n_tr - 1))
                    content: int | str = other + (other >= u)
                elif r < 0.6:
                    content = int(rng.choice(dis_u))
                else:
                    content = str(rng.choice(OOD_KINDS))
                train.append((_new_id(rng, used), u, content, False))
            else:
                train.append((_new_id(rng, used), u, u, True))
    train = [train[i] for i in rng.permutation(len(train))]
    index = []
    for u in index_u:
        m = max(2, int(round(rng.integers(*N_INDEX_PER_LANDMARK) * scale)))
        index += [(_new_id(rng, used), u) for _ in range(m)]
    index = [index[i] for i in rng.permutation(len(index))]
    n_test = max(int(round(N_TEST * scale)), 1)
    train_only = [u for u in train_u if u not in set(shared_u)] or train_u
    io_queried = io_u[: max(1, (len(io_u) + 1) // 2)]  # the other index-only ones are pure distractors
    # a quarter of the shared landmarks get no query: their labelled index images are what the
    # "all" training set can add without touching the validation ground truth
    shared_queried = shared_u[: len(shared_u) - max(1, len(shared_u) // 4)] or shared_u
    pools = {"shared": shared_queried, "train_only": train_only, "index_only": io_queried}
    test = []  # (id, group, content, usage)
    for g, frac in TEST_GROUPS.items():
        k = max(TEST_GROUP_MIN[g], int(round(frac * n_test)))
        usage = _usage(rng, k)
        for j in range(k):
            content = str(rng.choice(OOD_KINDS)) if g == "ood" else int(rng.choice(pools[g]))
            test.append((_new_id(rng, used), g, content, usage[j]))
    test = [test[i] for i in rng.permutation(len(test))]
    return dict(train=train, index=index, test=test, train_lid=train_lid, index_lid=index_lid,
                shared=shared_u, index_only=io_u, distractors=dis_u)


# --------------------------------------------------------------------------- writing
def _write_csv(path: Path, header: list[str], rows) -> None:
    with atomic_write(path, newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _render_all(out: Path, plan: dict[str, Any], seed: int, image_size: int,
                blueprints: dict[int, tuple[Country, Blueprint, Blueprint | None]], progress: bool) -> None:
    """Every image of the plan as ``out/<split>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``."""
    from tqdm import tqdm

    jobs = [("train", i, r[0], r[2]) for i, r in enumerate(plan["train"])]
    jobs += [("index", i, iid, u) for i, (iid, u) in enumerate(plan["index"])]
    jobs += [("test", i, r[0], r[2]) for i, r in enumerate(plan["test"])]
    made: set[Path] = set()
    for split, i, iid, content in tqdm(jobs, desc="synth", disable=not progress, mininterval=0.5):
        d = out / split / iid[0] / iid[1] / iid[2]
        if d not in made:
            d.mkdir(parents=True, exist_ok=True)
            made.add(d)
        render_image(seed, split, i, content, image_size, blueprints).save(d / f"{iid}.jpg", "JPEG",
                                                                            quality=JPEG_QUALITY)


def _write_train_tables(out: Path, plan: dict[str, Any],
                        blueprints: dict[int, tuple[Country, Blueprint, Blueprint | None]]) -> dict[int, list[str]]:
    """``train.csv``, ``train_clean.csv`` and the train label tables; returns the clean
    classes (train landmark id -> its clean image ids, classes of at least two)."""
    tl = plan["train_lid"]
    _write_csv(out / "train.csv", ["id", "url", "landmark_id"],
               [(i, URL.format(split="train", id=i), tl[u]) for i, u, _, _ in plan["train"]])
    clean: dict[int, list[str]] = {}
    for i, u, _, ok in plan["train"]:
        if ok:
            clean.setdefault(tl[u], []).append(i)
    clean = {k: v for k, v in clean.items() if len(v) >= 2}
    _write_csv(out / "train_clean.csv", ["landmark_id", "images"], [(k, " ".join(clean[k])) for k in sorted(clean)])
    by_tl = sorted((tl[u], u) for u in tl)
    _write_csv(out / "train_label_to_category.csv", ["landmark_id", "category"],
               [(k, CATEGORY_URL.format(u)) for k, u in by_tl])
    _write_csv(out / "train_label_to_country.csv", ["landmark_id", "country"],
               [(k, ALPHA2[blueprints[u][0].name]) for k, u in by_tl])
    return clean


def _write_index_test_tables(out: Path, plan: dict[str, Any]) -> tuple[list[tuple], list[tuple]]:
    """``index.csv``, the index label tables, ``test.csv`` and both solution files; returns
    the recognition and retrieval solution rows ``(id, landmarks or images, Usage)``."""
    tl, il = plan["train_lid"], plan["index_lid"]
    _write_csv(out / "index.csv", ["id"], [(i,) for i, _ in plan["index"]])
    _write_csv(out / "index_image_to_landmark.csv", ["id", "landmark_id"], [(i, il[u]) for i, u in plan["index"]])
    _write_csv(out / "index_label_to_category.csv", ["landmark_id", "category"],
               [(k, CATEGORY_URL.format(u)) for k, u in sorted((il[u], u) for u in il)])
    index_of: dict[int, list[str]] = {}
    for i, u in plan["index"]:
        index_of.setdefault(u, []).append(i)
    rec, ret = [], []
    for i, g, content, usage in plan["test"]:
        lm = content if isinstance(content, int) else None
        rec.append((i, str(tl[lm]) if lm in tl else "", usage))
        ret.append((i, " ".join(index_of[lm]), usage) if lm in index_of else (i, "None", "Ignored"))
    _write_csv(out / "test.csv", ["id"], [(i,) for i, *_ in plan["test"]])
    _write_csv(out / "recognition_solution_v2.1.csv", ["id", "landmarks", "Usage"], rec)
    _write_csv(out / "retrieval_solution_v2.1.csv", ["id", "images", "Usage"], ret)
    return rec, ret


def _summary(plan: dict[str, Any], blueprints: dict[int, tuple[Country, Blueprint, Blueprint | None]],
             clean: dict[int, list[str]], rec: list[tuple], ret: list[tuple]) -> dict[str, Any]:
    """The counts of ``synth_summary.json`` (arguments excluded)."""
    tl = plan["train_lid"]
    groups: dict[str, int] = {}
    for _, g, _, _ in plan["test"]:
        groups[g] = groups.get(g, 0) + 1
    return {
        "images": {s: len(plan[s]) for s in ("train", "index", "test")},
        "train_noisy": sum(not ok for *_, ok in plan["train"]),
        "train_clean_images": sum(len(v) for v in clean.values()),
        "train_classes": len(tl), "train_clean_classes": len(clean),
        "index_landmarks": len(plan["index_lid"]), "index_landmarks_in_train": len(plan["shared"]),
        "countries": len({blueprints[u][0].name for u in tl}),
        "continents": len({blueprints[u][0].continent for u in tl}),
        "interior_landmarks": sum(blueprints[u][2] is not None for u in blueprints),
        "test_groups": groups,
        "recognition_empty": sum(not r[1] for r in rec),
        "queries": {
            usage: {"recognition_with_gt": sum(bool(r[1]) and r[2] == usage for r in rec),
                    "retrieval_with_gt": sum(r[2] == usage for r in ret)}
            for usage in ("Public", "Private")
        },
    }


#: The marker of a root written by :func:`make_synthetic_gldv2`: the only kind of root it replaces.
MARKER = ".glr-synth.json"
MARKER_FORMAT = "glr-synth-v1"
#: The tables it writes (the official v2.1 names, plus the country table).
TABLES = ("train.csv", "train_clean.csv", "train_label_to_category.csv", "train_label_to_country.csv", "index.csv",
          "index_image_to_landmark.csv", "index_label_to_category.csv", "test.csv", "recognition_solution_v2.1.csv",
          "retrieval_solution_v2.1.csv")
_ROOT_FILES = TABLES + ("sample_submission.csv", "synth_summary.json")  # any of them: a GLDv2 root is here
_SPLITS = ("train", "index", "test")


def _root_contents(out: Path) -> list[str]:
    """The GLDv2 tables and non-empty image folders in ``out`` (official and Kaggle layouts)."""
    found = [n for n in _ROOT_FILES if os.path.lexists(out / n)]
    return found + [f"{s}/" for s in _SPLITS if (out / s).is_dir() and any((out / s).iterdir())]


def _check_out(out: Path, overwrite: bool) -> dict[str, Any] | None:
    """Refuse ``out`` before anything is written: not writable, or holding a GLDv2 root that
    glr synth did not write (no marker), or one it did finish without ``overwrite``.
    Returns the marker of the root to replace (None: nothing to replace)."""
    check_writable_dir(out, "the root folder")
    held = _root_contents(out) if out.is_dir() else []
    if not held:
        return None
    shown = ", ".join(held[:4]) + (", …" if len(held) > 4 else "")
    if not (out / MARKER).is_file():
        raise InputError(f"already holds a GLDv2 root ({shown}) that glr synth did not write (no {MARKER}); "
                         "refusing to touch it: choose a new or empty folder", out)
    marker = read_json_object(out / MARKER, "glr synth marker")
    if marker.get("format") != MARKER_FORMAT:
        raise InputError(f"not a {MARKER_FORMAT} marker (format {marker.get('format')!r}); refusing to touch the "
                         f"root ({shown})", out / MARKER)
    if marker.get("complete") is not False and not overwrite:  # an unfinished one is ours to finish
        raise InputError(f"already holds a root written by glr synth ({shown}); pass --overwrite to replace it", out)
    return marker


def _write_marker(out: Path, args: dict[str, Any], complete: bool, images: dict[str, int] | None = None) -> None:
    marker = {"format": MARKER_FORMAT, "complete": complete, "args": args,
              "tables": list(TABLES) + ["synth_summary.json"], "images": images}
    with atomic_write(out / MARKER) as f:
        json.dump(marker, f, indent=2)


def make_synthetic_gldv2(out: str | os.PathLike, seed: int = 0, n_landmarks: int = 120, image_size: int = 96,
                         scale: float = 1.0, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write a GLDv2 v2.1-shaped root of procedurally drawn landmarks to ``out``.

    Args:
        out: root folder (created; other files in it are left alone). A folder already
            holding a GLDv2 root (any of its tables, or images) is refused unless it holds
            :data:`MARKER` (glr synth wrote it) and ``overwrite`` is set (or that root is
            unfinished); its tables and image folders are then removed and rewritten. CSVs
            are written after the images, so ``train.csv`` existing means the root is complete.
        seed: everything (plan, ids, every pixel) is a function of the arguments.
        n_landmarks: train classes. The index adds ``0.2·n`` train landmarks and ``0.2·n``
            index-only ones; ``0.1·n`` more appear only as label noise.
        image_size: side of the square RGB JPEGs (drawn at twice the size, then reduced).
        scale: multiplies the image counts (~2500 train, ~500 index, ~400 test at 1.0).
        progress: show a tqdm bar.
        overwrite: replace a finished root that glr synth wrote.

    Returns:
        The summary also written to ``out/synth_summary.json``: counts per split, class
        counts, noise and test-group counts, Public/Private query counts.

    Raises:
        InputError: ``out`` cannot be written, or holds a root it may not replace (above);
            nothing is written then.
    """
    out = Path(out)
    replacing = _check_out(out, overwrite)
    plan = _plan(seed, n_landmarks, scale)
    args = {"seed": seed, "n_landmarks": n_landmarks, "image_size": image_size, "scale": scale}
    out.mkdir(parents=True, exist_ok=True)
    _write_marker(out, args, complete=False)  # first: a root killed from here on is unfinished, and ours
    if replacing is not None:  # train.csv first: its presence means a complete root
        log.info("replacing the glr synth root at %s (written with %s)", out, replacing.get("args"))
        for name in (*TABLES, "synth_summary.json"):
            (out / name).unlink(missing_ok=True)
        for split in _SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
    needed = set(range(n_landmarks)) | set(plan["index_only"]) | set(plan["distractors"])
    blueprints = {u: make_blueprints(seed, u) for u in sorted(needed)}
    _render_all(out, plan, seed, image_size, blueprints, progress)
    clean = _write_train_tables(out, plan, blueprints)
    rec, ret = _write_index_test_tables(out, plan)
    summary = {"seed": seed, "n_landmarks": n_landmarks, "image_size": image_size, "scale": scale,
               **_summary(plan, blueprints, clean, rec, ret)}
    with atomic_write(out / "synth_summary.json") as f:
        json.dump(summary, f, indent=2)
    _write_marker(out, args, complete=True, images=summary["images"])
    log.info("synthetic GLDv2 root at %s: %s", out, summary["images"])
    return summary


def contact_sheet(path: str | os.PathLike, seed: int = 0, n_landmarks: int = 6, n_views: int = 8,
                  n_ood: int = 8, image_size: int = 96, first: int = 0) -> None:
    """A PNG grid: one row per landmark (``n_views`` views), plus a row of out-of-domain images."""
    rows: list[list[Image.Image]] = []
    uids = range(first, first + n_landmarks)
    bps = {u: make_blueprints(seed, u) for u in uids}
    for u in uids:
        rows.append([render_image(seed, "train", u * 1000 + v, u, image_size, bps) for v in range(n_views)])
    rows.append([render_image(seed, "test", 90000 + k, OOD_KINDS[k % len(OOD_KINDS)], image_size, bps)
                 for k in range(n_ood)])
    cols = max(len(r) for r in rows)
    sheet = Image.new("RGB", (cols * (image_size + 2), len(rows) * (image_size + 2)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im, (c * (image_size + 2), r * (image_size + 2)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
