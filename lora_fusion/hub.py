"""The only place that talks to the Hugging Face Hub: downloads of single files, uploads of folders, the watchdog
that gives up on a silent Hub, and the translation of huggingface_hub's errors into one-line errors that say what to do.

huggingface_hub is imported inside the functions (`lora-fusion --help` and local merges never load it), and all traffic
goes through it, so `HF_TOKEN`, `HF_HUB_OFFLINE`, `HF_ENDPOINT` and the standard cache are honoured. Which files an
adapter needs is the formats' business ([`lora_fusion.formats`]); this module fetches whatever file it is asked for.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import (
    CorruptAdapterError,
    HubError,
    HubOfflineError,
    InvalidParameterError,
    LoraFusionError,
    PublicRepoError,
    SourceNotFoundError,
)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_NAME = re.compile(r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?", re.ASCII)


def is_repo_id(text: str) -> bool:
    """Whether `text` can be a Hub repo id (`name` or `owner/name`)."""
    return bool(_REPO_ID.match(text))


def check_push_repo_id(repo_id: str) -> None:
    """Refuse a repo id that the Hub would reject, before any merge or upload work.

    The Hub's rules (as huggingface_hub's `validate_repo_id`): `owner/name`, each part 1–96 letters, digits, `-`, `_`
    or `.`, not starting or ending with `-` or `.`, no `--` or `..`, not ending in `.git`. An owner is required here:
    a bare name would land in whichever account the token belongs to.

    Raises:
        InvalidParameterError: naming what is wrong and giving the form to use.
    """
    owner, slash, name = repo_id.partition("/")
    problem = None
    if not slash:
        problem = "it has no owner; write owner/name (your user or organisation name, then the repo name)"
    elif not all(_HUB_NAME.fullmatch(part) for part in (owner, name)):
        problem = "owner and name may hold only letters, digits, '-', '_' and '.', not starting or ending with '-' or '.'"
    elif "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        problem = "it may not contain '--' or '..' or end with '.git'"
    if problem:
        raise InvalidParameterError("Hub repo id", repo_id, expected=f"owner/name ({problem}), e.g. me/math-code")


# A Hub that accepts connections but answers nothing is retried by huggingface_hub for many minutes (HEAD timeouts of
# 10 s, six attempts, backoff sleeps, then the GET's own): give up after this long without a byte arriving.
HUB_TIMEOUT_ENV = "LORA_FUSION_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT_S = 60.0
T = TypeVar("T")


def hub_timeout() -> float:
    """Seconds the Hub may stay silent before a download or upload is given up (`LORA_FUSION_HUB_TIMEOUT`, 60)."""
    text = os.environ.get(HUB_TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_HUB_TIMEOUT_S
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise InvalidParameterError(HUB_TIMEOUT_ENV, text, expected="a number of seconds > 0, e.g. 60")
    return value


def call_hub(
    fn: Callable[[], T], *, repo_id: str, progress: Callable[[], int] | None = None, limit: float | None = None
) -> T:
    """Run one huggingface_hub call, giving up once the Hub has sent nothing for `limit` seconds ([`hub_timeout`]).

    `progress` returns a number that grows while data arrives (bytes in the cache's blobs folder), so a slow but
    moving transfer of a large adapter is never cut; without it the whole call must finish within `limit`. The call
    runs in a daemon thread: when it is given up, the thread is left to huggingface_hub's own timeouts and never
    blocks the interpreter's exit.

    Raises:
        HubError: the Hub stayed silent too long (one line, with the setting that changes the limit).
    """
    limit = hub_timeout() if limit is None else limit
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # handed to the caller's thread, which re-raises it
            outcome["error"] = err

    worker = threading.Thread(target=run, name=f"lora-fusion-hub-{repo_id}", daemon=True)
    worker.start()
    seen, since = progress() if progress else None, time.monotonic()
    while True:
        worker.join(timeout=min(1.0, limit))
        if not worker.is_alive():
            break
        now, current = time.monotonic(), progress() if progress else None
        if current != seen:
            seen, since = current, now
        elif now - since >= limit:
            raise HubError(
                f"{repo_id}: the Hub did not answer for {limit:.3g} s, so lora-fusion gave up; try again later (on a "
                f"slow network set {HUB_TIMEOUT_ENV} to more seconds than its {hub_timeout():g})."
            )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def cache_progress(repo_id: str) -> Callable[[], int]:
    """Bytes in the standard cache's blobs folder of `repo_id` (growing while huggingface_hub downloads into it)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"

    def size() -> int:
        try:
            return sum(entry.stat().st_size for entry in os.scandir(blobs))
        except OSError:  # not created yet, or a blob renamed while listing
            return 0

    return size


def download_file(
    repo_id: str, filename: str, *, revision: str | None, subfolder: str | None = None, token: str | None = None
) -> Path | None:
    """Download one file of a Hub model repo into the standard cache (or find it there offline), under the watchdog.

    Args:
        repo_id: `owner/name` of the model repo.
        filename: the file's name inside `subfolder`.
        revision (`str`, *optional*): branch, tag or commit (default: main).
        subfolder (`str`, *optional*): folder of the repo that holds the file.
        token (`str`, *optional*): Hub token; by default `HF_TOKEN` or the stored login.

    Returns:
        The file's path in the cache (`…/snapshots/<commit>/…`, see [`commit_of`]), or None when the repo at that
        revision has no such file: the caller says what was expected there.

    Raises:
        HubError / SourceNotFoundError: no such repo or revision, authentication, network or server failures
            ([`hub_error`]), or a Hub silent for longer than [`hub_timeout`].
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def download() -> str:
        return hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision, token=token)

    try:
        return Path(call_hub(download, repo_id=repo_id, progress=cache_progress(repo_id)))
    except HubError:
        raise
    except LocalEntryNotFoundError as err:  # a subclass of EntryNotFoundError: unreachable, not absent
        raise hub_error(err, repo_id, revision) from None
    except EntryNotFoundError:
        return None
    except Exception as err:
        raise hub_error(err, repo_id, revision) from None


def list_safetensors(
    repo_id: str, *, revision: str | None, subfolder: str | None = None, token: str | None = None
) -> list[str]:
    """The `.safetensors` files directly in `subfolder` (or the root) of a Hub model repo, by name, sorted; for
    choosing a single-file LoRA (diffusers, kohya) when the repo has no PEFT adapter config.

    Raises:
        HubError / SourceNotFoundError: as [`download_file`].
    """
    files = list_files(repo_id, revision=revision, subfolder=subfolder, token=token)
    return [name for name in files if name.endswith(".safetensors")]


def list_files(
    repo_id: str, *, revision: str | None, subfolder: str | None = None, token: str | None = None
) -> list[str]:
    """The files directly in `subfolder` (or the root) of a Hub model repo, by name, sorted.

    Raises:
        HubError / SourceNotFoundError: as [`download_file`].
    """
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""

    def listing() -> list[str]:
        entries = HfApi().list_repo_tree(repo_id, path_in_repo=prefix.rstrip("/") or None, revision=revision,
                                         token=token)
        return [e.path for e in entries if isinstance(e, RepoFile)]

    try:
        paths = call_hub(listing, repo_id=repo_id)
    except HubError:
        raise
    except Exception as err:
        raise hub_error(err, repo_id, revision) from None
    return sorted(p[len(prefix):] for p in paths if "/" not in p[len(prefix):])


def commit_of(path: Path) -> str | None:
    """The commit a downloaded file belongs to: the standard cache lays files out as
    `…/snapshots/<commit>/<subfolder>/<file>`. None for a path outside that layout."""
    parts = path.parts
    if "snapshots" in parts:
        index = len(parts) - 1 - parts[::-1].index("snapshots")
        if index + 1 < len(parts):
            return parts[index + 1]
    return None


def hub_error(err: Exception, repo_id: str, revision: str | None = None) -> Exception:
    """Translate a huggingface_hub exception into a one-line [`LoraFusionError`] that says what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, GatedRepoError):
        return HubError(f"{repo_id} is gated: accept its terms on the Hub page, then log in (HF_TOKEN).")
    if isinstance(err, RepositoryNotFoundError) and "/" not in repo_id:
        return SourceNotFoundError(
            f"{repo_id}: no such local file or directory, and no Hub repo of that name. Hub ids are owner/name "
            f"(e.g. someone/{repo_id}); only a few legacy models have no owner. Check the path or give the owner."
        )
    if isinstance(err, RepositoryNotFoundError):
        return SourceNotFoundError(
            f"{repo_id}: no such local path, and no such Hub repo (or it is private): check the id, "
            "or log in with `hf auth login` / HF_TOKEN."
        )
    if isinstance(err, RevisionNotFoundError):
        return SourceNotFoundError(f"{repo_id}: revision {revision!r} not found; check the branch, tag or commit.")
    cause = err.__cause__
    if isinstance(err, LocalEntryNotFoundError) and isinstance(cause, HfHubHTTPError):
        # hf_hub_download retried the metadata request (429, 5xx) before giving up and looking in the cache
        return _status_error(repo_id, cause, " after huggingface_hub's retries")
    if isinstance(err, LocalEntryNotFoundError) and "timeout" in type(cause).__name__.lower():
        return HubError(
            f"{repo_id}: the Hub did not answer in time ({type(cause).__name__}, after huggingface_hub's retries) and "
            "the files are not in the local cache; try again later, or raise HF_HUB_ETAG_TIMEOUT on a slow network."
        )
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return HubError(
            f"{repo_id}: cannot reach the Hub and the files are not in the local cache. Check the network, or "
            "download once online; with HF_HUB_OFFLINE=1 only cached adapters are used."
        )
    if isinstance(err, HfHubHTTPError):
        return _status_error(repo_id, err)
    if isinstance(err, OSError) or "connect" in type(err).__name__.lower():
        return HubError(
            f"{repo_id}: the Hub could not be reached ({type(err).__name__}). Check the network; with "
            "HF_HUB_OFFLINE=1 adapters already in the cache are used."
        )
    return err


