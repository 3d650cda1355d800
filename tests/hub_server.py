"""A local stand-in for the Hugging Face Hub, on 127.0.0.1, for the Hub round-trip tests.

It speaks the part of the protocol huggingface_hub 2.x uses to create a repo, commit files and download
them: whoami, repo create, validate-yaml, preupload, commit (ndjson), model info, and file resolve (HEAD
and GET, with X-Repo-Commit / ETag / Content-Length). Tokens are checked: a missing or unknown token is a
401, a read token writing is a 403.

Large files take the Git LFS path, as on the Hub: preupload answers "lfs" for files of 10 MiB and more,
for binary files (a NUL byte in the sample) and for the suffixes the Hub's default .gitattributes sends
to LFS (.safetensors, .bin, .png, ...); the client then asks `<repo>.git/info/lfs/objects/batch`, PUTs
the bytes to a signed URL on a separate "storage" server (another origin, like S3: it receives no
token), in one request or, for files over `multipart_chunk_size`, in parts completed by a POST; then
POSTs the verify action (sha256 and size checked), and commits `lfsFile` entries that name the sha256.
An object already stored gets no upload action (the re-run of an interrupted push skips it). Resolving
an LFS file answers 302 to the storage server, with X-Linked-Etag (the sha256) and X-Linked-Size, as the
Hub's CDN redirect does. `fail_commits` and `fail_uploads` make the next commits / storage PUTs fail.

Not covered: xet storage (the fixture sets HF_HUB_DISABLE_XET, so huggingface_hub takes the LFS path; a
client that tries xet gets a 404), .gitattributes and .gitignore rules of the repo itself, commit
pointers (parentCommit), pull requests, branches other than main, LFS object size limits, per-repo
access rights beyond read/write tokens, and rate limits.

`hub_server` (a pytest fixture) starts it on a free port in a background thread and points
huggingface_hub at it: its module constants (read once at import) are patched for the test.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import pytest
import yaml

WRITE_TOKEN = "hf_test_write_TOKEN_0123456789abcdef"
READ_TOKEN = "hf_test_read_TOKEN_0123456789abcdef"
USER = "alice"
LFS_MIN_SIZE = 10 * 1024 * 1024
# From the .gitattributes the Hub puts in every new model repo.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".h5", ".onnx", ".msgpack", ".npy",
                ".npz", ".zip", ".tar", ".gz", ".png", ".jpg", ".model", ".joblib", ".parquet", ".arrow")


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    """The Hub's choice between a regular git blob and LFS."""
    return size >= LFS_MIN_SIZE or path.endswith(LFS_SUFFIXES) or b"\0" in sample[:512]


class FakeHub:
    """Repos as lists of commits (each a full {path: bytes} snapshot) behind a threaded HTTP server, and
    LFS objects (by sha256) behind a second one, the storage."""

    def __init__(self):
        self.tokens = {WRITE_TOKEN: "write", READ_TOKEN: "read"}
        self.repos: dict[str, dict] = {}
        self.fail_commits = 0  # the next N commits answer 500 without committing
        self.fail_uploads = 0  # the next N storage PUTs answer 403 (an expired signed URL) and store nothing
        self.multipart_chunk_size: int | None = None  # LFS objects larger than this are uploaded in parts
        self.objects: dict[str, bytes] = {}  # verified LFS objects, by sha256
        self.received: dict[str, bytes] = {}  # LFS uploads the storage holds, not yet verified
        self.parts: dict[tuple[str, int], bytes] = {}
        self.lfs_commits: list[dict] = []  # every lfsFile entry committed
        self.requests: list[tuple[str, str, str | None]] = []
        self.storage_requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.storage = ThreadingHTTPServer(("127.0.0.1", 0), _storage_handler(self))
        self.storage_url = f"http://127.0.0.1:{self.storage.server_address[1]}"
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.server, self.storage)]

    def start(self):
        for thread in self.threads:
            thread.start()
        return self

    def stop(self):
        for server in (self.server, self.storage):
            server.shutdown()
            server.server_close()

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

    def signature(self, what: str) -> str:
        """The query string that stands for a signed storage URL (no token needed, only this)."""
        return "X-Amz-Signature=" + hashlib.sha256(f"{id(self)} {what}".encode()).hexdigest()[:32]


