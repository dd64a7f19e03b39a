"""The CV report: per-query scores, retrieval grids, score pictures, EDA pictures, report.html."""

import csv
import json
import os
import shutil
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from glr import metrics, report
from glr.data.root import GLDv2Root
from glr.embeddings.npz import load_embeddings
from glr.workflows.cv import cv
from glr.data.synth import make_synthetic_gldv2
from glr.utils import InputError

GREEN, RED, GREY, BLUE = (0, 128, 0), (255, 0, 0), (128, 128, 128), (0, 0, 255)
PAD = 4
TINY_SWEEP = {"expansion": [{"form": "joint", "k": [2, 3], "alpha": 1.0, "qe": True, "dba": True}]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny synthetic root, a plain thumbnail CV on it and one with a small sweep."""
    base = tmp_path_factory.mktemp("report")
    make_synthetic_gldv2(base / "root", seed=0, n_landmarks=12, scale=0.12, image_size=32, progress=False)
    kw = dict(kind="thumbnail", recognition=False, progress=False, num_workers=0)
    cv(base / "root", base / "cv", **kw)
    cv(base / "root", base / "cv_sweep", sweep=TINY_SWEEP, **kw)
    root = GLDv2Root.open(base / "root")
    return {"base": base, "root": root, "cv": base / "cv", "cv_sweep": base / "cv_sweep",
            "scores": report.per_query_scores(root, base / "cv")}


@pytest.fixture(scope="module")
def bare_root(run):
    """The same images and id lists, but no solution files and no country file."""
    src, dst = run["root"].root, run["base"] / "bare"
    dst.mkdir()
    for name in ("train", "index", "test"):
        os.symlink(src / name, dst / name)
    for name in ("train.csv", "index.csv", "test.csv"):
        shutil.copyfile(src / name, dst / name)
    return GLDv2Root.open(dst)


def rgb(picture):
    """The pixels of a returned PIL picture or of a picture file."""
    if isinstance(picture, Image.Image):
        return np.asarray(picture.convert("RGB"))
    with Image.open(picture) as im:
        return np.asarray(im.convert("RGB"))


def saved(fig, path):
    """A draw_* function returned its Figure and wrote it to ``path``."""
    return isinstance(fig, Figure) and path.is_file()


def frame_colour(a, row, col, thumb):
    """The colour of the frame of tile (row, col) of a retrieval sheet (its top-left pixel)."""
    return tuple(int(v) for v in a[PAD + row * (thumb + PAD) + 1, PAD + col * (thumb + PAD) + 1])


def submission(cv_dir):
    with open(cv_dir / "submission.csv", newline="") as f:
        return {r["id"]: r["images"].split(" ") if r["images"] else [] for r in csv.DictReader(f)}


def hand_ap(ranked, gt):
    """AP@100 written out: precision at each new hit in the first 100, over min(|gt|, 100)."""
    hits, seen, total = 0, set(), 0.0
    for i, x in enumerate(ranked[:100]):
        if x in gt and x not in seen:
            hits += 1
            total += hits / (i + 1)
        seen.add(x)
    return total / min(len(gt), 100)


# --------------------------------------------------------------------------- per-query scores
def test_per_query_ap_means_are_the_cv_map(run):
    cv_json = json.loads((run["cv"] / "cv.json").read_text())
    scores = run["scores"]
    public, private, ignored = metrics.read_solution(run["root"].solution_path("retrieval"), "retrieval")
    assert public and private and ignored
    for name, sol in (("public", public), ("private", private)):
        rows = [r for r in scores if r["subset"] == name]
        assert sorted(r["id"] for r in rows) == sorted(sol)
        assert all(r["in_domain"] and r["n_gt"] == len(sol[r["id"]]) for r in rows)
        aps = [r["ap"] for r in rows]
        assert abs(sum(aps) / len(aps) - cv_json[name]["map@100"]) < 1e-12
        assert len(aps) == cv_json[name]["n_queries"]
        assert len(set(aps)) > 1  # not a degenerate run: the comparison can fail
    preds = submission(run["cv"])
    for r in scores:
        if r["in_domain"]:
            gt = public.get(r["id"]) or private[r["id"]]
            assert r["ap"] == pytest.approx(hand_ap(preds[r["id"]], set(gt)), abs=1e-15)


def test_queries_without_prediction_score_zero(run, tmp_path):
    """An empty cell and a missing row count as AP 0, as the official scorer counts them."""
    public, private, _ = metrics.read_solution(run["root"].solution_path("retrieval"), "retrieval")
    best_public = max((r for r in run["scores"] if r["subset"] == "public"), key=lambda r: r["ap"])
    best_private = max((r for r in run["scores"] if r["subset"] == "private"), key=lambda r: r["ap"])
    assert best_public["ap"] > 0 and best_private["ap"] > 0
    cv_dir = tmp_path / "cv"
    shutil.copytree(run["cv"], cv_dir)
    rows = [(q, "" if q == best_public["id"] else " ".join(p)) for q, p in submission(run["cv"]).items()
            if q != best_private["id"]]
    with open(cv_dir / "submission.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([("id", "images")] + rows)
    scores = {r["id"]: r for r in report.per_query_scores(run["root"], cv_dir)}
    assert scores[best_public["id"]]["ap"] == 0.0 and scores[best_private["id"]]["ap"] == 0.0
    official = metrics.score("retrieval", run["root"].solution_path("retrieval"), cv_dir / "submission.csv")
    for name, sol in (("public", public), ("private", private)):
        aps = [r["ap"] for r in scores.values() if r["subset"] == name]
        assert len(aps) == len(sol)
        assert abs(sum(aps) / len(aps) - official[name]["map@100"]) < 1e-12


def test_out_of_domain_queries_are_listed_without_ap(run):
    scores = run["scores"]
    _, _, ignored = metrics.read_solution(run["root"].solution_path("retrieval"), "retrieval")
    ood = [r for r in scores if not r["in_domain"]]
    assert sorted(r["id"] for r in ood) == sorted(ignored)
    assert all(r["ap"] is None and r["subset"] is None and r["n_gt"] == 0 for r in ood)
    assert [r["id"] for r in scores] == list(submission(run["cv"]))  # every query, submission order


def test_top1_similarity_is_the_best_index_cosine(run):
    test_ids, q = load_embeddings(run["cv"] / "emb_test.npz")
    _, db = load_embeddings(run["cv"] / "emb_index.npz")
    best = dict(zip(test_ids, (q.astype(np.float64) @ db.astype(np.float64).T).max(axis=1)))
    scores = run["scores"]
    assert all(r["top1"] is not None for r in scores)
    for r in scores:
        assert r["top1"] == pytest.approx(best[r["id"]], abs=1e-5)
    means = [np.mean([r["top1"] for r in scores if r["in_domain"] is d]) for d in (True, False)]
    assert means[0] > means[1]  # landmark queries look more like the index than non-landmarks


def test_per_query_scores_need_the_solution(bare_root, run):
    with pytest.raises(InputError, match="retrieval_solution_v2.1.csv"):
        report.per_query_scores(bare_root, run["cv"])


# --------------------------------------------------------------------------- retrieval pictures
def test_worst_grid_rows_frames_and_size(run, tmp_path):
    root, scores, thumb, top, n = run["root"], run["scores"], 40, 5, 4
    path = report.draw_retrieval_grid(root, run["cv"], tmp_path / "worst.png", n_queries=n, top=top,
                                      which="worst", thumb=thumb, scores=scores)
    a = rgb(path)
    assert np.array_equal(a, rgb(tmp_path / "worst.png"))  # the picture returned is the one written
    assert a.shape == (n * (thumb + PAD) + PAD, (top + 1) * (thumb + PAD) + PAD, 3)
    worst = report.worst_queries(scores, n)
    assert worst[0]["ap"] == min(r["ap"] for r in scores if r["in_domain"])
    assert [r["ap"] for r in worst] == sorted(r["ap"] for r in worst)
    # row 0's query tile is the lowest-AP query (upper part: the label is written at the bottom)
    with Image.open(root.path("test", worst[0]["id"])) as im:
        expected = np.asarray(im.convert("RGB").resize((thumb, thumb)))
    assert np.array_equal(a[PAD + 3:PAD + 16, PAD + 3:PAD + thumb - 3], expected[3:16, 3:thumb - 3])
    # every retrieval frame says whether the image is in the query's ground truth
    public, private, _ = metrics.read_solution(root.solution_path("retrieval"), "retrieval")
    preds = submission(run["cv"])
    for row, r in enumerate(worst):
        gt = set(public.get(r["id"]) or private[r["id"]])
        assert frame_colour(a, row, 0, thumb) == BLUE
        for col, image_id in enumerate(preds[r["id"]][:top], 1):
            assert frame_colour(a, row, col, thumb) == (GREEN if image_id in gt else RED)
    flat = a.reshape(-1, 3)
    assert (flat == GREEN).all(axis=1).any() and (flat == RED).all(axis=1).any()


def test_first_grid_is_draw_retrievals_plus_labels(run, tmp_path):
    old = rgb(report.draw_retrievals(run["root"], run["cv"], tmp_path / "old.png"))
    new = rgb(report.draw_retrieval_grid(run["root"], run["cv"], tmp_path / "new.png", n_queries=6, top=8,
                                         thumb=96))
    assert old.shape == new.shape == (6 * 100 + PAD, 9 * 100 + PAD, 3)
    # identical but for the AP label across the bottom of each query tile
    assert np.array_equal(old[:, PAD + 96:], new[:, PAD + 96:])
    assert np.array_equal(old[:PAD + 60], new[:PAD + 60])
    assert not np.array_equal(old, new)


def test_grid_of_out_of_domain_queries_is_grey(run, tmp_path):
    ood = [r["id"] for r in run["scores"] if not r["in_domain"]][:2]
    a = rgb(report.draw_retrieval_grid(run["root"], run["cv"], tmp_path / "ood.png", query_ids=ood, top=3,
                                       thumb=32, scores=run["scores"]))
    assert a.shape == (2 * 36 + PAD, 4 * 36 + PAD, 3)
    assert all(frame_colour(a, r, c, 32) == GREY for r in range(2) for c in (1, 2, 3))
    flat = a.reshape(-1, 3)
    assert not (flat == GREEN).all(axis=1).any() and not (flat == RED).all(axis=1).any()
    # "ood": the non-landmarks most similar to the index, most similar first
    b = rgb(report.draw_retrieval_grid(run["root"], run["cv"], tmp_path / "hard.png", which="ood", n_queries=3,
                                       top=2, thumb=32, scores=run["scores"]))
    assert b.shape[0] == 3 * 36 + PAD
    with pytest.raises(InputError, match="not in the submission"):
        report.draw_retrieval_grid(run["root"], run["cv"], tmp_path / "x.png", query_ids=["nope"])
    with pytest.raises(InputError, match="which"):
        report.draw_retrieval_grid(run["root"], run["cv"], tmp_path / "x.png", which="best")


# --------------------------------------------------------------------------- score pictures
def test_score_distributions_and_stage_scores_draw(run, tmp_path):
    p = report.draw_score_distributions(run["root"], run["cv"], tmp_path / "dist.png")
    assert isinstance(p, Figure)
    with Image.open(tmp_path / "dist.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    swept = json.loads((run["cv_sweep"] / "cv.json").read_text())
    rows = report.stage_scores(swept)
    assert [r["group"] for r in rows] == ["final", "sweep", "sweep"]
    assert rows[0]["public"] == swept["public"]["map@100"] and rows[0]["private"] == swept["private"]["map@100"]
    assert [r["public"] for r in rows[1:]] == [s["scores"]["public"]["map@100"] for s in swept["sweep"]["pipeline"]]
    assert saved(report.draw_stage_scores(swept, tmp_path / "stages.png"), tmp_path / "stages.png")


def test_stage_scores_of_a_demo_cv_json(tmp_path):
    fig = {"public": {"map@100": 0.5}, "private": {"map@100": 0.25}}
    demo = {"descriptor": "model", "ensemble": [{"artifact": "a"}, {"artifact": "b"}], **fig,
            "stages": [{"name": "exp s1", "train_set": "clean", "image_size": 32, "cv": fig},
                       {"name": "exp s2", "train_set": "c2x", "image_size": 40, "cv": None}],
            "baselines": {"thumbnail": {"public": {"map@100": 0.1}, "private": None}},
            "sweep": {"pipeline": [{"stage": "baseline", "scores": fig, "kept": True},
                                   {"stage": "kreciprocal", "scores": {"public": {"map@100": 0.4},
                                                                       "private": {"map@100": 0.3}}, "kept": False}]}}
    rows = report.stage_scores(demo)
    assert [r["group"] for r in rows] == ["stage", "stage", "final", "baseline", "sweep", "sweep"]
    assert rows[0]["name"] == "exp s1 clean@32" and rows[1]["public"] is None
    assert "ensemble (2 models)" in rows[2]["name"]
    assert (rows[3]["public"], rows[3]["private"]) == (0.1, None)
    assert rows[5]["kept"] is False and rows[5]["private"] == 0.3 and "k-reciprocal" in rows[5]["name"]
    assert saved(report.draw_stage_scores(demo, tmp_path / "demo.png"), tmp_path / "demo.png")
    assert saved(report.draw_stage_scores({"public": None, "private": None}, tmp_path / "none.png"),
                 tmp_path / "none.png")


# --------------------------------------------------------------------------- the data
def test_long_tail_counts_are_train_csv(run, tmp_path):
    with open(run["root"].root / "train.csv", newline="") as f:
        counter = Counter(int(r["landmark_id"]) for r in csv.DictReader(f))
    counts = report.landmark_counts(run["root"])
    assert dict(counts) == counter and len(counts) == len(counter)
    assert [n for _, n in counts] == sorted(counter.values(), reverse=True)
    assert counts[0][1] > counts[-1][1]
    assert saved(report.draw_class_long_tail(run["root"], tmp_path / "tail.png"), tmp_path / "tail.png")


def test_images_per_continent(run, bare_root, tmp_path):
    counts = report.images_per_continent(run["root"])
    assert sum(counts.values()) == len(run["root"].train_ids_labels())
    assert len(counts) > 1 and list(counts.values()) == sorted(counts.values(), reverse=True)
    assert saved(report.draw_images_per_continent(run["root"], tmp_path / "c.png"), tmp_path / "c.png")
    assert report.images_per_continent(bare_root) is None  # no country file: a note, not an error
    assert saved(report.draw_images_per_continent(bare_root, tmp_path / "none.png"), tmp_path / "none.png")


def test_landmark_samples_grid(run, tmp_path):
    a = rgb(report.draw_landmark_samples(run["root"], tmp_path / "s.png", n_landmarks=5, per_landmark=3,
                                         thumb=40))
    assert a.shape == (5 * 44 + PAD, 120 + 3 * 44 + PAD, 3)
    b = rgb(report.draw_landmark_samples(run["root"], tmp_path / "t.png", n_landmarks=5, per_landmark=3,
                                         thumb=40))
    assert np.array_equal(a, b)  # a function of the seed
    assert a[:, :120].min() < 100  # the landmark labels are written


# --------------------------------------------------------------------------- the report
class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def test_write_report(run, tmp_path):
    title = "<script>alert('x')</script> & co"
    path = report.write_report(run["cv_sweep"], run["root"].root, tmp_path / "out", title=title, progress=False)
    assert path == tmp_path / "out" / "report.html"
    page = path.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in page
    parser = _Images()
    parser.feed(page)
    assert {"stage_scores.png", "retrievals_first.png", "retrievals_worst.png", "score_distributions.png",
            "sweep.png", "long_tail.png", "continents.png", "landmark_samples.png"} <= set(parser.src)
    for src in parser.src:
        assert "/" not in src and (path.parent / src).is_file()
        with Image.open(path.parent / src) as im:
            assert im.format == "PNG"
    scores = report.per_query_scores(run["root"], run["cv_sweep"])
    worst = report.worst_queries(scores, 20)
    assert page.count('<tr class="query">') == len(worst) == sum(r["in_domain"] for r in scores)
    assert page.index(worst[0]["id"]) < page.index(worst[-1]["id"])
    assert f"{worst[0]['ap']:.4f}" in page
    assert "+ DBA/αQE" in page and "<table>" in page  # sweep.md as HTML tables
    assert "16x16 colour thumbnails" in page  # the cv table
    assert (path.parent / "per_query.csv").is_file()
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]


def test_write_report_without_ground_truth(run, bare_root, tmp_path):
    path = report.write_report(run["cv"], bare_root, tmp_path / "out", progress=False, n_worst=5)
    page = path.read_text(encoding="utf-8")
    assert "retrieval_solution_v2.1.csv" in page and '<tr class="query">' not in page
    parser = _Images()
    parser.feed(page)
    assert "retrievals_first.png" in parser.src and "retrievals_worst.png" not in parser.src
    a = rgb(path.parent / "retrievals_first.png")
    assert frame_colour(a, 0, 1, 96) == GREY


def test_bad_input_is_named(run, tmp_path):
    cv_dir = tmp_path / "cv"
    cv_dir.mkdir()
    shutil.copyfile(run["cv"] / "submission.csv", cv_dir / "submission.csv")
    with pytest.raises(InputError, match="cv.json not found") as e:
        report.write_report(cv_dir, run["root"], tmp_path / "out", progress=False)
    assert e.value.path == str(cv_dir / "cv.json")
    shutil.copyfile(run["cv"] / "cv.json", cv_dir / "cv.json")
    (cv_dir / "submission.csv").unlink()
    with pytest.raises(InputError, match="submission.csv not found"):
        report.write_report(cv_dir, run["root"], tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="train.csv"):
        report.write_report(run["cv"], tmp_path / "empty", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "report.html").exists()


# --------------------------------------------------------------------------- figures returned, backend untouched
_FIGS = {"public": {"map@100": 0.5}, "private": {"map@100": 0.25}}
SWEEP_RESULT = {"protocol": "v2.1", "tune": "public",
                "pipeline": [{"stage": "baseline", "scores": _FIGS, "kept": True},
                             {"stage": "expansion", "scores": _FIGS, "kept": False}],
                "rows": [{"stage": "baseline", "scores": _FIGS}, {"stage": "expansion", "scores": _FIGS},
                         {"stage": "expansion", "scores": {"public": {"map@100": 0.4}}}]}
ABLATION = {"tables": {"2": [{"name": "baseline", "public": 0.3, "private": 0.2},
                             {"name": "+ BNNeck", "public": 0.35, "private": 0.25}]}}


def test_figures_leave_the_notebook_backend_alone(tmp_path):
    """In a process whose backend is a notebook's, drawing neither switches the backend nor
    touches pyplot's global state: each function returns a Figure (PNG-renderable)."""
    import subprocess
    import sys
    import textwrap

    pytest.importorskip("matplotlib_inline")
    code = textwrap.dedent(f"""
        import io, sys
        import matplotlib
        matplotlib.use("module://matplotlib_inline.backend_inline")
        from matplotlib.figure import Figure
        from glr import report
        sweep, ablation = {SWEEP_RESULT!r}, {ABLATION!r}
        figs = [report.draw_stage_scores({{"public": {_FIGS!r}["public"], "private": None}}),
                report.draw_sweep(sweep), report.draw_ablation(ablation),
                report.draw_sweep(sweep, {str(tmp_path / "sweep.png")!r})]
        assert all(isinstance(f, Figure) for f in figs), figs
        for f in figs:
            f.savefig(io.BytesIO(), format="png")
        print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["module://matplotlib_inline.backend_inline", "False"]
    with Image.open(tmp_path / "sweep.png") as im:
        assert im.format == "PNG"


def test_pictures_without_a_path_are_returned_only(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fig = report.draw_class_long_tail(run["root"])
    assert isinstance(fig, Figure) and fig.axes[0].get_yscale() == "log"
    assert isinstance(report.draw_images_per_continent(run["root"]), Figure)
    assert isinstance(report.draw_score_distributions(run["root"], run["cv"], scores=run["scores"]), Figure)
    grid = report.draw_retrieval_grid(run["root"], run["cv"], n_queries=2, top=3, thumb=32)
    assert isinstance(grid, Image.Image) and grid.size == (4 * 36 + PAD, 2 * 36 + PAD)
    sheet = report.draw_landmark_samples(run["root"], n_landmarks=2, per_landmark=2, thumb=32)
    assert np.array_equal(rgb(sheet), rgb(report.draw_landmark_samples(run["root"], tmp_path / "s.png",
                                                                       n_landmarks=2, per_landmark=2, thumb=32)))
    assert [p.name for p in tmp_path.iterdir()] == ["s.png"]  # nothing written without a path
