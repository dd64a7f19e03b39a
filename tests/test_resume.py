"""Training that survives a crash (issue 15, part 3): the stage's last checkpoint, resuming after a
SIGKILL, refusing a checkpoint of another configuration, EMA weights, and the loggers.

The kill test's tolerance is **exact equality** of every tensor of the artifact (``torch.equal``).
Why that holds on CPU: the resumed run restores weights, optimiser, LR schedule and loop position
(Lightning's checkpoint), the sampler draws epoch ``e`` from ``(seed, e)`` and is pointed at the
resumed epoch and batch (:class:`glr.train.resume.ResumeState`), and the torch / numpy / Python RNG
states saved in the checkpoint are restored, so with ``num_workers=0`` the same augmentations are
drawn. What is left is what any two CPU runs share (``tests/test_determinism.py``): the intra-op
thread count changes the reductions of the CPU kernels, so the subprocesses get the reference's
thread count (``OMP_NUM_THREADS``); CPU load does not matter with the thread count fixed. Measured
(this test, 2 threads, run alone and next to 5 other busy sessions, epoch-end and mid-epoch
checkpoints alike): 0 of 100 tensors differ. With loader workers a resume keeps the images' order
but seeds fresh workers, so its augmentations (hence its bits) differ: not tested for equality.
"""

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glr.cli import main
from glr.data.synth import make_synthetic_gldv2
from glr.model.artifact import read_artifact
from glr.train import config, fit
from glr.train.resume import PREVIOUS, RESUME_FREE, SIDECAR, checkpoint_path, fingerprint
from glr.train.samplers import ShuffleSampler
from glr.utils import InputError

#: 3 epochs of 3 batches; a checkpoint at every epoch's end and every 2 steps (mid-epoch ones too).
OPTS = dict(backbone="test_resnet", pretrained="", image_size=32, epochs=3, batch_size=8, num_workers=0,
            log_every_n_steps=1, limit_train_batches=3, checkpoint_every_n_steps=2)


def _flags(opts):
    return [x for k, v in opts.items() for x in ("--" + k.replace("_", "-"), str(v))]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth_resume")
    make_synthetic_gldv2(path, n_landmarks=16, scale=0.2, image_size=32, progress=False)
    return path


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory):
    """The uninterrupted run (in this process)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return fit.train(root, out, progress=False, **OPTS)


@pytest.fixture(scope="module")
def killed(root, tmp_path_factory):
    """``glr train`` in a subprocess, SIGKILLed once a checkpoint after epoch 1 is on disk; returns
    the run folder, the command and its environment, and the checkpoint's position."""
    out = tmp_path_factory.mktemp("killed") / "run"
    cmd = [sys.executable, "-m", "glr", "train", "--data", str(root), "--out", str(out), *_flags(OPTS)]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # the reference's thread count
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    side = checkpoint_path(out).with_name(SIDECAR)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if side.is_file() and json.loads(side.read_text() or "{}").get("epochs_done", 0) >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"training ended before it was killed: {proc.stderr.read()[-2000:]}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and checkpoint_path(out).is_file()
    assert not (out / "model.safetensors").exists()
    shutil.copytree(out / "checkpoints", out.parent / "at_kill")  # for the tests after the resume
    return out, cmd, env, json.loads(side.read_text())


def _killed_copy(killed, out: Path) -> Path:
    """A run folder holding the checkpoint the kill left."""
    shutil.copytree(killed[0].parent / "at_kill", out / "checkpoints")
    return checkpoint_path(out)


@pytest.mark.slow  # a training subprocess killed mid-stage (≈30 s of CPU)
def test_a_killed_stage_resumes_and_ends_with_the_uninterrupted_weights(killed, reference):
    out, cmd, env, at_kill = killed
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = re.search(r"resuming run from (\S+) \(epoch (\d+) of 3, step (\d+)\)", proc.stderr)
    assert said, proc.stderr[-3000:]
    assert Path(said[1]) == checkpoint_path(out)
    assert (int(said[2]), int(said[3])) == (at_kill["epochs_done"] + 1, at_kill["step"]) and at_kill["step"] >= 3
    a, b = read_artifact(reference), read_artifact(out / "model.safetensors")
    for key in ("state_dict", "head_state_dict"):
        differ = {k: (a[key][k].double() - b[key][k].double()).abs().max().item()
                  for k in a[key] if not torch.equal(a[key][k], b[key][k])}
        assert not differ, f"{key}: {len(differ)} of {len(a[key])} tensors differ, max |Δ| {max(differ.values()):.3g}"
    assert b["meta"]["resumed_from_epoch"] == at_kill["epochs_done"] and a["meta"]["resumed_from_epoch"] is None
    assert not (out / "checkpoints").exists()  # a finished stage leaves no checkpoint: a rerun trains again


