"""A local stand-in of the Hugging Face Hub HTTP API, for offline tests.

``HubStandIn`` runs a small ``http.server.ThreadingHTTPServer`` on 127.0.0.1 (a free port picked by the OS) in a
daemon thread and answers the requests that the real ``huggingface_hub.HfApi`` client (written against
huggingface_hub 2.4) sends for model repositories. State lives in memory and can be inspected by tests::

    with HubStandIn(tokens=("hf_test_token",)) as hub:
        api = HfApi(endpoint=hub.url, token="hf_test_token")
        api.create_repo("test-user/tiny", private=True)
        api.upload_folder(folder_path=folder, repo_id="test-user/tiny")
        assert hub.files("test-user/tiny")["config.json"] == b"{}"
        assert ("POST", "/api/models/test-user/tiny/commit/main") in hub.calls

Served routes (``{repo_id}`` is ``namespace/name``; ``{rev}`` is one URL-quoted segment, so ``refs%2Fpr%2F1``):

=======  ===========================================  ==============================================================
method   path                                          HfApi calls served
=======  ===========================================  ==============================================================
GET      /api/whoami-v2                                ``whoami``
POST     /api/repos/create                             ``create_repo`` (409 + ``url`` when it exists: ``exist_ok``)
DELETE   /api/repos/delete                             ``delete_repo``
POST     /api/validate-yaml                            ``create_commit`` of a README.md (always valid here)
GET      /api/models/{repo_id}[/revision/{rev}]        ``model_info``, ``repo_info``, ``repo_exists``,
                                                       ``revision_exists``
GET      /api/models/{repo_id}/tree/{rev}[/{path}]     ``list_repo_tree``, ``list_repo_files``
POST     /api/models/{repo_id}/paths-info/{rev}        ``get_paths_info`` (form-encoded ``paths=...``)
GET      /api/models/{repo_id}/refs                    ``list_repo_refs``
GET      /api/models/{repo_id}/commits/{rev}           ``list_repo_commits``
POST     /api/models/{repo_id}/branch/{branch}         ``create_branch`` (409 when it exists: ``exist_ok``)
DELETE   /api/models/{repo_id}/branch/{branch}         ``delete_branch``
POST     /api/models/{repo_id}/preupload/{rev}         first step of ``create_commit``, ``upload_file``,
                                                       ``upload_folder``
POST     /api/models/{repo_id}/commit/{rev}            second step of the same (NDJSON body, ``?create_pr=1``)
POST     /api/models/{repo_id}/discussions             ``create_pull_request`` (used by ``upload_folder`` with
                                                       ``create_pr=True``), ``create_discussion``
GET      /api/models/{repo_id}/discussions/{num}       ``get_discussion_details``
HEAD     /{repo_id}/resolve/{rev}/{path}               ``file_exists``, ``get_hf_file_metadata``, first step of
                                                       ``hf_hub_download``
GET      /{repo_id}/resolve/{rev}/{path}               ``hf_hub_download`` (single ``Range: bytes=a-b`` honoured)
=======  ===========================================  ==============================================================

Anything else answers 501 with a JSON error naming the route, so a test fails loudly instead of silently.

Deliberate simplifications, each a legitimate choice for a server or harmless for tests:

* Only model repositories; other repo types get a 400.
* Every file is stored as a regular git blob: the preupload answer says ``uploadMode: "regular"`` and
  ``shouldIgnore: false`` for every file, so the client inlines the contents base64-encoded in the commit and never
  takes the LFS or Xet paths. An ``lfsFile`` entry in a commit is answered with a 400. ``.gitignore`` is not applied.
* Any valid token may read and write every repository (no per-namespace permissions, no gated repos).
* ``.gitattributes`` is added by an "initial commit" when a repo is created, as the Hub does.
* README.md metadata is not validated (no YAML parser in the standard library).
* Commit and blob ids are 40-hex strings; blob ids are real git blob SHA-1s (what the client compares to skip
  unchanged files), commit ids are derived from the commit's content and a counter.

Authentication mirrors the Hub: a request with an ``Authorization`` header holding an unknown token gets 401
``Invalid credentials in Authorization header``; write endpoints without a token get 401; reading a private or
missing repo gets 401 (no token) or 404 (token) with ``X-Error-Code: RepoNotFound``. Error bodies are JSON
``{"error": "..."}`` and the message is repeated in ``X-Error-Message`` as the Hub does.

``fail_commit`` (constructor argument or attribute, changeable at any time) makes the commit endpoint answer an
error after the authentication and revision checks and before anything is applied: ``True`` answers 500, an int
answers that status. Note that ``upload_folder`` (with ``hf_xet`` installed) retries 5xx commit answers with
exponential backoff (about 23 s in total before it raises), while ``create_commit`` and ``upload_file`` do not retry;
use e.g. ``fail_commit=422`` to make ``upload_folder`` fail fast.

Standard library only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
import socket
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_BRANCH = "main"

# The `.gitattributes` the Hub writes in the initial commit of a new model repo (shortened: LFS rules only matter
# for LFS uploads, which this stand-in never asks for).
DEFAULT_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pth filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)

# A repo name or namespace, as the Hub accepts it: word characters, '-' and '.', starting and ending with a word
# character, at most 96 characters, no '--' or '..'.
_NAME_RE = re.compile(r"^\w(?:[\w.-]{0,94}\w)?$")
_HEX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_PR_REF_RE = re.compile(r"^refs/pr/(\d+)$")

# Second path segments after /api/models/{name} that are actions, not the second half of a `namespace/name` id.
_REPO_ACTIONS = frozenset(
    {"revision", "tree", "paths-info", "refs", "commits", "branch", "preupload", "commit", "discussions"}
)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding ``data`` (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now_iso() -> str:
    """The current UTC time in the Hub's format, e.g. ``2024-05-01T12:00:00.000Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _valid_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and bool(_NAME_RE.match(name))
        and "--" not in name
        and ".." not in name
        and not name.endswith(".git")
    )


