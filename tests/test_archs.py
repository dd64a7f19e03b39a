"""The 1st place 2021 architectures (glr.model.dolg, glr.model.hybrid): shapes at several image sizes,
a gradient for every trainable parameter, DOLG's orthogonality, the hybrid's stage choice, pretrained CNN
weights, EmbeddingNet round trips through artifacts, one real tiny training stage each, example configs."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from glr.data.root import GLDv2Root
from glr.data.synth import make_synthetic_gldv2
from glr.model.archs import ARCHS, build_arch, feature_stages
from glr.model.artifact import load_artifact, save_artifact
from glr.model.dolg import DOLG, orthogonal_component, orthogonal_fusion
from glr.model.hybrid import HybridSwin, resolve_stage
from glr.model.net import EmbeddingNet
from glr.utils import InputError

CNNS = ("test_resnet", "test_efficientnet", "test_convnext")
#: tiny options of each arch (CPU seconds)
TINY = {"dolg": dict(dolg_dim=16),
        "hybrid": dict(hybrid_dim=16, hybrid_depth=1, hybrid_stages=2, hybrid_heads=2, hybrid_window=3)}
CONFIGS = Path(__file__).parent.parent / "configs" / "examples"


def _arch(arch, backbone, **extra):
    torch.manual_seed(0)
    options = {"gem_p": 3.0, "last_stride": False, "token_pool": "gem", **TINY[arch], **extra}
    return build_arch(arch, backbone, None, **options)


# --------------------------------------------------------------------------- DOLG's orthogonal fusion
def test_orthogonal_component_is_orthogonal_and_recovers_the_orthogonal_part():
    g = torch.Generator().manual_seed(0)
    fg = torch.rand(3, 8, generator=g) + 0.1                       # GeM output: positive
    v = torch.randn(3, 8, 4, 5, generator=g)
    v = v - torch.einsum("bchw,bc->bhw", v, fg)[:, None] / fg.pow(2).sum(1)[:, None, None, None] * fg[..., None, None]
    a = torch.randn(3, 1, 4, 5, generator=g)
    fl = a * fg[..., None, None] + v                               # a known split: parallel part + orthogonal part
    orth = orthogonal_component(fl, fg)
    assert torch.allclose(orth, v, atol=1e-5)
    dots = torch.einsum("bchw,bc->bhw", orth, fg)
    assert dots.abs().max() < 1e-5 * fl.abs().max() * fg.norm(dim=1).max()
    fused = orthogonal_fusion(fl, fg)
    assert fused.shape == (3, 16)
    assert torch.allclose(fused[:, :8], v.mean(dim=(-2, -1)), atol=1e-5) and torch.equal(fused[:, 8:], fg)


@pytest.mark.parametrize("backbone", CNNS)
def test_dolg_local_features_are_orthogonal_to_its_global_descriptor(backbone):
    net = _arch("dolg", backbone).eval()
    with torch.no_grad():
        local, fg = net.branches(torch.randn(2, 3, 64, 64))
        orth = orthogonal_component(local, fg)
    assert local.shape == (2, 16, 4, 4) and fg.shape == (2, 16) and (fg > 0).all()
    cos = torch.einsum("bchw,bc->bhw", orth, fg) / (orth.norm(dim=1) * fg.norm(dim=1)[:, None, None])
    assert cos.abs().max() < 1e-4
    # the local vectors themselves are not orthogonal to fg (the projection removed something)
    assert (torch.einsum("bchw,bc->bhw", local, fg).abs() > 1e-3).any()
    # the spatial attention: unit-norm vectors times a positive score
    normed, score = net.local_att.attention(net.local_conv(net.backbone(torch.randn(2, 3, 64, 64))[0]))
    assert torch.allclose(normed.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5) and (score > 0).all()


# --------------------------------------------------------------------------- shapes and gradients
@pytest.mark.parametrize("arch", ["dolg", "hybrid"])
@pytest.mark.parametrize("backbone", CNNS)
def test_shapes_at_several_sizes_and_a_gradient_for_every_parameter(arch, backbone):
    net = _arch(arch, backbone)
    assert net.num_features == {"dolg": 32, "hybrid": 32}[arch]
    assert {id(p) for p in net.backbone.parameters()} < {id(p) for p in net.parameters()}  # new layers outside
    net.train()
    for size in (32, 40, 64, 72):  # 40 and 72: maps that are not multiples of the windows
        out = net(torch.randn(2, 3, size, size))
        assert out.shape == (2, net.num_features) and torch.isfinite(out).all(), size
    out.square().sum().backward()
    cnn = {id(p) for p in net.backbone.parameters()}
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # the new layers all learn at once; timm zero-initialises the last BN of residual blocks, so
        # a block's inner convolutions get exactly 0 until that BN moves
        assert id(p) in cnn or p.grad.abs().sum() > 0, name
    assert sum(bool(p.grad.abs().sum() > 0) for p in net.backbone.parameters()) > len(cnn) // 2


def test_the_hybrid_takes_the_stride_8_stage_by_default_and_an_index_when_given():
    assert [resolve_stage(b, None) for b in CNNS] == [2, 2, 1]  # strides (2,4,8,16,32) and (4,8,16,32)
    assert [feature_stages(b)[resolve_stage(b, None)]["reduction"] for b in CNNS] == [8, 8, 8]
    net = _arch("hybrid", "test_resnet")
    assert net.backbone.feature_info.reduction() == [8] and not hasattr(net.backbone, "layer3")  # cut after
    tokens = net.tokens(torch.randn(1, 3, 64, 64))
    assert tokens.shape == (1, 4, 4, 32)  # 64/8 = 8, halved once by the second Swin stage
    last = _arch("hybrid", "test_resnet", hybrid_stage=-1)
    assert last.backbone.feature_info.reduction() == [32] and last.backbone.feature_info.channels() == [96]
    assert last.transformer.patch_embed.proj.kernel_size == (1, 1)  # the 1×1 projection
    # windows stay as built at any map size (one artifact runs at every stage's size)
    assert all(blk.window_size == (3, 3) for st in last.transformer.layers for blk in st.blocks)
    with pytest.raises(InputError, match=r"hybrid_stage: test_convnext has 4 feature stages \(strides 4, 8, 16, 32\)"):
        _arch("hybrid", "test_convnext", hybrid_stage=4)
    with pytest.raises(InputError, match="hybrid_heads: must divide hybrid_dim"):
        _arch("hybrid", "test_resnet", hybrid_heads=3)
    with pytest.raises(InputError, match="not a timm model"):
        _arch("dolg", "resnet_does_not_exist")
    assert {"dolg", "hybrid"} <= set(ARCHS)


@pytest.mark.parametrize("arch", ["dolg", "hybrid"])
def test_the_cnn_loads_a_timm_checkpoint_file(arch, tmp_path):
    torch.manual_seed(1)
    full = timm.create_model("test_efficientnet")
    torch.save(full.state_dict(), tmp_path / "w.pth")
    net = build_arch(arch, "test_efficientnet", str(tmp_path / "w.pth"), **TINY[arch])
    mine, theirs = net.backbone.state_dict(), full.state_dict()
    assert len(mine) > 20 and all(torch.equal(v, theirs[k]) for k, v in mine.items())


def test_dolg_last_stride_doubles_the_maps_of_a_resnet():
    net = _arch("dolg", "test_resnet", last_stride=True).eval()
    local, _ = net.branches(torch.randn(1, 3, 64, 64))
    maps = net.backbone(torch.randn(1, 3, 64, 64))
    assert local.shape[-2:] == (4, 4) and maps[1].shape[-2:] == (4, 4)  # stride 16 instead of 32
    assert isinstance(net, DOLG)


# --------------------------------------------------------------------------- through EmbeddingNet and artifacts
@pytest.mark.parametrize("arch", ["dolg", "hybrid"])
def test_embedding_net_round_trip_through_an_artifact(arch, tmp_path):
    torch.manual_seed(0)
    net = EmbeddingNet("test_resnet", embedding_size=8, arch=arch, **TINY[arch]).eval()
    assert net.backbone is net.trunk.backbone and isinstance(net.trunk, {"dolg": DOLG, "hybrid": HybridSwin}[arch])
    keys = list(net.state_dict())
    assert all(k.startswith(("trunk.", "fc.", "bn.")) for k in keys) and any(k.startswith("trunk.backbone.")
                                                                             for k in keys)
    path = save_artifact(tmp_path / "m.pt", net, {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    again, _, _ = load_artifact(path)
    assert again.model_args == net.model_args and again.model_args["arch"] == arch
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        a, b = net(x), again(x)
    assert a.shape == (3, 8) and torch.equal(a, b)
    np.testing.assert_allclose(a.norm(dim=1).numpy(), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- one real training stage each
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth")
    make_synthetic_gldv2(path, n_landmarks=8, scale=0.2, image_size=32, progress=False)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("arch,backbone", [("dolg", "test_resnet"), ("hybrid", "test_efficientnet")])
def test_one_training_stage_gives_an_artifact_that_reloads_and_embeds(arch, backbone, root, tmp_path):
    from glr import predict
    from glr.model.artifact import read_artifact
    from glr.train.fit import train

    path = train(root, tmp_path / "run", progress=False, backbone=backbone, pretrained=None, arch=arch,
                 image_size=32, epochs=1, batch_size=8, num_workers=0, limit_train_batches=3, embedding_size=16,
                 log_every_n_steps=1, **TINY[arch])
    payload = read_artifact(path)
    assert payload["model_args"]["arch"] == arch and payload["meta"]["options"]["arch"] == arch
    for k, v in TINY[arch].items():
        assert payload["model_args"][k] == v, k
    assert np.isfinite(payload["meta"]["final_loss"])
    member = predict.load_member(path)
    ids = GLDv2Root.open(root).index_ids()[:6]
    emb, ok = predict.embed_split(member, root, "index", ids, num_workers=0, progress=False)
    assert emb.shape == (6, 16) and ok.all() and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert len({tuple(np.round(r, 4)) for r in emb}) > 1  # not a constant descriptor


# --------------------------------------------------------------------------- example configs
@pytest.mark.parametrize("name,arch", [("dolg", "dolg"), ("hybrid", "hybrid")])
def test_example_configs_parse_and_plan(name, arch):
    from glr.workflows.experiment import parse_experiment, plan_experiment

    path = CONFIGS / f"{name}.yaml"
    assert path.read_text().startswith("#")  # the comment header
    exp = parse_experiment(path)
    plan = plan_experiment(exp)
    assert len(plan) >= 2 and all(cfg.arch == arch for _, _, cfg in plan)
    assert plan[1][1]["init_from"].endswith(f"{exp.name}/{plan[0][0]}.safetensors")
    sizes = [cfg.image_size for _, _, cfg in plan]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # staged image sizes


def test_a_stage_asking_another_arch_or_backbone_than_its_parent_stops_before_any_data(tmp_path):
    """issue 15, part 7: ``init_from`` an artifact of another architecture (or backbone) than the
    stage asks for is one line naming the artifact, before the (here missing) root is opened."""
    from glr.train.fit import train

    torch.manual_seed(0)
    parent = save_artifact(tmp_path / "gem.safetensors", EmbeddingNet("test_resnet", embedding_size=8),
                           {"image_size": 32})
    missing = tmp_path / "no_such_root"
    with pytest.raises(InputError, match=r"gem\.safetensors: init_from holds a arch 'gem' network, the stage asks "
                                         r"for arch 'dolg'"):
        train(missing, tmp_path / "run", progress=False, init_from=str(parent), arch="dolg")
    with pytest.raises(InputError, match=r"init_from holds a test_resnet network, the stage asks for "
                                         r"test_efficientnet"):
        train(missing, tmp_path / "run", progress=False, init_from=str(parent), backbone="test_efficientnet")
    assert not (tmp_path / "run").exists()
