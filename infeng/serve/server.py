"""Start the server: the engine, its adapters, the app, and uvicorn on a socket bound here (so a
port of 0 gets a free port, printed before the first request can arrive).

SIGTERM / SIGINT: /ready turns 503 and new generation requests get 503, uvicorn stops accepting
connections and waits up to the grace period for the requests in flight, then the engine thread
stops and the process exits 0.
"""
from __future__ import annotations

import logging
import socket
import sys

try:    # the serve extra; infeng.serve.require() names it when missing
    import uvicorn
except ImportError:
    uvicorn = None

from infeng.errors import InfengError
from infeng.runtime.engine import Engine
from infeng.runtime.sampler import SamplingParams
from infeng.serve.app import Server, ServeConfig, create_app


def _uvicorn(config, srv: Server):
    """uvicorn's server, which marks the app draining on SIGTERM / SIGINT."""
    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame):
            srv.draining = True
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its graceful shutdown (death by SIGTERM); a
            # stop that was asked for and drained cleanly exits 0 instead
            getattr(self, "_captured_signals", []).clear()
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


def serve(engine: Engine, cfg: ServeConfig, host: str, port: int, grace_s: float, log_level: str = "info",
          switch_interval_s: float = 0.0005) -> None:
    defaults = SamplingParams.with_model_defaults(engine.model.generation)
    srv = Server(engine, cfg, defaults)
    app = create_app(srv)
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
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=grace_s,
                            log_level=log_level, lifespan="on", timeout_keep_alive=5)
    server = _uvicorn(config, srv)
    print(f"infeng serve: listening on http://{host}:{shown[1]} (model {cfg.base_name!r}, "
          f"{len(engine.adapters.loaded)} adapter(s))", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
