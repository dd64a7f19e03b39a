"""A GLDv2-format root: its files, splits, image paths and training sets.

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

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from glr.data.readers import (_check_split, _header, _read_id_landmark, image_path, read_ids, read_label_table,
                              read_train, read_train_clean, scan_image_ids)
from glr.metrics import read_solution
from glr.utils import InputError

log = logging.getLogger(__name__)

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
