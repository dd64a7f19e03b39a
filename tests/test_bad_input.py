"""Bad input through the real command line (issue 15, part 7): a synthetic root over an existing one,
truncated / pickled / malformed ``.npz`` embeddings, ``--out`` under a regular file or on a read-only
file system, submissions whose header or rows the official scorer skips silently. Each ends with
exit 2 and one stderr line naming the path before any work, and leaves earlier outputs as they were
(``glr score`` keeps the official figures and warns)."""

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import glr.cli.submit
from glr import metrics
from glr.cli import main
from glr.data.root import GLDv2Root
from glr.data.synth import MARKER, make_synthetic_gldv2
from glr.embeddings.npz import load_embeddings, save_embeddings
from glr.embeddings.store import save_store
from glr.utils import InputError, check_writable_dir, check_writable_file

TINY = dict(n_landmarks=4, scale=0.05, image_size=32, seed=0)
TINY_ARGS = ["--n-landmarks", "4", "--scale", "0.05", "--image-size", "32"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "root"
    make_synthetic_gldv2(path, progress=False, **TINY)
    return path


@pytest.fixture(scope="module")
def first_cv(root, tmp_path_factory):
    """An earlier ``glr cv`` run (thumbnails: no model) whose outputs the failing runs must keep."""
    out = tmp_path_factory.mktemp("cv") / "out"
    assert main(["cv", "--data", str(root), "--descriptor", "thumbnail", "--out", str(out), "--no-recognition"]) == 0
    return out


@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be written into: a read-only tmpfs for root (for whom a ``chmod 0555``
    folder stays writable, so os.access would lie), a ``chmod 0555`` folder otherwise."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(OSError):
            (folder / "x").write_text("x")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (dotfiles included): bytes and mtime."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _fails(capsys, argv, *named) -> str:
    """Run ``glr ARGV``: exit 2, one stderr line ``glr CMD: error: …`` naming each of ``named``."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"glr {argv[0]}: error: "), lines[0]
    for name in named:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- glr synth over a root
def test_synth_refuses_a_root_it_did_not_write_even_with_overwrite(root, tmp_path, capsys):
    other = tmp_path / "gldv2"
    other.mkdir()
    for name in ("train.csv", "index.csv", "test.csv"):  # a real root's tables, not glr synth's
        (other / name).write_bytes((root / name).read_bytes())
    before = _snapshot(other)
    for extra in ([], ["--overwrite"]):
        line = _fails(capsys, ["synth", other, *TINY_ARGS, *extra], other, "train.csv")
        assert "did not write" in line and MARKER in line
        assert _snapshot(other) == before
    # images alone make a root too
    images = tmp_path / "images"
    (images / "index" / "0" / "0" / "0").mkdir(parents=True)
    (images / "index" / "0" / "0" / "0" / "000aaa.jpg").write_bytes(b"jpeg")
    assert "index/" in _fails(capsys, ["synth", images, *TINY_ARGS, "--overwrite"], images)
    assert sorted(p.name for p in images.rglob("*") if p.is_file()) == ["000aaa.jpg"]


def test_synth_replaces_its_own_root_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", str(out), *TINY_ARGS]) == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["complete"] is True and marker["args"] == TINY and marker["images"]["test"] > 0
    before = _snapshot(out)
    assert "--overwrite" in _fails(capsys, ["synth", out, *TINY_ARGS], out)
    assert _snapshot(out) == before
    # --overwrite with other arguments: a new root, with no image of the old one left behind
    assert main(["synth", str(out), *TINY_ARGS, "--seed", "1", "--overwrite"]) == 0
    assert (out / "train.csv").read_bytes() != before["train.csv"][0]
    gld = GLDv2Root.open(out)
    listed = {(s, i) for s in ("index", "test") for i in getattr(gld, f"{s}_ids")()}
    listed |= {("train", i) for i, _ in gld.train_ids_labels("full")}
    on_disk = {(p.relative_to(out).parts[0], p.stem) for p in out.rglob("*.jpg")}
    assert on_disk == listed
    assert json.loads((out / MARKER).read_text())["args"]["seed"] == 1


def test_synth_finishes_its_own_unfinished_root_without_overwrite(tmp_path, capsys):
    out = tmp_path / "synth"
    make_synthetic_gldv2(out, progress=False, **TINY)
    reference = {n: (out / n).read_bytes() for n in ("train.csv", "test.csv", "retrieval_solution_v2.1.csv")}
    marker = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps({**marker, "complete": False}))  # as a run killed while drawing
    (out / "train.csv").unlink()
    assert main(["synth", str(out), *TINY_ARGS]) == 0
    assert {n: (out / n).read_bytes() for n in reference} == reference
    assert json.loads((out / MARKER).read_text())["complete"] is True
    (out / MARKER).write_text("{")  # a corrupt marker is named, nothing touched
    before = _snapshot(out)
    _fails(capsys, ["synth", out, *TINY_ARGS, "--overwrite"], out / MARKER)
    assert _snapshot(out) == before


def test_synth_into_a_folder_without_a_root_keeps_its_other_files(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "README.txt").write_text("mine")
    assert main(["synth", str(out), *TINY_ARGS]) == 0
    assert (out / "README.txt").read_text() == "mine" and (out / "train.csv").is_file()


# --------------------------------------------------------------------------- .npz embeddings
def _hostile_npz(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase of its error)."""
    data = good.read_bytes()
    ids, emb = load_embeddings(good)
    cases = {"truncated": ("truncated or corrupt", lambda p: p.write_bytes(data[: len(data) // 2])),
             "cut_in_a_member": ("truncated or corrupt", lambda p: p.write_bytes(data[:-30])),
             "not_a_zip": ("not an .npz file", lambda p: p.write_bytes(b"\x80\x04K\x01.")),  # a pickle
             "object_arrays": ("never unpickles",
                               lambda p: np.savez(p, ids=np.array(ids, dtype=object), emb=emb)),
             "no_ids": ("no 'ids' array", lambda p: np.savez(p, emb=emb)),
             "one_d": ("must be (N, D)", lambda p: np.savez(p, ids=np.array(ids), emb=emb[:, 0])),
             "count": (f"{len(ids) - 1} ids for {len(ids)} embedding rows",
                       lambda p: np.savez(p, ids=np.array(ids[1:]), emb=emb)),
             "nan": (f"1 embedding row(s) hold NaN or infinity (first: id {ids[1]!r})",
                     lambda p: np.savez(p, ids=np.array(ids), emb=np.where(np.arange(len(ids))[:, None] == 1,
                                                                          np.nan, emb)))}
    out = {}
    for name, (phrase, write) in cases.items():
        path = folder / f"{name}.npz"
        write(path)
        out[name] = (path, phrase)
    return out


def test_search_with_bad_npz_is_one_line_and_keeps_the_earlier_submission(first_cv, tmp_path, capsys):
    q, db = first_cv / "emb_test.npz", first_cv / "emb_index.npz"
    out = tmp_path / "submission.csv"
    assert main(["search", "--query", str(q), "--index", str(db), "--out", str(out)]) == 0
    before = _snapshot(tmp_path)
    (tmp_path / "npz").mkdir()
    for name, (path, phrase) in _hostile_npz(tmp_path / "npz", q).items():
        for flag in ("--query", "--index"):
            argv = ["search", "--query", q, "--index", db, "--out", out]
            argv[argv.index(flag) + 1] = path
            assert phrase in _fails(capsys, argv, path), name
    assert {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith("npz")} == before


def test_cv_with_bad_reused_embeddings_is_one_line_and_keeps_earlier_outputs(root, first_cv, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for p in first_cv.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    before = _snapshot(out)
    for name, (path, phrase) in _hostile_npz(tmp_path, first_cv / "emb_test.npz").items():
        emb = tmp_path / f"emb_{name}"
        emb.mkdir()
        (emb / "emb_test.npz").write_bytes(path.read_bytes())
        (emb / "emb_index.npz").write_bytes((first_cv / "emb_index.npz").read_bytes())
        line = _fails(capsys, ["cv", "--data", root, "--embeddings", emb, "--out", out, "--no-recognition"],
                      emb / "emb_test.npz")
        assert phrase in line, name
        assert _snapshot(out) == before, name
    # a distractor file is read before the work, too
    line = _fails(capsys, ["cv", "--data", root, "--embeddings", first_cv, "--out", out, "--no-recognition",
                           "--distractors", tmp_path / "truncated.npz"], tmp_path / "truncated.npz")
    assert "truncated" in line and _snapshot(out) == before


def test_search_with_a_corrupt_store_manifest_is_one_line(first_cv, tmp_path, capsys):
    ids, emb = load_embeddings(first_cv / "emb_index.npz")
    store = tmp_path / "store"
    save_store(store, ids, emb, shard_size=5)
    manifest = json.loads((store / "manifest.json").read_text())
    for key, value in (("dim", "8"), ("shard_size", 0), ("num_shards", 1)):
        (store / "manifest.json").write_text(json.dumps({**manifest, key: value}))
        line = _fails(capsys, ["search", "--query", first_cv / "emb_test.npz", "--index", store,
                               "--out", tmp_path / "s.csv"], store / "manifest.json")
        assert repr(key) in line or "cannot hold" in line, line
    assert not (tmp_path / "s.csv").exists()


def test_load_embeddings_keeps_what_save_embeddings_wrote(tmp_path):
    save_embeddings(tmp_path / "e.npz", ["a", "b"], np.eye(2, 3, dtype=np.float32))
    ids, emb = load_embeddings(tmp_path / "e.npz")
    assert ids == ["a", "b"] and emb.dtype == np.float32 and emb.flags.c_contiguous
    np.testing.assert_array_equal(emb, np.eye(2, 3))
    save_embeddings(tmp_path / "none.npz", [], np.zeros((0, 3)))
    assert load_embeddings(tmp_path / "none.npz")[0] == []
    with pytest.raises(InputError, match="embeddings file not found"):
        load_embeddings(tmp_path / "missing.npz")


# --------------------------------------------------------------------------- --out that cannot be written
def _commands(root: Path, first_cv: Path, out: Path) -> dict[str, list]:
    """Each command with ``out`` as its output; the model / ensemble files need not exist (the
    output is checked first)."""
    q, db = first_cv / "emb_test.npz", first_cv / "emb_index.npz"
    return {
        "synth": ["synth", out, *TINY_ARGS],
        "train": ["train", "--data", root, "--out", out, "--backbone", "test_resnet", "--pretrained", "",
                  "--epochs", "1"],
        "embed": ["embed", "--model", out.parent / "none.pt", "--data", root, "--split", "index", "--out", out],
        "embed_shards": ["embed", "--model", out.parent / "none.pt", "--data", root, "--split", "index", "--out",
                         out, "--shards"],
        "search": ["search", "--query", q, "--index", db, "--out", out],
        "cv": ["cv", "--data", root, "--embeddings", first_cv, "--out", out, "--no-recognition"],
        "kernel_build": ["kernel", "build", "--ensemble", out.parent / "none.yaml", "--out", out,
                         "--kernel-id", "me/glr-bad-input", "--weights-dataset", "me/glr-bad-weights"],
        "report": ["report", "--cv", first_cv, "--data", root, "--out", out],
    }


COMMANDS = ("synth", "train", "embed", "embed_shards", "search", "cv", "kernel_build", "report")


@pytest.mark.parametrize("command", COMMANDS)
def test_out_under_a_regular_file_is_one_line(root, first_cv, tmp_path, capsys, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    argv = _commands(root, first_cv, blocker / "sub" / "out")[command]
    line = _fails(capsys, argv, blocker)
    assert "not a folder" in line
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("command", COMMANDS)
def test_out_on_a_read_only_file_system_is_one_line(root, first_cv, read_only, capsys, command):
    argv = _commands(root, first_cv, read_only / "out")[command]
    line = _fails(capsys, argv, read_only)
    assert "cannot write here" in line
    assert list(read_only.iterdir()) == []


def test_cv_out_that_is_a_regular_file_is_exit_2(root, first_cv, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("keep me")
    _fails(capsys, ["cv", "--data", root, "--embeddings", first_cv, "--out", out, "--no-recognition"], out)
    assert out.read_text() == "keep me"


def test_writable_checks_leave_nothing_behind_and_create_nothing(tmp_path):
    assert check_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert check_writable_file(tmp_path / "x.csv") == tmp_path / "x.csv"
    assert check_writable_dir(tmp_path, replace=True) == tmp_path
    assert list(tmp_path.iterdir()) == []  # the probe is removed, the folders are not made
    with pytest.raises(InputError, match="is a folder, but --out names a file"):
        check_writable_file(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(InputError, match="exists and is not a folder"):
        check_writable_dir(tmp_path / "f", replace=True)


# --------------------------------------------------------------------------- submissions
def _submissions(root: Path, folder: Path) -> dict[str, Path]:
    """A valid retrieval submission and its header-less, wrong-header, row-less and empty variants."""
    with open(root / "retrieval_solution_v2.1.csv", newline="") as f:
        solution = list(csv.reader(f))[1:]
    index = GLDv2Root.open(root).index_ids()
    rows = "".join(f"{r[0]},{' '.join(r[1].split()[:2] + index[:3]) if r[2] != 'Ignored' else ''}\n"
                   for r in solution)
    texts = {"good": "id,images\n" + rows, "no_header": rows, "wrong_header": "query,images\n" + rows,
             "bom_header": "\ufeffid,images\n" + rows, "no_rows": "id,images\n", "empty": ""}
    paths = {}
    for name, text in texts.items():
        paths[name] = folder / f"{name}.csv"
        paths[name].write_text(text, encoding="utf-8")
    paths["good_minus_first"] = folder / "good_minus_first.csv"
    paths["good_minus_first"].write_text("id,images\n" + rows.split("\n", 1)[1], encoding="utf-8")
    return paths


@pytest.mark.parametrize("name, phrase", [("no_header", "line 1 is not the header 'id,images'"),
                                          ("wrong_header", "but 'query,images'"),
                                          ("bom_header", "byte-order mark"),
                                          ("no_rows", "no rows"), ("empty", "empty file")])
def test_score_warns_on_what_the_official_scorer_skips_and_keeps_its_figures(root, tmp_path, capsys, name, phrase):
    subs = _submissions(root, tmp_path)
    solution = root / "retrieval_solution_v2.1.csv"
    capsys.readouterr()
    assert main(["score", "--task", "retrieval", "--solution", str(solution), "--submission", str(subs[name]),
                 "--json"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines and all(ln.startswith(f"glr score: warning: {subs[name]}: ") for ln in lines)
    assert len(lines) == 1 and phrase in lines[0], lines
    # the figures are the official arithmetic's: line 1 skipped whatever it holds
    assert json.loads(captured.out) == metrics.score("retrieval", solution, subs[name])
    if name == "no_header":
        assert json.loads(captured.out) == metrics.score("retrieval", solution, subs["good_minus_first"])
    if name in ("wrong_header", "bom_header"):
        assert json.loads(captured.out) == metrics.score("retrieval", solution, subs["good"])


def test_score_of_a_sound_submission_warns_nothing(root, tmp_path, capsys):
    subs = _submissions(root, tmp_path)
    capsys.readouterr()
    assert main(["score", "--task", "retrieval", "--solution", str(root / "retrieval_solution_v2.1.csv"),
                 "--submission", str(subs["good"])]) == 0
    assert capsys.readouterr().err == ""
    assert metrics.submission_warnings(subs["good"], "retrieval") == []


@pytest.mark.parametrize("name, phrase", [("no_header", "header must be 'id,images'"),
                                          ("wrong_header", "got 'query,images'"), ("no_rows", "no rows"),
                                          ("empty", "empty file"), ("missing", "submission file not found")])
def test_submit_file_refuses_it_before_any_request(root, tmp_path, capsys, monkeypatch, name, phrase):
    subs = _submissions(root, tmp_path)
    path = subs.get(name, tmp_path / "missing.csv")

    def no_upload(*args, **kwargs):
        raise AssertionError("submit_file was called")

    monkeypatch.setattr(glr.cli.submit, "submit_file", no_upload)
    capsys.readouterr()
    assert glr.cli.submit.main(["submit", "file", "--competition", "landmark-retrieval-2021", "--file", str(path),
                                "--task", "retrieval", "--message", "x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"glr submit: error: {path}") and phrase in lines[0], lines
