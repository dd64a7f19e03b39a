"""Tests for glr.train.samplers: stream statistics, P×K structure, rank sharding, epochs, factory."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch

from glr.train.samplers import CLEAN_PROB, CONTINENT_PROBS, SAMPLERS, ContinentAwareSampler, IdUniformSampler, ShuffleSampler, build_sampler

# Upper 0.999 quantiles of the chi-square distribution by degrees of freedom, from the
# NIST/SEMATECH e-Handbook of Statistical Methods, table 1.3.6.7.4 "Critical values of
# the chi-square distribution" (upper-tail probability 0.001).
CHI2_999 = {5: 20.515, 9: 27.877, 49: 85.351}


def chi_square(observed: dict, expected_p: dict, n: int) -> float:
    """Pearson's statistic of observed counts against probabilities (categories with p > 0)."""
    return sum((observed.get(c, 0) - n * p) ** 2 / (n * p) for c, p in expected_p.items() if p > 0)


# --------------------------------------------------------------------------- continent-aware

# (continent, clean images, noisy images); South America and Antarctica have none;
# Africa has only noisy images, North America only clean ones; None and an unknown
# name count as "other".
LAYOUT = [
    ("Asia", 50, 30),
    ("Europe", 40, 20),
    ("Africa", 0, 25),
    ("North America", 10, 0),
    ("Oceania", 5, 5),
    (None, 4, 3),
    ("Atlantis", 3, 0),
]
DRAWS = 20_000


