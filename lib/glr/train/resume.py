"""Training that survives a crash: the stage's last checkpoint, its fingerprint, and resuming from it.

A stage (:func:`glr.train.fit.train`) writes ``OUT/checkpoints/last.ckpt`` (Lightning's full state:
weights, optimiser, LR schedule, loop position, the EMA when on, and the RNG states) at the end of
every epoch and, with ``checkpoint_every_n_steps``, every N optimiser steps; only the last one is
kept. Beside it, ``OUT/checkpoints/last.json`` holds the stage's *fingerprint* and where the
checkpoint stands (epochs done, step), so that a restart checks the checkpoint against the
configuration without unpickling anything.

The fingerprint is the :class:`~glr.train.config.TrainConfig` dict minus :data:`RESUME_FREE` (the
options a resume may change: where and how fast it runs, how it logs; none of them changes what is
computed per sample), with ``init_from`` replaced by the parent artifact's sha256 (a moved file
still resumes, a retrained one does not), plus the data (``num_classes``, ``n_train``). Changing
the hardware may change the world size, hence the steps per epoch: the restored schedule then
finishes over the new step count.

With ``num_workers: 0`` a resumed stage ends with the uninterrupted run's weights bit for bit, from
an epoch-end or a mid-epoch checkpoint alike (``tests/test_resume.py``): the samplers draw epoch
``e`` from ``(seed, e)`` and :class:`ResumeState` points them at the resumed epoch (and past the
batches already trained), and it restores the torch / numpy / Python RNG states the augmentations
draw from. With loader workers the images come in the same order, but each restart seeds fresh
workers, so the augmentations of the resumed epochs differ (as they would with another
``num_workers``). A ``resume: false`` run moves an old checkpoint to ``previous.ckpt`` first.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from glr.train.config import TrainConfig
from glr.utils import InputError, atomic_write, file_sha256, read_json_object

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
SIDECAR = "last.json"
#: Where ``resume: false`` moves an old checkpoint (one is kept: the next restart replaces it).
PREVIOUS = "previous.ckpt"
#: Options a resume may change: hardware, loader workers, logging and checkpointing, and the
#: artifact's names. Every other option is part of the fingerprint.
RESUME_FREE: frozenset[str] = frozenset({
    "accelerator", "devices", "num_nodes", "strategy", "precision", "num_workers", "log_every_n_steps",
    "logger", "checkpoint_every_n_steps", "resume", "experiment", "stage",
})


def checkpoint_path(out: str | os.PathLike) -> Path:
    """``out/checkpoints/last.ckpt``."""
    return Path(out) / CHECKPOINTS / LAST


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The options that must match for a resume (see the module docstring), in field order."""
    fp = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE}
    if fp.get("init_from"):
        fp["init_from"] = "sha256:" + file_sha256(fp["init_from"])
    return fp


