"""glr submit: the real kaggle 2.2.4 client against a local fake Kaggle API (tests/kaggle_local.py)."""

import base64
import contextlib
import io
import json
import os
import tempfile

import pytest

from glr.cli.submit import main as submit_main
from glr.kaggle import client as submit
from kaggle_local import FakeKaggle

USER = "tester"
KEY = "k3y-5ecret-0123456789abcdef"
TOKEN = "t0ken-5ecret-fedcba9876543210"
COMP = "landmark-retrieval-2021"
VALID = "id,images\n0123456789abcdef,fedcba9876543210 00112233aabbccdd\n1111222233334444,\n"
BAD_HEADER = "id,image\n0123456789abcdef,fedcba9876543210\n"
BAD_ROW = "id,images\n0123456789abcdef,fedcba9876543210\n2222333344445555,aaaabbbbccccdddd aaaabbbbccccdddd\n"
SCRIPT = "import glr\nprint('offline inference')\n"
DROP = object()


@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    """A FakeKaggle the real client talks to, with throw-away credentials and HOME.

    After the test, neither secret may appear in any file under tmp_path.
    """
    home = tmp_path / "home"
    config = home / ".kaggle"
    config.mkdir(parents=True)
    for var in list(os.environ):  # the developer's own credentials, proxies and client switches
        if var.startswith("KAGGLE_") or var.lower().endswith("_proxy") or var in ("VERBOSE", "VERBOSE_OUTPUT"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # the client's resumable-upload notes go there
    with contextlib.redirect_stdout(io.StringIO()):
        from kaggle.api.kaggle_api_extended import KaggleApi
    from kagglesdk import kaggle_env

    # KaggleApi reads these at class creation (first import); the endpoint table at each request.
    monkeypatch.setattr(KaggleApi, "args", ["--local"])
    monkeypatch.setattr(KaggleApi, "config_dir", str(config))
    monkeypatch.setattr(KaggleApi, "config", str(config / "kaggle.json"))
    with FakeKaggle() as fake:
        monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.LOCAL, fake.url)
        yield fake
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert KEY.encode() not in data and TOKEN.encode() not in data, f"a secret was written to {path}"


def run(capsys, *argv):
    """(exit status, stdout, stderr) of ``glr submit ARGV``; no secret may be printed."""
    code = submit_main(["submit", *map(str, argv)])
    out, err = capsys.readouterr()
    assert KEY not in out + err and TOKEN not in out + err
    assert "Traceback" not in err
    return code, out, err


def _dataset_folder(root, dataset_id="tester/glr-weights-test", **meta_overrides):
    folder = root / "pack"
    folder.mkdir()
    meta = {"title": "GLR weights test", "id": dataset_id, "licenses": [{"name": "CC0-1.0"}],
            "description": "glr model artifacts (1 file), see manifest.json.\n"}
    meta.update(meta_overrides)
    (folder / "dataset-metadata.json").write_text(json.dumps(meta, indent=2))
    (folder / "exp010__s3.pt").write_bytes(bytes(range(256)) * 13)
    (folder / "manifest.json").write_text('{"dataset": "tester/glr-weights-test", "entries": []}\n')
    return folder


def _kernel_folder(root, **overrides):
    folder = root / "kernel"
    folder.mkdir()
    meta = {"id": "tester/glr-inference", "title": "GLR inference", "code_file": "inference.py",
            "language": "python", "kernel_type": "script", "is_private": True, "enable_gpu": True,
            "enable_tpu": False, "enable_internet": False,
            "dataset_sources": ["tester/glr-weights-test", "tester/glr-wheels"],
            "competition_sources": [COMP], "kernel_sources": [], "model_sources": []}
    meta.update(overrides)
    meta = {k: v for k, v in meta.items() if v is not DROP}
    (folder / "kernel-metadata.json").write_text(json.dumps(meta, indent=2))
    (folder / "inference.py").write_text(SCRIPT)
    return folder


def _uploaded_by_name(kaggle):
    """{file name: uploaded bytes}, joining StartBlobUpload names to the PUTs of their tokens."""
    names = {}
    for start, token in zip(kaggle.calls("blobs.BlobApiService/StartBlobUpload"), range(1, 1000)):
        names[start.json["name"]] = kaggle.uploads.get(f"token-{token}")
    return names


