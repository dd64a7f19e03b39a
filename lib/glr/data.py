"""GLDv2 metadata readers and image datasets (the Lightning DataModule is in :mod:`glr.training`).

Formats follow ``GLDV2_SPEC.md`` sections 1-3. Every CSV is read with the stdlib
``csv`` module, so ids stay exact strings (``0000000000000e12`` is not a float, leading
zeros survive) and quoted fields work. A malformed row raises
:class:`glr.utils.InputError` naming the file and the 1-based line (header = line 1).

Two on-disk layouts are recognised by :meth:`GLDv2Root.open`:

* ``"gldv2"`` — the official v2.1 release: ``train.csv`` (``id,url,landmark_id``),
  ``train_clean.csv``, ``index.csv``, ``test.csv``, the ``*_solution_v2.1.csv`` files and
  image folders ``train/``, ``index/``, ``test/``.
* ``"kaggle"`` — the Kaggle 2020/2021 competitions: ``train.csv`` (``id,landmark_id``,
  already the clean subset) and image folders; index/test ids come from scanning
  ``<split>/*/*/*/*.jpg`` (sorted) when no ``index.csv`` / ``test.csv`` is present.

Image paths are ``<root>/<split>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg`` for every split.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from glr.utils import InputError

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

SPLITS = ("train", "index", "test")
#: Training sets, smallest first (the seed's staged schedule clean → c2x → full → all):
#: ``clean`` (``train_clean.csv``), ``c2x`` (clean plus the noisy ``train.csv`` images of
#: clean classes), ``full`` (every ``train.csv`` row) and ``all`` (full plus the labelled
#: index images, matched to train landmarks through their category names).
TRAIN_SETS = ("clean", "c2x", "full", "all")
TRAIN_SUBSETS = ("full", "clean")  # what recognition votes with (train images only)
SOLUTION_FILES = {
    "retrieval": "retrieval_solution_v2.1.csv",
    "recognition": "recognition_solution_v2.1.csv",
}

# train_clean.csv packs all ids of a landmark into one field (17 chars per id); the csv
# module's default limit (131072 chars) would stop at ~7700 images per landmark.
_FIELD_LIMIT = 1 << 28
# Characters that can never be part of an image id (they would break space-separated
# id lists or escape the image folder).
_BAD_ID_CHARS = re.compile(r"[\s/\\]")


# ---------------------------------------------------------------------------
# CSV plumbing


def _csv_rows(path: str | os.PathLike, required: Sequence[str]) -> Iterator[tuple[int, list[str], dict[str, int]]]:
    """Yield ``(line, row, columns)`` for every non-blank data row of a headed CSV.

    ``columns`` maps header names to field positions. The header must contain every
    name in ``required``; each row must have as many fields as the header.
    """
    path = Path(path)
    if csv.field_size_limit() < _FIELD_LIMIT:
        csv.field_size_limit(_FIELD_LIMIT)
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except OSError as e:
        raise InputError(f"cannot open file: {e.strerror or e}", path) from None
    with f:
        reader = csv.reader(f)
        try:
            try:
                header = next(reader)
            except StopIteration:
                raise InputError(f"empty file, expected a header with {','.join(required)}", path, 1) from None
            columns: dict[str, int] = {}
            for i, name in enumerate(header):
                columns.setdefault(name.strip(), i)
            missing = [c for c in required if c not in columns]
            if missing:
                raise InputError(
                    f"missing column(s) {', '.join(missing)}; header is {','.join(header)!r}", path, 1
                )
            n = len(header)
            for row in reader:
                if len(row) != n:
                    if not row:  # blank line
                        continue
                    raise InputError(
                        f"expected {n} fields ({','.join(header)}), got {len(row)}", path, reader.line_num
                    )
                yield reader.line_num, row, columns
        except (csv.Error, UnicodeDecodeError) as e:
            raise InputError(f"unreadable CSV: {e}", path, reader.line_num + 1) from None


def _header(path: Path) -> list[str]:
    """The stripped header names of a CSV file (missing file → InputError)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [c.strip() for c in next(csv.reader(f), [])]
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise InputError(f"cannot read header: {e}", path, 1) from None


def _parse_landmark(cell: str, path: Path, line: int) -> int:
    # int() would also accept " 12", "+12", "1_000" and "-3".
    if not (cell.isascii() and cell.isdigit()):
        raise InputError(f"landmark id must be a non-negative integer, got {cell!r}", path, line)
    return int(cell)


