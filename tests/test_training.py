"""The training recipe: training sets and the leakage guard, re-ID switches, optimisers and
schedules, staged training (weights only, head expansion), experiments, ablations, DDP."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glr.data.root import GLDv2Root
from glr.data.images import make_transforms
from glr.workflows.experiment import parse_experiment, run_experiment
from glr.model.net import EmbeddingNet, build_net
from glr.model.artifact import read_artifact, save_artifact
from glr.train.datamodule import GLDv2DataModule
from glr.train.module import LandmarkModule
from glr.data.synth import make_synthetic_gldv2
from glr.utils import InputError, file_sha256

TINY = dict(backbone="test_resnet", pretrained=None, image_size=32, epochs=1, batch_size=8, num_workers=0,
            log_every_n_steps=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth")
    make_synthetic_gldv2(path, n_landmarks=16, scale=0.2, image_size=32, progress=False)
    return path


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- training sets
def test_training_sets_grow_and_keep_their_definitions(root):
    r = GLDv2Root.open(root)
    train = {row["id"]: int(row["landmark_id"]) for row in _rows(root / "train.csv")}
    clean = {i for row in _rows(root / "train_clean.csv") for i in row["images"].split()}
    sets = {name: r.training_set(name) for name in ("clean", "c2x", "full", "all")}
    held = r.validation_ids()
    # clean: exactly the train_clean images
    assert set(sets["clean"].ids) == clean - held and all(sets["clean"].clean)
    # c2x: the clean images plus the noisy images of clean classes, nothing else
    clean_lms = {train[i] for i in clean}
    expected_c2x = {i for i, lm in train.items() if lm in clean_lms}
    assert set(sets["c2x"].ids) == expected_c2x - held
    assert set(sets["c2x"].ids) - set(sets["clean"].ids), "the synthetic root has noisy images of clean classes"
    assert {i for i, c in zip(sets["c2x"].ids, sets["c2x"].clean) if not c} == expected_c2x - clean - held
    # full: every train.csv row
    assert set(sets["full"].ids) == set(train) - held and len(sets["full"]) > len(sets["c2x"])
    # all: full plus index images in the train numbering, matched through category names
    extra = [(i, lm, sp) for i, lm, sp in zip(sets["all"].ids, sets["all"].landmarks, sets["all"].splits)
             if sp == "index"]
    assert extra and set(sets["all"].ids) - {i for i, *_ in extra} == set(sets["full"].ids)
    tcat = {int(x["landmark_id"]): x["category"] for x in _rows(root / "train_label_to_category.csv")}
    icat = {int(x["landmark_id"]): x["category"] for x in _rows(root / "index_label_to_category.csv")}
    i2l = {x["id"]: int(x["landmark_id"]) for x in _rows(root / "index_image_to_landmark.csv")}
    for image_id, lm, _ in extra:
        assert tcat[lm] == icat[i2l[image_id]]


def test_leakage_guard(root):
    r = GLDv2Root.open(root)
    sol = _rows(root / "retrieval_solution_v2.1.csv")
    gt = {i for row in sol if row["Usage"] != "Ignored" for i in row["images"].split()}
    assert gt
    safe = r.training_set("all")
    assert not (set(safe.ids) & gt) and not safe.val_leak and safe.excluded > 0
    leaky = r.training_set("all", allow_val_leak=True)
    assert gt & set(leaky.ids) and leaky.val_leak and leaky.excluded == 0
    # the flag reaches the data config (and so every artifact trained on it)
    dm = GLDv2DataModule(str(root), image_size=16, train_set="all", allow_val_leak=True)
    dm.setup()
    assert dm.data_config()["val_leak"] is True and dm.data_config()["train_set"] == "all"


def test_a_query_in_train_csv_is_never_trained_on(root, tmp_path):
    """A validation query that also sits in train.csv (the seed's mistake) is left out."""
    import shutil

    copy = tmp_path / "root"
    shutil.copytree(root, copy)
    q = next(row["id"] for row in _rows(copy / "retrieval_solution_v2.1.csv") if row["Usage"] == "Public")
    with open(copy / "train.csv", "a") as f:
        f.write(f"{q},http://x/{q}.jpg,{_rows(copy / 'train.csv')[0]['landmark_id']}\n")
    r = GLDv2Root.open(copy)
    assert q in {i for i, _ in r.train_ids_labels("full")}
    assert q not in r.training_set("full").ids
    assert q in r.training_set("full", allow_val_leak=True).ids


def test_val_leak_reaches_the_cv_output(root, tmp_path, capsys):
    from glr.cli import main

    net = build_net(dict(backbone="test_resnet", embedding_size=16))
    cfg = {"image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "val_leak": True}
    art = save_artifact(tmp_path / "leaky.pt", net, cfg, meta={"val_leak": True})
    assert main(["cv", "--data", str(root), "--model", str(art), "--out", str(tmp_path / "cv"),
                 "--num-workers", "0", "--no-recognition"]) == 0
    assert json.loads((tmp_path / "cv" / "cv.json").read_text())["val_leak"] == [str(art)]
    assert "not a valid CV" in capsys.readouterr().out


# --------------------------------------------------------------------------- re-ID switches
def test_random_erasing_changes_training_images_only_when_on():
    img = Image.fromarray(np.full((40, 40, 3), 128, np.uint8))
    torch.manual_seed(0)
    plain = make_transforms(32, train=True, random_erasing=0.0)(img)
    torch.manual_seed(0)
    erased = make_transforms(32, train=True, random_erasing=1.0)(img)
    diff = (plain - erased).abs().sum(0) > 1e-6
    assert 0.02 * 32 * 32 <= diff.sum() <= 0.34 * 32 * 32 + 32  # one rectangle of 2-33% of the area
    with pytest.raises(ValueError, match="random_erasing"):
        GLDv2DataModule("x", random_erasing=1.5)


def test_last_stride_doubles_the_feature_map_and_keeps_the_weights():
    torch.manual_seed(0)
    a = EmbeddingNet("test_resnet", embedding_size=8)
    b = EmbeddingNet("test_resnet", embedding_size=8, last_stride=True)
    b.load_state_dict(a.state_dict())  # same parameters: only strides differ
    x = torch.randn(1, 3, 64, 64)
    fa, fb = a.backbone.forward_features(x), b.backbone.forward_features(x)
    assert fb.shape[-1] == 2 * fa.shape[-1] and fb.shape[-2] == 2 * fa.shape[-2]
    assert b.model_args["last_stride"] is True
    with pytest.raises(InputError, match="ResNet-family"):
        EmbeddingNet("test_efficientnet", embedding_size=8, last_stride=True)


def test_bnneck_bias_stays_zero_through_training():
    torch.manual_seed(0)
    net = EmbeddingNet("test_resnet", embedding_size=8, bnneck=True)
    assert not net.bn.bias.requires_grad
    module = LandmarkModule(net, num_classes=3, lr=0.1)
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])}
    emb = net.forward_unnormalised(batch["image"])
    module.loss(module.head(emb, batch["label"]), batch["label"]).backward()
    opt.step()
    assert torch.count_nonzero(net.bn.bias) == 0 and net.bn.weight.grad is not None


