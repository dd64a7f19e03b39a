"""``glr submit``: datasets, kernels and submissions to Kaggle through the official client.

Sub-commands (each ``--help`` ends with an example)::

    glr submit dataset --folder DIR [--message MSG] [--public] [--dir-mode skip|zip|tar]
    glr submit kernel push --kernel DIR
    glr submit kernel status --kernel DIR_OR_ID [--wait] [--poll S] [--timeout S]
    glr submit kernel output --kernel DIR_OR_ID --out DIR [--task retrieval|recognition]
    glr submit file --competition SLUG --file CSV --task TASK --message MSG
    glr submit code --competition SLUG --kernel OWNER/SLUG --version N --message MSG [--file-name NAME] [--check CSV]
    glr submit list --competition SLUG [--limit N]

Everything a command sends is checked first (folder metadata, ids, submission files), so bad
input ends with one error line, exit status 2 and no request. The library functions
(:func:`push_dataset`, :func:`push_kernel`, :func:`kernel_status`, :func:`wait_kernel`,
:func:`fetch_output`, :func:`submit_file`, :func:`submit_code`, :func:`list_submissions`) take an
optional ``api`` (a ``kaggle.api.kaggle_api_extended.KaggleApi``); by default each builds an
authenticated one with :func:`kaggle_api`. Client and API failures become
:class:`~glr.utils.InputError` too.

Credentials are the kaggle client's own (``KAGGLE_API_TOKEN`` or ``~/.kaggle/access_token``;
``KAGGLE_USERNAME`` + ``KAGGLE_KEY`` or a legacy ``kaggle.json``; ``kaggle auth login``): this
module never reads, prints or stores them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from glr.kaggle.ids import KAGGLE_LICENSES, check_dataset_id, check_title
from glr.submission import TASKS, read_submission, validate_submission_file
from glr.utils import InputError, read_json_object

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the kaggle package authenticates when imported: import it only when needed
    from kaggle.api.kaggle_api_extended import KaggleApi


DATASET_METADATA = "dataset-metadata.json"


KERNEL_METADATA = "kernel-metadata.json"


SUBMISSION_FILE = "submission.csv"


#: What ``--dir-mode`` does with a sub-folder of a dataset folder: skip it, or upload it as one archive.
DIR_MODES = ("skip", "zip", "tar")


#: Top-level names kaggle 2.2.4's ``upload_files`` never uploads (metadata and cover images).
_NOT_UPLOADED = frozenset(
    [DATASET_METADATA, "datapackage.json", KERNEL_METADATA, "model-metadata.json", "model-instance-metadata.json"]
    + [f"dataset-cover-image{ext}" for ext in (".png", ".jpg", ".jpeg", ".webp")]
)


#: Folders kaggle 2.2.4 always leaves out of an upload (its DEFAULT_IGNORE_PATTERNS).
_IGNORED_DIRS = frozenset([".git", ".cache", ".huggingface"])


#: Kernel session states (kagglesdk KernelWorkerStatus, lower-case) after which nothing changes.
FINAL_STATES = ("complete", "error", "cancel_acknowledged")


#: States that mean the run did not (or will not) finish.
FAILED_STATES = ("error", "cancel_requested", "cancel_acknowledged")


#: Consecutive transient failures (connection, 429, 5xx) ``wait_kernel`` tolerates while polling.
MAX_POLL_FAILURES = 3


_OWNER = r"[A-Za-z0-9][A-Za-z0-9_-]*"


_SLUG = r"[a-z0-9]+(?:-[a-z0-9]+)*"


_KERNEL_REF = re.compile(f"({_OWNER})/({_SLUG})")


_SOURCE_REF = re.compile(rf"{_OWNER}/[A-Za-z0-9][A-Za-z0-9_.-]*(?:/[0-9]+)?")  # owner/slug[/version]


_COMPETITION = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_CREDENTIALS_HELP = (
    "set KAGGLE_API_TOKEN to a token from https://www.kaggle.com/settings/api (or save the token in "
    "~/.kaggle/access_token), or set KAGGLE_USERNAME and KAGGLE_KEY (or put a legacy kaggle.json with "
    "username and key in $KAGGLE_CONFIG_DIR or ~/.kaggle), or run 'kaggle auth login'"
)



def kaggle_api() -> KaggleApi:
    """A new authenticated ``KaggleApi`` (kaggle 2.2.4).

    Raises:
        InputError: the client is not installed, or no credentials it accepts were found (the
            message says how to provide them).
    """
    kaggle_output = io.StringIO()  # kaggle prints its own login help on stdout; ours is the error
    try:
        # Importing the package runs kaggle/__init__, which authenticates a module-level client.
        with contextlib.redirect_stdout(kaggle_output):
            from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as e:
        raise InputError(f"the kaggle client is not installed ({e}); pip install 'glr[kaggle]' (make venv "
                         "installs the pinned one)") from None
    except OSError as e:  # the import creates the kaggle config folder
        raise InputError(f"cannot set up the kaggle client: {e}") from None
    api = KaggleApi()
    # A "--verbose" client (VERBOSE=1 at import) prints every request with its Authorization header.
    api.args = [a for a in KaggleApi.args if a not in ("--verbose", "-v")]
    try:
        with contextlib.redirect_stdout(kaggle_output), _kaggle_errors("authenticating"):
            api.authenticate()
    except SystemExit:
        raise InputError("no Kaggle credentials the client accepts: " + _CREDENTIALS_HELP) from None
    return api


def _transient(e: BaseException) -> bool:
    import requests

    if isinstance(e, (requests.ConnectionError, requests.Timeout)):
        return True
    response = getattr(e, "response", None)
    return isinstance(e, requests.HTTPError) and response is not None and (
        response.status_code == 429 or response.status_code >= 500)


@contextlib.contextmanager
def _kaggle_errors(what: str) -> Iterator[None]:
    """Turn the client's failures (HTTP errors, unreachable API, its ValueErrors) into InputError."""
    import requests

    try:
        yield
    except InputError:
        raise
    except requests.HTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise InputError(f"{what}: the Kaggle API answered {status}: {e}") from None
    except requests.RequestException as e:
        raise InputError(f"{what}: cannot reach the Kaggle API ({e})") from None
    except ValueError as e:  # the client validates its arguments with ValueError
        raise InputError(f"{what}: {e}") from None


