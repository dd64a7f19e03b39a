"""Train one stage: options → data module, network, margin head → Lightning fit → artifact.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from glr.model.artifact import read_artifact, save_artifact
from glr.model.heads import expand_head_state
from glr.model.net import LITE0_PACKAGE, build_net
from glr.train.datamodule import GLDv2DataModule
from glr.train.module import LandmarkModule
from glr.utils import InputError

log = logging.getLogger(__name__)

#: Every option of :func:`train` with its default: the keys an experiment config or a
#: stage may set (the CLI builds its ``glr train`` flags from this table).
TRAIN_DEFAULTS: dict[str, Any] = dict(
    # model
    backbone="efficientnet_lite0", pretrained=LITE0_PACKAGE, embedding_size=512, gem_p=3.0, drop_rate=0.0,
    last_stride=False, bnneck=False,
    # head and loss
    head="arcface", arcface_s=30.0, arcface_m=0.2, subcenter_k=3, dynamic_margin=False, margin_a=0.45,
    margin_b=0.05, label_smoothing=0.0, class_weight_power=0.0,
    # data
    image_size=96, train_set="clean", min_samples=2, val_fraction=0.0, sampler="shuffle", pk_k=4,
    continent_probs=None, clean_prob=None, random_erasing=0.0, hflip=False, allow_val_leak=False,
    batch_size=32, num_workers=2,
    # optimisation
    epochs=5, optimizer="adamw", lr=2e-3, backbone_lr_mult=0.5, weight_decay=1e-4, momentum=0.9,
    warmup_frac=0.1, warmup_epochs=None, accumulate_grad_batches=1, seed=0,
    # hardware
    accelerator="auto", devices="auto", num_nodes=1, strategy="auto", precision=None, limit_train_batches=None,
    log_every_n_steps=10,
    # staging and provenance
    init_from=None, experiment=None, stage=None,
)


def _net_for_stage(init_from: str | None, opts: dict[str, Any], backbone_given: bool
                   ) -> tuple[torch.nn.Module, dict | None]:
    """The network a stage starts from: the previous artifact's weights (its architecture
    wins; a different ``backbone`` asked for explicitly is an error), or a new one from
    ``opts``. Also returns the artifact payload (None for a new network)."""
    if not init_from:
        return build_net({k: opts[k] for k in ("backbone", "embedding_size", "gem_p", "pretrained", "drop_rate",
                                                 "last_stride", "bnneck")}), None
    payload = read_artifact(init_from)
    net = build_net(dict(payload["model_args"]))
    net.load_state_dict(payload["state_dict"])
    if backbone_given and opts["backbone"] != net.model_args["backbone"]:
        raise InputError(f"init_from holds a {net.model_args['backbone']} network, the stage asks for "
                         f"{opts['backbone']}", init_from)
    return net, payload


def train(root: str | os.PathLike, out: str | os.PathLike, progress: bool = True, **options: Any) -> Path:
    """Train one stage: an :class:`~glr.model.EmbeddingNet` with a margin head.

    Args:
        root: GLDv2-format root.
        out: run folder; the artifact is written to ``out/model.pt`` and Lightning's CSV
            logs to ``out/logs``.
        progress: progress bars.
        **options: any key of :data:`TRAIN_DEFAULTS` (unknown keys raise ``InputError``):

            * model: ``backbone``, ``pretrained``, ``embedding_size``, ``gem_p``,
              ``drop_rate``, ``last_stride``, ``bnneck``;
            * head and loss: ``head`` (arcface | subcenter_arcface | cosface), ``arcface_s``,
              ``arcface_m``, ``subcenter_k``, ``dynamic_margin``, ``margin_a``, ``margin_b``,
              ``label_smoothing``, ``class_weight_power``;
            * data: ``image_size``, ``train_set`` (clean | c2x | full | all), ``sampler``
              (shuffle | id_uniform | continent), ``pk_k``, ``random_erasing``,
              ``allow_val_leak``, …;
            * optimisation: ``epochs``, ``optimizer`` (adamw | sgd), ``lr``, ``warmup_epochs``
              or ``warmup_frac``, ``accumulate_grad_batches``, …;
            * hardware: ``accelerator``, ``devices``, ``num_nodes``, ``strategy``,
              ``precision`` (default ``bf16-mixed`` on CUDA, ``32-true`` on CPU);
            * ``init_from``: the previous stage's artifact. Only its weights are loaded (the
              optimiser and schedule start fresh, the stage's own settings hold); head rows
              of classes the new stage keeps are copied, new classes start fresh.

    Returns:
        Path of the saved artifact.
    """
    import lightning.pytorch as pl

    unknown = set(options) - set(TRAIN_DEFAULTS)
    if unknown:
        raise InputError(f"unknown training option(s) {sorted(unknown)}; known: {sorted(TRAIN_DEFAULTS)}")
    o = dict(TRAIN_DEFAULTS, **options)
    pl.seed_everything(o["seed"], workers=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dm = GLDv2DataModule(str(root), image_size=o["image_size"], batch_size=o["batch_size"],
                         num_workers=o["num_workers"], train_set=o["train_set"], min_samples=o["min_samples"],
                         val_fraction=o["val_fraction"], seed=o["seed"], hflip=o["hflip"], sampler=o["sampler"],
                         pk_k=o["pk_k"], continent_probs=o["continent_probs"], clean_prob=o["clean_prob"],
                         random_erasing=o["random_erasing"], allow_val_leak=o["allow_val_leak"])
    dm.setup("fit")
    net, prev = _net_for_stage(o["init_from"], o, backbone_given="backbone" in options)
    net.train()
    module = LandmarkModule(net, num_classes=dm.num_classes, head=o["head"], arcface_s=o["arcface_s"],
                            arcface_m=o["arcface_m"], subcenter_k=o["subcenter_k"],
                            dynamic_margin=o["dynamic_margin"], margin_a=o["margin_a"], margin_b=o["margin_b"],
                            class_counts=dm.class_counts, class_weight_power=o["class_weight_power"],
                            label_smoothing=o["label_smoothing"], optimizer=o["optimizer"], lr=o["lr"],
                            backbone_lr_mult=o["backbone_lr_mult"], weight_decay=o["weight_decay"],
                            momentum=o["momentum"], warmup_frac=o["warmup_frac"], warmup_epochs=o["warmup_epochs"])
    copied = 0
    if prev is not None and prev.get("head_state_dict") is not None:
        old_map = {int(k): v for k, v in prev["data_config"].get("label_map", {}).items()}
        try:  # class centres carry over between ArcFace and CosFace alike; k must match
            copied = expand_head_state(prev["head_state_dict"], old_map, module.head, dm.label_map)
        except ValueError as e:
            log.warning("head rows not copied from %s: %s", o["init_from"], e)
        log.info("stage starts from %s: %d of %d classes keep their head rows", o["init_from"], copied,
                 dm.num_classes)
    cuda = torch.cuda.is_available() and o["accelerator"] in ("auto", "gpu", "cuda")
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 parts of mixed precision
    limit = o["limit_train_batches"]
    if limit is not None and float(limit) >= 1:
        limit = int(limit)
    trainer = pl.Trainer(
        max_epochs=o["epochs"], accelerator=o["accelerator"], devices=o["devices"], num_nodes=o["num_nodes"],
        strategy=o["strategy"], precision=o["precision"] or ("bf16-mixed" if cuda else "32-true"),
        accumulate_grad_batches=o["accumulate_grad_batches"],
        use_distributed_sampler=False,  # glr's samplers shard themselves (glr.samplers)
        logger=pl.loggers.CSVLogger(str(out), name="logs"), enable_checkpointing=False,
        callbacks=[pl.callbacks.LearningRateMonitor(logging_interval="step")],
        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=o["log_every_n_steps"],
        limit_train_batches=limit, deterministic=False,
    )
    t0 = time.time()
    trainer.fit(module, datamodule=dm)
    meta = dict(
        experiment=o["experiment"] or out.name, stage=o["stage"], exp_id=o["experiment"] or out.name,
        backbone=net.model_args["backbone"], epochs=o["epochs"], image_size=o["image_size"],
        train_set=o["train_set"], val_leak=dm.training.val_leak, num_classes=dm.num_classes,
        n_train=len(dm.train_ids), head_rows_copied=copied, init_from=o["init_from"],
        train_seconds=round(time.time() - t0, 1),
        final_loss=float(trainer.callback_metrics.get("train/loss_epoch", float("nan"))),
        options={k: v for k, v in o.items() if k != "init_from"},
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
