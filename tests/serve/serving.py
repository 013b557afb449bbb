"""What the server tests share: a real uvicorn on a free local port in a thread, `cumo-mlx serve` in a
subprocess, raw HTTP requests, and images as data: URIs."""

import base64
import http.client
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn
from cumo_mlx.serve.app import ServerConfig, create_app
from PIL import Image


def data_uri(image: Image.Image, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def start_server(model_dir, *flags):
    """`cumo-mlx serve` in a subprocess on a free port: (process, port, its stderr lines so far)."""
    command = [sys.executable, "-c", "from cumo_mlx.cli.main import entry_point; entry_point()",
               "serve", "--model", str(model_dir), "--port", "0", "--log-level", "warning", *flags]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if ready := re.search(r"is ready at http://127\.0\.0\.1:(\d+)/v1", line):
            threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()  # keep draining
            return process, int(ready.group(1)), lines
    process.wait(10)
    pytest.fail(f"the server did not start: {''.join(lines)}")


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
