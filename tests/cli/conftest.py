"""Fixtures of the CLI tests: loopback servers that W&B cannot use, the CLI as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cli_support: classes for configs

REPO = Path(__file__).resolve().parents[2]
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, the format of a W&B key


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server():
    """A loopback port that accepts connections and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


class _Reject(BaseHTTPRequestHandler):
    def _reply(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = b'{"errors": [{"message": "invalid API key"}]}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _reply

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def rejecting_server():
    """A loopback HTTP server answering 401 to every request, as a service does a bad key."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Reject)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


class _AnswerThenHang(BaseHTTPRequestHandler):
    """``GET`` (the reachability probe) is answered; ``POST`` (the W&B API) never is."""

    release = threading.Event()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        self.release.wait()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hanging_api_server():
    """A loopback HTTP server that answers a health check but never answers an API call."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _AnswerThenHang)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    _AnswerThenHang.release.set()
    server.shutdown()
    server.server_close()
    _AnswerThenHang.release.clear()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: this worktree first on the path, one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), str(Path(__file__).resolve().parent)]),
        OMP_NUM_THREADS="1",
        WANDB_SILENT="true",
        WANDB_MODE="disabled",
    )
    env.update(extra)
    return {k: v for k, v in env.items() if v is not None}


def run_cli(args: list[str], cwd: Path, timeout: float = 600, **env: str):
    """``python -m nclightning.cli ARGS`` in ``cwd``; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "nclightning.cli", *args],
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli
