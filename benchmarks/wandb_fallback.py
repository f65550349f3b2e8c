"""How long ``nclightning.loggers.WandbLogger`` takes to start when W&B cannot be used.

    python benchmarks/wandb_fallback.py [--connect-timeout 5] [--init-timeout 30]

With a (fake) API key and ``WANDB_BASE_URL`` pointing at loopback services that W&B cannot
use (a closed port; a port that accepts connections and never answers; an HTTP server that
answers 401 to everything, as W&B does a bad key; one that answers a health check but never
an API call), times ``logger.experiment`` until the run logs (offline) and prints why it fell
back. The bound is ``connect_timeout + init_timeout`` plus the offline start.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


class _Reject(BaseHTTPRequestHandler):
    def _reply(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _reply

    def log_message(self, *args) -> None:
        pass


class _AnswerThenHang(_Reject):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        time.sleep(3600)


def _closed() -> tuple[int, object]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1], None


def _silent() -> tuple[int, object]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s.getsockname()[1], s  # the backlog accepts connections; nothing ever answers


def _http(handler) -> tuple[int, object]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], server


def _time_start(port: int, connect: float, init: float) -> tuple[float, str]:
    import wandb

    from nclightning.loggers import WandbLogger, is_offline

    wandb.teardown()
    os.environ["WANDB_BASE_URL"] = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as folder:
        logger = WandbLogger(
            project="bench", save_dir=folder, connect_timeout=connect, init_timeout=init
        )
        start = time.monotonic()
        run = logger.experiment
        run.log({"x": 1.0})
        elapsed = time.monotonic() - start
        assert is_offline(run), "the run did not fall back to offline mode"
        run.finish()
    return elapsed, logger.fallback_reason or ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    parser.add_argument("--init-timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    os.environ.pop("WANDB_MODE", None)
    os.environ.update(WANDB_API_KEY=FAKE_KEY, WANDB_SILENT="true")
    cases = {
        "closed port": _closed,
        "silent socket": _silent,
        "rejects the key (401)": lambda: _http(_Reject),
        "API never answers": lambda: _http(_AnswerThenHang),
    }
    bound = args.connect_timeout + args.init_timeout
    print(f"connect_timeout={args.connect_timeout:g} s, init_timeout={args.init_timeout:g} s")
    for name, make in cases.items():
        port, keep = make()
        elapsed, reason = _time_start(port, args.connect_timeout, args.init_timeout)
        print(f"{name:>22}: offline after {elapsed:5.1f} s (bound {bound:g} s + offline start)")
        print(f"{'':>24}{reason[:110]}")
        del keep
    return 0


if __name__ == "__main__":
    sys.exit(main())
