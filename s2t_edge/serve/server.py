"""Running the server: load the model once, start the engine thread, serve HTTP with uvicorn.

Ctrl-C / SIGTERM: the listener closes, new requests get 503, queued ones end at once with a
clean error, running ones get `grace` seconds to finish (then end with an error event), and the
engine thread is joined before the process exits.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from s2t_edge.errors import S2TError
from s2t_edge.runtime import build_policy, open_models

log = logging.getLogger("s2t_edge.serve")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    model: str | None = None
    bundle: str | None = None
    adapter_scale: float | None = None  # the bundle's LoRA adapter at another scale than its own
    parallel: int = 4
    queue: int = 16
    api_key: str | None = None
    ctx: int = 4096  # per request
    max_tokens: int = 512  # default answer length
    threads: int | None = None
    gpu_layers: int = 0
    grace: float = 10.0
    pull: bool | None = None  # a missing registry model: pull (True), refuse (False), ask on a terminal (None)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), so the URL printed is already reachable."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise S2TError(f"cannot resolve --host {host}: {e}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise S2TError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


def model_name(model: str | None, path: Path) -> str:
    """The id clients use: the registry name, or the GGUF file's stem for a path."""
    if model and not model.endswith(".gguf") and "/" not in model:
        return model
    return path.stem


def run(cfg: ServeConfig, ready: Callable[[str], None] = print) -> None:
    """Serve until Ctrl-C / SIGTERM; `ready(line)` is told the URL once requests are accepted."""
    try:
        import uvicorn

        from s2t_edge.serve.app import create_app
    except ImportError as e:
        raise S2TError(f"`s2t-edge serve` needs the serve extra: pip install 's2t-edge[serve]' ({e})") from None
    from s2t_edge.serve.service import Service
    from s2t_edge.serve.worker import Worker

    if cfg.parallel < 1 or cfg.queue < 0 or cfg.ctx < 16:
        raise S2TError("--parallel must be >= 1, --queue >= 0 and --ctx >= 16")
    models = open_models(
        cfg.model,
        bundle=cfg.bundle,
        ctx=cfg.ctx * cfg.parallel,  # one unified KV cache: a full context for every slot
        threads=cfg.threads,
        gpu_layers=cfg.gpu_layers,
        n_seq=cfg.parallel,
        pull=cfg.pull,
        adapter_scale=cfg.adapter_scale,
    )
    worker = None
    try:
        policy = build_policy(models)
        ctx = min(cfg.ctx, models.slm.n_ctx_seq)
        worker = Worker(models.slm, policy, parallel=cfg.parallel, queue_size=cfg.queue, ctx=ctx)
        name = model_name(cfg.model, models.slm.path)
        svc = Service(models.slm, worker, policy, name, ctx, cfg.max_tokens, cfg.api_key)
        sock = bind(cfg.host, cfg.port)
        worker.start()
        config = uvicorn.Config(
            create_app(svc),
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(cfg.grace) + 5,  # a backstop: the worker ends jobs at `grace`
            lifespan="off",
        )
        server = _make_server(config, on_exit=lambda: worker.shutdown(cfg.grace))
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        if not is_loopback(cfg.host) and not cfg.api_key:
            print(f"warning: {url} has no --api-key: anyone who can reach it can use it", file=sys.stderr)
        ready(f"s2t-edge serve: {url}  (model {name}, policy {policy.name}, parallel {cfg.parallel}, ctx {ctx})")
        server.run(sockets=[sock])
    finally:
        if worker is not None:
            worker.shutdown(0)
            if not worker.join(timeout=cfg.grace + 30):
                log.error("the engine thread did not stop")
        models.close()


def _make_server(config: object, on_exit: Callable[[], None]) -> object:
    """uvicorn's server, which also tells the worker when a signal asks it to stop."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # as uvicorn's, but the signal is not raised again once the server has stopped:
            # `run()` returns, the engine thread is joined and the process exits normally
            on_exit()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True  # a second Ctrl-C: stop waiting for connections
            self.should_exit = True

    return Server(config)