def _valid_path_in_repo(path: Any) -> bool:
    if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
        return False
    parts = path.split("/")
    return all(part not in ("", ".", "..") for part in parts) and parts[0] != ".git"


@dataclass
class RepoState:
    """Everything the stand-in knows about one model repository.

    Attributes:
        repo_id: ``namespace/name``.
        private: visibility given at creation.
        branches: branch name -> {path in repo -> file bytes}. Pull requests are branches named ``refs/pr/<num>``.
            Each commit replaces the branch's dict by a new one, so a dict taken earlier is a stable snapshot.
        commits: every commit in the order it was made. Each is a dict with ``oid``, ``parent`` (oid or None),
            ``revision`` (the branch it was made on), ``message`` (the summary), ``description``, ``added`` (paths
            written, in order), ``deleted`` (paths removed), ``author`` and ``date``.
        heads: branch name -> oid of its last commit.
        snapshots: commit oid -> {path -> bytes} as of that commit (to serve reads at a commit sha).
        discussions: number -> dict (``num``, ``title``, ``description``, ``is_pull_request``, ``base``, ``status``,
            ``author``, ``created_at``).
    """

    repo_id: str
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)
    heads: dict[str, str] = field(default_factory=dict)
    snapshots: dict[str, dict[str, bytes]] = field(default_factory=dict)
    discussions: dict[int, dict[str, Any]] = field(default_factory=dict)
    created_at: str = field(default_factory=_now_iso)
    last_modified: str = field(default_factory=_now_iso)

    def resolve(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit oid, files) for a branch name or a full or abbreviated (7+ hex) commit oid; None if unknown."""
        if revision in self.branches:
            return self.heads[revision], self.branches[revision]
        if _HEX_RE.match(revision):
            matches = [oid for oid in self.snapshots if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0], self.snapshots[matches[0]]
        return None


class _HubError(Exception):
    """An error answer: JSON body ``{"error": message, **extra}``, ``X-Error-Message`` and maybe ``X-Error-Code``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def response(self) -> _Response:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return _Response.json(self.status, {"error": self.message, **self.extra}, headers)


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> _Response:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass
class _Request:
    method: str
    raw_path: str  # as sent, still percent-encoded, without the query string
    segments: list[str]  # raw_path split on "/" and each piece unquoted
    query: dict[str, list[str]]
    headers: Any  # email.message.Message from http.server
    body: bytes

    def json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as err:
            raise _HubError(400, f"Request body is not valid JSON: {err}") from err

    def flag(self, name: str) -> bool:
        values = self.query.get(name)
        return bool(values) and values[-1].lower() in ("1", "true")


