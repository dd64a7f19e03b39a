"""Revisited Oxford/Paris evaluation: hand-computed cases of GLDV2_SPEC.md section 6, the
reference's code as an oracle, the protocols, the ground-truth reader and the CLI."""

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest

from glr.eval import revisitop as R
from glr.utils import InputError

_spec = importlib.util.spec_from_file_location("revisitop_oracle", Path(__file__).parent / "oracle" /
                                               "revisitop_evaluate.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def _col(*ranking):
    return np.array(ranking, np.int64).reshape(-1, 1)


@pytest.mark.parametrize("ranking, ok, junk, ap", [
    ((5, 1, 2), [5], [], 1.0),                           # one positive at rank 0
    ((1, 5, 2), [5], [], 0.25),                          # at rank 1: (0/1 + 1/2)/2, not finite-sum 0.5
    ((0, 9, 1, 2, 3, 4, 5, 6, 8), [0, 8], [], (1 + 1) / 4 + (1 / 8 + 2 / 9) / 4),  # ranks 0 and 8
    ((7, 5, 2), [5], [7], 1.0),                          # junk before the positive is removed
    ((7, 5, 2), [5, 2], [7], 1.0),
    ((1, 2, 3), [5], [], 0.0),                           # positive missing from the ranking
    ((5, 2, 3), [5, 4], [], 0.5),                        # divisor is |ok|, found or not
    ((5, 6, 2), [5, 6], [5], (1 + 1) / 4 + (1 + 2) / 4),  # 5 is ok and junk: a positive that still pushes 6 up
])
def test_ap_hand_computed(ranking, ok, junk, ap):
    m, aps, _, _ = R.compute_map(_col(*ranking), [{"ok": np.array(ok), "junk": np.array(junk)}])
    assert m == pytest.approx(ap, abs=1e-12) and aps[0] == pytest.approx(ap, abs=1e-12)
    assert ref.compute_map(_col(*ranking), [{"ok": np.array(ok), "junk": np.array(junk)}])[0] == \
        pytest.approx(ap, abs=1e-12)


def test_precision_at_k_uses_the_last_positive_when_it_comes_first():
    # positives at 1-based ranks 1 and 8, k = 10 → 2/8; k = 5 → 1/5; k = 1 → 1
    ranking = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    _, _, pr, prs = R.compute_map(_col(*ranking), [{"ok": np.array([0, 7])}], kappas=[1, 5, 10])
    assert prs[0].tolist() == pytest.approx([1.0, 0.2, 0.25])
    assert pr.tolist() == pytest.approx([1.0, 0.2, 0.25])


def test_empty_queries_are_left_out_and_all_empty_is_an_error():
    ranks = np.array([[0, 0], [1, 1]])
    m, aps, pr, prs = R.compute_map(ranks, [{"ok": np.array([], np.int64)}, {"ok": np.array([1])}], kappas=[1, 2])
    # the mean is over the one query with positives: AP 0.25, P@1 0, P@2 1/2
    assert np.isnan(aps[0]) and np.isnan(prs[0]).all() and m == pytest.approx(0.25)
    assert pr.tolist() == pytest.approx([0.0, 0.5])
    with pytest.raises(InputError, match="no query has positives"):
        R.compute_map(ranks, [{"ok": np.array([], np.int64)}] * 2)


def test_no_positive_in_a_truncated_ranking_gives_zero_precision_where_the_reference_raises():
    gnd = [{"ok": np.array([9])}]
    _, aps, pr, _ = R.compute_map(_col(0, 1), gnd, kappas=[1, 5])
    assert aps[0] == 0 and pr.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        ref.compute_map(_col(0, 1), gnd, kappas=[1, 5])


def test_agrees_with_the_reference_on_random_rankings():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n_db, nq = int(rng.integers(5, 40)), int(rng.integers(1, 6))
        depth = int(rng.integers(1, n_db + 1))  # truncated rankings too
        ranks = np.stack([rng.permutation(n_db)[:depth] for _ in range(nq)], axis=1)
        gnd = []
        for _ in range(nq):
            ok = rng.choice(n_db, size=int(rng.integers(0, 6)), replace=True)  # duplicates count in |ok|
            g = {"ok": ok}
            if rng.random() < 0.8:
                g["junk"] = rng.choice(n_db, size=int(rng.integers(0, 6)), replace=False)
            gnd.append(g)
        if all(len(g["ok"]) == 0 for g in gnd):
            continue
        kappas = [1, 5, 10]
        found_any = all(np.isin(ranks[:, q], g["ok"]).any() for q, g in enumerate(gnd) if len(g["ok"]))
        ours = R.compute_map(ranks, gnd, kappas if found_any else [])
        theirs = ref.compute_map(ranks, gnd, kappas if found_any else [])
        assert ours[0] == pytest.approx(theirs[0], abs=1e-12), trial
        np.testing.assert_allclose(ours[1], theirs[1], atol=1e-12)
        if found_any:
            np.testing.assert_allclose(ours[2], theirs[2], atol=1e-12)
            np.testing.assert_allclose(ours[3], theirs[3], atol=1e-12)


def _gnd_file(tmp_path, n_db=6):
    cfg = {"imlist": [f"db{i}" for i in range(n_db)], "qimlist": ["q0", "q1"],
           "gnd": [{"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 10, 10]},
                   {"easy": [], "hard": [3, 4], "junk": [], "bbx": None}]}
    path = tmp_path / "gnd_rtest.pkl"
    path.write_bytes(pickle.dumps(cfg))
    return path


def test_protocols_easy_medium_hard_on_generated_ground_truth(tmp_path):
    cfg = R.read_gnd(_gnd_file(tmp_path))
    # query 0 ranks 1 (hard), 2 (junk), 0 (easy); query 1 ranks 5, 3 (hard), 4 (hard)
    ranks = np.array([[1, 2, 0, 3, 4, 5], [5, 3, 4, 0, 1, 2]]).T
    res = R.evaluate(ranks, cfg["gnd"], kappas=(1, 5))
    # easy: q0 ok={0}, ignored {2, 1} → rank 0 → AP 1; q1 has no easy → left out
    assert res["easy"]["map"] == pytest.approx(1.0) and res["easy"]["n_queries"] == 1
    # medium: q0 ok={0,1}, junk {2}: positions 0 and 2 → 0 and 1 → AP 1; q1 ok {3,4} at 1, 2:
    # (0/1 + 1/2)/4 + (1/2 + 2/3)/4
    q1 = (0 + 0.5) / 4 + (0.5 + 2 / 3) / 4
    assert res["medium"]["map"] == pytest.approx((1 + q1) / 2)
    # hard: q0 ok={1}, ignored {2, 0}: rank 0 → 1; q1 as medium
    assert res["hard"]["map"] == pytest.approx((1 + q1) / 2)
    assert res["hard"]["mp@k"] == {1: pytest.approx((1 + 0) / 2), 5: pytest.approx((1 + 2 / 3) / 2)}
    text = R.format_result(res, "rtest")
    assert "mAP E: 100.00" in text and "mP@k[1, 5] H: [50.00 83.33]" in text


def test_ground_truth_reader_names_the_file_and_query(tmp_path):
    path = tmp_path / "gnd_bad.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3], "hard": []}]}))
    with pytest.raises(InputError, match=r"gnd_bad\.pkl.*query 0: easy holds an index outside 0..0"):
        R.read_gnd(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(InputError, match="cannot read revisitop ground truth"):
        R.read_gnd(path)
    with pytest.raises(InputError, match="not found"):
        R.read_gnd(tmp_path / "absent.pkl")


def test_cli_evaluates_a_model_on_a_generated_dataset(tmp_path, capsys):
    """glr eval-revisitop end to end: images embedded (queries cropped), ranked, scored."""
    import torch
    from PIL import Image

    from glr.cli import main
    from glr.data.images import IMAGENET_MEAN, IMAGENET_STD
    from glr.model.net import build_net
    from glr.model.artifact import save_artifact

    root = tmp_path / "rtest"
    (root / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 255, size=(3, 3))
    names = []
    for i in range(6):  # two images of each of three colours
        Image.fromarray(np.full((32, 32, 3), colours[i % 3], np.uint8)).save(root / "jpg" / f"db{i}.jpg")
        names.append(f"db{i}")
    for q in range(2):  # query q: colour q in a box, noise around it
        a = rng.integers(0, 255, size=(48, 48, 3)).astype(np.uint8)
        a[8:40, 8:40] = colours[q]
        Image.fromarray(a).save(root / "jpg" / f"q{q}.jpg")
    cfg = {"imlist": names, "qimlist": ["q0", "q1"],
           "gnd": [{"easy": [0, 3], "hard": [], "junk": [], "bbx": [8, 8, 40, 40]},
                   {"easy": [1], "hard": [4], "junk": [], "bbx": [8, 8, 40, 40]}]}
    (root / "gnd_rtest.pkl").write_bytes(pickle.dumps(cfg))
    torch.manual_seed(0)
    art = save_artifact(tmp_path / "m.pt", build_net(dict(backbone="test_resnet", embedding_size=16)).eval(),
                        {"image_size": 32, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    assert main(["eval-revisitop", "--data", str(root), "--model", str(art), "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["n_db"] == 6 and out["n_queries"] == 2
    assert out["medium"]["map"] == pytest.approx(1.0)  # a constant colour: the crop finds its twins first
    assert main(["eval-revisitop", "--data", str(root), "--model", str(art)]) == 0
    assert "mAP E: 100.00, M: 100.00" in capsys.readouterr().out


class _Boom:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > BOOM_FILE",))


def test_read_gnd_refuses_a_pickle_that_runs_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [_Boom()]}))
    with pytest.raises(InputError, match=r"gnd_evil\.pkl.*refusing posix\.system"):
        R.read_gnd(path)
    assert not (tmp_path / "BOOM_FILE").exists()


def test_read_gnd_reads_numpy_arrays(tmp_path):
    path = tmp_path / "gnd_np.pkl"
    cfg = {"imlist": ["a", "b"], "qimlist": ["q"],
           "gnd": [{"easy": np.array([1]), "hard": np.array([], np.int64), "bbx": np.array([0.0, 1.0, 5.0, 6.0])}]}
    path.write_bytes(pickle.dumps(cfg))
    got = R.read_gnd(path)
    assert got["gnd"][0]["easy"].tolist() == [1] and got["gnd"][0]["bbx"].tolist() == [0.0, 1.0, 5.0, 6.0]
