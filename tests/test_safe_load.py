"""Weights that are safe to load: the safetensors + JSON artifact, legacy ``.pt`` files read as plain
data only, hashes checked against manifests, and state dicts that do not fit named in one line.

The hostile file is a legacy-format artifact whose pickle would create a marker file when unpickled
(``pathlib.Path.touch``): every loading path must refuse it, exit 2 / InputError, and leave no marker.
"""

import json
import pathlib
import struct

import pytest
import safetensors.torch
import torch

from glr.cli import main
from glr.data.images import IMAGENET_MEAN, IMAGENET_STD
from glr.kaggle.kernel import runtime
from glr.kaggle.publish import pack
from glr.model import weights as W
from glr.model.artifact import (ARTIFACT_FORMAT, LEGACY_FORMAT, METADATA_KEY, artifact_kind, convert_legacy,
                                library_versions, load_artifact, read_artifact, save_artifact)
from glr.model.heads import build_head
from glr.model.net import build_net
from glr.predict import embed_ensemble, load_member
from glr.utils import InputError, file_sha256

DATA_CONFIG = {"image_size": 32, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "train_set": "clean",
               "label_map": {"17": 0, "4": 1, "9": 2}, "class_counts": [3, 5, 2]}


class _Touch:
    """Unpickles into ``marker.touch()``: what a hostile artifact would do instead of touching a file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_net(dict(backbone="test_resnet", embedding_size=16)).eval()


def _legacy_payload(net, meta=None, head=None):
    """The payload ``save_artifact`` of the previous main wrote with ``torch.save``."""
    return {"format": LEGACY_FORMAT, "model_args": dict(net.model_args), "data_config": dict(DATA_CONFIG),
            "meta": {"experiment": "old", "stage": "s1", **(meta or {})},
            "state_dict": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "head_state_dict": None if head is None else {k: v.detach().clone() for k, v in head.state_dict().items()},
            "head_args": None if head is None else dict(head.head_args)}


@pytest.fixture
def hostile(tmp_path, net):
    """``(artifact, marker)``: a legacy ``.pt`` whose unpickling would create ``marker``."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save(_legacy_payload(net, meta={"note": _Touch(marker)}), path)
    return path, marker


def _one_line_exit_2(capsys, argv, *needles):
    """``glr ARGV`` exits 2 with one error line holding ``needles`` (log lines before it are fine)."""
    assert main(argv) == 2
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1, lines
    err = lines[0]
    for n in needles:
        assert n in err, err
    return err