def _check_id(image_id: str, path: Path, line: int) -> str:
    if not image_id:
        raise InputError("empty image id", path, line)
    if _BAD_ID_CHARS.search(image_id):
        raise InputError(f"image id {image_id!r} contains whitespace or a path separator", path, line)
    return image_id


def _read_id_landmark(path: str | os.PathLike) -> Iterator[tuple[str, int]]:
    """``(id, landmark_id)`` pairs of a file with ``id`` and ``landmark_id`` columns."""
    path = Path(path)
    seen: set[str] = set()
    for line, row, cols in _csv_rows(path, ("id", "landmark_id")):
        image_id = _check_id(row[cols["id"]], path, line)
        landmark = _parse_landmark(row[cols["landmark_id"]], path, line)
        if image_id in seen:
            _duplicate_id(path, image_id, line)
        seen.add(image_id)
        yield image_id, landmark


def _duplicate_id(path: Path, image_id: str, line: int) -> None:
    """Raise the duplicate-id error; the first occurrence is found by re-reading (rare path)."""
    first = next(ln for ln, row, cols in _csv_rows(path, ("id",)) if row[cols["id"]] == image_id)
    raise InputError(f"duplicate image id {image_id!r} (first on line {first})", path, line)


# ---------------------------------------------------------------------------
# Readers


def image_path(root: str | os.PathLike, split: str, image_id: str) -> Path:
    """Path of an image: ``root/split/id[0]/id[1]/id[2]/id.jpg``.

    Raises:
        InputError: the id is shorter than 3 characters or contains a path separator.
    """
    if len(image_id) < 3 or _BAD_ID_CHARS.search(image_id):
        raise InputError(f"invalid image id {image_id!r}: need at least 3 characters and no separators")
    return Path(root, split, image_id[0], image_id[1], image_id[2], image_id + ".jpg")


def read_train(path: str | os.PathLike) -> list[tuple[str, int]]:
    """Read ``train.csv``: official ``id,url,landmark_id`` or Kaggle ``id,landmark_id``.

    Columns are located by header name; extra columns are ignored.

    Returns:
        ``(image_id, landmark_id)`` in file order.

    Raises:
        InputError: missing file or column, wrong field count, empty/duplicate id,
            landmark id that is not a non-negative integer.
    """
    return list(_read_id_landmark(path))


def read_image_to_landmark(path: str | os.PathLike) -> dict[str, int]:
    """Read ``index_image_to_landmark.csv`` (``id,landmark_id``, index numbering).

    Returns:
        image id → landmark id, in file order.
    """
    return dict(_read_id_landmark(path))


def read_train_clean(path: str | os.PathLike) -> dict[int, list[str]]:
    """Read ``train_clean.csv`` (``landmark_id,images``; images space-separated).

    Returns:
        landmark id → its image ids, in file order.

    Raises:
        InputError: malformed row, duplicate landmark id, bad image id, or an image
            listed under two landmarks.
    """
    path = Path(path)
    out: dict[int, list[str]] = {}
    lines: dict[int, int] = {}
    owner: dict[str, int] = {}
    for line, row, cols in _csv_rows(path, ("landmark_id", "images")):
        landmark = _parse_landmark(row[cols["landmark_id"]], path, line)
        if landmark in lines:
            raise InputError(f"duplicate landmark id {landmark} (first on line {lines[landmark]})", path, line)
        lines[landmark] = line
        ids = row[cols["images"]].split()
        for image_id in ids:
            _check_id(image_id, path, line)
            prev = owner.setdefault(image_id, landmark)
            if prev != landmark:
                raise InputError(
                    f"image id {image_id!r} listed under landmarks {prev} and {landmark}", path, line
                )
        if len(set(ids)) != len(ids):
            dup = next(i for i, c in Counter(ids).items() if c > 1)
            raise InputError(f"image id {dup!r} listed twice for landmark {landmark}", path, line)
        out[landmark] = ids
    return out


def read_label_table(path: str | os.PathLike, column: str = "category") -> dict[int, str]:
    """Read a per-landmark table such as ``train_label_to_category.csv``.

    Also reads the non-official ``train_label_to_country.csv``
    (``landmark_id,country,continent``) with ``column="country"`` or ``"continent"``.

    Args:
        path: the CSV file.
        column: the value column to return.

    Returns:
        landmark id → the string in ``column``.
    """
    path = Path(path)
    out: dict[int, str] = {}
    lines: dict[int, int] = {}
    for line, row, cols in _csv_rows(path, ("landmark_id", column)):
        landmark = _parse_landmark(row[cols["landmark_id"]], path, line)
        if landmark in lines:
            raise InputError(f"duplicate landmark id {landmark} (first on line {lines[landmark]})", path, line)
        lines[landmark] = line
        out[landmark] = row[cols[column]]
    return out