def test_loss_label_smoothing_and_class_weights():
    net = EmbeddingNet("test_resnet", embedding_size=8)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    labels = torch.tensor([0, 2])
    m = LandmarkModule(net, num_classes=3, label_smoothing=0.1)
    logp = torch.log_softmax(logits, 1)
    expected = -(0.9 * logp[[0, 1], labels] + 0.1 * logp.mean(1)).mean()
    assert torch.allclose(m.loss(logits, labels), expected, atol=1e-6)
    w = LandmarkModule(net, num_classes=3, class_counts=[16, 1, 1], class_weight_power=0.5)
    cw = w.class_weight
    assert cw[1] > cw[0] and torch.isclose(cw[1] / cw[0], torch.tensor(4.0))
    nll = -logp[[0, 1], labels]
    assert torch.allclose(w.loss(logits, labels), (cw[labels] * nll).sum() / cw[labels].sum(), atol=1e-6)


def test_sgd_and_warmup_in_epochs():
    net = EmbeddingNet("test_resnet", embedding_size=8)
    m = LandmarkModule(net, num_classes=3, optimizer="sgd", lr=0.01, warmup_epochs=1)

    class _T:  # the two Trainer attributes the schedule reads
        max_epochs, estimated_stepping_batches = 4, 40

    m._trainer = _T()
    conf = m.configure_optimizers()
    assert isinstance(conf["optimizer"], torch.optim.SGD) and conf["optimizer"].defaults["nesterov"]
    # 1 of 4 epochs of warm-up = 10 of 40 steps: linear to the peak, then cosine to 0
    assert m.lr_factor(0, 40) == pytest.approx(0.1) and m.lr_factor(9, 40) == pytest.approx(1.0)
    assert m.lr_factor(10, 40) == pytest.approx(1.0) and m.lr_factor(25, 40) == pytest.approx(0.5)
    assert m.lr_factor(40, 40) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="optimizer"):
        LandmarkModule(net, num_classes=3, optimizer="lamb")


# --------------------------------------------------------------------------- stages
def _lr_rows(run_dir):
    rows = _rows(next(Path(run_dir, "logs").rglob("metrics.csv")))
    key = next(k for k in rows[0] if k.startswith("lr-"))
    return [float(r[key]) for r in rows if r.get(key)]


