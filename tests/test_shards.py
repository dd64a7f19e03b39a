"""Sharded embedding stores: resumable extraction (killed, full disk, corrupt shards, several
workers), streamed kNN and αQE/DBA over a store equal to the in-memory results."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from glr.cli import main
from glr.data.images import IMAGENET_MEAN, IMAGENET_STD
from glr.data.root import GLDv2Root
from glr.model.net import build_net
from glr.model.artifact import save_artifact
from glr.postprocess.expansion import alpha_dba, alpha_qe, qe_dba_joint
from glr.search import knn
from glr.arrays import ArrayRows
from glr.embeddings.store import ShardedEmbeddings, create_store, open_embeddings, save_store
from glr.embeddings.sharded import extract_shards
from glr.predict import embed_to_shards
from glr.utils import InputError


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small synthetic root and an untrained tiny artifact (16-d)."""
    from glr.data.synth import make_synthetic_gldv2

    tmp = tmp_path_factory.mktemp("shards")
    root = tmp / "root"
    make_synthetic_gldv2(root, n_landmarks=12, scale=0.12, image_size=32, progress=False)
    torch.manual_seed(0)
    net = build_net(dict(backbone="test_resnet", embedding_size=16)).eval()
    art = save_artifact(tmp / "m.pt", net, {"image_size": 32, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    return dict(root=root, art=art, ids=GLDv2Root.open(root).test_ids())  # 49 images: 7 shards of 8


def _embed(tiny, out, **kw):
    kw = {"shard_size": 8, "dtype": "float16", "batch_size": 4, "num_workers": 0, "progress": False, **kw}
    return embed_to_shards(tiny["art"], tiny["root"], "test", out, **kw)


def _shard_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard_*.npy"))}


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted extraction, to compare resumed ones against."""
    out = tmp_path_factory.mktemp("ref") / "emb_test"
    summary = _embed(tiny, out)
    return dict(path=out, summary=summary, bytes=_shard_bytes(out))


# --------------------------------------------------------------------------- the store
def test_store_round_trip_blocks_take_and_float16_rounding(tmp_path):
    rng = np.random.default_rng(0)
    x = _unit(rng, 103, 24)
    ids = [f"id{i:04d}" for i in range(103)]
    ok = np.ones(103, bool)
    ok[[5, 77]] = False
    store = save_store(tmp_path / "s32", ids, x, dtype="float32", shard_size=10, ok=ok)
    assert store.num_shards == 11 and store.shape == (103, 24) and store.ids == ids
    assert np.array_equal(store.to_array(), x)
    assert [a for a, _ in store.blocks()] == list(range(0, 103, 10))
    rows = rng.integers(0, 103, size=(7, 3))
    assert np.array_equal(store.take(rows), x[rows])
    assert list(np.flatnonzero(~store.ok)) == [5, 77] and set(store.failed) == {"id0005", "id0077"}
    s16 = save_store(tmp_path / "s16", ids, x, dtype="float16", shard_size=64)
    assert s16.shard(0).dtype == np.float16 and (tmp_path / "s16" / "shard_00000.npy").stat().st_size < 64 * 24 * 3
    assert np.abs(s16.to_array() - x).max() < 1e-3
    assert open_embeddings(tmp_path / "s16")[0] == ids
    with pytest.raises(InputError, match="not found"):
        ShardedEmbeddings.open(tmp_path / "nowhere")
    with pytest.raises(InputError, match="already here"):
        save_store(tmp_path / "s16", ids, x)


def test_a_store_refuses_bad_ids_and_a_foreign_folder(tmp_path):
    with pytest.raises(InputError, match="duplicate id 'b'"):
        create_store(tmp_path / "a", ["a", "b", "c", "b"], 4)
    with pytest.raises(InputError, match="line breaks"):
        create_store(tmp_path / "a", ["a", "b\nc"], 4)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an embedding store"):
        create_store(tmp_path / "foreign", ["a"], 4)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_opening_names_missing_shards_and_a_tampered_ids_file(tmp_path):
    rng = np.random.default_rng(1)
    ids = [str(i) for i in range(30)]
    save_store(tmp_path / "s", ids, _unit(rng, 30, 8), shard_size=10)
    (tmp_path / "s" / "shard_00001.json").unlink()
    with pytest.raises(InputError, match=r"1 of 3 shards are not written \(shard_00001\)"):
        ShardedEmbeddings.open(tmp_path / "s")
    (tmp_path / "s" / "ids.txt").write_text("\n".join(ids[::-1]) + "\n")
    with pytest.raises(InputError, match="ids.txt: the ids file does not match"):
        ShardedEmbeddings.open(tmp_path / "s")


# --------------------------------------------------------------------------- streamed search and αQE/DBA
@pytest.mark.parametrize("backend", ["numpy", "torch", "faiss"])
def test_knn_over_a_store_equals_knn_in_memory(tmp_path, backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    db, q = _unit(rng, 157, 32), _unit(rng, 41, 32)
    store = save_store(tmp_path / "db", [f"d{i}" for i in range(157)], db, dtype="float32", shard_size=20)
    S0, I0 = knn(q, db, 12, backend=backend)
    S1, I1 = knn(q, store, 12, backend=backend)
    S2, I2 = knn(ArrayRows(q, block_rows=7), store, 12, backend=backend)
    assert np.array_equal(I0, I1) and np.array_equal(I0, I2)
    np.testing.assert_allclose(S1, S0, atol=1e-6)
    np.testing.assert_allclose(S2, S0, atol=1e-6)
    # rows flagged unreadable are never returned: the result is the search over the others
    ok = np.ones(157, bool)
    ok[[0, 3, 50, 51, 156]] = False
    masked = save_store(tmp_path / "masked", [f"d{i}" for i in range(157)], db, dtype="float32", shard_size=20,
                        ok=ok)
    S3, I3 = knn(q, masked, 12, backend=backend)
    keep = np.flatnonzero(ok)
    S4, I4 = knn(q, db[keep], 12, backend=backend)
    assert np.array_equal(I3, keep[I4]) and not np.isin(I3, np.flatnonzero(~ok)).any()


def test_qe_dba_and_alpha_dba_on_a_store_equal_the_in_memory_ones(tmp_path):
    rng = np.random.default_rng(3)
    db, q = _unit(rng, 95, 16), _unit(rng, 23, 16)
    ids = [f"d{i}" for i in range(95)]
    store = save_store(tmp_path / "db", ids, db, dtype="float32", shard_size=13)
    q0, db0 = qe_dba_joint(q, db, k=4, alpha=3.0, qe=True, dba=True, backend="numpy")
    q1, db1 = qe_dba_joint(q, store, k=4, alpha=3.0, qe=True, dba=True, backend="numpy", out=tmp_path / "dba")
    assert isinstance(db1, ShardedEmbeddings) and db1.ids == ids and db1.shard_size == 13
    assert db1.info["postprocess"] == ["joint qe/dba k=4"]
    np.testing.assert_allclose(q1, q0, atol=1e-6)
    np.testing.assert_allclose(db1.to_array(), db0, atol=1e-6)
    q2, db2 = qe_dba_joint(q, store, k=4, alpha=3.0, qe=True, dba=True, backend="numpy")  # no out: in memory
    np.testing.assert_allclose(db2, db0, atol=1e-6)
    d0 = alpha_dba(db, n=5, alpha=2.0, backend="numpy")
    d1 = alpha_dba(store, n=5, alpha=2.0, backend="numpy", out=tmp_path / "adba")
    np.testing.assert_allclose(d1.to_array(), d0, atol=1e-6)
    np.testing.assert_allclose(alpha_qe(q, d1, n=3, backend="numpy"), alpha_qe(q, d0, n=3, backend="numpy"),
                               atol=1e-6)
    with pytest.raises(ValueError, match="sharded store"):
        alpha_dba(db, n=2, out=tmp_path / "x")


# --------------------------------------------------------------------------- extraction
def test_extraction_records_unreadable_images_and_keeps_going(tiny, reference, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(tiny["root"], root)
    gld = GLDv2Root.open(root)
    ids = gld.test_ids()
    bad = ids[::20]  # 5 %
    for j, i in enumerate(bad):
        p = gld.path("test", i)
        p.write_bytes(b"garbage" if j % 2 else p.read_bytes()[:60])  # garbage, or a truncated JPEG
    summary = embed_to_shards(tiny["art"], root, "test", tmp_path / "emb", shard_size=8, batch_size=4,
                              num_workers=0, progress=False)
    assert summary["unreadable"] == len(bad) and summary["computed"] == summary["shards"]
    store = ShardedEmbeddings.open(tmp_path / "emb")
    assert set(store.failed) == set(bad) and int((~store.ok).sum()) == len(bad)
    assert not store.take(np.flatnonzero(~store.ok)).any()
    good = store.ok
    ref = ShardedEmbeddings.open(reference["path"])
    assert np.array_equal(store.to_array()[good], ref.to_array()[good])  # the others are untouched
    S, I = knn(ref.to_array()[:30], store, 10, backend="numpy")
    assert not np.isin(I, np.flatnonzero(~good)).any()


KILLER = textwrap.dedent("""
    import os, signal, sys
    import glr.predict as sharded
    import glr.embeddings.store as shards
    calls = []
    real = shards._save_npy
    def dying(path, array):
        calls.append(path)
        if len(calls) == 3:  # the third shard: half its bytes in the temporary file, then SIGKILL
            from glr.utils import atomic_write
            with atomic_write(path, "wb") as f:
                f.write(b"\\x93NUMPY" + b"\\0" * 40)
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        real(path, array)
    shards._save_npy = dying
    sharded.embed_to_shards(sys.argv[1], sys.argv[2], "test", sys.argv[3], shard_size=8, dtype="float16",
                            batch_size=4, num_workers=0, progress=False)
""")


def test_a_killed_extraction_resumes_and_equals_an_uninterrupted_run(tiny, reference, tmp_path, capsys):
    out = tmp_path / "emb_test"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tiny["art"]), str(tiny["root"]), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed by SIGKILL, mid-write
    done = sorted(p.name for p in out.glob("shard_*.json"))
    assert done == ["shard_00000.json", "shard_00001.json"] and list(out.glob(".*.tmp"))  # a temp left behind
    with pytest.raises(InputError, match="shards are not written"):
        ShardedEmbeddings.open(out)
    before = {n: (out / n).stat().st_mtime_ns for n in ("shard_00000.npy", "shard_00001.npy")}
    assert main(["embed", "--shards", "--model", str(tiny["art"]), "--data", str(tiny["root"]), "--split", "test",
                 "--out", str(out), "--shard-size", "8", "--batch-size", "4", "--num-workers", "0"]) == 0
    total = reference["summary"]["shards"]
    assert f"{total - 2} shards computed, 2 already there" in capsys.readouterr().out
    assert {n: (out / n).stat().st_mtime_ns for n in before} == before  # the finished shards were not redone
    assert not list(out.glob(".*.tmp"))
    assert _shard_bytes(out) == reference["bytes"]  # bit for bit the uninterrupted run
    ids, store = open_embeddings(out)
    assert ids == tiny["ids"] and store.ok.all()


def test_a_full_disk_keeps_the_written_shards_and_the_rerun_completes(tiny, reference, tmp_path, monkeypatch):
    import glr.utils

    real, calls = os.fsync, []

    def full(fd):
        calls.append(fd)
        if len(calls) == 7:  # ids.txt, manifest.json, shards 0 and 1 (.npy, .json), then no space
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    out = tmp_path / "emb"
    monkeypatch.setattr(glr.utils.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        _embed(tiny, out)
    monkeypatch.setattr(glr.utils.os, "fsync", real)
    assert sorted(p.name for p in out.glob("shard_*.json")) == ["shard_00000.json", "shard_00001.json"]
    assert not list(out.glob(".*.tmp")) and not (out / "shard_00002.npy").exists()  # nothing half-written
    assert _embed(tiny, out)["present"] == 2
    assert _shard_bytes(out) == reference["bytes"]


def test_corrupt_shards_are_recomputed_and_another_job_is_refused(tiny, reference, tmp_path, caplog):
    import shutil

    out = tmp_path / "emb"
    shutil.copytree(reference["path"], out)
    (out / "shard_00001.npy").write_bytes((out / "shard_00001.npy").read_bytes()[:100])  # truncated on disk
    (out / "shard_00002.json").write_text("{not json")
    summary = _embed(tiny, out)
    assert summary["computed"] == 2 and summary["present"] == reference["summary"]["shards"] - 2
    assert "shard_00001 is unreadable" in caplog.text and "shard_00002 is unreadable" in caplog.text
    assert _shard_bytes(out) == reference["bytes"]
    with pytest.raises(InputError, match="another job: info is"):
        _embed(tiny, out, image_size=40)
    with pytest.raises(InputError, match="another job: dtype"):
        _embed(tiny, out, dtype="float32")
    assert _shard_bytes(out) == reference["bytes"]  # the refusals touched nothing


def test_workers_write_disjoint_shards_and_together_equal_one(tiny, reference, tmp_path):
    out = tmp_path / "emb"
    first = _embed(tiny, out, rank=1, world=2)
    n = reference["summary"]["shards"]
    assert first["computed"] == n // 2 and first["missing"] == n - n // 2
    assert sorted(int(p.stem[-5:]) for p in out.glob("shard_*.json")) == list(range(1, n, 2))
    second = _embed(tiny, out, rank=0, world=2)
    assert second["computed"] == n - n // 2 and second["missing"] == 0
    assert _shard_bytes(out) == reference["bytes"]


def test_extract_shards_checks_what_the_embedder_returns(tmp_path):
    def wrong(chunk):
        return np.zeros((len(chunk), 3), np.float32), np.ones(len(chunk), bool)

    with pytest.raises(ValueError, match="returned"):
        extract_shards(wrong, ["a", "b"], tmp_path / "s", dim=4, progress=False)
    assert not list((tmp_path / "s").glob("shard_*"))
    with open(tmp_path / "s" / "manifest.json") as f:
        assert json.load(f)["rows"] == 2


# --------------------------------------------------------------------------- glr search
def test_glr_search_over_stores_equals_the_in_memory_search(tiny, reference, tmp_path, capsys):
    from glr.embeddings.npz import save_embeddings
    from glr.postprocess.expansion import qe_dba_joint as joint
    from glr.submission import read_submission, retrieval_rows, validate_submission_file

    index = tmp_path / "emb_index"
    embed_to_shards(tiny["art"], tiny["root"], "index", index, shard_size=5, dtype="float32", batch_size=4,
                    num_workers=0, progress=False)
    q_store, db_store = ShardedEmbeddings.open(reference["path"]), ShardedEmbeddings.open(index)
    q, db = q_store.to_array(), db_store.to_array()
    out = tmp_path / "sub.csv"
    args = ["search", "--query", str(reference["path"]), "--index", str(index), "--out", str(out), "--k", "5",
            "--backend", "numpy"]
    assert main(args) == 0
    assert "49 queries against 12 index images" in capsys.readouterr().out
    want = retrieval_rows(q_store.ids, db_store.ids, knn(q, db, 5, backend="numpy")[1])
    assert read_submission(out, "retrieval") == want
    # with joint αQE+DBA: the expanded index is written as a store in --work, never loaded whole
    assert main(args + ["--qe-dba", "3", "2", "--work", str(tmp_path / "work")]) == 0
    q2, db2 = joint(q, db, k=3, alpha=2.0, qe=True, dba=True, backend="numpy")
    assert read_submission(out, "retrieval") == retrieval_rows(q_store.ids, db_store.ids,
                                                               knn(q2, db2, 5, backend="numpy")[1])
    assert ShardedEmbeddings.open(tmp_path / "work" / "index_qe_dba").info["postprocess"] == ["joint qe/dba k=3"]
    validate_submission_file(out, "retrieval", expected_ids=q_store.ids, index_ids=set(db_store.ids))
    # a failing search (embeddings of another model) leaves the earlier submission whole
    before = out.read_bytes()
    other = tmp_path / "other.npz"
    save_embeddings(other, db_store.ids, np.ones((12, 8), np.float32) / np.sqrt(8))
    assert main(["search", "--query", str(reference["path"]), "--index", str(other), "--out", str(out)]) == 2
    assert "16-d, index embeddings 8-d" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_glr_search_runs_the_post_processing_chain_of_glr_cv(tiny, reference, tmp_path, capsys):
    """``glr search --post`` on .npz embeddings is the chain ``glr cv`` and the kernel run (``glr.predict.rank``);
    a store index takes joint αQE+DBA only and says so in one line."""
    from glr.embeddings.npz import save_embeddings
    from glr.postprocess.chain import retrieve
    from glr.submission import read_submission, retrieval_rows

    index = tmp_path / "emb_index"
    embed_to_shards(tiny["art"], tiny["root"], "index", index, shard_size=5, dtype="float32", batch_size=4,
                    num_workers=0, progress=False)
    q_store, db_store = ShardedEmbeddings.open(reference["path"]), ShardedEmbeddings.open(index)
    q, db = q_store.to_array(), db_store.to_array()
    save_embeddings(tmp_path / "q.npz", q_store.ids, q)
    save_embeddings(tmp_path / "db.npz", db_store.ids, db)
    post = tmp_path / "post.yaml"
    post.write_text("postprocess:\n  expansion: {form: joint, k: 2, alpha: 3.0}\n  kreciprocal: {k1: 4, k2: 2, lambda: 0.3}\n")
    out = tmp_path / "sub.csv"
    assert main(["search", "--query", str(tmp_path / "q.npz"), "--index", str(tmp_path / "db.npz"), "--out", str(out),
                 "--k", "5", "--post", str(post)]) == 0
    config = {"expansion": {"form": "joint", "k": 2, "alpha": 3.0}, "kreciprocal": {"k1": 4, "k2": 2, "lambda": 0.3},
              "k": 5}
    want = retrieval_rows(q_store.ids, db_store.ids, retrieve(q, db, config)[1])
    assert read_submission(out, "retrieval") == want
    plain = retrieval_rows(q_store.ids, db_store.ids, knn(q, db, 5)[1])
    assert want != plain  # the chain really changed the ranking
    capsys.readouterr()
    assert main(["search", "--query", str(tmp_path / "q.npz"), "--index", str(index), "--out", str(out),
                 "--post", str(post)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "kreciprocal needs the embeddings in memory" in err
    assert read_submission(out, "retrieval") == want  # the earlier submission is whole


def test_glr_search_gives_unreadable_queries_empty_rows(tiny, tmp_path):
    import shutil

    from glr.submission import read_submission

    root = tmp_path / "root"
    shutil.copytree(tiny["root"], root)
    gld = GLDv2Root.open(root)
    bad_q, bad_db = gld.test_ids()[3], gld.index_ids()[2]
    gld.path("test", bad_q).write_bytes(b"")
    gld.path("index", bad_db).write_bytes(b"\xff\xd8 truncated")
    for split, size in (("test", 8), ("index", 5)):
        embed_to_shards(tiny["art"], root, split, tmp_path / f"emb_{split}", shard_size=size, batch_size=4,
                        num_workers=0, progress=False)
    out = tmp_path / "sub.csv"
    assert main(["search", "--query", str(tmp_path / "emb_test"), "--index", str(tmp_path / "emb_index"),
                 "--out", str(out), "--k", "20"]) == 0
    rows = dict(read_submission(out, "retrieval"))
    assert rows[bad_q] == "" and sum(not v for v in rows.values()) == 1 and len(rows) == 49
    assert all(bad_db not in v.split() and len(v.split()) == 11 for k, v in rows.items() if k != bad_q)