class HubStandIn:
    """In-memory Hugging Face Hub for tests, served over HTTP on 127.0.0.1.

    Args:
        tokens: the access tokens accepted in ``Authorization: Bearer <token>``. Either an iterable of tokens (all
            belong to ``user``) or a mapping token -> user name.
        user: the user name of the tokens given as an iterable (the namespace ``create_repo`` uses when the repo id
            has none, and what ``whoami`` answers).
        fail_commit: ``False`` (default), ``True`` (the commit endpoint answers 500) or an HTTP status to answer.
        host: the interface to listen on.

    Attributes:
        url: ``http://127.0.0.1:<port>``, to pass as ``HfApi(endpoint=...)`` (only while started).
        repos: repo id -> :class:`RepoState`.
        calls: ``(method, path)`` of every request received, in order; ``path`` as sent (percent-encoded) and without
            the query string.
        history: ``(method, path, status)`` of every answered request, in order.
        fail_commit: see above; may be changed while the server runs.
    """

    def __init__(
        self,
        tokens: Iterable[str] | Mapping[str, str] = ("hf_test_token",),
        *,
        user: str = "test-user",
        fail_commit: bool | int = False,
        host: str = "127.0.0.1",
    ):
        if isinstance(tokens, str):
            tokens = (tokens,)
        self.tokens: dict[str, str] = dict(tokens) if isinstance(tokens, Mapping) else {t: user for t in tokens}
        self.user = user
        self.fail_commit = fail_commit
        self.host = host
        self.repos: dict[str, RepoState] = {}
        self.calls: list[tuple[str, str]] = []
        self.history: list[tuple[str, str, int]] = []
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0  # makes every commit / repo id unique

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("HubStandIn is not started (use it as a context manager or call start())")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubStandIn:
        """Bind a free port and serve in a daemon thread. Returns self."""
        if self._server is not None:
            raise RuntimeError("HubStandIn is already started")
        self._server = _Server((self.host, 0), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-standin", daemon=True
        )
        self._thread.start()
        logger.info("Hub stand-in listening on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop serving, close open keep-alive connections and release the port. Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_open_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        logger.info("Hub stand-in stopped")

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests

    def files(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> dict[str, bytes]:
        """A copy of {path -> bytes} of ``repo_id`` at ``revision`` (branch, ``refs/pr/N`` or commit oid).

        Raises KeyError if the repo or the revision does not exist.
        """
        with self._lock:
            repo = self.repos[repo_id]
            resolved = repo.resolve(revision)
            if resolved is None:
                raise KeyError(f"{repo_id} has no revision {revision!r}")
            return dict(resolved[1])

    def seed(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        private: bool = False,
        revision: str = DEFAULT_BRANCH,
        message: str = "Seed files",
    ) -> str:
        """Put ``files`` in ``repo_id`` at branch ``revision`` without going through HTTP; returns the commit oid.

        Creates the repo (with its initial commit) and the branch (from ``main``) when missing.
        """
        with self._lock:
            repo = self.repos.get(repo_id) or self._create_repo(repo_id, private=private, author=self.user)
            if revision not in repo.branches:
                repo.branches[revision] = repo.branches[DEFAULT_BRANCH]
                repo.heads[revision] = repo.heads[DEFAULT_BRANCH]
            new_files = dict(repo.branches[revision])
            new_files.update({path: bytes(content) for path, content in files.items()})
            commit = self._record_commit(
                repo, revision, new_files, message=message, description="", added=list(files), deleted=[],
                author=self.user,
            )
            return commit["oid"]

    # ------------------------------------------------------------------ request handling

    def _handle(self, request: _Request) -> _Response:
        """Entry point of every request (called from the server threads)."""
        with self._lock:
            self.calls.append((request.method, request.raw_path))
            try:
                response = self._route(request)
            except _HubError as err:
                response = err.response()
            except Exception as err:  # a bug in the stand-in: answer 500 and keep serving
                logger.exception("Hub stand-in failed on %s %s", request.method, request.raw_path)
                response = _HubError(500, f"Hub stand-in internal error: {err!r}").response()
            self.history.append((request.method, request.raw_path, response.status))
            if response.status >= 400:
                logger.info("%s %s -> %d", request.method, request.raw_path, response.status)
            return response

    def _route(self, req: _Request) -> _Response:
        segs, method = req.segments, req.method
        if segs[:1] == ["api"]:
            tail = segs[1:]
            if tail == ["whoami-v2"] and method == "GET":
                return self._whoami(req)
            if tail == ["repos", "create"] and method == "POST":
                return self._create_repo_route(req)
            if tail == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo_route(req)
            if tail == ["validate-yaml"] and method == "POST":
                return _Response.json(200, {"errors": [], "warnings": []})
            if len(tail) >= 2 and tail[0] in ("datasets", "spaces", "kernels"):
                raise _HubError(400, f"The Hub stand-in only serves model repos, not {tail[0]}")
            if len(tail) >= 2 and tail[0] == "models":
                repo_id, rest = self._split_repo_id(tail[1:])
                return self._repo_api(req, repo_id, rest)
        else:
            for n in (1, 2):  # /{repo_id}/resolve/{rev}/{path...} with a one- or two-segment repo id
                if len(segs) >= n + 3 and segs[n] == "resolve" and method in ("GET", "HEAD"):
                    if segs[0] in ("datasets", "spaces", "kernels"):
                        raise _HubError(400, f"The Hub stand-in only serves model repos, not {segs[0]}")
                    return self._resolve(req, "/".join(segs[:n]), segs[n + 1], "/".join(segs[n + 2 :]))
        raise _HubError(501, f"The Hub stand-in does not implement {method} {req.raw_path}")

    def _repo_api(self, req: _Request, repo_id: str, rest: list[str]) -> _Response:
        method = req.method
        action = rest[0] if rest else None
        if method == "GET" and action is None:
            return self._repo_info(req, repo_id, None)
        if method == "GET" and action == "revision" and len(rest) == 2:
            return self._repo_info(req, repo_id, rest[1])
        if method == "GET" and action == "tree" and len(rest) >= 2:
            return self._tree(req, repo_id, rest[1], "/".join(rest[2:]))
        if method == "POST" and action == "paths-info" and len(rest) == 2:
            return self._paths_info(req, repo_id, rest[1])
        if method == "GET" and action == "refs" and len(rest) == 1:
            return self._refs(req, repo_id)
        if method == "GET" and action == "commits" and len(rest) == 2:
            return self._list_commits(req, repo_id, rest[1])
        if method in ("POST", "DELETE") and action == "branch" and len(rest) == 2:
            return self._branch(req, repo_id, rest[1])
        if method == "POST" and action == "preupload" and len(rest) == 2:
            return self._preupload(req, repo_id, rest[1])
        if method == "POST" and action == "commit" and len(rest) == 2:
            return self._commit(req, repo_id, rest[1])
        if method == "POST" and action == "discussions" and len(rest) == 1:
            return self._create_discussion(req, repo_id)
        if method == "GET" and action == "discussions" and len(rest) == 2:
            return self._get_discussion(req, repo_id, rest[1])
        raise _HubError(501, f"The Hub stand-in does not implement {method} {req.raw_path}")

    def _split_repo_id(self, rest: list[str]) -> tuple[str, list[str]]:
        """Split ``[namespace, name, action...]`` or ``[name, action...]`` into (repo id, remaining segments)."""
        if len(rest) >= 2 and f"{rest[0]}/{rest[1]}" in self.repos:
            n = 2
        elif rest[0] in self.repos:
            n = 1
        else:
            n = 2 if len(rest) >= 2 and rest[1] not in _REPO_ACTIONS else 1
        return "/".join(rest[:n]), rest[n:]

    # ------------------------------------------------------------------ auth

    def _user(self, req: _Request) -> str | None:
        """The user behind the request's token, None without a token; 401 for an unknown token."""
        header = req.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or token not in self.tokens:
            raise _HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def _require_user(self, req: _Request) -> str:
        user = self._user(req)
        if user is None:
            raise _HubError(
                401, "Authentication required: send 'Authorization: Bearer <token>' with a valid access token"
            )
        return user

    def _repo(self, req: _Request, repo_id: str, *, write: bool = False) -> tuple[RepoState, str | None]:
        """The repo and the user, with the Hub's answers for missing, private and unauthenticated cases."""
        user = self._user(req)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise _HubError(404 if user else 401, "Repository not found", code="RepoNotFound")
        if write and user is None:
            user = self._require_user(req)  # raises the 401
        return repo, user

    @staticmethod
    def _revision(repo: RepoState, revision: str) -> tuple[str, dict[str, bytes]]:
        resolved = repo.resolve(revision)
        if resolved is None:
            raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return resolved

    @staticmethod
    def _branch_files(repo: RepoState, revision: str) -> dict[str, bytes]:
        """Files of a branch one can commit to; 404 RevisionNotFound if it does not exist, 400 for a commit oid."""
        if revision in repo.branches:
            return repo.branches[revision]
        if repo.resolve(revision) is not None:
            raise _HubError(400, f"Can only commit to a branch, not to commit {revision}")
        raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    # ------------------------------------------------------------------ state changes

    def _next_id(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("\0".join((*parts, str(self._counter))).encode()).hexdigest()

    def _create_repo(self, repo_id: str, *, private: bool, author: str) -> RepoState:
        repo = RepoState(repo_id=repo_id, private=private)
        self.repos[repo_id] = repo
        self._record_commit(
            repo, DEFAULT_BRANCH, {".gitattributes": DEFAULT_GITATTRIBUTES}, message="initial commit",
            description="", added=[".gitattributes"], deleted=[], author=author, parent=None,
        )
        logger.info("Created %s repo %s", "private" if private else "public", repo_id)
        return repo

    def _record_commit(
        self,
        repo: RepoState,
        branch: str,
        new_files: dict[str, bytes],
        *,
        message: str,
        description: str,
        added: list[str],
        deleted: list[str],
        author: str,
        parent: str | None | bool = True,
    ) -> dict[str, Any]:
        """Make ``new_files`` the content of ``branch`` through a new commit (parent: the branch head)."""
        parent_oid = repo.heads.get(branch) if parent is True else parent
        blobs = "".join(f"{path}:{git_blob_sha1(data)}\n" for path, data in sorted(new_files.items()))
        oid = self._next_id(repo.repo_id, branch, str(parent_oid), message, blobs)
        commit = {
            "oid": oid,
            "parent": parent_oid,
            "revision": branch,
            "message": message,
            "description": description,
            "added": added,
            "deleted": deleted,
            "author": author,
            "date": _now_iso(),
        }
        repo.commits.append(commit)
        repo.branches[branch] = new_files
        repo.heads[branch] = oid
        repo.snapshots[oid] = new_files
        repo.last_modified = commit["date"]
        logger.info("Commit %s on %s@%s: +%d -%d (%s)", oid[:8], repo.repo_id, branch, len(added), len(deleted), message)
        return commit

    def _open_discussion(
        self, repo: RepoState, *, title: str, description: str, pull_request: bool, base: str, author: str
    ) -> dict[str, Any]:
        num = max(repo.discussions, default=0) + 1
        discussion = {
            "num": num,
            "title": title,
            "description": description,
            "is_pull_request": pull_request,
            "base": base,
            "status": "draft" if pull_request else "open",
            "author": author,
            "created_at": _now_iso(),
        }
        repo.discussions[num] = discussion
        if pull_request:  # the PR's branch starts at the head of its base branch
            ref = f"refs/pr/{num}"
            repo.branches[ref] = repo.branches[base]
            repo.heads[ref] = repo.heads[base]
        return discussion

    # ------------------------------------------------------------------ endpoints

    def _whoami(self, req: _Request) -> _Response:
        user = self._require_user(req)
        # Fields read by huggingface_hub / transformers: name, type, orgs, auth.accessToken.role.
        return _Response.json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "hub-standin", "role": "write"}},
            },
        )

    def _create_repo_route(self, req: _Request) -> _Response:
        # Request: {"name": str, "organization": str | None, "visibility"?: "public" | "private", "type"?: str,
        #           "private"?: bool (older clients)}
        # Answer:  {"url": "<endpoint>/<repo_id>", "name": repo_id, "id": str}; 409 with the same "url" if it exists.
        user = self._require_user(req)
        payload = req.json_body()
        repo_type = payload.get("type") or "model"
        if repo_type != "model":
            raise _HubError(400, f"The Hub stand-in only serves model repos, not {repo_type!r}")
        name, namespace = payload.get("name"), payload.get("organization") or user
        if not (_valid_name(name) and _valid_name(namespace)):
            raise _HubError(400, f"Invalid repo name: {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            raise _HubError(409, "You already created this model repo", extra={"url": url})
        visibility = payload.get("visibility")
        if visibility not in (None, "public", "private"):
            raise _HubError(400, f"Invalid visibility for a model repo: {visibility!r}")
        private = visibility == "private" or (visibility is None and bool(payload.get("private")))
        self._create_repo(repo_id, private=private, author=user)
        return _Response.json(200, {"url": url, "name": repo_id, "id": self._next_id(repo_id)[:24]})

    def _delete_repo_route(self, req: _Request) -> _Response:
        # Request: {"name": str, "organization": str | None, "type"?: str}
        user = self._require_user(req)
        payload = req.json_body()
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        if repo_id not in self.repos:
            raise _HubError(404, "Repository not found", code="RepoNotFound")
        del self.repos[repo_id]
        logger.info("Deleted repo %s", repo_id)
        return _Response(200)

    def _repo_info(self, req: _Request, repo_id: str, revision: str | None) -> _Response:
        # Answer: the fields ModelInfo(**data) reads; "siblings" lists the files (with size and blobId when
        # ?blobs=true, i.e. files_metadata=True).
        repo, _ = self._repo(req, repo_id)
        oid, files = self._revision(repo, revision or DEFAULT_BRANCH)
        with_blobs = req.flag("blobs")
        siblings = []
        for path in sorted(files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(files[path]), blobId=git_blob_sha1(files[path]))
            siblings.append(sibling)
        namespace = repo_id.split("/")[0] if "/" in repo_id else None
        return _Response.json(
            200,
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": namespace,
                "sha": oid,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": repo.created_at,
                "lastModified": repo.last_modified,
                "siblings": siblings,
                "usedStorage": sum(len(data) for data in files.values()),
            },
        )

    @staticmethod
    def _entry(path: str, files: dict[str, bytes]) -> dict[str, Any] | None:
        """A tree / paths-info entry: {"type": "file", "oid", "size", "path"} or {"type": "directory", ...}."""
        if path in files:
            return {"type": "file", "oid": git_blob_sha1(files[path]), "size": len(files[path]), "path": path}
        prefix = path + "/"
        children = sorted(p for p in files if p.startswith(prefix))
        if not children:
            return None
        listing = "".join(f"{p}:{git_blob_sha1(files[p])}\n" for p in children)
        return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}

    def _tree(self, req: _Request, repo_id: str, revision: str, path: str) -> _Response:
        # Answer: one page (no Link header) of entries under `path`, direct children only unless ?recursive=true.
        repo, _ = self._repo(req, repo_id)
        _, files = self._revision(repo, revision)
        path = path.strip("/")
        if path and path in files:
            raise _HubError(404, f"{path} is a file, not a folder", code="EntryNotFound")
        prefix = f"{path}/" if path else ""
        recursive = req.flag("recursive")
        names: set[str] = set()
        for file_path in files:
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, depth + 1):
                names.add(prefix + "/".join(parts[:i]))
        if path and not names:
            raise _HubError(404, f"Entry not found: {path}", code="EntryNotFound")
        entries = [self._entry(name, files) for name in sorted(names)]
        return _Response.json(200, entries)

    def _paths_info(self, req: _Request, repo_id: str, revision: str) -> _Response:
        # Request: form-encoded "paths=a&paths=b&expand=False". Answer: entries of the paths that exist.
        repo, _ = self._repo(req, repo_id)
        _, files = self._revision(repo, revision)
        form = parse_qs(req.body.decode(), keep_blank_values=True)
        entries = [self._entry(p.strip("/"), files) for p in form.get("paths", [])]
        return _Response.json(200, [entry for entry in entries if entry is not None])

    def _refs(self, req: _Request, repo_id: str) -> _Response:
        # Answer: {"branches": [{"name", "ref", "targetCommit"}], "converts": [], "tags": [], "pullRequests": [...]}
        repo, _ = self._repo(req, repo_id)
        branches, pulls = [], []
        for name in sorted(repo.branches):
            match = _PR_REF_RE.match(name)
            if match:
                pulls.append({"name": match.group(1), "ref": name, "targetCommit": repo.heads[name]})
            else:
                branches.append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": repo.heads[name]})
        return _Response.json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": pulls})

    def _list_commits(self, req: _Request, repo_id: str, revision: str) -> _Response:
        # Answer: newest first, [{"id", "title", "message", "authors": [{"user"}], "date"}], one page.
        repo, _ = self._repo(req, repo_id)
        oid: str | None = self._revision(repo, revision)[0]
        by_oid = {commit["oid"]: commit for commit in repo.commits}
        items = []
        while oid is not None:
            commit = by_oid[oid]
            items.append(
                {
                    "id": oid,
                    "title": commit["message"],
                    "message": commit["description"],
                    "authors": [{"user": commit["author"]}],
                    "date": commit["date"],
                }
            )
            oid = commit["parent"]
        return _Response.json(200, items)

    def _branch(self, req: _Request, repo_id: str, branch: str) -> _Response:
        # POST request: {"startingPoint"?: branch or commit oid}; 409 if the branch exists.
        repo, user = self._repo(req, repo_id, write=True)
        if req.method == "DELETE":
            if branch == DEFAULT_BRANCH:
                raise _HubError(403, f"Cannot delete the default branch {branch}")
            if branch not in repo.branches:
                raise _HubError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            del repo.branches[branch], repo.heads[branch]
            return _Response(200)
        if branch.startswith("refs/") or not _valid_name(branch.replace("/", "_")):
            raise _HubError(400, f"Invalid reference for a branch: {branch}")
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = req.json_body().get("startingPoint") or DEFAULT_BRANCH
        oid, files = self._revision(repo, start)
        repo.branches[branch] = files
        repo.heads[branch] = oid
        logger.info("Created branch %s of %s at %s", branch, repo_id, oid[:8])
        return _Response(200)

    def _preupload(self, req: _Request, repo_id: str, revision: str) -> _Response:
        # Request: {"files": [{"path", "sample": base64 of the first 512 bytes, "size"}], "gitIgnore"?: str};
        #          ?create_pr=1 when the commit will open a PR against `revision`.
        # Answer:  {"files": [{"path", "uploadMode": "regular", "shouldIgnore": false, "oid": git blob sha1 of the
        #          file now at that path or null}]}. The client skips a file whose local sha1 equals "oid".
        repo, _ = self._repo(req, repo_id, write=True)
        files = self._branch_files(repo, revision)
        entries = req.json_body().get("files")
        if not isinstance(entries, list):
            raise _HubError(400, "Expected a 'files' list")
        answer = []
        for entry in entries:
            path = entry.get("path") if isinstance(entry, dict) else None
            if not _valid_path_in_repo(path):
                raise _HubError(400, f"Invalid path in repo: {path!r}")
            oid = git_blob_sha1(files[path]) if path in files else None
            answer.append({"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return _Response.json(200, {"files": answer})

    def _commit(self, req: _Request, repo_id: str, revision: str) -> _Response:
        # Request (application/x-ndjson, one JSON object per line, in this order):
        #   {"key": "header", "value": {"summary": str, "description": str, "parentCommit"?: oid}}
        #   {"key": "file", "value": {"path": str, "content": base64 str, "encoding": "base64"}}
        #   {"key": "deletedFile", "value": {"path": str}}
        #   {"key": "deletedFolder", "value": {"path": str}}
        #   {"key": "lfsFile", ...}  -> 400 here: the preupload answer never asks for LFS
        # ?create_pr=1 opens a pull request against `revision` and commits on its branch refs/pr/<num>.
        # Answer: {"success": true, "commitOid": oid, "commitUrl": "<endpoint>/<repo_id>/commit/<oid>",
        #          "hookOutput": "", "pullRequestUrl": "<endpoint>/<repo_id>/discussions/<num>" or null}
        repo, user = self._repo(req, repo_id, write=True)
        assert user is not None
        base_files = self._branch_files(repo, revision)
        if self.fail_commit:
            status = 500 if isinstance(self.fail_commit, bool) else int(self.fail_commit)
            raise _HubError(status, f"Commit refused by the Hub stand-in (fail_commit={self.fail_commit!r})")

        lines = [line for line in req.body.splitlines() if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except ValueError as err:
            raise _HubError(400, f"Commit body is not valid NDJSON: {err}") from err
        if not items or not isinstance(items[0], dict) or items[0].get("key") != "header":
            raise _HubError(400, "The first line of a commit must be its header")
        header = items[0].get("value") or {}
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise _HubError(400, "The commit summary must not be empty")
        parent = header.get("parentCommit")
        if parent is not None and not repo.heads[revision].startswith(str(parent)):
            raise _HubError(412, f"A commit has happened since {parent}. Please refresh and try again.")

        new_files = dict(base_files)
        added: list[str] = []
        deleted: list[str] = []
        for item in items[1:]:
            key = item.get("key") if isinstance(item, dict) else None
            value = item.get("value") if isinstance(item, dict) else None
            path = value.get("path") if isinstance(value, dict) else None
            if key == "file":
                if not _valid_path_in_repo(path):
                    raise _HubError(400, f"Invalid path in repo: {path!r}")
                new_files[path] = self._decode_content(value)
                added.append(path)
            elif key == "deletedFile":
                if path not in new_files:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del new_files[path]
                deleted.append(path)
            elif key == "deletedFolder":
                prefix = str(path).strip("/") + "/"
                inside = [p for p in new_files if p.startswith(prefix)]
                if not inside:
                    raise _HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                for p in inside:
                    del new_files[p]
                deleted.extend(inside)
            elif key == "lfsFile":
                raise _HubError(400, f"LFS files are not supported by the Hub stand-in: {path}")
            else:
                raise _HubError(400, f"Unknown commit operation: {key!r}")

        target, pr_url = revision, None
        if req.flag("create_pr"):
            pr = self._open_discussion(
                repo, title=summary, description=header.get("description") or "", pull_request=True,
                base=revision, author=user,
            )
            target = f"refs/pr/{pr['num']}"
            pr_url = f"{self.url}/{repo_id}/discussions/{pr['num']}"
        commit = self._record_commit(
            repo, target, new_files, message=summary, description=header.get("description") or "",
            added=added, deleted=deleted, author=user,
        )
        return _Response.json(
            200,
            {
                "success": True,
                "commitOid": commit["oid"],
                "commitUrl": f"{self.url}/{repo_id}/commit/{commit['oid']}",
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            },
        )

    @staticmethod
    def _decode_content(value: dict[str, Any]) -> bytes:
        content, encoding = value.get("content", ""), value.get("encoding", "base64")
        if not isinstance(content, str):
            raise _HubError(400, "File content must be a string")
        if encoding == "base64":
            try:
                return base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as err:
                raise _HubError(400, f"Invalid base64 content for {value.get('path')}: {err}") from err
        if encoding in ("utf-8", "utf8"):
            return content.encode()
        raise _HubError(400, f"Unknown content encoding: {encoding!r}")

    def _create_discussion(self, req: _Request, repo_id: str) -> _Response:
        # Request: {"title": str, "description": str, "pullRequest": bool}. Answer: {"num": int, "url": str, ...}.
        repo, user = self._repo(req, repo_id, write=True)
        assert user is not None
        payload = req.json_body()
        title = str(payload.get("title") or "").strip()
        if not title:
            raise _HubError(400, "A discussion needs a title")
        discussion = self._open_discussion(
            repo, title=title, description=str(payload.get("description") or ""),
            pull_request=bool(payload.get("pullRequest")), base=DEFAULT_BRANCH, author=user,
        )
        num = discussion["num"]
        return _Response.json(
            200,
            {"num": num, "url": f"{self.url}/{repo_id}/discussions/{num}", "pullRequest": discussion["is_pull_request"]},
        )

    def _get_discussion(self, req: _Request, repo_id: str, num_text: str) -> _Response:
        # Answer: the fields get_discussion_details reads (events are not tracked: always []).
        repo, _ = self._repo(req, repo_id)
        discussion = repo.discussions.get(int(num_text)) if num_text.isdigit() else None
        if discussion is None:
            raise _HubError(404, f"Discussion not found: {num_text}")
        num = discussion["num"]
        ref = f"refs/pr/{num}"
        return _Response.json(
            200,
            {
                "num": num,
                "title": discussion["title"],
                "status": discussion["status"],
                "isPullRequest": discussion["is_pull_request"],
                "createdAt": discussion["created_at"],
                "author": {"name": discussion["author"]},
                "repo": {"name": repo_id, "type": "model"},
                "events": [],
                "changes": {"base": f"refs/heads/{discussion['base']}", "headCommitId": repo.heads.get(ref)},
                "filesWithConflicts": [],
                "diff": "",
            },
        )

    def _resolve(self, req: _Request, repo_id: str, revision: str, path: str) -> _Response:
        # Headers the client needs: X-Repo-Commit (the resolved commit oid, also on a 404 EntryNotFound so the client
        # can cache the absence), ETag (quoted git blob sha1) and Content-Length (the file size, also on HEAD).
        repo, _ = self._repo(req, repo_id)
        oid, files = self._revision(repo, revision)
        if path not in files:
            raise _HubError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": oid})
        data = files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(data)}"',
            "X-Repo-Commit": oid,
            "Accept-Ranges": "bytes",
        }
        range_header = req.headers.get("Range")
        if req.method == "GET" and range_header:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if match is None or match.groups() == ("", ""):
                raise _HubError(416, f"Unsupported range: {range_header}")
            first, last = match.groups()
            if first == "":  # suffix range: the last N bytes
                start, end = max(len(data) - int(last), 0), len(data) - 1
            else:
                start, end = int(first), min(int(last), len(data) - 1) if last else len(data) - 1
            if start >= len(data) or start > end:
                raise _HubError(416, f"Range not satisfiable: {range_header}", headers={
                    "Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return _Response(206, data[start : end + 1], headers)
        return _Response(200, data, headers)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its stand-in and its open connections (to close them on stop)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], standin: HubStandIn):
        self.standin = standin
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket, is_open: bool) -> None:
        with self._connections_lock:
            (self._connections.add if is_open else self._connections.discard)(connection)

    def close_open_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    """Reads one request (body included), lets the stand-in answer it, writes the answer (HTTP/1.1 keep-alive)."""

    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "HubStandIn/1.0"
    timeout = 60  # seconds an idle keep-alive connection is kept open

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - " + format, self.address_string(), *args)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers, up to the empty line
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self, method: str) -> None:
        body = self._read_body()
        split = urlsplit(self.path)
        request = _Request(
            method=method,
            raw_path=split.path,
            segments=[unquote(segment) for segment in split.path.strip("/").split("/")],
            query=parse_qs(split.query, keep_blank_values=True),
            headers=self.headers,
            body=body,
        )
        response = self.server.standin._handle(request)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)


def loopback_only_client():
    """huggingface_hub's default HTTP client, plus a hook that refuses any host but the local stand-in."""
    import httpx2
    from huggingface_hub.utils import _http as hf_http

    client = hf_http.default_client_factory()

    def refuse_remote(request: httpx2.Request) -> None:
        if request.url.host not in ("127.0.0.1", "localhost"):
            raise RuntimeError(f"test tried to reach a remote host: {request.url}")

    client.event_hooks = {**client.event_hooks, "request": [refuse_remote, *client.event_hooks["request"]]}
    return client


def local_only(monkeypatch):
    """Generator for an autouse fixture: the huggingface_hub client may only reach 127.0.0.1 (a CI-wide
    HF_HUB_OFFLINE=1 must not block the local stand-in; telemetry stays off)."""
    from huggingface_hub import close_session, constants, set_client_factory
    from huggingface_hub.utils import _http as hf_http

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    set_client_factory(loopback_only_client)
    yield
    set_client_factory(hf_http.default_client_factory)
    close_session()
