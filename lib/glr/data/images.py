"""Images: safe loading, transforms, and the datasets that feed training and extraction.

Preprocessing is four settings, stored in every artifact's data config: ``mean``, ``std``,
``interpolation`` and ``crop_pct`` (training takes those its config leaves open from what the weights
were trained with: the ``init_from`` artifact's, or the backbone's pretrained config for pretrained
weights; :meth:`glr.train.datamodule.GLDv2DataModule.preprocessing`). A data
config without some of them (artifacts written before they existed) gets :data:`LEGACY_PREPROCESSING`,
the transform every such artifact was trained and evaluated with.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

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
        if crop_pct == 1:
            return T.Compose([T.Resize((image_size, image_size), interpolation=mode), *norm])
        scaled = max(image_size, int(round(image_size / crop_pct)))
        return T.Compose([T.Resize((scaled, scaled), interpolation=mode), T.CenterCrop(image_size), *norm])
    ops: list[Callable] = [T.RandomResizedCrop(image_size, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3),
                                               interpolation=mode)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    ops.append(T.ColorJitter(0.2, 0.2, 0.2))
    ops += norm
    if random_erasing > 0:
        ops.append(T.RandomErasing(p=random_erasing, scale=(0.02, 0.33), value="random"))
    return T.Compose(ops)


def transforms_from_config(config: dict[str, Any], image_size: int | None = None
                           ) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform described by a :meth:`glr.train.datamodule.GLDv2DataModule.data_config` dict
    (at ``image_size`` when given, else the config's; missing preprocessing keys: :func:`preprocessing`)."""
    size = int(image_size if image_size is not None else config["image_size"])
    return make_transforms(size, train=False, **preprocessing(config))


def load_image(path: str | os.PathLike, image_id: str | None = None) -> Image.Image:
    """Open an image as RGB; any decode problem raises InputError naming path and id."""
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
