"""Stand-ins the tests share: a loopback Hugging Face Hub and a YAML bomb."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "hf_LoopbackTestToken0123456789abcdef"


class FakeHub:
    """Answers the endpoints huggingface_hub uses to create a repo and commit files inline.

    The preupload answer marks every file "regular", so its bytes arrive base64-encoded in the
    NDJSON commit body. Repo "me/forbidden" fails its commit with a 403 whose body echoes the
    Authorization header, as a careless server might.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hub.record("POST", self.path, self.headers)
                status, answer = hub.answer(self.path.split("?")[0], body, self.headers)
                self._send(status, answer)

            def do_GET(self):  # noqa: N802
                hub.record("GET", self.path, self.headers)
                self._send(404, {"error": "not found"})

            def _send(self, status, answer):
                raw = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def record(self, method, path, headers):
        self.requests.append({"method": method, "path": path, "headers": {k.lower(): v for k, v in headers.items()}})

    def answer(self, path, body, headers):
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            self.repos[repo] = payload
            return 200, {"url": f"{self.url}/{repo}", "name": repo, "id": repo}
        if path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in files]}
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit":
            repo = f"{parts[2]}/{parts[3]}"
            if repo == "me/forbidden":
                return 403, {"error": f"token {headers.get('Authorization')} may not write to {repo}"}
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            assert lines[0]["key"] == "header"
            for line in lines[1:]:
                assert line["key"] == "file" and line["value"]["encoding"] == "base64", line["key"]
                self.files.setdefault(repo, {})[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            return 200, {"commitUrl": f"{self.url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40,
                         "pullRequestUrl": None}
        return 404, {"error": f"unexpected endpoint {path}"}


def billion_laughs(path, levels=9):
    """Write a YAML file of ``levels`` nested aliases (9**levels values once expanded) to ``path``."""
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for prev, name in zip("abcdefghijklmn", "bcdefghijklmno"[: levels - 1], strict=False):
        lines.append(f"{name}: &{name} [" + ", ".join(f"*{prev}" for _ in range(9)) + "]")
    path.write_text("\n".join(lines) + f"\ntemplate: *{lines[-1].split('&')[1].split()[0]}\n", encoding="utf-8")
    return path
