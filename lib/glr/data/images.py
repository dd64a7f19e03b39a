"""Images: safe loading, transforms, and the datasets that feed training and extraction.

Preprocessing is four settings, stored in every artifact's data config: ``mean``, ``std``,
``interpolation`` and ``crop_pct`` (training takes those its config leaves open from what the weights
were trained with: the ``init_from`` artifact's, or the backbone's pretrained config for pretrained
weights; :meth:`glr.train.datamodule.GLDv2DataModule.preprocessing`). A data
config without some of them (artifacts written before they existed) gets :data:`LEGACY_PREPROCESSING`,
the transform every such artifact was trained and evaluated with.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from glr.data.readers import _check_split, image_path
from glr.utils import InputError

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)


IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Resize interpolations (torchvision's ``InterpolationMode`` values; timm's pretrained configs use
#: ``bilinear`` and ``bicubic``).
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic", "nearest", "nearest-exact", "lanczos", "box", "hamming")

#: The preprocessing of a data config that does not say (ImageNet mean / std, bilinear square resize).
LEGACY_PREPROCESSING: dict[str, Any] = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                        "interpolation": "bilinear", "crop_pct": 1.0}


def interpolation_mode(name: str) -> T.InterpolationMode:
    """torchvision's mode for an :data:`INTERPOLATIONS` name.

    Raises:
        InputError: another name.
    """
    if name not in INTERPOLATIONS:
        raise InputError(f"interpolation: expected one of {', '.join(INTERPOLATIONS)}, got {name!r}")
    return T.InterpolationMode(name)


def preprocessing(config: dict[str, Any]) -> dict[str, Any]:
    """``mean``, ``std``, ``interpolation`` and ``crop_pct`` of a data config, each missing (or null)
    one from :data:`LEGACY_PREPROCESSING`: the keyword arguments of :func:`make_transforms`."""
    out = {**LEGACY_PREPROCESSING, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    for k in ("mean", "std"):
        if config.get(k) is not None:
            out[k] = [float(v) for v in config[k]]
    if config.get("interpolation") is not None:
        out["interpolation"] = str(config["interpolation"])
    if config.get("crop_pct") is not None:
        out["crop_pct"] = float(config["crop_pct"])
    return out


def make_transforms(
    image_size: int,
    train: bool,
    hflip: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    random_erasing: float = 0.0,
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image → normalised float tensor ``(3, image_size, image_size)``.

    Train: RandomResizedCrop(scale 0.6-1, ratio 3/4-4/3), optional horizontal flip
    (off by default: landmarks are chiral, text and layout flip), ColorJitter(0.2, 0.2,
    0.2), and with ``random_erasing`` > 0 the re-ID trick of Zhong et al. (AAAI 2020):
    with that probability a random rectangle (2-33% of the area) of the normalised
    tensor is filled with noise. Eval: the whole image resized to a square
    (``crop_pct`` 1: nothing of the landmark is cut); with ``crop_pct`` < 1, resized to the
    square ``round(image_size / crop_pct)`` and centre-cropped to ``image_size`` (timm's
    ``crop_mode='squash'``: the aspect ratio is not kept, as in the square resize). Both end
    with ToTensor and Normalize; every resize uses ``interpolation`` (antialiased: PIL images).
    """
    mode = interpolation_mode(interpolation)
    if not 0 < crop_pct <= 1:
        raise InputError(f"crop_pct: expected a number in (0, 1], got {crop_pct!r}")
    norm = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    if not train:
        return T.Compose([*_eval_geometry(image_size, mode, crop_pct), *norm])
    ops: list[Callable] = [T.RandomResizedCrop(image_size, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3),
                                               interpolation=mode)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    ops.append(T.ColorJitter(0.2, 0.2, 0.2))
    ops += norm
    if random_erasing > 0:
        ops.append(T.RandomErasing(p=random_erasing, scale=(0.02, 0.33), value="random"))
    return T.Compose(ops)


