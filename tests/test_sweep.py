"""The post-processing chain, the graph cache, the sweep and the CV protocols."""

import csv
import json

import numpy as np
import pytest

from glr import metrics
from glr.postprocess.chain import Context, retrieve
from glr.postprocess.cache import GraphCache
from glr.postprocess.config import normalize_config, read_config, write_config
from glr.search import knn
from glr.submission import retrieval_rows, write_submission
from glr.eval.sweep import RetrievalScorer, expand_grid, parse_grid, protocol_2021_ids, run_sweep, sweep_table
from glr.report.sweep import write_sweep
from glr.utils import InputError


def clustered(seed=0, n_lm=12, per_q=1, per_db=5, per_tr=4, d=16, noise=0.9):
    """Queries, index and train views of ``n_lm`` landmarks (noisy copies of unit centres)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(n_lm, d))
    c /= np.linalg.norm(c, axis=1, keepdims=True)

    def views(per):
        lab = np.repeat(np.arange(n_lm), per)
        x = c[lab] + noise * rng.normal(size=(len(lab), d)) / np.sqrt(d)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), lab

    return views(per_q), views(per_db), views(per_tr)


def solution_file(path, q_lab, db_lab, n_public=None):
    """A retrieval solution: query i's ground truth = index images of its landmark."""
    test_ids = [f"q{i:03d}" for i in range(len(q_lab))]
    index_ids = [f"x{i:03d}" for i in range(len(db_lab))]
    n_public = len(q_lab) // 2 if n_public is None else n_public
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "images", "Usage"])
        for i, t in enumerate(test_ids):
            gt = " ".join(index_ids[j] for j in np.flatnonzero(db_lab == q_lab[i]))
            w.writerow([t, gt, "Public" if i < n_public else "Private"])
    return test_ids, index_ids


def test_normalize_config_defaults_and_errors():
    c = normalize_config({"expansion": {"k": 5}, "kreciprocal": True, "k": 50})
    assert c["expansion"] == {"form": "joint", "k": 5, "alpha": 3.0, "qe": True, "dba": True, "qe_n": 2,
                              "dba_n": 10}
    assert c["kreciprocal"] == {"k1": 20, "k2": 6, "lambda": 0.3} and c["k"] == 50 and c["spatial"] is None
    with pytest.raises(InputError, match="unknown key"):
        normalize_config({"dba": {}})
    with pytest.raises(InputError, match="'expansion': unknown option.*'n'"):
        normalize_config({"expansion": {"n": 3}})
    with pytest.raises(InputError, match="form"):
        normalize_config({"expansion": {"form": "both"}})


def test_config_round_trip(tmp_path):
    c = normalize_config({"expansion": {"k": 2}, "landmark_country": {"beta": 0.2}})
    write_config(tmp_path / "p.yaml", c, comment="hello")
    assert read_config(tmp_path / "p.yaml") == c
    (tmp_path / "bad.yaml").write_text("postprocess:\n  kreciprocal: {k3: 1}\n")
    with pytest.raises(InputError, match="bad.yaml.*k3"):
        read_config(tmp_path / "bad.yaml")


def test_graph_cache_slices_and_persists(tmp_path):
    (q, _), (db, _), _ = clustered()
    cache = GraphCache(folder=tmp_path, backend="numpy")
    S5, I5 = cache.knn(q, db, 5)
    S3, I3 = cache.knn(q, db.copy(), 3)  # same content, another array: served from the k=5 graph
    assert (cache.searches, cache.hits) == (1, 1)
    np.testing.assert_array_equal(I3, I5[:, :3])
    cache.knn(q, db, 8)  # more columns than stored: a new search
    assert cache.searches == 2
    fresh = GraphCache(folder=tmp_path, backend="numpy")
    S, I = fresh.knn(q, db, 4)
    assert fresh.searches == 0 and fresh.hits == 1
    np.testing.assert_array_equal(I, knn(q, db, 4, backend="numpy")[1])


def test_retrieve_plain_equals_knn_and_missing_inputs_are_named():
    (q, _), (db, _), _ = clustered()
    S, I, _ = retrieve(q, db, {"k": 7})
    S2, I2 = knn(q, db, 7)
    np.testing.assert_array_equal(I, I2)
    with pytest.raises(InputError, match="landmark_country.*train"):
        retrieve(q, db, {"landmark_country": {}})
    with pytest.raises(InputError, match="nonlandmark.*distractors"):
        retrieve(q, db, {"nonlandmark": {}})


def test_expand_and_parse_grid():
    cands = expand_grid([{"k": [2, 3], "alpha": [1, 3], "qe": True}, {"k": 2, "alpha": 1, "qe": True}], "expansion")
    assert len(cands) == 4 and {"k": 3, "alpha": 3, "qe": True} in cands
    with pytest.raises(InputError, match="unknown step"):
        parse_grid({"rerank": [{}]})
    with pytest.raises(InputError, match="step kreciprocal.*lambd"):
        parse_grid({"kreciprocal": [{"lambd": 0.3}]})


