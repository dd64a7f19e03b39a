"""Decode once per split: every member and TTA view from one decode, bit-identical to embedding each
member and scale with its own loader; one intra-op thread for the loading; ``num_workers: auto``."""

import argparse
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from glr.arrays import l2_normalize
from glr.cli.args import workers
from glr.data.images import (EvalView, ImageDataset, MultiViewDataset, SafeImages, decode_count, default_num_workers,
                             make_transforms, one_thread, preprocessing, resolve_num_workers)
from glr.data.readers import image_path
from glr.data.root import GLDv2Root
from glr.data.synth import make_synthetic_gldv2
from glr.embeddings import extract
from glr.model.net import EmbeddingNet
from glr.postprocess.expansion import combine_embeddings
from glr.predict import TTA, Member, embed_ensemble, embed_split
from glr.utils import InputError

SCALES = (0.75, 1.0, 1.25)


@pytest.fixture(autouse=True)
def _one_thread():
    """The forwards of these tiny nets at one thread (a shared machine's cores are busy); the
    reference runs in the same process, so the comparison holds at any thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small root whose index holds a non-square image and an unreadable one, and two members
    with different sizes and preprocessing."""
    path = tmp_path_factory.mktemp("decode") / "d"
    make_synthetic_gldv2(path, n_landmarks=4, scale=0.05, image_size=48, seed=0, progress=False)
    root = GLDv2Root.open(path)
    ids = {"index": root.index_ids()[:9], "test": root.test_ids()[:5]}
    Image.effect_noise((61, 37), 40).convert("RGB").save(image_path(path, "index", ids["index"][2]), quality=90)
    image_path(path, "index", ids["index"][5]).write_bytes(b"not a jpeg")
    torch.manual_seed(0)
    a = Member(EmbeddingNet("test_resnet", embedding_size=8).eval(), {"image_size": 32}, name="a", weight=1.0)
    b = Member(EmbeddingNet("test_efficientnet", embedding_size=12).eval(),
               {"image_size": 40, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic",
                "crop_pct": 0.875}, name="b", weight=0.7)
    return path, ids, [a, b]


def _reference(member: Member, root, split: str, ids, flip: bool, scales, batch_size: int):
    """Today's path, written out: one loader per scale, each image decoded again for each."""
    views, ok = [], np.ones(len(ids), bool)
    for s in scales:
        size = max(8, int(round(member.size * s)))
        tf = make_transforms(size, train=False, **preprocessing(member.data_config))
        ds = SafeImages(ImageDataset(root, split, ids, transform=tf), size)
        rows, oks = [], []
        with torch.no_grad():
            for batch in DataLoader(ds, batch_size=batch_size):
                x = batch["image"]
                e = F.normalize(member.net(x).float(), dim=1)
                if flip:
                    e = F.normalize(e + F.normalize(member.net(torch.flip(x, dims=[3])).float(), dim=1), dim=1)
                e = e.numpy()
                e[~batch["ok"].numpy()] = 0.0
                rows.append(e)
                oks.append(batch["ok"].numpy())
        views.append(np.ascontiguousarray(np.concatenate(rows), dtype=np.float32))
        ok &= np.concatenate(oks)
    emb = views[0] if len(views) == 1 else l2_normalize(np.mean(views, axis=0))
    emb[~ok] = 0.0
    return emb, ok


def test_one_decode_gives_the_per_member_per_scale_embeddings(data):
    path, ids, members = data
    stats: dict = {}
    before = decode_count()
    emb, ok = embed_ensemble(members, path, ids, tta=TTA(True, SCALES), batch_size=4, num_workers=0,
                             device="cpu", progress=False, stats=stats)
    assert decode_count() - before == sum(len(v) for v in ids.values())  # no worker: counted here
    assert stats == {s: {"images": len(v), "decodes": len(v)} for s, v in ids.items()}
    for split, split_ids in ids.items():
        refs = [_reference(m, path, split, split_ids, True, SCALES, 4) for m in members]
        expected = combine_embeddings([r[0] for r in refs], [m.weight for m in members])
        expected_ok = refs[0][1] & refs[1][1]
        expected[~expected_ok] = 0.0
        assert np.array_equal(ok[split], expected_ok)
        assert emb[split].dtype == np.float32 and emb[split].shape == (len(split_ids), 20)
        assert np.array_equal(emb[split], expected), split
    assert ok["index"].tolist() == [i != 5 for i in range(9)] and not emb["index"][5].any()
    assert ok["test"].all()
    plain = combine_embeddings([_reference(m, path, "test", ids["test"], False, (1.0,), 4)[0] for m in members],
                               [m.weight for m in members])
    assert not np.allclose(emb["test"], plain, atol=1e-3)  # the flip and the scales changed something