def test_the_hostile_file_is_live(tmp_path, net):
    """The payload does run when unpickled without restrictions (so the refusals below mean something)."""
    marker = tmp_path / "ran"
    torch.save(_legacy_payload(net, meta={"note": _Touch(marker)}), tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


# --------------------------------------------------------------------------- every loading path refuses it
def test_library_loaders_refuse_the_hostile_file(hostile):
    path, marker = hostile
    for load in (read_artifact, load_artifact, load_member, W.read_artifact_info, W.manifest_entry):
        with pytest.raises(InputError, match=r"evil\.pt: not a plain-data artifact \(refusing to unpickle it\); "
                                             r"convert a file you trust with `glr weights convert .*evil\.pt <out>`"):
            load(path)
    assert not marker.exists()


def test_cli_refuses_the_hostile_file(hostile, tmp_path, capsys):
    """glr cv / embed / train --init-from / weights pack / weights convert: exit 2, one line, no marker."""
    from glr.data.synth import make_synthetic_gldv2

    path, marker = hostile
    root = tmp_path / "root"
    make_synthetic_gldv2(root, n_landmarks=4, scale=0.05, image_size=32, progress=False)
    need = ("evil.pt", "refusing to unpickle")
    _one_line_exit_2(capsys, ["cv", "--data", str(root), "--model", str(path), "--out", str(tmp_path / "cv"),
                              "--num-workers", "0"], *need)
    _one_line_exit_2(capsys, ["embed", "--model", str(path), "--data", str(root), "--split", "index",
                              "--out", str(tmp_path / "e.npz"), "--num-workers", "0"], *need)
    _one_line_exit_2(capsys, ["train", "--data", str(root), "--out", str(tmp_path / "run"), "--init-from", str(path),
                              "--epochs", "1", "--image-size", "32", "--batch-size", "4", "--num-workers", "0",
                              "--limit-train-batches", "1"], *need)
    _one_line_exit_2(capsys, ["weights", "pack", str(path), "--out", str(tmp_path / "pack"),
                              "--id", "me/glr-weights"], *need)
    _one_line_exit_2(capsys, ["weights", "convert", str(path), str(tmp_path / "c.safetensors")],
                     "evil.pt", "--trust")
    assert not marker.exists()
    assert not (tmp_path / "pack").exists() and not (tmp_path / "c.safetensors").exists()
    assert not (tmp_path / "e.npz").exists() and not (tmp_path / "run" / "model.safetensors").exists()


def test_kernel_build_refuses_the_hostile_file(hostile, tmp_path, capsys):
    """As an ensemble's artifact, and as an experiment's stage whose manifest hash matches it."""
    path, marker = hostile
    exp = tmp_path / "weights" / "exp_evil"
    exp.mkdir(parents=True)
    (exp / "s1.pt").write_bytes(path.read_bytes())
    (exp / "manifest.json").write_text(json.dumps({"experiment": "exp_evil", "stages": [
        {"experiment": "exp_evil", "stage": "s1", "file": "s1.pt", "sha256": file_sha256(exp / "s1.pt")}]}))
    for member in (f"artifact: {path}", "experiment: exp_evil"):
        ens = tmp_path / "ensemble.yaml"
        ens.write_text(f"members:\n  - {member}\n")
        _one_line_exit_2(capsys, ["kernel", "build", "--ensemble", str(ens), "--weights", str(tmp_path / "weights"),
                                  "--out", str(tmp_path / "kernel"), "--kernel-id", "me/glr-evil-kernel",
                                  "--weights-dataset", "me/glr-evil-weights"], ".pt", "refusing to unpickle")
    assert not marker.exists() and not (tmp_path / "kernel").exists()


def test_kernel_runtime_refuses_the_hostile_file(hostile, tmp_path):
    """A weights dataset whose manifest lists the file with its true hash: the hash passes, the load refuses."""
    path, marker = hostile
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "m.pt").write_bytes(path.read_bytes())
    (weights / "manifest.json").write_text(json.dumps({"entries": [{"file": "m.pt",
                                                                    "sha256": file_sha256(weights / "m.pt")}]}))
    specs = runtime._members({"members": [{"file": "m.pt", "weight": 1.0}]}, weights)
    with pytest.raises(InputError, match=r"m\.pt: not a plain-data artifact"):
        embed_ensemble(specs, tmp_path, {"test": ["x"]}, num_workers=0, progress=False)
    assert not marker.exists()


# --------------------------------------------------------------------------- the format
def test_new_format_round_trips_bit_for_bit(tmp_path, net):
    torch.manual_seed(1)
    head = build_head("arcface", in_features=16, num_classes=3, s=30.0, m=0.3)
    meta = {"experiment": "exp1", "stage": "s1", "final_loss": 1.25, "options": {"lr": 1e-3, "init_from": None}}
    path = save_artifact(tmp_path / "m.safetensors", net, DATA_CONFIG, meta, head=head)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert raw[8:9] == b"{" and artifact_kind(path) == "safetensors"
    header = json.loads(raw[8:8 + n])
    info = json.loads(header["__metadata__"][METADATA_KEY])  # what any safetensors reader sees
    assert info["format"] == ARTIFACT_FORMAT and info["model_args"] == net.model_args
    assert set(safetensors.torch.load_file(path)) == ({f"net.{k}" for k in net.state_dict()}
                                                      | {f"head.{k}" for k in head.state_dict()})
    p = read_artifact(path)
    for got, want in ((p["state_dict"], net.state_dict()), (p["head_state_dict"], head.state_dict())):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert p["model_args"] == net.model_args and p["data_config"] == DATA_CONFIG
    assert p["head_args"] == head.head_args
    assert p["meta"] == {**meta, "versions": library_versions()}
    assert set(p["meta"]["versions"]) == {"torch", "timm", "numpy", "glr"}
    assert p["meta"]["versions"]["torch"] == torch.__version__
    assert p["source"] == {"file": "m.safetensors", "sha256": file_sha256(path)}
    net2, dc, meta2 = load_artifact(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net2(x))
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]


def test_save_clones_tensors_that_share_memory(tmp_path, net):
    """safetensors refuses tensors sharing storage (a tied weight): they are saved as copies."""
    tied = build_net(dict(backbone="test_resnet", embedding_size=16)).eval()
    tied.load_state_dict(net.state_dict())
    tied.bn.running_var = tied.bn.running_mean  # two state keys, one storage
    path = save_artifact(tmp_path / "tied.safetensors", tied, DATA_CONFIG)
    p = read_artifact(path)
    assert torch.equal(p["state_dict"]["bn.running_var"], tied.bn.running_mean)


