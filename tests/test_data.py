"""Tests for glr.data: CSV readers, root layouts, label maps, datasets, DataModule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from glr.data.root import GLDv2Root, build_label_map
from glr.data.images import ImageDataset, make_transforms, transforms_from_config
from glr.data.readers import image_path, read_ids, read_image_to_landmark, read_label_table, read_train, read_train_clean, scan_image_ids
from glr.train.datamodule import GLDv2DataModule
from glr.utils import InputError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make_jpeg(root: Path, split: str, image_id: str, size=(24, 18), color=(200, 30, 60)) -> Path:
    p = image_path(root, split, image_id)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(p, "JPEG")
    return p


def hexid(n: int) -> str:
    return f"{n:016x}"


def assert_where(exc: pytest.ExceptionInfo, name: str, line: int | None) -> None:
    msg = str(exc.value)
    assert name in msg, msg
    if line is not None:
        assert f"{name}:{line}:" in msg, msg
        assert exc.value.line == line


# ---------------------------------------------------------------------------
# readers


def test_image_path():
    assert image_path("/r", "train", "0123456789abcdef") == Path("/r/train/0/1/2/0123456789abcdef.jpg")
    with pytest.raises(InputError):
        image_path("/r", "train", "ab")
    with pytest.raises(InputError):
        image_path("/r", "train", "ab/../c")


def test_read_train_both_headers_and_exact_ids(tmp_path):
    official = write(
        tmp_path / "train.csv",
        "id,url,landmark_id\n"
        "0000000000000e12,https://x/a.jpg,7\n"
        '0123456789012345,"https://x/b,c.jpg",0\n'
        "\n"
        "00000000000000ff,https://x/d.jpg,203093\n",
    )
    assert read_train(official) == [("0000000000000e12", 7), ("0123456789012345", 0), ("00000000000000ff", 203093)]
    kaggle = write(tmp_path / "k.csv", "landmark_id,id,extra\n5,0000000000000e12,x\n")
    assert read_train(kaggle) == [("0000000000000e12", 5)]
    # utf-8 BOM in the header and CRLF line ends
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfid,landmark_id\r\n0000000000000001,3\r\n")
    assert read_train(bom) == [("0000000000000001", 3)]


@pytest.mark.parametrize(
    "body, line, needle",
    [
        ("id,url\n0000000000000001,u\n", 1, "landmark_id"),
        ("id,url,landmark_id\n0000000000000001,u,1\n0000000000000002,u\n", 3, "fields"),
        ("id,url,landmark_id\n0000000000000001,u,1\n0000000000000002,u,1,9\n", 3, "fields"),
        ("id,url,landmark_id\n0000000000000001,u,1\n0000000000000002,u,x\n", 3, "integer"),
        ("id,url,landmark_id\n0000000000000001,u,1.0\n", 2, "integer"),
        ("id,url,landmark_id\n0000000000000001,u,-3\n", 2, "integer"),
        ("id,url,landmark_id\n0000000000000001,u, 3\n", 2, "integer"),
        ("id,url,landmark_id\n0000000000000001,u,1\n,u,2\n", 3, "empty"),
        ("id,url,landmark_id\n0000000000000001,u,1\n0000000000000002,u,1\n0000000000000001,u,1\n", 4, "duplicate.*first on line 2"),
        ("", 1, "empty file"),
    ],
)
def test_read_train_errors(tmp_path, body, line, needle):
    p = write(tmp_path / "train.csv", body)
    with pytest.raises(InputError, match=needle) as exc:
        read_train(p)
    assert_where(exc, "train.csv", line)


def test_missing_files(tmp_path):
    for reader in (read_train, read_train_clean, read_ids, read_image_to_landmark, read_label_table):
        with pytest.raises(InputError, match="not found") as exc:
            reader(tmp_path / "nope.csv")
        assert_where(exc, "nope.csv", None)


def test_read_train_clean(tmp_path):
    p = write(
        tmp_path / "train_clean.csv",
        'landmark_id,images\n1,0000000000000e12 0123456789abcdef\n"7","00000000000000aa"\n',
    )
    assert read_train_clean(p) == {1: ["0000000000000e12", "0123456789abcdef"], 7: ["00000000000000aa"]}
    bad = {
        "landmark_id\n1\n": (1, "images"),
        "landmark_id,images\n1,a0000 b0000\nx,c0000\n": (3, "integer"),
        "landmark_id,images\n1,a0000\n1,b0000\n": (3, "duplicate landmark"),
        "landmark_id,images\n1,a0000\n2,a0000\n": (3, "landmarks 1 and 2"),
        "landmark_id,images\n1,a0000 a0000\n": (2, "twice"),
        "landmark_id,images\n1,a0000,x\n": (2, "fields"),
    }
    for body, (line, needle) in bad.items():
        write(p, body)
        with pytest.raises(InputError, match=needle) as exc:
            read_train_clean(p)
        assert_where(exc, "train_clean.csv", line)


def test_read_label_table(tmp_path):
    cat = write(
        tmp_path / "train_label_to_category.csv",
        'landmark_id,category\n1,"http://commons.wikimedia.org/wiki/Category:A,_B"\n2,http://c/D\n',
    )
    assert read_label_table(cat, "category") == {1: "http://commons.wikimedia.org/wiki/Category:A,_B", 2: "http://c/D"}
    country = write(
        tmp_path / "train_label_to_country.csv", "landmark_id,country,continent\n1,France,Europe\n2,Chile,South America\n"
    )
    assert read_label_table(country, "country") == {1: "France", 2: "Chile"}
    assert read_label_table(country, "continent") == {1: "Europe", 2: "South America"}
    with pytest.raises(InputError, match="category") as exc:
        read_label_table(country, "category")
    assert_where(exc, "train_label_to_country.csv", 1)
    write(country, "landmark_id,country,continent\n1,France,Europe\n1,Chile,South America\n")
    with pytest.raises(InputError, match="duplicate") as exc:
        read_label_table(country, "country")
    assert_where(exc, "train_label_to_country.csv", 3)
    write(country, "landmark_id,country,continent\n1,France\n")
    with pytest.raises(InputError, match="fields") as exc:
        read_label_table(country, "country")
    assert_where(exc, "train_label_to_country.csv", 2)


def test_read_ids(tmp_path):
    p = write(tmp_path / "index.csv", 'id\n0000000000000e12\n"0123456789abcdef"\n1e10000000000000\n')
    assert read_ids(p) == ["0000000000000e12", "0123456789abcdef", "1e10000000000000"]
    for body, line, needle in [
        ("image\n0000000000000e12\n", 1, "id"),
        ("id\n0000000000000e12\n\"\"\n", 3, "empty"),
        ("id\naaa\nbbb\naaa\n", 4, "duplicate.*first on line 2"),
        ("id\naaa\nb b\n", 3, "whitespace"),
        ("id\naaa\nbbb,ccc\n", 3, "fields"),
    ]:
        write(p, body)
        with pytest.raises(InputError, match=needle) as exc:
            read_ids(p)
        assert_where(exc, "index.csv", line)


def test_read_image_to_landmark(tmp_path):
    p = write(tmp_path / "index_image_to_landmark.csv", "id,landmark_id\n0000000000000e12,5511\n0123000000000000,0\n")
    assert read_image_to_landmark(p) == {"0000000000000e12": 5511, "0123000000000000": 0}
    write(p, "id,landmark_id\n0000000000000e12,5511\n0000000000000e12,3\n")
    with pytest.raises(InputError, match="duplicate") as exc:
        read_image_to_landmark(p)
    assert_where(exc, "index_image_to_landmark.csv", 3)


# ---------------------------------------------------------------------------
# roots

TRAIN = {  # id -> landmark (train numbering)
    hexid(0x1001): 10, hexid(0x1002): 10, hexid(0x1003): 10,
    hexid(0x2001): 3, hexid(0x2002): 3,
    hexid(0x3001): 42,
    "0000000000000e12": 3,
}
INDEX = [hexid(0xA001), hexid(0xA002), "0000000000000e13"]
TEST = [hexid(0xB001), hexid(0xB002)]


def official_root(tmp_path: Path) -> Path:
    root = tmp_path / "gldv2"
    write(root / "train.csv", "id,url,landmark_id\n" + "".join(f'{i},"http://u/{i},x.jpg",{lm}\n' for i, lm in TRAIN.items()))
    # clean: landmark 10 minus 0x1003, landmark 3, and one id missing from train.csv
    write(
        root / "train_clean.csv",
        f"landmark_id,images\n10,{hexid(0x1001)} {hexid(0x1002)}\n3,{hexid(0x2001)} 0000000000000e12 {hexid(0x9999)}\n",
    )
    write(root / "index.csv", "id\n" + "".join(f"{i}\n" for i in INDEX))
    write(root / "test.csv", "id\n" + "".join(f"{i}\n" for i in TEST))
    write(root / "retrieval_solution_v2.1.csv", f"id,images,Usage\n{TEST[0]},{INDEX[0]},Public\n")
    write(root / "train_label_to_country.csv", "landmark_id,country,continent\n10,Peru,South America\n3,Japan,Asia\n")
    for i in TRAIN:
        make_jpeg(root, "train", i)
    return root


def kaggle_root(tmp_path: Path) -> Path:
    root = tmp_path / "kaggle"
    write(root / "train.csv", "id,landmark_id\n" + "".join(f"{i},{lm}\n" for i, lm in TRAIN.items()))
    for i in TRAIN:
        make_jpeg(root, "train", i, size=(30, 20))
    for i in INDEX:
        make_jpeg(root, "index", i)
    for i in reversed(TEST):
        make_jpeg(root, "test", i)
    return root


def test_official_layout(tmp_path):
    root = official_root(tmp_path)
    r = GLDv2Root.open(root)
    assert r.layout == "gldv2" and r.root == root
    assert r.train_ids_labels("full") == list(TRAIN.items())
    clean = r.train_ids_labels("clean")  # train.csv order, restricted to train.csv ids
    assert clean == [(hexid(0x1001), 10), (hexid(0x1002), 10), (hexid(0x2001), 3), ("0000000000000e12", 3)]
    assert r.index_ids() == INDEX
    assert r.test_ids() == TEST
    assert r.solution_path("retrieval") == root / "retrieval_solution_v2.1.csv"
    assert r.solution_path("recognition") is None
    assert r.country_of() == {10: "Peru", 3: "Japan"}
    assert r.path("index", INDEX[2]) == root / "index/0/0/0/0000000000000e13.jpg"
    with pytest.raises(ValueError):
        r.solution_path("other")


def test_official_missing_files(tmp_path):
    root = official_root(tmp_path)
    (root / "train_clean.csv").unlink()
    (root / "index.csv").unlink()
    r = GLDv2Root.open(root)
    with pytest.raises(InputError, match="full") as exc:
        r.train_ids_labels("clean")
    assert_where(exc, "train_clean.csv", None)
    with pytest.raises(InputError) as exc:
        r.index_ids()
    assert_where(exc, "index.csv", None)
    (root / "train.csv").unlink()
    with pytest.raises(InputError) as exc:
        GLDv2Root.open(root)
    assert_where(exc, "train.csv", None)
    with pytest.raises(InputError):
        GLDv2Root.open(tmp_path / "absent")


def test_clean_label_conflict(tmp_path):
    root = official_root(tmp_path)
    write(root / "train_clean.csv", f"landmark_id,images\n3,{hexid(0x1001)}\n")
    with pytest.raises(InputError, match="train.csv") as exc:
        GLDv2Root.open(root).train_ids_labels("clean")
    assert_where(exc, "train_clean.csv", None)


def test_kaggle_layout_scan(tmp_path):
    root = kaggle_root(tmp_path)
    (root / "index" / "._junk.jpg").touch()  # not at depth 4: ignored
    (root / "test" / "0" / "0" / "0" / ".hidden.jpg").touch()  # dot-file: ignored
    r = GLDv2Root.open(root)
    assert r.layout == "kaggle"
    assert r.index_ids() == sorted(INDEX)
    assert r.test_ids() == sorted(TEST)
    assert r.train_ids_labels("full") == list(TRAIN.items())
    assert r.train_ids_labels("clean") == list(TRAIN.items())  # Kaggle train.csv is the clean set
    assert r.solution_path("retrieval") is None and r.country_of() is None
    # a csv, when present, wins over the scan
    write(root / "test.csv", f"id\n{TEST[1]}\n")
    assert r.test_ids() == [TEST[1]]
    # misplaced image
    bad = root / "index" / "f" / "f" / "f" / f"{hexid(0xA003)}.jpg"
    bad.parent.mkdir(parents=True)
    bad.touch()
    with pytest.raises(InputError, match=hexid(0xA003)):
        r.index_ids()
    with pytest.raises(InputError) as exc:
        scan_image_ids(root, "nope")
    assert "nope" in str(exc.value)


# ---------------------------------------------------------------------------
# label map, transforms, dataset


def test_build_label_map():
    lms = [42, 3, 3, 10, 10, 10, 7]
    assert build_label_map(lms) == {3: 0, 7: 1, 10: 2, 42: 3}
    assert build_label_map(lms, min_samples=2) == {3: 0, 10: 1}
    assert build_label_map(iter(lms), min_samples=3) == {10: 0}
    assert build_label_map([], 1) == {}
    with pytest.raises(ValueError):
        build_label_map(lms, 0)


def test_transforms_shapes():
    img = Image.new("RGB", (40, 25), (10, 200, 30))
    torch.manual_seed(0)
    for train in (True, False):
        x = make_transforms(16, train=train, hflip=train)(img)
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    x = make_transforms(8, train=False)(img)
    expected = (torch.tensor([10, 200, 30]) / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x[:, 4, 4], expected, atol=0.02)


def test_image_dataset(tmp_path):
    root = kaggle_root(tmp_path)
    ids = [hexid(0x1001), "0000000000000e12"]
    ds = ImageDataset(root, "train", ids, [4, 1], make_transforms(12, train=False))
    assert len(ds) == 2
    item = ds[1]
    assert item["image"].shape == (3, 12, 12) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.long and item["label"].ndim == 0 and item["label"].item() == 1
    assert item["index"] == 1
    raw = ImageDataset(root, "test", TEST)[0]
    assert raw["image"].shape == (3, 18, 24) and "label" not in raw
    missing = ImageDataset(root, "index", ["00000000deadbeef"])
    with pytest.raises(InputError, match="00000000deadbeef") as exc:
        missing[0]
    assert "deadbeef.jpg" in str(exc.value)
    broken = image_path(root, "index", "00000000badbad00")
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="00000000badbad00"):
        ImageDataset(root, "index", ["00000000badbad00"])[0]
    with pytest.raises(ValueError):
        ImageDataset(root, "train", ids, [1])


# ---------------------------------------------------------------------------
# DataModule


def test_datamodule_kaggle(tmp_path):
    root = kaggle_root(tmp_path)
    dm = GLDv2DataModule(str(root), image_size=16, batch_size=2, train_set="clean", min_samples=2)
    dm.setup("fit")
    assert dm.label_map == {3: 0, 10: 1} and dm.num_classes == 2 and dm.landmark_ids == [3, 10]
    assert len(dm.train_ids) == 6 and hexid(0x3001) not in dm.train_ids
    assert dm.train_labels == [dm.label_map[TRAIN[i]] for i in dm.train_ids]
    loader = dm.train_dataloader()
    assert loader.drop_last and loader.num_workers == 0
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2,) and batch["label"].dtype == torch.long
    assert all(dm.train_labels[int(i)] == int(l) for i, l in zip(batch["index"], batch["label"]))
    assert dm.val_dataloader() == []

    idx = dm.eval_dataloader("index")
    b = next(iter(idx))
    assert b["image"].shape == (2, 3, 16, 16) and "label" not in b and b["index"].tolist() == [0, 1]
    assert idx.dataset.ids == sorted(INDEX)
    assert len(dm.eval_dataloader("train").dataset) == len(TRAIN)  # whole subset, small classes too
    assert dm.eval_dataloader("test", ids=[TEST[0]]).dataset.ids == [TEST[0]]

    cfg = json.loads(json.dumps(dm.data_config()))
    assert cfg == dm.data_config()
    assert cfg["num_classes"] == 2 and cfg["label_map"] == {"3": 0, "10": 1}
    assert cfg["image_size"] == 16 and cfg["train_set"] == "clean" and cfg["min_samples"] == 2
    assert transforms_from_config(cfg)(Image.new("RGB", (5, 7))).shape == (3, 16, 16)
    assert dm.hparams.batch_size == 2


def test_datamodule_official_clean_and_val(tmp_path):
    root = official_root(tmp_path)
    dm = GLDv2DataModule(str(root), image_size=8, batch_size=8, train_set="clean", min_samples=1, val_fraction=0.5)
    dm.setup()
    assert dm.label_map == {3: 0, 10: 1}
    assert len(dm.val_ids) == 2 and len(dm.train_ids) == 2
    assert set(dm.train_labels) == {0, 1}  # no class loses its last training image
    assert not set(dm.train_ids) & set(dm.val_ids)
    assert not dm.train_dataloader().drop_last  # smaller than one batch
    vb = next(iter(dm.val_dataloader()))
    assert vb["image"].shape == (2, 3, 8, 8) and vb["label"].shape == (2,)
    with pytest.raises(InputError, match="at least 5"):
        GLDv2DataModule(str(root), train_set="full", min_samples=5).setup()
    with pytest.raises(ValueError):
        GLDv2DataModule(str(root), train_set="dirty")