class _Handler(BaseHTTPRequestHandler):
    """Plumbing shared by the Hub and the storage handlers."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

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
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    return b"".join(chunks)
                chunks.append(chunk)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


def _storage_handler(hub: FakeHub):
    """The storage behind signed URLs (S3 and the CDN on the Hub): LFS uploads in, LFS objects out."""

    class Storage(_Handler):
        def do_PUT(self):
            hub.storage_requests.append((self.command, self.path, self.headers.get("Authorization")))
            url = urlparse(self.path)
            body = self._body()
            whole = re.fullmatch(r"/upload/([0-9a-f]{64})", url.path)
            part = re.fullmatch(r"/upload/([0-9a-f]{64})/part/(\d+)", url.path)
            what = whole.group(1) if whole else f"{part.group(1)}/{part.group(2)}" if part else None
            if what is None or url.query != hub.signature(what):
                return self._error(403, "SignatureDoesNotMatch")
            with hub.lock:
                if hub.fail_uploads > 0:
                    hub.fail_uploads -= 1
                    return self._error(403, "Request has expired")
                if whole:
                    hub.received[whole.group(1)] = body
                else:
                    hub.parts[(part.group(1), int(part.group(2)))] = body
            return self._send(200, headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

        def do_GET(self, head=False):
            hub.storage_requests.append((self.command, self.path, self.headers.get("Authorization")))
            url = urlparse(self.path)
            match = re.fullmatch(r"/objects/([0-9a-f]{64})", url.path)
            if not match or url.query != hub.signature(match.group(1)) or match.group(1) not in hub.objects:
                return self._error(403, "AccessDenied", head=head)
            return self._send(200, hub.objects[match.group(1)], head=head)

        def do_HEAD(self):
            self.do_GET(head=True)

    return Storage


def _handler(hub: FakeHub):
    class Handler(_Handler):
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
            lfs = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/(batch|verify|complete/[0-9a-f]{64})", path)
            if lfs:
                return self._lfs(lfs.group(1), lfs.group(2), json.loads(body))
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
            oid, files = hub._snapshot(repo_id, revision)
            answer = []
            for f in payload["files"]:
                lfs = is_lfs(f["path"], f["size"], base64.b64decode(f["sample"]))
                remote = files.get(f["path"])
                remote_oid = None if remote is None else sha256_hex(remote) if lfs else git_blob_sha(remote)
                answer.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                               "oid": remote_oid})
            return self._send(200, {"files": answer, "commitOid": oid})

        # ------------------------------------------------------------------ LFS
        def _lfs(self, repo_id, action, payload):
            if action.startswith("complete/"):  # signed like the part URLs: no token
                return self._complete_multipart(repo_id, action.split("/")[1], payload)
            if not self._check_write():
                return None
            if repo_id not in hub.repos:
                return self._error(404, "Repository not found", code="RepoNotFound")
            if action == "verify":
                oid, size = payload["oid"], payload["size"]
                with hub.lock:
                    data = hub.received.pop(oid, None)
                    if data is None or len(data) != size or sha256_hex(data) != oid:
                        return self._error(422, f"LFS object {oid} was not uploaded completely")
                    hub.objects[oid] = data
                return self._send(200, {"success": True})
            assert payload["operation"] == "upload" and payload["hash_algo"] == "sha256", payload
            objects = [self._batch_object(repo_id, o["oid"], o["size"]) for o in payload["objects"]]
            headers = {"Content-Type": "application/vnd.git-lfs+json"}
            return self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, headers)

        def _batch_object(self, repo_id, oid, size):
            if oid in hub.objects:
                return {"oid": oid, "size": size}  # stored already: nothing to upload
            verify = {"href": f"{hub.endpoint}/{repo_id}.git/info/lfs/objects/verify"}
            chunk = hub.multipart_chunk_size
            if chunk is None or size <= chunk:
                href = f"{hub.storage_url}/upload/{oid}?{hub.signature(oid)}"
                return {"oid": oid, "size": size, "actions": {"upload": {"href": href}, "verify": verify}}
            header = {"chunk_size": str(chunk)}
            for n in range(1, -(-size // chunk) + 1):
                header[f"{n:05d}"] = f"{hub.storage_url}/upload/{oid}/part/{n}?{hub.signature(f'{oid}/{n}')}"
            complete = f"{hub.endpoint}/{repo_id}.git/info/lfs/objects/complete/{oid}?{hub.signature(oid)}"
            return {"oid": oid, "size": size, "actions": {"upload": {"href": complete, "header": header},
                                                          "verify": verify}}

        def _complete_multipart(self, repo_id, oid, payload):
            if urlparse(self.path).query != hub.signature(oid) or payload.get("oid") != oid:
                return self._error(403, "SignatureDoesNotMatch")
            with hub.lock:
                parts = []
                for part in payload["parts"]:
                    data = hub.parts.pop((oid, part["partNumber"]), None)
                    if data is None or part["etag"].strip('"') != hashlib.md5(data).hexdigest():
                        return self._error(400, f"part {part['partNumber']} of {oid} is missing or differs")
                    parts.append(data)
                hub.received[oid] = b"".join(parts)
            return self._send(200, {"success": True})

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
                        data = base64.b64decode(value["content"])
                        if is_lfs(value["path"], len(data), data):
                            return self._error(400, f"{value['path']} must be stored with LFS (preupload said so)")
                        files[value["path"]] = data
                    elif key == "lfsFile":
                        data = hub.objects.get(value["oid"])
                        if value.get("algo") != "sha256" or data is None or len(data) != value["size"]:
                            return self._error(422, f"LFS object {value['oid']} of {value['path']} is not stored")
                        files[value["path"]] = data
                        hub.lfs_commits.append(value)
                    elif key == "deletedFile":
                        files.pop(value["path"], None)
                    elif key == "deletedFolder":
                        prefix = value["path"].rstrip("/") + "/"
                        files = {k: v for k, v in files.items() if not k.startswith(prefix)}
                    else:
                        return self._error(400, f"unsupported commit operation {key!r}")
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
                for sibling in siblings:
                    data = files[sibling["rfilename"]]
                    if is_lfs(sibling["rfilename"], len(data), data):
                        sibling["lfs"] = {"sha256": sha256_hex(data), "size": len(data), "pointerSize": 134}
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
            if is_lfs(filename, len(data), data):  # the Hub redirects to its CDN, which is given no token
                sha = sha256_hex(data)
                hub.objects.setdefault(sha, data)  # a commit a test wrote directly is stored too
                location = f"{hub.storage_url}/objects/{sha}?{hub.signature(sha)}"
                headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)), "Location": location})
                return self._send(302, b"", headers, head=head)
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
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks LFS, not xet
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
