"""Train one stage: a :class:`~glr.train.config.TrainConfig` → data module, network, margin head →
Lightning fit → artifact.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import timm
import torch

from glr.model.archs import ARCHS
from glr.model.artifact import read_artifact, save_artifact
from glr.model.heads import HEADS, expand_head_state
from glr.model.net import LITE0_PACKAGE, build_net
from glr.train.config import TRAIN_DEFAULTS, TrainConfig, choice_message, closest
from glr.train.datamodule import GLDv2DataModule
from glr.train.module import LandmarkModule
from glr.utils import InputError

__all__ = ["TRAIN_DEFAULTS", "TrainConfig", "check_backbone", "check_config", "check_registered", "train"]

log = logging.getLogger(__name__)


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
    is a timm model, the head a registered one and, for a new network (no ``init_from``), the ``pretrained`` weights fit it.
    Reads no data."""
    check_registered(cfg.to_dict(), source, where)
    if cfg.init_from or not cfg.pretrained:
        return
    if cfg.pretrained == LITE0_PACKAGE:
        if cfg.backbone != "efficientnet_lite0":
            raise InputError(f"{where}pretrained: {LITE0_PACKAGE} holds efficientnet_lite0 weights, not "
                             f"{cfg.backbone} (give a timm-keyed weights file, or '' / null for random init)", source)
    elif not Path(cfg.pretrained).is_file():
        raise InputError(f"{where}pretrained: no such weights file {cfg.pretrained!r}", source)


def _net_for_stage(cfg: TrainConfig, backbone_given: bool) -> tuple[torch.nn.Module, dict | None]:
    """The network a stage starts from: the previous artifact's weights (its architecture
    wins; a different ``backbone`` asked for explicitly is an error), or a new one from
    ``cfg``. Also returns the artifact payload (None for a new network)."""
    if not cfg.init_from:
        return build_net(cfg.group("net")), None
    payload = read_artifact(cfg.init_from)
    net = build_net(dict(payload["model_args"]))
    net.load_state_dict(payload["state_dict"])
    if backbone_given and cfg.backbone != net.model_args["backbone"]:
        raise InputError(f"init_from holds a {net.model_args['backbone']} network, the stage asks for "
                         f"{cfg.backbone}", cfg.init_from)
    return net, payload


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


def _trainer(cfg: TrainConfig, out: Path, cuda: bool, progress: bool) -> pl.Trainer:
    """The Lightning Trainer of the ``trainer`` options (``epochs`` → ``max_epochs``; precision
    ``bf16-mixed`` on CUDA, ``32-true`` on CPU unless set; a ``limit_train_batches`` ≥ 1 is a count)."""
    kw = cfg.group("trainer")
    kw["max_epochs"] = kw.pop("epochs")
    kw["precision"] = kw["precision"] or ("bf16-mixed" if cuda else "32-true")
    if kw["limit_train_batches"] is not None and float(kw["limit_train_batches"]) >= 1:
        kw["limit_train_batches"] = int(kw["limit_train_batches"])
    return pl.Trainer(
        **kw, use_distributed_sampler=False,  # glr's samplers shard themselves (glr.train.samplers)
        logger=pl.loggers.CSVLogger(str(out), name="logs"), enable_checkpointing=False,
        callbacks=[pl.callbacks.LearningRateMonitor(logging_interval="step")],
        enable_progress_bar=progress, enable_model_summary=False, deterministic=False)


def train(root: str | os.PathLike, out: str | os.PathLike, progress: bool = True, config: TrainConfig | None = None,
          **options: Any) -> Path:
    """Train one stage: an :class:`~glr.model.net.EmbeddingNet` with a margin head.

    Args:
        root: GLDv2-format root.
        out: run folder; the artifact is written to ``out/model.pt`` and Lightning's CSV
            logs to ``out/logs``.
        progress: progress bars.
        config: the stage's options (default: :class:`TrainConfig`'s defaults).
        **options: options layered on ``config``, any field of :class:`TrainConfig` (model, head
            and loss, data, optimisation, hardware; see its help texts or ``glr train --help``).
            ``init_from``: the previous stage's artifact. Only its weights are loaded (the
            optimiser and schedule start fresh, the stage's own settings hold); head rows of
            classes the new stage keeps are copied, new classes start fresh. Its architecture
            wins unless a different ``backbone`` is given (an error).

    Every option is coerced and checked (:func:`glr.train.config.check_options`,
    :func:`check_config`) before any data is read: a bad one raises :class:`InputError`.

    Returns:
        Path of the saved artifact.
    """
    cfg = (config or TrainConfig()).updated(options)
    check_config(cfg)
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise InputError("init_from: model artifact not found", cfg.init_from)
    backbone_given = "backbone" in options or (config is not None and config.backbone != TRAIN_DEFAULTS["backbone"])
    pl.seed_everything(cfg.seed, workers=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dm = GLDv2DataModule(str(root), **cfg.group("data"))
    dm.setup("fit")
    net, prev = _net_for_stage(cfg, backbone_given)
    dm.bind_net(net, prev["data_config"] if prev else None)  # preprocessing the config leaves open
    net.train()
    module = LandmarkModule(net, num_classes=dm.num_classes, class_counts=dm.class_counts, **cfg.group("module"))
    copied = _copy_head_rows(prev, module, dm, cfg.init_from)
    cuda = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts of mixed precision
    trainer = _trainer(cfg, out, cuda, progress)
    t0 = time.time()
    trainer.fit(module, datamodule=dm)
    meta = dict(
        experiment=cfg.experiment or out.name, stage=cfg.stage, exp_id=cfg.experiment or out.name,
        backbone=net.model_args["backbone"], epochs=cfg.epochs, image_size=cfg.image_size,
        train_set=cfg.train_set, val_leak=dm.training.val_leak, num_classes=dm.num_classes,
        n_train=len(dm.train_ids), head_rows_copied=copied, init_from=cfg.init_from,
        train_seconds=round(time.time() - t0, 1),
        final_loss=float(trainer.callback_metrics.get("train/loss_epoch", float("nan"))),
        options={k: v for k, v in cfg.to_dict().items() if k != "init_from"},
        # bit-identical reruns need the same seed, workers, threads and CPU kind (tests/test_determinism.py)
        torch_threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
    )
    path = out / "model.pt"
    if trainer.is_global_zero:
        save_artifact(path, module.net, dm.data_config(), meta, head=module.head)
        log.info("saved %s", path)
    if trainer.world_size > 1:
        trainer.strategy.barrier("artifact saved")
    return path