def test_stage_two_starts_from_stage_one_weights_with_a_fresh_schedule_and_grown_head(root, tmp_path):
    from glr.train.fit import train

    a1 = train(root, tmp_path / "s1", progress=False, train_set="clean", lr=0.01, **TINY)
    lr1 = _lr_rows(tmp_path / "s1")
    assert lr1[-1] <= 0.3 * max(lr1)  # stage 1 ended its cosine decay
    opts = dict(TINY, image_size=40)
    a2 = train(root, tmp_path / "s2", progress=False, train_set="full", lr=0.004, warmup_frac=0.5,
               init_from=str(a1), **{k: v for k, v in opts.items() if k != "backbone"})
    lr2 = _lr_rows(tmp_path / "s2")
    # a fresh schedule with the new stage's settings: warm-up from lr/warm, peak at 0.004
    assert lr2[0] < 0.004 and max(lr2) == pytest.approx(0.004, rel=1e-6) and lr2[0] < lr2[1]
    p1, p2 = read_artifact(a1), read_artifact(a2)
    assert p2["data_config"]["image_size"] == 40
    assert p2["meta"]["init_from"] == {"file": a1.name, "sha256": file_sha256(a1)}  # the parent, without its path
    # the class set grew; known classes were copied into the new head before training
    m1 = {int(k): v for k, v in p1["data_config"]["label_map"].items()}
    m2 = {int(k): v for k, v in p2["data_config"]["label_map"].items()}
    assert len(m2) > len(m1) and set(m1) <= set(m2)
    assert p2["meta"]["head_rows_copied"] == len(m1)


def test_stage_two_weights_and_head_rows_are_stage_one_when_lr_is_zero(root, tmp_path):
    from glr.train.fit import train

    a1 = train(root, tmp_path / "s1", progress=False, train_set="clean", head="subcenter_arcface", **TINY)
    opts = {k: v for k, v in TINY.items() if k != "backbone"}
    a2 = train(root, tmp_path / "s2", progress=False, train_set="full", head="subcenter_arcface", lr=0.0,
               init_from=str(a1), **opts)
    p1, p2 = read_artifact(a1), read_artifact(a2)
    for k, v in p1["state_dict"].items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, p2["state_dict"][k]), k
    m1 = {int(k): v for k, v in p1["data_config"]["label_map"].items()}
    m2 = {int(k): v for k, v in p2["data_config"]["label_map"].items()}
    w1, w2, k = p1["head_state_dict"]["weight"], p2["head_state_dict"]["weight"], 3
    for lm, c1 in m1.items():
        c2 = m2[lm]
        assert torch.equal(w1[c1 * k:(c1 + 1) * k], w2[c2 * k:(c2 + 1) * k])
    new = [c for lm, c in m2.items() if lm not in m1]
    assert new and not torch.equal(w2[new[0] * k:(new[0] + 1) * k], torch.zeros_like(w2[:k]))
    assert p2["head_args"]["kind"] == "subcenter_arcface"


