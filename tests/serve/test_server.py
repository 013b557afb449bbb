"""`cumo-mlx serve`'s API through the official `openai` client and raw HTTP, against a real uvicorn
on a free local port: answers equal `cumo_mlx.generate`'s, streams add up, usage, stop strings,
logprobs, multi-turn images, 32 concurrent streams, a dropped stream, fuzzed bodies, and every refusal.

One tiny model and one backend serve the whole module (apps with other settings share it).
"""

import json
import os
import threading
import time

import cumo_mlx
import numpy as np
import openai
import pytest
from cumo_mlx.prompt import chat_prompt
from cumo_mlx.serve.app import ServerConfig
from cumo_mlx.serve.backend import BatchBackend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from serving import data_uri, http_site, metric, post, request, serving
from tiny_models import tiny_config, write_text_model

QUESTION = "What shape is this?"
WORDS = "red green blue yellow purple orange white black one two three circle square triangle star".split()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return cumo_mlx.load(write_text_model(tmp_path_factory.mktemp("tiny-serve"), tiny_config()))


@pytest.fixture(scope="module")
def backend(loaded):
    backend = BatchBackend(lambda: loaded).start()
    assert backend.ready.wait(30)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def port(backend):
    with serving(backend, ServerConfig("tiny", keepalive_s=0.05)) as port:
        yield port


@pytest.fixture(scope="module")
def client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in ((20, 34, 3), (40, 24, 3))]


def user(*parts) -> dict:
    """A user message of parts in order: text (a string), an Image (sent as a data: URI), an image URL ({"url": ...})."""

    def part(p):
        if isinstance(p, str):
            return {"type": "text", "text": p}
        return {"type": "image_url", "image_url": p if isinstance(p, dict) else {"url": data_uri(p)}}

    return {"role": "user", "content": [part(p) for p in parts]}


def ask(client, messages, **kwargs):
    return client.chat.completions.create(model="tiny", messages=messages, **{"temperature": 0, "max_tokens": 16, **kwargs})


