"""Embedding extraction, reference descriptors and the embedding file format."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from glr.embeddings.extract import PooledFeatures, extract_embeddings, thumbnail_embeddings
from glr.embeddings.npz import load_embeddings, save_embeddings
from glr.model.net import EmbeddingNet
from glr.utils import InputError


class _Tensors(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "index": i}


def test_extract_keeps_order_and_normalises():
    torch.manual_seed(0)
    net = EmbeddingNet("test_resnet", embedding_size=24).eval()
    x = torch.randn(11, 3, 48, 48)
    emb = extract_embeddings(net, DataLoader(_Tensors(x), batch_size=4), device="cpu", progress=False)
    assert emb.dtype == np.float32 and emb.shape == (11, 24) and emb.flags.c_contiguous
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_pooled_features_are_the_backbone_gem():
    torch.manual_seed(0)
    net = EmbeddingNet("test_resnet", embedding_size=8).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        out = PooledFeatures(net)(x)
        raw = net.pool(net.backbone.forward_features(x))
    assert out.shape == (2, net.feature_dim)
    assert torch.allclose(out, raw / raw.norm(dim=1, keepdim=True), atol=1e-6)


def test_thumbnails(tmp_path):
    paths = []
    for i, colour in enumerate([(255, 0, 0), (250, 5, 5), (0, 0, 255)]):
        p = tmp_path / f"{i}.jpg"
        Image.new("RGB", (40, 30), colour).save(p)
        paths.append(p)
    t = thumbnail_embeddings(paths, size=16, progress=False)
    assert t.shape == (3, 768)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert t[0] @ t[1] > 0.99 and t[0] @ t[2] < 0.0
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="bad.jpg"):
        thumbnail_embeddings([tmp_path / "bad.jpg"], progress=False)


def test_embedding_file_round_trip(tmp_path):
    ids = ["0000000000000e12", "00000000000000ff"]
    emb = np.eye(2, 5, dtype=np.float32)
    path = save_embeddings(tmp_path / "e.npz", ids, emb)
    ids2, emb2 = load_embeddings(path)
    assert ids2 == ids and np.array_equal(emb2, emb)
    with pytest.raises(ValueError, match="2 ids for 1"):
        save_embeddings(tmp_path / "f.npz", ids, emb[:1])
    assert not (tmp_path / "f.npz").exists()


def test_flip_tta_averages_the_mirrored_view():
    torch.manual_seed(0)
    net = EmbeddingNet("test_resnet", embedding_size=16).eval()
    x = torch.randn(5, 3, 40, 40)
    emb = extract_embeddings(net, DataLoader(_Tensors(x), batch_size=2), device="cpu", progress=False, flip=True)
    with torch.no_grad():
        a = torch.nn.functional.normalize(net(x), dim=1)
        b = torch.nn.functional.normalize(net(torch.flip(x, dims=[3])), dim=1)
    expected = torch.nn.functional.normalize(a + b, dim=1).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    assert not np.allclose(emb, a.numpy(), atol=1e-3)  # the flip really changed something


def test_multiscale_tta_embeds_each_scale(tmp_path):
    from glr.embeddings.extract import embed_images
    from glr.data.synth import make_synthetic_gldv2
    from glr.data.root import GLDv2Root

    make_synthetic_gldv2(tmp_path / "d", n_landmarks=4, scale=0.05, image_size=32, seed=0, progress=False)
    root = GLDv2Root.open(tmp_path / "d")
    ids = root.index_ids()[:3]
    torch.manual_seed(0)
    net = EmbeddingNet("test_resnet", embedding_size=8).eval()
    one = {s: embed_images(net, root.root, "index", ids, s, num_workers=0, progress=False)[0] for s in (23, 32, 45)}
    multi = embed_images(net, root.root, "index", ids, 32, num_workers=0, progress=False,
                         scales=(0.707, 1.0, 1.414))[0]
    mean = one[23] + one[32] + one[45]
    np.testing.assert_allclose(multi, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
    with pytest.raises(ValueError, match="scales"):
        embed_images(net, root.root, "index", ids, 32, num_workers=0, progress=False, scales=(0.0,))
