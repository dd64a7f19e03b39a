"""Model pieces: GeM closed forms, ArcFace, gradients, pretrained weights, artifacts."""

import math

import pytest
import torch
import torch.nn.functional as F

from glr.model import adapters
from glr.model.adapters import Adapter, adapter_for, register_adapter, unregister_adapter
from glr.model.heads import ArcFace
from glr.model.net import LITE0_PACKAGE, EmbeddingNet, build_net, convert_positional, lite0_package_file, resolve_pretrained_file
from glr.model.layers import GeM, gem
from glr.model.artifact import load_artifact, save_artifact
from glr.train.module import LandmarkModule
from glr.utils import InputError


def test_gem_p1_is_average_pooling():
    x = torch.rand(2, 5, 7, 3) + 0.1
    assert torch.allclose(gem(x, p=1.0), x.mean(dim=(-2, -1)), atol=1e-6)
    assert torch.allclose(gem(x, p=1.0), F.adaptive_avg_pool2d(x, 1).flatten(1), atol=1e-6)


def test_gem_closed_forms():
    x = torch.rand(3, 4, 6, 6) + 0.1
    # p = 2: root mean square
    assert torch.allclose(gem(x, p=2.0), x.pow(2).mean(dim=(-2, -1)).sqrt(), atol=1e-6)
    # constant map: any p returns the constant
    c = torch.full((1, 2, 4, 4), 0.7)
    assert torch.allclose(gem(c, p=5.0), torch.full((1, 2), 0.7), atol=1e-6)
    # large p tends to max pooling
    assert torch.allclose(gem(x, p=200.0), x.amax(dim=(-2, -1)), rtol=3e-2)
    # negative activations are clamped to eps
    assert torch.allclose(gem(-torch.ones(1, 1, 2, 2), p=3.0), torch.full((1, 1), 1e-6), rtol=1e-3)


def test_gem_module_learns_p():
    pool = GeM(p=3.0)
    x = torch.rand(2, 3, 4, 4) + 0.1
    pool(x).sum().backward()
    assert pool.p.grad is not None and torch.isfinite(pool.p.grad).all() and pool.p.grad.abs().item() > 0


def test_arcface_m0_equals_scaled_cosine():
    torch.manual_seed(0)
    head = ArcFace(16, 10, s=30.0, m=0.0)
    emb = torch.randn(8, 16)
    labels = torch.randint(0, 10, (8,))
    expected = 30.0 * F.normalize(emb) @ F.normalize(head.weight).T
    assert torch.allclose(head(emb, labels), expected, atol=1e-5)
    assert torch.allclose(head(emb), expected, atol=1e-5)


def test_arcface_margin_only_on_target():
    torch.manual_seed(1)
    head = ArcFace(8, 5, s=10.0, m=0.4)
    emb = torch.randn(4, 8)
    labels = torch.tensor([0, 1, 2, 3])
    cos = F.normalize(emb) @ F.normalize(head.weight).T
    out = head(emb, labels)
    mask = F.one_hot(labels, 5).bool()
    assert torch.allclose(out[~mask], 10.0 * cos[~mask], atol=1e-5)
    theta = torch.acos(cos[mask].clamp(-1, 1))
    expected = torch.where(cos[mask] > math.cos(math.pi - 0.4), torch.cos(theta + 0.4),
                           cos[mask] - math.sin(math.pi - 0.4) * 0.4)
    assert torch.allclose(out[mask], 10.0 * expected, atol=1e-4)
    assert (out[mask] < 10.0 * cos[mask] + 1e-6).all()  # the margin only ever lowers the target logit


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet"])
def test_all_parameters_get_gradients(backbone):
    torch.manual_seed(0)
    net = EmbeddingNet(backbone, embedding_size=32)
    module = LandmarkModule(net, num_classes=7, arcface_m=0.3)
    batch = {"image": torch.randn(4, 3, 64, 64), "label": torch.tensor([0, 1, 2, 3])}
    module.log_dict = lambda *a, **k: None  # no trainer attached
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, missing
    emb = net.eval()(torch.randn(3, 3, 64, 64))
    assert emb.shape == (3, 32)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)


def test_lite0_package_weights_map_onto_timm(tmp_path):
    file = resolve_pretrained_file("efficientnet_lite0", LITE0_PACKAGE, cache_dir=tmp_path)
    assert file.parent == tmp_path and file.exists()
    src = torch.load(lite0_package_file(), map_location="cpu", weights_only=True)
    net = build_net(dict(backbone="efficientnet_lite0", pretrained=LITE0_PACKAGE, cache_dir=tmp_path))
    # the package's tensors land in timm's modules by position
    assert torch.equal(net.backbone.conv_stem.weight, src["_conv_stem.weight"])
    assert torch.equal(net.backbone.blocks[6][0].conv_pwl.weight, src["_blocks.15._project_conv.weight"])
    assert torch.equal(net.backbone.conv_head.weight, src["_conv_head.weight"])
    with pytest.raises(InputError, match="efficientnet_lite0"):
        resolve_pretrained_file("test_resnet", LITE0_PACKAGE, cache_dir=tmp_path)
    with pytest.raises(InputError, match="not found"):
        resolve_pretrained_file("test_resnet", tmp_path / "missing.pth")


