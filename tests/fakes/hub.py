"""A fake of the part of ``huggingface_hub.HfApi`` that ``hf_pruning.publish.hub`` uses, holding repos in memory.

Like huggingface_hub's own tests, which patch ``HfApi`` methods, this replaces the client and not the wire:
``FakeHub.install(monkeypatch)`` puts ``FakeHub.api`` where ``huggingface_hub.HfApi`` was, so a push runs the
real hf_pruning code against ``create_repo``, ``create_branch``, ``file_exists``, ``hf_hub_download`` and
``upload_folder`` that keep branches, files and commits in dicts. Errors are huggingface_hub's own
``HfHubHTTPError`` with the status the Hub would send. ``ignore_patterns``/``allow_patterns`` are matched by
huggingface_hub's ``filter_repo_objects``, as the real ``upload_folder`` does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
from huggingface_hub import CommitInfo
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects


def http_error(status: int, message: str) -> HfHubHTTPError:
    """The error huggingface_hub raises for an HTTP ``status`` answer."""
    try:
        import httpx2 as httpx  # the HTTP client of huggingface_hub >= 2
    except ImportError:  # pragma: no cover - huggingface_hub 1.x
        import httpx
    response = httpx.Response(status, request=httpx.Request("POST", FakeHub.url))
    return HfHubHTTPError(f"{status} {message}", response=response)


@dataclass
class FakeRepo:
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)  # {"oid", "message", "revision", "files"}, oldest first


class FakeHub:
    """The Hub's state: ``repos`` by id, the ``calls`` made (method name, repo id) and the clients' ``endpoints``.

    Only ``tokens`` are accepted; ``fail_commit = <status>`` makes the next commits fail with that status.
    """

    url = "https://hub.fake"

    def __init__(self, tokens=("hf_test_token",)):
        self.tokens, self.repos, self.calls, self.endpoints = set(tokens), {}, [], set()
        self.fail_commit: int | None = None

    def install(self, monkeypatch) -> FakeHub:
        monkeypatch.setattr(huggingface_hub, "HfApi", self.api)
        return self

    def api(self, endpoint: str | None = None, token: str | None = None, **_) -> FakeHfApi:
        self.endpoints.add(endpoint)
        return FakeHfApi(self, token)

    def seed(self, repo_id: str, files: dict[str, bytes], revision: str = "main") -> None:
        """Put ``files`` in a repository (created when missing) without a push, as if someone had uploaded them."""
        self.repos.setdefault(repo_id, FakeRepo()).branches.setdefault(revision, {}).update(files)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos.get(repo_id)
        return dict(repo.branches.get(revision, {})) if repo else {}


class FakeHfApi:
    """One client (``HfApi(endpoint=..., token=...)``) of a :class:`FakeHub`."""

    def __init__(self, hub: FakeHub, token: str | None):
        self.hub, self.token = hub, token

    def _repo(self, method: str, repo_id: str, revision: str | None = None) -> FakeRepo:
        self.hub.calls.append((method, repo_id))
        if self.token not in self.hub.tokens:
            raise http_error(401, "Unauthorized: invalid credentials in Authorization header")
        repo = self.hub.repos.get(repo_id)
        if repo is None and method != "create_repo":
            raise http_error(404, f"Repository Not Found for url: {self.hub.url}/{repo_id}")
        if repo is not None and revision is not None and revision not in repo.branches:
            raise http_error(404, f"Revision Not Found: {revision}")
        return repo

    def create_repo(self, repo_id: str, *, private: bool | None = None, exist_ok: bool = False, **_):
        if self._repo("create_repo", repo_id) is not None:
            if not exist_ok:
                raise http_error(409, f"Conflict: you already created this model repo: {repo_id}")
            return
        self.hub.repos[repo_id] = FakeRepo(private=bool(private))

    def create_branch(self, repo_id: str, *, branch: str, revision: str | None = None, exist_ok: bool = False, **_):
        repo = self._repo("create_branch", repo_id, revision)
        if branch in repo.branches and not exist_ok:
            raise http_error(409, f"Conflict: reference already exists: {branch}")
        repo.branches.setdefault(branch, dict(repo.branches[revision or "main"]))

    def file_exists(self, repo_id: str, filename: str, *, revision: str | None = None, **_) -> bool:
        return filename in self._repo("file_exists", repo_id, revision).branches[revision or "main"]

    def hf_hub_download(self, repo_id: str, filename: str, *, revision: str | None = None, cache_dir=None, **_) -> str:
        files = self._repo("hf_hub_download", repo_id, revision).branches[revision or "main"]
        if filename not in files:
            raise http_error(404, f"Entry Not Found: {filename}")
        path = Path(cache_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[filename])
        return str(path)

    def upload_folder(self, *, repo_id: str, folder_path, revision: str | None = None, commit_message: str = "",
                      create_pr: bool | None = None, allow_patterns=None, ignore_patterns=None, **_) -> CommitInfo:
        repo = self._repo("upload_folder", repo_id, revision)
        if self.hub.fail_commit is not None:
            raise http_error(self.hub.fail_commit, "the commit was refused")
        root = Path(folder_path)
        names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        files = {n: (root / n).read_bytes() for n in filter_repo_objects(names, allow_patterns=allow_patterns,
                                                                           ignore_patterns=ignore_patterns)}
        oid = hashlib.sha1(repr((repo_id, len(repo.commits), sorted(files))).encode()).hexdigest()
        branch = revision or "main"
        if create_pr:
            branch = f"refs/pr/{sum(b.startswith('refs/pr/') for b in repo.branches) + 1}"
            repo.branches[branch] = dict(repo.branches[revision or "main"])
        repo.branches[branch].update(files)
        repo.commits.append({"oid": oid, "message": commit_message, "revision": branch, "files": sorted(files)})
        pr_url = f"{self.hub.url}/{repo_id}/discussions/{branch.rpartition('/')[2]}" if create_pr else None
        return CommitInfo(commit_url=f"{self.hub.url}/{repo_id}/commit/{oid}", commit_message=commit_message,
                          commit_description="", oid=oid, pr_url=pr_url, _endpoint=self.hub.url)
