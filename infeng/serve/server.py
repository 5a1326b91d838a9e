"""Start the server: the engine, its adapters, the app, and uvicorn on a socket bound here (so a
port of 0 gets a free port, printed before the first request can arrive).

The model loads while the server already listens: /health answers 200 ("loading"), /ready 503,
other paths 503 until the engine is attached. SIGTERM / SIGINT: /ready turns 503 and new
generation requests get 503 while the requests in flight finish (up to the grace period), then
uvicorn stops, the engine thread stops and the process exits 0.
"""
from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from typing import Callable

try:    # the serve extra; infeng.serve.require() names it when missing
    import uvicorn
except ImportError:
    uvicorn = None

from infeng.errors import InfengError
from infeng.runtime.engine import Engine
from infeng.serve.app import Server, ServeConfig, create_app


def _uvicorn(config, srv: Server, grace_s: float):
    """uvicorn's server with a drain of our own: the first SIGTERM / SIGINT marks the app draining
    (/ready and new generation requests answer 503, the socket stays open so probes see it) and
    waits up to the grace period for the requests in flight; then uvicorn shuts down. A second
    signal stops at once."""
    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if srv.draining or not srv.loaded:
                super().handle_exit(sig, frame)
            else:
                srv.draining = True
                threading.Thread(target=self._drain, name="infeng-drain", daemon=True).start()
            # uvicorn re-raises the signal after its graceful shutdown (death by SIGTERM); a
            # stop that was asked for and drained cleanly exits 0 instead
            self._captured_signals.clear()

        def _drain(self):
            deadline = time.monotonic() + grace_s
            while srv.admission.requests > 0 and time.monotonic() < deadline and not self.should_exit:
                time.sleep(0.05)
            self.should_exit = True
    return Draining(config)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InfengError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def serve(load: Callable[[], Engine], cfg: ServeConfig, host: str, port: int, grace_s: float,
          log_level: str = "info", switch_interval_s: float = 0.0005) -> None:
    """Listen at once; ``load()`` builds the engine meanwhile (/ready answers 503 until it has).
    A load that fails stops the server and its error is raised here."""
    srv = Server(cfg)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("infeng.serve.access", "infeng.serve"):
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(log_level.upper())
        lg.propagate = False
    # the engine thread holds the GIL between its C calls; a shorter switch interval lets the
    # event loop answer (a 429, the next chunk) without waiting out the default 5 ms slices
    sys.setswitchinterval(switch_interval_s)
    sock = bind(host, port)
    shown = sock.getsockname()
    server = None

    def stop():
        server.should_exit = True
    app = create_app(srv, load, stop)
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=grace_s,
                            log_level=log_level, lifespan="on", timeout_keep_alive=5)
    server = _uvicorn(config, srv, grace_s)
    print(f"infeng serve: listening on http://{host}:{shown[1]} (model {cfg.base_name!r}, loading)",
          file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    if srv.load_error is not None:
        e = srv.load_error
        raise e if isinstance(e, InfengError) else InfengError(f"loading the model failed ({type(e).__name__}: {e})")
