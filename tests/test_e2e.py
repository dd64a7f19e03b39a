"""End to end: the quick demo on the embedded data, and the demo on a root made by hand."""

import csv
import json
import random

import numpy as np
import torch
import pytest
from PIL import Image, ImageDraw

from glr import metrics
from glr.cli import main
from glr.submission import validate_submission_file
from glr.utils import file_sha256

pytestmark = pytest.mark.slow


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _foreign_root(root, n_landmarks=6, seed=0):
    """A GLDv2-format root written without glr.data.synth: one colour/shape per landmark, index
    landmark ids in a numbering of their own (index id = 1000 + 7·train id), digit-only ids."""
    rng = random.Random(seed)
    used = set()

    def new_id():
        while True:
            i = "".join(rng.choice("0123456789abcdef") for _ in range(16))
            if i not in used:
                used.add(i)
                return i

    def draw(split, image_id, lm):
        p = root / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        im = Image.new("RGB", (40, 40), (rng.randrange(200, 256),) * 3)
        d = ImageDraw.Draw(im)
        if lm is None:
            for _ in range(6):
                d.point((rng.randrange(40), rng.randrange(40)), fill=(0, 0, 0))
        else:
            colour = [(200, 30, 30), (30, 160, 30), (30, 30, 200), (200, 200, 0), (150, 0, 150), (0, 150, 150)][lm % 6]
            off = rng.randrange(-4, 5)
            shape = [d.rectangle, d.ellipse][lm % 2]
            shape([8 + off, 8 + off, 30 + off, 30 + off], fill=colour)
        im.save(p, quality=90)

    train, clean, index, i2l, test, rec, ret = [], {}, [], [], [], [], []
    index_of = {lm: [] for lm in range(n_landmarks)}
    for lm in range(n_landmarks):
        for _ in range(5):
            i = new_id()
            draw("train", i, lm)
            train.append((i, f"http://example.org/{i}.jpg", lm))
            clean.setdefault(lm, []).append(i)
        for _ in range(3):
            i = new_id()
            draw("index", i, lm)
            index.append((i,))
            i2l.append((i, 1000 + 7 * lm))
            index_of[lm].append(i)
    usages = ["Public", "Private", "Private"]
    for n in range(3 * n_landmarks):
        i = new_id()
        lm = n % n_landmarks if n < 2 * n_landmarks else None
        draw("test", i, lm)
        test.append((i,))
        usage = usages[n % 3]
        rec.append((i, "" if lm is None else str(lm), usage))
        ret.append((i, "None", "Ignored") if lm is None else (i, " ".join(index_of[lm]), usage))
    _write_csv(root / "train.csv", ["id", "url", "landmark_id"], train)
    _write_csv(root / "train_clean.csv", ["landmark_id", "images"], [(k, " ".join(v)) for k, v in clean.items()])
    _write_csv(root / "index.csv", ["id"], index)
    _write_csv(root / "index_image_to_landmark.csv", ["id", "landmark_id"], i2l)
    _write_csv(root / "test.csv", ["id"], test)
    _write_csv(root / "recognition_solution_v2.1.csv", ["id", "landmarks", "Usage"], rec)
    _write_csv(root / "retrieval_solution_v2.1.csv", ["id", "images", "Usage"], ret)
    return root


def _check_outputs(out, data):
    test_ids = [r[0] for r in list(csv.reader(open(data / "test.csv")))[1:]]
    index_ids = {r[0] for r in list(csv.reader(open(data / "index.csv")))[1:]}
    validate_submission_file(out / "submission.csv", "retrieval", expected_ids=test_ids, index_ids=index_ids)
    validate_submission_file(out / "submission_recognition.csv", "recognition", expected_ids=test_ids)
    cvj = json.loads((out / "cv.json").read_text())
    # the written cv.json is exactly what the official-semantics scorer says of the written files
    rescored = metrics.score("retrieval", data / "retrieval_solution_v2.1.csv", out / "submission.csv")
    for subset in ("public", "private"):
        assert cvj[subset] == rescored[subset]
        assert 0.0 <= cvj[subset]["map@100"] <= 1.0
    rows = list(csv.reader(open(out / "submission.csv")))
    assert rows[0] == ["id", "images"] and len(rows) == len(test_ids) + 1
    return cvj


