"""Fault injection (issue 7): 5 % corrupt or truncated images, a missing image folder, an empty
test set and a full disk (a failing write), for the Kaggle kernel's runtime and for ``glr cv``.
Both keep going where they can, report counts, and leave a valid ``submission.csv`` and intact
earlier outputs. (A killed extraction is tested with the sharded extraction.)"""

import contextlib
import errno
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import glr.submission
import glr.utils
from glr.cli import main
from glr.data.images import IMAGENET_MEAN, IMAGENET_STD
from glr.data.root import GLDv2Root
from glr.kaggle.kernel import runtime
from glr.kaggle.kernel.build import build_kernel, read_kernel
from glr.kaggle.kernel.local import layout_inputs
from glr.model.net import build_net
from glr.model.artifact import save_artifact
from glr.submission import read_submission, validate_submission_file

#: The kernel test's chain: query expansion, k-reciprocal and landmark–country (which needs the train set).
POST = {"expansion": {"form": "joint", "k": 3, "alpha": 1.0},
        "kreciprocal": {"k1": 6, "k2": 2, "lambda": 0.3},
        "landmark_country": {"alpha": 0.5, "beta": 0.1, "k": 3}, "shortlist": 30}
OUTPUTS = ("submission.csv", "submission_recognition.csv", "cv.json", "postprocess.yaml",
           "emb_test.npz", "emb_index.npz", "emb_train.npz")
ATOMIC_WRITE = glr.utils.atomic_write  # the real one, whatever a test patches