def test_unknown_training_option_and_backbone_mismatch_are_refused(root, tmp_path):
    from glr.train.fit import train

    with pytest.raises(InputError, match="learning_rate"):
        train(root, tmp_path / "x", learning_rate=0.1)
    art = save_artifact(tmp_path / "r.pt", build_net(dict(backbone="test_resnet", embedding_size=8)),
                        {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    with pytest.raises(InputError, match="holds a test_resnet network"):
        train(root, tmp_path / "y", init_from=str(art), backbone="test_efficientnet", num_workers=0)


# --------------------------------------------------------------------------- experiments
def test_parse_experiment_errors(tmp_path):
    def write(text):
        p = tmp_path / "exp_x.yaml"
        p.write_text(text)
        return p

    exp = parse_experiment(write("backbone: test_resnet\nstages:\n  - {image_size: 32}\n  - {stage: big, lr: 0.1}\n"))
    assert exp.name == "exp_x" and [n for n, _ in exp.stages] == ["s1", "big"]
    assert exp.stages[1][1]["backbone"] == "test_resnet" and exp.stages[1][1]["lr"] == 0.1
    with pytest.raises(InputError, match=r"stage 2 \(s2\): unknown option\(s\) \['lrr'\]"):
        parse_experiment(write("stages:\n  - {lr: 1}\n  - {lrr: 1}\n"))
    with pytest.raises(InputError, match="init_from is only for the first stage"):
        parse_experiment(write("stages:\n  - {lr: 1}\n  - {init_from: a.pt}\n"))
    with pytest.raises(InputError, match="used twice"):
        parse_experiment(write("stages:\n  - {stage: a}\n  - {stage: a}\n"))
    with pytest.raises(InputError, match="exp_x.yaml:2"):
        parse_experiment(write("a: 1\n b: [\n"))


def test_run_experiment_writes_manifest_and_resumes(root, tmp_path, capsys):
    cfg = dict(experiment="exp_t", **{k: v for k, v in TINY.items()},
               stages=[dict(stage="s1", train_set="clean"), dict(stage="s2", train_set="c2x", image_size=40)])
    res = run_experiment(cfg, root, runs=tmp_path / "runs", weights=tmp_path / "w", cv_recognition=False,
                         progress=False)
    assert [r["stage"] for r in res] == ["s1", "s2"] and not any(r["skipped"] for r in res)
    manifest = json.loads((tmp_path / "w" / "exp_t" / "manifest.json").read_text())
    assert [(e["stage"], e["train_set"], e["image_size"]) for e in manifest["stages"]] == [
        ("s1", "clean", 32), ("s2", "c2x", 40)]
    assert all(0 <= e["cv"]["map@100/public"] <= 1 and 0 <= e["cv"]["map@100/private"] <= 1
               for e in manifest["stages"])
    s2_meta = read_artifact(tmp_path / "w" / "exp_t" / "s2.safetensors")["meta"]  # the parent by name and hash
    assert s2_meta["init_from"] == {"file": "s1.safetensors",
                                  "sha256": file_sha256(tmp_path / "w" / "exp_t" / "s1.safetensors")}
    printed = capsys.readouterr().out
    assert printed.count("mAP@100") == 2
    for e in manifest["stages"]:  # each stage's CV also went to its logger, at the final step; no checkpoint left
        run = tmp_path / "runs" / "exp_t" / e["stage"]
        logged = [r for r in _rows(run / "logs" / "version_0" / "metrics.csv") if r.get("cv/public/map@100")]
        assert len(logged) == 1 and float(logged[0]["cv/public/map@100"]) == pytest.approx(e["cv"]["map@100/public"])
        assert float(logged[0]["cv/private/map@100"]) == pytest.approx(e["cv"]["map@100/private"])
        assert not (run / "checkpoints").exists()
    # a second run finds both stages in the manifest and trains nothing
    again = run_experiment(cfg, root, runs=tmp_path / "runs", weights=tmp_path / "w", progress=False)
    assert all(r["skipped"] for r in again)


def test_ablate_prints_tables_and_trains_each_setting_once(root, tmp_path, capsys):
    from glr.cli import main

    base = tmp_path / "base.yaml"
    base.write_text("".join(f"{k}: {v if v is not None else 'null'}\n" for k, v in TINY.items()))
    assert main(["ablate", "--data", str(root), "--config", str(base), "--out", str(tmp_path / "abl")]) == 0
    report = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    t2, t3 = report["tables"]["2"], report["tables"]["3"]
    assert [r["name"] for r in t2] == ["baseline", "+ random erasing", "+ label smoothing"]
    assert [r["name"] for r in t3] == ["shuffle", "id-uniform (P×K)", "continent-aware"]
    assert t3[0]["run"] == t2[0]["run"]  # the baseline is the shuffle row: trained once
    assert len({r["run"] for r in t2 + t3}) == 5
    assert all(0 <= r["public"] <= 1 and 0 <= r["private"] <= 1 for r in t2 + t3)
    assert (tmp_path / "abl" / "ablation.png").is_file()
    printed = capsys.readouterr().out
    assert "| continent-aware |" in printed and "mAP@100 Public (val)" in printed


def test_weights_pack_cli(root, tmp_path):
    from glr.cli import main

    net = build_net(dict(backbone="test_resnet", embedding_size=16))
    art = save_artifact(tmp_path / "m.pt", net, {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
                        meta={"experiment": "exp1", "stage": "s1"})
    out = tmp_path / "pack"
    assert main(["weights", "pack", str(art), "--out", str(out), "--id", "someone/glr-weights-test",
                 "--title", "glr weights test"]) == 0
    meta = json.loads((out / "dataset-metadata.json").read_text())
    assert meta["id"] == "someone/glr-weights-test" and (out / "manifest.json").is_file()
    assert main(["weights", "pack", str(art), "--out", str(tmp_path / "p2"), "--id", "bad id"]) == 2


# --------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_training_with_the_continent_sampler(root, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PL_")) and k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "glr", "train", "--data", str(root), "--out", str(out), "--backbone", "test_resnet",
           "--pretrained", "", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--num-workers", "0",
           "--sampler", "continent", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
           "--log-every-n-steps", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    p = read_artifact(out / "model.safetensors")
    assert p["meta"]["n_train"] > 0
    # each rank drew its own half of one sampler stream: steps per epoch = ceil(n / 2) / batch
    rows = _rows(next((out / "logs").rglob("metrics.csv")))
    steps = {int(r["step"]) for r in rows if r.get("train/loss_step")}
    n = p["meta"]["n_train"]
    assert max(steps) + 1 == (n + 1) // 2 // 4