def _status_error(repo_id: str, err: Exception, retried: str = "") -> HubError:
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401:
        return HubError(f"{repo_id}: the Hub refused the credentials (401); log in again or set HF_TOKEN.")
    if status == 403:
        return HubError(f"{repo_id}: the token lacks permission (403); use a token with write access.")
    if status == 429:
        return HubError(
            f"{repo_id}: the Hub is rate-limiting requests (429{retried}); wait a few minutes and try again, or log "
            "in (HF_TOKEN) for a higher limit."
        )
    kind = " (a server error)" if isinstance(status, int) and status >= 500 else ""
    return HubError(f"{repo_id}: the Hub answered {status}{kind}{retried}; try again later.")


class PushResult(str):
    """What a push did. The string is the commit URL (what [`push_folder`] returned before), so it prints and
    serialises as that; the attributes say which branch holds the files at which commit, and whether this push
    changed anything.

    Attributes:
        repo_id: the Hub repo.
        revision: the branch pushed to (`main` unless a revision was given).
        commit: the branch's head after the push: the new commit, or the existing one when nothing changed.
        changed: False when the branch already held these exact files: no commit was made (huggingface_hub skips
            empty commits) and `commit` is that branch's head, not main's.
    """

    repo_id: str
    revision: str
    commit: str
    changed: bool

    def __new__(cls, commit_url: str, *, repo_id: str, revision: str, commit: str, changed: bool) -> PushResult:
        result = super().__new__(cls, commit_url)
        result.repo_id, result.revision, result.commit, result.changed = repo_id, revision, commit, changed
        return result

    @property
    def summary(self) -> str:
        """One line for people: what was pushed where, or that nothing changed."""
        if self.changed:
            return f"pushed to {self.repo_id}@{self.revision}: commit {self.commit} ({self})"
        return (
            f"nothing changed: {self.repo_id}@{self.revision} already holds these files at commit {self.commit} "
            f"({self}); no commit was made"
        )


