"""Training index samplers: shuffle, P×K id-uniform, and continent-aware.

Every sampler yields dataset indices (``int``) from a stream that is a pure function of
``(seed, epoch)`` and the constructor arguments, so all DDP ranks compute the same
global stream of ``total_size`` indices and each keeps its own share:

* :class:`ShuffleSampler` and :class:`ContinentAwareSampler` give rank ``r`` the
  positions ``r, r + R, r + 2R, ...`` of the stream (``R`` = ``num_replicas``);
* :class:`IdUniformSampler` shards whole groups of ``k`` (group ``g`` goes to rank
  ``g % R``), so a per-rank batch of a multiple of ``k`` keeps its P×K structure.

The shares are disjoint positions of one stream and together are the whole stream.
``total_size`` is ``num_samples`` (default: the number of images) rounded up to a
multiple of ``R`` (``k * R`` for P×K), so every rank yields ``len(sampler)`` indices.
The samplers shard themselves: use them with Lightning's
``Trainer(use_distributed_sampler=False)`` and build them once the process group is up
(e.g. in ``train_dataloader``), so that ``num_replicas``/``rank`` default correctly.
Lightning calls :meth:`set_epoch` at the start of every epoch; a resumed fit builds (and, with
workers, starts) its loader before that call, so :class:`glr.train.resume.ResumeState` points the
sampler at the resumed epoch first (and, after a mid-epoch checkpoint, :meth:`skip_next` past the
batches already trained).

The continent-aware sampler follows the 2nd place solution of the Google Landmark
Retrieval 2021 challenge (Zhang et al., arXiv:2110.04294; ``GLDSampler_DDP`` in
github.com/WesleyZhang1991/Google_Landmark_Retrieval_2021_2nd_Place_Solution).
"""

from __future__ import annotations

import logging
from types import MappingProxyType
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from glr.data.geo import OTHER

log = logging.getLogger(__name__)

SAMPLERS: tuple[str, ...] = ("shuffle", "id_uniform", "continent")

#: Continent weights of the 2nd place GLR 2021 solution (they sum to 1; ``"other"`` is
#: for images whose continent is unknown).
CONTINENT_PROBS: Mapping[str, float] = MappingProxyType({
    "Asia": 0.5, "Europe": 0.2, "Africa": 0.15, "North America": 0.1,
    "South America": 0.02, "Antarctica": 0.01, "Oceania": 0.01, OTHER: 0.01,
})
#: Share of clean images within a continent. The solution weights clean : noisy as
#: 0.66 : 0.33, renormalised here to 2/3 : 1/3. (Its code takes ``int(0.66 * n)`` clean
#: draws and the rest noisy, i.e. 0.66 : 0.34; the difference is below one point.)
CLEAN_PROB: float = 0.66 / (0.66 + 0.33)


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """``(num_replicas, rank)``, defaulting to the torch.distributed group or ``(1, 0)``."""
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
    return int(num_replicas), int(rank)


