"""`cumo-mlx serve`: an OpenAI-compatible HTTP server for a CuMo model, images included.

The flags follow mlx-lm's and llama.cpp's servers. The model is found (a hub id downloaded and
converted on first use) and the port taken first, so a missing model or a port in use is an error at
once; the model then loads in the background while /health answers 503, and a model that cannot be
loaded stops the server with its error. SIGTERM or Ctrl-C stops accepting, lets the
requests in flight finish (a second Ctrl-C cuts them short) and exits 0.
"""

import contextlib
import copy
import os
import signal
import socket
from pathlib import Path

import click
from cumo_mlx.cli.generate import DEFAULT_MODEL
from cumo_mlx.errors import CuMoError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: a free one); CuMoError if it cannot be had."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        return sock
    except (OSError, UnicodeError) as e:
        if sock is not None:
            sock.close()
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        fix = "choose another --port or --host, or stop what uses it"
        raise CuMoError(f"cannot listen on {host}:{port}: {reason}", fix) from None


def model_id(model: str) -> str:
    """The model's name for clients: a local folder's name (not its whole path), else as given."""
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(os.path.expanduser(model)) else model


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


def log_config(level: str) -> dict:
    """uvicorn's logging, with the server's own messages (cumo_mlx.serve) through the same handler."""
    import uvicorn.config

    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["cumo_mlx"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def origins(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(origin.strip() for value in values for origin in value.split(",") if origin.strip())


@contextlib.contextmanager
def clean_exit_on_signals():
    """uvicorn re-raises SIGINT / SIGTERM after its graceful shutdown, for the handler installed
    before it: make that handler a no-op, so a clean stop returns (exit 0)."""
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@click.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="An MLX model directory, a hub id (converted on first use), or `demo`.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0: any free one).")
@click.option("--api-key", default=None, help="Require `Authorization: Bearer KEY` on the API (not on /health).")
@click.option("--allowed-origins", multiple=True, metavar="ORIGINS",
              help="Browser origins allowed to call the API (CORS), comma-separated or repeated; '*' for any.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most sequences generated together (continuous batching); more wait in the queue.")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most requests waiting; beyond it: 503 with Retry-After.")
@click.option("--vision-cache-bytes", type=click.IntRange(min=0), default=512 << 20, show_default=True,
              help="Memory for the features of images seen recently (0: no cache).")
@click.option("--allow-local-files", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="Let requests name image files inside DIR (none by default).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True, help="Server log detail.")
def serve(model, host, port, api_key, allowed_origins, max_batch_size, max_queue, vision_cache_bytes,
          allow_local_files, log_level):  # fmt: skip
    """Serve --model over OpenAI's chat completions API, images included.

    \b
    cumo-mlx serve --model demo --port 8080
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"messages": [{"role": "user", "content": "Hello"}]}'
    """
    import cumo_mlx
    import uvicorn
    from cumo_mlx.loader import resolve_model_path
    from cumo_mlx.serve.app import ServerConfig, create_app
    from cumo_mlx.serve.backend import BatchBackend

    if api_key is not None and not api_key.strip():
        raise CuMoError("the API key is empty", "give a key, or leave --api-key out")
    path = resolve_model_path(model)  # a hub id is downloaded and converted here, on first use
    sock = listen(host, port)

    def loaded(error):
        if error is None:
            click.echo(f"cumo-mlx: {model} is ready at {url(sock)}/v1", err=True)
        else:
            server.should_exit = True  # its error is reported once the server has stopped

    backend = BatchBackend(lambda: cumo_mlx.load(path), max_queue=max_queue, max_batch_size=max_batch_size,
                           vision_cache_bytes=vision_cache_bytes, on_loaded=loaded)  # fmt: skip
    app = create_app(backend, ServerConfig(model_id(model), api_key, origins(allowed_origins), allow_local_files))
    server = uvicorn.Server(uvicorn.Config(app, log_config=log_config(log_level), log_level=log_level, lifespan="off"))
    click.echo(f"cumo-mlx: loading {model}; listening on {url(sock)}", err=True)
    backend.start()
    try:
        with clean_exit_on_signals():
            server.run(sockets=[sock])
    finally:
        backend.close(timeout=5)
        sock.close()
    if backend.load_error is not None:
        raise backend.load_error
