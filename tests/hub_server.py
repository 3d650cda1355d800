"""A local stand-in for the Hugging Face Hub, on 127.0.0.1, for the Hub round-trip tests.

It speaks the part of the protocol huggingface_hub 2.x uses to create a repo, commit files and download
them: whoami, repo create, validate-yaml, preupload (always "regular": no LFS, no xet), commit (ndjson,
base64 files), model info, and file resolve (HEAD and GET, with X-Repo-Commit / ETag / Content-Length).
Tokens are checked: a missing or unknown token is a 401, a read token writing is a 403.

`hub_server` (a pytest fixture) starts it on a free port in a background thread and points
huggingface_hub at it: its module constants (read once at import) are patched for the test.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import pytest
import yaml

WRITE_TOKEN = "hf_test_write_TOKEN_0123456789abcdef"
READ_TOKEN = "hf_test_read_TOKEN_0123456789abcdef"
USER = "alice"


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Repos as lists of commits (each a full {path: bytes} snapshot) behind a threaded HTTP server."""

    def __init__(self):
        self.tokens = {WRITE_TOKEN: "write", READ_TOKEN: "read"}
        self.repos: dict[str, dict] = {}
        self.fail_commits = 0  # the next N commits answer 500 without committing
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        return dict(self._snapshot(repo_id, revision)[1])

    def _snapshot(self, repo_id: str, revision: str):
        commits = self.repos[repo_id]["commits"]
        if revision == "main":
            return commits[-1]
        for oid, files in commits:
            if oid == revision:
                return oid, files
        raise KeyError(revision)


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        # ------------------------------------------------------------------ plumbing
        def _send(self, status, body=b"", headers=None, head=False):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status, message, code=None, head=False, headers=None):
            headers = {"X-Error-Message": message, **(headers or {})}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers, head=head)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _role(self):
            """None: no token; False: unknown token; else 'read' or 'write'."""
            auth = self.headers.get("Authorization")
            if not auth:
                return None
            return hub.tokens.get(auth.removeprefix("Bearer ").strip(), False)

        def _check_write(self, head=False) -> bool:
            role = self._role()
            if not role:
                self._error(401, "Invalid credentials in Authorization header", head=head)
                return False
            if role != "write":
                self._error(403, "You don't have the rights to write to this repo (read-only token)", head=head)
                return False
            return True

        def _record(self):
            hub.requests.append((self.command, self.path, self.headers.get("Authorization")))

        # ------------------------------------------------------------------ routes
        def do_GET(self):
            self._record()
            self._read(head=False)

        def do_HEAD(self):
            self._record()
            self._read(head=True)

        def do_POST(self):
            self._record()
            path = urlparse(self.path).path
            body = self._body()
            if path == "/api/repos/create":
                return self._create(json.loads(body))
            if path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)", path)
            if not match:
                return self._error(404, f"no route POST {path}")
            repo_id, action, revision = match.group(1), match.group(2), unquote(match.group(3))
            if not self._check_write():
                return None
            if repo_id not in hub.repos:
                return self._error(404, "Repository not found", code="RepoNotFound")
            if action == "preupload":
                return self._preupload(repo_id, revision, json.loads(body))
            return self._commit(repo_id, revision, body)

        def _create(self, payload):
            if not self._check_write():
                return None
            repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
            url = f"{hub.endpoint}/{repo_id}"
            with hub.lock:
                if repo_id in hub.repos:
                    return self._error(409, "You already created this model repo", headers={"X-Url": url})
                oid = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
                hub.repos[repo_id] = {"commits": [(oid, {})], "private": payload.get("visibility") == "private"}
            return self._send(200, {"url": url, "name": repo_id})

        def _validate_yaml(self, payload):
            match = re.match(r"^---\n(.*?)\n---", payload.get("content", ""), re.S)
            try:
                yaml.safe_load(match.group(1) if match else "")
            except yaml.YAMLError as err:
                return self._send(400, {"errors": [{"message": str(err)}], "warnings": []})
            return self._send(200, {"errors": [], "warnings": []})

        def _preupload(self, repo_id, revision, payload):
            _, files = hub._snapshot(repo_id, revision)
            answer = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha(files[f["path"]]) if f["path"] in files else None,
                }
                for f in payload["files"]
            ]
            return self._send(200, {"files": answer, "commitOid": hub._snapshot(repo_id, revision)[0]})

        def _commit(self, repo_id, revision, body):
            with hub.lock:
                if hub.fail_commits > 0:
                    hub.fail_commits -= 1
                    return self._error(500, "Simulated failure: the commit was not created")
                parent, files = hub._snapshot(repo_id, revision)
                files = dict(files)
                summary = ""
                for line in body.splitlines():
                    item = json.loads(line)
                    key, value = item["key"], item["value"]
                    if key == "header":
                        summary = value.get("summary", "")
                    elif key == "file":
                        assert value.get("encoding") == "base64", value
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif key == "deletedFile":
                        files.pop(value["path"], None)
                    elif key == "deletedFolder":
                        prefix = value["path"].rstrip("/") + "/"
                        files = {k: v for k, v in files.items() if not k.startswith(prefix)}
                    else:
                        return self._error(400, f"unsupported commit operation {key!r} (this server has no LFS)")
                oid = hashlib.sha1(f"{parent} {summary} {sorted(files)} {len(hub.requests)}".encode()).hexdigest()
                hub.repos[repo_id]["commits"].append((oid, files))
            url = f"{hub.endpoint}/{repo_id}/commit/{oid}"
            return self._send(200, {"commitUrl": url, "commitOid": oid, "success": True})

        def _read(self, head):
            path = urlparse(self.path).path
            if path == "/api/whoami-v2":
                role = self._role()
                if not role:
                    return self._error(401, "Invalid credentials in Authorization header", head=head)
                auth = {"type": "access_token", "accessToken": {"displayName": "test", "role": role}}
                return self._send(200, {"type": "user", "name": USER, "orgs": [], "auth": auth}, head=head)
            if self._role() is False:
                return self._error(401, "Invalid credentials in Authorization header", head=head)
            info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if info:
                return self._info(info.group(1), unquote(info.group(2) or "main"), head)
            if resolve:
                return self._resolve(resolve.group(1), unquote(resolve.group(2)), unquote(resolve.group(3)), head)
            return self._error(404, f"no route {self.command} {path}", head=head)

        def _lookup(self, repo_id, revision, head):
            if repo_id not in hub.repos:
                self._error(404, "Repository not found", code="RepoNotFound", head=head)
                return None
            try:
                return hub._snapshot(repo_id, revision)
            except KeyError:
                self._error(404, "Invalid rev id", code="RevisionNotFound", head=head)
                return None

        def _info(self, repo_id, revision, head):
            found = self._lookup(repo_id, revision, head)
            if found:
                oid, files = found
                siblings = [{"rfilename": name} for name in sorted(files)]
                data = {"id": repo_id, "modelId": repo_id, "sha": oid, "private": False, "siblings": siblings}
                self._send(200, data, head=head)

        def _resolve(self, repo_id, revision, filename, head):
            found = self._lookup(repo_id, revision, head)
            if not found:
                return
            oid, files = found
            if filename not in files:
                headers = {"X-Repo-Commit": oid}
                return self._error(404, "Entry not found", code="EntryNotFound", head=head, headers=headers)
            data = files[filename]
            headers = {"X-Repo-Commit": oid, "ETag": f'"{git_blob_sha(data)}"'}
            self._send(200, data, headers, head=head)

    return Handler


@pytest.fixture
def hub_server(monkeypatch, tmp_path):
    """A running `FakeHub`, with huggingface_hub (and PEFT/transformers through it) pointed at it."""
    import huggingface_hub
    from huggingface_hub import constants
    from transformers.utils import hub as transformers_hub

    hub = FakeHub().start()
    template = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.endpoint)
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield hub
    finally:
        hub.stop()