class _UploadFailed(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


@contextlib.contextmanager
def _strict_uploads(api: KaggleApi) -> Iterator[None]:
    """Abort a dataset push as soon as one file fails to upload.

    kaggle 2.2.4's ``upload_files`` drops a file whose upload failed and still creates the
    dataset (version) without it; raising from the per-file helper stops it before that request.
    """
    if not callable(getattr(type(api), "_upload_file", None)):
        yield  # another client version: nothing to hook
        return
    original = api._upload_file

    def upload_file(file_name, *args, **kwargs):
        result = original(file_name, *args, **kwargs)
        if result is None:
            raise _UploadFailed(file_name)
        return result

    api._upload_file = upload_file
    try:
        yield
    finally:
        del api._upload_file


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, "metadata file")


def _folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("not a folder", folder)
    return folder


def _check_kernel_ref(ref: Any, path: Path | None = None) -> str:
    if not isinstance(ref, str) or not _KERNEL_REF.fullmatch(ref):
        raise InputError(f"kernel id must be 'owner/slug' (slug: lower-case letters and digits separated by "
                         f"single hyphens), not {ref!r}", path)
    return ref


def _check_competition(competition: Any) -> str:
    if not isinstance(competition, str) or not _COMPETITION.fullmatch(competition):
        raise InputError(f"competition must be a slug such as 'landmark-retrieval-2021', not {competition!r}")
    return competition


