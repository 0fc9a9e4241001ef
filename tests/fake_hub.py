"""A small HTTP server on 127.0.0.1 that speaks the Hub routes `create_repo`, `list_repo_files`,
`create_branch` and `upload_folder` (non-Xet path) use, storing what it receives. Real client, real HTTP."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class FakeHub:
    def __init__(self, fail_with: int | None = None) -> None:
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> revision -> path -> bytes
        self.fail_with = fail_with
        self.requests: list[tuple[str, str, dict]] = []
        self.validated: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, obj=None) -> None:
                body = json.dumps(obj if obj is not None else {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if code >= 400:
                    self.send_header("X-Error-Message", "fake hub error")
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path, dict(self.headers)))
                if hub.fail_with:
                    return self._send(hub.fail_with, {"error": "no"})
                path = urlparse(self.path).path
                parts = path.strip("/").split("/")
                # /api/models/{owner}/{name}/tree/{rev}[/...]
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "tree":
                    repo = f"{parts[2]}/{parts[3]}"
                    rev = parts[5]
                    if repo not in hub.repos or rev not in hub.repos[repo]:
                        return self._send(404, {"error": "not found"})
                    return self._send(
                        200,
                        [
                            {"type": "file", "path": p, "size": len(b), "oid": "0" * 40}
                            for p, b in sorted(hub.repos[repo][rev].items())
                        ],
                    )
                if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                    repo = f"{parts[2]}/{parts[3]}"
                    if repo not in hub.repos:
                        return self._send(404, {"error": "not found"})
                    return self._send(200, {"id": repo, "sha": "0" * 40, "siblings": []})
                return self._send(404, {"error": f"unknown route {path}"})

            def do_POST(self) -> None:
                body = self._body()
                hub.requests.append(("POST", self.path, dict(self.headers)))
                if hub.fail_with:
                    return self._send(hub.fail_with, {"error": "no"})
                path = urlparse(self.path).path
                parts = path.strip("/").split("/")
                if path == "/api/validate-yaml":
                    import yaml

                    content = json.loads(body)["content"]
                    try:
                        meta = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else {}
                        assert isinstance(meta, dict) and isinstance(meta.get("tags", []), list)
                    except Exception:
                        return self._send(400, {"error": "invalid metadata"})
                    hub.validated.append(meta)
                    return self._send(200, {"warnings": []})
                if path == "/api/repos/create":
                    d = json.loads(body)
                    repo = f"{d.get('organization') or 'user'}/{d['name']}"
                    if repo in hub.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": repo})
                    hub.repos[repo] = {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}}
                    return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(
                        200,
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                    )
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
                    repo, rev = f"{parts[2]}/{parts[3]}", "/".join(parts[5:])
                    if repo not in hub.repos:
                        return self._send(404, {"error": "repo not found"})
                    store = hub.repos[repo].setdefault(rev, dict(hub.repos[repo]["main"]))
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            v = item["value"]
                            store[v["path"]] = base64.b64decode(v["content"])
                    return self._send(
                        200,
                        {"success": True, "commitOid": "1" * 40, "commitUrl": f"{hub.url}/{repo}/commit/{'1' * 40}"},
                    )
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "branch":
                    repo = f"{parts[2]}/{parts[3]}"
                    hub.repos[repo].setdefault("/".join(parts[5:]), dict(hub.repos[repo]["main"]))
                    return self._send(200, {})
                return self._send(404, {"error": f"unknown route {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
