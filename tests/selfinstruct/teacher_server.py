"""A real OpenAI-compatible server for the self-instruct tests (llama.cpp's, serving SmolLM2), and a fault proxy."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

API_KEY = "test-key-not-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llama_server(gguf: Path, log_file: Path) -> tuple[subprocess.Popen, str]:
    """Start llama-cpp-python's server on 127.0.0.1 serving ``gguf`` as model ``smol`` (key :data:`API_KEY`).

    Returns the process and the base URL once ``/v1/models`` answers; fails the test with the server's log if it
    does not start within two minutes.
    """
    port = free_port()
    log = log_file.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smol",
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2",
                             "--seed", "0", "--api_key", API_KEY], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {API_KEY}"})
            with urllib.request.urlopen(request, timeout=5) as r:
                assert json.load(r)["data"][0]["id"] == "smol"
            return proc, url
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("llama.cpp's server did not start:\n" + log_file.read_text()[-3000:])
            time.sleep(0.5)


class FaultProxy:
    """An HTTP proxy in front of a server that answers the first requests with scripted failures.

    ``faults`` is a list of HTTP status codes (or ``"drop"``: close the connection unanswered) given to the
    first requests, in order; the rest are forwarded. ``seen`` counts the requests.
    """

    def __init__(self, upstream: str, faults: list[int | str]) -> None:
        self.upstream, self.faults, self.seen = upstream.rstrip("/"), list(faults), 0
        self.in_flight = self.peak = 0
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                with lock:
                    proxy.seen += 1
                    proxy.in_flight += 1
                    proxy.peak = max(proxy.peak, proxy.in_flight)
                try:
                    self._answer()
                finally:
                    with lock:
                        proxy.in_flight -= 1

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.faults:
                    fault = proxy.faults.pop(0)
                    if fault == "drop":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    data = json.dumps({"error": {"message": f"scripted {fault}", "code": fault}}).encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                request = urllib.request.Request(proxy.upstream + self.path.removeprefix("/v1"), data=body or None,
                                                 headers=headers, method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=600) as r:
                        status, data = r.status, r.read()
                except urllib.error.HTTPError as exc:
                    status, data = exc.code, exc.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


SEEDS = Path(__file__).resolve().parents[3] / "shared" / "data" / "self_instruct_seed_tasks.jsonl"