def _check_task(task: str) -> str:

    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def _check_submission(path: str | os.PathLike, task: str) -> int:
    """Validate a submission CSV; returns its number of rows."""

    _check_task(task)
    if not Path(path).is_file():
        raise InputError("submission file not found", path)
    validate_submission_file(path, task)
    return len(read_submission(path, task))


def read_dataset_folder(folder: str | os.PathLike, dir_mode: str = "skip") -> dict[str, Any]:
    """Check a dataset folder (``glr weights pack`` output, or a wheels folder) before upload.

    The folder needs ``dataset-metadata.json`` with ``id`` (``owner/slug``, slug 6–50 lower-case
    letters, digits and hyphens), ``title`` (6–50 characters) and ``licenses`` (exactly one
    ``{"name": ...}`` kaggle accepts), and at least one file to upload.

    Returns:
        ``{"id", "owner", "slug", "title", "licence", "files", "skipped"}``: ``files`` the names
        kaggle will upload (sub-folders only with ``dir_mode`` zip or tar), ``skipped`` the
        sub-folders it will leave out.

    Raises:
        InputError: naming the folder or metadata file and the problem.
    """

    if dir_mode not in DIR_MODES:
        raise InputError(f"dir_mode must be one of {', '.join(DIR_MODES)}, not {dir_mode!r}")
    folder = _folder(folder)
    meta_path = folder / DATASET_METADATA
    meta = _read_json(meta_path)
    for key in ("id", "title", "licenses"):
        if key not in meta:
            raise InputError(f"missing {key!r}", meta_path)
    try:
        owner, slug = check_dataset_id(meta["id"])
        title = check_title(meta["title"])
    except InputError as e:
        raise InputError(str(e), meta_path) from None
    licenses = meta["licenses"]
    if not (isinstance(licenses, list) and len(licenses) == 1 and isinstance(licenses[0], dict)
            and isinstance(licenses[0].get("name"), str)):
        raise InputError(f"'licenses' must hold exactly one {{\"name\": ...}}, got {licenses!r}", meta_path)
    licence = licenses[0]["name"]
    if licence not in KAGGLE_LICENSES:
        raise InputError(f"licence {licence!r} is not one kaggle accepts ({', '.join(KAGGLE_LICENSES)})", meta_path)

    files, skipped = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name in _NOT_UPLOADED:
            continue
        if entry.is_dir():
            if entry.name in _IGNORED_DIRS:
                continue
            (files if dir_mode != "skip" else skipped).append(entry.name)
        elif entry.is_file():
            files.append(entry.name)
    if not files:
        hint = f" (sub-folders {', '.join(skipped)} need --dir-mode zip or tar)" if skipped else ""
        raise InputError(f"nothing to upload besides {DATASET_METADATA}{hint}", folder)
    return {"id": meta["id"], "owner": owner, "slug": slug, "title": title, "licence": licence,
            "files": files, "skipped": skipped}


def dataset_exists(dataset_id: str, api: KaggleApi | None = None) -> bool:
    """Whether the dataset ``owner/slug`` exists (and is visible to these credentials).

    Asks ``GetDatasetStatus``; 404 means absent. Any other failure raises, so a permission or
    network problem is never mistaken for "absent".
    """
    import requests

    api = api or kaggle_api()
    with _kaggle_errors(f"looking up dataset {dataset_id}"):
        try:
            api.dataset_status(dataset_id)
        except requests.HTTPError as e:
            if e.response is not None and e.response.status_code == 404:
                return False
            raise
    return True