def _first_difference(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    for key in list(now) + [k for k in saved if k not in now]:
        if key not in saved or key not in now or saved[key] != now[key]:
            return key
    return None


def _refuse(ckpt: Path, key: str, saved: Any, now: Any) -> InputError:
    return InputError(f"checkpoint of another configuration: {key} is {saved!r} there, {now!r} here "
                      "(run with --set resume=false to start the stage over)", ckpt)


def _write_sidecar(side: Path, info: Mapping[str, Any]) -> None:
    with atomic_write(side) as f:
        json.dump(dict(info), f, indent=1, default=str)


def _move_aside(ckpt: Path) -> None:
    if rank_zero_only.rank == 0:
        os.replace(ckpt, ckpt.with_name(PREVIOUS))
        side = ckpt.with_name(SIDECAR)
        if side.is_file():
            os.replace(side, ckpt.with_name(Path(PREVIOUS).stem + ".json"))


def plan_resume(cfg: TrainConfig, out: str | os.PathLike) -> tuple[Path | None, dict[str, Any]]:
    """Decide, before any data is read, whether the stage in ``out`` resumes.

    Returns:
        ``(checkpoint, sidecar)``: the checkpoint to resume from (None: start the stage) and
        the sidecar to keep writing (the fingerprint, and the checkpoint's position when resuming).

    Raises:
        InputError: the checkpoint was written by another configuration (naming the checkpoint
            and the first differing option), or it has no readable ``last.json``.
    """
    ckpt = checkpoint_path(out)
    side = ckpt.with_name(SIDECAR)
    fresh = {"config": fingerprint(cfg), "epochs_done": 0, "step": 0, "max_epochs": cfg.epochs}
    if not ckpt.is_file():
        return None, fresh
    label = cfg.stage or Path(out).name
    if not cfg.resume:
        log.info("%s: starting over (resume: false); the old checkpoint moves to %s", label, ckpt.with_name(PREVIOUS))
        _move_aside(ckpt)
        return None, fresh
    if not side.is_file():
        raise InputError(f"checkpoint without its {SIDECAR}: its configuration cannot be checked "
                         "(run with --set resume=false to start the stage over)", ckpt)
    saved = read_json_object(side, "checkpoint fingerprint")
    key = _first_difference(saved.get("config") or {}, fresh["config"])
    if key is not None:
        raise _refuse(ckpt, key, (saved.get("config") or {}).get(key, "<unset>"), fresh["config"].get(key, "<unset>"))
    done, step = int(saved.get("epochs_done", 0)), int(saved.get("step", 0))
    if done >= cfg.epochs:  # a finished stage whose artifact was written: train it again, as a rerun always did
        log.info("%s: the checkpoint in %s is of a finished run; training the stage again", label, ckpt.parent)
        _move_aside(ckpt)
        return None, fresh
    log.info("resuming %s from %s (epoch %d of %d, step %d)", label, ckpt, done + 1, cfg.epochs, step)
    return ckpt, saved


def check_data(ckpt: Path | None, sidecar: dict[str, Any], data: Mapping[str, Any]) -> None:
    """Compare the data of a resumed stage (``num_classes``, ``n_train``) with its checkpoint's; for a
    new stage, record it. Raises :class:`InputError` naming the checkpoint on a difference."""
    saved = sidecar.get("data")
    if ckpt is not None and saved is not None:
        key = _first_difference(saved, data)
        if key is not None:
            raise _refuse(ckpt, key, saved.get(key, "<unset>"), data.get(key, "<unset>"))
    sidecar["data"] = dict(data)


def finish(out: str | os.PathLike) -> None:
    """Remove a finished stage's checkpoint and sidecar (its artifact is written)."""
    if rank_zero_only.rank == 0:
        folder = Path(out) / CHECKPOINTS
        for name in (LAST, SIDECAR):
            (folder / name).unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


class LastCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's :class:`ModelCheckpoint` writing only ``checkpoints/last.ckpt``: at every epoch's
    end and every ``every_n_steps`` optimiser steps, each save replacing the previous one (no top-k),
    followed by the sidecar's position (``epochs_done``, ``step``).

    Args:
        out: the run folder.
        sidecar: the fingerprint mapping of :func:`plan_resume` (with ``data``), written beside the
            checkpoint after each save.
        every_n_steps: also save every N optimiser steps (None: epochs only).
    """

    def __init__(self, out: str | os.PathLike, sidecar: dict[str, Any], every_n_steps: int | None = None):
        super().__init__(dirpath=str(Path(out) / CHECKPOINTS), filename=Path(LAST).stem, monitor=None, save_top_k=1,
                         every_n_train_steps=every_n_steps or None, save_on_train_epoch_end=True,
                         enable_version_counter=False)
        self._sidecar = sidecar
        self._at_epoch_end = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before the first checkpoint, so that a checkpoint never lacks its fingerprint
        if trainer.is_global_zero:
            _write_sidecar(Path(self.dirpath) / SIDECAR, self._sidecar)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._every_n_train_steps >= 1:  # steps are the trigger: add the epoch-end save ourselves
            if not self._should_skip_saving_checkpoint(trainer):
                self._at_epoch_end = True
                self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        self._at_epoch_end = True
        super().on_train_epoch_end(trainer, pl_module)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        at_end, self._at_epoch_end = self._at_epoch_end, False
        if trainer.is_global_zero:
            self._sidecar.update(epochs_done=trainer.current_epoch + int(at_end), step=trainer.global_step)
            _write_sidecar(Path(filepath).with_name(SIDECAR), self._sidecar)


def _rng_states() -> dict[str, Any]:
    """The process's RNG states as tensors and plain values (the checkpoint loads with ``weights_only``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(gauss)],
            "python": random.getstate()}


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _resume_point(checkpoint: Mapping[str, Any]) -> tuple[int, int, bool]:
    """``(epoch, batches done in it, saved at an epoch's end)`` of a Lightning checkpoint's fit loop."""
    loop = checkpoint["loops"]["fit_loop"]
    epochs = loop["epoch_progress"]["current"]
    batches = loop["epoch_loop.batch_progress"]["current"]["processed"]
    if epochs["processed"] > epochs["completed"]:  # saved in on_train_epoch_end: the next epoch starts afresh
        return epochs["processed"], 0, True
    return epochs["processed"], batches, False


class ResumeState(pl.Callback):
    """What Lightning's checkpoint leaves out, for a resume that continues the uninterrupted run.

    * The torch (CPU), numpy and Python RNG states are saved in every checkpoint and restored on a
      resume: at once for an epoch-end checkpoint (the next epoch's loader then draws its seed as
      the uninterrupted run did), once the loader is built for a mid-epoch one (the uninterrupted
      run had built it before the save). CUDA RNG states are not kept (GPU training is not
      bit-reproducible anyway).
    * The sampler: a resumed fit builds its loader (while ``configure_optimizers`` asks for the
      step count) before Lightning calls ``set_epoch``, and a loader with workers starts drawing
      indices at once. At ``on_train_start`` the sampler is pointed at the resumed epoch and, after
      a mid-epoch checkpoint, past the batches already trained
      (:meth:`glr.train.samplers.ShuffleSampler.skip_next`); a loader with workers is restarted.
    """

    def __init__(self) -> None:
        self._epoch_over = False
        self._pending: Mapping[str, Any] | None = None
        self._resume: tuple[int, int, bool] | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resume is not None:
            self._point_sampler(trainer, *self._resume)
            self._resume = None
        if self._pending is not None:  # after the loader is built, before it draws the first batch
            _set_rng_states(self._pending)
            self._pending = None

    @staticmethod
    def _point_sampler(trainer: pl.Trainer, epoch: int, batches: int, at_end: bool) -> None:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if not hasattr(sampler, "skip_next"):
            return
        if not at_end and batches >= trainer.num_training_batches:  # saved after the epoch's last batch
            epoch, batches = epoch + 1, 0
        sampler.set_epoch(epoch)
        sampler.skip_next(batches * loader.batch_size)
        if loader.num_workers > 0:  # its workers already took indices of the sampler's old position
            iter(trainer.fit_loop._data_fetcher)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_over = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_over = True

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint["glr_rng"] = dict(_rng_states(), epoch_over=self._epoch_over)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._resume = _resume_point(checkpoint)
        states = checkpoint.get("glr_rng")
        if states is None:
            return
        if states["epoch_over"]:
            _set_rng_states(states)
        else:
            self._pending = states
