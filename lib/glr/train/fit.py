"""Train one stage: a :class:`~glr.train.config.TrainConfig` → data module, network, margin head →
Lightning fit → artifact.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning.pytorch as pl
import timm
import torch

from glr.model.archs import ARCHS
from glr.model.artifact import ARTIFACT_SUFFIX, net_from_payload, read_artifact, save_artifact
from glr.model.heads import HEADS, expand_head_state
from glr.model.net import LITE0_PACKAGE, build_net
from glr.train.config import TRAIN_DEFAULTS, TrainConfig, choice_message, closest
from glr.train.datamodule import GLDv2DataModule
from glr.train.module import LandmarkModule
from glr.train.resume import LastCheckpoint, ResumeState, check_data, finish, plan_resume
from glr.utils import InputError

__all__ = ["LOGGERS", "TRAIN_DEFAULTS", "TrainConfig", "check_backbone", "check_config", "check_logger",
           "check_registered", "train"]

log = logging.getLogger(__name__)

#: ``logger`` setting → the modules Lightning's logger needs (any one of them) and the pip package to install.
LOGGERS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "csv": ((), None),
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboardX"),
    "mlflow": (("mlflow",), "mlflow"),
    "wandb": (("wandb",), "wandb"),
}


def check_backbone(name: str, source: str | os.PathLike | None = None, where: str = "",
                   key: str = "backbone") -> None:
    """Raise :class:`InputError` (naming ``source``, ``key`` and the closest timm name) unless
    ``name`` is a timm model (``timm.is_model``: every ``timm.list_models()`` name, the ``test_*``
    tiny ones included, with or without a pretrained tag such as ``.a1_in1k``)."""
    if timm.is_model(name):
        return
    guess = closest(name, timm.list_models())
    hint = f" (did you mean {guess!r}?)" if guess else " (see timm.list_models())"
    raise InputError(f"{where}{key}: {name!r} is not a timm model{hint}", source)


def check_registered(options: Mapping[str, Any], source: str | os.PathLike | None = None, where: str = "",
                     flags: bool = False) -> None:
    """Check the options whose names live in registries that need torch: ``backbone`` (timm) and
    ``head`` (:data:`glr.model.heads.HEADS`, read now: a plugin may have registered one), where given.

    Args:
        options: one layer of options (already coerced by :func:`glr.train.config.check_options`).
        source, where: as in :func:`glr.train.config.check_options`.
        flags: name the keys as flags (``--backbone``).
    """
    def label(key: str) -> str:
        return "--" + key if flags else key

    if "backbone" in options:
        check_backbone(options["backbone"], source, where, label("backbone"))
    if "head" in options and options["head"] not in HEADS:
        raise InputError(f"{where}{label('head')}: {choice_message(options['head'], list(HEADS))}", source)
    if "arch" in options and options["arch"] not in ARCHS:
        raise InputError(f"{where}{label('arch')}: {choice_message(options['arch'], sorted(ARCHS))}", source)


def check_config(cfg: TrainConfig, source: str | os.PathLike | None = None, where: str = "") -> None:
    """The checks of a resolved configuration that the field types cannot make: the backbone
    is a timm model, the head a registered one, the logger's package installed and, for a new
    network (no ``init_from``), the ``pretrained`` weights fit it. Reads no data."""
    check_registered(cfg.to_dict(), source, where)
    check_logger(cfg.logger, source, where)
    if cfg.init_from or not cfg.pretrained:
        return
    if cfg.pretrained == LITE0_PACKAGE:
        if cfg.backbone != "efficientnet_lite0":
            raise InputError(f"{where}pretrained: {LITE0_PACKAGE} holds efficientnet_lite0 weights, not "
                             f"{cfg.backbone} (give a timm-keyed weights file, or '' / null for random init)", source)
    elif not Path(cfg.pretrained).is_file():
        raise InputError(f"{where}pretrained: no such weights file {cfg.pretrained!r}", source)


def check_logger(name: str, source: str | os.PathLike | None = None, where: str = "") -> None:
    """Raise :class:`InputError` (naming the setting and the pip package) unless the package of
    logger ``name`` (:data:`LOGGERS`) can be imported. Imports nothing."""
    modules, package = LOGGERS[name]
    if modules and not any(importlib.util.find_spec(m) for m in modules):
        raise InputError(f"{where}logger: {name!r} needs the {package} package (pip install {package})", source)


def _read_parent(cfg: TrainConfig, given: Mapping[str, bool]) -> dict | None:
    """The ``init_from`` artifact's payload (None without one), read before any data: plain data only
    (never unpickled). Its architecture wins; a different ``backbone`` or ``arch`` asked for explicitly
    (``given[key]``) is one line naming the artifact."""
    if not cfg.init_from:
        return None
    payload = read_artifact(cfg.init_from)
    args = payload["model_args"]
    for key, default in (("backbone", None), ("arch", "gem")):
        have = args.get(key, default)
        if given.get(key) and getattr(cfg, key) != have:
            what = (have, getattr(cfg, key)) if key == "backbone" else (f"arch {have!r}", f"arch {getattr(cfg, key)!r}")
            raise InputError(f"init_from holds a {what[0]} network, the stage asks for {what[1]}", cfg.init_from)
    return payload


def _net_for_stage(cfg: TrainConfig, prev: dict | None) -> torch.nn.Module:
    """The network a stage starts from: the previous artifact's (``prev``, :func:`_read_parent`)
    weights, or a new one from ``cfg``."""
    if prev is None:
        return build_net(cfg.group("net"))
    return net_from_payload(prev, cfg.init_from)  # a state dict that does not fit: one line


def _provenance(cfg: TrainConfig) -> dict[str, Any]:
    """The options as the artifact records them: no ``init_from`` (its file name and sha256 are
    recorded apart) and a ``pretrained`` weights file by its name only (no path leaves the machine)."""
    opts = {k: v for k, v in cfg.to_dict().items() if k != "init_from"}
    if opts.get("pretrained") and opts["pretrained"] != LITE0_PACKAGE:
        opts["pretrained"] = Path(opts["pretrained"]).name
    return opts


def _copy_head_rows(prev: dict | None, module: LandmarkModule, dm: GLDv2DataModule, init_from: str | None) -> int:
    """Copy the previous stage's head rows of the classes this stage keeps; returns how many."""
    if prev is None or prev.get("head_state_dict") is None:
        return 0
    copied = 0
    old_map = {int(k): v for k, v in prev["data_config"].get("label_map", {}).items()}
    try:  # class centres carry over between ArcFace and CosFace alike; k must match
        copied = expand_head_state(prev["head_state_dict"], old_map, module.head, dm.label_map)
    except ValueError as e:
        log.warning("head rows not copied from %s: %s", init_from, e)
    log.info("stage starts from %s: %d of %d classes keep their head rows", init_from, copied, dm.num_classes)
    return copied