def test_convert_positional_rejects_mismatch():
    net = EmbeddingNet("test_resnet", embedding_size=8)
    sd = net.backbone.state_dict()
    bad = dict(list(sd.items())[:-1])
    with pytest.raises(InputError, match="by position"):
        convert_positional(bad, net.backbone)
    swapped = dict(sd)
    first = next(iter(swapped))
    swapped[first] = torch.zeros(1)
    with pytest.raises(InputError, match="by position"):
        convert_positional(swapped, net.backbone)


def test_timm_keyed_file_is_loaded(tmp_path):
    torch.manual_seed(3)
    ref = EmbeddingNet("test_resnet", embedding_size=8)
    f = tmp_path / "w.pth"
    torch.save(ref.backbone.state_dict(), f)
    net = build_net(dict(backbone="test_resnet", embedding_size=8, pretrained=str(f)))
    for (k, a), b in zip(ref.backbone.state_dict().items(), net.backbone.state_dict().values()):
        assert torch.equal(a, b), k


def test_artifact_rebuilds_alone(tmp_path):
    torch.manual_seed(0)
    net = EmbeddingNet("test_resnet", embedding_size=16, gem_p=2.5).eval()
    with torch.no_grad():
        net.pool.p.fill_(3.7)
    data_config = {"image_size": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    path = save_artifact(tmp_path / "a" / "model.pt", net, data_config, meta={"exp_id": "t"})
    net2, dc, meta = load_artifact(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x), net2(x), atol=1e-6)
    assert dc == data_config and meta["exp_id"] == "t"
    assert net2.model_args == {"backbone": "test_resnet", "embedding_size": 16, "gem_p": 2.5, "drop_rate": 0.0,
                               "last_stride": False, "bnneck": False}
    assert not list(tmp_path.glob("a/.*tmp"))
    with pytest.raises(InputError, match="not a glr-artifact"):
        torch.save({"x": 1}, tmp_path / "bad.pt")
        load_artifact(tmp_path / "bad.pt")
    with pytest.raises(InputError, match="not found"):
        load_artifact(tmp_path / "nope.pt")


def test_backbone_adapters_last_stride_and_weight_sources(tmp_path):
    assert adapter_for("resnet18", "last_stride_1").name == "resnet"
    assert adapter_for("seresnext26d_32x4d.a1_in1k", "last_stride_1").name == "resnet"  # a tagged timm name
    assert adapter_for("efficientnet_lite0", "last_stride_1") is None
    assert adapter_for("efficientnet_lite0", "weights").name == "efficientnet_lite0"
    with pytest.raises(InputError, match="last_stride=1 is not available for test_efficientnet.*ResNet-family"):
        EmbeddingNet("test_efficientnet", embedding_size=8, last_stride=True)

    def stem_stride_1(backbone, name):  # a toy "last stride" for the EfficientNet family
        backbone.conv_stem.stride = (1, 1)

    def toy_weights(backbone, cache_dir):
        torch.manual_seed(7)
        path = cache_dir / f"{backbone}_toy.pth"
        torch.save(EmbeddingNet(backbone, embedding_size=8).backbone.state_dict(), path)
        return path

    register_adapter(Adapter("toy_effnet", families=("efficientnet",), last_stride_1=stem_stride_1,
                             weights={"toy-weights": toy_weights}))
    try:
        a = EmbeddingNet("test_efficientnet", embedding_size=8)
        b = EmbeddingNet("test_efficientnet", embedding_size=8, last_stride=True)
        x = torch.randn(1, 3, 64, 64)
        assert b.backbone.forward_features(x).shape[-1] == 2 * a.backbone.forward_features(x).shape[-1]
        net = build_net(dict(backbone="test_efficientnet", embedding_size=8, pretrained="toy-weights",
                             cache_dir=tmp_path))
        saved = torch.load(tmp_path / "test_efficientnet_toy.pth", weights_only=True)
        assert torch.equal(net.backbone.conv_stem.weight, saved["conv_stem.weight"])
        with pytest.raises(InputError, match="toy-weights holds weights for timm families efficientnet, not test_resnet"):
            resolve_pretrained_file("test_resnet", "toy-weights", cache_dir=tmp_path)
        with pytest.raises(ValueError, match="already registered"):
            register_adapter(Adapter("toy_effnet"))
        with pytest.raises(ValueError, match="weight source"):
            register_adapter(Adapter("toy_2", weights={adapters.LITE0_PACKAGE: toy_weights}))
    finally:
        unregister_adapter("toy_effnet")
    assert adapter_for("test_efficientnet", "last_stride_1") is None