# --------------------------------------------------------------------------- dataset
def test_dataset_created_when_absent(kaggle, tmp_path, capsys):
    folder = _dataset_folder(tmp_path)
    kaggle.answer("datasets.DatasetApiService/GetDatasetStatus", (404, {"code": 404, "message": "Not found"}))
    kaggle.answer("datasets.DatasetApiService/CreateDataset",
                  {"ref": "tester/glr-weights-test", "url": "https://www.kaggle.com/datasets/tester/glr-weights-test",
                   "status": "ok", "error": ""})
    code, out, _ = run(capsys, "dataset", "--folder", folder)
    assert code == 0
    assert "created private dataset tester/glr-weights-test with 2 file(s)" in out
    assert "https://www.kaggle.com/datasets/tester/glr-weights-test" in out
    assert "datasets.DatasetApiService/CreateDatasetVersion" not in kaggle.rpcs()
    (create,) = kaggle.calls("datasets.DatasetApiService/CreateDataset")
    body = create.json
    assert (body["ownerSlug"], body["slug"], body["title"]) == ("tester", "glr-weights-test", "GLR weights test")
    assert body["licenseName"] == "CC0-1.0" and body["isPrivate"] is True
    uploaded = _uploaded_by_name(kaggle)
    assert uploaded == {name: (folder / name).read_bytes() for name in ("exp010__s3.pt", "manifest.json")}
    assert sorted(f["token"] for f in body["files"]) == ["token-1", "token-2"]
    # the legacy key went as HTTP basic auth, from the client's own environment variables
    expected = "Basic " + base64.b64encode(f"{USER}:{KEY}".encode()).decode()
    assert all(r.headers.get("Authorization") == expected for r in kaggle.requests if r.rpc)


def test_dataset_new_version_when_present(kaggle, tmp_path, capsys):
    folder = _dataset_folder(tmp_path)
    kaggle.answer("datasets.DatasetApiService/GetDatasetStatus", {"status": "READY"})
    kaggle.answer("datasets.DatasetApiService/CreateDatasetVersion",
                  {"ref": "tester/glr-weights-test", "url": "https://www.kaggle.com/datasets/tester/glr-weights-test",
                   "status": "ok"})
    code, out, err = run(capsys, "dataset", "--folder", folder, "--message", "exp010 stage s3", "--public")
    assert code == 0
    assert "uploaded a new version of dataset tester/glr-weights-test with 2 file(s)" in out
    assert "--public is ignored" in err
    assert "datasets.DatasetApiService/CreateDataset" not in kaggle.rpcs()
    (version,) = kaggle.calls("datasets.DatasetApiService/CreateDatasetVersion")
    assert (version.json["ownerSlug"], version.json["datasetSlug"]) == ("tester", "glr-weights-test")
    assert version.json["body"]["versionNotes"] == "exp010 stage s3"
    assert len(version.json["body"]["files"]) == 2
    assert _uploaded_by_name(kaggle)["exp010__s3.pt"] == (folder / "exp010__s3.pt").read_bytes()


@pytest.mark.parametrize("case, message", [
    ("no metadata", "metadata file not found"),
    ("bad json", "not valid JSON"),
    ("bad id", "dataset slug"),
    ("no licence", "missing 'licenses'"),
    ("only a sub-folder", "nothing to upload"),
])
def test_dataset_invalid_folder_sends_nothing(kaggle, tmp_path, capsys, case, message):
    folder = _dataset_folder(tmp_path, **({"id": "tester/GLR_weights"} if case == "bad id" else {}))
    meta = folder / "dataset-metadata.json"
    if case == "no metadata":
        meta.unlink()
    elif case == "bad json":
        meta.write_text('{"id": "tester/glr-weights-test",\n')
    elif case == "no licence":
        meta.write_text(json.dumps({"id": "tester/glr-weights-test", "title": "GLR weights test"}))
    elif case == "only a sub-folder":
        for name in ("exp010__s3.pt", "manifest.json"):
            (folder / name).unlink()
        (folder / "wheels").mkdir()
        (folder / "wheels" / "x.whl").write_bytes(b"wheel")
    code, _, err = run(capsys, "dataset", "--folder", folder)
    assert code == 2
    assert err.startswith("glr submit: error: ") and message in err
    assert kaggle.requests == []


