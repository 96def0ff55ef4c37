"""A local stand-in for the Hugging Face Hub, enough for huggingface_hub's push and download paths.

It serves, on 127.0.0.1, what `HfApi.create_repo` / `create_commit` (pre-upload, LFS batch + basic PUT transfer
+ verify, NDJSON commit) / `create_branch` / `repo_info` / `list_repo_tree` / `hf_hub_download` / `snapshot_download` /
`ModelCard.load` call, with git-style ids: regular files carry their git blob sha1, LFS files their sha256, and
every commit keeps its own snapshot, so the client's de-duplication (unchanged files dropped from a commit, LFS
objects already stored not re-sent) behaves as against the Hub. Xet is not served: clients must run with
HF_HUB_DISABLE_XET=1 (huggingface_hub then uses the LFS protocol, which the Hub still accepts).

Writes need `Authorization: Bearer <token>` with a token in `tokens`; as on the Hub, a request with an unknown
token or a write without one is answered 401, a write with a token in `read_tokens` 403. Every request is logged in `requests` as (method, path).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

# Paths stored through LFS, as in the .gitattributes the Hub puts into new model repos (an excerpt).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".gguf", ".onnx", ".msgpack", ".zip")
LFS_MIN_SIZE = 10 * 2**20
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """What the Hub's pre-upload answer and tree listing give: sha256 for LFS files, git sha1 otherwise."""
        return hashlib.sha256(self.data).hexdigest() if self.lfs else git_blob_sha1(self.data)


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # commit sha -> snapshot


class FakeHub:
    def __init__(self, tokens: tuple[str, ...] = ("hf_fake_write_token",), read_tokens: tuple[str, ...] = ()):
        self.tokens = set(tokens)
        self.read_tokens = set(read_tokens)  # valid, but without write access (the Hub answers writes with 403)
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- state helpers used by the server and by tests
    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, private: bool = False) -> None:
        repo = Repo(private=private)
        self.repos[repo_id] = repo
        self._commit(repo, "main", {".gitattributes": GITATTRIBUTES, **(files or {})}, [])

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return {path: blob.data for path, blob in repo.commits[repo.branches.get(revision, revision)].items()}

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for m, p in self.requests if m == method and re.search(pattern, p))

    def _commit(self, repo: Repo, branch: str, added: dict[str, bytes], deleted: list[str],
                lfs: dict[str, str] | None = None) -> str:
        parent = repo.branches.get(branch)
        snapshot = dict(repo.commits[parent]) if parent else {}
        for path, data in added.items():
            snapshot[path] = Blob(data, lfs=path in (lfs or {}) or _is_lfs(path, len(data)))
        for path in deleted:
            snapshot.pop(path, None)
        sha = hashlib.sha1(json.dumps([parent, sorted((p, b.oid) for p, b in snapshot.items())]).encode()).hexdigest()
        repo.commits[sha] = snapshot
        repo.branches[branch] = sha
        return sha


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        # ---- plumbing
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None,
                  head: bool = False) -> None:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers, head=head)

        def _authorized(self) -> bool:
            """Writes need a token with write access (a wrong one was refused already)."""
            auth = self.headers.get("Authorization")
            if auth is None:
                self._error(401, "You must be authenticated to access this resource")
            elif auth.removeprefix("Bearer ") in hub.read_tokens:
                self._error(403, "You don't have the rights to create a model under this namespace")
            return auth is not None and auth.removeprefix("Bearer ") in hub.tokens

        def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not self.headers.get("Authorization")):
                self._error(404 if repo is None else 401, "Repository not found", "RepoNotFound", head=head)
                return None
            return repo

        def _writable_repo(self, repo_id: str) -> Repo | None:
            return self._repo(repo_id) if self._authorized() else None

        def _snapshot(self, repo: Repo, revision: str, head: bool = False):
            sha = repo.branches.get(revision, revision if revision in repo.commits else None)
            if sha is None:
                self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
                return None, None
            return sha, repo.commits[sha]

        # ---- verbs
        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def _dispatch(self, method: str) -> None:
            url = urlparse(self.path)
            path = unquote(url.path)
            hub.requests.append((method, path))
            body = self._body() if method in ("POST", "PUT") else b""
            auth = self.headers.get("Authorization")
            if auth is not None and auth.removeprefix("Bearer ") not in hub.tokens | hub.read_tokens:
                # As on the Hub, a wrong token is refused everywhere, reads of public repos included.
                return self._error(401, "Invalid credentials in Authorization header")
            with hub.lock:
                for pattern, verbs, handler in ROUTES:
                    match = re.fullmatch(pattern, path)
                    if match and method in verbs:
                        return handler(self, method, body, parse_qs(url.query), *match.groups())
            self._error(404, f"no route for {method} {path}")

        # ---- endpoints
        def create_repo(self, method, body, query) -> None:
            if not self._authorized():
                return
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or 'fake-user'}/{payload['name']}"
            if repo_id in hub.repos:
                # The Hub's conflict answer carries the url too: `create_repo(exist_ok=True)` reads it.
                return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            hub.add_repo(repo_id, private=bool(payload.get("private")))
            self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def validate_yaml(self, method, body, query) -> None:
            self._send(200, {"errors": [], "warnings": []})

        def repo_info(self, method, body, query, repo_id, revision=None) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            sha, snapshot = self._snapshot(repo, revision or "main")
            if sha is None:
                return
            self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                             "siblings": [{"rfilename": p} for p in sorted(snapshot)], "tags": [],
                             "downloads": 0, "likes": 0})

        def tree(self, method, body, query, repo_id, revision, prefix=None) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            sha, snapshot = self._snapshot(repo, revision)
            if sha is None:
                return
            entries = []
            for p, blob in sorted(snapshot.items()):
                if prefix and not p.startswith(prefix.rstrip("/") + "/"):
                    continue
                entry = {"type": "file", "path": p, "size": len(blob.data), "oid": git_blob_sha1(blob.data)}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.oid, "size": len(blob.data), "pointerSize": 134}
                entries.append(entry)
            self._send(200, entries)

        def preupload(self, method, body, query, repo_id, revision) -> None:
            repo = self._writable_repo(repo_id)
            if repo is None:
                return
            snapshot = repo.commits[repo.branches[revision]] if revision in repo.branches else {}
            files = []
            for f in json.loads(body)["files"]:
                existing = snapshot.get(f["path"])
                files.append({"path": f["path"], "uploadMode": "lfs" if _is_lfs(f["path"], f["size"]) else "regular",
                              "shouldIgnore": False, "oid": existing.oid if existing else None})
            self._send(200, {"files": files, "commitOid": repo.branches.get(revision)})

        def lfs_batch(self, method, body, query, repo_id) -> None:
            if not self._authorized():
                return
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs_objects:  # stored already: no actions, the client skips it
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"},
                                        "verify": {"href": f"{hub.url}/lfs-verify"}}
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects})

        def lfs_upload(self, method, body, query, oid) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, "content does not match its sha256")
            hub.lfs_objects[oid] = body
            self._send(200)

        def lfs_verify(self, method, body, query) -> None:
            if not self._authorized():
                return
            oid = json.loads(body)["oid"]
            self._send(200 if oid in hub.lfs_objects else 404, {"oid": oid})

        def create_branch(self, method, body, query, repo_id, branch) -> None:
            repo = self._writable_repo(repo_id)
            if repo is None:
                return
            if branch in repo.branches:
                return self._error(409, f"Branch {branch} already exists")
            start = (json.loads(body) if body else {}).get("startingPoint", "main")
            repo.branches[branch] = repo.branches.get(start, start)
            self._send(200, {})

        def commit(self, method, body, query, repo_id, revision) -> None:
            repo = self._writable_repo(repo_id)
            if repo is None:
                return
            added, deleted, lfs = {}, [], {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    added[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs_objects:
                        return self._error(422, f"LFS object {value['oid']} was never uploaded")
                    added[value["path"]] = hub.lfs_objects[value["oid"]]
                    lfs[value["path"]] = value["oid"]
                elif item["key"] == "deletedFile":
                    deleted.append(value["path"])
            sha = hub._commit(repo, revision, added, deleted, lfs)
            self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                             "success": True})

        def resolve(self, method, body, query, repo_id, revision, filename) -> None:
            head = method == "HEAD"
            repo = self._repo(repo_id, head=head)
            if repo is None:
                return
            sha, snapshot = self._snapshot(repo, revision, head=head)
            if sha is None:
                return
            blob = snapshot.get(filename)
            if blob is None:
                return self._error(404, "Entry not found", "EntryNotFound", head=head)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(blob.data)}"', "Accept-Ranges": "bytes"}
            if blob.lfs:
                headers |= {"X-Linked-Etag": f'"{blob.oid}"', "X-Linked-Size": str(len(blob.data))}
            self._send(200, blob.data, headers, head=head)

    REPO = r"([\w.-]+/[\w.-]+)"
    ROUTES = [
        (r"/api/repos/create", ("POST",), Handler.create_repo),
        (r"/api/validate-yaml", ("POST",), Handler.validate_yaml),
        (rf"/api/models/{REPO}", ("GET",), Handler.repo_info),
        (rf"/api/models/{REPO}/revision/([^/]+)", ("GET",), Handler.repo_info),
        (rf"/api/models/{REPO}/tree/([^/]+)(?:/(.+))?", ("GET",), Handler.tree),
        (rf"/api/models/{REPO}/preupload/([^/]+)", ("POST",), Handler.preupload),
        (rf"/api/models/{REPO}/commit/([^/]+)", ("POST",), Handler.commit),
        (rf"/api/models/{REPO}/branch/([^/]+)", ("POST",), Handler.create_branch),
        (rf"/{REPO}\.git/info/lfs/objects/batch", ("POST",), Handler.lfs_batch),
        (r"/lfs-upload/([0-9a-f]{64})", ("PUT",), Handler.lfs_upload),
        (r"/lfs-verify", ("POST",), Handler.lfs_verify),
        (rf"/{REPO}/resolve/([^/]+)/(.+)", ("GET", "HEAD"), Handler.resolve),
    ]
    return Handler