def test_content_decides_not_the_name(tmp_path, net):
    new_as_pt = save_artifact(tmp_path / "new.pt", net, DATA_CONFIG, {"stage": "s2"})
    torch.save(_legacy_payload(net), tmp_path / "old.safetensors")
    assert read_artifact(new_as_pt)["format"] == ARTIFACT_FORMAT
    assert read_artifact(tmp_path / "old.safetensors")["format"] == LEGACY_FORMAT


def test_a_legacy_plain_artifact_still_loads_and_converts(tmp_path, net):
    torch.manual_seed(2)
    head = build_head("cosface", in_features=16, num_classes=3, s=30.0, m=0.3)
    legacy = tmp_path / "model.pt"
    torch.save(_legacy_payload(net, meta={"epochs": 3, "final_loss": float("nan")}, head=head), legacy)
    old_net, dc, meta = load_artifact(legacy)
    assert dc == DATA_CONFIG and meta["epochs"] == 3 and W.read_artifact_info(legacy)["num_classes"] == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(old_net(x), net(x))
    # a pack keeps the legacy file byte for byte, under a .pt name
    out = pack([legacy], tmp_path / "pack", "me/glr-weights")
    assert (out / "old__s1.pt").read_bytes() == legacy.read_bytes()
    # glr weights convert: same tensors, same args, the parent named by file and hash
    assert main(["weights", "convert", str(legacy), str(tmp_path / "model.safetensors")]) == 0
    new = read_artifact(tmp_path / "model.safetensors")
    old = read_artifact(legacy)
    assert new["format"] == ARTIFACT_FORMAT and new["model_args"] == old["model_args"]
    assert new["data_config"] == old["data_config"] and new["head_args"] == old["head_args"]
    for key in ("state_dict", "head_state_dict"):
        assert all(torch.equal(new[key][k], v) and new[key][k].dtype == v.dtype for k, v in old[key].items())
    assert new["meta"]["converted_from"] == {"file": "model.pt", "sha256": file_sha256(legacy)}
    assert main(["weights", "convert", str(legacy), str(tmp_path / "model.safetensors")]) == 2  # no --overwrite


def test_convert_with_trust_is_the_only_unpickling(hostile, tmp_path, capsys):
    path, marker = hostile
    assert main(["weights", "convert", "--trust", str(path), str(tmp_path / "c.safetensors")]) == 0
    assert marker.exists()  # what --trust means: it ran the pickle
    p = read_artifact(tmp_path / "c.safetensors")
    assert p["meta"]["note"] is None and p["meta"]["converted_from"]["file"] == "evil.pt"
    assert "weights_only=False" in capsys.readouterr().err
    _one_line_exit_2(capsys, ["weights", "convert", str(tmp_path / "c.safetensors"), str(tmp_path / "d.safetensors")],
                     "c.safetensors", "already a glr-artifact-v2")


def test_convert_help_warns(capsys):
    with pytest.raises(SystemExit):
        main(["weights", "convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "WARNING: --trust unpickles IN with weights_only=False: that runs whatever code" in text


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b""), "neither a safetensors nor a torch file"),
    (lambda p: p.write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00{\"a\": 1"), "cannot read model artifact"),
    (lambda p: safetensors.torch.save_file({"conv.weight": torch.zeros(2, 2)}, str(p)), "without glr metadata"),
    (lambda p: safetensors.torch.save_file({"conv.weight": torch.zeros(2, 2)}, str(p),
                                           metadata={METADATA_KEY: "{oops"}), "corrupt glr-artifact-v2 metadata"),
])
def test_foreign_or_broken_files_are_one_line(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(InputError, match=message) as ei:
        read_artifact(path)
    assert ei.value.path == str(path) and len(str(ei.value).splitlines()) == 1


def test_a_truncated_artifact_is_one_line(tmp_path, net):
    path = save_artifact(tmp_path / "m.safetensors", net, DATA_CONFIG)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"m\.safetensors: cannot read model artifact") as ei:
        read_artifact(path)
    assert len(str(ei.value).splitlines()) == 1


def test_model_args_naming_a_file_are_refused(tmp_path, net, monkeypatch):
    """A crafted header could point timm's checkpoint loader at a pickle elsewhere on disk."""
    monkeypatch.setitem(net.model_args, "pretrained_file", str(tmp_path / "elsewhere.pth"))
    path = save_artifact(tmp_path / "m.safetensors", net, DATA_CONFIG)
    with pytest.raises(InputError, match="model_args name a file .*pretrained_file"):
        load_artifact(path)


# --------------------------------------------------------------------------- hashes
def _pack_dir(tmp_path, net):
    a = save_artifact(tmp_path / "a.safetensors", net, DATA_CONFIG, {"experiment": "e", "stage": "s1"})
    return pack([a], tmp_path / "pack", "me/glr-weights")


