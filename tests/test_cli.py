"""The command line: score output, configs, argument errors."""

import json
from pathlib import Path

import pytest

from glr.cli import main
from glr.workflows.experiment import parse_experiment
from glr.utils import InputError

CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml"))


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_score_json_has_public_and_private(tmp_path, capsys):
    sol = _write(tmp_path / "sol.csv", ["id,images,Usage", "q1,a b,Public", "q2,c,Private", "q3,None,Ignored"])
    sub = _write(tmp_path / "sub.csv", ["id,images", "q1,b a", "q2,x c", "q3,zzz"])
    assert main(["score", "--task", "retrieval", "--solution", str(sol), "--submission", str(sub), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["public"]["map@100"] == 1.0          # both relevant at ranks 1, 2
    assert out["private"]["map@100"] == 0.5         # relevant at rank 2: 1/2 / min(1, 100)
    assert out["public"]["n_queries"] == 1 and out["private"]["n_queries"] == 1


def test_score_null_subset_and_table(tmp_path, capsys):
    sol = _write(tmp_path / "sol.csv", ["id,landmarks,Usage", "q1,7,Private", "q2,,Public"])
    sub = _write(tmp_path / "sub.csv", ["id,landmarks", "q1,7 0.9", "q2,3 0.5"])
    assert main(["score", "--task", "recognition", "--solution", str(sol), "--submission", str(sub), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["public"] is None                    # no Public query with ground truth
    assert out["private"]["gap"] == 1.0
    assert main(["score", "--task", "recognition", "--solution", str(sol), "--submission", str(sub)]) == 0
    assert "—" in capsys.readouterr().out


def test_score_bad_submission_names_file_and_line(tmp_path, capsys):
    sol = _write(tmp_path / "sol.csv", ["id,landmarks,Usage", "q1,7,Private"])
    sub = _write(tmp_path / "sub.csv", ["id,landmarks", "q1,7 0.9 1"])
    assert main(["score", "--task", "recognition", "--solution", str(sol), "--submission", str(sub)]) == 2
    assert "sub.csv:2" in capsys.readouterr().err


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_configs_use_known_train_options(config):
    from glr.train.fit import TRAIN_DEFAULTS

    exp = parse_experiment(config)  # raises on an unknown option
    assert exp.name == config.stem and exp.stages
    for _, opts in exp.stages:
        for key, value in opts.items():
            default = TRAIN_DEFAULTS[key]
            assert value is None or default is None or isinstance(value, (type(default), int)), key


def test_config_errors(tmp_path):
    bad = _write(tmp_path / "bad.yaml", ["- a list"])
    with pytest.raises(InputError, match="bad.yaml"):
        parse_experiment(str(bad))
    unknown = _write(tmp_path / "u.yaml", ["learning_rate: 3"])
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--config", str(unknown)]) == 2


def test_every_subcommand_help_ends_with_an_example(capsys):
    import argparse

    from glr.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"cv", "kernel", "submit", "report", "eval-revisitop", "demo"} <= set(subs.choices)
    for name, sub in subs.choices.items():
        assert "example" in sub.format_help(), name
    assert "from the demo to a submission" in parser.format_help()


HEAVY = ("torch", "torchvision", "timm", "lightning", "pytorch_lightning", "faiss", "kaggle", "matplotlib")


def _heavy_modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the heavy modules it left in sys.modules."""
    import subprocess
    import sys

    probe = f"{code}\nimport sys\nprint('HEAVY', *sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1].split()[1:]


@pytest.mark.parametrize("argv", [["--help"], ["score", "--help"], ["submit", "--help"], ["submit", "file", "--help"],
                                  ["train", "--help"], ["cv", "--help"], ["kernel", "build", "--help"]])
def test_help_imports_nothing_heavy(argv):
    """Building the whole parser and printing any --help imports no torch, timm, Lightning, faiss,
    kaggle client or matplotlib (each command imports what it runs, when it runs)."""
    code = ("import contextlib, io\nfrom glr.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n"
            f"        main({argv!r})\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, e.code\n"
            "assert 'usage: glr' in out.getvalue()")
    assert _heavy_modules_after(code) == []


def test_score_runs_without_torch(tmp_path):
    sol = _write(tmp_path / "sol.csv", ["id,images,Usage", "q1,a b,Public", "q2,c,Private"])
    sub = _write(tmp_path / "sub.csv", ["id,images", "q1,b a", "q2,x c"])
    code = (f"from glr.cli import main\nassert main(['score', '--task', 'retrieval', '--solution', {str(sol)!r}, "
            f"'--submission', {str(sub)!r}, '--json']) == 0")
    assert _heavy_modules_after(code) == []


def test_cv_checks_its_post_processing_config_and_artifacts_before_any_data(tmp_path, capsys):
    """A bad post-processing option or a missing artifact is one line, exit 2, before the root is read."""
    post = _write(tmp_path / "p.yaml", ["postprocess:", "  expansion: {k: three}"])
    art = tmp_path / "a.pt"
    art.write_bytes(b"")
    assert main(["cv", "--data", str(tmp_path / "absent"), "--model", str(art), "--post", str(post)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "p.yaml" in err and "'k'" in err and "three" in err
    assert main(["cv", "--data", str(tmp_path), "--model", str(art), str(tmp_path / "b.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "b.pt" in err and "not found" in err