def push_dataset(folder: str | os.PathLike, message: str | None = None, public: bool = False,
                 dir_mode: str = "skip", api: KaggleApi | None = None) -> dict[str, Any]:
    """Upload a dataset folder: a new version if the dataset exists, else a new dataset.

    Args:
        folder: a folder :func:`read_dataset_folder` accepts.
        message: version notes (new versions only; kaggle keeps no notes for a first version).
        public: create the dataset public (default private). An existing dataset keeps its
            visibility.
        dir_mode: sub-folders: ``skip``, or upload each as one ``zip`` / ``tar`` archive.
        api: an authenticated client (default: :func:`kaggle_api`).

    Returns:
        ``{"action": "created" | "versioned", "id", "url", "status", "files", "skipped", "public"}``
        (``public`` is None for a new version: unchanged).

    Raises:
        InputError: bad folder (before any request), a failed upload (nothing is created), or
            the API's refusal.
    """
    info = read_dataset_folder(folder, dir_mode)
    api = api or kaggle_api()
    ref = info["id"]
    exists = dataset_exists(ref, api)
    action = "versioned" if exists else "created"
    what = f"uploading a new version of dataset {ref}" if exists else f"creating dataset {ref}"
    try:
        with _kaggle_errors(what), _strict_uploads(api):
            if exists:
                response = api.dataset_create_version(str(folder), message or "", quiet=True, dir_mode=dir_mode)
            else:
                response = api.dataset_create_new(str(folder), public=public, quiet=True, dir_mode=dir_mode)
    except _UploadFailed as e:
        raise InputError(f"{what}: the upload of {e.name!r} failed; nothing was "
                         f"{'versioned' if exists else 'created'}", folder) from None
    if response.error:
        raise InputError(f"{what}: the Kaggle API refused: {response.error}")
    return {"action": action, "id": ref, "url": response.url or "", "status": response.status or "",
            "files": info["files"], "skipped": info["skipped"], "public": None if exists else public}


def read_kernel_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """Check a kernel folder before ``kernels push``.

    ``kernel-metadata.json`` (kaggle's format) must give a well-formed ``id`` (``owner/slug``), a
    ``title`` that kaggle turns into that slug, an existing non-empty ``code_file``, a
    ``language`` and ``kernel_type`` kaggle knows, and ``enable_internet: false`` explicitly:
    code competitions run kernels offline, and the client turns internet on when the key is
    missing. Booleans must be JSON booleans and sources lists of ids.

    Returns:
        The metadata, with ``code_path`` (the code file's path) added.

    Raises:
        InputError: naming the metadata file and the problem.
    """
    from slugify import slugify  # python-slugify, a kaggle dependency: the rule the client warns with

    folder = _folder(folder)
    path = folder / KERNEL_METADATA
    meta = _read_json(path)
    ref = _check_kernel_ref(meta.get("id"), path)
    slug = ref.split("/")[1]

    title = meta.get("title")
    if not isinstance(title, str) or len(title) < 5:
        raise InputError(f"'title' must be a string of at least 5 characters, not {title!r}", path)
    if slugify(title) != slug:
        raise InputError(f"title {title!r} makes the slug {slugify(title)!r}, not {slug!r}; kaggle names a new "
                         "kernel after its title, so make them agree", path)

    code_file = meta.get("code_file")
    if not isinstance(code_file, str) or not code_file:
        raise InputError("'code_file' must name the kernel's code file", path)
    code_path = folder / code_file
    if not code_path.is_file():
        raise InputError(f"code file {code_file!r} not found in {folder}", path)
    if code_path.stat().st_size == 0:
        raise InputError("code file is empty", code_path)

    if meta.get("language") not in ("python", "r", "rmarkdown"):
        raise InputError(f"'language' must be python, r or rmarkdown, not {meta.get('language')!r}", path)
    kernel_type = meta.get("kernel_type")
    if kernel_type not in ("script", "notebook"):
        raise InputError(f"'kernel_type' must be script or notebook, not {kernel_type!r}", path)
    if kernel_type == "notebook":
        try:
            json.loads(code_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"a notebook kernel's code file must be .ipynb JSON ({e})", code_path) from None

    if "enable_internet" not in meta:
        raise InputError("'enable_internet' is missing; set it to false explicitly (the kaggle client turns the "
                         "internet on by default, and code competitions only accept offline kernels)", path)
    if meta["enable_internet"] is not False:
        raise InputError(f"'enable_internet' is {meta['enable_internet']!r}; code competitions need false", path)
    for key in ("is_private", "enable_gpu", "enable_tpu"):
        if key in meta and not isinstance(meta[key], bool):
            raise InputError(f"{key!r} must be true or false, not {meta[key]!r}", path)

    for key, pattern in (("dataset_sources", _SOURCE_REF), ("kernel_sources", _SOURCE_REF),
                         ("competition_sources", _COMPETITION), ("model_sources", None)):
        sources = meta.get(key, [])
        if not isinstance(sources, list):
            raise InputError(f"{key!r} must be a list, not {sources!r}", path)
        for s in sources:
            if not isinstance(s, str) or not s or (pattern is not None and not pattern.fullmatch(s)):
                raise InputError(f"{key!r} holds a malformed id {s!r}", path)
    return {**meta, "code_path": code_path}


