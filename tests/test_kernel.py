"""The Kaggle kernel: built from the package's modules, run without glr, parity, faults, wheels."""

import base64
import csv
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile

import numpy as np
import pytest
import torch

from glr.cli import main
from glr.data.images import IMAGENET_MEAN, IMAGENET_STD
from glr.data.root import GLDv2Root
from glr.kaggle.kernel import runtime
from glr.kaggle.kernel.build import bundle_modules, build_kernel, read_kernel, render_script
from glr.kaggle.kernel.local import fresh_python, run_local
from glr.kaggle.kernel.wheels import collect_wheels
from glr.model.net import build_net
from glr.model.artifact import save_artifact
from glr.submission import read_submission, validate_submission_file
from glr.utils import InputError

POST = {"expansion": {"form": "joint", "k": 3, "alpha": 1.0},
        "kreciprocal": {"k1": 6, "k2": 2, "lambda": 0.3},
        "landmark_country": {"alpha": 0.5, "beta": 0.1, "k": 3}, "shortlist": 30}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny synthetic root, an ensemble of two untrained tiny nets and the kernel built from it."""
    from glr.data.synth import make_synthetic_gldv2

    tmp = tmp_path_factory.mktemp("kernel")
    root = tmp / "root"
    make_synthetic_gldv2(root, n_landmarks=12, scale=0.12, image_size=32, progress=False)
    arts = []
    for i, backbone in enumerate(("test_resnet", "test_efficientnet")):
        torch.manual_seed(i)
        net = build_net(dict(backbone=backbone, embedding_size=16)).eval()
        arts.append(save_artifact(tmp / f"m{i}.pt", net, {"image_size": 32 + 8 * i, "mean": list(IMAGENET_MEAN),
                                                          "std": list(IMAGENET_STD)},
                                  meta={"experiment": f"exp{i}", "stage": "s1"}))
    ens = tmp / "ensemble.yaml"
    ens.write_text(f"members:\n  - artifact: {arts[0]}\n  - artifact: {arts[1]}\n    weight: 0.5\n")
    kernel = build_kernel(ens, tmp / "kernels" / "tiny", "me/glr-tiny-kernel", "me/glr-tiny-weights",
                          post=POST, wheels_dataset="me/glr-tiny-wheels", hidden_test_size=1000,
                          batch_size=16, num_workers=0, progress=False)
    return dict(root=root, kernel=kernel, ensemble=ens, tmp=tmp, arts=arts)


def _kaggle(tmp, root, kernel, layout="classic"):
    from glr.kaggle.kernel.local import layout_inputs

    _, settings, _ = read_kernel(kernel)
    kaggle = tmp / layout / "kaggle"
    layout_inputs(kaggle, layout, root, kernel, settings)
    return kaggle, settings


# --------------------------------------------------------------------------- build
def test_build_writes_metadata_with_internet_off_and_a_self_contained_script(built):
    kernel = built["kernel"]
    meta, settings, script = read_kernel(kernel)
    assert meta["enable_internet"] is False and meta["enable_gpu"] is True
    assert meta["competition_sources"] == ["landmark-retrieval-2021"]
    assert meta["dataset_sources"] == ["me/glr-tiny-weights", "me/glr-tiny-wheels"]
    assert meta["kernel_type"] == "script" and meta["code_file"] == script.name == "glr-tiny-kernel.py"
    assert [m["weight"] for m in settings["members"]] == [1.0, 0.5]
    assert [m["image_size"] for m in settings["members"]] == [32, 40]
    assert all((kernel / "weights" / m["file"]).is_file() for m in settings["members"])
    assert json.loads((kernel / "weights" / "dataset-metadata.json").read_text())["id"] == "me/glr-tiny-weights"
    # what glr submit checks before sending anything accepts both folders as built
    from glr.kaggle.client import read_dataset_folder, read_kernel_folder

    assert read_kernel_folder(kernel)["enable_internet"] is False
    assert read_dataset_folder(kernel / "weights")["id"] == "me/glr-tiny-weights"
    text = script.read_text()
    # the embedded zip holds the package's own sources, byte for byte, and nothing of Lightning
    blob = base64.b64decode("".join(re.findall(r'^    "([A-Za-z0-9+/=]+)"$', text, re.M)))
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        names = set(z.namelist())
        assert {"glr/kaggle/kernel/runtime.py", "glr/model/net.py", "glr/postprocess/chain.py"} <= names
        assert "glr/train/module.py" not in names and "glr/train/export.py" not in names and "glr/cli/__init__.py" not in names
        import glr.model.net

        assert z.read("glr/model/net.py") == open(glr.model.net.__file__, "rb").read()
        assert not any(re.search(r"^\s*(import|from) (pytorch_)?lightning", z.read(n).decode(), re.M) for n in names)


def test_build_is_reproducible_and_refuses_to_clobber(built, tmp_path):
    _, settings, script = read_kernel(built["kernel"])
    assert render_script(settings) == script.read_text()  # same sources and settings, same bytes
    with pytest.raises(InputError, match="not empty"):
        build_kernel(built["ensemble"], built["kernel"], "me/glr-tiny-kernel", "me/glr-tiny-weights")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    with pytest.raises(InputError, match="not a previous build"):
        build_kernel(built["ensemble"], other, "me/glr-tiny-kernel", "me/glr-tiny-weights", overwrite=True)
    assert (other / "todo.txt").read_text() == "mine"
    with pytest.raises(InputError, match="does not turn into the slug"):
        build_kernel(built["ensemble"], tmp_path / "k", "me/glr-tiny-kernel", "me/glr-tiny-weights",
                     title="Something else")
    assert not (tmp_path / "k").exists() and not list(tmp_path.glob(".k.*"))  # nothing half-written


def test_bundle_refuses_a_module_that_imports_lightning():
    assert "glr.kaggle.kernel.runtime" in bundle_modules() and "glr.train.module" not in bundle_modules()
    with pytest.raises(InputError, match="lightning"):
        bundle_modules("glr.train.module")


def test_cli_build_reports_a_bad_ensemble_with_its_file(tmp_path, capsys):
    bad = tmp_path / "ens.yaml"
    bad.write_text("members: []\n")
    assert main(["kernel", "build", "--ensemble", str(bad), "--out", str(tmp_path / "k"), "--kernel-id",
                 "me/glr-x-kernel", "--weights-dataset", "me/glr-x-weights"]) == 2
    err = capsys.readouterr().err
    assert "ens.yaml" in err and "members" in err


# --------------------------------------------------------------------------- runtime pieces
def test_find_inputs_both_layouts_and_a_marker_search(built, tmp_path):
    for layout in ("classic", "nested"):
        kaggle, settings = _kaggle(tmp_path, built["root"], built["kernel"], layout)
        got = runtime.find_inputs(kaggle / "input", settings)
        assert got.competition.resolve() == built["root"].resolve()
        assert got.weights.resolve() == (built["kernel"] / "weights").resolve()
        assert layout in got.layout
    # a dataset mounted under an unexpected name is still found by what it holds
    odd = tmp_path / "odd" / "input"
    (odd / "x" / "y").mkdir(parents=True)
    os.symlink(built["kernel"] / "weights", odd / "x" / "y" / "renamed")
    _, settings, _ = read_kernel(built["kernel"])
    got = runtime.find_inputs(odd, settings)
    assert got.weights == odd / "x" / "y" / "renamed" and got.competition is None and "found at" in got.layout


def test_projection_scales_each_step_by_its_own_count():
    t = runtime.StepTimer(rows=[("embed test", 10.0, "test"), ("embed index", 4.0, "index"), ("load", 1.0, None)])
    rows = t.projection({"test": 100, "index": 50}, {"test": 1000, "index": None})
    assert [r["projected_seconds"] for r in rows] == [100.0, 4.0, 1.0]
    text = runtime.format_projection(rows, {"test": 100}, {"test": 1000})
    assert "test 100 → 1000" in text and "1.8 min" in text  # (100 + 4 + 1) s


def _write_sample(root, ids, cell=""):
    with open(root / "sample_submission.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "images"])
        w.writerows((i, cell) for i in ids)


def test_commit_run_with_fallback_mode_writes_the_sample_and_stops(built, tmp_path, monkeypatch):
    root = tmp_path / "comp"
    shutil.copytree(built["root"], root, symlinks=True)
    test_ids = GLDv2Root.open(root).test_ids()
    index_one = GLDv2Root.open(root).index_ids()[0]
    _write_sample(root, test_ids, index_one)
    kaggle, settings = _kaggle(tmp_path, root, built["kernel"])
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    assert runtime.main({**settings, "commit_mode": "fallback"}, kaggle_root=kaggle) == 0
    report = json.loads((kaggle / "working" / runtime.REPORT).read_text())
    assert report["phase"] == "commit" and report["status"] == "fallback"
    rows = read_submission(kaggle / "working" / "submission.csv", "retrieval")
    assert sorted(rows) == sorted((i, index_one) for i in test_ids)
    assert not any(r["step"].startswith("embed") for r in report["timing"])


def test_a_failure_after_the_fallback_keeps_it(built, tmp_path, monkeypatch):
    kaggle, settings = _kaggle(tmp_path, built["root"], built["kernel"])
    settings = {**settings, "weights_dataset": "me/no-such-weights", "members": [{"file": "gone.pt"}]}
    test_ids = GLDv2Root.open(built["root"]).test_ids()
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    assert runtime.main(settings, kaggle_root=kaggle) == 1  # a commit that fails shows as failed
    sub = kaggle / "working" / "submission.csv"
    validate_submission_file(sub, "retrieval", expected_ids=test_ids)
    report = json.loads((kaggle / "working" / runtime.REPORT).read_text())
    assert report["status"] == "fallback" and "weights dataset not found" in report["error"]
    monkeypatch.setenv("KAGGLE_IS_COMPETITION_RERUN", "1")
    assert runtime.main(settings, kaggle_root=kaggle) == 0  # the hidden run still scores the fallback
    assert json.loads((kaggle / "working" / runtime.REPORT).read_text())["phase"] == "rerun"
    validate_submission_file(sub, "retrieval", expected_ids=test_ids)


def test_wheels_are_collected_offline_and_installed_by_the_kernel(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    name = "glrwheeltestpkg"
    whl = src / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{name}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{name}-0.1.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        z.writestr(f"{name}-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n")
        z.writestr(f"{name}-0.1.dist-info/RECORD", "")
    out = tmp_path / "wheels"
    got = collect_wheels(out, "me/glr-test-wheels", [name], find_links=[src], no_index=True)
    assert [w.name for w in got] == [whl.name]
    assert json.loads((out / "dataset-metadata.json").read_text())["id"] == "me/glr-test-wheels"
    from glr.kaggle.client import read_dataset_folder

    assert read_dataset_folder(out)["id"] == "me/glr-test-wheels"  # glr submit dataset would accept it
    with pytest.raises(InputError, match="pip download failed"):
        collect_wheels(tmp_path / "w2", "me/glr-test-wheels", ["nosuchpkg-glr"], find_links=[src], no_index=True)
    assert not (tmp_path / "w2").exists()
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the kernel installs the wheels
    assert runtime.ensure_modules([name], None) == [name]  # no wheels dataset: reported missing
    assert runtime.ensure_modules([name], out) == []
    import importlib

    assert importlib.import_module(name).VALUE == 42
    sys.modules.pop(name, None)


# --------------------------------------------------------------------------- the script, run for real
@pytest.mark.slow
def test_kernel_runs_without_glr_in_both_layouts_and_equals_the_library(built, tmp_path):
    probe = fresh_python(["-c", "import importlib.util; print(importlib.util.find_spec('glr'))"])
    import subprocess

    assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == "None"
    result = run_local(built["root"], built["kernel"], keep=tmp_path / "keep", stream=False, progress=False)
    test_ids = GLDv2Root.open(built["root"]).test_ids()
    for layout in ("classic", "nested"):
        run = result["runs"][layout]
        assert run["returncode"] == 0 and run["status"] == "ok", run["log_tail"]
        assert run["rows"] == len(test_ids)
        report = run["report"]
        assert report["environment"]["search"] == "faiss" and report["counts"]["train"] > 0
        assert layout in report["inputs"]["layout"]
        steps = [r["step"] for r in report["timing"]]
        assert "search + post-processing" in steps and any(s.startswith("embed train") for s in steps)
        proj = {r["step"]: r for r in report["timing"]}["search + post-processing"]
        assert proj["projected_seconds"] == pytest.approx(proj["seconds"] * 1000 / len(test_ids), abs=0.03)  # seconds rounded to ms
    assert result["runs"]["nested"]["same_as_first_layout"] is True
    assert result["parity"]["identical"], result["parity"]
    assert result["parity"]["equal_rows"] == len(test_ids)
    validate_submission_file(tmp_path / "keep" / "classic" / "submission.csv", "retrieval", expected_ids=test_ids,
                             index_ids=set(GLDv2Root.open(built["root"]).index_ids()))


@pytest.mark.slow
def test_corrupt_images_and_a_missing_index_folder_still_give_a_valid_submission(built, tmp_path):
    root = tmp_path / "comp"
    shutil.copytree(built["root"], root)
    gld = GLDv2Root.open(root)
    bad_q, bad_db = gld.test_ids()[0], gld.index_ids()[0]
    gld.path("test", bad_q).write_bytes(b"not a jpeg")
    data = gld.path("index", bad_db).read_bytes()
    gld.path("index", bad_db).write_bytes(data[: len(data) // 3])  # truncated
    result = run_local(root, built["kernel"], layouts=["classic"], parity=False, keep=tmp_path / "k1",
                       stream=False, progress=False)
    run = result["runs"]["classic"]
    assert run["returncode"] == 0 and run["status"] == "ok", run["log_tail"]
    assert run["report"]["counts"]["test_unreadable"] == 1 and run["report"]["counts"]["index_unreadable"] == 1
    rows = dict(read_submission(tmp_path / "k1" / "classic" / "submission.csv", "retrieval"))
    assert rows[bad_q] == "" and len(rows) == len(gld.test_ids())
    assert all(bad_db not in cell.split() for cell in rows.values())
    assert sum(bool(c) for c in rows.values()) == len(rows) - 1
    # no index folder at all: every row empty, still valid, still exit 0
    shutil.rmtree(root / "index")
    os.remove(root / "index.csv")
    result = run_local(root, built["kernel"], layouts=["nested"], parity=False, keep=tmp_path / "k2",
                       stream=False, progress=False)
    run = result["runs"]["nested"]
    assert run["returncode"] == 0 and run["status"] == "ok", run["log_tail"]
    rows = dict(read_submission(tmp_path / "k2" / "nested" / "submission.csv", "retrieval"))
    assert len(rows) == len(gld.test_ids()) and not any(rows.values())
    # no test folder: the fallback (header only) is the output
    shutil.rmtree(root / "test")
    result = run_local(root, built["kernel"], layouts=["classic"], parity=False, keep=tmp_path / "k3",
                       stream=False, progress=False)
    assert result["runs"]["classic"]["status"] == "fallback" and result["runs"]["classic"]["returncode"] == 0
    assert (tmp_path / "k3" / "classic" / "submission.csv").read_text() == "id,images\n"


def test_recognition_kernel_votes_with_the_train_set(built, tmp_path):
    kaggle, settings = _kaggle(tmp_path, built["root"], built["kernel"])
    settings = {**settings, "task": "recognition", "postprocess": {}}
    assert runtime.main(settings, kaggle_root=kaggle) == 0
    rows = read_submission(kaggle / "working" / "submission.csv", "recognition")
    train_lm = {str(lm) for _, lm in GLDv2Root.open(built["root"]).train_ids_labels("clean")}
    assert rows and all(cell.split()[0] in train_lm for _, cell in rows)
    assert np.isfinite([float(c.split()[1]) for _, c in rows]).all()


def test_images_are_listed_in_the_roots_order_when_it_has_one(built, tmp_path):
    gld = GLDv2Root.open(built["root"])
    listed, misplaced = runtime.list_images(built["root"], "test")
    assert listed == gld.test_ids() and misplaced == 0 and listed != sorted(listed)  # test.csv order
    root = tmp_path / "comp"
    shutil.copytree(built["root"] / "test", root / "test")
    stray = root / "test" / "stray.jpg"
    stray.write_bytes(b"x")
    listed, misplaced = runtime.list_images(root, "test")
    assert listed == sorted(gld.test_ids()) and misplaced == 1  # no listing: sorted; misplaced files skipped
    assert runtime.list_images(root, "index") == ([], 0)


# --------------------------------------------------------------------------- glr kernel run: status, exit, leftovers
def test_kernel_run_reports_a_fallback_exits_with_the_kernels_status_and_leaves_nothing(built, tmp_path, monkeypatch,
                                                                                        capsys):
    tmp = tmp_path / "tmp"  # this process's and (without the fix) the kernel's temporary folder
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    args = ["kernel", "run", "--data", str(built["root"]), "--kernel", str(built["kernel"]), "--layout", "classic",
            "--set", 'members=[{"file": "gone.pt"}]', "--keep", str(tmp_path / "keep")]
    assert main(args) == 1  # the kernel's own exit status: a commit run that failed
    out = capsys.readouterr().out
    assert "classic  exit 1, status fallback" in out
    assert "the fallback submission is the output: FileNotFoundError" in out and "weights dataset not found" in out
    assert "parity: not checked" in out and "DIFFERENT" not in out
    validate_submission_file(tmp_path / "keep" / "classic" / "submission.csv", "retrieval",
                             expected_ids=GLDv2Root.open(built["root"]).test_ids())
    assert main([*args, "--rerun"]) == 0  # the hidden run scores the fallback: the kernel exits 0, and so do we
    out = capsys.readouterr().out
    assert "classic  exit 0, status fallback" in out and "parity: not checked" in out
    assert list(tmp.iterdir()) == []  # no glr_kaggle_*, glr_kernel_* (the unpacked bundle) or glr_wheels_* left


@pytest.mark.slow
def test_the_kernel_runs_the_packed_timm_when_the_images_differs(built, tmp_path):
    """A real timm wheel (this environment's timm, re-versioned so that it differs from the image's)
    in the wheels dataset: the kernel installs it, imports it from there, and the submission
    still equals the library's."""
    import importlib.metadata

    import timm

    version = f"{timm.__version__}.post7"
    kernel = tmp_path / "kernel"
    shutil.copytree(built["kernel"], kernel, symlinks=True)
    (kernel / "wheels").mkdir()
    dist = importlib.metadata.distribution("timm")
    info = f"timm-{version}.dist-info"
    with zipfile.ZipFile(kernel / "wheels" / f"timm-{version}-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as z:
        for f in dist.files:
            if f.parts[0] != "timm" or f.suffix == ".pyc":
                continue
            data = dist.locate_file(f).read_bytes()
            z.writestr(f.as_posix(), f"__version__ = '{version}'\n" if f.as_posix() == "timm/version.py" else data)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: timm\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    result = run_local(built["root"], kernel, layouts=["classic"], stream=False, progress=False)
    run = result["runs"]["classic"]
    assert run["returncode"] == 0 and run["status"] == "ok", run["log_tail"]
    assert run["report"]["environment"]["libraries"]["timm"] == version
    assert result["parity"]["identical"], result["parity"]


def test_extraction_settings_reach_the_embedding_and_a_bad_one_keeps_the_fallback(built, tmp_path, monkeypatch):
    from glr import predict

    seen = []
    real = predict.embed_ensemble

    def spy(*args, **kwargs):
        seen.append((kwargs["precision"], kwargs["compile"], kwargs["num_workers"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(predict, "embed_ensemble", spy)
    monkeypatch.delenv("KAGGLE_IS_COMPETITION_RERUN", raising=False)
    kaggle, settings = _kaggle(tmp_path, built["root"], built["kernel"])
    assert settings["precision"] is None and settings["compile"] is False  # the defaults a build writes
    settings = {**settings, "task": "recognition", "postprocess": {}}
    assert runtime.main({**settings, "precision": "fp32", "num_workers": "auto"}, kaggle_root=kaggle) == 0
    assert seen[-1][:2] == ("fp32", False) and isinstance(seen[-1][2], int)
    assert runtime.main({**settings, "precision": "fp8"}, kaggle_root=kaggle) == 1
    report = json.loads((kaggle / "working" / runtime.REPORT).read_text())
    assert report["status"] == "fallback" and "precision" in report["error"] and "fp8" in report["error"]
    validate_submission_file(kaggle / "working" / "submission.csv", "recognition",
                             expected_ids=GLDv2Root.open(built["root"]).test_ids())
