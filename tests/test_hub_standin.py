"""The local Hub stand-in (tests/hub_standin.py), driven through the real huggingface_hub client.

Everything runs against 127.0.0.1: every test installs an HTTP client that refuses any other host, so a call that
would reach huggingface.co fails the test instead of going out.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import httpx2  # noqa: E402 (after the environment is set)
import pytest  # noqa: E402
from hub_standin import DEFAULT_GITATTRIBUTES, HubStandIn, git_blob_sha1  # noqa: E402
from huggingface_hub import (  # noqa: E402
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
)
from huggingface_hub.errors import (  # noqa: E402
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    RevisionNotFoundError,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("local_hub_client")]

TOKEN = "hf_test_token"
REPO = "test-user/tiny-pruned"

# Several small files: text, JSON, a binary one (every byte value, NULs included) and nested paths.
FOLDER_FILES = {
    "config.json": b'{"model_type": "llama", "num_hidden_layers": 4}\n',
    "README.md": b"# tiny pruned\n\nNo metadata.\n",
    "model.safetensors": bytes(range(256)) * 3 + b"\x00\xff\x00",
    "plans/pruning_plan.json": b'{"ops": []}',
    "plans/deep/notes.txt": "h\u00e9llo \u2713\n".encode(),
}


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token=TOKEN)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "folder"
    for name, data in FOLDER_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _without_gitattributes(files: dict[str, bytes]) -> dict[str, bytes]:
    return {path: data for path, data in files.items() if path != ".gitattributes"}


def test_create_private_repo_info_and_exist_ok(hub, api):
    url = api.create_repo("tiny-pruned", private=True)  # no namespace: the token's user
    assert url.repo_id == REPO and url.startswith(hub.url)
    repo = hub.repos[REPO]
    assert repo.private is True
    assert hub.files(REPO) == {".gitattributes": DEFAULT_GITATTRIBUTES}  # the Hub's initial commit
    assert [c["message"] for c in repo.commits] == ["initial commit"]

    info = api.model_info(REPO)
    assert info.id == REPO and info.private is True and info.sha == repo.heads["main"]
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert api.repo_exists(REPO)
    assert not api.repo_exists("test-user/does-not-exist")
    # private: without a token the Hub answers 401 RepoNotFound, the client says "does not exist"
    assert not HfApi(endpoint=hub.url, token=False).repo_exists(REPO)

    again = api.create_repo(REPO, private=True, exist_ok=True)
    assert again.repo_id == REPO and len(hub.repos) == 1
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409


def test_upload_folder_to_main_and_a_new_branch(hub, api, folder):
    api.create_repo(REPO, private=True)
    info = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="Add pruned model")
    main = hub.files(REPO)
    assert _without_gitattributes(main) == FOLDER_FILES  # byte for byte, binary and nested paths included
    commit = hub.repos[REPO].commits[-1]
    assert info.oid == commit["oid"] == hub.repos[REPO].heads["main"]
    assert commit["revision"] == "main" and commit["message"] == "Add pruned model"
    assert sorted(commit["added"]) == sorted(FOLDER_FILES) and commit["deleted"] == []
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *FOLDER_FILES])
    # the preupload answer asked for regular uploads: contents arrived inline, nothing went to LFS or Xet
    assert [p for m, p in hub.calls if m == "POST"] == [
        "/api/repos/create",
        "/api/validate-yaml",  # the client checks README.md metadata first
        f"/api/models/{REPO}/preupload/main",
        f"/api/models/{REPO}/commit/main",
    ]

    api.create_branch(REPO, branch="pruned-50")
    api.create_branch(REPO, branch="pruned-50", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(REPO, branch="pruned-50")
    assert err.value.response.status_code == 409

    (folder / "config.json").write_bytes(b'{"model_type": "llama", "num_hidden_layers": 2}\n')
    (folder / "plans" / "deep" / "extra.bin").write_bytes(b"\x01\x02\x03")
    api.upload_folder(
        folder_path=folder, repo_id=REPO, revision="pruned-50", commit_message="50% pruned",
        delete_patterns=["plans/pruning_plan.json"], ignore_patterns=["plans/pruning_plan.json"],
    )
    branch = _without_gitattributes(hub.files(REPO, revision="pruned-50"))
    expected = {**FOLDER_FILES, "config.json": (folder / "config.json").read_bytes(), "plans/deep/extra.bin": b"\x01\x02\x03"}
    del expected["plans/pruning_plan.json"]
    assert branch == expected
    assert hub.files(REPO) == main  # main untouched
    commit = hub.repos[REPO].commits[-1]
    assert commit["revision"] == "pruned-50" and commit["deleted"] == ["plans/pruning_plan.json"]
    # unchanged files are skipped by the client (the preupload answer gives their git blob ids)
    assert sorted(commit["added"]) == ["config.json", "plans/deep/extra.bin"]
    assert {ref.name for ref in api.list_repo_refs(REPO).branches} == {"main", "pruned-50"}


def test_unchanged_upload_makes_no_commit(hub, api, folder):
    api.create_repo(REPO)
    api.upload_folder(folder_path=folder, repo_id=REPO)
    commits = len(hub.repos[REPO].commits)
    info = api.upload_folder(folder_path=folder, repo_id=REPO)
    assert len(hub.repos[REPO].commits) == commits
    assert info.oid == hub.repos[REPO].heads["main"]


def test_file_exists_and_download_return_the_same_bytes(hub, api, folder, tmp_path):
    api.create_repo(REPO, private=True)
    api.upload_folder(folder_path=folder, repo_id=REPO)
    api.create_branch(REPO, branch="other")
    api.upload_file(path_or_fileobj=b"branch only", path_in_repo="only/here.txt", repo_id=REPO, revision="other")

    assert api.file_exists(REPO, "model.safetensors")
    assert api.file_exists(REPO, "plans/deep/notes.txt")
    assert not api.file_exists(REPO, "missing.bin")
    assert not api.file_exists(REPO, "only/here.txt")
    assert api.file_exists(REPO, "only/here.txt", revision="other")
    assert not api.file_exists(REPO, "config.json", revision="no-such-branch")
    assert not HfApi(endpoint=hub.url, token=False).file_exists(REPO, "config.json")  # private

    cache = tmp_path / "cache"
    for name, data in FOLDER_FILES.items():
        path = api.hf_hub_download(REPO, name, cache_dir=cache)
        with open(path, "rb") as f:
            assert f.read() == data, name
    # the module-level function with an explicit endpoint, at a branch
    path = hf_hub_download(REPO, "only/here.txt", revision="other", cache_dir=cache, endpoint=hub.url, token=TOKEN)
    with open(path, "rb") as f:
        assert f.read() == b"branch only"
    # and at a commit sha (what the client caches the branch as)
    sha = hub.repos[REPO].heads["main"]
    path = api.hf_hub_download(REPO, "model.safetensors", revision=sha, cache_dir=tmp_path / "other-cache")
    with open(path, "rb") as f:
        assert f.read() == FOLDER_FILES["model.safetensors"]

    with pytest.raises(EntryNotFoundError):
        api.hf_hub_download(REPO, "missing.bin", cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        api.hf_hub_download(REPO, "config.json", revision="no-such-branch", cache_dir=cache)


def test_create_commit_adds_and_deletes(hub, api):
    hub.seed(REPO, {"a.txt": b"a", "dir/b.txt": b"b", "dir/c.txt": b"c"})
    api.create_commit(
        REPO,
        operations=[
            CommitOperationAdd(path_in_repo="new.bin", path_or_fileobj=b"\x00new"),
            CommitOperationDelete(path_in_repo="a.txt"),
            CommitOperationDelete(path_in_repo="dir/"),
        ],
        commit_message="Shuffle",
        commit_description="longer text",
    )
    assert _without_gitattributes(hub.files(REPO)) == {"new.bin": b"\x00new"}
    commit = hub.repos[REPO].commits[-1]
    assert commit["added"] == ["new.bin"]
    assert sorted(commit["deleted"]) == ["a.txt", "dir/b.txt", "dir/c.txt"]
    assert commit["description"] == "longer text"
    assert [c.title for c in api.list_repo_commits(REPO)] == ["Shuffle", "Seed files", "initial commit"]

    before = len(hub.repos[REPO].commits)
    with pytest.raises(EntryNotFoundError):
        api.delete_file("not-there.txt", repo_id=REPO)
    assert len(hub.repos[REPO].commits) == before


def test_create_pr(hub, api, folder, tmp_path):
    api.create_repo(REPO)
    info = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="p.txt", repo_id=REPO, create_pr=True)
    assert info.pr_num == 1 and info.pr_revision == "refs/pr/1"
    assert hub.files(REPO, revision="refs/pr/1")["p.txt"] == b"proposal"
    assert "p.txt" not in hub.files(REPO)

    info = api.upload_folder(folder_path=folder, repo_id=REPO, create_pr=True)  # explicit PR, then commits to it
    assert info.pr_revision == "refs/pr/2"
    assert _without_gitattributes(hub.files(REPO, revision="refs/pr/2")) == FOLDER_FILES
    assert _without_gitattributes(hub.files(REPO)) == {}
    assert api.get_discussion_details(REPO, 2).is_pull_request
    # a revision with slashes travels URL-quoted as one path segment
    path = api.hf_hub_download(REPO, "p.txt", revision="refs/pr/1", cache_dir=tmp_path / "cache")
    with open(path, "rb") as f:
        assert f.read() == b"proposal"


def test_missing_or_wrong_token_is_rejected(hub, api, tmp_path):
    anonymous = HfApi(endpoint=hub.url, token=False)
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.create_repo(REPO)
    assert err.value.response.status_code == 401
    assert not hub.repos

    api.create_repo(REPO)  # public: anyone may read, only a token may write
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        anonymous.create_branch(REPO, branch="b")
    assert err.value.response.status_code == 401
    assert anonymous.file_exists(REPO, ".gitattributes")

    wrong = HfApi(endpoint=hub.url, token="hf_wrong")
    with pytest.raises(HfHubHTTPError) as err:
        wrong.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert err.value.response.status_code == 401
    assert "Invalid credentials" in str(err.value)
    assert [c["message"] for c in hub.repos[REPO].commits] == ["initial commit"]
    assert set(hub.repos[REPO].branches) == {"main"}


def test_failed_commit_raises_and_records_nothing(hub, api, folder):
    api.create_repo(REPO)
    hub.fail_commit = True  # HTTP 500; create_commit / upload_file do not retry it
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert err.value.response.status_code == 500
    assert [c for c in hub.calls if c[1].endswith("/commit/main")] == [("POST", f"/api/models/{REPO}/commit/main")]

    hub.fail_commit = 422  # upload_folder retries 5xx commits with backoff: fail it with a status it does not retry
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(folder_path=folder, repo_id=REPO)
    assert err.value.response.status_code == 422
    assert [c["message"] for c in hub.repos[REPO].commits] == ["initial commit"]
    assert hub.files(REPO) == {".gitattributes": DEFAULT_GITATTRIBUTES}

    hub.fail_commit = False
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert hub.files(REPO)["x.txt"] == b"x"


def test_invalid_repo_id_is_rejected_before_any_request(hub, api, folder):
    for bad in ("a/b/c", "bad--name", "-leading", "user/double..dot"):
        with pytest.raises(HFValidationError):
            api.create_repo(bad)
        with pytest.raises(HFValidationError):
            api.upload_folder(folder_path=folder, repo_id=bad)
        with pytest.raises(HFValidationError):
            api.hf_hub_download(bad, "config.json")
    assert hub.calls == []


def test_tree_listing_and_blob_ids(hub, api):
    hub.seed(REPO, {"top.txt": b"t", "a/b/c.txt": b"c", "a/d.txt": b"d"})
    top = {entry.path: entry for entry in api.list_repo_tree(REPO)}
    assert set(top) == {".gitattributes", "top.txt", "a"}
    assert top["top.txt"].size == 1 and top["top.txt"].blob_id == git_blob_sha1(b"t")
    assert {e.path for e in api.list_repo_tree(REPO, path_in_repo="a")} == {"a/b", "a/d.txt"}
    assert {e.path for e in api.list_repo_tree(REPO, recursive=True)} == {
        ".gitattributes", "top.txt", "a", "a/b", "a/b/c.txt", "a/d.txt",
    }
    infos = api.get_paths_info(REPO, ["a/d.txt", "a", "nope"])
    assert [type(i).__name__ for i in infos] == ["RepoFile", "RepoFolder"]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="nope"))


def test_stand_in_stops_and_frees_its_port():
    standin = HubStandIn()
    with standin:
        url = standin.url
        assert HfApi(endpoint=url, token=TOKEN).whoami()["name"] == "test-user"
    with pytest.raises(RuntimeError):
        standin.url  # noqa: B018 (the property raises once stopped)
    with pytest.raises(httpx2.ConnectError):
        HfApi(endpoint=url, token=TOKEN).whoami()


def test_raw_http_details(hub):
    hub.seed(REPO, {"w.bin": bytes(range(100))})
    with httpx2.Client(base_url=hub.url) as client:
        r = client.get(f"/{REPO}/resolve/main/w.bin", headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == bytes(range(10, 20))
        assert r.headers["Content-Range"] == "bytes 10-19/100"
        head = client.head(f"/{REPO}/resolve/main/w.bin")
        assert head.headers["Content-Length"] == "100" and head.headers["ETag"] == f'"{git_blob_sha1(bytes(range(100)))}"'
        assert head.headers["X-Repo-Commit"] == hub.repos[REPO].heads["main"]
        r = client.get("/api/spaces-and-more/unknown")
        assert r.status_code == 501 and "does not implement" in r.json()["error"]
        r = client.post("/api/validate-yaml", content=iter([b'{"content": "x",', b' "repoType": "model"}']))  # chunked
        assert r.status_code == 200 and r.json() == {"errors": [], "warnings": []}
    assert hub.history[-1] == ("POST", "/api/validate-yaml", 200)


def test_guard_refuses_remote_hosts():
    with pytest.raises(RuntimeError, match="remote host"):
        HfApi(endpoint="https://huggingface.co", token=False).model_info("openai-community/gpt2")
