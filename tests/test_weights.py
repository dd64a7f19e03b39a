"""Artifact catalogue: hashes, experiment manifests, ensemble files, Kaggle dataset packs."""

import hashlib
import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import torch

from glr.kaggle.publish import pack
from glr.model import weights as W
from glr.utils import file_sha256
from glr.model.heads import ArcFace
from glr.model.net import build_net
from glr.model.artifact import save_artifact
from glr.utils import InputError

DATA_CONFIG = {"image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
               "train_subset": "clean"}
CV_JSON = {"task": "retrieval", "public": {"map@100": 0.41, "p@1": 0.6}, "private": {"map@100": 0.39},
           "recognition": {"task": "recognition", "public": {"gap": 0.55, "top1_accuracy": 0.7},
                           "private": None}}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_net(dict(backbone="test_resnet", embedding_size=16))


@pytest.fixture
def make(net):
    """make(path, **meta) → a real artifact with meta {experiment: exp1, stage: s1, …} updated."""

    def _make(path, head=None, **meta):
        m = {"experiment": "exp1", "stage": "s1", "train_set": "clean", "image_size": 32, "backbone": "test_resnet"}
        m.update(meta)
        return save_artifact(path, net, DATA_CONFIG, meta=m, head=head)

    return _make


def _stage(make, exp_dir, stage, experiment="exp1", **meta):
    """Save an artifact for ``stage`` into exp_dir and record it in the manifest."""
    p = make(Path(exp_dir) / f"{stage}.safetensors", experiment=experiment, stage=stage, **meta)
    W.update_manifest(exp_dir, W.manifest_entry(p))
    return p


# --------------------------------------------------------------------------- hashes and info
def test_file_sha256_matches_hashlib(tmp_path, make):
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 9000)  # > 2 MiB: several chunks and a partial one
    assert file_sha256(big) == hashlib.sha256(big.read_bytes()).hexdigest()
    p = make(tmp_path / "a.safetensors")
    assert file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert file_sha256(empty) == hashlib.sha256(b"").hexdigest()


def test_read_artifact_info_from_meta(tmp_path, make):
    p = make(tmp_path / "a.safetensors", num_classes=7, val_leak=False, epochs=3, image_size=64, train_set="c2x")
    info = W.read_artifact_info(p)
    assert info == {"experiment": "exp1", "stage": "s1", "backbone": "test_resnet", "image_size": 64,
                    "train_set": "c2x", "num_classes": 7, "embedding_size": 16, "val_leak": False, "epochs": 3}
    json.dumps(info)


def test_read_artifact_info_falls_back(tmp_path, net):
    # an artifact from before the richer meta: only model_args, data_config and the head
    p = save_artifact(tmp_path / "old.safetensors", net, DATA_CONFIG, meta={"label_map": {"1": 0}},
                      head=ArcFace(16, 5))
    info = W.read_artifact_info(p)
    assert info["backbone"] == "test_resnet" and info["image_size"] == 32 and info["train_set"] == "clean"
    assert info["num_classes"] == 5 and info["embedding_size"] == 16
    assert info["experiment"] is None and info["stage"] is None and info["val_leak"] is None
    assert info["epochs"] is None
    assert "label_map" not in info


def test_read_artifact_info_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(InputError, match="missing.pt"):
        W.read_artifact_info(missing)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(InputError, match=r"foreign\.pt.*glr-artifact-v1"):
        W.read_artifact_info(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="garbage.pt"):
        W.read_artifact_info(garbage)