def read_ids(path: str | os.PathLike) -> list[str]:
    """Read the ``id`` column of ``index.csv`` / ``test.csv`` (extra columns ignored).

    Returns:
        Image ids in file order.
    """
    path = Path(path)
    out: list[str] = []
    seen: set[str] = set()
    for line, row, cols in _csv_rows(path, ("id",)):
        image_id = _check_id(row[cols["id"]], path, line)
        if image_id in seen:
            _duplicate_id(path, image_id, line)
        seen.add(image_id)
        out.append(image_id)
    return out


def scan_image_ids(root: str | os.PathLike, split: str) -> list[str]:
    """Ids of all ``<root>/<split>/*/*/*/*.jpg`` files, sorted.

    Dot-files are skipped. A ``.jpg`` whose folders do not match its id's first three
    characters raises InputError (it could never be found again by :func:`image_path`).
    """
    base = Path(root, split)
    if not base.is_dir():
        raise InputError(f"image folder for split {split!r} not found", base)
    ids: list[str] = []

    def subdirs(p: str) -> list[os.DirEntry]:
        with os.scandir(p) as it:
            return [e for e in it if e.is_dir() and not e.name.startswith(".")]

    for d1 in subdirs(str(base)):
        for d2 in subdirs(d1.path):
            for d3 in subdirs(d2.path):
                with os.scandir(d3.path) as it:
                    for e in it:
                        name = e.name
                        if not name.endswith(".jpg") or name.startswith(".") or not e.is_file():
                            continue
                        stem = name[:-4]
                        if len(stem) < 3 or (stem[0], stem[1], stem[2]) != (d1.name, d2.name, d3.name):
                            raise InputError(
                                f"image {stem!r} is not under {split}/<id[0]>/<id[1]>/<id[2]>/", e.path
                            )
                        ids.append(stem)
    ids.sort()
    return ids


# ---------------------------------------------------------------------------
# Dataset root


