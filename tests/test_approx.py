"""Approximate search in the post-processing chain (issue 16, part 5): the ``search`` setting of a
config (one spec for every graph, or per graph), checked against the sizes of a run before any
search, kept apart from exact graphs in the cache, one index per database, and with generous
settings the same rankings as exact search."""

import numpy as np
import pytest
import yaml

import glr.postprocess.cache as cache_module
import glr.search
import glr.workflows.cv as cv_module
from glr.cli import main
from glr.data.synth import make_synthetic_gldv2
from glr.eval.sweep import run_sweep
from glr.postprocess.cache import GraphCache
from glr.postprocess.chain import Context, check_search, retrieve
from glr.postprocess.config import describe, normalize_config, read_config, write_config
from glr.postprocess.registry import GRAPHS, Env, graph_index, search_setting
from glr.embeddings.npz import save_embeddings
from glr.embeddings.store import save_store
from glr.predict import rank, recognition_rows, search_embeddings
from glr.search import IndexSpec, knn
from glr.utils import InputError

pytest.importorskip("faiss")

IVF = {"ivf": {"nlist": 8, "nprobe": 8}}  # every list visited: exact results through an IVF index
CHAIN = {"expansion": {"form": "joint", "k": 3, "alpha": 3.0}, "kreciprocal": {"k1": 6, "k2": 3, "lambda": 0.3},
         "landmark_country": {"alpha": 1.0, "beta": 0.1, "k": 3}, "shortlist": 40, "k": 10}