def check_push_allowed(repo_id: str) -> None:
    """Refuse an upload that huggingface_hub's offline mode would block, before any work (merge or upload).

    Raises:
        HubOfflineError: `HF_HUB_OFFLINE` is set (huggingface_hub reads it when first imported).
    """
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise _offline_error(repo_id)


def _offline_error(repo_id: str) -> HubOfflineError:
    return HubOfflineError(
        f"HF_HUB_OFFLINE is set: offline mode blocks uploads, so nothing was pushed to {repo_id}. "
        "Unset HF_HUB_OFFLINE (or set it to 0) to push."
    )


# Uploads slower than this are given up (with the Hub timeout on top); 100 kB/s: 10 s per MB of adapter.
MIN_UPLOAD_BYTES_PER_S = 100_000


def _refuse_links_leaving(folder: Path) -> None:
    """upload_folder follows symlinks: a link in a downloaded adapter folder could publish ~/.ssh/id_rsa."""
    root = Path(folder).resolve()
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_symlink():
            continue
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):  # a loop (RuntimeError on Python 3.11) or a dangling link
            raise CorruptAdapterError(
                f"{folder}: {path.relative_to(folder)} is a broken or looping link; refusing to upload the folder. "
                "Remove the link."
            ) from None
        if not target.is_relative_to(root):
            raise CorruptAdapterError(
                f"{folder}: {path.relative_to(folder)} is a link to {target}, outside the folder; refusing to "
                "upload it. Replace the link by the file, or remove it."
            )


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Upload an adapter folder to the Hub (repo created if missing, branch `revision` too).

    Uses huggingface_hub `create_repo` + `upload_folder`; the token is passed through, never written or printed.
    Before uploading, the repo's visibility is read: `private=True` never publishes into an existing public repo.

    Args:
        folder: the adapter folder to upload (every file in it).
        repo_id: `owner/name` of the model repo.
        private (`bool`, *optional*): create the repo private; with True, also refuse an existing public repo.
        revision (`str`, *optional*): the branch to push to, created from main if missing (default: main).
        commit_message (`str`, *optional*): the commit's title.
        token (`str`, *optional*): Hub token; by default `HF_TOKEN` or the stored login.

    Returns:
        [`PushResult`]: the commit URL (a `str`), with the branch, its head commit, and whether anything changed
        (an unchanged folder makes no commit; the result then names that branch's existing head).

    Raises:
        HubOfflineError: `HF_HUB_OFFLINE` is set; nothing is sent.
        PublicRepoError: `private=True` but the repo exists and is public; nothing is uploaded.
        CorruptAdapterError: the folder holds a symbolic link to something outside it (never uploaded).
        HubError / SourceNotFoundError: authentication, permission, network or server failures, with what to do.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    check_push_repo_id(repo_id)
    check_push_allowed(repo_id)
    _refuse_links_leaving(Path(folder))
    api = HfApi(token=token)
    branch = revision or "main"

    def upload() -> tuple[Any, Any]:
        api.create_repo(repo_id, private=private, exist_ok=True)  # an existing repo keeps its visibility
        info = api.repo_info(repo_id)
        if private and info.private is False:
            raise PublicRepoError(
                f"{repo_id} exists and is public, and --private (private=True) was asked for; nothing was uploaded. "
                "Make the repo private on the Hub (Settings, Change visibility) and push again, or push without "
                "--private to publish the adapter."
            )
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
            info = api.repo_info(repo_id, revision=revision)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=commit_message or "Upload LoRA adapter merged with lora-fusion",
        )
        return commit, info

    # huggingface_hub's uploads have no timeout: bound the whole push by the Hub timeout plus the folder's size at
    # a floor rate, so a hung Hub ends in one line while any working upload of a large adapter still completes.
    size = sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
    try:
        commit, info = call_hub(upload, repo_id=repo_id, limit=hub_timeout() + size / MIN_UPLOAD_BYTES_PER_S)
    except LoraFusionError:
        raise
    except OfflineModeIsEnabled:  # offline mode switched on after the first check (the constant is mutable)
        raise _offline_error(repo_id) from None
    except Exception as err:
        translated = hub_error(err, repo_id, revision)
        if translated is err:
            raise
        raise translated from None
    # huggingface_hub makes no commit when nothing changed and returns the branch's head: the head we read before.
    return PushResult(
        str(commit.commit_url), repo_id=repo_id, revision=branch, commit=str(commit.oid), changed=commit.oid != info.sha
    )