def test_dataset_lookup_failure_is_not_absence(kaggle, tmp_path, capsys):
    folder = _dataset_folder(tmp_path)
    kaggle.answer("datasets.DatasetApiService/GetDatasetStatus", (403, {"code": 403, "message": "Permission denied"}))
    kaggle.answer("datasets.DatasetApiService/CreateDataset", {"ref": "tester/glr-weights-test"})
    code, _, err = run(capsys, "dataset", "--folder", folder)
    assert code == 2
    assert "looking up dataset tester/glr-weights-test: the Kaggle API answered 403: Permission denied" in err
    assert kaggle.rpcs() == ["datasets.DatasetApiService/GetDatasetStatus"]


def test_dataset_failed_upload_creates_nothing(kaggle, tmp_path, capsys):
    folder = _dataset_folder(tmp_path)
    kaggle.upload_status = 400  # the storage refuses the bytes: kaggle 2.2.4 would drop the file silently
    kaggle.answer("datasets.DatasetApiService/GetDatasetStatus", (404, {"code": 404, "message": "Not found"}))
    kaggle.answer("datasets.DatasetApiService/CreateDataset", {"ref": "tester/glr-weights-test"})
    code, _, err = run(capsys, "dataset", "--folder", folder)
    assert code == 2
    assert "failed; nothing was created" in err
    assert kaggle.calls("datasets.DatasetApiService/CreateDataset") == []


# --------------------------------------------------------------------------- kernel push
def test_kernel_push_sends_offline_kernel(kaggle, tmp_path, capsys):
    folder = _kernel_folder(tmp_path)
    kaggle.answer("kernels.KernelsApiService/SaveKernel",
                  {"ref": "/code/tester/glr-inference", "url": "https://www.kaggle.com/code/tester/glr-inference",
                   "versionNumber": 3, "kernelId": 99})
    code, out, _ = run(capsys, "kernel", "push", "--kernel", folder)
    assert code == 0
    assert "version 3" in out and "https://www.kaggle.com/code/tester/glr-inference" in out
    (save,) = kaggle.calls("kernels.KernelsApiService/SaveKernel")
    body = save.json
    assert body["enableInternet"] is False and body["enableGpu"] is True and body["isPrivate"] is True
    assert body["competitionDataSources"] == [COMP]
    assert body["datasetDataSources"] == ["tester/glr-weights-test", "tester/glr-wheels"]
    assert body["text"] == SCRIPT
    assert (body["slug"], body["newTitle"], body["language"], body["kernelType"]) == \
        ("tester/glr-inference", "GLR inference", "python", "script")


@pytest.mark.parametrize("overrides, message", [
    ({"enable_internet": True}, "'enable_internet' is True"),
    ({"enable_internet": DROP}, "'enable_internet' is missing"),
    ({"enable_internet": "false"}, "code competitions need false"),
    ({"code_file": "missing.py"}, "code file 'missing.py' not found"),
    ({"id": "tester/GLR_inference"}, "kernel id must be 'owner/slug'"),
    ({"title": "Something else"}, "makes the slug 'something-else'"),
    ({"dataset_sources": ["no-owner"]}, "malformed id 'no-owner'"),
], ids=["internet on", "internet missing", "internet as text", "no code file", "bad id", "title off slug",
        "bad source"])
def test_kernel_push_refuses_bad_metadata(kaggle, tmp_path, capsys, overrides, message):
    folder = _kernel_folder(tmp_path, **overrides)
    kaggle.answer("kernels.KernelsApiService/SaveKernel", {"ref": "x", "versionNumber": 1})
    code, _, err = run(capsys, "kernel", "push", "--kernel", folder)
    assert code == 2
    assert "kernel-metadata.json" in err and message in err
    assert kaggle.requests == []


def test_kernel_push_function_reports_refused_sources(kaggle, tmp_path, capsys):
    folder = _kernel_folder(tmp_path)
    kaggle.answer("kernels.KernelsApiService/SaveKernel",
                  {"ref": "/code/tester/glr-inference", "versionNumber": 4,
                   "invalidDatasetSources": ["tester/glr-wheels"]})
    result = submit.push_kernel(folder, api=submit.kaggle_api())
    assert result["version"] == 4 and result["invalid_sources"] == {"dataset_sources": ["tester/glr-wheels"]}
    code, _, err = run(capsys, "kernel", "push", "--kernel", folder)
    assert code == 1 and "did not accept dataset_sources: tester/glr-wheels" in err
    kaggle.answer("kernels.KernelsApiService/SaveKernel", {"error": "Kernel is locked"})
    code, _, err = run(capsys, "kernel", "push", "--kernel", folder)
    assert code == 2 and "the Kaggle API refused: Kernel is locked" in err