def clustered(n, seed, n_centres=12, d=32, sub=6, noise=0.25):
    """Unit rows around random centres in a ``sub``-dimensional subspace, plus small full-d noise
    (a low intrinsic dimension, as learned embeddings have); and their centre ids."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(99).normal(size=(d, sub)))[0].T  # the same subspace for every call
    centres = np.random.default_rng(98).normal(size=(n_centres, sub))
    lab = rng.integers(0, n_centres, n)
    x = (centres[lab] + noise * rng.normal(size=(n, sub))) @ basis + 0.02 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), lab


@pytest.fixture(scope="module")
def data():
    q, _ = clustered(40, 1)
    db, _ = clustered(160, 2)
    train, lab = clustered(120, 3)
    ctx = Context(train=train, train_landmarks=lab.astype(np.int64), train_countries=(lab % 3).astype(np.int64))
    return q, db, ctx


# --------------------------------------------------------------------------- the setting
def test_default_config_searches_every_graph_exactly():
    config = normalize_config(None)
    assert config["search"] is None and describe(config, "search") == "exact"
    assert all(graph_index(config, g) is None for g in GRAPHS)
    assert normalize_config({"search": "exact"})["search"] is None
    assert normalize_config({"search": {"kreciprocal": "exact", "train": {"exact": None}}})["search"] is None
    assert normalize_config({"search": {}})["search"] is None


def test_one_spec_for_every_graph_and_per_graph():
    one = normalize_config({"search": {"ivf": {"nlist": 64, "nprobe": 8}}})
    assert one["search"] == {"ivf": {"nlist": 64, "nprobe": 8}}
    assert all(graph_index(one, g) == IndexSpec("ivf", nlist=64, nprobe=8) for g in GRAPHS)
    assert search_setting(one, "train") == "search"
    assert describe(one, "search").endswith("(every graph)")
    per = normalize_config({"search": {"train": {"hnsw": {"M": 16, "ef": 64}}, "kreciprocal": "ivf",
                                       "shortlist": "exact"}})
    # only the approximate graphs, in GRAPHS order; options left out stay automatic
    assert per["search"] == {"kreciprocal": {"ivf": {}}, "train": {"hnsw": {"M": 16, "ef": 64}}}
    assert list(per["search"]) == ["kreciprocal", "train"]
    assert graph_index(per, "train") == IndexSpec("hnsw", M=16, ef=64)
    assert graph_index(per, "kreciprocal") == IndexSpec("ivf")
    assert graph_index(per, "shortlist") is None and graph_index(per, "expansion") is None
    assert search_setting(per, "train") == "search.train"
    assert describe(per, "search").startswith("kreciprocal IVF") and "train HNSW" in describe(per, "search")
    env = Env(q=None, db=None, ctx=Context(), cache=GraphCache(), config=per)
    assert env.index("train") == IndexSpec("hnsw", M=16, ef=64) and env.index("nonlandmark") is None
    with pytest.raises(ValueError, match="unknown graph 'joint'"):
        env.index("joint")


@pytest.mark.parametrize("search, message", [
    ({"kreciprocal": {"ivf": {"nlist": 0}}}, "search.kreciprocal.ivf.nlist must be an integer >= 1"),
    ({"train": {"hnsw": {"ef": "big"}}}, "search.train.hnsw.ef must be an integer >= 1"),
    ({"ivf": {"nlist": 8, "nprobe": 16}}, "search.ivf.nprobe = 16 is larger than search.ivf.nlist = 8"),
    ({"train": {"ivf": {"nprob": 4}}}, "search.train.ivf.nprob: unknown option"),
    ({"kreciprocall": "ivf"}, r"search: unknown graph\(s\) \['kreciprocall'\]"),
    ({"train": "annoy"}, "search.train: unknown index kind 'annoy'"),
    ({"ivf": {}, "train": "exact"}, "search must name one index kind"),
    (3, "search must be one of exact, ivf, hnsw"),
])
def test_a_bad_setting_names_the_setting_and_the_file(tmp_path, search, message):
    path = tmp_path / "post.yaml"
    path.write_text(yaml.safe_dump({"postprocess": {"k": 10, "search": search}}))
    with pytest.raises(InputError, match=message) as e:
        read_config(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_write_config_round_trips_the_setting(tmp_path):
    for search in ({"ivf": {"nlist": 32, "nprobe": 4}},
                   {"expansion": {"hnsw": {"M": 8, "ef": 40}}, "nonlandmark": {"ivf": {"nlist": 4}}}):
        config = normalize_config({**CHAIN, "search": search})
        back = read_config(write_config(tmp_path / "p.yaml", config))
        assert back == config and back["search"] == search


# --------------------------------------------------------------------------- bad sizes, before any search
@pytest.fixture
def no_search(monkeypatch):
    """Every search and index build of the chain fails loudly: a check must come first."""
    def boom(*a, **k):
        raise AssertionError("searched before the settings were checked")

    for name in ("knn", "build_index", "joint_graph"):
        monkeypatch.setattr(cache_module, name, boom)
    monkeypatch.setattr(glr.search, "build_index", boom)
    monkeypatch.setattr(glr.search.SearchIndex, "search", boom)


@pytest.mark.parametrize("search, message", [
    # the joint graphs' database is concat(q, db): 200 rows; k-reciprocal's final search: db, 160
    ({"expansion": {"ivf": {"nlist": 201}}}, "search.expansion.ivf.nlist = 201 is larger than the 200 rows"),
    ({"kreciprocal": {"ivf": {"nlist": 161}}}, "search.kreciprocal.ivf.nlist = 161 is larger than the 160 rows"),
    ({"train": {"ivf": {"nlist": 121}}}, "search.train.ivf.nlist = 121 is larger than the 120 rows"),
    ({"ivf": {"nlist": 150}}, "search.ivf.nlist = 150 is larger than the 120 rows"),
    ({"train": {"ivf": {"nprobe": 40}}}, "search.train.ivf.nprobe = 40 is larger than nlist"),  # automatic nlist
])
def test_sizes_are_checked_before_any_search(data, no_search, search, message):
    q, db, ctx = data
    with pytest.raises(InputError, match=message) as e:
        retrieve(q, db, {**CHAIN, "search": search}, ctx=ctx, source="runs/post.yaml")
    assert str(e.value).startswith("runs/post.yaml: ")
    with pytest.raises(InputError, match=message):
        rank(q, db, {**CHAIN, "search": search}, ctx=ctx, source="runs/post.yaml")


def test_only_the_graphs_a_config_searches_are_checked(data, no_search):
    q, db, ctx = data
    config = normalize_config({"search": {"nonlandmark": {"ivf": {"nlist": 10**6}},
                                          "kreciprocal": {"ivf": {"nlist": 10**6}}}})
    check_search(config, len(q), len(db), len(ctx.train), 0)  # neither step is on: nothing to check
    with pytest.raises(InputError, match="search.nonlandmark.ivf.nlist"):
        check_search({**config, "nonlandmark": {"weight": 1.0, "k": 5}}, len(q), len(db), 0, 50)
    tagged = normalize_config({"search": {"train": {"ivf": {"nlist": 500}}}})
    check_search(tagged, 40, 160, 120)  # no train tagging, no recognition
    with pytest.raises(InputError, match="search.train.ivf.nlist = 500 is larger than the 120 rows"):
        check_search(tagged, 40, 160, 120, recognition=True)


def test_hnsw_on_the_gpu_is_refused_before_any_search(data, no_search):
    q, db, ctx = data
    with pytest.raises(InputError, match="search.train.hnsw cannot run on the GPU"):
        check_search(normalize_config({**CHAIN, "search": {"train": "hnsw"}}), len(q), len(db), 120, use_gpu=True,
                     source="p.yaml")


def test_without_faiss_an_approximate_setting_is_refused(data, no_search, monkeypatch):
    q, db, ctx = data
    monkeypatch.setattr(glr.search, "faiss_available", lambda: False)
    with pytest.raises(InputError, match="search.kreciprocal.ivf .*needs faiss"):
        retrieve(q, db, {**CHAIN, "search": {"kreciprocal": IVF}}, ctx=ctx)
    check_search(normalize_config(CHAIN), len(q), len(db), 120)  # exact search needs nothing


def test_the_recognition_vote_checks_its_graph(data, no_search):
    q, _, ctx = data
    with pytest.raises(InputError, match="vote.yaml: search.train.ivf.nlist = 500"):
        recognition_rows(["a"], ["a"], q[:1], ctx, config={"search": {"train": {"ivf": {"nlist": 500}}}},
                         source="vote.yaml")


# --------------------------------------------------------------------------- the cache
def test_cache_keys_keep_exact_and_each_spec_apart(data, tmp_path):
    q, db, _ = data
    cache = GraphCache(folder=tmp_path)
    exact = cache.knn(q, db, 5)
    coarse = IndexSpec("ivf", nlist=16, nprobe=1)
    approx = cache.knn(q, db, 5, index=coarse)
    assert cache.searches == 2 and cache.builds == 1
    full = cache.knn(q, db, 5, index=IndexSpec("ivf", nlist=16, nprobe=16))
    assert cache.searches == 3 and cache.builds == 2
    assert not np.array_equal(approx[1], exact[1])  # nprobe 1 misses neighbours: the spec is really applied
    np.testing.assert_array_equal(full[1], exact[1])  # every list visited: the exact neighbours
    # each served from its own entry, an exact request never from an approximate graph
    np.testing.assert_array_equal(cache.knn(q, db, 3)[1], exact[1][:, :3])
    np.testing.assert_array_equal(cache.knn(q, db, 3, index=coarse)[1], approx[1][:, :3])
    np.testing.assert_array_equal(cache.knn(q, db, 4, index=glr.search.EXACT)[1], exact[1][:, :4])
    assert cache.searches == 3 and cache.hits == 3
    # on disk too: exact files keep their names, approximate ones carry the spec
    names = sorted(p.name for p in tmp_path.glob("knn_*.npz"))
    assert len(names) == 3 and sum("ivf" not in n for n in names) == 1
    again = GraphCache(folder=tmp_path)
    np.testing.assert_array_equal(again.knn(q, db, 5)[1], exact[1])
    np.testing.assert_array_equal(again.knn(q, db, 5, index=coarse)[1], approx[1])
    assert again.searches == 0 and again.hits == 2
    # joint graphs likewise
    x = np.concatenate([q, db])
    cache.joint(x, 4)
    cache.joint(x, 4, index=coarse)
    cache.joint(x, 3, index=coarse)
    assert cache.searches == 5 and cache.hits == 4


def test_one_index_serves_the_queries_and_the_index_against_train(data, monkeypatch):
    q, db, ctx = data
    built = []
    real = cache_module.build_index

    def counting(x, spec, **kw):
        built.append((len(x), spec.key()))
        return real(x, spec, **kw)

    monkeypatch.setattr(cache_module, "build_index", counting)
    cache = GraphCache()
    config = {"landmark_country": {"alpha": 1.0, "beta": 0.1, "k": 3}, "train_label": {"insert": False, "k": 5},
              "shortlist": 40, "k": 10, "search": {"train": IVF}}
    retrieve(q, db, config, ctx=ctx, cache=cache)
    assert built == [(len(ctx.train), "ivf8-np8")]
    assert cache.searches == 3  # q → db exact, q → train and db → train through the one index
    rows = recognition_rows(["a", "b"], ["a", "b"], q[:2], ctx, cache=cache, config=config)
    assert built == [(len(ctx.train), "ivf8-np8")] and all(r[1] for r in rows)


# --------------------------------------------------------------------------- the chain
@pytest.mark.parametrize("search", [IVF, {"hnsw": {"M": 16, "ef": 256}},
                                    {"kreciprocal": IVF, "train": {"hnsw": {"M": 16, "ef": 256}}}])
def test_generous_approximate_settings_rank_as_exact(data, search):
    q, db, ctx = data
    S, I, _ = retrieve(q, db, CHAIN, ctx=ctx)
    cache = GraphCache()
    Sa, Ia, _ = retrieve(q, db, {**CHAIN, "search": search}, ctx=ctx, cache=cache)
    assert cache.builds >= 1  # the approximate indexes were really used
    np.testing.assert_array_equal(Ia, I)
    np.testing.assert_allclose(Sa, S, atol=1e-5)


def test_every_graph_can_be_approximate(data):
    q, db, ctx = data
    ctx = Context(train=ctx.train, train_landmarks=ctx.train_landmarks, distractors=clustered(60, 7)[0])
    config = {"expansion": {"form": "classic", "qe_n": 2, "dba_n": 3}, "landmark_country": {"k": 3},
              "nonlandmark": {"weight": 0.5, "k": 3}, "shortlist": 40, "k": 10}
    S, I, _ = retrieve(q, db, config, ctx=ctx)
    cache = GraphCache()
    per_graph = {g: IVF for g in GRAPHS}
    Sa, Ia, _ = retrieve(q, db, {**config, "search": per_graph}, ctx=ctx, cache=cache)
    # through the cache: db → db (DBA), one index over db' for q → db' (αQE) and q' → db' (the
    # shortlist), one over train; db → distractors is searched (once, memoised) by nonlandmark_scores
    assert cache.builds == 3
    np.testing.assert_array_equal(Ia, I)
    np.testing.assert_allclose(Sa, S, atol=1e-5)


def test_a_sweep_keeps_the_search_setting(data):
    q, db, ctx = data
    scorer_calls = []

    def scorer(I):
        scorer_calls.append(I.shape)
        return {"public": {"map@100": float(I[0, 0] == 0)}, "private": {"map@100": 0.0}}

    scorer.tune, scorer.protocol = "public", "v2.1"
    cache = GraphCache()
    grid = {"expansion": [{"form": "joint", "k": 2}, {"form": "joint", "k": 3}], "k": 10, "shortlist": 20,
            "search": {"expansion": IVF}}
    out = run_sweep(q, db, scorer, grid, ctx=ctx, cache=cache)
    assert out["config"]["search"] == {"expansion": IVF} and cache.builds == 1 and scorer_calls


def test_a_store_index_is_searched_exactly(tmp_path, data):
    q, db, _ = data
    save_embeddings(tmp_path / "q.npz", [f"q{i}" for i in range(len(q))], q)
    save_store(tmp_path / "db", [f"d{i}" for i in range(len(db))], db, shard_size=64)
    with pytest.raises(InputError, match="approximate search setting needs the embeddings in memory"):
        search_embeddings(tmp_path / "q.npz", tmp_path / "db", tmp_path / "sub.csv", k=5, progress=False,
                          post={"search": IVF})


def test_cv_refuses_a_setting_that_cannot_work_before_embedding(tmp_path, capsys, monkeypatch):
    root = tmp_path / "root"
    make_synthetic_gldv2(root, progress=False, n_landmarks=4, scale=0.05, image_size=32, seed=0)
    post = tmp_path / "post.yaml"
    post.write_text("postprocess:\n  search:\n    shortlist:\n      ivf: {nlist: 100000}\n")
    monkeypatch.setattr(cv_module, "_thumbnails", lambda *a, **k: (_ for _ in ()).throw(AssertionError("embedded")))
    out = tmp_path / "out"
    assert main(["cv", "--data", str(root), "--descriptor", "thumbnail", "--post", str(post), "--out", str(out),
                 "--no-recognition"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(post) in err and "search.shortlist.ivf.nlist = 100000 is larger than the" in err
    assert len(err.splitlines()) == 1 and not (out / "submission.csv").exists()


def test_approximate_graphs_reach_high_recall_on_clustered_data():
    """What the bench measures, small: recall@k of an IVF graph against exact on clustered rows."""
    q, _ = clustered(200, 4, n_centres=40)
    db, _ = clustered(4000, 5, n_centres=40)
    cache = GraphCache()
    _, I = cache.knn(q, db, 10, index=IndexSpec("ivf", nlist=32, nprobe=8))
    _, E = knn(q, db, 10)
    assert glr.search.recall_at_k(I, E) >= 0.95
