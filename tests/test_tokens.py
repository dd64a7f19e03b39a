"""Every timm backbone: token models (ViT), (B, H, W, C) models (Swin, MambaOut) and CNNs pooled into the
same network, staged image sizes, and the preprocessing (mean, std, interpolation, crop) each backbone
brings, stored in the artifact and used by every embedding path."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from glr.data import images
from glr.data.images import (IMAGENET_MEAN, IMAGENET_STD, load_image, make_transforms, preprocessing,
                             transforms_from_config)
from glr.data.readers import image_path
from glr.data.root import GLDv2Root
from glr.data.synth import make_synthetic_gldv2
from glr.model import layers
from glr.model.archs import ARCHS, build_arch, feature_layout
from glr.model.artifact import load_artifact, read_artifact, save_artifact
from glr.model.layers import BackbonePool, gem
from glr.model.net import EmbeddingNet
from glr.predict import Member, embed_split, load_member
from glr.train import config
from glr.train.config import TrainConfig, parse_assignments
from glr.train.datamodule import GLDv2DataModule
from glr.train.fit import check_registered, train
from glr.utils import InputError

#: a Swin small enough for CPU tests (timm's swin with tiny widths; 2 stages, windows of 4 tokens)
SWIN = dict(backbone="swin_tiny_patch4_window7_224",
            backbone_args=dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4))
NETS = {
    "vit_gem": dict(backbone="test_vit"),
    "vit_cls": dict(backbone="test_vit", token_pool="cls"),
    "vit_avg": dict(backbone="test_vit", token_pool="avg"),
    "convnext": dict(backbone="test_convnext"),
    "swin": SWIN,
    "mambaout": dict(backbone="test_mambaout"),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth")
    make_synthetic_gldv2(path, n_landmarks=16, scale=0.2, image_size=32, progress=False)
    return path


# --------------------------------------------------------------------------- pooling of each layout
def test_backbone_pool_closed_forms():
    torch.manual_seed(0)
    fmap = torch.rand(2, 5, 3, 4) + 0.1  # (B, C, H, W)
    pool = BackbonePool("gem", "NCHW", p=3.0)
    assert torch.equal(pool(fmap), gem(fmap, pool.p))  # a CNN: exactly today's GeM
    nhwc = BackbonePool("gem", "NHWC", p=3.0)
    assert torch.allclose(nhwc(fmap.permute(0, 2, 3, 1)), pool(fmap), atol=1e-6)
    # tokens: the 2 prefix tokens are dropped, the patch tokens pooled
    tokens = torch.cat([torch.full((2, 2, 5), 100.0), fmap.flatten(2).transpose(1, 2)], dim=1)  # (B, 2 + 12, C)
    tok = BackbonePool("gem", "NLC", num_prefix_tokens=2, has_class_token=True, p=3.0)
    assert torch.allclose(tok(tokens), pool(fmap), atol=1e-6)
    assert torch.allclose(BackbonePool("avg", "NLC", 2)(tokens), fmap.mean(dim=(2, 3)), atol=1e-6)
    assert torch.equal(BackbonePool("cls", "NLC", 2, has_class_token=True)(tokens), tokens[:, 0])
    # signed (post-LayerNorm) tokens: gem clamps at eps, avg keeps the sign
    neg = -torch.rand(2, 6, 5) - 0.5
    assert torch.allclose(BackbonePool("gem", "NLC", 1, p=3.0)(neg), torch.full((2, 5), 1e-6), rtol=1e-3)
    assert (BackbonePool("avg", "NLC", 1)(neg) < -0.4).all()
    assert "p" not in dict(BackbonePool("cls", "NLC", 1, has_class_token=True).named_parameters())
    with pytest.raises(ValueError, match="class token"):
        BackbonePool("cls", "NCHW")
    with pytest.raises(ValueError, match="token_pool"):
        BackbonePool("max", "NCHW")
    with pytest.raises(ValueError, match="NCHW backbone output expected"):
        pool(tokens)


def test_layouts_come_from_the_backbone_not_the_shapes():
    got = {name: feature_layout(EmbeddingNet(embedding_size=8, **kw).backbone) for name, kw in NETS.items()}
    assert got == {"vit_gem": "NLC", "vit_cls": "NLC", "vit_avg": "NLC", "convnext": "NCHW", "swin": "NHWC",
                   "mambaout": "NHWC"}
    assert EmbeddingNet("test_vit", 8).backbone.dynamic_img_size  # built for any input size
    assert EmbeddingNet(embedding_size=8, **SWIN).backbone.dynamic_img_size
    with pytest.raises(InputError, match="token_pool cls needs a token backbone.*test_convnext gives NCHW"):
        EmbeddingNet("test_convnext", 8, token_pool="cls")


@pytest.mark.parametrize("name", list(NETS))
def test_shapes_gradients_and_a_staged_size_change(name):
    torch.manual_seed(0)
    net = EmbeddingNet(embedding_size=16, **NETS[name])
    assert "trunk" not in dict(net.named_children())  # arch gem: today's layout
    assert {k.split(".")[0] for k in net.state_dict()} == {"backbone", "fc", "bn"} | (
        {"pool"} if NETS[name].get("token_pool", "gem") == "gem" else set())
    x = torch.randn(4, 3, 64, 64)
    net.train()
    emb = net(x)
    assert emb.shape == (4, 16) and torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    # a loss on the neck: every trainable parameter gets a finite gradient
    net.forward_unnormalised(x).pow(2).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert sum(bool(p.grad.abs().sum() > 0) for p in net.parameters()) >= 0.9 * len(list(net.parameters()))
    # built (and first run) at 64, run at 96: token grid / window masks follow the input
    net.eval()
    with torch.no_grad():
        a = net(torch.randn(2, 3, 96, 96))
        b = net(torch.randn(2, 3, 80, 80))
    assert a.shape == b.shape == (2, 16) and torch.isfinite(a).all()


def test_an_artifact_trained_at_one_size_runs_at_another(tmp_path):
    torch.manual_seed(0)
    net = EmbeddingNet("test_vit", 16, token_pool="cls").eval()
    cfg = {"image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 1.0}
    path = save_artifact(tmp_path / "m.pt", net, cfg)
    assert read_artifact(path)["model_args"]["token_pool"] == "cls"
    member = load_member(path, image_size=96)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(member.net(x), net(x), atol=1e-6)
    assert member.transform()(Image.new("RGB", (50, 30))).shape == (3, 96, 96)


def test_arch_registry_holds_gem_and_the_config_checks_the_name():
    assert "gem" in ARCHS
    trunk = build_arch("gem", "test_vit", None, token_pool="avg")
    assert trunk.num_features == 64 and trunk(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(InputError, match=r"arch: expected one of .*gem.*got 'gme' \(did you mean 'gem'\?\)"):
        check_registered({"arch": "gme"}, "x.yaml")
    check_registered({"arch": "gem"})


# --------------------------------------------------------------------------- training
def test_a_vit_trains_a_stage_and_a_second_stage_at_another_size(root, tmp_path):
    """Stage 1 from (pretend) pretrained weights takes test_vit's pretrained preprocessing; stage 2
    (init_from, another image size) inherits it where its config says nothing; random weights get
    the legacy preprocessing."""
    torch.manual_seed(0)
    weights = tmp_path / "vit.pth"
    torch.save(EmbeddingNet("test_vit", 8).backbone.state_dict(), weights)
    tiny = dict(backbone="test_vit", epochs=1, batch_size=8, num_workers=0, log_every_n_steps=1,
                limit_train_batches=2)
    a1 = train(root, tmp_path / "s1", progress=False, image_size=32, pretrained=str(weights), **tiny)
    p1 = read_artifact(a1)
    dc = p1["data_config"]
    # test_vit's pretrained config: mean / std 0.5, bicubic; crop_pct stays the config's 1.0
    assert (dc["mean"], dc["std"], dc["interpolation"], dc["crop_pct"]) == ([0.5] * 3, [0.5] * 3, "bicubic", 1.0)
    a2 = train(root, tmp_path / "s2", progress=False, image_size=48, init_from=str(a1), std=[0.25] * 3, **tiny)
    p2 = read_artifact(a2)
    assert p2["data_config"]["image_size"] == 48 and p2["data_config"]["std"] == [0.25] * 3
    assert (p2["data_config"]["mean"], p2["data_config"]["interpolation"]) == ([0.5] * 3, "bicubic")  # inherited
    assert not all(torch.equal(p1["state_dict"][k], p2["state_dict"][k]) for k in p1["state_dict"])
    net, _, _ = load_artifact(a2)
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    a0 = train(root, tmp_path / "s0", progress=False, image_size=32, pretrained=None, token_pool="cls", **tiny)
    p0 = read_artifact(a0)
    assert {k: p0["data_config"][k] for k in images.LEGACY_PREPROCESSING} == images.LEGACY_PREPROCESSING
    assert p0["model_args"]["token_pool"] == "cls"


# --------------------------------------------------------------------------- data config
def _image(w=41, h=29, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_a_legacy_data_config_gets_exactly_the_old_transform():
    img = _image()
    old = T.Compose([T.Resize((24, 24)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    for legacy in ({"image_size": 24, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}, {"image_size": 24}):
        assert torch.equal(transforms_from_config(legacy)(img), old(img))
        assert torch.equal(Member(torch.nn.Identity(), legacy).transform()(img), old(img))  # glr.predict's path
    assert preprocessing({"image_size": 24}) == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                                 "interpolation": "bilinear", "crop_pct": 1.0}
    # the legacy constant is not shared with its callers
    preprocessing({})["mean"].append(0.0)
    assert images.LEGACY_PREPROCESSING["mean"] == list(IMAGENET_MEAN)


def test_interpolation_and_crop_pct_change_the_eval_transform():
    img = _image()
    base = dict(mean=[0.5] * 3, std=[0.5] * 3)
    bilinear = make_transforms(24, train=False, **base)(img)
    bicubic = make_transforms(24, train=False, interpolation="bicubic", **base)(img)
    assert not torch.equal(bilinear, bicubic)
    expected = T.Compose([T.Resize((24, 24), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                          T.Normalize([0.5] * 3, [0.5] * 3)])(img)
    assert torch.equal(bicubic, expected)
    # crop_pct 0.75: squash to 32 x 32, keep the centre 24 x 24
    cropped = make_transforms(24, train=False, crop_pct=0.75, **base)(img)
    full = make_transforms(32, train=False, **base)(img)
    assert torch.equal(cropped, full[:, 4:28, 4:28])
    assert make_transforms(24, train=True, interpolation="bicubic", **base)(img).shape == (3, 24, 24)
    with pytest.raises(InputError, match="interpolation: expected one of"):
        make_transforms(24, train=False, interpolation="cubic")
    with pytest.raises(InputError, match="crop_pct"):
        make_transforms(24, train=False, crop_pct=1.5)


def test_preprocessing_options_are_coerced_with_clear_errors():
    got = parse_assignments(["mean=0.5,0.4,0.3", "std=[0.2, 0.2, 0.25]", "interpolation=bicubic", "crop_pct=null"])
    assert got == {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25], "interpolation": "bicubic", "crop_pct": None}
    cfg = TrainConfig.from_options({"mean": [1, 0.5, 0], "token_pool": "cls", "backbone_args": "{drop_path_rate: 0.1}"})
    assert cfg.mean == [1.0, 0.5, 0.0] and cfg.group("net")["token_pool"] == "cls"
    assert cfg.group("net")["backbone_args"] == {"drop_path_rate": 0.1}
    assert (TrainConfig().crop_pct, TrainConfig().mean, TrainConfig().interpolation) == (1.0, None, None)
    assert TrainConfig.from_options({"mean": [0.1, 0.2, 0.3]}).to_yaml().count("- 0.") == 3
    for bad, match in [
        ("mean=a,b,c", r"--set: mean: expected a list of 3 numbers \(R, G, B\) or null, got 'a,b,c'"),
        ("mean=0.5,0.5", "mean: expected a list of 3 numbers"),
        ("std=0.2,0,0.2", r"std: expected a list of 3 numbers > 0"),
        ("interpolation=bicubc", r"interpolation: expected one of .* \(did you mean 'bicubic'\?\)"),
        ("crop_pct=0", r"crop_pct: expected a float in \(0, 1\] or null"),
        ("token_pool=mean", "token_pool: expected one of gem, avg, cls"),
    ]:
        with pytest.raises(InputError, match=match):
            parse_assignments([bad])
    with pytest.raises(InputError, match="x.yaml: mean: expected a list"):
        TrainConfig.from_options({"mean": {"r": 0.5}}, "x.yaml")


def test_static_copies_equal_their_sources():
    assert config.TOKEN_POOLS == layers.TOKEN_POOLS
    assert config.INTERPOLATIONS == images.INTERPOLATIONS


def test_the_data_module_takes_what_the_config_leaves_open_from_the_weights(root, tmp_path):
    dm = GLDv2DataModule(str(root), image_size=16, batch_size=2, std=[0.25, 0.25, 0.25])
    assert dm.preprocessing() == {"mean": list(IMAGENET_MEAN), "std": [0.25] * 3, "interpolation": "bilinear",
                                  "crop_pct": 1.0}  # no network known: legacy, except what is set
    dm.bind_net(EmbeddingNet("test_vit", 8))  # random weights: nothing to match
    assert dm.preprocessing()["interpolation"] == "bilinear"
    weights = tmp_path / "vit.pth"
    torch.save(EmbeddingNet("test_vit", 8).backbone.state_dict(), weights)
    pretrained = EmbeddingNet("test_vit", 8, pretrained_file=str(weights))
    assert pretrained.weights_preprocessing == {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                                                "crop_pct": 0.95}
    dm.bind_net(pretrained)
    assert dm.preprocessing() == {"mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic", "crop_pct": 1.0}
    dc = dm.data_config()
    assert {k: dc[k] for k in ("mean", "std", "interpolation", "crop_pct")} == dm.preprocessing()
    dm2 = GLDv2DataModule(str(root), image_size=16, crop_pct=None)
    dm2.bind_net(pretrained)
    assert dm2.preprocessing()["crop_pct"] == 0.95  # null: the weights'
    dm2.bind_net(pretrained, parent={"image_size": 8, "mean": [0.1, 0.2, 0.3], "std": [0.2] * 3})  # init_from
    assert dm2.preprocessing() == {"mean": [0.1, 0.2, 0.3], "std": [0.2] * 3, "interpolation": "bilinear",
                                   "crop_pct": 1.0}  # a legacy parent: what it was trained with
    batch = next(iter(dm.eval_dataloader("index")))
    first = GLDv2Root.open(root).index_ids()[0]
    img = load_image(image_path(root, "index", first))
    assert torch.allclose(batch["image"][0], transforms_from_config(dc)(img))


def test_every_embedding_path_uses_the_artifact_preprocessing(root, tmp_path):
    torch.manual_seed(0)
    net = EmbeddingNet("test_vit", 16).eval()
    cfg = {"image_size": 32, "mean": [0.4, 0.5, 0.6], "std": [0.3, 0.2, 0.25], "interpolation": "bicubic",
           "crop_pct": 0.8}
    member = load_member(save_artifact(tmp_path / "m.pt", net, cfg))
    ids = GLDv2Root.open(root).index_ids()[:5]
    emb, ok = embed_split(member, root, "index", ids, num_workers=0, progress=False)
    assert ok.all()
    tf = member.transform()
    x = torch.stack([tf(load_image(image_path(root, "index", i))) for i in ids])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(net(x), dim=1).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    # the same member with the legacy transform embeds differently
    legacy = Member(net, {"image_size": 32})
    other, _ = embed_split(legacy, root, "index", ids, num_workers=0, progress=False)
    assert np.abs(other - emb).max() > 1e-3
