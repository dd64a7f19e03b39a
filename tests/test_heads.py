"""Margin heads: hand-computed ArcFace / sub-center / CosFace logits, dynamic margins, class
weights, the head factory and staged-training weight expansion."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from glr.model.heads import (HEADS, ArcFace, CosFace, build_head, class_weights, dynamic_margins, expand_head_state,
                             register_head, unregister_head)
from glr.utils import InputError

# Three unit class centres in 2-D: east, north, west.
CENTRES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
S = 10.0


def head_2d(cls=ArcFace, m=0.3, **kw):
    head = cls(2, 3, s=S, m=m, **kw)
    with torch.no_grad():
        head.weight.copy_(CENTRES * 2.0)  # non-unit norm: the head normalises
    return head


def test_arcface_scalar_margin_hand_values():
    m = 0.3
    head = head_2d(m=m)
    # cosines to (east, north, west): (0.6, 0.8, -0.6), (0.6, 0.8, -0.6), (-0.96, 0.28, 0.96)
    emb = torch.tensor([[0.6, 0.8], [3.0, 4.0], [-0.96, 0.28]])
    labels = torch.tensor([0, 2, 0])
    out = head(emb, labels)
    cm, sm = math.cos(m), math.sin(m)
    expected = S * torch.tensor([
        [0.6 * cm - 0.8 * sm, 0.8, -0.6],          # cos(θ+m) = cos·cos m − sin·sin m
        [0.6, 0.8, -0.6 * cm - 0.8 * sm],          # cos θ = −0.6 > cos(π − m): still cos(θ+m)
        [-0.96 - math.sin(math.pi - m) * m, 0.28, 0.96],  # −0.96 < cos(π − 0.3) ≈ −0.955: fallback
    ])
    assert -0.96 < math.cos(math.pi - m) < -0.6
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(head(emb), S * torch.tensor([[0.6, 0.8, -0.6]] * 2 + [[-0.96, 0.28, 0.96]]), atol=1e-5)


def test_arcface_m0_is_scaled_cosine():
    head = head_2d(m=0.0)
    emb = torch.tensor([[0.6, 0.8], [-0.96, 0.28], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0])  # includes cos = −1 on the target
    expected = S * torch.tensor([[0.6, 0.8, -0.6], [-0.96, 0.28, 0.96], [-1.0, 0.0, 1.0]])
    assert torch.allclose(head(emb, labels), expected, atol=1e-6)


def test_arcface_easy_margin():
    m = 0.3
    head = head_2d(m=m, easy_margin=True)
    emb = torch.tensor([[0.6, 0.8], [0.6, 0.8], [-0.96, 0.28]])
    labels = torch.tensor([0, 2, 0])
    cm, sm = math.cos(m), math.sin(m)
    expected = S * torch.tensor([
        [0.6 * cm - 0.8 * sm, 0.8, -0.6],  # cos > 0: margin
        [0.6, 0.8, -0.6],                  # cos < 0: no margin
        [-0.96, 0.28, 0.96],               # cos < 0: no margin (no fallback either)
    ])
    assert torch.allclose(head(emb, labels), expected, atol=1e-5)
    assert "easy_margin=True" in repr(head)


def test_cosface_hand_values():
    head = head_2d(CosFace, m=0.2)
    emb = torch.tensor([[0.6, 0.8], [-0.96, 0.28]])
    out = head(emb, torch.tensor([1, 2]))
    expected = S * torch.tensor([[0.6, 0.8 - 0.2, -0.6], [-0.96, 0.28, 0.96 - 0.2]])
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(head(emb), S * torch.tensor([[0.6, 0.8, -0.6], [-0.96, 0.28, 0.96]]), atol=1e-5)


def subcenter_head(cls=ArcFace, m=0.3):
    head = cls(2, 2, s=S, m=m, k=3)
    assert head.weight.shape == (6, 2)
    with torch.no_grad():
        # class 0: cos with e = (1, 0) are 0.5, −1, 0 → max at row 0
        # class 1: cos with e = (1, 0) are 0, 0.6, −0.6 → max at row 4
        head.weight.copy_(torch.tensor([[1.0, math.sqrt(3)], [-2.0, 0.0], [0.0, 3.0],
                                        [0.0, -1.0], [3.0, 4.0], [-3.0, 4.0]]))
    return head


def test_subcenter_arcface_hand_values():
    m = 0.3
    head = subcenter_head(m=m)
    emb = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    # second sample e = (0, 1): class 0 cos (√3/2, 0, 1) → 1 (row 2); class 1 (−1, 0.8, 0.8) → 0.8
    assert torch.allclose(head.cosine(emb), torch.tensor([[0.5, 0.6], [1.0, 0.8]]), atol=1e-6)
    out = head(emb, torch.tensor([0, 1]))
    expected = S * torch.tensor([
        [math.cos(math.pi / 3 + m), 0.6],                 # θ = 60°
        [1.0, 0.8 * math.cos(m) - 0.6 * math.sin(m)],
    ])
    assert torch.allclose(out, expected, atol=1e-5)
    assert "k=3" in repr(head)


@pytest.mark.parametrize("cls", [ArcFace, CosFace])
def test_subcenter_gradient_reaches_only_the_closest_subcentre(cls):
    head = subcenter_head(cls)
    emb = torch.tensor([[2.0, 0.0]], requires_grad=True)
    F.cross_entropy(head(emb, torch.tensor([0])), torch.tensor([0])).backward()
    row_has_grad = head.weight.grad.abs().sum(1) > 0
    assert row_has_grad.tolist() == [True, False, False, False, True, False]
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_dynamic_margins_hand_values():
    counts = [1, 16, 81]  # count^(-1/4) = 1, 1/2, 1/3
    raw = dynamic_margins(counts, a=0.45, b=0.05, scaling="raw")
    assert torch.allclose(raw, torch.tensor([0.45 + 0.05, 0.45 / 2 + 0.05, 0.45 / 3 + 0.05]), atol=1e-7)
    # minmax: (t − 1/3) / (2/3) = 1, 1/4, 0
    mm = dynamic_margins(counts, a=0.45, b=0.05)
    assert mm.dtype == torch.float32
    assert torch.allclose(mm, torch.tensor([0.5, 0.45 / 4 + 0.05, 0.05]), atol=1e-7)
    # all counts equal: the range is empty, every margin is b
    assert torch.allclose(dynamic_margins([7, 7], a=0.45, b=0.05), torch.tensor([0.05, 0.05]))
    assert torch.allclose(dynamic_margins(torch.tensor([16]), scaling="raw"), torch.tensor([0.275]))


def test_dynamic_margins_validation():
    with pytest.raises(ValueError, match="class 1"):
        dynamic_margins([3, 0, 5])
    with pytest.raises(ValueError, match="class 2"):
        class_weights([3, 1, -4])
    with pytest.raises(ValueError, match="scaling"):
        dynamic_margins([1, 2], scaling="log")
    with pytest.raises(ValueError):
        dynamic_margins([])


@pytest.mark.parametrize("cls", [ArcFace, CosFace])
def test_per_class_margin_applies_to_each_samples_own_class(cls):
    margins = torch.tensor([0.5, 0.1625, 0.05])
    head = head_2d(cls, m=margins)
    assert torch.equal(head.margins, margins) and "margins" in head.state_dict()
    emb = torch.tensor([[0.6, 0.8], [0.6, 0.8]])
    out = head(emb, torch.tensor([0, 1]))
    if cls is ArcFace:
        t0 = 0.6 * math.cos(0.5) - 0.8 * math.sin(0.5)
        t1 = 0.8 * math.cos(0.1625) - 0.6 * math.sin(0.1625)
    else:
        t0, t1 = 0.6 - 0.5, 0.8 - 0.1625
    expected = S * torch.tensor([[t0, 0.8, -0.6], [0.6, t1, -0.6]])
    assert torch.allclose(out, expected, atol=1e-5)
    assert "m=[0.05, 0.5]" in repr(head)


def test_margin_validation():
    with pytest.raises(ValueError, match="shape"):
        ArcFace(4, 3, m=[0.1, 0.2])
    with pytest.raises(ValueError, match="class 1"):
        CosFace(4, 2, m=[0.1, -0.2])
    with pytest.raises(ValueError, match="k"):
        ArcFace(4, 3, k=0)
    assert torch.equal(ArcFace(4, 3, m=0.3).margins, torch.full((3,), 0.3))


def test_class_weights():
    assert torch.equal(class_weights([1, 5, 100], power=0.0), torch.ones(3))
    # power 1/4: w ∝ (1, 1/2); Σ c·w = 1 + 8 = 9, Σ c = 17 → scale 17/9
    w = class_weights([1, 16])
    assert torch.allclose(w, torch.tensor([17 / 9, 17 / 18]), atol=1e-6)
    assert torch.allclose((torch.tensor([1.0, 16.0]) * w).sum() / 17, torch.tensor(1.0))


def test_build_head_kinds_and_head_args():
    counts = [1, 16, 81, 4]
    for kind, cls, k in [("arcface", ArcFace, 1), ("subcenter_arcface", ArcFace, 3), ("cosface", CosFace, 1)]:
        head = build_head(kind, 8, 4, s=20.0, m=0.2, k=3)
        assert type(head) is cls and head.k == k and head.weight.shape == (4 * k, 8) and head.s == 20.0
        assert torch.allclose(head.margins, torch.full((4,), 0.2))
        args = json.loads(json.dumps(head.head_args))
        assert args == dict(kind=kind, s=20.0, m=0.2, k=k, dynamic_margin=False, margin_a=0.45,
                            margin_b=0.05, easy_margin=False)
        again = build_head(**args, in_features=8, num_classes=4)
        assert type(again) is cls and again.weight.shape == head.weight.shape
        assert torch.equal(again.margins, head.margins)
    head = build_head("subcenter_arcface", 8, 4, k=2, dynamic_margin=True, margin_a=0.3, margin_b=0.1,
                      counts=counts, easy_margin=True)
    assert head.easy_margin and head.weight.shape == (8, 8)
    # count^(-1/4) = 1, 1/2, 1/3, 1/√2 → minmax (1, 1/4, 0, (1/√2 − 1/3) / (2/3)), a = 0.3, b = 0.1
    expected = torch.tensor([0.4, 0.1 + 0.3 / 4, 0.1, 0.1 + 0.3 * (1 / math.sqrt(2) - 1 / 3) / (2 / 3)])
    assert torch.allclose(head.margins, expected)
    args = json.loads(json.dumps(head.head_args))
    again = build_head(**args, in_features=8, num_classes=4, counts=counts)
    assert again.weight.shape == head.weight.shape and torch.equal(again.margins, head.margins)
    assert again.easy_margin and again.head_args == head.head_args


def test_build_head_errors():
    with pytest.raises(ValueError, match="subcenter_arcface"):
        build_head("softmax", 8, 4)
    assert "cosface" in HEADS
    with pytest.raises(ValueError, match="counts"):
        build_head("arcface", 8, 4, dynamic_margin=True)
    with pytest.raises(ValueError, match="classes"):
        build_head("arcface", 8, 4, dynamic_margin=True, counts=[1, 2, 3])
    with pytest.raises(ValueError, match="easy_margin"):
        build_head("cosface", 8, 4, easy_margin=True)


@pytest.mark.parametrize("k", [1, 3])
def test_expand_head_state(k):
    torch.manual_seed(0)
    old = build_head("subcenter_arcface" if k > 1 else "arcface", 4, 2, k=k, dynamic_margin=True, counts=[1, 81])
    new = build_head("subcenter_arcface" if k > 1 else "arcface", 4, 4, k=k)
    fresh = new.weight.detach().clone()
    fresh_margins = new.margins.clone()
    old_map, new_map = {10: 0, 20: 1}, {30: 0, 10: 1, 20: 2, 40: 3}
    assert expand_head_state(old.state_dict(), old_map, new, new_map) == 2
    ow, nw = old.weight.detach(), new.weight.detach()
    assert torch.equal(nw[1 * k:2 * k], ow[0:k])          # landmark 10: old class 0 → new class 1
    assert torch.equal(nw[2 * k:3 * k], ow[k:2 * k])      # landmark 20: old class 1 → new class 2
    assert torch.equal(nw[0:k], fresh[0:k])               # landmark 30: fresh
    assert torch.equal(nw[3 * k:4 * k], fresh[3 * k:4 * k])  # landmark 40: fresh
    assert torch.equal(new.margins, fresh_margins)        # margins not copied
    assert new.weight.requires_grad and new.weight.grad is None


def test_expand_head_state_mismatches():
    old_map, new_map = {10: 0, 20: 1}, {10: 0, 20: 1, 30: 2}
    old = ArcFace(4, 2, k=3)
    with pytest.raises(ValueError, match="k=3"):
        expand_head_state(old.state_dict(), old_map, ArcFace(4, 3, k=1), new_map)
    with pytest.raises(ValueError, match="embedding size"):
        expand_head_state(old.state_dict(), old_map, ArcFace(8, 3, k=3), new_map)
    with pytest.raises(ValueError, match="multiple"):
        expand_head_state({"weight": torch.zeros(5, 4)}, old_map, ArcFace(4, 3), new_map)
    with pytest.raises(ValueError, match="new label map"):
        expand_head_state(old.state_dict(), old_map, ArcFace(4, 2, k=3), new_map)
    with pytest.raises(ValueError, match="weight"):
        expand_head_state({}, old_map, ArcFace(4, 3), new_map)


@pytest.mark.parametrize("kind,easy", [(kind, False) for kind in HEADS] + [("arcface", True)])
def test_finite_gradients_at_cos_plus_minus_one(kind, easy):
    torch.manual_seed(0)
    head = build_head(kind, 8, 5, m=0.5, k=3, easy_margin=easy)
    w = head.weight.detach()
    # embeddings equal to a class centre (cos = 1) and opposite to one (cos = −1), on the target
    emb = torch.cat([w[[0, 3 * head.k]], -w[[0, 2 * head.k]], torch.randn(2, 8)]).requires_grad_(True)
    labels = torch.tensor([0, 3, 0, 2, 1, 4])
    logits = head(emb, labels)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, labels, label_smoothing=0.1).backward()
    for name, p in list(head.named_parameters()) + [("emb", emb)]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert head.weight.grad.abs().sum() > 0


def test_a_registered_head_is_built_by_name():
    @register_head("toy_cosface_k2")  # a new head: one builder and its registration
    def _toy(in_features, num_classes, s, m, k, easy_margin):
        return CosFace(in_features, num_classes, s=s, m=m, k=2)

    try:
        assert "toy_cosface_k2" in HEADS  # the registry's live view
        head = build_head("toy_cosface_k2", 8, 4, s=16.0, m=0.1, dynamic_margin=True, counts=[1, 16, 81, 4])
        assert type(head) is CosFace and head.weight.shape == (8, 8) and head.s == 16.0
        assert torch.allclose(head.margins, dynamic_margins([1, 16, 81, 4]))
        args = json.loads(json.dumps(head.head_args))
        assert args["kind"] == "toy_cosface_k2" and args["k"] == 2
        again = build_head(**args, in_features=8, num_classes=4, counts=[1, 16, 81, 4])
        assert torch.equal(again.margins, head.margins) and again.head_args == head.head_args
        with pytest.raises(ValueError, match="already registered"):
            register_head("cosface")(_toy)
    finally:
        unregister_head("toy_cosface_k2")
    assert "toy_cosface_k2" not in HEADS
    with pytest.raises(InputError, match="unknown head kind 'toy_cosface_k2'; expected one of arcface, "
                                         "subcenter_arcface, cosface"):
        build_head("toy_cosface_k2", 8, 4)