def _logger(cfg: TrainConfig, out: Path) -> pl.loggers.Logger:
    """The ``logger`` setting's Lightning logger, writing under the run folder ``out``."""
    run = cfg.stage or out.name
    if cfg.logger == "tensorboard":
        return pl.loggers.TensorBoardLogger(str(out), name="logs", default_hp_metric=False)
    if cfg.logger == "mlflow":
        return pl.loggers.MLFlowLogger(experiment_name=cfg.experiment or out.name, run_name=run,
                                       tracking_uri=(out / "mlruns").resolve().as_uri())
    if cfg.logger == "wandb":
        return pl.loggers.WandbLogger(name=run, project=cfg.experiment or out.name, save_dir=str(out), offline=True)
    return pl.loggers.CSVLogger(str(out), name="logs")


def _trainer(cfg: TrainConfig, out: Path, cuda: bool, progress: bool, sidecar: dict[str, Any]) -> pl.Trainer:
    """The Lightning Trainer of the ``trainer`` options (``epochs`` → ``max_epochs``; precision
    ``bf16-mixed`` on CUDA, ``32-true`` on CPU unless set; a ``limit_train_batches`` ≥ 1 is a count),
    with the stage's logger, its last checkpoint (:mod:`glr.train.resume`) and, when ``ema`` is on,
    Lightning's EMA callback."""
    kw = cfg.group("trainer")
    kw["max_epochs"] = kw.pop("epochs")
    every, ema, decay = kw.pop("checkpoint_every_n_steps"), kw.pop("ema"), kw.pop("ema_decay")
    kw.pop("logger")
    kw["precision"] = kw["precision"] or ("bf16-mixed" if cuda else "32-true")
    if kw["limit_train_batches"] is not None and float(kw["limit_train_batches"]) >= 1:
        kw["limit_train_batches"] = int(kw["limit_train_batches"])
    callbacks: list[pl.Callback] = [pl.callbacks.LearningRateMonitor(logging_interval="step"), ResumeState(),
                                    LastCheckpoint(out, sidecar, every)]
    if ema:  # averages parameters and buffers after every optimiser step; copied into the model at the end
        callbacks.append(pl.callbacks.EMAWeightAveraging(decay=decay))
    return pl.Trainer(
        **kw, use_distributed_sampler=False,  # glr's samplers shard themselves (glr.train.samplers)
        logger=_logger(cfg, out), callbacks=callbacks,
        enable_progress_bar=progress, enable_model_summary=False, deterministic=False)


def _log_figures(trainer: pl.Trainer, figures: Mapping[str, float] | None) -> None:
    """Log ``figures`` (e.g. the stage's CV) to the stage's logger at its final step."""
    numbers = {k: float(v) for k, v in (figures or {}).items() if isinstance(v, (int, float)) and v == v}
    logger = trainer.logger
    if not numbers or logger is None:
        return
    if isinstance(logger, pl.loggers.TensorBoardLogger):
        # the fit's end closed its SummaryWriter, which would reopen a file of the same name (the second
        # it was opened in) within the same second, overwriting the training curves: a second events file
        with contextlib.closing(type(logger.experiment)(log_dir=logger.log_dir, filename_suffix=".figures")) as w:
            for name, value in numbers.items():
                w.add_scalar(name, value, trainer.global_step)
        return
    logger.log_metrics(numbers, step=trainer.global_step)
    logger.finalize("success")


