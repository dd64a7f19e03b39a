"""Embedding export through Lightning strategies: one process, and a 2-process DDP run on CPU (gloo)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from glr.cli import main
from glr.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, make_transforms
from glr.data.root import GLDv2Root
from glr.embeddings.extract import extract_embeddings
from glr.embeddings.npz import load_embeddings, merge_parts
from glr.train.export import export_embeddings
from glr.model.net import build_net
from glr.model.artifact import save_artifact
from glr.utils import InputError

SPLIT = "index"  # 13 images: odd and not a multiple of 2 ranks × batch 4, so the sampler pads


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from glr.data.synth import make_synthetic_gldv2

    tmp = tmp_path_factory.mktemp("ddp")
    root = tmp / "root"
    make_synthetic_gldv2(root, n_landmarks=12, scale=0.15, image_size=32, progress=False)
    ids = GLDv2Root.open(root).index_ids()
    assert len(ids) % 2 == 1 and len(ids) % 8 != 0
    torch.manual_seed(0)
    net = build_net(dict(backbone="test_resnet", embedding_size=16)).eval()
    artifact = save_artifact(tmp / "model.pt", net,
                             {"image_size": 32, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    ds = ImageDataset(root, SPLIT, ids, transform=make_transforms(32, train=False))
    expected = extract_embeddings(net, DataLoader(ds, batch_size=5), device="cpu", progress=False)
    return dict(root=root, ids=ids, artifact=artifact, expected=expected, tmp=tmp)


def test_single_process_export_matches_extract(setup, tmp_path):
    out = tmp_path / "sub" / "emb.npz"
    path = export_embeddings(setup["artifact"], setup["root"], SPLIT, out, batch_size=4, num_workers=0,
                             accelerator="cpu", devices=1, progress=False)
    assert path == out
    ids, emb = load_embeddings(out)
    assert ids == setup["ids"]
    assert emb.dtype == np.float32 and emb.shape == (len(ids), 16)
    np.testing.assert_allclose(emb, setup["expected"], atol=1e-5)
    assert [p.name for p in out.parent.iterdir()] == ["emb.npz"]  # no parts folder, no temp file


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PL_"))
           and k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")
    return env


def _embed_cli(setup, root, out, timeout=240):
    cmd = [sys.executable, "-m", "glr", "embed", "--model", str(setup["artifact"]), "--data", str(root),
           "--split", SPLIT, "--out", str(out), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
           "--num-workers", "0", "--batch-size", "4"]
    return subprocess.run(cmd, env=_ddp_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=setup["tmp"])


def test_two_process_ddp_exports_each_id_once(setup, tmp_path):
    out = tmp_path / "ddp.npz"
    r = _embed_cli(setup, setup["root"], out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines() == [str(out)]  # printed once, by rank 0 only
    ids, emb = load_embeddings(out)
    assert ids == setup["ids"]  # every id once, in split order, despite the padded sampler
    np.testing.assert_allclose(emb, setup["expected"], atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.npz"]  # parts folder removed


def test_merge_drops_padding_and_names_missing_ids():
    ids = ["a00", "b00", "c00", "d00", "e00"]
    emb = np.eye(5, 3, dtype=np.float32)
    parts = [dict(index=np.array([0, 2, 4]), emb=emb[[0, 2, 4]]),
             dict(index=np.array([1, 3, 0]), emb=emb[[1, 3, 0]])]  # position 0 repeated as padding
    np.testing.assert_array_equal(merge_parts(parts, ids), emb)
    with pytest.raises(InputError, match=r"1 of 5 .*'d00'"):
        merge_parts([parts[0], dict(index=np.array([1]), emb=emb[[1]])], ids)
    with pytest.raises(InputError, match=r"could not be read \('c00'\); first: gone"):
        merge_parts([dict(parts[0], failed=np.array([2]), errors=np.array(["gone"]))], ids)


def test_missing_image_fails_cleanly_and_keeps_old_output(setup, tmp_path, capsys):
    ids = setup["ids"][:5] + ["fff0000000000000"]  # no such image
    out = tmp_path / "emb.npz"
    with pytest.raises(InputError, match=r"1 of 6 index images could not be read \('fff0000000000000'\).*file not found"):
        export_embeddings(setup["artifact"], setup["root"], SPLIT, out, ids=ids, num_workers=0,
                          accelerator="cpu", devices=1, progress=False)
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"old")  # an earlier export is left as it was
    argv = ["embed", "--model", str(setup["artifact"]), "--data", str(setup["root"]), "--split", "train",
            "--out", str(out), "--accelerator", "cpu", "--devices", "1", "--num-workers", "0"]
    train_ids = [i for i, _ in GLDv2Root.open(setup["root"]).train_ids_labels("clean")]
    victim = setup["root"] / "train" / train_ids[3][0] / train_ids[3][1] / train_ids[3][2] / f"{train_ids[3]}.jpg"
    data = victim.read_bytes()
    victim.unlink()
    try:
        assert main(argv) == 2
    finally:
        victim.write_bytes(data)
    err = capsys.readouterr().err
    assert "glr embed: error:" in err and repr(train_ids[3]) in err and "file not found" in err
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["emb.npz"]


def test_two_process_ddp_failure_is_reported_once_without_hanging(setup, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(setup["root"] / SPLIT, root / SPLIT)
    for f in setup["root"].glob("*.csv"):
        shutil.copy(f, root / f.name)
    bad = setup["ids"][-2]  # position 11: read by rank 1 (positions are dealt round-robin)
    (root / SPLIT / bad[0] / bad[1] / bad[2] / f"{bad}.jpg").unlink()
    out = tmp_path / "ddp.npz"
    r = _embed_cli(setup, root, out, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("glr embed: error:") == 1 and repr(bad) in r.stderr
    assert not out.exists() and not (tmp_path / ".ddp.npz.parts").exists()