def streamed(client, messages, **kwargs) -> tuple[str, list]:
    chunks = list(ask(client, messages, stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_one_image_and_a_question_answer_as_generate(client, loaded, images):
    model, processor = loaded
    expected = cumo_mlx.generate(model, processor, QUESTION, images[0], temp=0.0, max_tokens=16)
    ids = processor.tokenize(chat_prompt([f"<image>\n{QUESTION}"]))  # what `cumo-mlx generate` builds
    for parts in ((QUESTION, images[0]), (images[0], QUESTION)):  # lmms-eval sends the text first
        response = ask(client, [user(*parts)])
        assert response.choices[0].message.content == expected and expected.strip()
        assert response.choices[0].finish_reason == "length" and response.model == "tiny"
        usage = response.usage
        assert usage.prompt_tokens == len(ids) - 1 + model.args.image_tokens  # the image as its spliced rows
        assert usage.completion_tokens == 16 and usage.total_tokens == usage.prompt_tokens + 16


def test_system_messages_multi_turn_and_placed_images(client, loaded, images):
    model, processor = loaded
    messages = [{"role": "system", "content": "Be brief."}, user(QUESTION, images[0]),
                {"role": "assistant", "content": "a red circle"}, user(images[1], "What color is it?")]  # fmt: skip
    ids = processor.tokenize(chat_prompt([f"<image>\n{QUESTION}", "a red circle", "<image>\nWhat color is it?"], "Be brief."))
    expected = cumo_mlx.generate(model, processor, ids, images, temp=0.0, max_tokens=16)
    assert ask(client, messages).choices[0].message.content == expected
    placed = "Compare <image> with <image>, please."
    expected = cumo_mlx.generate(model, processor, placed, images, temp=0.0, max_tokens=16)
    assert ask(client, [user(images[0], placed, images[1])]).choices[0].message.content == expected
    expected = cumo_mlx.generate(model, processor, QUESTION, temp=0.0, max_tokens=16, system="")
    assert ask(client, [{"role": "system", "content": ""}, {"role": "user", "content": QUESTION}]).choices[0].message.content == expected


def test_streaming_adds_up_to_the_answer_with_usage(client, images):
    whole = ask(client, [user(QUESTION, images[0])], max_tokens=20)
    text, chunks = streamed(client, [user(QUESTION, images[0])], max_tokens=20, stream_options={"include_usage": True})
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert not chunks[-1].choices and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1


def test_end_of_sequence_finishes_with_stop(client):
    response = ask(client, [{"role": "user", "content": QUESTION}], logit_bias={"2": 100})  # `</s>` first
    assert response.choices[0].message.content == "" and response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == 1


def test_stop_strings_across_token_boundaries(client, images):
    messages = [user(QUESTION, images[0])]
    full, chunks = streamed(client, messages, max_tokens=24)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    k = next(i for i in range(2, len(pieces)) if len(pieces[i - 1]) >= 2 and len(pieces[i]) >= 2)
    stop = pieces[k - 1][-2:] + pieces[k][:2]  # spans two tokens' text
    before = full[: full.index(stop)]
    for stops in (stop, ["never there", stop]):
        response = ask(client, messages, max_tokens=24, stop=stops)
        assert response.choices[0].message.content == before and response.choices[0].finish_reason == "stop"
        text, chunks = streamed(client, messages, max_tokens=24, stop=stops)
        assert text == before and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    response = ask(client, messages, max_tokens=24, stop="never there")
    assert response.choices[0].message.content == full and response.choices[0].finish_reason == "length"


def test_logprobs(client, images):
    messages = [user(QUESTION, images[0])]
    response = ask(client, messages, max_tokens=8, logprobs=True, top_logprobs=3)
    entries = response.choices[0].logprobs.content
    assert len(entries) == 8
    for entry in entries:  # greedy: each token is its likeliest
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode() == entry.token
    assert "".join(e.token for e in entries).strip() == response.choices[0].message.content.strip()
    chunks = list(ask(client, messages, max_tokens=8, logprobs=True, top_logprobs=3, stream=True))
    assert [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content] == entries
    assert ask(client, messages, max_tokens=8).choices[0].logprobs is None


def test_seed_repeats_a_sampled_answer(client, images):
    def sampled(seed: int) -> str:
        reply = ask(client, [user(QUESTION, images[0])], temperature=2.0, max_tokens=12, seed=seed)
        return reply.choices[0].message.content

    assert sampled(7) == sampled(7)
    assert len({sampled(seed) for seed in range(4)}) > 1  # (a seed that did nothing could still repeat by chance)


def test_32_concurrent_streams_each_get_their_own_answer(client, images):
    questions = [f"{QUESTION} {WORDS[i % len(WORDS)]} {i}" for i in range(32)]
    messages = [[user(q, images[i % 2]) if i % 3 else {"role": "user", "content": q}] for i, q in enumerate(questions)]
    expected = [ask(client, m, max_tokens=12).choices[0].message.content for m in messages]  # one at a time
    results, start = [None] * 32, threading.Barrier(32)

    def run(i):
        start.wait()
        results[i] = streamed(client, messages[i], max_tokens=12)[0]

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(32)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "some streams did not finish in time"
    assert results == expected and len(set(expected)) > 1


def test_a_dropped_stream_cancels_its_generation(port, backend):
    import http.client

    before = metric(port, "cancelled_total")
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 3900, "stream": True, "temperature": 0}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    while b'"content": "' not in (line := response.readline()) or b'"content": ""' in line:
        pass  # until the first token's text arrives
    connection.sock.close()  # the client goes away mid-answer
    connection.close()
    deadline = time.monotonic() + 20
    while metric(port, "cancelled_total") == before or backend.stats().running:
        assert time.monotonic() < deadline, "the generation went on after the client left"
        time.sleep(0.05)
    status, answer = post(port, {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2})
    assert status == 200 and answer["usage"]["completion_tokens"] == 2  # the server goes on serving


BAD_REQUESTS = {
    "malformed JSON": (b'{"messages": [', "not valid JSON"),
    "not an object": ([1, 2], "Input should be an object"),
    "no messages": (b'{"max_tokens": 2}', "messages: Field required"),
    "empty messages": ({"messages": []}, "messages"),
    "content of the wrong type": ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    "unknown part": ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages.0.content"),
    "empty message": ({"messages": [{"role": "user", "content": "  "}]}, "the message is empty"),
    "ends with the assistant": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
                                "start and end with a user message"),
    "system after a turn": ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]}, "must come first"),
    "image in a system message": ({"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                                                {"role": "user", "content": "hi"}]}, "cannot hold images"),
    "max_tokens a string": ({"max_tokens": "5"}, "max_tokens"),
    "max_tokens negative": ({"max_tokens": -1}, "max_tokens"),
    "max_tokens absurd": ({"max_tokens": 10**12}, "do not fit"),
    "temperature absurd": ({"temperature": 1e9}, "temperature"),
    "temperature NaN": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "finite"),
    "top_p zero": ({"top_p": 0}, "top_p"),
    "seed negative": ({"seed": -1}, "seed"),
    "stream not a boolean": ({"stream": "yes"}, "stream"),
    "n 2": ({"n": 2}, "n must be 1"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    "json response format": ({"response_format": {"type": "json_object"}}, "response_format"),
    "presence penalty": ({"presence_penalty": 0.5}, "repetition_penalty"),
    "five stop strings": ({"stop": list("abcde")}, "at most 4"),
    "empty stop string": ({"stop": [""]}, "must not be empty"),
    "top_logprobs without logprobs": ({"top_logprobs": 2}, "needs logprobs"),
    "top_logprobs over 20": ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "logit_bias outside the vocabulary": ({"logit_bias": {"100000": 1}}, "logit_bias"),
    "stream_options without stream": ({"stream_options": {"include_usage": True}}, "stream_options"),
    "lone surrogate": ({"messages": [{"role": "user", "content": "\ud800"}]}, "not valid JSON"),
    "bytes not UTF-8": (b'{"messages": [{"role": "user", "content": "\xff"}]}', "not valid JSON"),
    "a placeholder in the system text": ({"messages": [{"role": "system", "content": "<image>"}, {"role": "user", "content": "hi"}]}, "cannot place"),
    "a placeholder in an answer": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>"},
                                                 {"role": "user", "content": "hi"}]}, "cannot hold images"),
    "placeholders without images": ({"messages": [{"role": "user", "content": "Compare <image> and <image>"}]}, "placeholder"),
    "prompt over the context": ({"messages": [{"role": "user", "content": "red " * 5000}]}, "over the model's context"),
    "data URI not base64": ({"messages": [user(QUESTION, {"url": "data:image/png;base64,@@"})]}, "base64"),
    "data URI not an image": ({"messages": [user(QUESTION, {"url": "data:image/png;base64,aGVsbG8="})]}, "cannot read"),
    "data URI of text": ({"messages": [user(QUESTION, {"url": "data:text/plain;base64,aGk="})]}, "data:image"),
    "ftp URL": ({"messages": [user(QUESTION, {"url": "ftp://127.0.0.1/x.png"})]}, "unsupported"),
    "javascript URL": ({"messages": [user(QUESTION, {"url": "javascript:alert(1)"})]}, "unsupported"),
    "local file not allowed": ({"messages": [user(QUESTION, {"url": "/etc/passwd"})]}, "local files"),
    "file URL not allowed": ({"messages": [user(QUESTION, {"url": "file:///etc/passwd"})]}, "local files"),
    "unreachable URL": ({"messages": [user(QUESTION, {"url": "http://127.0.0.1:9/x.png"})]}, "cannot download"),
    "nine images": ({"messages": [user(QUESTION, *[{"url": "x"}] * 9)]}, "over the limit of 8"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_are_400_in_openai_shape(port, case):
    body, fragment = BAD_REQUESTS[case]
    if isinstance(body, dict):
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2, **body}
    status, answer = post(port, body)
    assert status == 400, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert fragment in error["message"], error