def kernel_ref(kernel: str | os.PathLike) -> str:
    """``owner/slug`` of a kernel given as a folder with ``kernel-metadata.json`` or as the id."""
    path = Path(kernel)
    if (path / KERNEL_METADATA).is_file():
        return _check_kernel_ref(_read_json(path / KERNEL_METADATA).get("id"), path / KERNEL_METADATA)
    if isinstance(kernel, str) and _KERNEL_REF.fullmatch(kernel):
        return kernel
    if path.is_dir():
        raise InputError(f"folder has no {KERNEL_METADATA}", path)
    raise InputError(f"kernel {str(kernel)!r} is neither a folder with {KERNEL_METADATA} nor an id 'owner/slug'")


def push_kernel(folder: str | os.PathLike, api: KaggleApi | None = None) -> dict[str, Any]:
    """Push a kernel folder (checked by :func:`read_kernel_folder`) as a new version, which Kaggle runs.

    Returns:
        ``{"id", "ref", "url", "version", "kernel_id", "invalid_sources"}``; ``invalid_sources``
        maps a metadata key (``dataset_sources``, ...) to the sources Kaggle did not accept (the
        version was saved without them).

    Raises:
        InputError: bad folder (before any request) or the API's refusal.
    """
    meta = read_kernel_folder(folder)
    api = api or kaggle_api()
    with _kaggle_errors(f"pushing kernel {meta['id']}"):
        response = api.kernels_push(str(folder))
    if response.error:
        raise InputError(f"pushing kernel {meta['id']}: the Kaggle API refused: {response.error}")
    invalid = {key: list(values) for key, values in (
        ("dataset_sources", response.invalid_dataset_sources),
        ("competition_sources", response.invalid_competition_sources),
        ("kernel_sources", response.invalid_kernel_sources),
        ("model_sources", response.invalid_model_sources),
        ("keywords", response.invalid_tags)) if values}
    return {"id": meta["id"], "ref": response.ref or meta["id"], "url": response.url or "",
            "version": response.version_number, "kernel_id": response.kernel_id, "invalid_sources": invalid}


def kernel_status(kernel: str | os.PathLike, api: KaggleApi | None = None) -> dict[str, Any]:
    """The latest run of a kernel: ``{"kernel", "status", "failure_message"}``.

    ``status`` is kagglesdk's KernelWorkerStatus in lower case: queued, running, complete, error,
    cancel_requested, cancel_acknowledged (or new_script).
    """
    ref = kernel_ref(kernel)
    api = api or kaggle_api()
    with _kaggle_errors(f"asking the status of kernel {ref}"):
        response = api.kernels_status(ref)
    return {"kernel": ref, "status": response.status.name.lower(), "failure_message": response.failure_message}