def train(root: str | os.PathLike, out: str | os.PathLike, progress: bool = True, config: TrainConfig | None = None,
          after: Callable[[Path], Mapping[str, float] | None] | None = None, **options: Any) -> Path:
    """Train one stage: an :class:`~glr.model.net.EmbeddingNet` with a margin head.

    Args:
        root: GLDv2-format root.
        out: run folder; the artifact is written to ``out/model.safetensors``, the logger's files
            to ``out/logs`` (``csv``, ``tensorboard``), ``out/mlruns`` or ``out/wandb``, the last
            checkpoint to ``out/checkpoints/last.ckpt`` (removed once the artifact is written). A
            folder holding the checkpoint of an interrupted run of the same configuration resumes
            it (``resume``, :mod:`glr.train.resume`); one of another configuration is refused.
        progress: progress bars.
        config: the stage's options (default: :class:`TrainConfig`'s defaults).
        after: called on global rank zero with the artifact's path once it is written; the
            numbers of the mapping it returns (e.g. the stage's CV) are logged to the stage's
            logger at the final step.
        **options: options layered on ``config``, any field of :class:`TrainConfig` (model, head
            and loss, data, optimisation, hardware; see its help texts or ``glr train --help``).
            ``init_from``: the previous stage's artifact. Only its weights are loaded (the
            optimiser and schedule start fresh, the stage's own settings hold); head rows of
            classes the new stage keeps are copied, new classes start fresh. Its architecture
            wins unless a different ``backbone`` is given (an error).

    Every option is coerced and checked (:func:`glr.train.config.check_options`,
    :func:`check_config`), and a checkpoint in ``out`` against the configuration, before any data
    is read: a bad one raises :class:`InputError`.

    Returns:
        Path of the saved artifact.
    """
    cfg = (config or TrainConfig()).updated(options)
    check_config(cfg)
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise InputError("init_from: model artifact not found", cfg.init_from)
    given = {k: k in options or (config is not None and getattr(config, k) != TRAIN_DEFAULTS[k])
             for k in ("backbone", "arch")}
    prev = _read_parent(cfg, given)
    out = Path(out)
    ckpt, sidecar = plan_resume(cfg, out)
    pl.seed_everything(cfg.seed, workers=True)
    out.mkdir(parents=True, exist_ok=True)
    dm = GLDv2DataModule(str(root), **cfg.group("data"))
    dm.setup("fit")
    check_data(ckpt, sidecar, {"num_classes": dm.num_classes, "n_train": len(dm.train_ids)})
    resumed = None if ckpt is None else int(sidecar["epochs_done"])  # the sidecar moves on with the run
    net = _net_for_stage(cfg, prev)
    dm.bind_net(net, prev["data_config"] if prev else None)  # preprocessing the config leaves open
    net.train()
    module = LandmarkModule(net, num_classes=dm.num_classes, class_counts=dm.class_counts, **cfg.group("module"))
    copied = _copy_head_rows(prev, module, dm, cfg.init_from)
    cuda = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts of mixed precision
    trainer = _trainer(cfg, out, cuda, progress, sidecar)
    t0 = time.time()
    with warnings.catch_warnings():  # ResumeState makes the loader resume mid-epoch; Lightning cannot tell
        warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
        trainer.fit(module, datamodule=dm, ckpt_path=None if ckpt is None else str(ckpt), weights_only=True)
    meta = dict(
        experiment=cfg.experiment or out.name, stage=cfg.stage, exp_id=cfg.experiment or out.name,
        backbone=net.model_args["backbone"], epochs=cfg.epochs, image_size=cfg.image_size,
        train_set=cfg.train_set, val_leak=dm.training.val_leak, num_classes=dm.num_classes,
        n_train=len(dm.train_ids), head_rows_copied=copied, init_from=None if prev is None else prev["source"],
        train_seconds=round(time.time() - t0, 1),  # of this run: a resumed one counts from its restart
        resumed_from_epoch=resumed,
        final_loss=float(trainer.callback_metrics.get("train/loss_epoch", float("nan"))),
        options=_provenance(cfg),
        # bit-identical reruns need the same seed, workers, threads and CPU kind (tests/test_determinism.py)
        torch_threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
    )
    path = out / f"model{ARTIFACT_SUFFIX}"
    if trainer.is_global_zero:
        save_artifact(path, module.net, dm.data_config(), meta, head=module.head)
        log.info("saved %s", path)
        finish(out)
    if trainer.world_size > 1:
        trainer.strategy.barrier("artifact saved")
    if trainer.is_global_zero and after is not None:
        _log_figures(trainer, after(path))
    return path