def test_other_statuses(port):
    status, headers, body = request(port, "GET", "/v1/nowhere")
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
    status, _, body = request(port, "GET", "/v1/chat/completions")
    assert status == 405 and "error" in json.loads(body)
    status, headers, body = request(port, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b"<title>CuMo chat</title>" in body
    status, _, body = request(port, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["tiny"]
    assert request(port, "GET", "/health")[0] == 200
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2, "n": 1, "tool_choice": "none"}
    status, answer = post(port, body, path="/chat/completions")  # without /v1 too
    assert status == 200 and answer["object"] == "chat.completion"


def test_images_by_url_and_local_file_answer_as_data_uris(backend, client, images, tmp_path):
    expected = ask(client, [user(QUESTION, images[0])]).choices[0].message.content
    images[0].save(tmp_path / "shape.png")
    (tmp_path / "allowed").mkdir()
    os.symlink(tmp_path / "shape.png", tmp_path / "allowed" / "escape.png")
    images[0].save(tmp_path / "allowed" / "shape.png")
    routes = {"/shape.png": (200, {"Content-Type": "image/png"}, (tmp_path / "shape.png").read_bytes())}
    with http_site(routes) as site, serving(backend, ServerConfig("tiny", allow_local_files=tmp_path / "allowed")) as port:
        local = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        for url in (f"{site}/shape.png", "shape.png", str(tmp_path / "allowed" / "shape.png")):
            assert ask(local, [user(QUESTION, {"url": url})]).choices[0].message.content == expected, url
        for url in ("escape.png", str(tmp_path / "shape.png"), "../shape.png"):
            with pytest.raises(openai.BadRequestError, match="outside the folder"):
                ask(local, [user(QUESTION, {"url": url})])


def test_body_over_the_limit_is_413(backend):
    with serving(backend, ServerConfig("tiny", max_body_bytes=4096)) as port:
        small = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}
        assert post(port, small)[0] == 200
        status, answer = post(port, {**small, "messages": [{"role": "user", "content": "red " * 2000}]})
        assert status == 413 and answer["error"]["code"] == "request_too_large"


