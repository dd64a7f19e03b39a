"""The GLDv2 training data under Lightning: training set, transforms, sampler, loaders.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from glr.data.geo import load_landmark_continents
from glr.data.images import ImageDataset, make_transforms, preprocessing
from glr.data.readers import _check_split
from glr.data.root import TRAIN_SETS, GLDv2Root, TrainingSet, build_label_map
from glr.train.samplers import build_sampler
from glr.utils import InputError

log = logging.getLogger(__name__)

class GLDv2DataModule(pl.LightningDataModule):
    """Training data for landmark classification (ArcFace-style) plus eval loaders.

    After :meth:`setup`: ``gldv2`` (the opened root), ``training`` (the
    :class:`TrainingSet`), ``label_map`` (landmark → class), ``landmark_ids`` (class →
    landmark), ``num_classes``, ``class_counts`` (training images per class),
    ``train_ids`` / ``train_labels`` / ``train_splits`` / ``train_clean`` and ``val_ids`` /
    ``val_labels`` / ``val_splits`` (empty unless ``val_fraction`` > 0), and
    ``subset_pairs`` (every ``(id, landmark)`` of the set, including landmarks dropped by
    ``min_samples``).

    Args:
        root: dataset folder (either layout).
        image_size: square side of the network input.
        batch_size: images per batch (per process under DDP).
        num_workers: DataLoader workers.
        train_set: one of :data:`TRAIN_SETS`.
        min_samples: landmarks with fewer train images are dropped.
        val_fraction: share of the kept images held out for validation; a landmark
            never loses its last training image.
        seed: seed of the validation split and the samplers.
        hflip: random horizontal flips in training (off: landmarks are chiral).
        sampler: ``shuffle``, ``id_uniform`` (P×K with ``pk_k`` images per class) or
            ``continent`` (continent-aware; needs ``train_label_to_country.csv``, else
            it falls back to shuffle with a notice).
        pk_k: images per class in a P×K batch.
        continent_probs, clean_prob: continent-aware sampler settings (default: the seed's).
        random_erasing: probability of random erasing in training (0 = off).
        allow_val_leak: let the training set keep validation queries' ground truth
            (see :meth:`GLDv2Root.training_set`).
        mean, std, interpolation, crop_pct: preprocessing (:func:`glr.data.images.make_transforms`);
            ``None``: what the network's weights were trained with (:meth:`preprocessing`).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        train_set: str = "clean",
        min_samples: int = 2,
        val_fraction: float = 0.0,
        seed: int = 0,
        hflip: bool = False,
        sampler: str = "shuffle",
        pk_k: int = 4,
        continent_probs: dict[str, float] | None = None,
        clean_prob: float | None = None,
        random_erasing: float = 0.0,
        allow_val_leak: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = 1.0,
    ):
        super().__init__()
        if train_set not in TRAIN_SETS:
            raise ValueError(f"train_set must be one of {TRAIN_SETS}, got {train_set!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if image_size < 1 or batch_size < 1 or num_workers < 0 or min_samples < 1 or pk_k < 1:
            raise ValueError("image_size, batch_size, pk_k and min_samples must be >= 1, num_workers >= 0")
        if not 0.0 <= random_erasing <= 1.0:
            raise ValueError(f"random_erasing must be a probability, got {random_erasing}")
        self.save_hyperparameters()
        self._gldv2: GLDv2Root | None = None
        self.training: TrainingSet | None = None
        self.label_map: dict[int, int] = {}
        self.landmark_ids: list[int] = []
        self.class_counts: list[int] = []
        self.train_ids: list[str] = []
        self.train_labels: list[int] = []
        self.train_splits: list[str] = []
        self.train_clean: list[bool] = []
        self.val_ids: list[str] = []
        self.val_labels: list[int] = []
        self.val_splits: list[str] = []
        self.subset_pairs: list[tuple[str, int]] = []
        self._is_setup = False
        self._inherited: dict[str, Any] | None = None

    def bind_net(self, net: torch.nn.Module, parent: Mapping[str, Any] | None = None) -> None:
        """Take the preprocessing the config leaves open from what ``net``'s weights were trained with:
        the data config of the artifact they come from (``parent``, an ``init_from`` stage's), else the
        backbone's pretrained config when it starts from pretrained weights (``net.weights_preprocessing``).
        Under :meth:`lightning.pytorch.Trainer.fit` an unbound module finds the trained ``net`` itself."""
        if parent is not None:
            self._inherited = preprocessing(dict(parent))  # an artifact without the keys: the legacy ones
        else:
            self._inherited = dict(getattr(net, "weights_preprocessing", None) or {})

    def preprocessing(self) -> dict[str, Any]:
        """``mean``, ``std``, ``interpolation``, ``crop_pct`` of every transform here and of the artifact.

        Each one set in the config wins; the others are what the weights were trained with
        (:meth:`bind_net`): the ``init_from`` artifact's, or for pretrained weights the backbone's pretrained
        config (``timm.data.resolve_model_data_config``: 0.5 / 0.5 and bicubic for many ViTs, bicubic for
        efficientnet_lite0); random weights have nothing to match and get
        :data:`glr.data.images.LEGACY_PREPROCESSING` (ImageNet mean / std, bilinear), as does a data
        module with no network bound.
        """
        hp = self.hparams
        if self._inherited is None and self.trainer is not None:
            net = getattr(self.trainer.lightning_module, "net", None)
            if net is not None:
                self.bind_net(net)
        given = {k: hp.get(k) for k in ("mean", "std", "interpolation", "crop_pct")}
        return preprocessing({**(self._inherited or {}), **{k: v for k, v in given.items() if v is not None}})

    @property
    def gldv2(self) -> GLDv2Root:
        """The opened dataset root (opened on first use)."""
        if self._gldv2 is None:
            self._gldv2 = GLDv2Root.open(self.hparams.root)
        return self._gldv2

    @property
    def num_classes(self) -> int:
        """Number of classes after ``min_samples`` filtering (0 before setup)."""
        return len(self.label_map)

    def setup(self, stage: str | None = None) -> None:
        """Read the training set and build the label map; later calls do nothing."""
        if self._is_setup:
            return
        hp = self.hparams
        ts = self.gldv2.training_set(hp.train_set, allow_val_leak=hp.allow_val_leak)
        label_map = build_label_map(ts.landmarks, hp.min_samples)
        if not label_map:
            raise InputError(
                f"no landmark has at least {hp.min_samples} images in the {hp.train_set!r} training set",
                self.gldv2.root,
            )
        kept = [k for k, lm in enumerate(ts.landmarks) if lm in label_map]
        val_mask = self._val_mask([label_map[ts.landmarks[k]] for k in kept], hp.val_fraction, hp.seed)
        train_k = [k for k, v in zip(kept, val_mask) if not v]
        val_k = [k for k, v in zip(kept, val_mask) if v]
        self.training = ts
        self.subset_pairs = list(zip(ts.ids, ts.landmarks))
        self.label_map = label_map
        self.landmark_ids = sorted(label_map, key=label_map.__getitem__)
        self.train_ids = [ts.ids[k] for k in train_k]
        self.train_labels = [label_map[ts.landmarks[k]] for k in train_k]
        self.train_splits = [ts.splits[k] for k in train_k]
        self.train_clean = [ts.clean[k] for k in train_k]
        self.val_ids = [ts.ids[k] for k in val_k]
        self.val_labels = [label_map[ts.landmarks[k]] for k in val_k]
        self.val_splits = [ts.splits[k] for k in val_k]
        counts = Counter(self.train_labels)
        self.class_counts = [counts.get(c, 0) for c in range(len(label_map))]
        self._is_setup = True
        log.info(
            "%s (%s, %s): %d classes, %d train / %d val images",
            self.gldv2.root, self.gldv2.layout, hp.train_set, self.num_classes,
            len(self.train_ids), len(self.val_ids),
        )

    def train_continents(self) -> list[str | None] | None:
        """Continent of each training image (through its landmark's country), or None
        when the root has no ``train_label_to_country.csv``."""

        self._require_setup()
        continents = load_landmark_continents(self.gldv2.root)
        if continents is None:
            return None
        return [continents.get(self.landmark_ids[c]) for c in self.train_labels]

    @staticmethod
    def _val_mask(labels: Sequence[int], fraction: float, seed: int) -> list[bool]:
        """Random hold-out of ``fraction`` of the images, never a class's last one."""
        mask = [False] * len(labels)
        target = int(round(fraction * len(labels)))
        if target == 0:
            return mask
        left = Counter(labels)
        order = list(range(len(labels)))
        random.Random(seed).shuffle(order)
        taken = 0
        for k in order:
            if taken == target:
                break
            if left[labels[k]] > 1:
                left[labels[k]] -= 1
                mask[k] = True
                taken += 1
        return mask

    def _require_setup(self) -> None:
        if not self._is_setup:
            self.setup()

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Augmented batches of ``{"image", "label", "index"}`` drawn by the configured sampler.

        The samplers shard themselves across DDP ranks (the Trainer runs with
        ``use_distributed_sampler=False``), so every sampler holds under DDP.
        """

        self._require_setup()
        hp = self.hparams
        ds = ImageDataset(
            self.gldv2.root, self.train_splits, self.train_ids, self.train_labels,
            make_transforms(hp.image_size, train=True, hflip=hp.hflip, random_erasing=hp.random_erasing,
                            **self.preprocessing()),
        )
        world, rank = 1, 0
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            world, rank = trainer.world_size, trainer.global_rank
        kwargs: dict[str, Any] = {}
        if hp.sampler == "continent":
            kwargs.update(continents=self.train_continents(), clean=self.train_clean)
            if hp.continent_probs:
                kwargs["probs"] = dict(hp.continent_probs)
            if hp.clean_prob is not None:
                kwargs["clean_prob"] = float(hp.clean_prob)
        sampler = build_sampler(hp.sampler, self.train_labels, k=hp.pk_k, seed=hp.seed,
                                num_replicas=world, rank=rank, **kwargs)
        workers = hp.num_workers
        return DataLoader(ds, batch_size=hp.batch_size, sampler=sampler, drop_last=len(sampler) > hp.batch_size,
                          num_workers=workers, persistent_workers=workers > 0,
                          pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader | list:
        """Eval-transform batches of the held-out images; ``[]`` when val_fraction is 0."""
        self._require_setup()
        if not self.val_ids:
            return []
        ds = ImageDataset(
            self.gldv2.root, self.val_splits, self.val_ids, self.val_labels,
            make_transforms(self.hparams.image_size, train=False, **self.preprocessing()),
        )
        return self._loader(ds, shuffle=False, drop_last=False)

    def eval_dataloader(self, split: str, ids: Sequence[str] | None = None) -> DataLoader:
        """Unshuffled eval-transform batches of ``{"image", "index"}`` (no labels).

        Args:
            split: 'train', 'index' or 'test'.
            ids: images to load; default every id of the split (for 'train': the train
                images of the configured training set, ``subset_pairs`` order).
        """
        _check_split(split)
        if ids is None:
            if split == "train":
                self._require_setup()
                assert self.training is not None
                ids = [i for i, sp in zip(self.training.ids, self.training.splits) if sp == "train"]
            else:
                ids = self.gldv2.index_ids() if split == "index" else self.gldv2.test_ids()
        transform = make_transforms(self.hparams.image_size, train=False, **self.preprocessing())
        ds = ImageDataset(self.gldv2.root, split, ids, None, transform)
        return self._loader(ds, shuffle=False, drop_last=False)

    def data_config(self) -> dict[str, Any]:
        """JSON-serialisable description of the preprocessing and classes.

        Stored inside model artifacts so inference needs no training config; feed it to
        :func:`transforms_from_config`. ``mean``, ``std``, ``interpolation``, ``crop_pct``: as
        :meth:`preprocessing` resolves them. ``label_map`` keys are ``str(landmark_id)``;
        ``class_counts`` are the training images per class (dynamic margins need them).
        """
        self._require_setup()
        hp = self.hparams
        return {
            "image_size": int(hp.image_size),
            **self.preprocessing(),
            "train_set": hp.train_set,
            "val_leak": bool(self.training.val_leak) if self.training else False,
            "min_samples": int(hp.min_samples),
            "num_classes": self.num_classes,
            "label_map": {str(lm): c for lm, c in self.label_map.items()},
            "class_counts": list(self.class_counts),
        }