def test_workers_decode_once_and_agree(data):
    path, ids, members = data
    stats: dict = {}
    split = {"index": ids["index"]}
    serial, _ = embed_ensemble(members, path, split, tta=TTA(True, SCALES), batch_size=4, num_workers=0,
                               device="cpu", progress=False)
    parallel, ok = embed_ensemble(members, path, split, tta=TTA(True, SCALES), batch_size=4, num_workers=2,
                                  device="cpu", progress=False, stats=stats)
    assert stats["index"] == {"images": 9, "decodes": 9}  # counted in the workers, carried by the items
    assert np.array_equal(parallel["index"], serial["index"]) and not ok["index"][5]


def test_one_member_path_and_the_unreadable_image(data):
    path, ids, members = data
    emb, ok = embed_split(members[1], path, "index", ids["index"], tta=TTA(False, (1.0, 1.25)), batch_size=3,
                          num_workers=0, device="cpu", progress=False)
    ref, ref_ok = _reference(members[1], path, "index", ids["index"], False, (1.0, 1.25), 3)
    assert np.array_equal(emb, ref) and np.array_equal(ok, ref_ok)
    with pytest.raises(InputError, match=ids["index"][5]):
        embed_split(members[1], path, "index", ids["index"], num_workers=0, device="cpu", progress=False,
                    skip_unreadable=False)


def test_equal_views_are_computed_once(data):
    path, ids, _ = data
    a = EvalView.of(32)
    views = [a, EvalView.of(32, mean=(0.5,) * 3, std=(0.5,) * 3), EvalView.of(32.0), EvalView.of(24, crop_pct=0.9)]
    ds = MultiViewDataset(path, "index", ids["index"], views, skip_unreadable=True)
    assert ds.views == [views[0], views[1], views[3]]  # the third is the first
    item = ds[2]
    assert item["decodes"] == 1 and item["ok"] and [tuple(t.shape) for t in item["views"]] == [
        (3, 32, 32), (3, 32, 32), (3, 24, 24)]
    image = Image.open(image_path(path, "index", ids["index"][2])).convert("RGB")
    for v, t in zip(ds.views, item["views"]):
        assert torch.equal(t, v.transform()(image))
    bad = ds[5]
    assert not bad["ok"] and ids["index"][5] in bad["error"] and not any(t.any() for t in bad["views"])


def test_loading_runs_one_intra_op_thread():
    class Threads(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"threads": torch.get_num_threads()}

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fetched = [b["threads"].tolist() for b in extract._fetched(DataLoader(Threads(), batch_size=2), True)]
        assert fetched == [[1, 1], [1, 1]] and torch.get_num_threads() == 2
        loader = DataLoader(Threads(), batch_size=2, num_workers=1, worker_init_fn=extract.one_thread_worker)
        assert [b["threads"].tolist() for b in loader] == [[1, 1], [1, 1]]
        with pytest.raises(RuntimeError), one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_num_workers_auto(monkeypatch):
    for cores, expected in ((1, 0), (2, 1), (4, 3), (32, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert default_num_workers() == expected
        assert resolve_num_workers("auto") == resolve_num_workers(None) == expected
    assert resolve_num_workers(3) == resolve_num_workers("3") == 3
    for bad in (-1, "x", 1.5, True):
        with pytest.raises(InputError, match=r"kernel settings: num_workers: .*'auto'"):
            resolve_num_workers(bad, "num_workers", "the kernel settings")
    assert workers("auto") == "auto" and workers("4") == 4
    with pytest.raises(argparse.ArgumentTypeError, match="-1"):
        workers("-1")
    from glr.kaggle.kernel.runtime import SETTINGS_DEFAULTS

    assert SETTINGS_DEFAULTS["num_workers"] == "auto"


def test_precision_and_compile(data, monkeypatch):
    path, ids, members = data
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert extract.resolve_precision(None, cpu) == "fp32" and extract.resolve_precision(None, cuda) == "fp16"
    assert extract.resolve_precision("bf16", cuda) == "bf16"
    with pytest.raises(InputError, match="precision: expected one of fp16, bf16, fp32, got 'fp8'"):
        embed_ensemble(members, path, ids, precision="fp8", device="cpu", progress=False)
    real, compiled = torch.compile, []

    def eager(net, **kw):  # Dynamo's tracing without inductor's minute of C++ compilation
        compiled.append(net)
        return real(net, backend="eager")

    monkeypatch.setattr(torch, "compile", eager)
    monkeypatch.setenv("GLR_COMPILE", "1")
    one = {"test": ids["test"][:3]}
    emb, _ = embed_ensemble(members[:1], path, one, num_workers=0, device="cpu", progress=False)
    plain, _ = embed_ensemble(members[:1], path, one, num_workers=0, device="cpu", progress=False, compile=False)
    assert compiled == [members[0].net] and np.allclose(emb["test"], plain["test"], atol=1e-6)