class _ShardedSampler(Sampler[int]):
    """Shared plumbing: seeding, epochs, total size and per-rank sharding.

    Subclasses implement :meth:`_stream`, the global stream of ``total_size`` indices.
    """

    def __init__(
        self,
        size: int,
        group: int,
        num_samples: int | None,
        seed: int,
        num_replicas: int | None,
        rank: int | None,
    ):
        super().__init__()
        self.num_replicas, self.rank = _world(num_replicas, rank)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        total = size if num_samples is None else num_samples
        if total < 1:
            raise ValueError(f"num_samples must be >= 1, got {total}")
        unit = group * self.num_replicas
        self.group = group
        self.total_size = -(-total // unit) * unit
        self.seed = int(seed)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose stream the next ``iter()`` yields."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def skip_next(self, n: int) -> None:
        """Leave out the first ``n`` indices of this rank's share in the next ``iter()`` only (a
        resume in the middle of an epoch: the batches already trained)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.skip = int(n)

    def __len__(self) -> int:
        """Indices yielded by this rank per epoch."""
        return self.total_size // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        # SeedSequence([seed, epoch]) rather than seed + epoch: runs with seeds s and s+1
        # then do not replay each other's epochs shifted by one.
        rng = np.random.default_rng([self.seed, self.epoch])
        stream = self._stream(rng)
        share = stream.reshape(-1, self.group)[self.rank :: self.num_replicas].ravel()
        share, self.skip = share[self.skip :], 0
        return map(int, share)

    def _stream(self, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


class ShuffleSampler(_ShardedSampler):
    """A fresh permutation of ``range(n)`` per epoch, sharded over ranks.

    When ``num_samples`` exceeds ``n`` the stream is several independent permutations
    concatenated (then cut to ``total_size``).

    Args:
        n: dataset size.
        num_samples: global stream length (default ``n``), rounded up to a multiple of
            ``num_replicas``.
        seed: base seed (>= 0); the stream depends on ``seed`` and the epoch only.
        num_replicas: number of ranks (default: torch.distributed world size, else 1).
        rank: this rank (default: torch.distributed rank, else 0).
    """

    def __init__(
        self,
        n: int,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        super().__init__(n, 1, num_samples, seed, num_replicas, rank)
        self.n = int(n)

    def _stream(self, rng: np.random.Generator) -> np.ndarray:
        passes = -(-self.total_size // self.n)
        perms = rng.permuted(np.tile(np.arange(self.n, dtype=np.int64), (passes, 1)), axis=1)
        return perms.ravel()[: self.total_size]


class IdUniformSampler(_ShardedSampler):
    """P×K "id-uniform" sampling: groups of ``k`` images of one class.

    Classes are visited in passes: each pass is a fresh random order of all classes, so
    every class appears once per pass. For each visit, ``k`` images of the class are
    drawn without replacement, or with replacement when it has fewer than ``k``. The
    stream is ``total_size // k`` such groups; group ``g`` goes to rank ``g % R``.

    Args:
        labels: class (landmark) of each image, shape ``(N,)``.
        k: images per class visit.
        num_samples: global stream length (default ``N``), rounded up to a multiple of
            ``k * num_replicas``.
        seed: base seed (>= 0).
        num_replicas: number of ranks (default: torch.distributed world size, else 1).
        rank: this rank (default: torch.distributed rank, else 0).
    """

    def __init__(
        self,
        labels: Sequence[int],
        k: int = 4,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence, got shape {labels.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        super().__init__(len(labels), k, num_samples, seed, num_replicas, rank)
        self.k = int(k)
        classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        self.num_classes = len(classes)
        # Images grouped by class: class c owns _order[_starts[c] : _starts[c] + _counts[c]].
        self._order = np.argsort(inverse.ravel(), kind="stable")
        self._counts = counts.astype(np.int64)
        self._starts = np.concatenate(([0], np.cumsum(self._counts)[:-1]))

    def _stream(self, rng: np.random.Generator) -> np.ndarray:
        k = self.k
        n_groups = self.total_size // k
        passes = -(-n_groups // self.num_classes)
        classes = rng.permuted(np.tile(np.arange(self.num_classes), (passes, 1)), axis=1).ravel()[:n_groups]
        n = self._counts[classes]

        # k distinct positions in [0, n) per group by Floyd's algorithm, vectorised over
        # groups (k steps of array ops instead of a Python loop per group).
        pos = np.empty((n_groups, k), dtype=np.int64)
        full = n >= k
        for i in range(k):
            j = n - k + i
            t = rng.integers(0, np.maximum(j + 1, 1))
            taken = (pos[:, :i] == t[:, None]).any(axis=1)
            pos[:, i] = np.where(taken, j, t)
        # Floyd's sets are uniform but their order is not: shuffle within each group.
        pos = rng.permuted(pos, axis=1)
        small = ~full
        if small.any():
            pos[small] = rng.integers(0, n[small, None], size=(int(small.sum()), k))
        return self._order[self._starts[classes, None] + pos].ravel()


class ContinentAwareSampler(_ShardedSampler):
    """Continent-aware sampling of the 2nd place GLR 2021 solution (with replacement).

    Each draw picks a continent with probability proportional to ``probs`` restricted
    to the continents that have images, then clean vs noisy with ``clean_prob`` :
    ``1 - clean_prob`` restricted to the non-empty one(s) of the two, then an image
    uniformly within that (continent, clean) bucket. The two choices are one categorical
    draw over the buckets, done in bulk, so 4M images cost a few array operations.

    Args:
        labels: class of each image, shape ``(N,)`` (sets the default length).
        continents: continent of each image, shape ``(N,)``; None or a name not in
            ``probs`` counts as ``"other"``.
        clean: whether each image is in the clean subset, shape ``(N,)``; None = all
            clean.
        probs: continent → weight (>= 0; renormalised). A continent missing from it
            (``"other"`` included) is never drawn.
        clean_prob: probability of a clean image within a continent, in [0, 1].
        num_samples: global stream length (default ``N``), rounded up to a multiple of
            ``num_replicas``.
        seed: base seed (>= 0).
        num_replicas: number of ranks (default: torch.distributed world size, else 1).
        rank: this rank (default: torch.distributed rank, else 0).

    Raises:
        ValueError: lengths differ, a weight is negative, ``clean_prob`` is outside
            [0, 1], or no image can be drawn.
    """

    def __init__(
        self,
        labels: Sequence[int],
        continents: Sequence[str | None],
        clean: Sequence[bool] | None = None,
        probs: Mapping[str, float] = CONTINENT_PROBS,
        clean_prob: float = CLEAN_PROB,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        n = len(labels)
        if n == 0:
            raise ValueError("labels must be non-empty")
        if len(continents) != n:
            raise ValueError(f"continents has {len(continents)} entries for {n} images")
        if clean is not None and len(clean) != n:
            raise ValueError(f"clean has {len(clean)} entries for {n} images")
        if any(not np.isfinite(w) or w < 0 for w in probs.values()):
            raise ValueError(f"continent probabilities must be finite and >= 0, got {dict(probs)}")
        if not 0.0 <= clean_prob <= 1.0:
            raise ValueError(f"clean_prob must be in [0, 1], got {clean_prob}")
        super().__init__(n, 1, num_samples, seed, num_replicas, rank)

        self.continent_names: tuple[str, ...] = tuple(probs) + (() if OTHER in probs else (OTHER,))
        code = {name: i for i, name in enumerate(self.continent_names)}
        other = code[OTHER]
        cont = np.fromiter((code.get(c, other) for c in continents), dtype=np.int64, count=n)
        is_noisy = np.zeros(n, dtype=np.int64) if clean is None else (~np.asarray(clean, dtype=bool)).astype(np.int64)
        # Bucket b = 2 * continent + (0 clean | 1 noisy).
        bucket = 2 * cont + is_noisy
        n_cont = len(self.continent_names)
        sizes = np.bincount(bucket, minlength=2 * n_cont).reshape(n_cont, 2)

        subset_w = sizes.astype(bool) * np.array([clean_prob, 1.0 - clean_prob])
        subset_sum = subset_w.sum(axis=1)
        cont_w = np.array([probs.get(c, 0.0) for c in self.continent_names], dtype=np.float64)
        cont_w = np.where(subset_sum > 0, cont_w, 0.0)
        if cont_w.sum() <= 0:
            raise ValueError(
                f"no image can be drawn: no continent with images has a positive weight in {dict(probs)}"
            )
        self._cont_p = cont_w / cont_w.sum()
        within = np.divide(subset_w, subset_sum[:, None], out=np.zeros_like(subset_w), where=subset_sum[:, None] > 0)
        self._bucket_p = (self._cont_p[:, None] * within).ravel()
        self._sizes = sizes.ravel()
        self._starts = np.concatenate(([0], np.cumsum(self._sizes)[:-1]))
        self._order = np.argsort(bucket, kind="stable")

        empty = [c for c in self.continent_names if probs.get(c, 0.0) > 0 and sizes[code[c]].sum() == 0]
        if empty:
            log.info("continent-aware sampler: no images for %s; their weight goes to the others", ", ".join(empty))
        never = int(self._sizes[self._bucket_p == 0].sum())
        if never:
            log.info("continent-aware sampler: %d of %d images have zero probability and are never drawn", never, n)

    def expected_frequencies(self) -> dict[str, float]:
        """Probability of each continent per draw, after renormalisation (sums to 1)."""
        return {c: float(p) for c, p in zip(self.continent_names, self._cont_p)}

    def expected_bucket_frequencies(self) -> dict[tuple[str, bool], float]:
        """Probability of each ``(continent, is_clean)`` bucket per draw (sums to 1)."""
        p = self._bucket_p.reshape(-1, 2)
        names = self.continent_names
        return {(c, clean): float(p[i, 1 - clean]) for i, c in enumerate(names) for clean in (True, False)}

    def _stream(self, rng: np.random.Generator) -> np.ndarray:
        buckets = rng.choice(len(self._bucket_p), size=self.total_size, p=self._bucket_p)
        # Only buckets with p > 0, hence size > 0, are drawn, so every high is >= 1.
        offsets = rng.integers(0, self._sizes[buckets])
        return self._order[self._starts[buckets] + offsets]


def build_sampler(
    name: str,
    labels: Sequence[int],
    continents: Sequence[str | None] | None = None,
    clean: Sequence[bool] | None = None,
    k: int = 4,
    seed: int = 0,
    num_samples: int | None = None,
    num_replicas: int | None = None,
    rank: int | None = None,
    probs: Mapping[str, float] = CONTINENT_PROBS,
    clean_prob: float = CLEAN_PROB,
) -> Sampler[int]:
    """Build a training sampler by name.

    Args:
        name: one of :data:`SAMPLERS`. ``"continent"`` without ``continents`` (no
            country table) logs a notice and falls back to ``"shuffle"``.
        labels: class of each training image, shape ``(N,)``.
        continents: continent of each image (for ``"continent"``).
        clean: clean-subset flag of each image (for ``"continent"``; None = all clean).
        k: images per class visit (for ``"id_uniform"``).
        seed, num_samples, num_replicas, rank: as in the sampler classes.
        probs, clean_prob: continent weights and clean share (for ``"continent"``).

    Raises:
        ValueError: unknown ``name``.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if name == "continent" and continents is None:
        log.warning("sampler 'continent' needs per-image continents (train_label_to_country.csv); using 'shuffle'")
        name = "shuffle"
    common = dict(num_samples=num_samples, seed=seed, num_replicas=num_replicas, rank=rank)
    if name == "shuffle":
        return ShuffleSampler(len(labels), **common)
    if name == "id_uniform":
        return IdUniformSampler(labels, k=k, **common)
    return ContinentAwareSampler(labels, continents, clean=clean, probs=probs, clean_prob=clean_prob, **common)
