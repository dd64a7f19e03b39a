"""The notebook API: ``import glr`` is light, and its names are the library's functions."""

import subprocess
import sys

import numpy as np
import pytest

import glr

HEAVY = ("torch", "torchvision", "timm", "lightning", "faiss", "kaggle", "matplotlib", "PIL")


def _fresh(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_glr_imports_nothing_heavy_and_no_glr_module():
    loaded = _fresh("import sys, glr\n"
                    f"print(sorted(m for m in sys.modules if m.startswith('glr') or m.split('.')[0] in {HEAVY!r}))")
    assert loaded == "['glr']"
    # first use imports what the name needs, and no more
    loaded = _fresh("import sys, glr\nglr.knn\nprint('torch' in sys.modules, 'glr.search' in sys.modules)")
    assert loaded == "False True"


def test_dir_and_all_list_the_api():
    names = {"cv", "embed", "knn", "retrieve", "score", "search_embeddings", "demo", "report"}
    assert set(glr.__all__) == names
    assert names | {"__version__"} <= set(dir(glr))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        glr.nope  # noqa: B018


def test_names_are_the_library_functions():
    from glr import metrics, report, search
    from glr.postprocess import chain
    from glr.workflows import cv, demo

    assert glr.knn is search.knn and glr.score is metrics.score and glr.retrieve is chain.retrieve
    assert glr.cv is cv.cv and glr.demo is demo.demo and glr.report is report


def test_embed_is_the_ensemble_embedding_of_predict(tmp_path):
    import torch

    from glr import predict
    from glr.data.synth import make_synthetic_gldv2
    from glr.model.net import EmbeddingNet

    assert glr.embed is predict.embed_ensemble and glr.search_embeddings is predict.search_embeddings
    make_synthetic_gldv2(tmp_path / "d", n_landmarks=4, scale=0.05, image_size=32, seed=0, progress=False)
    from glr.data.root import GLDv2Root

    ids = GLDv2Root.open(tmp_path / "d").index_ids()[:5]
    torch.manual_seed(0)
    members = [predict.Member(EmbeddingNet("test_resnet", embedding_size=8).eval(), {"image_size": 32}),
               predict.Member(EmbeddingNet("test_resnet", embedding_size=4).eval(), {"image_size": 24})]
    emb, ok = glr.embed(members, tmp_path / "d", {"index": ids}, num_workers=0, progress=False)
    assert emb["index"].shape == (5, 12) and ok["index"].all()
    np.testing.assert_allclose(np.linalg.norm(emb["index"], axis=1), 1.0, atol=1e-5)
    one, _ = predict.embed_split(members[1], tmp_path / "d", "index", ids, num_workers=0, progress=False)
    np.testing.assert_allclose(emb["index"][:, 8:] * np.sqrt(2), one, atol=1e-5)  # concat: blocks × 1/√2


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_and_retrieve_against_brute_force():
    rng = np.random.default_rng(0)
    q, db = _unit(rng, 7, 16), _unit(rng, 50, 16)
    sims = q.astype(np.float64) @ db.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    S, I = glr.knn(q, db, k=5)
    assert S.dtype == np.float32 and I.dtype == np.int64 and S.shape == I.shape == (7, 5)
    assert np.array_equal(I, order)
    assert np.allclose(S, np.take_along_axis(sims, order, axis=1), atol=1e-6)
    S2, I2, info = glr.retrieve(q, db)  # no config: plain kNN, every index row ranked
    assert np.array_equal(I2, np.argsort(-sims, axis=1, kind="stable")) and "seconds" in info
    assert np.allclose(S2[:, :5], S, atol=1e-6)


def test_score_is_glr_score(tmp_path):
    sol = tmp_path / "sol.csv"
    sol.write_text("id,images,Usage\nq1,a b,Public\nq2,c,Private\nq3,None,Ignored\n")
    sub = tmp_path / "sub.csv"
    sub.write_text("id,images\nq1,b a\nq2,x c\nq3,zzz\n")
    result = glr.score("retrieval", sol, sub)
    assert result["public"]["map@100"] == 1.0 and result["private"]["map@100"] == 0.5