def test_quick_demo_on_embedded_data(tmp_path, capsys):
    out, work = tmp_path / "sub", tmp_path / "work"
    assert main(["demo", "--quick", "--out", str(out), "--work", str(work), "--num-workers", "0",
                 "--kernel", str(tmp_path / "kernel")]) == 0
    cvj = _check_outputs(out, work / "data")
    assert set(cvj["baselines"]) == {"thumbnail", "imagenet"}
    assert cvj["recognition"]["public"]["gap"] is not None
    assert (out / "retrievals.png").exists()
    html = (out / "report" / "report.html").read_text()  # the demo's CV as one page, with the image grids
    assert 'src="retrievals_first.png"' in html and (out / "report" / "retrievals_first.png").is_file()
    # an ensemble of two backbones, each in two stages with growing image size and training set
    assert [(s["train_set"], s["image_size"]) for s in cvj["stages"]] == [("clean", 32), ("c2x", 40)] * 2
    assert all(s["cv"]["public"]["map@100"] is not None for s in cvj["stages"])
    assert len(cvj["ensemble"]) == 2 and len(cvj["artifacts"]) == 2
    for exp in ("quick_resnet", "quick_effnet"):
        manifest = json.loads((work / "weights" / exp / "manifest.json").read_text())
        assert [e["stage"] for e in manifest["stages"]] == ["s1", "s2"]
        assert all((work / "weights" / exp / e["file"]).is_file() for e in manifest["stages"])
    with np.load(out / "emb_index.npz") as z:  # two concatenated 512-d blocks, re-normalised
        assert z["emb"].shape[1] == 1024 and np.allclose(np.linalg.norm(z["emb"], axis=1), 1, atol=1e-5)
    printed = capsys.readouterr().out
    assert printed.count("mAP@100") >= 5 and "quick_effnet s2" in printed and "ensemble (2 models" in printed
    # the post-processing sweep: each stage's figures printed, the chosen chain wrote the submission
    assert [r["stage"] for r in cvj["sweep"]["pipeline"]] == ["baseline", "expansion", "kreciprocal",
                                                              "landmark_country", "train_label", "spatial"]
    assert all((out / f).is_file() for f in ("sweep.md", "sweep.json", "sweep.png", "postprocess.yaml"))
    assert "+ DBA/αQE" in printed and "+ k-reciprocal" in printed and "+ landmark–country" in printed
    kept = [r for r in cvj["sweep"]["pipeline"] if r["kept"]]
    for subset in ("public", "private"):
        assert cvj[subset]["map@100"] == pytest.approx(kept[-1]["scores"][subset]["map@100"], abs=1e-12)
    # the demo ends with the kernel: built from the ensemble and the chosen chain, run without glr
    # in both mount layouts, its submission equal to the library's
    assert cvj["kernel"]["parity"]["identical"] and cvj["kernel"]["parity"]["equal_rows"] > 0
    assert {r["status"] for r in cvj["kernel"]["runs"].values()} == {"ok"}
    assert "equals the library's" in printed


def test_demo_on_a_root_made_elsewhere(tmp_path):
    data = _foreign_root(tmp_path / "root")
    out = tmp_path / "sub"
    assert main(["demo", "--data", str(data), "--quick", "--no-baselines", "--out", str(out),
                 "--work", str(tmp_path / "work"), "--num-workers", "0", "--epochs", "2",
                 "--kernel", str(tmp_path / "kernel")]) == 0
    cvj = _check_outputs(out, data)
    assert cvj["kernel"]["parity"]["identical"]  # digit-only ids, another landmark numbering: same submission
    # recognition is scored in the train numbering although the index uses another one
    assert cvj["recognition"]["private"]["n_with_gt"] > 0
    # the embeddings written are one row per id, L2-normalised
    with np.load(out / "emb_index.npz") as z:
        assert z["emb"].shape[0] == 18
        assert np.allclose(np.linalg.norm(z["emb"], axis=1), 1, atol=1e-5)


def test_cli_reports_bad_input_with_file_and_line(tmp_path, capsys):
    data = _foreign_root(tmp_path / "root", n_landmarks=2)
    with open(data / "train.csv", "a") as f:
        f.write("0123456789abcdef,http://x,notanint\n")
    rc = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--backbone", "test_resnet",
               "--pretrained", "", "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "train.csv:12" in err


def _to_kaggle_layout(src, dst):
    """The Kaggle 2021 competition layout: train.csv `id,landmark_id`, image folders, no index/test
    lists and no solutions."""
    import shutil

    for split in ("train", "index", "test"):
        shutil.copytree(src / split, dst / split)
    rows = list(csv.reader(open(src / "train.csv")))[1:]
    _write_csv(dst / "train.csv", ["id", "landmark_id"], [(r[0], r[2]) for r in rows])
    return dst