def make_images(layout=LAYOUT):
    continents, clean, labels = [], [], []
    for c, n_clean, n_noisy in layout:
        continents += [c] * (n_clean + n_noisy)
        clean += [True] * n_clean + [False] * n_noisy
    labels = [i // 3 for i in range(len(continents))]
    return labels, continents, clean


def continent_counts(sampler, continents):
    return Counter("other" if continents[i] not in CONTINENT_PROBS else continents[i] for i in sampler)


def test_continent_expected_frequencies_are_renormalised_over_present_continents():
    labels, continents, clean = make_images()
    s = ContinentAwareSampler(labels, continents, clean, num_samples=DRAWS, seed=3)
    freq = s.expected_frequencies()
    present = sum(CONTINENT_PROBS[c] for c in ("Asia", "Europe", "Africa", "North America", "Oceania", "other"))
    assert freq["Asia"] == pytest.approx(0.5 / present)
    assert freq["other"] == pytest.approx(0.01 / present)
    assert freq["South America"] == freq["Antarctica"] == 0.0
    assert sum(freq.values()) == pytest.approx(1.0)
    assert sum(s.expected_bucket_frequencies().values()) == pytest.approx(1.0)


def test_continent_counts_fit_expected_frequencies():
    labels, continents, clean = make_images()
    s = ContinentAwareSampler(labels, continents, clean, num_samples=DRAWS, seed=3)
    counts = continent_counts(s, continents)
    assert sum(counts.values()) == DRAWS
    assert counts["South America"] == counts["Antarctica"] == 0
    expected = s.expected_frequencies()
    df = sum(p > 0 for p in expected.values()) - 1
    assert df == 5
    assert chi_square(counts, expected, DRAWS) < CHI2_999[df]
    # The same test rejects image-proportional sampling (what a plain shuffle would give),
    # so it has the power to fail.
    sizes = continent_counts(range(len(labels)), continents)
    proportional = {c: n / len(labels) for c, n in sizes.items()}
    assert chi_square(counts, proportional, DRAWS) > CHI2_999[df]


def test_clean_share_and_single_subset_continents():
    labels, continents, clean = make_images()
    s = ContinentAwareSampler(labels, continents, clean, num_samples=DRAWS, seed=4)
    drawn = list(s)
    buckets = s.expected_bucket_frequencies()
    # Africa has only noisy images, North America only clean: all their draws are so.
    assert buckets[("Africa", True)] == 0.0 and buckets[("North America", False)] == 0.0
    assert not any(clean[i] for i in drawn if continents[i] == "Africa")
    assert all(clean[i] for i in drawn if continents[i] == "North America")
    assert sum(continents[i] == "Africa" for i in drawn) > 0.1 * DRAWS
    # Within Asia (both subsets present) the clean share is 2/3.
    asia = [clean[i] for i in drawn if continents[i] == "Asia"]
    p, n = CLEAN_PROB, len(asia)
    assert CLEAN_PROB == pytest.approx(2 / 3)
    assert abs(np.mean(asia) - p) < 4 * np.sqrt(p * (1 - p) / n)
    # Overall clean share matches the bucket probabilities.
    p = sum(v for (c, is_clean), v in buckets.items() if is_clean)
    assert abs(np.mean([clean[i] for i in drawn]) - p) < 4 * np.sqrt(p * (1 - p) / DRAWS)


def test_clean_share_is_two_thirds_when_every_continent_has_both():
    layout = [("Asia", 30, 30), ("Europe", 10, 40), ("Africa", 20, 5)]
    labels, continents, clean = make_images(layout)
    s = ContinentAwareSampler(labels, continents, clean, num_samples=DRAWS, seed=5)
    share = np.mean([clean[i] for i in s])
    p = 2 / 3
    assert abs(share - p) < 4 * np.sqrt(p * (1 - p) / DRAWS)


def test_images_uniform_within_a_bucket():
    labels, continents, clean = make_images()
    s = ContinentAwareSampler(labels, continents, clean, num_samples=DRAWS, seed=6)
    bucket = [i for i in range(len(labels)) if continents[i] == "Asia" and clean[i]]
    assert len(bucket) == 50
    members = set(bucket)
    counts = Counter(i for i in s if i in members)
    n = sum(counts.values())
    assert len(counts) == 50
    assert chi_square(counts, {i: 1 / 50 for i in bucket}, n) < CHI2_999[49]


def test_continent_without_clean_flags_and_with_unknown_names():
    continents = ["Europe"] * 6 + [None] * 2
    s = ContinentAwareSampler(list(range(8)), continents, num_samples=1000, seed=0)
    drawn = list(s)
    assert {i for i in drawn if i >= 6}  # "other" is drawn (weight 0.01 vs 0.2)
    assert s.expected_frequencies()["Europe"] == pytest.approx(0.2 / 0.21)


def test_continent_logs_empty_continents(caplog):
    labels, continents, clean = make_images()
    with caplog.at_level(logging.INFO, logger="glr.train.samplers"):
        ContinentAwareSampler(labels, continents, clean)
    messages = [r.getMessage() for r in caplog.records if "no images for" in r.getMessage()]
    assert len(messages) == 1
    assert "South America" in messages[0] and "Antarctica" in messages[0]


def test_continent_validation():
    labels, continents, clean = make_images()
    with pytest.raises(ValueError, match="continents has"):
        ContinentAwareSampler(labels, continents[:-1], clean)
    with pytest.raises(ValueError, match="clean has"):
        ContinentAwareSampler(labels, continents, clean[:-1])
    with pytest.raises(ValueError, match=">= 0"):
        ContinentAwareSampler(labels, continents, clean, probs={"Asia": -1.0, "other": 1.0})
    with pytest.raises(ValueError, match="clean_prob"):
        ContinentAwareSampler(labels, continents, clean, clean_prob=1.5)
    # Only Europe images; Europe (hence "other") has no weight.
    with pytest.raises(ValueError, match="no image can be drawn"):
        ContinentAwareSampler([0, 1], ["Europe", "Europe"], probs={"Asia": 1.0})


def test_continent_custom_probs_drop_other():
    continents = ["Asia"] * 5 + ["Europe"] * 5 + [None] * 5
    s = ContinentAwareSampler(list(range(15)), continents, probs={"Asia": 1.0, "Europe": 3.0}, num_samples=4000)
    assert s.expected_frequencies() == pytest.approx({"Asia": 0.25, "Europe": 0.75, "other": 0.0})
    assert all(i < 10 for i in s)


# --------------------------------------------------------------------------- id-uniform

# Class c has SIZES[c] images; labels are shuffled so classes are not contiguous.
SIZES = [1, 2, 3, 4, 5, 7, 10, 12]


def make_labels(seed=0):
    labels = np.repeat(np.arange(len(SIZES)) * 10 + 100, SIZES)  # class ids 100, 110, ...
    return np.random.default_rng(seed).permutation(labels).tolist()


def groups_of(indices, k):
    assert len(indices) % k == 0
    return [indices[i : i + k] for i in range(0, len(indices), k)]


def test_id_uniform_groups_are_one_class():
    labels = make_labels()
    k = 4
    s = IdUniformSampler(labels, k=k, num_samples=800, seed=1)
    drawn = list(s)
    assert len(drawn) == len(s) == 800
    for g in groups_of(drawn, k):
        cls = {labels[i] for i in g}
        assert len(cls) == 1
        if SIZES[(labels[g[0]] - 100) // 10] >= k:
            assert len(set(g)) == k  # without replacement


def test_id_uniform_every_class_once_per_pass():
    labels = make_labels()
    k, n_classes = 4, len(SIZES)
    drawn = list(IdUniformSampler(labels, k=k, num_samples=k * n_classes * 25, seed=2))
    classes = [labels[g[0]] for g in groups_of(drawn, k)]
    passes = [classes[i : i + n_classes] for i in range(0, len(classes), n_classes)]
    assert len(passes) == 25
    for p in passes:
        assert sorted(p) == sorted(set(labels))
    assert len({tuple(p) for p in passes}) > 1  # reshuffled between passes


def test_id_uniform_small_classes_are_repeated():
    labels = make_labels()
    k = 4
    drawn = list(IdUniformSampler(labels, k=k, num_samples=k * len(SIZES) * 20, seed=3))
    singleton = labels.index(100)
    groups = [g for g in groups_of(drawn, k) if labels[g[0]] == 100]
    assert len(groups) == 20 and all(g == [singleton] * k for g in groups)
    pair = {i for i, lab in enumerate(labels) if lab == 110}
    pair_groups = [g for g in groups_of(drawn, k) if labels[g[0]] == 110]
    assert all(set(g) <= pair for g in pair_groups)
    assert set().union(*map(set, pair_groups)) == pair


def test_id_uniform_images_uniform_within_class():
    labels = make_labels()
    big = [i for i, lab in enumerate(labels) if lab == 160]  # 10 images
    members = set(big)
    drawn = list(IdUniformSampler(labels, k=4, num_samples=4 * len(SIZES) * 500, seed=4))
    counts = Counter(i for i in drawn if i in members)
    n = sum(counts.values())
    assert n == 500 * 4
    assert chi_square(counts, {i: 1 / 10 for i in big}, n) < CHI2_999[9]
    # Position within the group is not biased either (Floyd's order is shuffled).
    first = Counter(g[0] for g in groups_of(drawn, 4) if g[0] in members)
    assert chi_square(first, {i: 1 / 10 for i in big}, 500) < CHI2_999[9]


def test_id_uniform_pk_structure_per_rank():
    labels = make_labels()
    k = 4
    for rank in (0, 1):
        s = IdUniformSampler(labels, k=k, num_samples=320, seed=5, num_replicas=2, rank=rank)
        drawn = list(s)
        assert len(drawn) == len(s) == 160
        assert all(len({labels[i] for i in g}) == 1 for g in groups_of(drawn, k))


# --------------------------------------------------------------------------- sharding, epochs

N = 48
LABELS = [i % 7 for i in range(N)]
CONTS = [("Asia", "Europe", "Africa", None)[i % 4] for i in range(N)]
CLEAN = [i % 3 != 0 for i in range(N)]

FACTORIES = {
    "shuffle": (1, lambda **kw: ShuffleSampler(N, **kw)),
    "id_uniform": (4, lambda **kw: IdUniformSampler(LABELS, k=4, **kw)),
    "continent": (1, lambda **kw: ContinentAwareSampler(LABELS, CONTS, CLEAN, **kw)),
}


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("num_samples", [None, 96])
def test_rank_shares_partition_the_single_rank_stream(name, num_samples):
    group, make = FACTORIES[name]
    full = list(make(seed=7, num_samples=num_samples, num_replicas=1, rank=0))
    shares = [make(seed=7, num_samples=num_samples, num_replicas=2, rank=r) for r in (0, 1)]
    assert len(full) == (num_samples or N)
    assert len(shares[0]) == len(shares[1]) == len(full) // 2
    positions = [[p for p in range(len(full)) if (p // group) % 2 == r] for r in (0, 1)]
    assert not set(positions[0]) & set(positions[1])
    assert sorted(positions[0] + positions[1]) == list(range(len(full)))
    for r in (0, 1):
        assert list(shares[r]) == [full[p] for p in positions[r]]
    assert Counter(list(shares[0]) + list(shares[1])) == Counter(full)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_set_epoch_changes_stream_and_replays(name):
    _, make = FACTORIES[name]
    s = make(seed=11)
    e0 = list(s)
    assert list(s) == e0  # same epoch, same stream
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0
    s.set_epoch(0)
    assert list(s) == e0
    other = make(seed=11)
    other.set_epoch(1)
    assert list(other) == e1  # a fresh sampler reproduces it
    assert list(make(seed=12)) != e0


@pytest.mark.parametrize("name", list(FACTORIES))
def test_lengths_round_up_to_equal_shares(name):
    group, make = FACTORIES[name]
    s = [make(num_samples=N + 1, num_replicas=3, rank=r) for r in range(3)]
    unit = group * 3
    total = -(-(N + 1) // unit) * unit
    assert [len(x) for x in s] == [total // 3] * 3
    assert [len(list(x)) for x in s] == [total // 3] * 3


def test_shuffle_is_a_permutation_per_pass():
    s = ShuffleSampler(10, num_samples=30, seed=0)
    drawn = list(s)
    for i in range(0, 30, 10):
        assert sorted(drawn[i : i + 10]) == list(range(10))
    assert drawn[:10] != drawn[10:20]
    assert all(type(i) is int for i in drawn)


def test_rank_defaults_follow_torch_distributed(monkeypatch):
    s = ShuffleSampler(10)
    assert (s.num_replicas, s.rank) == (1, 0)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 3)
    s = IdUniformSampler(LABELS, k=4)
    assert (s.num_replicas, s.rank, len(s)) == (4, 3, 12)
    assert ShuffleSampler(10, num_replicas=2, rank=0).num_replicas == 2


def test_rank_and_argument_validation():
    with pytest.raises(ValueError, match="rank"):
        ShuffleSampler(10, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas"):
        ShuffleSampler(10, num_replicas=0, rank=0)
    with pytest.raises(ValueError, match="k must"):
        IdUniformSampler(LABELS, k=0)
    with pytest.raises(ValueError, match="non-empty"):
        IdUniformSampler([])
    with pytest.raises(ValueError, match="epoch"):
        ShuffleSampler(10).set_epoch(-1)


# --------------------------------------------------------------------------- build_sampler


def test_build_sampler_by_name():
    assert isinstance(build_sampler("shuffle", LABELS), ShuffleSampler)
    s = build_sampler("id_uniform", LABELS, k=2, seed=3, num_replicas=2, rank=1)
    assert isinstance(s, IdUniformSampler) and s.k == 2 and s.rank == 1 and s.seed == 3
    s = build_sampler("continent", LABELS, continents=CONTS, clean=CLEAN, num_samples=10)
    assert isinstance(s, ContinentAwareSampler) and len(s) == 10
    s = build_sampler("continent", LABELS, CONTS, CLEAN, probs={"Asia": 1.0, "Europe": 1.0}, clean_prob=0.5)
    assert s.expected_frequencies() == pytest.approx({"Asia": 0.5, "Europe": 0.5, "other": 0.0})
    assert s.expected_bucket_frequencies()[("Asia", True)] == pytest.approx(0.25)
    assert SAMPLERS == ("shuffle", "id_uniform", "continent")


def test_build_sampler_continent_falls_back_to_shuffle(caplog):
    with caplog.at_level(logging.INFO, logger="glr.train.samplers"):
        s = build_sampler("continent", LABELS, seed=2)
    assert isinstance(s, ShuffleSampler) and len(s) == N
    [record] = caplog.records
    assert "'continent'" in record.getMessage() and "using 'shuffle'" in record.getMessage()


def test_build_sampler_unknown_name():
    with pytest.raises(ValueError) as e:
        build_sampler("balanced", LABELS)
    for name in SAMPLERS:
        assert name in str(e.value)
