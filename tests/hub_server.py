"""In-memory fake of the Hugging Face Hub HTTP API, for tests.

Serves, on 127.0.0.1, the subset of the Hub API that the real ``huggingface_hub`` client (and
``transformers`` / ``peft`` ``from_pretrained`` / ``push_to_hub`` on top of it) uses: repo creation,
preupload + NDJSON commits (every file is "regular": base64 inside the commit, no LFS/Xet),
branches (each with its own head commit), repo info (with ``private``), visibility changes
(``PUT .../settings``), tree listing, paths-info and ``/resolve`` downloads. Stdlib only.

The client reads ``HF_ENDPOINT`` when ``huggingface_hub`` is imported, so start the hub and export
``HF_ENDPOINT=hub.url`` (and a temporary ``HF_HUB_CACHE``) *before* that import. Do not set
``HF_HUB_OFFLINE``: it blocks every request, localhost included.

    hub = FakeHub().start()
    sha = hub.add_repo("org/tiny", {"config.json": b"{}"})
    ...
    hub.stop()
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_BAD_CREDENTIALS = "Invalid credentials in Authorization header"


def git_blob_sha(content: bytes) -> str:
    """Git object id of a blob: the Hub's ``oid`` and ``ETag`` of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class _HubError(Exception):
    """An HTTP error reply, with the ``X-Error-Code`` the client maps to an exception type."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        self.headers = {**({"X-Error-Code": code} if code else {}), "X-Error-Message": message, **(headers or {})}


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(obj: Any, status: int = 200) -> _Reply:
    return _Reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json"})


@dataclass
class _Fault:
    status: int | None  # None: a delay only
    remaining: int
    path_contains: str
    method: str | None = None
    delay: float = 0.0
    retry_after: str | None = None


@dataclass
class _Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> head commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> full snapshot {path: bytes}


class FakeHub:
    """In-memory Hub: repos -> branches -> commits -> {path: bytes}.

    ``required_token``: when set, private repos answer 401 (``X-Error-Code: RepoNotFound``, as the real Hub)
    unless the request carries ``Authorization: Bearer <required_token>``, and every write (create repo,
    preupload, commit, create branch) without it gets 401. ``requests`` logs every ``(method, path)``
    received (path URL-decoded, without query). ``username`` is the namespace given to repos created
    with a bare name, as the real Hub uses the token owner's namespace.
    """

    username = "user"

    def __init__(self) -> None:
        self.url = ""
        self.required_token: str | None = None
        self.requests: list[tuple[str, str]] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._port = 0
        self._commit_counter = 0

    # ----------------------------------------------------------------- lifecycle and test controls

    def start(self) -> FakeHub:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread."""
        self._serve(0)
        self._port = self._server.server_address[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self._port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def go_down(self) -> None:
        """Stop listening (the port is kept for `come_up`): clients get a connection-refused error."""
        self.stop()

    def come_up(self) -> None:
        if self._server is None:
            self._serve(self._port)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget all repos, pending faults, the request log and ``required_token``."""
        with self._lock:
            self._repos.clear()
            self._faults.clear()
            self.requests.clear()
            self.required_token = None

    def clear_faults(self) -> None:
        """Drop pending `fail_next` / `delay_next` faults (repos and the request log are kept)."""
        with self._lock:
            self._faults.clear()

    def fail_next(
        self,
        status: int,
        count: int = 1,
        path_contains: str = "",
        *,
        method: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        """Answer the next ``count`` requests whose path contains ``path_contains`` (and whose HTTP ``method`` is
        ``method``, if given) with ``status``.

        A 429 carries ``Retry-After: 0`` unless ``retry_after`` says otherwise (the client waits Retry-After + 1 s).
        """
        with self._lock:
            self._faults.append(_Fault(status, count, path_contains, method, retry_after=retry_after))

    def delay_next(self, seconds: float, count: int = 1, path_contains: str = "", *, method: str | None = None) -> None:
        """Hold the next ``count`` matching requests for ``seconds`` before answering normally (client timeouts)."""
        with self._lock:
            self._faults.append(_Fault(None, count, path_contains, method, delay=seconds))

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        private: bool = False,
        branch: str = "main",
        repo_type: str = "model",
    ) -> str:
        """Commit ``files`` as the full content of ``branch`` (repo and branch created if needed); return the sha."""
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), _Repo(private=private))
            return self._commit(repo, branch, dict(files))

    def repo_files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            return dict(repo.commits[self._resolve(repo, revision)])

    def commit_sha(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        with self._lock:
            return self._resolve(self._repos[(repo_type, repo_id)], revision)

    def branches(self, repo_id: str, *, repo_type: str = "model") -> dict[str, str]:
        """Each branch of the repo with its head commit."""
        with self._lock:
            return dict(self._repos[(repo_type, repo_id)].branches)

    def is_private(self, repo_id: str, *, repo_type: str = "model") -> bool:
        with self._lock:
            return self._repos[(repo_type, repo_id)].private

    def set_private(self, repo_id: str, private: bool, *, repo_type: str = "model") -> None:
        """Change a repo's visibility, as the Hub's settings page (or `HfApi.update_repo_settings`) does."""
        with self._lock:
            self._repos[(repo_type, repo_id)].private = private

    # ----------------------------------------------------------------- internals

    def _serve(self, port: int) -> None:
        self._server = _Server(port, self)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _commit(self, repo: _Repo, branch: str, files: dict[str, bytes]) -> str:
        self._commit_counter += 1
        digest = hashlib.sha1(f"commit {self._commit_counter} {repo.branches.get(branch)}".encode())
        for path in sorted(files):
            digest.update(f"{path}:{git_blob_sha(files[path])}".encode())
        sha = digest.hexdigest()
        repo.commits[sha] = files
        repo.branches[branch] = sha
        return sha

    def _resolve(self, repo: _Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path_contains in path and fault.method in (None, method):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _authorized(self, auth: str | None) -> bool:
        return self.required_token is None or auth == f"Bearer {self.required_token}"

    def _check_write(self, auth: str | None) -> None:
        if not self._authorized(auth):
            raise _HubError(401, None, _BAD_CREDENTIALS)

    def _find_repo(self, repo_type: str, segments: list[str], auth: str | None) -> tuple[str, _Repo, list[str]]:
        """Split ``segments`` into an existing repo id (``owner/name`` or bare ``name``) and the rest."""
        for size in (2, 1):
            repo_id = "/".join(segments[:size])
            repo = self._repos.get((repo_type, repo_id)) if len(segments) >= size else None
            if repo is not None:
                if repo.private and not self._authorized(auth):
                    raise _HubError(401, "RepoNotFound", "Invalid username or password.")
                return repo_id, repo, segments[size:]
        raise _HubError(404, "RepoNotFound", "Repository not found")

    def _route(
        self, method: str, segments: list[str], query: dict[str, list[str]], body: bytes, headers: Message
    ) -> _Reply:
        """Route one request (``segments``: URL-decoded path segments) and build its reply."""
        auth = headers.get("Authorization")
        with self._lock:
            if segments[:1] != ["api"]:  # /[datasets/|spaces/]{repo_id}/resolve/{revision}/{path}
                repo_type = _REPO_TYPES[segments[0]] if segments[0] in ("datasets", "spaces") else "model"
                repo_id, repo, rest = self._find_repo(repo_type, segments[1 if repo_type != "model" else 0 :], auth)
                if method not in ("GET", "HEAD") or len(rest) < 3 or rest[0] != "resolve":
                    raise _HubError(404, None, "Not found")
                return self._download(repo, rest[1], "/".join(rest[2:]), headers.get("Range"))
            if method == "POST" and segments == ["api", "repos", "create"]:
                return self._create_repo(json.loads(body or b"{}"), auth)
            if method == "POST" and segments == ["api", "validate-yaml"]:
                return _json({"errors": [], "warnings": []})
            if len(segments) < 3 or segments[1] not in _REPO_TYPES:
                raise _HubError(404, None, f"FakeHub does not implement /{'/'.join(segments)}")
            repo_type = _REPO_TYPES[segments[1]]
            repo_id, repo, rest = self._find_repo(repo_type, segments[2:], auth)
            action, args = (rest[0], rest[1:]) if rest else ("", [])
            if method == "GET" and (action == "" or (action == "revision" and args)):
                return _json(self._info(repo_type, repo_id, repo, self._resolve(repo, args[0] if args else "main")))
            if method == "GET" and action == "tree" and args:
                recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
                return _json(self._tree(repo, args[0], "/".join(args[1:]).strip("/"), recursive))
            if method == "POST" and action == "paths-info" and args:
                return self._paths_info(repo, args[0], body, headers.get("Content-Type", ""))
            if method == "PUT" and action == "settings":
                self._check_write(auth)
                return self._update_settings(repo, json.loads(body or b"{}"))
            if method == "POST" and action in ("preupload", "commit", "branch") and args:
                self._check_write(auth)
                if action == "preupload":
                    return self._preupload(repo, args[0], json.loads(body))
                if action == "commit":
                    if query.get("create_pr"):
                        raise _HubError(400, None, "FakeHub does not support create_pr")
                    return self._create_commit(repo_type, repo_id, repo, args[0], body)
                return self._create_branch(repo, args[0], json.loads(body or b"{}"))
            raise _HubError(404, None, f"FakeHub does not implement {method} /{'/'.join(segments)}")

    def _download(self, repo: _Repo, revision: str, path: str, byte_range: str | None) -> _Reply:
        sha = self._resolve(repo, revision)
        if path not in repo.commits[sha]:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": sha})
        content = repo.commits[sha][path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(content)}"', "Accept-Ranges": "bytes"}
        headers["Content-Type"] = "application/octet-stream"
        match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", byte_range or "")
        if match is None or match.groups() == ("", ""):
            return _Reply(200, content, headers)
        start_s, end_s = match.groups()
        start = int(start_s) if start_s else max(len(content) - int(end_s), 0)
        end = min(int(end_s), len(content) - 1) if start_s and end_s else len(content) - 1
        if start > end:
            raise _HubError(416, None, "Range not satisfiable", {"Content-Range": f"bytes */{len(content)}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        return _Reply(206, content[start : end + 1], headers)

    def _create_repo(self, payload: dict[str, Any], auth: str | None) -> _Reply:
        self._check_write(auth)
        name, org = payload["name"], payload.get("organization")
        repo_id = f"{org}/{name}" if org else name if "/" in name else f"{self.username}/{name}"
        repo_type = payload.get("type") or "model"
        url = f"{self.url}/{_URL_PREFIXES[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self._repos:
            return _json({"error": "You already created this repo", "url": url}, 409)
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        repo = self._repos[(repo_type, repo_id)] = _Repo(private=private)
        self._commit(repo, "main", {})  # like the Hub's initial commit, minus the .gitattributes file
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _info(self, repo_type: str, repo_id: str, repo: _Repo, sha: str) -> dict[str, Any]:
        files = sorted(repo.commits[sha].items())
        siblings = [{"rfilename": p, "size": len(c), "blobId": git_blob_sha(c)} for p, c in files]
        author = repo_id.split("/")[0] if "/" in repo_id else None
        info = {"_id": repo_id, "id": repo_id, "author": author, "sha": sha, "private": repo.private, "gated": False}
        return {**info, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings}

    @staticmethod
    def _file_entry(path: str, content: bytes) -> dict[str, Any]:
        return {"type": "file", "path": path, "size": len(content), "oid": git_blob_sha(content)}

    @staticmethod
    def _folder_entry(path: str, sha: str) -> dict[str, Any]:
        oid = hashlib.sha1(f"{sha}:{path}".encode()).hexdigest()
        return {"type": "directory", "path": path, "size": 0, "oid": oid}

    def _tree(self, repo: _Repo, revision: str, base: str, recursive: bool) -> list[dict[str, Any]]:
        sha = self._resolve(repo, revision)
        prefix, entries = f"{base}/" if base else "", {}
        for path, content in sorted(repo.commits[sha].items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, self._folder_entry(folder, sha))
            if recursive or len(parts) == 1:
                entries[path] = self._file_entry(path, content)
        if base and not entries:
            raise _HubError(404, "EntryNotFound", f"{base} does not exist", {"X-Repo-Commit": sha})
        return [entries[path] for path in sorted(entries)]

    def _paths_info(self, repo: _Repo, revision: str, body: bytes, content_type: str) -> _Reply:
        sha = self._resolve(repo, revision)
        files = repo.commits[sha]
        paths = json.loads(body)["paths"] if "json" in content_type else parse_qs(body.decode()).get("paths", [])
        entries = [self._file_entry(p, files[p]) for p in paths if p in files]
        entries += [self._folder_entry(p, sha) for p in paths if any(f.startswith(f"{p}/") for f in files)]
        return _json(entries)

    def _preupload(self, repo: _Repo, revision: str, payload: dict[str, Any]) -> _Reply:
        sha = self._resolve(repo, revision)
        files = repo.commits[sha]
        paths = [f["path"] for f in payload["files"]]
        oids = {p: git_blob_sha(files[p]) if p in files else None for p in paths}
        infos = [{"path": p, "uploadMode": "regular", "shouldIgnore": False, "oid": oids[p]} for p in paths]
        return _json({"files": infos, "commitOid": sha})

    def _create_commit(self, repo_type: str, repo_id: str, repo: _Repo, branch: str, body: bytes) -> _Reply:
        if branch not in repo.branches:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        head = repo.branches[branch]
        files = dict(repo.commits[head])
        for line in filter(None, (raw.strip() for raw in body.splitlines())):
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                if value.get("parentCommit") not in (None, head):
                    raise _HubError(412, None, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                encoded = value["content"]
                is_b64 = value.get("encoding") == "base64"
                files[value["path"]] = base64.b64decode(encoded) if is_b64 else encoded.encode()
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _HubError(404, "EntryNotFound", "A file with this name doesn't exist")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {p: c for p, c in files.items() if not p.startswith(folder)}
            else:
                raise _HubError(400, None, f"FakeHub does not support '{key}' commit operations")
        sha = self._commit(repo, branch, files)
        url = f"{self.url}/{_URL_PREFIXES[repo_type]}{repo_id}/commit/{sha}"
        return _json({"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": None, "hookOutput": ""})

    def _update_settings(self, repo: _Repo, payload: dict[str, Any]) -> _Reply:
        # huggingface_hub's update_repo_settings sends {"visibility": "private"|"public"} (older: {"private": bool})
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        elif "private" in payload:
            repo.private = bool(payload["private"])
        return _json({})

    def _create_branch(self, repo: _Repo, branch: str, payload: dict[str, Any]) -> _Reply:
        if branch in repo.branches:
            return _json({"error": "Reference already exists"}, 409)
        repo.branches[branch] = self._resolve(repo, payload.get("startingPoint") or "main")
        return _json({})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, hub: FakeHub) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.hub = hub


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: one request per connection, so `go_down` never leaves a live keep-alive socket behind."""

    server: _Server

    def _handle(self) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        path = unquote(url.path)
        with hub._lock:
            hub.requests.append((self.command, path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = hub._take_fault(self.command, path)
        if fault is not None and fault.delay:
            time.sleep(fault.delay)
        try:
            if fault is not None and fault.status is not None:
                retry_after = fault.retry_after or ("0" if fault.status == 429 else None)
                extra = {"Retry-After": retry_after} if retry_after is not None else {}
                raise _HubError(fault.status, None, f"Injected fault {fault.status}", extra)
            segments = [unquote(s) for s in url.path.strip("/").split("/")]
            reply = hub._route(self.command, segments, parse_qs(url.query), body, self.headers)
        except _HubError as err:
            reply = _json({"error": err.message}, err.status)
            reply.headers.update(err.headers)
        except Exception as exc:  # a FakeHub bug: surface it to the client instead of dropping the connection
            reply = _json({"error": f"FakeHub internal error: {exc!r}"}, 500)
        try:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out (see `delay_next`) and left
            pass

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass
