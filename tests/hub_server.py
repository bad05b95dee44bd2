"""An in-memory Hugging Face Hub for tests: the Hub's REST protocol on 127.0.0.1.

It speaks enough of the protocol for the real ``huggingface_hub`` 2.x client (read from
``hf_api.py``, ``_commit_api.py`` and ``file_download.py`` of huggingface_hub 2.4):

    GET  /api/whoami-v2                                   token -> user
    POST /api/repos/create                                {name, organization, type, private}
    GET  /api/{type}s/{repo}[/revision/{rev}]             repo info: sha, siblings, cardData
    POST /api/{type}s/{repo}/preupload/{rev}              every file "regular" (no LFS, no Xet)
    POST /api/{type}s/{repo}/commit/{rev}                 NDJSON: header, file (base64), deletedFile/Folder
    GET  /api/{type}s/{repo}/refs                         branches and tags
    POST /api/{type}s/{repo}/branch/{name}                DELETE too
    POST /api/{type}s/{repo}/tag/{rev}                    {tag, message}; DELETE /tag/{name}
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]          recursive listing, git blob oids
    GET  /api/{type}s/{repo}/commits/{rev}                history, newest first
    POST /api/validate-yaml                               validates the card's metadata (see below)
    HEAD/GET /[{type}s/]{repo}/resolve/{rev}/{path}       ETag, X-Repo-Commit, Content-Length

Card metadata is validated as the Hub does it, at ``/api/validate-yaml`` (which huggingface_hub
calls before committing a README.md) and again on every commit that adds the root ``README.md``
(HTTP 400, as the Hub refuses such a commit): the YAML must parse, ``base_model`` and ``datasets``
must name repos by id (``name`` or ``org/name``: no spaces, parentheses or file names), and a
``model-index`` must have the Hub's shape (results with a task type, a dataset type and name, and
metrics with a type and a value).

Errors carry the Hub's ``X-Error-Code`` headers (RepoNotFound, RevisionNotFound, EntryNotFound) so
the client raises its usual exception classes. Writes need a token from ``tokens``; a token that
is not there is rejected with 401 on every request, as the Hub does.

Fault injection: ``server.fail("commit", times=1, after=2, mode="error")`` makes the third commit
answer 500; ``mode="drop"`` closes the connection without doing anything or answering, and
``mode="lost"`` does the work and then closes the connection (the answer is lost on the way).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
# A Hub repo id: an optional namespace and a name of letters, digits, '-', '_' and '.' (96 characters at most).
REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")
REPO_TYPES = ("model", "dataset", "space")


def git_blob_oid(content: bytes) -> str:
    """The oid git gives a blob (what the Hub reports for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    files: dict[str, bytes]
    title: str
    message: str
    date: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch, a tag or a commit hash (full or a prefix of 7+ characters)."""
        oid = self.branches.get(revision) or self.tags.get(revision)
        if oid is None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
            oid = next((o for o in self.commits if o.startswith(revision)), None)
        return self.commits.get(oid) if oid else None


@dataclass
class Fault:
    endpoint: str
    mode: Literal["error", "drop", "lost"]
    after: int
    times: int
    seen: int = 0


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.headers = status, message, error_code, headers or {}


class _DropConnection(Exception):
    """Close the socket without answering (a network failure seen by the client)."""


class HubServer:
    """In-memory Hub on an ephemeral 127.0.0.1 port, served from a daemon thread.

    Args:
        tokens: valid token -> user name.
        orgs: user name -> organisations the user may create repos in.
    """

    def __init__(self, tokens: dict[str, str], orgs: dict[str, list[str]] | None = None):
        self.tokens = dict(tokens)
        self.orgs = orgs or {}
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request received
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    # ---- test helpers --------------------------------------------------------------------

    def fail(self, endpoint: str, *, times: int = 1, after: int = 0, mode: Literal["error", "drop", "lost"] = "error") -> None:
        """Make ``times`` requests to ``endpoint`` (e.g. "commit", "tag", "preupload", "resolve")
        fail, after letting ``after`` of them through."""
        with self.lock:
            self.faults.append(Fault(endpoint, mode, after, times))

    def count(self, endpoint: str, method: str | None = None) -> int:
        """Requests received whose path has ``/{endpoint}`` in it (and the method, if given)."""
        with self.lock:
            return sum(1 for m, path in self.requests if f"/{endpoint}" in path and method in (None, m))

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        commit = self.repo(repo_id, repo_type).resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id} has no revision {revision!r}")
        return dict(commit.files)

    def create_repo_with_files(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> None:
        """A repo made by somebody else, for conflict tests."""
        with self.lock:
            repo = self._new_repo(repo_id, repo_type, private=False)
            self._commit(repo, "main", files, deleted=[], title="external content", message="")

    # ---- the protocol ----------------------------------------------------------------------

    def _check_fault(self, endpoint: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.endpoint != endpoint:
                    continue
                fault.seen += 1
                if fault.after < fault.seen <= fault.after + fault.times:
                    return fault
        return None

    def _user(self, authorization: str | None, required: bool) -> str | None:
        if not authorization:
            if required:
                raise HubError(401, "You must be authenticated to access this endpoint")
            return None
        token = authorization.removeprefix("Bearer ").strip()
        user = self.tokens.get(token)
        if user is None:
            # The Hub's exact message; the client tells it apart from "repo not found".
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _may_write(self, user: str | None, namespace: str) -> None:
        if user is None:
            raise HubError(401, "You must be authenticated to write to the Hub")
        if namespace != user and namespace not in self.orgs.get(user, []):
            raise HubError(403, f"You don't have the rights to create or write to repos in '{namespace}'")

    def _new_repo(self, repo_id: str, repo_type: str, private: bool) -> Repo:
        repo = Repo(repo_id, repo_type, private)
        # A new Hub repo starts with one commit holding .gitattributes.
        self.repos[(repo_type, repo_id)] = repo
        self._commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, [], "initial commit", "")
        return repo

    def _commit(self, repo: Repo, branch: str, added: dict[str, bytes], deleted: list[str], title: str, message: str) -> Commit:
        parent = repo.commits.get(repo.branches.get(branch, ""))
        files = dict(parent.files) if parent else {}
        for path in deleted:
            if path.endswith("/"):
                files = {p: c for p, c in files.items() if not p.startswith(path)}
            elif path in files:
                del files[path]
            else:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        files.update(added)
        oid = hashlib.sha1(json.dumps([parent.oid if parent else None, title, sorted((p, git_blob_oid(c)) for p, c in files.items()), time.time_ns()]).encode()).hexdigest()
        commit = Commit(oid, parent.oid if parent else None, files, title, message, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def _get_repo(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo_id.split("/")[0] and repo_id.split("/")[0] not in self.orgs.get(user or "", [])):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _get_commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def handle(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, dict, bytes]:
        split = urlsplit(raw_path)
        path, query = split.path, parse_qs(split.query)
        with self.lock:
            self.requests.append((method, path))
        endpoint = _endpoint_name(path)
        fault = self._check_fault(endpoint)
        if fault is not None:
            if fault.mode == "drop":
                raise _DropConnection()
            if fault.mode == "lost":
                with self.lock:
                    self._route(method, path, query, self._user(headers.get("Authorization"), required=False), body)
                raise _DropConnection()
            return 500, {"X-Error-Message": "injected failure"}, json.dumps({"error": "Internal Error - injected failure"}).encode()
        with self.lock:
            user = self._user(headers.get("Authorization"), required=False)
            return self._route(method, path, query, user, body)

    def _route(self, method: str, path: str, query: dict, user: str | None, body: bytes) -> tuple[int, dict, bytes]:
        if path == "/api/whoami-v2":
            if user is None:
                raise HubError(401, "You must be authenticated to access this endpoint")
            return _json({"type": "user", "name": user, "orgs": [{"name": o} for o in self.orgs.get(user, [])],
                          "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body))
        if path == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body), user)
        match = re.fullmatch(r"/api/(model|dataset|space)s/([^/]+/[^/]+)(?:/(.*))?", path)
        if match:
            repo_type, repo_id, rest = match.group(1), match.group(2), match.group(3) or ""
            return self._repo_api(method, repo_type, repo_id, rest, query, user, body)
        match = re.fullmatch(r"/(?:(dataset|space)s/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match and method in ("GET", "HEAD"):
            repo_type = match.group(1) or "model"
            return self._resolve(method, repo_type, match.group(2), unquote(match.group(3)), unquote(match.group(4)), user)
        raise HubError(404, f"no route for {method} {path}")

    def _validate_yaml(self, payload: dict) -> tuple[int, dict, bytes]:
        errors = card_metadata_errors(payload.get("content", ""))
        if errors:
            return 400, {}, json.dumps({"errors": [{"message": message} for message in errors]}).encode()
        return _json({"errors": [], "warnings": []})

    def _create_repo(self, payload: dict, user: str | None) -> tuple[int, dict, bytes]:
        namespace = payload.get("organization") or user
        self._may_write(user, namespace)
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{payload['name']}"
        url = self._repo_url(repo_type, repo_id)
        if (repo_type, repo_id) in self.repos:
            return 409, {}, json.dumps({"error": "You already created this model repo", "url": url}).encode()
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self._new_repo(repo_id, repo_type, private)
        return _json({"url": url, "name": repo_id})

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.url}/{prefix}{repo_id}"

    def _repo_api(self, method, repo_type, repo_id, rest, query, user, body) -> tuple[int, dict, bytes]:
        repo = self._get_repo(repo_type, repo_id, user)
        action, _, arg = rest.partition("/")
        arg = unquote(arg)
        if method == "GET" and action in ("", "revision"):
            return self._repo_info(repo, self._get_commit(repo, arg or "main"))
        if method == "GET" and action == "refs":
            return _json({
                "branches": [_ref(name, "heads", oid) for name, oid in repo.branches.items()],
                "tags": [_ref(name, "tags", oid) for name, oid in repo.tags.items()],
                "converts": [], "pullRequests": [],
            })
        if method == "GET" and action == "tree":
            revision, _, folder = rest.removeprefix("tree/").partition("/")
            return self._tree(self._get_commit(repo, unquote(revision)), unquote(folder), query)
        if method == "GET" and action == "commits":
            return self._history(repo, self._get_commit(repo, arg))
        # Everything below writes.
        self._may_write(user, repo_id.split("/")[0])
        if method == "POST" and action == "preupload":
            commit = self._get_commit(repo, arg)
            files = json.loads(body)["files"]
            return _json({"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_blob_oid(commit.files[f["path"]]) if f["path"] in commit.files else None}
                for f in files
            ]})
        if method == "POST" and action == "commit":
            return self._create_commit(repo, arg, body)
        if action == "branch":
            return self._branch(repo, method, arg, json.loads(body or b"{}"))
        if action == "tag":
            return self._tag(repo, method, arg, json.loads(body or b"{}"))
        raise HubError(404, f"no route for {method} {rest}")

    def _repo_info(self, repo: Repo, commit: Commit) -> tuple[int, dict, bytes]:
        info = {
            "id": repo.repo_id, "_id": repo.repo_id, "private": repo.private, "sha": commit.oid,
            "lastModified": commit.date, "tags": [], "downloads": 0, "likes": 0,
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }
        card = commit.files.get("README.md", b"").decode()
        if card.startswith("---"):
            info["cardData"] = yaml.safe_load(card.split("---", 2)[1]) or {}
            info["tags"] = info["cardData"].get("tags", [])
            info["library_name"] = info["cardData"].get("library_name")
        return _json(info)

    def _tree(self, commit: Commit, folder: str, query: dict) -> tuple[int, dict, bytes]:
        recursive = query.get("recursive", ["False"])[0].lower() in ("1", "true")
        prefix = f"{folder.rstrip('/')}/" if folder else ""
        if folder and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{folder} does not exist on this revision", "EntryNotFound")
        entries: dict[str, dict] = {}
        for path, content in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            relative = path[len(prefix):].split("/")
            # Every folder on the way is listed in a recursive listing; only the first otherwise.
            depth = len(relative) if recursive else 1
            for level in range(1, min(depth, len(relative) - 1) + 1):
                sub = prefix + "/".join(relative[:level])
                entries.setdefault(sub, {"type": "directory", "path": sub, "oid": hashlib.sha1(sub.encode()).hexdigest(), "size": 0})
            if recursive or len(relative) == 1:
                entries[path] = {"type": "file", "path": path, "oid": git_blob_oid(content), "size": len(content)}
        return _json(list(entries.values()))

    def _history(self, repo: Repo, commit: Commit | None) -> tuple[int, dict, bytes]:
        history = []
        while commit is not None:
            history.append({"id": commit.oid, "authors": [{"user": "test"}], "date": commit.date,
                            "title": commit.title, "message": commit.message})
            commit = repo.commits.get(commit.parent or "")
        return _json(history)

    def _create_commit(self, repo: Repo, branch: str, body: bytes) -> tuple[int, dict, bytes]:
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        header, added, deleted = {}, {}, []
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"].rstrip("/") + ("/" if key == "deletedFolder" else ""))
            else:
                raise HubError(400, f"this test Hub stores regular files only, got a {key!r} operation")
        if "README.md" in added:
            errors = card_metadata_errors(added["README.md"].decode("utf-8", errors="replace"))
            if errors:
                raise HubError(400, f"Invalid metadata in README.md: {'; '.join(errors)}")
        parent = header.get("parentCommit")
        if parent and parent != repo.branches[branch]:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        commit = self._commit(repo, branch, added, deleted, header.get("summary", ""), header.get("description", ""))
        return _json({"commitUrl": f"{self._repo_url(repo.repo_type, repo.repo_id)}/commit/{commit.oid}",
                      "commitOid": commit.oid, "success": True})

    def _branch(self, repo: Repo, method: str, name: str, payload: dict) -> tuple[int, dict, bytes]:
        if method == "DELETE":
            if repo.branches.pop(name, None) is None:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            return _json({})
        if name in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{name}")
        repo.branches[name] = self._get_commit(repo, payload.get("startingPoint") or "main").oid
        return _json({})

    def _tag(self, repo: Repo, method: str, arg: str, payload: dict) -> tuple[int, dict, bytes]:
        if method == "DELETE":
            if repo.tags.pop(arg, None) is None:
                raise HubError(404, f"Invalid rev id: {arg}", "RevisionNotFound")
            return _json({})
        tag = payload["tag"]
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = self._get_commit(repo, arg).oid
        return _json({})

    def _resolve(self, method, repo_type, repo_id, revision, filename, user) -> tuple[int, dict, bytes]:
        repo = self._get_repo(repo_type, repo_id, user)
        commit = self._get_commit(repo, revision)
        content = commit.files.get(filename)
        if content is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {
            "ETag": f'"{git_blob_oid(content)}"',
            "X-Repo-Commit": commit.oid,
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        return 200, headers, content


def card_metadata_errors(card: str) -> list[str]:
    """Why the Hub would refuse this model card's metadata (empty: it accepts it)."""
    if not card.startswith("---"):
        return []
    try:
        metadata = yaml.safe_load(card.split("---", 2)[1]) or {}
    except yaml.YAMLError as error:
        return [f"YAML is invalid: {error}"]
    if not isinstance(metadata, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    for key in ("base_model", "datasets"):
        value = metadata.get(key)
        values = value if isinstance(value, list) else [value] if value is not None else []
        errors += [f'"{key}" with value "{v}" is not valid: it must be a repo id (name or org/name)'
                   for v in values if not (isinstance(v, str) and REPO_ID.fullmatch(v))]
    for entry in metadata.get("model-index") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("results"), list):
            errors.append('"model-index" entries need a "name" and a list of "results"')
            continue
        for result in entry["results"]:
            dataset, task, metrics = result.get("dataset") or {}, result.get("task") or {}, result.get("metrics")
            if not (isinstance(task, dict) and task.get("type")):
                errors.append('"model-index" result without "task.type"')
            if not (isinstance(dataset, dict) and isinstance(dataset.get("type"), str) and isinstance(dataset.get("name"), str)):
                errors.append('"model-index" result without "dataset.type" and "dataset.name"')
            if not isinstance(metrics, list) or any("type" not in m or "value" not in m for m in metrics):
                errors.append('"model-index" metrics need a "type" and a "value"')
    return errors


def _endpoint_name(path: str) -> str:
    """The action a request path names: commit, preupload, tag, branch, refs, tree, resolve, ..."""
    parts = path.strip("/").split("/")
    if "resolve" in parts:
        return "resolve"
    if parts[:1] == ["api"] and len(parts) >= 5:
        return parts[4]
    return "/".join(parts[1:3]) if parts[:1] == ["api"] else parts[0]


def _ref(name: str, kind: str, oid: str) -> dict:
    return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}


def _json(payload) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _make_handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                status, headers, payload = hub.handle(self.command, self.path, self.headers, body)
            except _DropConnection:
                self.close_connection = True
                self.connection.shutdown(2)
                return
            except HubError as error:
                status = error.status
                headers = {"Content-Type": "application/json", "X-Error-Message": error.message, **error.headers}
                if error.error_code:
                    headers["X-Error-Code"] = error.error_code
                payload = json.dumps({"error": error.message}).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_HEAD = do_DELETE = do_PUT = _serve

    return Handler