def test_weights_dataset_files_are_checked_against_the_manifest(tmp_path, net):
    folder = _pack_dir(tmp_path, net)
    specs = runtime._members({"members": [{"file": "e__s1.safetensors", "weight": 2.0}]}, folder)
    assert [(s.path, s.weight) for s in specs] == [(folder / "e__s1.safetensors", 2.0)]
    # the same file re-saved with other meta: still an artifact, no longer the recorded one
    save_artifact(folder / "e__s1.safetensors", net, DATA_CONFIG, {"experiment": "e", "stage": "s1", "x": 1})
    with pytest.raises(InputError, match=r"e__s1\.safetensors: sha256 .* differs from the manifest") as ei:
        runtime._members({"members": [{"file": "e__s1.safetensors"}]}, folder)
    assert len(str(ei.value).splitlines()) == 1
    save_artifact(folder / "extra.safetensors", net, DATA_CONFIG)
    with pytest.raises(InputError, match=r"extra\.safetensors: not listed in .*manifest\.json"):
        W.listed_artifact(folder, "extra.safetensors")
    (folder / "manifest.json").unlink()
    with pytest.raises(InputError, match="manifest not found"):
        W.listed_artifact(folder, "e__s1.safetensors")


def test_read_artifact_checks_a_given_sha256(tmp_path, net):
    path = save_artifact(tmp_path / "m.safetensors", net, DATA_CONFIG)
    assert read_artifact(path, sha256=file_sha256(path))["format"] == ARTIFACT_FORMAT
    with pytest.raises(InputError, match=r"m\.safetensors: sha256 .* differs"):
        load_artifact(path, sha256="0" * 64)


def test_experiment_member_is_checked_against_its_manifest(tmp_path, net, capsys):
    exp = tmp_path / "weights" / "exp1"
    a = save_artifact(exp / "s1.safetensors", net, DATA_CONFIG, {"experiment": "exp1", "stage": "s1"})
    W.update_manifest(exp, W.manifest_entry(a))
    save_artifact(a, net, DATA_CONFIG, {"experiment": "exp1", "stage": "s1", "tampered": True})
    ens = tmp_path / "e.yaml"
    ens.write_text("members:\n  - experiment: exp1\n")
    _one_line_exit_2(capsys, ["weights", "pack", "--ensemble", str(ens), "--weights", str(tmp_path / "weights"),
                              "--out", str(tmp_path / "pack"), "--id", "me/glr-weights"], "s1.safetensors", "differs")


# --------------------------------------------------------------------------- state dicts that do not fit
def _mismatched(tmp_path, net, change):
    """An artifact whose model args say one thing and whose tensors another."""
    other = build_net(dict(backbone="test_resnet", embedding_size=16)).eval()
    other.load_state_dict(net.state_dict())
    change(other)
    return save_artifact(tmp_path / "bad.safetensors", other, DATA_CONFIG)


@pytest.mark.parametrize("change, message", [
    (lambda n: n.model_args.update(embedding_size=32), r"size mismatch for 'fc\.weight': \(16, \d+\) in the file, "
                                                       r"\(32, \d+\) in the model \(and \d+ more\)"),
    (lambda n: setattr(n, "bn", torch.nn.Identity()), r"missing key 'bn\.weight' \(and 4 more\)"),
    (lambda n: n.register_buffer("extra", torch.zeros(1)), r"unexpected key 'extra'"),
])
def test_a_state_dict_that_does_not_fit_is_one_line(tmp_path, net, capsys, change, message):
    path = _mismatched(tmp_path, net, change)
    with pytest.raises(InputError, match=r"bad\.safetensors: state dict does not fit its model args: " + message) as ei:
        load_artifact(path)
    assert len(str(ei.value).splitlines()) == 1
    _one_line_exit_2(capsys, ["embed", "--model", str(path), "--data", str(tmp_path), "--split", "index",
                              "--out", str(tmp_path / "e.npz")], "bad.safetensors", "does not fit")


def test_train_init_from_a_state_dict_that_does_not_fit(tmp_path, net, capsys):
    from glr.data.synth import make_synthetic_gldv2

    root = tmp_path / "root"
    make_synthetic_gldv2(root, n_landmarks=4, scale=0.05, image_size=32, progress=False)
    path = _mismatched(tmp_path, net, lambda n: n.model_args.update(embedding_size=8))
    _one_line_exit_2(capsys, ["train", "--data", str(root), "--out", str(tmp_path / "run"), "--init-from", str(path),
                              "--epochs", "1", "--image-size", "32", "--batch-size", "4", "--num-workers", "0"],
                     "bad.safetensors", "size mismatch for 'fc.weight'")