# --------------------------------------------------------------------------- kernel status
def test_kernel_status_waits_until_complete(kaggle, tmp_path, capsys):
    folder = _kernel_folder(tmp_path)
    kaggle.answer("kernels.KernelsApiService/GetKernelSessionStatus",
                  {"status": "QUEUED"}, {"status": "RUNNING"}, (503, {"code": 503, "message": "busy"}),
                  {"status": "RUNNING"}, {"status": "RUNNING"}, {"status": "COMPLETE"})
    code, out, _ = run(capsys, "kernel", "status", "--kernel", folder, "--wait", "--poll", "0.01")
    assert code == 0
    assert out.splitlines() == ["tester/glr-inference: queued", "tester/glr-inference: running",
                                "tester/glr-inference: complete"]
    calls = kaggle.calls("kernels.KernelsApiService/GetKernelSessionStatus")
    assert len(calls) == 6  # the 503 was retried
    assert calls[0].json == {"userName": "tester", "kernelSlug": "glr-inference"}


def test_kernel_status_error_is_nonzero(kaggle, capsys):
    kaggle.answer("kernels.KernelsApiService/GetKernelSessionStatus", {"status": "RUNNING"},
                  {"status": "ERROR", "failureMessage": "Your notebook tried to allocate more memory than is available"})
    code, out, err = run(capsys, "kernel", "status", "--kernel", "tester/glr-inference", "--wait", "--poll", "0.01",
                         "--timeout", "5")
    assert code == 1
    assert out.splitlines()[-1] == "tester/glr-inference: error" and "still" not in err
    assert "allocate more memory than is available" in err
    # without --wait: one request, the same verdict
    code, out, err = run(capsys, "kernel", "status", "--kernel", "tester/glr-inference")
    assert code == 1 and out == "tester/glr-inference: error\n"
    assert len(kaggle.calls("kernels.KernelsApiService/GetKernelSessionStatus")) == 3


def test_kernel_status_timeout(kaggle, capsys):
    kaggle.answer("kernels.KernelsApiService/GetKernelSessionStatus", {"status": "RUNNING"})
    code, out, err = run(capsys, "kernel", "status", "--kernel", "tester/glr-inference", "--wait",
                         "--poll", "0.01", "--timeout", "0.1")
    assert code == 1
    assert out == "tester/glr-inference: running\n" and "still running" in err
    assert len(kaggle.calls("kernels.KernelsApiService/GetKernelSessionStatus")) >= 2


# --------------------------------------------------------------------------- kernel output
def _output_answer(kaggle, submission: str):
    kaggle.files = {"submission.csv": submission.encode(), "timing.json": b'{"seconds": 12}'}
    kaggle.answer("kernels.KernelsApiService/ListKernelSessionOutput",
                  {"files": [{"url": f"{kaggle.url}/files/submission.csv", "fileName": "submission.csv"},
                             {"url": f"{kaggle.url}/files/timing.json", "fileName": "timing.json"}],
                   "log": '[{"stream_name": "stdout", "data": "done"}]'})


