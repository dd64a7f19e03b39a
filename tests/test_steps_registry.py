"""The post-processing step registry: a step registered here (a toy re-ranker) is picked up by
the config, the tables, the chain and the sweep with no other change; typed options; guards."""

import csv

import numpy as np
import pytest

from glr.eval.sweep import STAGE_NAMES, RetrievalScorer, parse_grid, run_sweep, sweep_table
from glr.postprocess import registry
from glr.postprocess.cache import GraphCache
from glr.postprocess.chain import Context, missing_inputs, retrieve
from glr.postprocess.config import (RERANKERS, STEP_DEFAULTS, STEP_NEEDS, STEPS, describe, normalize_config,
                                    read_config)
from glr.postprocess.registry import Option, register_step, unregister_step
from glr.search import knn
from glr.utils import InputError

BUILT_IN = ("whitening", "expansion", "kreciprocal", "landmark_country", "train_label", "nonlandmark", "spatial")


def data(seed=0, nq=6, ndb=30, d=8):
    rng = np.random.default_rng(seed)

    def unit(n):
        x = rng.normal(size=(n, d))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return unit(nq), unit(ndb), rng.uniform(0, 1, ndb).astype(np.float32)


def bonus_rerank(S, I, bonus, scale):
    """The toy re-ranker's numbers: ``S + scale · bonus[I]``, stably re-sorted."""
    S2 = (S.astype(np.float64) + scale * bonus[I]).astype(np.float32)
    order = np.argsort(-S2, axis=1, kind="stable")
    return np.take_along_axis(S2, order, 1), np.take_along_axis(I, order, 1)


@pytest.fixture()
def toy_step():
    """A re-ranker declared as a plugin would declare it: one decorator, nothing else."""
    prewarmed = []

    def prewarm(cands, q, db, env):
        prewarmed.append([c["scale"] for c in cands])

    @register_step("toy_bonus", kind="rerank", order=35, label="+ toy bonus", needs=("toy_bonus",),
                   describe=lambda o: f"scale={o['scale']:g}", prewarm=prewarm,
                   options={"scale": Option(1.0, float, minimum=0.0), "note": Option("", str)})
    def apply(S, I, opts, env):
        S, I = bonus_rerank(S, I, env.ctx.get("toy_bonus"), opts["scale"])
        return S, I, {"scale": opts["scale"]}

    yield prewarmed
    unregister_step("toy_bonus")


def test_built_in_steps_in_chain_order():
    assert tuple(STEPS) == BUILT_IN
    assert [s.kind for s in registry.steps()] == ["features"] * 2 + ["shortlist"] + ["rerank"] * 4
    assert tuple(RERANKERS) == BUILT_IN[3:]
    assert STEP_NEEDS["spatial"] == ("q_paths", "db_paths") and "expansion" not in STEP_NEEDS
    assert list(STAGE_NAMES) == ["baseline", *BUILT_IN] and STAGE_NAMES["kreciprocal"] == "+ k-reciprocal"


def test_a_registered_step_is_picked_up_everywhere(toy_step):
    # config tables and normalisation
    assert tuple(STEPS) == BUILT_IN[:6] + ("toy_bonus", "spatial")  # order 35: after nonlandmark (30)
    assert "toy_bonus" in RERANKERS and STEP_NEEDS["toy_bonus"] == ("toy_bonus",)
    assert STEP_DEFAULTS["toy_bonus"] == {"scale": 1.0, "note": ""}
    cfg = normalize_config({"toy_bonus": {"scale": 2}, "k": 5, "shortlist": 12})
    assert cfg["toy_bonus"] == {"scale": 2.0, "note": ""} and isinstance(cfg["toy_bonus"]["scale"], float)
    assert normalize_config({})["toy_bonus"] is None
    assert describe(cfg, "toy_bonus") == "scale=2" and STAGE_NAMES["toy_bonus"] == "+ toy bonus"
    with pytest.raises(InputError, match="toy.yaml: step 'toy_bonus', option 'scale': expected a number >= 0"):
        normalize_config({"toy_bonus": {"scale": "big"}}, source="toy.yaml")
    # the chain: the shortlist grows to 12 because a re-ranker is on, the toy re-ranks it, k=5 kept
    q, db, bonus = data()
    with pytest.raises(InputError, match="'toy_bonus' needs toy_bonus"):
        retrieve(q, db, cfg)
    assert missing_inputs(Context(), "toy_bonus") == ["toy_bonus"]
    ctx = Context(extra={"toy_bonus": bonus})
    S, I, info = retrieve(q, db, cfg, ctx=ctx)
    S0, I0 = knn(q, db, 12)
    S1, I1 = bonus_rerank(S0, I0, bonus, 2.0)
    np.testing.assert_array_equal(I, I1[:, :5])
    np.testing.assert_array_equal(S, S1[:, :5])
    assert info["toy_bonus"] == {"scale": 2.0}