def test_scorer_matches_official_scoring_of_the_file(tmp_path):
    (q, ql), (db, dl), _ = clustered(seed=3)
    test_ids, index_ids = solution_file(tmp_path / "sol.csv", ql, dl)
    _, I = knn(q, db, 20)
    sub = write_submission(tmp_path / "sub.csv", retrieval_rows(test_ids, index_ids, I), "retrieval")
    official = metrics.score("retrieval", tmp_path / "sol.csv", sub)
    mine = RetrievalScorer(tmp_path / "sol.csv", test_ids, index_ids)(I)
    for s in ("public", "private"):
        assert mine[s]["map@100"] == official[s]["map@100"]
        assert mine[s]["p@1"] == official[s]["p@1"]
    both = RetrievalScorer(tmp_path / "sol.csv", test_ids, index_ids, protocol="2021")(I)["all"]
    n_pub, n_priv = official["public"]["n_queries"], official["private"]["n_queries"]
    assert both["map@100"] == pytest.approx((official["public"]["map@100"] * n_pub
                                             + official["private"]["map@100"] * n_priv) / (n_pub + n_priv))


def test_protocol_2021_ids(tmp_path):
    (tmp_path / "sol.csv").write_text("id,images,Usage\nq1,x2 x5,Public\nq2,,Ignored\nq3,x1,Private\n")
    index_ids = [f"x{i}" for i in range(7)]
    queries, index = protocol_2021_ids(tmp_path / "sol.csv", ["q0", "q1", "q2", "q3"], index_ids,
                                       index_list=["x0", "x6"])
    assert queries == ["q1", "q3"]
    assert index == ["x0", "x1", "x2", "x5", "x6"]  # the list plus every ground-truth image, index order
    with pytest.raises(InputError, match="'y9'"):
        protocol_2021_ids(tmp_path / "sol.csv", ["q1"], index_ids, index_list=["y9"])


@pytest.fixture()
def sweep_inputs(tmp_path):
    (q, ql), (db, dl), (tr, tl) = clustered(seed=1, n_lm=20, per_q=2, per_db=6, per_tr=5, noise=1.1)
    test_ids, index_ids = solution_file(tmp_path / "sol.csv", ql, dl)
    ctx = Context(train=tr, train_landmarks=tl.astype(np.int64), train_countries=(tl % 5).astype(np.int64))
    return q, db, RetrievalScorer(tmp_path / "sol.csv", test_ids, index_ids), ctx


GRID = {"expansion": [{"form": "joint", "k": [2, 3], "alpha": 3.0}, {"form": "classic", "qe_n": 1, "dba_n": 3}],
        "kreciprocal": [{"k1": [4, 8], "k2": [1, 3], "lambda": 0.3}],
        "landmark_country": [{"alpha": [0.5, 1.0], "beta": 0.1, "k": 3}],
        "shortlist": 60, "k": 50}


def test_sweep_greedy_choice_and_report(sweep_inputs, tmp_path):
    q, db, scorer, ctx = sweep_inputs
    res = run_sweep(q, db, scorer, GRID, ctx=ctx, cache=GraphCache(backend="numpy"), progress=False)
    assert len(res["rows"]) == 1 + 3 + 4 + 2
    assert [r["stage"] for r in res["pipeline"]] == ["baseline", "expansion", "kreciprocal", "landmark_country"]
    # each stage's pipeline row is its best candidate on Public, kept only when it beats the chain before it
    chain = res["pipeline"][0]["scores"]["public"]["map@100"]
    for p in res["pipeline"][1:]:
        cands = [r for r in res["rows"] if r["stage"] == p["stage"]]
        assert p["scores"]["public"]["map@100"] == max(r["scores"]["public"]["map@100"] for r in cands)
        assert p["kept"] == (p["scores"]["public"]["map@100"] > chain)
        if p["kept"]:
            chain = p["scores"]["public"]["map@100"]
            assert res["config"][p["stage"]] == p["options"]
        else:
            assert res["config"][p["stage"]] is None
    assert res["final"]["public"]["map@100"] == chain
    # the chosen config, applied by retrieve(), scores what the sweep said
    _, I, _ = retrieve(q, db, res["config"], ctx=ctx)
    assert scorer(I) == res["final"]
    files = write_sweep(res, tmp_path / "out")
    assert read_config(files["config"]) == res["config"]
    assert files["png"].stat().st_size > 1000
    table = sweep_table(res)
    assert "+ k-reciprocal" in table and "mAP@100 Private" in table
    json.loads(files["json"].read_text())


def test_sweep_reuses_cached_graphs(sweep_inputs, tmp_path):
    q, db, scorer, ctx = sweep_inputs
    cache = GraphCache(folder=tmp_path / "cache", backend="numpy")
    first = run_sweep(q, db, scorer, GRID, ctx=ctx, cache=cache, progress=False)
    # one joint kNN for both joint k's, one db graph (classic DBA), one q->db' per expanded set,
    # one joint graph for both k1's, one query->train and one index->train graph
    n_expanded = 3  # features after each expansion candidate (+ the baseline's)
    assert first["cache"]["searches"] <= 1 + 1 + (1 + n_expanded) + 1 + 2 + 2
    again = run_sweep(q, db, scorer, GRID, ctx=ctx, cache=GraphCache(folder=tmp_path / "cache", backend="numpy"),
                      progress=False)
    assert again["cache"]["searches"] == 0 and again["cache"]["hits"] > 0
    assert again["pipeline"] == first["pipeline"]


def test_shipped_configs_parse():
    from pathlib import Path

    from glr.eval.sweep import read_grid

    here = Path(__file__).resolve().parents[1] / "configs" / "postprocess"
    grid = parse_grid(read_grid(here / "sweep_gldv2.yaml"))
    assert len(grid["kreciprocal"]) == 18 and len(grid["expansion"]) == 8 + 9
    seed = read_config(here / "seed_2021.yaml")
    assert seed["kreciprocal"] == {"k1": 10, "k2": 3, "lambda": 0.3} and seed["expansion"] is None