def test_kernel_output_fetches_and_validates(kaggle, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # newer and larger than the remote file: kaggle's date check alone would keep it
    (out_dir / "submission.csv").write_text("id,images\n" + "stale copy from an earlier run\n" * 20)
    _output_answer(kaggle, VALID)
    code, out, _ = run(capsys, "kernel", "output", "--kernel", "tester/glr-inference", "--out", out_dir)
    assert code == 0
    assert (out_dir / "submission.csv").read_text() == VALID
    assert (out_dir / "timing.json").read_bytes() == b'{"seconds": 12}'
    assert "done" in (out_dir / "glr-inference.log").read_text()
    assert "valid retrieval submission, 2 rows" in out
    (listing,) = kaggle.calls("kernels.KernelsApiService/ListKernelSessionOutput")
    assert (listing.json["userName"], listing.json["kernelSlug"]) == ("tester", "glr-inference")


def test_kernel_output_reports_invalid_submission(kaggle, tmp_path, capsys):
    _output_answer(kaggle, BAD_ROW)
    code, out, err = run(capsys, "kernel", "output", "--kernel", "tester/glr-inference", "--out", tmp_path / "o")
    assert code == 2
    assert "submission.csv: invalid retrieval submission: line 3 (id " in err and "appears more than once" in err
    assert "timing.json" in out  # the files were still fetched and listed


# --------------------------------------------------------------------------- file submission
def test_file_submit_uploads_and_submits(kaggle, tmp_path, capsys):
    csv = tmp_path / "submission.csv"
    csv.write_text(VALID)
    kaggle.answer("competitions.CompetitionApiService/CreateSubmission",
                  {"message": "Successfully submitted to Google Landmark Retrieval 2021", "ref": 123})
    code, out, _ = run(capsys, "file", "--competition", COMP, "--file", csv, "--task", "retrieval",
                       "--message", "lite0 ensemble")
    assert code == 0 and "Successfully submitted to Google Landmark Retrieval 2021" in out
    assert kaggle.rpcs() == ["competitions.CompetitionApiService/StartSubmissionUpload",
                             "competitions.CompetitionApiService/CreateSubmission"]
    (start,) = kaggle.calls("competitions.CompetitionApiService/StartSubmissionUpload")
    assert start.json["competitionName"] == COMP and start.json["fileName"] == "submission.csv"
    assert start.json["contentLength"] == len(VALID.encode())
    assert kaggle.uploads["token-1"] == csv.read_bytes()
    (create,) = kaggle.calls("competitions.CompetitionApiService/CreateSubmission")
    assert create.json == {"competitionName": COMP, "blobFileTokens": "token-1",
                           "submissionDescription": "lite0 ensemble"}


@pytest.mark.parametrize("text, where", [(BAD_HEADER, "submission.csv:1: header must be"),
                                         (BAD_ROW, "submission.csv: invalid retrieval submission: line 3")],
                         ids=["bad header", "bad row"])
def test_file_submit_invalid_sends_nothing(kaggle, tmp_path, capsys, text, where):
    csv = tmp_path / "submission.csv"
    csv.write_text(text)
    code, _, err = run(capsys, "file", "--competition", COMP, "--file", csv, "--task", "retrieval",
                       "--message", "x")
    assert code == 2
    assert err.startswith("glr submit: error: ") and str(tmp_path / where) in err
    assert kaggle.requests == []


def test_file_submit_failed_upload_submits_nothing(kaggle, tmp_path, capsys):
    csv = tmp_path / "submission.csv"
    csv.write_text(VALID)
    kaggle.upload_status = 400
    kaggle.answer("competitions.CompetitionApiService/CreateSubmission", {"message": "ok", "ref": 1})
    code, _, err = run(capsys, "file", "--competition", COMP, "--file", csv, "--task", "retrieval",
                       "--message", "x")
    assert code == 2 and "nothing was submitted" in err
    assert kaggle.calls("competitions.CompetitionApiService/CreateSubmission") == []


# --------------------------------------------------------------------------- code submission
def test_code_submit_sends_kernel_and_version(kaggle, tmp_path, capsys):
    fetched = tmp_path / "submission.csv"
    fetched.write_text(VALID)
    kaggle.answer("competitions.CompetitionApiService/CreateCodeSubmission",
                  {"message": "Your code submission was received", "ref": 77})
    code, out, _ = run(capsys, "code", "--competition", COMP, "--kernel", "tester/glr-inference", "--version", 7,
                       "--message", "lite0 ensemble", "--check", fetched)
    assert code == 0 and "version 7" in out and "Your code submission was received" in out
    (create,) = kaggle.calls("competitions.CompetitionApiService/CreateCodeSubmission")
    assert create.json == {"competitionName": COMP, "kernelOwner": "tester", "kernelSlug": "glr-inference",
                           "kernelVersion": 7, "fileName": "submission.csv",
                           "submissionDescription": "lite0 ensemble"}


def test_code_submit_check_invalid_sends_nothing(kaggle, tmp_path, capsys):
    fetched = tmp_path / "submission.csv"
    fetched.write_text(BAD_HEADER)
    code, _, err = run(capsys, "code", "--competition", COMP, "--kernel", "tester/glr-inference", "--version", 7,
                       "--message", "x", "--check", fetched)
    assert code == 2 and "submission.csv:1:" in err
    assert kaggle.requests == []


# --------------------------------------------------------------------------- list
def test_list_prints_scores(kaggle, capsys):
    kaggle.answer("competitions.CompetitionApiService/ListSubmissions", {"submissions": [
        {"ref": 3, "date": "2021-09-30T12:00:00.000Z", "description": "lite0 pending", "status": "PENDING"},
        {"ref": 2, "date": "2021-09-29T08:30:00.000Z", "description": "lite0 ensemble", "status": "COMPLETE",
         "publicScore": "0.43210", "privateScore": "0.41230", "fileName": "submission.csv"},
        {"ref": 1, "date": "2021-09-28T08:00:00.000Z", "description": "broken", "status": "ERROR",
         "errorDescription": "bad header"}]})
    code, out, _ = run(capsys, "list", "--competition", COMP, "--limit", 5)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["date", "description", "status", "public", "private"]
    row = next(line for line in lines if "lite0 ensemble" in line)
    assert row.split()[-3:] == ["complete", "0.43210", "0.41230"] and "2021-09-29 08:30:00" in row
    assert next(line for line in lines if "lite0 pending" in line).split()[-3:] == ["pending", "-", "-"]
    assert "error (bad header)" in out
    (listing,) = kaggle.calls("competitions.CompetitionApiService/ListSubmissions")
    assert listing.json["competitionName"] == COMP and listing.json["pageSize"] == 5


# --------------------------------------------------------------------------- credentials
@pytest.mark.parametrize("how", ["none", "rejected token"])
def test_missing_credentials_is_a_clear_error(kaggle, monkeypatch, capsys, how):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    if how == "rejected token":
        monkeypatch.setenv("KAGGLE_API_TOKEN", TOKEN)
        kaggle.answer("security.OAuthService/IntrospectToken", {"active": False})
    code, out, err = run(capsys, "list", "--competition", COMP)
    assert code == 2
    assert err.startswith("glr submit: error: no Kaggle credentials")
    assert "KAGGLE_API_TOKEN" in err and "KAGGLE_USERNAME and KAGGLE_KEY" in err
    assert out == ""  # kaggle's own login help is not printed
    assert kaggle.calls("competitions.CompetitionApiService/ListSubmissions") == []


def test_token_credentials_go_as_bearer(kaggle, monkeypatch, capsys):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    monkeypatch.setenv("KAGGLE_API_TOKEN", TOKEN)
    kaggle.answer("security.OAuthService/IntrospectToken", {"active": True, "username": USER})
    kaggle.answer("competitions.CompetitionApiService/ListSubmissions", {"submissions": []})
    assert submit.list_submissions(COMP) == []
    (listing,) = kaggle.calls("competitions.CompetitionApiService/ListSubmissions")
    assert listing.headers["Authorization"] == f"Bearer {TOKEN}"
    assert kaggle.calls("security.OAuthService/IntrospectToken")[-1].json == {"token": TOKEN}


def test_verbose_client_prints_no_request_headers(kaggle, monkeypatch, capsys):
    from kaggle.api.kaggle_api_extended import KaggleApi

    monkeypatch.setattr(KaggleApi, "args", ["--local", "--verbose"])  # as VERBOSE=1 at import sets it
    kaggle.answer("competitions.CompetitionApiService/ListSubmissions", {"submissions": []})
    code, out, err = run(capsys, "list", "--competition", COMP)
    assert code == 0 and out == f"no submissions to {COMP}\n"
    assert "Authorization" not in out + err


def test_api_error_is_one_line(kaggle, capsys):
    kaggle.answer("competitions.CompetitionApiService/ListSubmissions",
                  (404, {"code": 404, "message": "Competition not found"}))
    code, _, err = run(capsys, "list", "--competition", "no-such-competition")
    assert code == 2
    assert err == ("glr submit: error: listing submissions to no-such-competition: the Kaggle API answered 404: "
                   "Competition not found\n")


# --------------------------------------------------------------------------- help
@pytest.mark.parametrize("argv", [["dataset"], ["kernel", "push"], ["kernel", "status"], ["kernel", "output"],
                                  ["file"], ["code"], ["list"]])
def test_help_shows_an_example(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        submit_main(["submit", *argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "example:\n  glr submit " + " ".join(argv) in out