def _corrupt(gld, split, ids, fraction=0.05):
    """Spoil ``fraction`` of ``ids`` (at least two), evenly spaced through the list: alternately
    garbage bytes and a JPEG cut off in the middle of its scan data. Returns the spoiled ids."""
    n = max(2, round(fraction * len(ids)))
    picked = [ids[(2 * j + 1) * len(ids) // (2 * n)] for j in range(n)]
    rng = np.random.default_rng(7)
    for j, i in enumerate(picked):
        p = gld.path(split, i)
        data = p.read_bytes()
        if j % 2 == 0:
            p.write_bytes(rng.integers(0, 256, len(data), dtype=np.uint8).tobytes())
        else:
            sos = data.index(b"\xff\xda")  # start of scan: headers whole, entropy-coded data cut
            p.write_bytes(data[: sos + (len(data) - sos) // 2])
        with pytest.raises(OSError):  # really unreadable
            with Image.open(p) as im:
                im.load()
    return picked


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """A synthetic root with 5 % of its test, index and (clean) train images spoilt, and an
    ensemble of two untrained tiny nets."""
    from glr.data.synth import make_synthetic_gldv2

    tmp = tmp_path_factory.mktemp("faults")
    root = tmp / "root"
    make_synthetic_gldv2(root, n_landmarks=12, scale=0.6, image_size=32, progress=False)
    gld = GLDv2Root.open(root)
    ids = {"test": gld.test_ids(), "index": gld.index_ids(),
           "train": [i for i, _ in gld.train_ids_labels("clean")]}
    assert min(map(len, ids.values())) >= 40  # 5 % is at least two images of each split
    bad = {s: _corrupt(gld, s, v) for s, v in ids.items()}
    arts = []
    for i, backbone in enumerate(("test_resnet", "test_efficientnet")):
        torch.manual_seed(i)
        net = build_net(dict(backbone=backbone, embedding_size=16)).eval()
        arts.append(save_artifact(tmp / f"m{i}.pt", net, {"image_size": 32 + 8 * i, "mean": list(IMAGENET_MEAN),
                                                          "std": list(IMAGENET_STD)}))
    ens = tmp / "ensemble.yaml"
    ens.write_text(f"members:\n  - artifact: {arts[0]}\n  - artifact: {arts[1]}\n    weight: 0.5\n")
    post = tmp / "post.yaml"
    post.write_text(yaml.safe_dump(POST))
    return dict(root=root, ids=ids, bad=bad, arts=[str(a) for a in arts], ensemble=ens, post=post, tmp=tmp)


@pytest.fixture(scope="module")
def kernel(faulty):
    """The kernel built from ``faulty``'s ensemble and the chain."""
    return build_kernel(faulty["ensemble"], faulty["tmp"] / "kernel", "me/glr-faults-kernel", "me/glr-faults-weights",
                        post=POST, batch_size=64, num_workers=0, progress=False)


def _view(faulty, tmp, drop=(), **files):
    """A root of symlinks to ``faulty``'s entries, without ``drop``; ``files`` (name → text) written in."""
    view = tmp / "view"
    view.mkdir()
    for entry in faulty["root"].iterdir():
        if entry.name not in drop and entry.name not in files:
            os.symlink(entry, view / entry.name)
    for name, text in files.items():
        (view / name).write_text(text)
    return view


def _small_view(faulty, tmp, n_test):
    """:func:`_view` with only the first ``n_test`` test images (readable ones first)."""
    bad = set(faulty["bad"]["test"])
    ids = sorted(faulty["ids"]["test"], key=lambda i: i in bad)[:n_test]
    view = _view(faulty, tmp, drop=("test",), **{"test.csv": "id\n" + "".join(f"{i}\n" for i in ids)})
    gld = GLDv2Root.open(faulty["root"])
    for i in ids:
        link = GLDv2Root.open(view).path("test", i)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(gld.path("test", i), link)
    return view, ids


def _kaggle(tmp, root, kernel):
    _, settings, _ = read_kernel(kernel)
    kaggle = tmp / "kaggle"
    layout_inputs(kaggle, "classic", root, kernel, settings)
    return kaggle, settings


def _cv_args(faulty, data, out, *extra):
    return ["cv", "--data", str(data), "--ensemble", str(faulty["ensemble"]), "--post", str(faulty["post"]),
            "--out", str(out), "--num-workers", "0", *extra]


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def _check_rows(faulty, rows, index_ids_ok=True):
    """Every test id once; spoilt queries empty, the others not; spoilt index images nowhere."""
    bad_q, bad_db = set(faulty["bad"]["test"]), set(faulty["bad"]["index"])
    assert sorted(i for i, _ in rows) == sorted(faulty["ids"]["test"])
    for qid, cell in rows:
        assert (cell == "") == (qid in bad_q), qid
        if index_ids_ok:
            assert not bad_db & set(cell.split()), qid


@pytest.fixture(scope="module")
def first_cv(faulty, tmp_path_factory):
    """A successful ``glr cv`` of the ensemble on the spoilt root: its folder and printed output."""
    out = tmp_path_factory.mktemp("cv") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(_cv_args(faulty, faulty["root"], out))
    return dict(out=out, rc=rc, printed=buf.getvalue(), files=_snapshot(out))


# --------------------------------------------------------------------------- corrupt images
def test_kernel_skips_five_percent_corrupt_images_and_counts_them(faulty, kernel, first_cv, tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    kaggle, settings = _kaggle(tmp_path, faulty["root"], kernel)
    assert runtime.main(settings, kaggle_root=kaggle) == 0
    report = json.loads((kaggle / "working" / runtime.REPORT).read_text())
    assert report["status"] == "ok", report.get("error")
    counts, bad = report["counts"], faulty["bad"]
    assert (counts["test_unreadable"], counts["index_unreadable"], counts["train_unreadable"]) == \
        (len(bad["test"]), len(bad["index"]), len(bad["train"])) == (12, 2, 6)
    sub = kaggle / "working" / "submission.csv"
    readable_index = set(faulty["ids"]["index"]) - set(bad["index"])
    validate_submission_file(sub, "retrieval", expected_ids=faulty["ids"]["test"], index_ids=readable_index)
    _check_rows(faulty, read_submission(sub, "retrieval"))
    assert sub.read_bytes() == first_cv["files"]["submission.csv"]  # glr cv skips them the same way


def test_cv_skips_corrupt_images_counts_them_and_reuses_its_embeddings(faulty, first_cv, tmp_path, capsys):
    assert first_cv["rc"] == 0 and set(OUTPUTS) <= set(first_cv["files"])  # what the other tests keep intact
    bad = faulty["bad"]
    assert "unreadable images skipped: 12 test, 2 index, 6 train" in first_cv["printed"]
    out = first_cv["out"]
    cvj = json.loads((out / "cv.json").read_text())
    assert cvj["unreadable"] == {"test": 12, "index": 2, "train": 6} == {s: len(v) for s, v in bad.items()}
    readable_index = set(faulty["ids"]["index"]) - set(bad["index"])
    validate_submission_file(out / "submission.csv", "retrieval", expected_ids=faulty["ids"]["test"],
                             index_ids=readable_index)
    _check_rows(faulty, read_submission(out / "submission.csv", "retrieval"))
    validate_submission_file(out / "submission_recognition.csv", "recognition", expected_ids=faulty["ids"]["test"])
    _check_rows(faulty, read_submission(out / "submission_recognition.csv", "recognition"), index_ids_ok=False)
    with np.load(out / "emb_index.npz") as z:  # spoilt images: zero rows, the others unit norm
        norms = dict(zip(z["ids"], np.linalg.norm(z["emb"], axis=1)))
    assert all((norms[i] == 0) == (i in bad["index"]) for i in faulty["ids"]["index"])
    # the embeddings reused: the zero rows are read back as unreadable, the same submission results
    o2 = tmp_path / "o2"
    assert main(["cv", "--data", str(faulty["root"]), "--embeddings", str(out), "--post", str(faulty["post"]),
                 "--out", str(o2), "--num-workers", "0"]) == 0
    assert json.loads((o2 / "cv.json").read_text())["unreadable"] == cvj["unreadable"]
    assert (o2 / "submission.csv").read_bytes() == (out / "submission.csv").read_bytes()


def test_cv_strict_images_fails_naming_the_image_and_keeps_earlier_outputs(faulty, first_cv, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(first_cv["out"], out)
    capsys.readouterr()
    assert main(_cv_args(faulty, faulty["root"], out, "--strict-images")) == 2
    err = capsys.readouterr().err
    first_bad = faulty["bad"]["test"][0]  # the test split is embedded first, in its listed order
    assert f"glr cv: error: {GLDv2Root.open(faulty['root']).path('test', first_bad)}: " \
           f"cannot read image '{first_bad}'" in err
    assert _snapshot(out) == first_cv["files"]


def test_ensemble_members_ok_masks_are_combined(faulty, monkeypatch):
    """An image that cannot be read is unreadable for the ensemble (its row zeroed); each image is
    decoded once for every member (one pass over the split)."""
    from glr import predict
    from glr.embeddings.extract import ViewEmbeddings

    calls = []

    def fake(branches, root, split, ids, **kw):
        calls.append((split, len(branches)))
        ok = np.ones(len(ids), bool)
        ok[[1, 2]] = False
        return ViewEmbeddings([np.ones((len(ids), 4), np.float32) for _ in branches], ok, len(ids))

    monkeypatch.setattr(predict, "embed_views", fake)
    ids = faulty["ids"]["index"][:10]
    emb, ok = predict.embed_ensemble([predict.MemberSpec(a) for a in faulty["arts"]], GLDv2Root.open(faulty["root"]).root,
                                     {"index": ids}, batch_size=8, num_workers=0, progress=False)
    assert calls == [("index", 2)]
    assert list(np.flatnonzero(~ok["index"])) == [1, 2]
    norms = np.linalg.norm(emb["index"], axis=1)
    assert np.all(norms[[1, 2]] == 0) and np.allclose(np.delete(norms, [1, 2]), 1)


# --------------------------------------------------------------------------- missing folders, empty test set
@pytest.mark.parametrize("split", ["index", "test"])
def test_cv_with_a_missing_image_folder_names_it_and_keeps_earlier_outputs(faulty, first_cv, tmp_path, capsys,
                                                                           split):
    view = _view(faulty, tmp_path, drop=(split,))
    out = tmp_path / "out"
    shutil.copytree(first_cv["out"], out)
    capsys.readouterr()
    assert main(_cv_args(faulty, view, out)) == 2
    err = capsys.readouterr().err
    assert f"{view / split}: image folder for split {split!r} not found" in err
    assert _snapshot(out) == first_cv["files"]


def test_cv_with_an_empty_test_set_is_an_error_and_keeps_earlier_outputs(faulty, first_cv, tmp_path, capsys):
    view = _view(faulty, tmp_path, **{"test.csv": "id\n"})
    out = tmp_path / "out"
    shutil.copytree(first_cv["out"], out)
    capsys.readouterr()
    assert main(_cv_args(faulty, view, out)) == 2
    assert f"{view / 'test.csv'}: no test images: nothing to evaluate" in capsys.readouterr().err
    assert _snapshot(out) == first_cv["files"]
    assert main(_cv_args(faulty, view, tmp_path / "fresh")) == 2
    assert not (tmp_path / "fresh").exists()  # nothing created either


@pytest.mark.parametrize("sample", [True, False])
def test_kernel_with_an_empty_test_set_writes_a_header_only_submission(faulty, kernel, tmp_path, monkeypatch, sample):
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    view = _view(faulty, tmp_path, drop=("test", "test.csv"),
                 **({"sample_submission.csv": "id,images\n"} if sample else {}))
    (view / "test").mkdir()  # the folder is there, with no image
    kaggle, settings = _kaggle(tmp_path, view, kernel)
    assert runtime.main(settings, kaggle_root=kaggle) == 0
    assert (kaggle / "working" / "submission.csv").read_text() == "id,images\n"
    validate_submission_file(kaggle / "working" / "submission.csv", "retrieval", expected_ids=[])
    report = json.loads((kaggle / "working" / runtime.REPORT).read_text())
    assert report["status"] == "fallback" and report["reason"] == "no test images" and report["counts"]["test"] == 0
    assert report["phase"] == ("commit" if sample else "local")
    assert not any(r["step"].startswith("embed") for r in report["timing"])


# --------------------------------------------------------------------------- a full disk
def _full_disk(monkeypatch, names, allow=0):
    """Writes of files called one of ``names`` through :func:`glr.utils.atomic_write` fail with
    ENOSPC after a partial write, except the first ``allow`` of them. Returns a list that
    gets one entry per failed write."""
    real = ATOMIC_WRITE
    seen, failed = [], []

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, s):  # half of it fits
            self.f.write(s[: len(s) // 2])
            self.f.flush()
            failed.append(1)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    @contextlib.contextmanager
    def atomic_write(path, mode="w", **kwargs):
        with real(path, mode, **kwargs) as f:
            if Path(path).name in names:
                seen.append(path)
                if len(seen) > allow:
                    f = Full(f)
            yield f

    monkeypatch.setattr(glr.utils, "atomic_write", atomic_write)
    monkeypatch.setattr(glr.submission, "atomic_write", atomic_write)
    return failed


def _temporaries(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


def test_cv_on_a_full_disk_fails_clearly_and_keeps_the_first_runs_outputs(faulty, first_cv, tmp_path, monkeypatch,
                                                                        capsys):
    out = tmp_path / "out"
    shutil.copytree(first_cv["out"], out)
    failed = _full_disk(monkeypatch, {"submission.csv"})
    capsys.readouterr()
    assert main(_cv_args(faulty, faulty["root"], out)) == 1
    err = capsys.readouterr().err
    assert failed and "glr cv: error: [Errno 28] No space left on device" in err and "whole" in err
    now = _snapshot(out)
    for name in ("submission.csv", "cv.json", "submission_recognition.csv"):
        assert now[name] == first_cv["files"][name], name
    assert _temporaries(out) == []


def test_kernel_on_a_full_disk_keeps_the_fallback(faulty, kernel, tmp_path, monkeypatch):
    view, test_ids = _small_view(faulty, tmp_path, 20)  # four runs: a small test set
    kaggle, settings = _kaggle(tmp_path, view, kernel)
    working = kaggle / "working"
    settings = {**settings, "postprocess": {}}  # plain kNN: the failure is in the write, not the chain
    fallback_rows = [(i, "") for i in test_ids]

    def check_fallback():
        sub = working / "submission.csv"
        validate_submission_file(sub, "retrieval", expected_ids=test_ids)
        assert sorted(read_submission(sub, "retrieval")) == sorted(fallback_rows)
        assert _temporaries(working) == []

    # the fallback is written, the real submission is not: exit 1 in the commit / local run …
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    failed = _full_disk(monkeypatch, {"submission.csv"}, allow=1)
    assert runtime.main(settings, kaggle_root=kaggle) == 1
    assert len(failed) == 1
    check_fallback()
    report = json.loads((working / runtime.REPORT).read_text())
    assert report["status"] == "fallback" and "No space left on device" in report["error"]
    assert report["counts"]["test"] == len(test_ids) == 20
    # … 0 in the rerun, where the fallback still scores
    monkeypatch.setenv("KAGGLE_IS_COMPETITION_RERUN", "1")
    _full_disk(monkeypatch, {"submission.csv"}, allow=1)
    assert runtime.main(settings, kaggle_root=kaggle) == 0
    check_fallback()
    assert json.loads((working / runtime.REPORT).read_text())["phase"] == "rerun"
    # the report cannot be written either: logged, no crash, no partial files
    (working / runtime.REPORT).unlink()
    failed = _full_disk(monkeypatch, {"submission.csv", runtime.REPORT}, allow=1)
    assert runtime.main(settings, kaggle_root=kaggle) == 0
    assert len(failed) == 2 and not (working / runtime.REPORT).exists()
    check_fallback()
    # not even the fallback can be written: no submission stands, so exit 1 in the rerun too
    (working / "submission.csv").unlink()
    failed = _full_disk(monkeypatch, {"submission.csv"})
    assert runtime.main(settings, kaggle_root=kaggle) == 1
    assert len(failed) == 2 and not (working / "submission.csv").exists() and _temporaries(working) == []
    report = json.loads((working / runtime.REPORT).read_text())
    assert report["status"] == "failed" and "No space left on device" in report["error"]