def wait_kernel(kernel: str | os.PathLike, poll: float = 30.0, timeout: float | None = None,
                api: KaggleApi | None = None,
                on_change: Callable[[dict[str, Any]], None] | None = None,
                sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Poll a kernel's status until it is final (complete, error, cancelled) or ``timeout`` passes.

    Args:
        kernel: folder with ``kernel-metadata.json`` or ``owner/slug``.
        poll: seconds between two status requests.
        timeout: give up after this many seconds (None: wait for a final state).
        api: an authenticated client (default: :func:`kaggle_api`).
        on_change: called with the status dict whenever the status changes (and first).
        sleep: the pause function (tests pass a fake clock's).

    Returns:
        The last status dict plus ``elapsed`` (seconds), ``polls`` and ``timed_out``.

    Raises:
        InputError: bad kernel id, or the API failing more than :data:`MAX_POLL_FAILURES` times
            in a row (connection errors, 429 and 5xx answers are retried).
    """
    if poll <= 0 or (timeout is not None and timeout < 0):
        raise InputError(f"poll must be > 0 and timeout >= 0, got poll={poll}, timeout={timeout}")
    ref = kernel_ref(kernel)
    api = api or kaggle_api()
    start = time.monotonic()
    last: dict[str, Any] | None = None
    polls = failures = 0
    while True:
        polls += 1
        try:
            response = api.kernels_status(ref)
        except Exception as e:
            failures += 1
            if not _transient(e) or failures > MAX_POLL_FAILURES:
                with _kaggle_errors(f"asking the status of kernel {ref}"):
                    raise
            log.warning("status of %s: %s; retrying (%d/%d)", ref, e, failures, MAX_POLL_FAILURES)
        else:
            failures = 0
            current = {"kernel": ref, "status": response.status.name.lower(),
                       "failure_message": response.failure_message}
            if last is None or current["status"] != last["status"]:
                if on_change is not None:
                    on_change(current)
            last = current
            if current["status"] in FINAL_STATES:
                return {**current, "elapsed": time.monotonic() - start, "polls": polls, "timed_out": False}
        elapsed = time.monotonic() - start
        if timeout is not None and elapsed >= timeout:
            base = last or {"kernel": ref, "status": "unknown", "failure_message": None}
            return {**base, "elapsed": elapsed, "polls": polls, "timed_out": True}
        sleep(poll if timeout is None else min(poll, max(timeout - elapsed, 0.0)))


def fetch_output(kernel: str | os.PathLike, out: str | os.PathLike, task: str = "retrieval",
                 api: KaggleApi | None = None) -> dict[str, Any]:
    """Download the output files of a kernel's latest run into ``out`` and check its submission.

    Files already in ``out`` are overwritten. When a top-level ``submission.csv`` came back it is
    validated as a ``task`` submission.

    Returns:
        ``{"kernel", "files", "submission", "rows", "error"}``: the local paths written (the run's
        log included, as ``<slug>.log``), the submission path (None if none came back), its row
        count when valid, and the validation error message (None when valid or absent).
    """
    _check_task(task)
    ref = kernel_ref(kernel)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("output path exists and is not a folder", out)
    api = api or kaggle_api()
    out.mkdir(parents=True, exist_ok=True)
    with _kaggle_errors(f"fetching the output of kernel {ref}"):
        # force: a file from an earlier fetch would otherwise be kept when its date looks newer
        files, _ = api.kernels_output(ref, str(out), force=True, quiet=True)
    root = out.resolve()
    paths = [Path(f) for f in files]
    outside = [str(p) for p in paths if root not in p.resolve().parents]
    if outside:  # the client joins server-given names to the folder as they are
        raise InputError(f"the API named output files outside the folder: {', '.join(outside)}", out)
    result: dict[str, Any] = {"kernel": ref, "files": [str(p) for p in paths], "submission": None,
                              "rows": None, "error": None}
    submission = out / SUBMISSION_FILE
    if any(p.resolve() == submission.resolve() for p in paths):
        result["submission"] = str(submission)
        try:
            result["rows"] = _check_submission(submission, task)
        except InputError as e:
            result["error"] = str(e)
    return result


def submit_file(competition: str, file: str | os.PathLike, task: str, message: str,
                api: KaggleApi | None = None) -> dict[str, Any]:
    """Validate a submission CSV, then upload and submit it to a competition.

    An invalid file raises before any request (and before authentication).

    Returns:
        ``{"competition", "file", "rows", "ref", "message"}`` (``message``: the API's answer).

    Raises:
        InputError: invalid file (naming its line), upload failure or the API's refusal.
    """
    _check_competition(competition)
    rows = _check_submission(file, task)
    api = api or kaggle_api()
    with _kaggle_errors(f"submitting {file} to {competition}"):
        response = api.competition_submit(str(file), message, competition, quiet=True)
    if response.message == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
        raise InputError(f"the upload to {competition} failed; nothing was submitted", file)
    return {"competition": competition, "file": str(file), "rows": rows, "ref": response.ref,
            "message": response.message}


def submit_code(competition: str, kernel: str, version: int, message: str, file_name: str = SUBMISSION_FILE,
                check: str | os.PathLike | None = None, task: str = "retrieval",
                api: KaggleApi | None = None) -> dict[str, Any]:
    """Submit a version of a kernel to a code competition (Kaggle re-runs it on the hidden test set).

    Args:
        competition: competition slug.
        kernel: ``owner/slug``.
        version: the kernel version (as ``kernel push`` reported), >= 1.
        message: the submission description.
        file_name: the output file the kernel writes.
        check: a locally fetched copy of that output, validated as a ``task`` submission first.
        api: an authenticated client (default: :func:`kaggle_api`).

    Returns:
        ``{"competition", "kernel", "version", "file_name", "ref", "message"}``.
    """
    _check_competition(competition)
    _check_kernel_ref(kernel)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InputError(f"kernel version must be an integer >= 1, not {version!r}")
    if not isinstance(file_name, str) or not file_name:
        raise InputError("the kernel's output file name must not be empty")
    if check is not None:
        _check_submission(check, task)
    api = api or kaggle_api()
    with _kaggle_errors(f"submitting kernel {kernel} version {version} to {competition}"):
        response = api.competition_submit_code(file_name, message, competition, kernel, version, quiet=True)
    return {"competition": competition, "kernel": kernel, "version": version, "file_name": file_name,
            "ref": response.ref, "message": response.message}


def list_submissions(competition: str, limit: int = 20, api: KaggleApi | None = None) -> list[dict[str, Any]]:
    """Your latest submissions to a competition, newest first.

    Returns:
        Up to ``limit`` dicts ``{"ref", "date", "description", "file_name", "status",
        "public_score", "private_score", "error"}`` (``date`` ISO text, scores as Kaggle gives
        them, text or None).
    """
    _check_competition(competition)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InputError(f"limit must be an integer >= 1, not {limit!r}")
    api = api or kaggle_api()
    with _kaggle_errors(f"listing submissions to {competition}"):
        submissions = api.competition_submissions(competition, page_size=limit) or []
    rows = []
    for s in submissions:
        if s is None:
            continue
        rows.append({"ref": s.ref, "date": s.date.isoformat(sep=" ", timespec="seconds") if s.date else "",
                     "description": s.description or "", "file_name": s.file_name or "",
                     "status": s.status.name.lower(), "public_score": s.public_score,
                     "private_score": s.private_score, "error": s.error_description})
    return rows


def format_submissions(rows: list[dict[str, Any]]) -> str:
    """A text table of :func:`list_submissions` rows: date, description, status, public, private."""
    header = ("date", "description", "status", "public", "private")
    table = [header] + [
        (r["date"], r["description"], r["status"] + (f" ({r['error']})" if r["error"] else ""),
         r["public_score"] if r["public_score"] not in (None, "") else "-",
         r["private_score"] if r["private_score"] not in (None, "") else "-")
        for r in rows]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