@pytest.mark.slow  # the killed run's checkpoint
def test_a_checkpoint_of_another_configuration_is_refused_before_the_data_is_read(killed, tmp_path, capsys):
    out = tmp_path / "run"
    ckpt = _killed_copy(killed, out)
    before = ckpt.read_bytes()
    # --data names no root: the refusal comes before any data is opened
    code = main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(out), *_flags(dict(OPTS, lr=0.01))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(ckpt) in err[0] and "lr is 0.002 there, 0.01 here" in err[0] and "resume=false" in err[0]
    assert ckpt.read_bytes() == before
    # hardware, workers and logging may change on a resume
    assert {"devices", "num_workers", "logger", "resume"} <= RESUME_FREE and "lr" in fingerprint(config.TrainConfig())


@pytest.mark.slow  # the killed run's checkpoint
def test_resume_false_moves_the_old_checkpoint_aside_and_starts_over(root, killed, tmp_path):
    out = tmp_path / "run"
    old = _killed_copy(killed, out).read_bytes()
    # another configuration (1 epoch) is fine once resume is off
    fit.train(root, out, progress=False, **dict(OPTS, epochs=1, resume=False))
    assert (out / "checkpoints" / PREVIOUS).read_bytes() == old and not checkpoint_path(out).exists()
    assert read_artifact(out / "model.safetensors")["meta"]["resumed_from_epoch"] is None


def test_a_sampler_skips_the_trained_batches_of_one_epoch_only():
    s = ShuffleSampler(20, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2)
    s.skip_next(8)
    assert list(s) == full[8:] and list(s) == full  # the skip holds for one iter() only


def _tiny(root, out, **kw):
    opts = {**OPTS, "epochs": 1, "limit_train_batches": 2, "checkpoint_every_n_steps": None, **kw}
    return read_artifact(fit.train(root, out, progress=False, **opts))


def test_ema_artifact_holds_the_averaged_weights(root, tmp_path):
    """decay 0.5 over two steps: EMA = 0.5·w1 + 0.5·w2, w1 from a one-step run (its first step has the
    same LR: one warm-up step either way), w2 from the two-step run without EMA."""
    w2 = _tiny(root, tmp_path / "raw")
    w1 = _tiny(root, tmp_path / "one", limit_train_batches=1)
    ema = _tiny(root, tmp_path / "ema", ema=True, ema_decay=0.5)
    for key in ("state_dict", "head_state_dict"):
        floats = [k for k, v in w2[key].items() if v.is_floating_point()]
        assert any(not torch.equal(ema[key][k], w2[key][k]) for k in floats)
        for k in floats:
            assert torch.allclose(ema[key][k], 0.5 * w1[key][k] + 0.5 * w2[key][k], atol=1e-6, rtol=1e-5), k


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TFRecord event files under ``folder``: tag → [(step, value)]."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4  # length, its crc, the record, its crc
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_and_csv_loggers_get_the_training_curves_and_the_stage_figures(root, tmp_path):
    figures = {"cv/public/map@100": 0.25, "cv/private/map@100": 0.5}
    for logger in ("tensorboard", "csv"):
        out = tmp_path / logger
        fit.train(root, out, progress=False, after=lambda path: figures,
                  **dict(OPTS, epochs=1, limit_train_batches=2, logger=logger))
        if logger == "tensorboard":
            scalars = _tensorboard_scalars(out / "logs")
            assert [s for s, _ in scalars["train/loss_step"]] == [0, 1]
            # TensorBoard's tag rules turn '@' into '_'
            assert scalars["cv/public/map_100"] == [(2, 0.25)] and scalars["cv/private/map_100"] == [(2, 0.5)]
        else:
            import csv

            with open(out / "logs" / "version_0" / "metrics.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            assert sum(1 for r in rows if r["train/loss_step"]) == 2
            cv = [r for r in rows if r["cv/public/map@100"]]
            assert [(int(r["step"]), float(r["cv/public/map@100"]), float(r["cv/private/map@100"])) for r in cv] == [
                (2, 0.25, 0.5)]


def test_loggers_match_their_static_copy_and_a_missing_package_is_one_line(tmp_path, monkeypatch):
    assert config.LOGGERS == tuple(fit.LOGGERS)
    real = fit.importlib.util.find_spec
    monkeypatch.setattr(fit.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    with pytest.raises(InputError, match=r"logger: 'mlflow' needs the mlflow package \(pip install mlflow\)"):
        fit.train(tmp_path / "no_root", tmp_path / "out", **dict(OPTS, logger="mlflow"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="checkpoint_every_n_steps: expected an integer >= 1 or null"):
        config.TrainConfig.from_options({"checkpoint_every_n_steps": 0})