def test_the_sweep_tunes_a_registered_step(toy_step, tmp_path):
    q, db, _ = data(seed=1, nq=8, ndb=24)
    gt = np.array([2, 11, 17])  # every query's ground truth: the rows the bonus favours
    bonus = np.zeros(len(db), np.float32)
    bonus[gt] = 1.0
    test_ids, index_ids = [f"q{i}" for i in range(len(q))], [f"x{i}" for i in range(len(db))]
    with open(tmp_path / "sol.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "images", "Usage"])
        for i, t in enumerate(test_ids):
            w.writerow([t, " ".join(index_ids[j] for j in gt), "Public" if i % 2 == 0 else "Private"])
    scorer = RetrievalScorer(tmp_path / "sol.csv", test_ids, index_ids)
    grid = {"toy_bonus": [{"scale": [0.0, 10.0]}], "shortlist": 24, "k": 24}
    assert parse_grid(grid) == {"toy_bonus": [{"scale": 0.0}, {"scale": 10.0}]}
    res = run_sweep(q, db, scorer, grid, ctx=Context(extra={"toy_bonus": bonus}),
                    cache=GraphCache(backend="numpy"), progress=False)
    assert toy_step == [[0.0, 10.0]]  # its prewarm saw the stage's candidates, normalised
    assert [r["stage"] for r in res["pipeline"]] == ["baseline", "toy_bonus"]
    assert [r["setting"] for r in res["rows"][1:]] == ["scale=0", "scale=10"]
    assert res["pipeline"][1]["kept"] and res["config"]["toy_bonus"] == {"scale": 10.0, "note": ""}
    assert res["final"]["public"]["map@100"] == 1.0
    assert "| + toy bonus | scale=10 |" in sweep_table(res)
    # without its input the stage is skipped, as any re-ranker's
    skipped = run_sweep(q, db, scorer, grid, cache=GraphCache(backend="numpy"), progress=False)
    assert [r["stage"] for r in skipped["pipeline"]] == ["baseline"]


def test_unregistered_step_is_gone():
    with pytest.raises(InputError, match="unknown key"):
        normalize_config({"toy_bonus": {}})
    with pytest.raises(InputError, match="unknown step"):
        parse_grid({"toy_bonus": [{}]})


def test_option_types_in_yaml(tmp_path):
    bad = {"k: three": ("'kreciprocal', option 'k1': expected an integer >= 1, got 'three'",
                        "kreciprocal: {k1: three}"),
           "k float": ("option 'k': expected an integer >= 1, got 3.5", "expansion: {k: 3.5}"),
           "bool": ("option 'qe': expected true or false, got 1", "expansion: {qe: 1}"),
           "choice": ("option 'form': expected one of 'joint', 'classic', got 'both'", "expansion: {form: both}"),
           "range": ("option 'lambda': expected a number in \\[0, 1\\], got 1.5", "kreciprocal: {lambda: 1.5}"),
           "nan": ("option 'alpha': expected a number >= 0, got nan", "expansion: {alpha: .nan}"),
           "null": ("option 'k': expected an integer >= 1, got None", "landmark_country: {k: null}")}
    for name, (message, text) in bad.items():
        path = tmp_path / "p.yaml"
        path.write_text("postprocess:\n  " + text + "\n")
        with pytest.raises(InputError, match=f"p.yaml: step .*{message}"):
            read_config(path)
    (tmp_path / "ok.yaml").write_text("expansion: {alpha: 1e-3, k: 4}\nlandmark_country: {alpha: 2, beta: 0}\n"
                                      "whitening: {dim: null}\nspatial: {time_budget_s: null}\n")
    c = read_config(tmp_path / "ok.yaml")
    assert c["expansion"]["alpha"] == 0.001 and type(c["expansion"]["k"]) is int  # YAML 1.1's '1e-3' string
    assert c["landmark_country"] == {"alpha": 2.0, "beta": 0.0, "k": 3} and type(c["landmark_country"]["beta"]) is float
    assert c["whitening"]["dim"] is None and c["spatial"]["time_budget_s"] is None


def test_registration_guards():
    def apply(*a):
        return a

    with pytest.raises(ValueError, match="already registered"):
        register_step("spatial", kind="rerank", order=99, label="x")(apply)
    with pytest.raises(ValueError, match="bad step name"):
        register_step("k", kind="rerank", order=99, label="x")(apply)
    with pytest.raises(ValueError, match="order 40 .* taken by 'spatial'"):
        register_step("toy", kind="rerank", order=40, label="x", options={"n": Option(1, int)})(apply)
    with pytest.raises(ValueError, match="only re-rankers"):
        register_step("toy", kind="features", order=99, label="x", needs=("train",))(apply)
    with pytest.raises(ValueError, match="kind"):
        register_step("toy", kind="magic", order=99, label="x", options={"n": Option(1, int)})(apply)
    with pytest.raises(ValueError, match="at least one option"):
        register_step("toy", kind="rerank", order=99, label="x")(apply)
    with pytest.raises(ValueError, match="default 'x' of option 'n'"):
        register_step("toy", kind="rerank", order=99, label="x", options={"n": Option("x", int)})(apply)
    assert tuple(STEPS) == BUILT_IN  # nothing half-registered


def test_one_shortlist_step_at_a_time():
    register_step("toy_shortlist", kind="shortlist", order=20, label="+ toy",
                  options={"k": Option(3, int)})(lambda q, db, opts, n, env: None)
    try:
        assert tuple(STEPS)[2:4] == ("kreciprocal", "toy_shortlist")
        with pytest.raises(InputError, match="both make the shortlist"):
            normalize_config({"kreciprocal": {}, "toy_shortlist": {}})
    finally:
        unregister_step("toy_shortlist")