def _eval_geometry(image_size: int, mode: T.InterpolationMode, crop_pct: float) -> list[Callable]:
    """The PIL → PIL part of the eval transform: the square resize, then the centre crop when ``crop_pct`` < 1."""
    if crop_pct == 1:
        return [T.Resize((image_size, image_size), interpolation=mode)]
    scaled = max(image_size, int(round(image_size / crop_pct)))
    return [T.Resize((scaled, scaled), interpolation=mode), T.CenterCrop(image_size)]


def transforms_from_config(config: dict[str, Any], image_size: int | None = None
                           ) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform described by a :meth:`glr.train.datamodule.GLDv2DataModule.data_config` dict
    (at ``image_size`` when given, else the config's; missing preprocessing keys: :func:`preprocessing`)."""
    size = int(image_size if image_size is not None else config["image_size"])
    return make_transforms(size, train=False, **preprocessing(config))


_decodes = 0  # load_image calls in this process (decode_count)


def decode_count() -> int:
    """How many images this process has decoded (:func:`load_image` calls, failed ones included).

    Each process counts its own: a loader worker's decodes travel back in the items of
    :class:`MultiViewDataset` (``decodes``)."""
    return _decodes


def load_image(path: str | os.PathLike, image_id: str | None = None) -> Image.Image:
    """Open an image as RGB; any decode problem raises InputError naming path and id."""
    global _decodes
    _decodes += 1
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        what = "image" if image_id is None else f"image {image_id!r}"
        reason = "file not found" if isinstance(e, FileNotFoundError) else str(e)
        raise InputError(f"cannot read {what}: {reason}", path) from None


class ImageDataset(Dataset):
    """Images of one split, addressed by id.

    Items are dicts: ``image`` float tensor ``(3, H, W)``, ``label`` long scalar (only
    when ``labels`` is given) and ``index`` (position in ``ids``).

    Args:
        root: dataset folder.
        split: 'train', 'index' or 'test', or one of those per id (the ``all`` training
            set mixes train and index images).
        ids: image ids.
        labels: class index per id, or None.
        transform: PIL image → tensor; default ``ToTensor()`` (native size).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | Sequence[str],
        ids: Sequence[str],
        labels: Sequence[int] | None = None,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ):
        if isinstance(split, str):
            _check_split(split)
        else:
            split = list(split)
            if len(split) != len(ids):
                raise ValueError(f"{len(ids)} ids but {len(split)} splits")
            for x in set(split):
                _check_split(x)
        if labels is not None and len(labels) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(labels)} labels")
        self.root = Path(root)
        self.split = split
        self.ids = list(ids)
        self.labels = None if labels is None else [int(x) for x in labels]
        self.transform = transform if transform is not None else T.ToTensor()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.ids[index]
        split = self.split if isinstance(self.split, str) else self.split[index]
        image = load_image(image_path(self.root, split, image_id), image_id)
        item: dict[str, Any] = {"image": self.transform(image), "index": index}
        if self.labels is not None:
            item["label"] = torch.tensor(self.labels[index], dtype=torch.long)
        return item


class SafeImages(Dataset):
    """An :class:`~glr.data.images.ImageDataset` whose unreadable images do not raise.

    A failed item is a zero image with ``ok=False`` and the error message. The DDP export
    lets every rank finish its share and reports failures once, after the merge (an
    exception in one rank would leave the others waiting in a collective); the Kaggle
    kernel counts and skips them.
    """

    def __init__(self, dataset: Dataset, image_size: int):
        self.dataset = dataset
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        try:
            item = self.dataset[index]
        except InputError as e:
            return {"image": torch.zeros(3, self.image_size, self.image_size), "index": index,
                    "ok": False, "error": str(e)}
        item["ok"] = True
        item["error"] = ""
        return item


# --------------------------------------------------------------------------- decode once, many views
@dataclass(frozen=True)
class EvalView:
    """One eval transform (:func:`make_transforms` with ``train=False``): a square of ``size`` pixels
    with its preprocessing. Equal views are the same transform, computed once per image."""

    size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    @classmethod
    def of(cls, size: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
           interpolation: str = "bilinear", crop_pct: float = 1.0) -> "EvalView":
        """A view from :func:`make_transforms`' keyword arguments (None mean / std: ImageNet's)."""
        return cls(int(size), tuple(float(v) for v in (mean or IMAGENET_MEAN)),
                   tuple(float(v) for v in (std or IMAGENET_STD)), str(interpolation), float(crop_pct))

    @property
    def geometry(self) -> tuple[int, str, float]:
        """What the PIL part of the transform depends on (views sharing it share the resize)."""
        return self.size, self.interpolation, self.crop_pct

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image → normalised ``(3, size, size)`` float tensor."""
        return make_transforms(self.size, train=False, mean=self.mean, std=self.std,
                               interpolation=self.interpolation, crop_pct=self.crop_pct)