@dataclass(frozen=True)
class TrainingSet:
    """One training set, image by image (all lists are parallel).

    Attributes:
        name: one of :data:`TRAIN_SETS`.
        ids: image ids.
        landmarks: train-numbering landmark id per image.
        splits: image folder per image (``train``; ``index`` for the index images of ``all``).
        clean: whether each image is in ``train_clean.csv`` (index images count as clean).
        val_leak: True when validation ground truth was deliberately kept (``allow_val_leak``).
        excluded: images left out because they are validation queries or their ground truth.
    """

    name: str
    ids: list[str]
    landmarks: list[int]
    splits: list[str]
    clean: list[bool]
    val_leak: bool = False
    excluded: int = 0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class GLDv2Root:
    """A GLDv2 (or Kaggle GLR) dataset folder; build it with :meth:`open`.

    Attributes:
        root: the dataset folder.
        layout: ``"gldv2"`` (official v2.1, ``train.csv`` has a ``url`` column) or
            ``"kaggle"`` (``train.csv`` is ``id,landmark_id``; index/test ids come from
            the image folders unless an ``index.csv`` / ``test.csv`` is present).
    """

    root: Path
    layout: str

    @classmethod
    def open(cls, root: str | os.PathLike) -> "GLDv2Root":
        """Detect the layout of ``root`` from the header of its ``train.csv``.

        Raises:
            InputError: ``root`` is not a folder, or ``train.csv`` is missing or lacks
                ``id`` / ``landmark_id``.
        """
        root = Path(root)
        if not root.is_dir():
            raise InputError("dataset root is not a folder", root)
        train = root / "train.csv"
        header = _header(train)
        missing = [c for c in ("id", "landmark_id") if c not in header]
        if missing:
            raise InputError(f"missing column(s) {', '.join(missing)}; header is {','.join(header)!r}", train, 1)
        return cls(root=root, layout="gldv2" if "url" in header else "kaggle")

    def path(self, split: str, image_id: str) -> Path:
        """Image file of ``image_id`` in ``split`` ('train', 'index' or 'test')."""
        _check_split(split)
        return image_path(self.root, split, image_id)

    def train_ids_labels(self, subset: str = "full") -> list[tuple[str, int]]:
        """``(image_id, landmark_id)`` of the training images, in ``train.csv`` order.

        Args:
            subset: ``"full"`` — every row of ``train.csv``; ``"clean"`` — the images of
                ``train_clean.csv`` that are also in ``train.csv`` (labels from
                ``train_clean.csv``). In the Kaggle layout ``train.csv`` already is the
                clean subset, so without a ``train_clean.csv`` "clean" equals "full".

        Raises:
            InputError: bad/missing files, or train.csv and train_clean.csv disagree on
                an image's landmark.
        """
        if subset not in TRAIN_SUBSETS:
            raise ValueError(f"subset must be one of {TRAIN_SUBSETS}, got {subset!r}")
        pairs = read_train(self.root / "train.csv")
        if subset == "full":
            return pairs
        return self._clean_pairs(pairs)

    def _clean_pairs(self, pairs: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """The rows of ``pairs`` (train.csv) that ``train_clean.csv`` lists."""
        clean_path = self.root / "train_clean.csv"
        if not clean_path.is_file():
            if self.layout == "kaggle":
                log.info("%s: no train_clean.csv; Kaggle train.csv is the clean subset", self.root)
                return pairs
            raise InputError(
                "train_clean.csv not found: download it or use the 'full' train subset", clean_path
            )
        clean = {i: lm for lm, ids in read_train_clean(clean_path).items() for i in ids}
        out = []
        for image_id, landmark in pairs:
            lm = clean.get(image_id)
            if lm is None:
                continue
            if lm != landmark:
                raise InputError(
                    f"image {image_id!r} is landmark {lm} here but {landmark} in train.csv", clean_path
                )
            out.append((image_id, lm))
        if len(out) < len(clean):
            log.info("%s: %d clean images are not in train.csv and were dropped", clean_path, len(clean) - len(out))
        return out

    def training_set(self, name: str = "clean", allow_val_leak: bool = False) -> TrainingSet:
        """Build a training set of :data:`TRAIN_SETS` from the official files.

        ``all`` adds the index images of ``index_image_to_landmark.csv`` whose landmark's
        category (``index_label_to_category.csv``) names a train landmark
        (``train_label_to_category.csv``); index landmarks without a train twin are left out.

        Leakage guard: the validation queries (test ids) and their retrieval ground truth
        (the index ids of ``retrieval_solution_v2.1.csv``) are never trained on unless
        ``allow_val_leak``; the returned set then has ``val_leak=True``, which artifacts and
        CV outputs carry, because such a model's CV on this root is meaningless.

        Raises:
            InputError: a missing or malformed file; ``all`` without its index label files.
        """
        if name not in TRAIN_SETS:
            raise ValueError(f"training set must be one of {TRAIN_SETS}, got {name!r}")
        pairs = read_train(self.root / "train.csv")
        clean_pairs = self._clean_pairs(pairs)
        clean_ids = {i for i, _ in clean_pairs}
        if name == "clean":
            rows = [(i, lm, "train", True) for i, lm in clean_pairs]
        elif name == "c2x":
            clean_lms = {lm for i, lm in pairs if i in clean_ids}
            rows = [(i, lm, "train", i in clean_ids) for i, lm in pairs if lm in clean_lms]
        else:
            rows = [(i, lm, "train", i in clean_ids) for i, lm in pairs]
        if name == "all":
            rows += [(i, lm, "index", True) for i, lm in self._labelled_index()]
        held_out = self.validation_ids()
        leaked = [r for r in rows if r[0] in held_out]
        if leaked and not allow_val_leak:
            rows = [r for r in rows if r[0] not in held_out]
            log.warning("%s: %d images of the %r set are validation queries or their ground truth and are "
                        "left out (allow_val_leak keeps them and marks the model's CV invalid)",
                        self.root, len(leaked), name)
        elif leaked:
            log.warning("%s: training on %d validation images (allow_val_leak): CV on this root is not valid",
                        self.root, len(leaked))
        return TrainingSet(name=name, ids=[r[0] for r in rows], landmarks=[r[1] for r in rows],
                           splits=[r[2] for r in rows], clean=[r[3] for r in rows],
                           val_leak=bool(leaked) and allow_val_leak,
                           excluded=0 if allow_val_leak else len(leaked))

    def _labelled_index(self) -> list[tuple[str, int]]:
        """``(index id, train landmark id)`` for index images whose landmark has a train twin."""
        train_cat = read_label_table(self.root / "train_label_to_category.csv", "category")
        by_cat: dict[str, int] = {}
        for lm, cat in train_cat.items():
            by_cat.setdefault(cat.strip(), lm)
        index_cat = read_label_table(self.root / "index_label_to_category.csv", "category")
        out, unmatched = [], set()
        for image_id, ilm in _read_id_landmark(self.root / "index_image_to_landmark.csv"):
            cat = index_cat.get(ilm)
            tlm = by_cat.get(cat.strip()) if cat is not None else None
            if tlm is None:
                unmatched.add(ilm)
            else:
                out.append((image_id, tlm))
        log.info("%s: %d labelled index images join train landmarks; %d index landmarks have no train twin",
                 self.root, len(out), len(unmatched))
        return out

    def validation_ids(self) -> set[str]:
        """Test ids and index ground truth of the scored (Public/Private) retrieval and
        recognition queries: what a model must not train on for its CV to mean anything.
        Empty when the root has no solution files."""
        from glr.metrics import read_solution

        out: set[str] = set()
        for task in ("retrieval", "recognition"):
            sol = self.solution_path(task)
            if sol is None:
                continue
            public, private, _ = read_solution(sol, task)
            for part in (public, private):
                out.update(part)
                if task == "retrieval":
                    out.update(x for gt in part.values() for x in gt if x)
        return out

    def _split_ids(self, split: str) -> list[str]:
        csv_path = self.root / f"{split}.csv"
        if csv_path.is_file() or self.layout == "gldv2":
            return read_ids(csv_path)
        return scan_image_ids(self.root, split)

    def index_ids(self) -> list[str]:
        """Index (retrieval database) image ids: ``index.csv``, or the sorted folder scan."""
        return self._split_ids("index")

    def test_ids(self) -> list[str]:
        """Test (query) image ids: ``test.csv``, or the sorted folder scan."""
        return self._split_ids("test")

    def embedding_ids(self, split: str) -> list[str]:
        """Every id an embedding job of ``split`` covers: ``train`` (the clean subset), ``index``, ``test``."""
        if split not in ("train", "index", "test"):
            raise InputError(f"split must be one of train, index, test, got {split!r}")
        if split == "train":
            return [i for i, _ in self.train_ids_labels("clean")]
        return self.index_ids() if split == "index" else self.test_ids()

    def solution_path(self, task: str) -> Path | None:
        """``retrieval_solution_v2.1.csv`` / ``recognition_solution_v2.1.csv``, None if absent."""
        if task not in SOLUTION_FILES:
            raise ValueError(f"task must be one of {tuple(SOLUTION_FILES)}, got {task!r}")
        p = self.root / SOLUTION_FILES[task]
        return p if p.is_file() else None

    def country_of(self) -> dict[int, str] | None:
        """Landmark → country from ``train_label_to_country.csv``, None if absent."""
        p = self.root / "train_label_to_country.csv"
        return read_label_table(p, "country") if p.is_file() else None


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def build_label_map(landmark_ids: Iterable[int], min_samples: int = 1) -> dict[int, int]:
    """Map landmark ids to contiguous class indices.

    Args:
        landmark_ids: one landmark id per training image.
        min_samples: landmarks with fewer images are dropped.

    Returns:
        landmark id → class index ``0..C-1``, assigned in ascending landmark-id order.
    """
    if min_samples < 1:
        raise ValueError(f"min_samples must be >= 1, got {min_samples}")
    counts = Counter(landmark_ids)
    kept = sorted(lm for lm, n in counts.items() if n >= min_samples)
    return {lm: i for i, lm in enumerate(kept)}


# ---------------------------------------------------------------------------
# Transforms and datasets


def make_transforms(
    image_size: int,
    train: bool,
    hflip: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    random_erasing: float = 0.0,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image → normalised float tensor ``(3, image_size, image_size)``.

    Train: RandomResizedCrop(scale 0.6-1, ratio 3/4-4/3), optional horizontal flip
    (off by default: landmarks are chiral, text and layout flip), ColorJitter(0.2, 0.2,
    0.2), and with ``random_erasing`` > 0 the re-ID trick of Zhong et al. (AAAI 2020):
    with that probability a random rectangle (2-33% of the area) of the normalised
    tensor is filled with noise. Eval: plain square Resize. Both end with ToTensor and
    Normalize.
    """
    norm = [T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]
    if not train:
        return T.Compose([T.Resize((image_size, image_size)), *norm])
    ops: list[Callable] = [T.RandomResizedCrop(image_size, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3))]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    ops.append(T.ColorJitter(0.2, 0.2, 0.2))
    ops += norm
    if random_erasing > 0:
        ops.append(T.RandomErasing(p=random_erasing, scale=(0.02, 0.33), value="random"))
    return T.Compose(ops)


def transforms_from_config(config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """The eval transform described by a :meth:`glr.training.GLDv2DataModule.data_config` dict."""
    return make_transforms(int(config["image_size"]), train=False, mean=config["mean"], std=config["std"])


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