def test_cv_on_kaggle_layout_writes_a_valid_submission(tmp_path, capsys):
    src = _foreign_root(tmp_path / "root", n_landmarks=3)
    data = _to_kaggle_layout(src, tmp_path / "kaggle")
    out = tmp_path / "sub"
    assert main(["cv", "--data", str(data), "--descriptor", "thumbnail", "--out", str(out), "--num-workers", "0"]) == 0
    test_ids = sorted(p.stem for p in (data / "test").rglob("*.jpg"))
    index_ids = {p.stem for p in (data / "index").rglob("*.jpg")}
    validate_submission_file(out / "submission.csv", "retrieval", expected_ids=test_ids, index_ids=index_ids)
    validate_submission_file(out / "submission_recognition.csv", "recognition", expected_ids=test_ids)
    cvj = json.loads((out / "cv.json").read_text())
    assert cvj["public"] is None and cvj["private"] is None and cvj["recognition"] is None  # no solution files


def test_train_with_validation_split_and_stage_two(tmp_path):
    from glr.model.artifact import load_artifact
    from glr.train.fit import train

    data = _foreign_root(tmp_path / "root", n_landmarks=4)
    a1 = train(data, tmp_path / "s1", backbone="test_resnet", pretrained=None, image_size=32, epochs=1,
               batch_size=8, val_fraction=0.25, num_workers=0, progress=False)
    metrics_csv = next((tmp_path / "s1" / "logs").rglob("metrics.csv")).read_text()
    assert "val/acc" in metrics_csv
    # stage 2 starts from stage 1's weights (bigger images, full train set), not from scratch
    net1, _, _ = load_artifact(a1)
    a2 = train(data, tmp_path / "s2", backbone="test_resnet", init_from=str(a1), image_size=40, epochs=1,
               batch_size=8, train_set="full", lr=0.0, num_workers=0, progress=False)
    net2, dc2, meta2 = load_artifact(a2)
    assert dc2["image_size"] == 40 and dc2["train_set"] == "full"
    assert meta2["init_from"] == {"file": a1.name, "sha256": file_sha256(a1)}  # the parent, without its path
    w1, w2 = net1.backbone.state_dict(), net2.backbone.state_dict()
    assert all(torch.equal(w1[k], w2[k]) for k in w1 if "running" not in k and "num_batches" not in k)


def test_cv_sweep_then_apply_the_chosen_chain_to_reused_embeddings(tmp_path, capsys):
    data = _foreign_root(tmp_path / "root", n_landmarks=6)
    grid = tmp_path / "grid.yaml"
    grid.write_text("expansion:\n  - {form: joint, k: [2, 3], alpha: 3.0}\n"
                    "kreciprocal:\n  - {k1: [3, 6], k2: 1, lambda: 0.3}\n"
                    "landmark_country:\n  - {alpha: 1.0, beta: 0.0, k: 3}\nshortlist: 18\n")
    o1, o2, o3 = tmp_path / "o1", tmp_path / "o2", tmp_path / "o3"
    assert main(["cv", "--data", str(data), "--descriptor", "thumbnail", "--out", str(o1), "--num-workers", "0",
                 "--sweep", str(grid)]) == 0
    printed = capsys.readouterr().out
    assert "+ k-reciprocal" in printed and (o1 / "postprocess.yaml").is_file()
    first = _check_outputs(o1, data)
    # the chosen chain on the reused embeddings writes the same submission, with no embedding at all
    assert main(["cv", "--data", str(data), "--embeddings", str(o1), "--post", str(o1 / "postprocess.yaml"),
                 "--out", str(o2), "--num-workers", "0"]) == 0
    assert (o2 / "submission.csv").read_text() == (o1 / "submission.csv").read_text()
    assert _check_outputs(o2, data)["public"] == first["public"]
    # the seed's 2021 protocol: queries with ground truth against a given index list + ground truth
    index_ids = [r[0] for r in list(csv.reader(open(data / "index.csv")))[1:]]
    _write_csv(tmp_path / "list.csv", ["id"], [(i,) for i in index_ids[:2]])
    assert main(["cv", "--data", str(data), "--embeddings", str(o1), "--protocol", "2021", "--index-list",
                 str(tmp_path / "list.csv"), "--out", str(o3), "--num-workers", "0", "--no-recognition"]) == 0
    cvj = json.loads((o3 / "cv.json").read_text())
    assert cvj["all"]["n_queries"] == 12 and 0 < cvj["all"]["map@100"] <= 1
    assert "protocol 2021" in capsys.readouterr().out
    # embeddings of other ids are refused with the file named
    assert main(["cv", "--data", str(_foreign_root(tmp_path / "other", n_landmarks=2, seed=5)),
                 "--embeddings", str(o1), "--out", str(tmp_path / "o4"), "--num-workers", "0"]) == 2
    assert "emb_test.npz" in capsys.readouterr().err
