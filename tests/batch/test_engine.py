"""`BatchEngine`: requests join and leave the running batch between decode steps, cancel frees a
place at the next step, caps on sequences and KV bytes queue the rest, and every answer is still
the one `generate` gives alone. Driven step by step, and in its background thread."""

import threading

import mlx.core as mx
import pytest
from cumo_mlx.batch import BatchEngine
from cumo_mlx.errors import CuMoError


def drain(engine: BatchEngine) -> None:
    while engine.step():
        pass


def tokens_of(responses) -> list[int]:
    return [r.token for r in responses if r.token is not None and r.finish_reason != "stop"]


def test_requests_join_and_leave_between_steps(mistral, images, alone):
    engine = BatchEngine(*mistral, max_sequences=4)
    first = engine.submit("Describe the image in detail.", images[0], temp=0.0, max_tokens=20)
    for _ in range(4):
        engine.step()
    assert engine.running == 1
    second = engine.submit("Compare <image> with <image>.", images[1:], temp=0.0, max_tokens=6)
    third = engine.submit("hello", temp=0.0, max_tokens=3)
    engine.step()
    assert engine.running == 3 and engine.waiting == 0
    drain(engine)
    assert engine.running == 0
    for stream, (prompt, entry, limit) in zip(
        (first, second, third),
        (("Describe the image in detail.", images[0], 20), ("Compare <image> with <image>.", images[1:], 6),
         ("hello", None, 3)),
    ):  # fmt: skip
        responses = list(stream)
        tokens, text, reason = alone(mistral, prompt, entry, max_tokens=limit)
        assert tokens_of(responses) == tokens and "".join(r.text for r in responses) == text
        assert responses[-1].finish_reason == reason == "length"
        assert [r.generation_tokens for r in responses] == list(range(1, limit + 1))


def test_cancel_frees_the_place_at_the_next_step(mistral, images, alone):
    engine = BatchEngine(*mistral, max_sequences=1)
    long = engine.submit("Describe the image in detail.", images[0], temp=0.0, max_tokens=200)
    short = engine.submit("hello", temp=0.0, max_tokens=5)
    for _ in range(5):
        engine.step()
    assert engine.running == 1 and engine.waiting == 1
    long.cancel()
    engine.step()
    assert engine.running == 1 and engine.waiting == 0  # the waiting request took the place
    drain(engine)
    responses = list(long)
    assert responses[-1].finish_reason == "cancelled" and responses[-1].token is None
    generated = tokens_of(responses)
    assert 0 < len(generated) < 200
    assert generated == alone(mistral, "Describe the image in detail.", images[0], max_tokens=len(generated))[0]
    assert tokens_of(list(short)) == alone(mistral, "hello", None, max_tokens=5)[0]


def test_a_kv_byte_cap_queues_requests_and_refuses_one_that_cannot_fit(mistral, alone):
    engine = BatchEngine(*mistral, max_sequences=8)
    prompt_positions = len(engine.processor.tokenize("<s>[INST] hi [/INST]")) + 80
    cap = int(1.5 * (prompt_positions + 8) * engine.kv_position_bytes)  # room for one request, not two
    engine = BatchEngine(*mistral, max_sequences=8, max_kv_bytes=cap)
    questions = ["hello", "What shape is this?", "one two three"]
    streams = [engine.submit(q, temp=0.0, max_tokens=8) for q in questions]
    engine.step()
    assert engine.running == 1 and engine.waiting == 2
    most = 0
    while engine.step():
        most = max(most, engine.running)
    assert most == 1
    for stream, question in zip(streams, questions):
        assert tokens_of(list(stream)) == alone(mistral, question, None, max_tokens=8)[0]
    with pytest.raises(CuMoError, match="over the cap of"):
        engine.submit("hello", max_tokens=4000)


def test_stop_token_and_per_request_options(mistral, alone):
    """A request forced to `</s>` stops alone; its neighbour's answer is unaffected."""
    model, processor = mistral
    eos = processor.tokenizer.eos_token_id
    engine = BatchEngine(model, processor)
    stopped = engine.submit("hello", temp=0.0, max_tokens=10, logit_bias={eos: 1e9})
    other = engine.submit("What shape is this?", temp=0.0, max_tokens=10)
    drain(engine)
    (response,) = list(stopped)
    assert response.finish_reason == "stop" and response.token == eos and response.text == ""
    responses = list(other)
    assert tokens_of(responses) == alone(mistral, "What shape is this?", None, max_tokens=10)[0]
    vocab_size = model.args.text_config.vocab_size
    assert all(r.logprobs.shape == (vocab_size,) and int(mx.argmax(r.logprobs)) == r.token for r in responses)


def test_a_bad_request_ends_alone(mistral, alone, tmp_path):
    engine = BatchEngine(*mistral)
    bad = engine.submit("What is this?", tmp_path / "missing.png", temp=0.0, max_tokens=4)
    good = engine.submit("hello", temp=0.0, max_tokens=4)
    drain(engine)
    (response,) = list(bad)
    assert response.finish_reason == "error" and response.error.startswith("image 1: image file not found")
    assert tokens_of(list(good)) == alone(mistral, "hello", None, max_tokens=4)[0]
    for call, message in (
        (lambda: engine.submit("hi", kv_bits=8), "kv_bits is not supported"),
        (lambda: engine.submit("hi", max_tokens=0), "max_tokens must be at least 1"),
        (lambda: engine.submit("<image>"), "0 image(s) were given"),
        (lambda: engine.submit([1, 5, -200], ["x.png"]), "the prompt ends with an image"),
    ):
        with pytest.raises(CuMoError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()


def test_background_thread_serves_submitters_on_other_threads(mistral, images, alone):
    questions = [("What shape is this?", images[0]), ("hello", None), ("Describe it.", images[1]), ("one", None)]
    results, seen = {}, []
    with BatchEngine(*mistral, max_sequences=2) as engine:

        def ask(index, question, image):
            stream = engine.submit(question, image, temp=0.0, max_tokens=6, on_response=seen.append)
            results[index] = list(stream)

        threads = [threading.Thread(target=ask, args=(i, *q)) for i, q in enumerate(questions)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        endless = engine.submit("Describe the image in detail.", temp=0.0, max_tokens=4000)
    for i, (question, image) in enumerate(questions):
        assert tokens_of(results[i]) == alone(mistral, question, image, max_tokens=6)[0]
    assert len(seen) == sum(len(r) for r in results.values())  # on_response saw every response
    assert list(endless)[-1].finish_reason == "cancelled"  # close() ends what is left


def test_call_runs_work_on_the_engine_thread_between_steps(mistral, alone):
    with BatchEngine(*mistral) as engine:
        stream = engine.submit("hello", temp=0.0, max_tokens=12)
        where = engine.call(threading.current_thread).result(timeout=60)
        with pytest.raises(ZeroDivisionError):  # the caller gets the exception; the engine goes on
            engine.call(lambda: 1 / 0).result(timeout=60)
        assert tokens_of(list(stream)) == alone(mistral, "hello", None, max_tokens=12)[0]
    assert where.name == "cumo-mlx-batch-engine"
