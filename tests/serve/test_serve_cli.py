"""`cumo-mlx serve` as a user runs it: SIGTERM with a stream in flight (the stream ends cleanly, exit
0), and every startup failure as one `error:` line with exit code 2."""

import http.client
import json
import signal
import socket
import time

import pytest
from cli_util import assert_one_error_line, run_cli
from serving import start_server
from tiny_models import tiny_config, write_text_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_text_model(tmp_path_factory.mktemp("tiny-cli"), tiny_config())


def test_sigterm_lets_the_stream_in_flight_finish_and_exits_0(model_dir):
    process, port, lines = start_server(model_dir)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"messages": [{"role": "user", "content": "What shape is this?"}], "max_tokens": 2000, "stream": True,
                "logit_bias": {"2": -100}}  # never `</s>`: the answer goes on to max_tokens
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")  # the stream is on
        process.send_signal(signal.SIGTERM)
        rest = response.read().decode()  # the answer goes on to its end
        chunks = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
        assert rest.endswith("data: [DONE]\n\n") and chunks[-1]["choices"][0]["finish_reason"] == "length"
        tokens = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
        assert tokens > 1000  # most tokens' text comes in its own chunk
        assert process.wait(30) == 0, "".join(lines)
        with pytest.raises(OSError):  # nothing listens any more
            socket.create_connection(("127.0.0.1", port), timeout=2)
    finally:
        process.kill()
        process.wait()


def test_port_in_use(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run_cli("serve", "--model", model_dir, "--port", taken.getsockname()[1])
    assert "cannot listen on 127.0.0.1:" in assert_one_error_line(code, err)


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--model", "{tmp}/nowhere"], "model directory not found"),
        (["--port", "70000"], "is not in the range"),
        (["--port", "http"], "is not a valid integer"),
        (["--max-queue", "0"], "is not in the range"),
        (["--max-batch-size", "-1"], "is not in the range"),
        (["--vision-cache-bytes", "-5"], "is not in the range"),
        (["--allow-local-files", "{tmp}/nowhere"], "does not exist"),
        (["--log-level", "chatty"], "is not one of"),
        (["--api-key", " "], "the API key is empty"),
        (["--host", "192.0.2.1"], "cannot listen on 192.0.2.1"),  # an address of no interface here
        (["--frobnicate"], "No such option"),
    ],
)
def test_startup_failures_are_one_line(model_dir, tmp_path, flags, fragment):
    flags = [f.format(tmp=tmp_path) for f in flags]
    code, out, err = run_cli("serve", "--model", model_dir, "--port", "0", *flags)
    assert fragment in assert_one_error_line(code, err)


def test_a_model_that_fails_to_load_stops_the_server(model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in model_dir.iterdir():
        (broken / path.name).write_bytes(b"garbage" if path.suffix == ".safetensors" else path.read_bytes())
    tic = time.monotonic()
    code, _, err = run_cli("serve", "--model", broken, "--port", "0", "--log-level", "critical")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "cannot load the weights" in errors[0], err
    assert "Traceback" not in err and time.monotonic() - tic < 30