def test_api_key_and_cors(backend):
    origin = "http://page.example"
    with serving(backend, ServerConfig("tiny", api_key="secret", allowed_origins=(origin,))) as port:
        body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
            status, answer = post(port, body, headers)
            assert status == 401 and answer["error"]["type"] == "authentication_error"
        assert post(port, body, {"Authorization": "Bearer secret"})[0] == 200
        assert request(port, "GET", "/metrics")[0] == 401 and request(port, "GET", "/v1/models")[0] == 401
        assert request(port, "GET", "/health")[0] == 200  # no key needed
        preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
        status, headers, _ = request(port, "OPTIONS", "/v1/chat/completions", headers=preflight)
        assert status == 200 and headers["access-control-allow-origin"] == origin
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret", max_retries=0)
        assert ask(client, [{"role": "user", "content": QUESTION}], max_tokens=3).usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            ask(openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0), [user("hi")])


def test_full_queue_is_503_with_retry_after(loaded, backend):
    import http.client

    busy = BatchBackend(lambda: loaded, max_queue=1, max_batch_size=1).start()  # the module's backend is idle meanwhile
    assert busy.ready.wait(30)
    long = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 3900, "stream": True})
    connections = []
    try:
        with serving(busy) as port:
            for _ in range(2):  # one generating, one waiting
                connections.append(http.client.HTTPConnection("127.0.0.1", port, timeout=30))
                connections[-1].request("POST", "/v1/chat/completions", long, {"Content-Type": "application/json"})
                deadline = time.monotonic() + 10
                while busy.stats().running + busy.stats().queue_depth < len(connections):
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            status, headers, body = request(port, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
            assert status == 503 and int(headers["retry-after"]) >= 1 and json.loads(body)["error"]["type"] == "server_error"
            for connection in connections:
                connection.close()
    finally:
        busy.close(timeout=30)


def test_health_is_503_while_loading(loaded):
    release = threading.Event()
    loading = BatchBackend(lambda: (release.wait(30), loaded)[1]).start()
    try:
        with serving(loading) as port:
            assert request(port, "GET", "/health")[0] == 503
            status, headers, _ = request(port, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
            assert status == 503 and "retry-after" in headers
            release.set()
            assert loading.ready.wait(30) and request(port, "GET", "/health")[0] == 200
    finally:
        release.set()
        loading.close(timeout=30)


# Fuzzing: valid requests with fields replaced by any JSON, and bodies that are not JSON at all.
SCALARS = (st.none() | st.booleans() | st.integers(-3, 40) | st.sampled_from([0, 2**31, 2**63, 2**64, -(2**63), 10**30])
           | st.floats(-5, 5) | st.text(max_size=12) | st.sampled_from(["", "<image>", "</s>", "[INST]", "\x00"]))  # fmt: skip
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
URLS = st.sampled_from(["data:image/png;base64,iVBORw0KGgo=", "file:///etc/passwd", "/etc/passwd", "../x.png",
                        "ftp://127.0.0.1/x", "http://127.0.0.1:9/x.png", "javascript:alert(1)", "data:,x"])  # fmt: skip
TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)})
IMAGE_PART = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": URLS})})
PART = st.one_of(TEXT_PART, IMAGE_PART, st.dictionaries(st.sampled_from(["type", "text", "image_url"]), JSON, max_size=3))
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer"]),
     "content": st.one_of(st.text(max_size=20), st.lists(TEXT_PART | IMAGE_PART, max_size=3), st.lists(PART, max_size=2), JSON)}  # fmt: skip
)
FIELDS = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
          "repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "stream", "stream_options", "n", "tools",
          "response_format", "frequency_penalty", "messages"]  # fmt: skip
BODIES = st.one_of(
    st.builds(lambda changes, messages: {"messages": messages, "max_tokens": 2, **changes},
              st.dictionaries(st.sampled_from(FIELDS), SCALARS | JSON, max_size=3), st.lists(MESSAGE, min_size=1, max_size=3)),
    st.binary(max_size=64),
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=BODIES)
def test_fuzzed_bodies_never_fail_the_server(port, body):
    if isinstance(body, dict):
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 64:
            body["max_tokens"] = 64  # keep each answer short
        body = json.dumps(body).encode()
    status, _, answer = request(port, "POST", "/v1/chat/completions", body)
    assert status in (200, 400), answer
    if status == 400:
        assert json.loads(answer)["error"]["type"] == "invalid_request_error"
    elif answer.startswith(b"data:"):
        assert answer.endswith(b"data: [DONE]\n\n")
    assert request(port, "GET", "/health")[0] == 200