def _as_is(image: Image.Image) -> Image.Image:
    return image


class MultiViewDataset(Dataset):
    """Images of one split, each decoded once and returned in every distinct view.

    Each geometry (size, interpolation, crop) is resized once from the decode, turned into a tensor
    once, then normalised per mean / std: the same operations, in the same order, as each view's
    own :meth:`EvalView.transform`, so every view's tensor is bit-identical to it.

    Items are dicts: ``views`` a list of ``(3, s, s)`` float tensors, one per entry of
    :attr:`views` (``views`` without repeats, in first-seen order); ``index``; ``ok`` and ``error``
    (with ``skip_unreadable`` an unreadable image gives zero tensors, ``ok`` False and the message;
    without it, :class:`~glr.utils.InputError` naming the image); ``decodes``, the number of
    decodes the item took (1), counted by :func:`decode_count` in the process that loaded it.
    """

    def __init__(self, root: str | os.PathLike, split: str | Sequence[str], ids: Sequence[str],
                 views: Sequence[EvalView], skip_unreadable: bool = False):
        if not views:
            raise ValueError("MultiViewDataset needs at least one view")
        self.images = ImageDataset(root, split, ids, transform=_as_is)
        self.views: list[EvalView] = list(dict.fromkeys(views))
        self.skip_unreadable = skip_unreadable
        for v in self.views:
            if not 0 < v.crop_pct <= 1:
                raise InputError(f"crop_pct: expected a number in (0, 1], got {v.crop_pct!r}")
        geometries = list(dict.fromkeys(v.geometry for v in self.views))
        self._resize = [T.Compose(_eval_geometry(size, interpolation_mode(interp), crop))
                        for size, interp, crop in geometries]
        self._geometry_of = [geometries.index(v.geometry) for v in self.views]
        self._to_tensor = T.ToTensor()
        self._normalize = [T.Normalize(mean=list(v.mean), std=list(v.std)) for v in self.views]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        before = decode_count()
        try:
            image = self.images[index]["image"]
        except InputError as e:
            if not self.skip_unreadable:
                raise
            return {"views": [torch.zeros(3, v.size, v.size) for v in self.views], "index": index, "ok": False,
                    "error": str(e), "decodes": decode_count() - before}
        tensors = [self._to_tensor(resize(image)) for resize in self._resize]
        views = [norm(tensors[g]) for norm, g in zip(self._normalize, self._geometry_of)]
        return {"views": views, "index": index, "ok": True, "error": "", "decodes": decode_count() - before}


# --------------------------------------------------------------------------- loader threads and workers
def default_num_workers() -> int:
    """Loader workers for this machine: the cores this process may use less one (the main process
    runs the forwards), at most 8, at least 0 (one core: the main process decodes)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


def resolve_num_workers(value: int | str | None, setting: str = "num_workers",
                        source: str | os.PathLike | None = None) -> int:
    """A ``num_workers`` setting as a count: ``"auto"`` (or None) is :func:`default_num_workers`.

    Raises:
        InputError: anything but ``"auto"`` or a whole number >= 0, naming ``setting`` (and ``source``).
    """
    if value is None or value == "auto":
        return default_num_workers()
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise InputError(f"{setting}: expected a number of workers >= 0 or 'auto', got {value!r}", source)


def one_thread_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the loaders: one intra-op thread per worker (several workers with
    torch's default threads each would fight over the cores)."""
    torch.set_num_threads(1)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread, then put the previous count back: the
    transforms a loader without workers runs in the main process (the forwards keep the
    process's threads)."""
    old = torch.get_num_threads()
    if old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