def test_manifest_entry(tmp_path, make):
    p = make(tmp_path / "s1.safetensors", num_classes=4)
    e = W.manifest_entry(p, cv=CV_JSON)
    assert e["file"] == "s1.safetensors" and e["bytes"] == p.stat().st_size
    assert e["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert e["experiment"] == "exp1" and e["stage"] == "s1" and e["num_classes"] == 4
    assert e["cv"] == {"map@100/public": 0.41, "map@100/private": 0.39, "gap/public": 0.55, "gap/private": None}
    created = datetime.fromisoformat(e["created"])
    assert created.utcoffset().total_seconds() == 0
    assert W.manifest_entry(p)["cv"] is None
    json.dumps(e)


def test_compact_cv_shapes():
    assert W._compact_cv({"public": None, "private": None}) == {"map@100/public": None, "map@100/private": None}
    assert W._compact_cv({"task": "retrieval"}) is None
    compact = {"map@100/public": 0.1, "gap/private": 0.2}
    assert W._compact_cv(compact) == compact
    with pytest.raises(InputError, match="not a number"):
        W._compact_cv({"public": {"map@100": "high"}})


# --------------------------------------------------------------------------- manifests
def test_manifest_add_replace_and_order(tmp_path, make):
    exp = tmp_path / "exp1"
    for s in ("s1", "s2", "s3"):
        _stage(make, exp, s)
    m = W.read_manifest(exp)
    assert m["experiment"] == "exp1" and [e["stage"] for e in m["stages"]] == ["s1", "s2", "s3"]
    old_sha = m["stages"][1]["sha256"]
    # re-train s2: same stage replaces the entry in place, order kept
    p2 = make(exp / "s2.safetensors", stage="s2", epochs=9)
    W.update_manifest(exp, W.manifest_entry(p2, cv=CV_JSON))
    m = W.read_manifest(exp)
    assert [e["stage"] for e in m["stages"]] == ["s1", "s2", "s3"]
    assert m["stages"][1]["sha256"] != old_sha and m["stages"][1]["epochs"] == 9
    assert m["stages"][1]["cv"]["map@100/private"] == 0.39
    assert W.final_artifact(exp) == exp / "s3.safetensors"
    assert W.stage_artifact(exp, "s2") == exp / "s2.safetensors"
    assert not [p for p in exp.iterdir() if p.name.endswith(".tmp")]


def test_manifest_rejects_bad_entries(tmp_path, make):
    exp = tmp_path / "exp1"
    _stage(make, exp, "s1")
    other = make(tmp_path / "x.safetensors", experiment="exp2", stage="s2")
    with pytest.raises(InputError, match="exp2"):
        W.update_manifest(exp, W.manifest_entry(other))
    nostage = W.manifest_entry(make(tmp_path / "y.safetensors", stage=None))
    with pytest.raises(InputError, match="no stage"):
        W.update_manifest(exp, nostage)
    clash = dict(W.manifest_entry(make(tmp_path / "z.safetensors", stage="s2")), file="s1.safetensors")
    with pytest.raises(InputError, match="both use the file"):
        W.update_manifest(exp, clash)
    assert [e["stage"] for e in W.read_manifest(exp)["stages"]] == ["s1"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"experiment": "e", "stages": [{"stage": "s1"}]}'])
def test_corrupt_manifest_is_an_error_and_kept(tmp_path, make, content):
    exp = tmp_path / "exp1"
    exp.mkdir()
    (exp / "manifest.json").write_text(content)
    p = make(exp / "s1.safetensors")
    with pytest.raises(InputError, match=r"manifest\.json.*corrupt manifest"):
        W.update_manifest(exp, W.manifest_entry(p))
    with pytest.raises(InputError, match="corrupt manifest"):
        W.read_manifest(exp)
    assert (exp / "manifest.json").read_text() == content


def test_final_artifact_errors(tmp_path, make):
    exp = tmp_path / "exp1"
    with pytest.raises(InputError, match="manifest not found"):
        W.final_artifact(exp)
    exp.mkdir()
    (exp / "manifest.json").write_text('{"experiment": "exp1", "stages": []}')
    with pytest.raises(InputError, match="no stages"):
        W.final_artifact(exp)
    (exp / "manifest.json").unlink()
    _stage(make, exp, "s1")
    p = _stage(make, exp, "s2")
    assert W.final_artifact(exp) == p
    # the file changed after it was recorded
    make(p, stage="s2", epochs=99)
    with pytest.raises(InputError, match=r"s2\.safetensors.*sha256.*differs"):
        W.final_artifact(exp)
    with pytest.raises(InputError, match="no stage 's9'"):
        W.stage_artifact(exp, "s9")
    p.unlink()
    with pytest.raises(InputError, match=r"s2\.safetensors.*missing"):
        W.final_artifact(exp)
    assert W.stage_artifact(exp, "s1") == exp / "s1.safetensors"


# --------------------------------------------------------------------------- ensembles
@pytest.fixture
def weights_dir(tmp_path, make):
    wd = tmp_path / "weights"
    _stage(make, wd / "exp010_lite0", "s1", experiment="exp010_lite0")
    _stage(make, wd / "exp010_lite0", "s2", experiment="exp010_lite0")
    _stage(make, wd / "exp020_resnet", "s1", experiment="exp020_resnet")
    _stage(make, wd / "exp020_resnet", "s2", experiment="exp020_resnet")
    return wd


def test_read_ensemble_happy_path(tmp_path, make, weights_dir):
    ens_dir = tmp_path / "ens"
    make(ens_dir / "models" / "direct.safetensors", experiment="exp030", stage="s3")
    make(tmp_path / "loose.safetensors", experiment=None, stage=None)
    ens = ens_dir / "ensemble.yaml"
    ens.write_text(
        "members:\n"
        "  - experiment: exp010_lite0\n"
        "  - experiment: exp020_resnet\n"
        "    stage: s1\n"
        "    weight: 0.5\n"
        "  - artifact: models/direct.safetensors\n"
        "    weight: 2\n"
        f"  - artifact: {tmp_path / 'loose.safetensors'}\n")
    members = W.read_ensemble(ens, weights_dir=weights_dir)
    assert [m["name"] for m in members] == ["exp010_lite0__s2", "exp020_resnet__s1", "exp030__s3", "loose"]
    assert [m["weight"] for m in members] == [1.0, 0.5, 2.0, 1.0]
    assert members[0]["artifact"] == weights_dir / "exp010_lite0" / "s2.safetensors"
    assert members[1]["artifact"] == weights_dir / "exp020_resnet" / "s1.safetensors"
    assert members[2]["artifact"] == ens_dir / "models" / "direct.safetensors"
    assert members[2]["experiment"] == "exp030" and members[2]["stage"] == "s3"
    assert members[3]["experiment"] is None and members[3]["stage"] is None
    assert all(isinstance(m["artifact"], Path) and m["artifact"].is_file() for m in members)


@pytest.mark.parametrize("body, message", [
    ("members: []\n", "non-empty list"),
    ("members:\n", "non-empty list"),
    ("", "'members' list"),
    ("models:\n  - experiment: exp010_lite0\n", "'members' list"),
    ("members:\n  - experiment: exp010_lite0\n  - experiment: exp020_resnet\n    wieght: 2\n",
     r"member 2: unknown key\(s\) wieght"),
    ("members:\n  - experiment: exp010_lite0\n    artifact: x.pt\n", "member 1: give exactly one"),
    ("members:\n  - weight: 2\n", "member 1: give exactly one"),
    ("members:\n  - experiment: exp010_lite0\n    weight: -1\n", "member 1: weight must be > 0"),
    ("members:\n  - experiment: exp010_lite0\n    weight: high\n", "member 1: weight must be a number"),
    ("members:\n  - experiment: exp010_lite0\n  - experiment: exp020_resnet\n    stage: s7\n",
     "member 2: experiment 'exp020_resnet': .*no stage 's7'"),
    ("members:\n  - experiment: exp999\n", "member 1: experiment 'exp999': .*manifest not found"),
    ("members:\n  - artifact: nowhere.pt\n", "member 1: .*model artifact not found"),
    ("members:\n  - experiment: exp010_lite0\n  - experiment: exp010_lite0\n    stage: s2\n",
     "member 2: same model as member 1"),
    ("members:\n  - experiment: [oops\n", "not valid YAML"),
])
def test_read_ensemble_errors(tmp_path, weights_dir, body, message):
    ens = tmp_path / "bad_ensemble.yaml"
    ens.write_text(body)
    with pytest.raises(InputError, match=message) as ei:
        W.read_ensemble(ens, weights_dir=weights_dir)
    assert ei.value.path == str(ens) and "bad_ensemble.yaml" in str(ei.value)


def test_read_ensemble_error_gives_member_line(tmp_path, weights_dir):
    ens = tmp_path / "e.yaml"
    ens.write_text("members:\n  - experiment: exp010_lite0\n  - experiment: exp020_resnet\n    weight: -0.5\n")
    with pytest.raises(InputError) as ei:
        W.read_ensemble(ens, weights_dir=weights_dir)
    assert ei.value.line == 3 and f"{ens}:3: member 2" in str(ei.value)


def test_read_ensemble_checks_hashes(tmp_path, make, weights_dir):
    make(weights_dir / "exp010_lite0" / "s2.safetensors", experiment="exp010_lite0", stage="s2", epochs=5)
    ens = tmp_path / "e.yaml"
    ens.write_text("members:\n  - experiment: exp010_lite0\n")
    with pytest.raises(InputError, match=r"member 1: .*s2\.safetensors.*differs"):
        W.read_ensemble(ens, weights_dir=weights_dir)


# --------------------------------------------------------------------------- packs
def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_pack_builds_a_kaggle_dataset(tmp_path, make, weights_dir):
    exp = weights_dir / "exp010_lite0"
    # CV figures recorded beside the source are carried into the pack
    W.update_manifest(exp, W.manifest_entry(exp / "s2.safetensors", cv=CV_JSON))
    loose = make(tmp_path / "loose.safetensors", experiment=None, stage=None)
    out = tmp_path / "pack"
    sources = [exp / "s2.safetensors", weights_dir / "exp020_resnet" / "s1.safetensors", loose]
    got = pack(sources, out, "someone/glr-weights-v1", title="GLR landmark weights v1")
    assert got == out
    packed = ["exp010_lite0__s2.safetensors", "exp020_resnet__s1.safetensors", "loose.safetensors"]
    assert _siblings(out) == ["dataset-metadata.json", *packed, "manifest.json"]
    meta = json.loads((out / "dataset-metadata.json").read_text())
    assert meta["title"] == "GLR landmark weights v1" and meta["id"] == "someone/glr-weights-v1"
    assert meta["licenses"] == [{"name": "CC0-1.0"}]
    assert 6 <= len(meta["title"]) <= 50 and 6 <= len(meta["id"].split("/")[1]) <= 50
    man = json.loads((out / "manifest.json").read_text())
    assert man["dataset"] == "someone/glr-weights-v1"
    assert [e["file"] for e in man["entries"]] == packed
    for e, src in zip(man["entries"], sources):
        assert (out / e["file"]).read_bytes() == src.read_bytes()
        assert e["sha256"] == file_sha256(out / e["file"]) and e["bytes"] == src.stat().st_size
    assert man["entries"][0]["cv"]["map@100/private"] == 0.39 and man["entries"][1]["cv"] is None
    assert W.read_artifact_info(out / "exp010_lite0__s2.safetensors")["stage"] == "s2"
    assert not [n for n in _siblings(tmp_path) if n.startswith(".")]


def test_pack_default_title_and_licence(tmp_path, make):
    a = make(tmp_path / "a.safetensors")
    out = pack([a], tmp_path / "p", "me/glr-models", licence="CC-BY-4.0")
    meta = json.loads((out / "dataset-metadata.json").read_text())
    assert meta["title"] == "Glr models" and meta["licenses"] == [{"name": "CC-BY-4.0"}]


@pytest.mark.parametrize("dataset_id, title, licence, message", [
    ("glr-weights", None, "CC0-1.0", "owner/slug"),
    ("me/you/glr-weights", None, "CC0-1.0", "owner/slug"),
    ("/glr-weights", None, "CC0-1.0", "owner"),
    ("me/short", None, "CC0-1.0", "6 to 50"),
    ("me/" + "a" * 51, None, "CC0-1.0", "6 to 50"),
    ("me/GLR-Weights", None, "CC0-1.0", "lower-case"),
    ("me/glr_weights", None, "CC0-1.0", "lower-case"),
    ("me/glr--weights", None, "CC0-1.0", "lower-case"),
    ("me/-glr-weights", None, "CC0-1.0", "lower-case"),
    ("me/glr-weights", "GLR", "CC0-1.0", "title .* 6 to 50"),
    ("me/glr-weights", "x" * 51, "CC0-1.0", "title .* 6 to 50"),
    ("me/glr-weights", None, "MIT", "licence 'MIT'"),
])
def test_pack_validates_metadata(tmp_path, make, dataset_id, title, licence, message):
    a = make(tmp_path / "a.safetensors")
    with pytest.raises(InputError, match=message):
        pack([a], tmp_path / "pack", dataset_id, title=title, licence=licence)
    assert not (tmp_path / "pack").exists()


def test_pack_refuses_non_empty_dir_and_overwrites_a_pack(tmp_path, make):
    a = make(tmp_path / "a.safetensors")
    out = tmp_path / "pack"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        pack([a], out, "me/glr-weights")
    with pytest.raises(InputError, match="holds no previous pack"):
        pack([a], out, "me/glr-weights", overwrite=True)
    assert _siblings(out) == ["notes.txt"]
    (out / "notes.txt").unlink()
    pack([a], out, "me/glr-weights")  # an empty folder is fine
    with pytest.raises(InputError, match="not empty"):
        pack([a], out, "me/glr-weights")
    b = make(tmp_path / "b.safetensors", stage="s2")
    pack([b], out, "me/glr-weights", overwrite=True)
    assert _siblings(out) == ["dataset-metadata.json", "exp1__s2.safetensors", "manifest.json"]
    assert not [n for n in _siblings(tmp_path) if n.startswith(".")]


def test_pack_leaves_nothing_when_a_source_is_missing(tmp_path, make):
    a = make(tmp_path / "a.safetensors")
    with pytest.raises(InputError, match="gone.pt"):
        pack([a, tmp_path / "gone.pt"], tmp_path / "pack", "me/glr-weights")
    assert _siblings(tmp_path) == ["a.safetensors"]


def test_pack_name_clash(tmp_path, make):
    a = make(tmp_path / "x" / "a.safetensors")
    b = make(tmp_path / "y" / "b.safetensors")  # same experiment and stage
    with pytest.raises(InputError, match=r"exp1__s1\.safetensors"):
        pack([a, b], tmp_path / "pack", "me/glr-weights")
    c = make(tmp_path / "x" / "model.safetensors", experiment=None, stage=None)
    d = make(tmp_path / "y" / "model.safetensors", experiment=None, stage=None)
    with pytest.raises(InputError, match=r"model\.safetensors"):
        pack([c, d], tmp_path / "pack", "me/glr-weights")
    assert not (tmp_path / "pack").exists()


def test_pack_failure_mid_copy_keeps_the_old_pack(tmp_path, make, monkeypatch):
    a, b = make(tmp_path / "a.safetensors"), make(tmp_path / "b.safetensors", stage="s2")
    out = pack([a], tmp_path / "pack", "me/glr-weights")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def flaky_copy(src, dst, *args, **kw):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return Path(dst).write_bytes(Path(src).read_bytes())

    monkeypatch.setattr(shutil, "copyfile", flaky_copy)
    with pytest.raises(OSError, match="No space"):
        pack([a, b], out, "me/glr-weights", overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _siblings(tmp_path) == ["a.safetensors", "b.safetensors", "pack"]
