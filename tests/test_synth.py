"""glr.data.synth: file set, ids, determinism and the dataset properties it must pose."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glr.data.synth import _plan, make_blueprints, make_synthetic_gldv2, render_image, sample_class_sizes

TINY = dict(seed=0, n_landmarks=20, scale=0.1, image_size=32, progress=False)
HEADERS = {
    "train.csv": ["id", "url", "landmark_id"],
    "train_clean.csv": ["landmark_id", "images"],
    "train_label_to_category.csv": ["landmark_id", "category"],
    "train_label_to_country.csv": ["landmark_id", "country"],
    "index.csv": ["id"],
    "index_image_to_landmark.csv": ["id", "landmark_id"],
    "index_label_to_category.csv": ["landmark_id", "category"],
    "test.csv": ["id"],
    "recognition_solution_v2.1.csv": ["id", "landmarks", "Usage"],
    "retrieval_solution_v2.1.csv": ["id", "images", "Usage"],
}
HEX16 = re.compile(r"^[0-9a-f]{16}$")


def rows(root: Path, name: str) -> list[dict[str, str]]:
    with open(root / name, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    return root, make_synthetic_gldv2(root, **TINY)


def test_files_and_headers(tiny):
    root, summary = tiny
    for name, header in HEADERS.items():
        with open(root / name, newline="") as f:
            assert next(csv.reader(f)) == header, name
    assert (root / "synth_summary.json").is_file()
    assert summary["images"]["train"] == len(rows(root, "train.csv"))


def test_ids_unique_hex_and_images_exist(tiny):
    root, _ = tiny
    seen: set[str] = set()
    for split, name in [("train", "train.csv"), ("index", "index.csv"), ("test", "test.csv")]:
        ids = [r["id"] for r in rows(root, name)]
        assert ids and len(ids) == len(set(ids)), split
        assert not seen & set(ids)  # no id reused across splits
        seen |= set(ids)
        for i in ids:
            assert HEX16.match(i), i
            with Image.open(root / split / i[0] / i[1] / i[2] / f"{i}.jpg") as im:
                assert im.size == (32, 32) and im.mode == "RGB" and im.format == "JPEG"
    index = {r["id"] for r in rows(root, "index.csv")}
    assert {r["id"] for r in rows(root, "index_image_to_landmark.csv")} == index
    test = [r["id"] for r in rows(root, "test.csv")]
    assert [r["id"] for r in rows(root, "recognition_solution_v2.1.csv")] == test
    assert [r["id"] for r in rows(root, "retrieval_solution_v2.1.csv")] == test


def test_rows_are_shuffled(tiny):
    root, _ = tiny
    labels = [int(r["landmark_id"]) for r in rows(root, "train.csv")]
    assert labels != sorted(labels)


def test_deterministic(tiny, tmp_path):
    root, _ = tiny
    again = tmp_path / "again"
    make_synthetic_gldv2(again, **TINY)
    for name in [*HEADERS, "synth_summary.json"]:
        assert (root / name).read_bytes() == (again / name).read_bytes(), name
    for split in ("train", "index", "test"):
        for p in sorted((root / split).rglob("*.jpg"))[:10]:
            assert p.read_bytes() == (again / p.relative_to(root)).read_bytes()
    other = tmp_path / "other"
    make_synthetic_gldv2(other, **dict(TINY, seed=1))
    assert (root / "train.csv").read_bytes() != (other / "train.csv").read_bytes()


def test_long_tail_class_sizes():
    for seed in range(5):
        s = sample_class_sizes(np.random.default_rng(seed), 120)
        assert s.min() >= 2 and s.max() <= 80
        assert 0.4 <= (s <= 10).mean() <= 0.7
        assert 15 <= s.mean() <= 30 and (s >= 40).sum() >= 5
    assert (sample_class_sizes(np.random.default_rng(0), 50, scale=0.1) >= 2).all()


def test_noisy_rows_not_in_train_clean(tiny):
    root, _ = tiny
    label = {r["id"]: r["landmark_id"] for r in rows(root, "train.csv")}
    clean = {i: r["landmark_id"] for r in rows(root, "train_clean.csv") for i in r["images"].split(" ")}
    assert all(label[i] == lm for i, lm in clean.items())
    assert all(len(r["images"].split(" ")) >= 2 for r in rows(root, "train_clean.csv"))
    plan = _plan(TINY["seed"], TINY["n_landmarks"], TINY["scale"])
    assert [p[0] for p in plan["train"]] == list(label)
    noisy = [i for i, u, content, ok in plan["train"] if not ok]
    assert noisy and all(content != u for i, u, content, ok in plan["train"] if not ok)
    assert not set(noisy) & set(clean)


def test_plan_noise_rate_and_index_overlap():
    plan = _plan(0, 120, 1.0)
    rate = np.mean([not ok for *_, ok in plan["train"]])
    assert 0.08 <= rate <= 0.16
    index_u = {u for _, u in plan["index"]}
    assert set(plan["shared"]) < index_u and set(plan["index_only"]) < index_u
    assert 0.3 <= len(plan["shared"]) / len(index_u) <= 0.7


def test_index_numbering_differs(tiny):
    root, _ = tiny
    tr = {r["category"]: r["landmark_id"] for r in rows(root, "train_label_to_category.csv")}
    ix = {r["category"]: r["landmark_id"] for r in rows(root, "index_label_to_category.csv")}
    both = set(tr) & set(ix)
    assert both and set(ix) - set(tr)  # shared landmarks and index-only ones
    assert all(tr[c] != ix[c] for c in both)
    used = {r["landmark_id"] for r in rows(root, "index_image_to_landmark.csv")}
    assert used == set(ix.values())


def test_ground_truth_consistent(tiny):
    root, summary = tiny
    plan = _plan(TINY["seed"], TINY["n_landmarks"], TINY["scale"])
    rec = {r["id"]: r for r in rows(root, "recognition_solution_v2.1.csv")}
    ret = {r["id"]: r for r in rows(root, "retrieval_solution_v2.1.csv")}
    train_cat = {r["landmark_id"]: r["category"] for r in rows(root, "train_label_to_category.csv")}
    index_cat = {r["landmark_id"]: r["category"] for r in rows(root, "index_label_to_category.csv")}
    index_lm = {r["id"]: r["landmark_id"] for r in rows(root, "index_image_to_landmark.csv")}
    for i, group, content, usage in plan["test"]:
        a, b = rec[i], ret[i]
        assert a["Usage"] == usage in ("Public", "Private")
        if group == "ood":
            assert a["landmarks"] == "" and (b["images"], b["Usage"]) == ("None", "Ignored")
            continue
        cat = f"http://commons.wikimedia.org/wiki/Category:Synthetic_Landmark_{content}"
        if group in ("shared", "train_only"):
            assert train_cat[a["landmarks"]] == cat
        else:
            assert a["landmarks"] == ""
        if group in ("shared", "index_only"):
            gt = b["images"].split(" ")
            assert b["Usage"] == usage and {index_cat[index_lm[g]] for g in gt} == {cat}
            assert sorted(gt) == sorted(g for g, lm in index_lm.items() if index_cat[lm] == cat)
        else:
            assert (b["images"], b["Usage"]) == ("None", "Ignored")
    for usage in ("Public", "Private"):
        q = summary["queries"][usage]
        assert q["recognition_with_gt"] >= 2 and q["retrieval_with_gt"] >= 2
    n = len(plan["test"])
    assert 0.5 <= summary["recognition_empty"] / n <= 0.7


def test_public_about_one_third():
    plan = _plan(3, 120, 1.0)
    public = np.mean([u == "Public" for *_, u in plan["test"]])
    assert abs(public - 1 / 3) < 0.04


def test_country_table(tiny):
    root, summary = tiny
    t = rows(root, "train_label_to_country.csv")
    assert len(t) == summary["train_classes"] and len({r["country"] for r in t}) >= 4
    assert all(len(r["country"]) == 2 and r["country"].isupper() for r in t)  # ISO 3166-1 alpha-2
    assert {r["landmark_id"] for r in t} == {r["landmark_id"] for r in rows(root, "train_label_to_category.csv")}


def test_intra_class_closer_than_inter_class():
    uids, views = range(10), 6
    bps = {u: make_blueprints(0, u) for u in uids}
    x = np.stack([
        np.asarray(render_image(0, "train", 100 * u + v, u, 32, bps).resize((16, 16), Image.Resampling.BOX),
                   np.float32).ravel()
        for u in uids for v in range(views)
    ])
    x -= x.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    lab = np.repeat(np.arange(len(uids)), views)
    same = lab[:, None] == lab[None, :]
    off = ~np.eye(len(lab), dtype=bool)
    assert sim[same & off].mean() > sim[~same].mean() + 0.1
