"""What the server tests share: a tiny model that answers in plain text, a real uvicorn on a free
local port in a thread, raw HTTP requests, and images as data: URIs."""

import base64
import http.client
import io
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import cumo_mlx
import mlx.core as mx
import uvicorn
from cumo_mlx.loader import save
from cumo_mlx.serve.app import ServerConfig, create_app
from PIL import Image
from tiny_models import write_mlx_model


def write_text_model(directory: Path, config: dict) -> Path:
    """A tiny CuMo whose LM head cannot pick special or byte-fallback pieces (their rows are 0):
    greedy answers are plain text that never ends on its own (as tests/test_generate.py's)."""
    write_mlx_model(directory, config)
    model, processor = cumo_mlx.load(directory)
    pieces = processor.tokenizer.convert_ids_to_tokens(list(range(config["vocab_size"])))
    blocked = mx.array([i for i, piece in enumerate(pieces) if i < 3 or piece.startswith("<0x")])
    weight = model.language_model.lm_head.weight
    weight[blocked] = 0
    model.language_model.lm_head.weight = weight
    save(directory, model, tokenizer_source=directory)
    return directory


def data_uri(image: Image.Image, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


@contextmanager
def serving(backend, config: ServerConfig = ServerConfig("tiny")):
    """`create_app(backend, config)` under a real uvicorn on 127.0.0.1: yields its port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(backend, config), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def request(port: int, method: str, path: str, body=None, headers=None, timeout: float = 30):
    """(status, headers, body bytes) of one HTTP request; a dict body is sent as JSON."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def post(port: int, body, headers=None, path: str = "/v1/chat/completions"):
    """(status, parsed JSON body or the raw bytes) of a POST."""
    status, _, data = request(port, "POST", path, body, headers)
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data


def metric(port: int, name: str, headers=None) -> float:
    status, _, text = request(port, "GET", "/metrics", headers=headers)
    assert status == 200
    for line in text.decode().splitlines():
        if line.startswith(f"cumo_mlx_{name} "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


@contextmanager
def http_site(routes: dict):
    """A local http.server on 127.0.0.1 answering GET path -> (status, headers, body); a callable
    body is called with the request handler instead (to answer slowly). Yields its base URL."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Routes(BaseHTTPRequestHandler):
        def do_GET(self):
            status, headers, body = routes.get(self.path, (404, {"Content-Type": "text/plain"}, b"not here"))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if callable(body):
                self.end_headers()
                return body(self)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    site = ThreadingHTTPServer(("127.0.0.1", 0), Routes)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_address[1]}"
    finally:
        site.shutdown()
        site.server_close()
