"""`cumo-mlx generate` and the Python API `cumo_mlx.generate` / `cumo_mlx.stream_generate`, on tiny models."""

import dataclasses
import importlib
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cumo_mlx
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from cumo_mlx.cli.main import main
from cumo_mlx.errors import CuMoError
from cumo_mlx.loader import save
from cumo_mlx.prompt import IMAGE_TOKEN_INDEX, chat_prompt
from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache
from PIL import Image
from tiny_models import tiny_config, write_text_model

QUESTION = "What shape is this?"
generation = importlib.import_module("cumo_mlx.generate")  # the module: `cumo_mlx.generate` is the function


def run_cli(*args, input=None):
    """`cumo-mlx ARGS` in this process: (exit code, stdout, stderr)."""
    with CliRunner().isolation(input=input) as (out, err, _):
        code = main([str(a) for a in args])
    return code, out.getvalue().decode(), err.getvalue().decode()


def cli_command():
    return [sys.executable, "-c", "from cumo_mlx.cli.main import entry_point; entry_point()"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return write_text_model(tmp_path_factory.mktemp("tiny-text"), tiny_config())


@pytest.fixture(scope="session")
def loaded(model_dir):
    return cumo_mlx.load(model_dir)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = [directory / "wide.png", directory / "tall.jpg"]
    Image.fromarray(rng.integers(0, 256, (20, 34, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)).save(paths[1])
    return paths


def greedy(**kwargs):
    return {"temp": 0.0, "max_tokens": 24, **kwargs}


def api_tokens(loaded, prompt, images=None, **kwargs):
    responses = list(cumo_mlx.stream_generate(*loaded, prompt, images, **greedy(**kwargs)))
    return responses, [r.token for r in responses if r.finish_reason != "stop"]


def test_cli_greedy_output_equals_python_api(model_dir, loaded, images):
    code, out, err = run_cli("generate", "--model", model_dir, "--image", images[0], "--prompt", QUESTION,
                             "--temp", 0, "--max-tokens", 24, "--quiet")  # fmt: skip
    assert code == 0, err
    expected = cumo_mlx.generate(*loaded, QUESTION, images[0], **greedy())
    assert expected.strip() and out == expected + "\n"
    assert "==========" not in err  # --quiet: no stats


def test_stats_block_on_stderr(model_dir, images):
    code, out, err = run_cli("generate", "--model", model_dir, "--image", images[0], "--image", images[1],
                             "--prompt", QUESTION, "--max-tokens", 5, "--seed", 1)  # fmt: skip
    assert code == 0, err
    assert out.strip() and "==========" not in out
    stats = err[err.index("==========") :]
    for line in ("Images: 2, ", "Prompt: ", "Generation: 5 tokens, ", "Peak memory: "):
        assert line in stats


def test_json_fields_are_consistent(model_dir, loaded, images):
    model, processor = loaded
    question = "Compare <image> with <image>, please."
    code, out, err = run_cli("generate", "--model", model_dir, "--image", images[0], "--image", images[1],
                             "--prompt", question, "--temp", 0, "--max-tokens", 16, "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)  # stdout holds the one JSON object and nothing else
    assert set(result) == {"text", "tokens", "prompt_tokens", "finish_reason", "stats"}
    assert result["text"] and result["text"] == processor.decode(result["tokens"])
    assert result["prompt_tokens"] == processor.tokenize(chat_prompt([question]))
    assert result["prompt_tokens"].count(IMAGE_TOKEN_INDEX) == 2
    assert result["finish_reason"] == "length" and len(result["tokens"]) == 16
    _, tokens = api_tokens(loaded, question, images, max_tokens=16)
    assert result["tokens"] == tokens
    stats = result["stats"]
    rows = model.args.vision_config.num_patches
    assert stats["images"] == 2 and stats["image_time_s"] > 0
    assert stats["prompt_tokens"] == len(result["prompt_tokens"]) + 2 * (rows - 1)
    assert stats["generation_tokens"] == 16
    assert stats["prompt_tps"] > 0 and stats["generation_tps"] > 0 and stats["peak_memory_gb"] > 0


def scripted_sampler(monkeypatch, tokens, then):
    """Make every sampler emit `tokens`, then `then` forever (generation runs one step ahead)."""
    def make_sampler(*args, **kwargs):
        script = itertools.chain(tokens, itertools.repeat(then))
        return lambda logprobs: mx.array([next(script)])

    monkeypatch.setattr(generation, "make_sampler", make_sampler)


def test_json_after_end_of_sequence(model_dir, loaded, monkeypatch):
    processor = loaded[1]
    words = processor.tokenizer.encode("circle square", add_special_tokens=False)
    eos = processor.tokenizer.eos_token_id
    scripted_sampler(monkeypatch, words + [eos], eos)
    code, out, err = run_cli("generate", "--model", model_dir, "--prompt", QUESTION, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["finish_reason"] == "stop"
    assert result["tokens"] == words  # `</s>` ends the answer and is not part of it
    assert result["text"] == processor.decode(words) == "circle square"
    assert result["stats"]["generation_tokens"] == len(words) + 1 and result["stats"]["images"] == 0


def test_streaming_joins_to_non_streaming_text(loaded, images):
    for prompt, pictures in ((QUESTION, images[0]), ("hello there", None), ("Describe the image in detail.", images)):
        responses, tokens = api_tokens(loaded, prompt, pictures, max_tokens=40)
        text = "".join(r.text for r in responses)
        assert text and text == cumo_mlx.generate(*loaded, prompt, pictures, **greedy(max_tokens=40))
        assert text == loaded[1].decode(tokens)
        assert [r.generation_tokens for r in responses] == list(range(1, 41))
        assert responses[-1].finish_reason == "length" and all(r.finish_reason is None for r in responses[:-1])
    for seed in (1, 2):  # sampling: the same seed, the same text either way
        mx.random.seed(seed)
        streamed = "".join(r.text for r in cumo_mlx.stream_generate(*loaded, QUESTION, images[0], max_tokens=30))
        mx.random.seed(seed)
        assert streamed == cumo_mlx.generate(*loaded, QUESTION, images[0], max_tokens=30)


def test_stream_generate_stops_at_end_of_sequence(loaded):
    eos = loaded[1].tokenizer.eos_token_id
    responses = list(cumo_mlx.stream_generate(*loaded, QUESTION, logit_bias={eos: 1e9}))
    assert len(responses) == 1 and responses[0].finish_reason == "stop" and responses[0].token == eos
    assert responses[0].text == ""


def test_prompt_ids_and_text_only_prompts(model_dir, loaded):
    processor = loaded[1]
    code, out, err = run_cli("generate", "--model", model_dir, "--prompt", "hello there", "--max-tokens", 3, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] == processor.tokenize(chat_prompt(["hello there"]))
    assert IMAGE_TOKEN_INDEX not in result["prompt_tokens"] and result["stats"]["images"] == 0
    for system, expected in (("Be brief.", "Be brief."), ("", None)):
        code, out, err = run_cli(
            "generate", "--model", model_dir, "--prompt", "hello there", "--system", system, "--max-tokens", 2, "--json"
        )
        assert code == 0, err
        assert json.loads(out)["prompt_tokens"] == processor.tokenize(chat_prompt(["hello there"], expected))


def test_prompt_from_stdin(model_dir, images):
    args = ["generate", "--model", str(model_dir), "--image", str(images[0]), "--temp", "0", "--max-tokens", "8"]
    args += ["--json"]
    piped = subprocess.run(cli_command() + args + ["--prompt", "-"], input=QUESTION + "\n", capture_output=True,
                           text=True)  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    code, out, err = run_cli(*args, "--prompt", QUESTION + "\n")
    assert code == 0, err
    assert json.loads(piped.stdout) == {**json.loads(out), "stats": json.loads(piped.stdout)["stats"]}


def test_prefill_in_steps_gives_the_same_answer(loaded, images):
    _, whole = api_tokens(loaded, QUESTION, images)
    _, stepped = api_tokens(loaded, QUESTION, images, prefill_step_size=7)
    assert stepped == whole


def test_kv_cache_options(tmp_path, images):
    config = tiny_config()
    config.update(num_attention_heads=2, num_key_value_heads=1)  # head size 32: a KV quantization group
    model_dir = write_text_model(tmp_path / "m", config)
    model, processor = cumo_mlx.load(model_dir)
    cache = make_prompt_cache(model.language_model)
    kv = {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 0, "max_tokens": 6}
    responses = list(cumo_mlx.stream_generate(model, processor, QUESTION, images[0], prompt_cache=cache, **kv))
    assert len(responses) == 6 and all(isinstance(layer, QuantizedKVCache) for layer in cache)
    for flags in (["--kv-bits", 8, "--kv-group-size", 32, "--quantized-kv-start", 0], ["--max-kv-size", 40]):
        code, out, err = run_cli("generate", "--model", model_dir, "--image", images[0], "--prompt", QUESTION,
                                 "--max-tokens", 6, "--json", *flags)  # fmt: skip
        assert code == 0, err
        assert len(json.loads(out)["tokens"]) == 6


def test_quantized_model(model_dir, tmp_path, images):
    """A model with a 4-bit LLM (as mlx-lm quantizes and reloads it) goes through the same path."""
    model, _ = cumo_mlx.load(model_dir)
    quantization = {"group_size": 32, "bits": 4}
    in_llm = lambda path, module: path.startswith("language_model") and hasattr(module, "to_quantized")  # noqa: E731
    nn.quantize(model, **quantization, class_predicate=in_llm)
    save(tmp_path, model, tokenizer_source=model_dir, extra_config={"quantization": quantization})
    loaded = cumo_mlx.load(tmp_path)
    assert isinstance(loaded[0].language_model.lm_head, nn.QuantizedLinear)
    code, out, err = run_cli("generate", "--model", tmp_path, "--image", images[0], "--prompt", QUESTION,
                             "--temp", 0, "--max-tokens", 12, "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    _, tokens = api_tokens(loaded, QUESTION, images[0], max_tokens=12)
    assert result["tokens"] == tokens and len(tokens) == 12


def test_options_as_one_object_or_as_keywords(loaded, images):
    GenerationOptions = generation.GenerationOptions
    expected = cumo_mlx.generate(*loaded, QUESTION, images[0], **greedy(max_tokens=7))
    assert expected == cumo_mlx.generate(*loaded, QUESTION, images[0], options=GenerationOptions(temp=0.0, max_tokens=7))
    options = GenerationOptions(temp=0.0, max_tokens=99)
    assert expected == cumo_mlx.generate(*loaded, QUESTION, images[0], options=options, max_tokens=7)  # keywords win
    session = cumo_mlx.ChatSession(*loaded)
    session.add_image(images[0])
    assert expected == "".join(r.text for r in session.stream(QUESTION, options=GenerationOptions(temp=0.0, max_tokens=7)))
    with pytest.raises(CuMoError, match=r"top_p must be in \(0, 1\]"):
        GenerationOptions(top_p=0)
    with pytest.raises(CuMoError, match="top_k must be >= 0"):
        GenerationOptions.of(options, top_k=-1)
    with pytest.raises(TypeError):
        cumo_mlx.generate(*loaded, QUESTION, frobnicate=1)


def test_cli_flags_are_the_generation_options():
    """The flags (mlx-lm's names) have GenerationOptions' defaults, written out for a fast --help."""
    from cumo_mlx.cli.chat import chat
    from cumo_mlx.cli.generate import generate as generate_command

    defaults = {field.name: field.default for field in dataclasses.fields(generation.GenerationOptions)}
    del defaults["logit_bias"]  # Python only, as in mlx-lm
    for command in (generate_command, chat):
        assert {p.name: p.default for p in command.params if p.name in defaults} == defaults


def test_one_placeholder_check_and_one_layout_per_call(model_dir, loaded, images, monkeypatch):
    """Whatever the entry point, a call checks the placeholders once and lays out the images once."""
    from cumo_mlx import prompt
    from cumo_mlx.models import model as model_module

    calls = []

    def counted(name, function):
        return lambda *args, **kwargs: calls.append(name) or function(*args, **kwargs)

    check, layout = counted("check", prompt.check_placeholders), counted("layout", prompt.image_layout)
    for module in (prompt, generation):
        monkeypatch.setattr(module, "check_placeholders", check)
    for module in (generation, model_module):
        monkeypatch.setattr(module, "image_layout", layout)
    question = "Compare <image> with <image>."
    session = cumo_mlx.ChatSession(*loaded)

    def chat_turn():
        for image in images:
            session.add_image(image)
        return list(session.stream(question, max_tokens=2))

    for call in (
        lambda: run_cli("generate", "--model", model_dir, "--image", images[0], "--image", images[1], "--prompt", question,
                        "--max-tokens", 2)[0] == 0 or pytest.fail("the CLI failed"),
        lambda: cumo_mlx.generate(*loaded, question, images, max_tokens=2),
        lambda: cumo_mlx.generate(*loaded, loaded[1].tokenize(chat_prompt([question])), images, max_tokens=2),
        chat_turn,
    ):  # fmt: skip
        calls.clear()
        call()
        assert sorted(calls) == ["check", "layout"]


def huge_png(width: int, height: int) -> bytes:
    """A small PNG file whose header claims width x height pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/photo.png"


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory, images):
    directory = tmp_path_factory.mktemp("bad")
    (directory / "notes.png").write_text("not an image at all\n")
    (directory / "cut.jpg").write_bytes(images[1].read_bytes()[:300])
    (directory / "bomb.png").write_bytes(huge_png(12000, 12000))
    return directory


@pytest.fixture(scope="session")
def short_context_dir(model_dir, tmp_path_factory):
    """The tiny model with a context of 110: the question alone fits (100 ids), with an image (+15 rows) it does not."""
    directory = tmp_path_factory.mktemp("short") / "m"
    shutil.copytree(model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config["tokenizer_model_max_length"] = 110
    (directory / "config.json").write_text(json.dumps(config))
    return directory


BAD_INPUTS = {
    "missing image": (["--image", "{bad}/nowhere.png"], "image file not found"),
    "not an image": (["--image", "{bad}/notes.png"], "cannot read"),
    "truncated image": (["--image", "{bad}/cut.jpg"], "cannot read"),
    "decompression bomb": (["--image", "{bad}/bomb.png"], "too large to decode safely"),
    "unreachable url": (["--image", "{url}"], "cannot download image"),
    "empty prompt": (["--prompt", ""], "the prompt is empty"),
    "blank prompt": (["--prompt", "  \n"], "the prompt is empty"),
    "no prompt": (["--prompt", None], "no prompt given"),
    "more images than slots": (["--image", "{img}", "--image", "{img}", "--prompt", "<image> What?"], "1 <image>"),
    "more slots than images": (["--image", "{img}", "--prompt", "<image> or <image>?"], "2 <image>"),
    "slot without image": (["--prompt", "<image> What?"], "but 0 image"),
    "slot in the system text": (["--image", "{img}", "--system", "See <image>."], "the system text holds <image>"),
    "zero max tokens": (["--max-tokens", 0], "max_tokens"),
    "negative max tokens": (["--max-tokens", -5], "max_tokens"),
    "negative temp": (["--temp", -0.1], "temp"),
    "zero top-p": (["--top-p", 0], "top_p"),
    "top-p over 1": (["--top-p", 1.5], "top_p"),
    "negative min-p": (["--min-p", -0.1], "min_p"),
    "min-p over 1": (["--min-p", 1.01], "min_p"),
    "negative top-k": (["--top-k", -1], "top_k"),
    "zero repetition penalty": (["--repetition-penalty", 0], "repetition_penalty"),
    "negative repetition penalty": (["--repetition-penalty", -1.2], "repetition_penalty"),
    "kv bits 7": (["--kv-bits", 7], "kv_bits must be one of 1, 2, 3, 4, 5, 6, 8"),
    "kv bits 16": (["--kv-bits", 16], "kv_bits must be one of"),
    "kv bits 0": (["--kv-bits", 0], "kv_bits must be one of"),
    "kv group 16": (["--kv-bits", 4, "--kv-group-size", 16], "kv_group_size must be one of"),
    "kv group vs head size": (["--kv-bits", 4, "--kv-group-size", 32], "does not divide the model's attention head"),
    "kv bits with rotating cache": (["--kv-bits", 4, "--max-kv-size", 100], "cannot be combined"),
    "zero max kv size": (["--max-kv-size", 0], "max_kv_size"),
    "zero prefill step": (["--prefill-step-size", 0], "prefill_step_size"),
    "prompt over context (image rows)": (["--model", "{short}", "--image", "{img}"], "over the model's context of 110"),
    "prompt over context (text)": (["--model", "{short}", "--prompt", "many words " * 60], "over the model's context"),
    "missing model": (["--model", "{bad}/no-model"], "model directory not found"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_error_line(case, model_dir, images, bad_files, short_context_dir):
    flags, message = BAD_INPUTS[case]
    names = {"bad": bad_files, "img": images[0], "url": closed_port_url(), "short": short_context_dir}
    flags = [flag.format(**names) if isinstance(flag, str) else flag for flag in flags]
    options = {"--model": model_dir, "--prompt": QUESTION, "--max-tokens": 4}
    for flag, default in options.items():
        if flag not in flags:
            flags += [flag, default]
    if None in flags:  # --prompt None: leave the option out
        del flags[flags.index(None) - 1 : flags.index(None) + 1]
    code, out, err = run_cli("generate", *flags)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and out == ""


def test_the_short_context_model_still_answers_within_its_context(short_context_dir):
    code, out, err = run_cli("generate", "--model", short_context_dir, "--prompt", QUESTION, "--max-tokens", 3)
    assert code == 0, err


def test_ctrl_c_stops_and_keeps_the_answer_so_far(model_dir, loaded, images):
    command = cli_command() + ["generate", "--model", str(model_dir), "--image", str(images[0]),
                               "--prompt", QUESTION, "--temp", "0", "--max-tokens", "10000000"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = os.read(process.stdout.fileno(), 64)  # the answer has started streaming
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    out, err = (first + out).decode(), err.decode()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "error: interrupted" in err
    assert "Generation: " in err  # the stats of what was generated
    expected = cumo_mlx.generate(*loaded, QUESTION, images[0], **greedy(max_tokens=100))
    assert first and out.endswith("\n") and expected.startswith(out[:200].rstrip("\n"))


def test_ctrl_c_with_json_prints_the_answer_so_far(model_dir, loaded, monkeypatch):
    processor = loaded[1]
    words = processor.tokenizer.encode("circle square triangle", add_special_tokens=False)

    def make_sampler(*args, **kwargs):
        script = iter(words)
        def sample(logprobs):
            token = next(script, None)
            if token is None:
                raise KeyboardInterrupt  # Ctrl-C while the next token is computed
            return mx.array([token])
        return sample

    monkeypatch.setattr(generation, "make_sampler", make_sampler)
    code, out, err = run_cli("generate", "--model", model_dir, "--prompt", QUESTION, "--json")
    assert code == 130 and "error: interrupted" in err and "Traceback" not in err
    result = json.loads(out)
    assert result["finish_reason"] == "interrupted"
    assert result["tokens"] and result["tokens"] == words[: len(result["tokens"])]
    assert result["text"] == processor.decode(result["tokens"])


def test_prompt_ids_are_checked_against_the_vocabulary(loaded):
    """MLX does not bounds-check the embedding lookup: an id past the vocabulary crashed the process."""
    vocabulary = loaded[0].args.text_config.vocab_size
    for ids, message in (([1, 100000, 5], "outside the vocabulary"), ([1, vocabulary], "outside the vocabulary"),
                         ([1, -1], "outside the vocabulary"), ([1, 2.5], "is not an integer"),
                         ([1, True], "is not an integer"), ([1, "5"], "is not an integer")):  # fmt: skip
        with pytest.raises(CuMoError, match=message):
            cumo_mlx.generate(*loaded, ids, max_tokens=2)
    ok = [1, vocabulary - 1, np.int64(5), mx.array([7])[0]]  # numpy and MLX integers are integers
    assert isinstance(cumo_mlx.generate(*loaded, ok, **greedy(max_tokens=2)), str)


def test_option_types_are_checked():
    """A float max_tokens generated without bound; every option has its type checked when made."""
    GenerationOptions = generation.GenerationOptions
    for option in generation.INT_OPTIONS:
        for value in (2.5, True, "3"):
            with pytest.raises(CuMoError, match=f"{option} must be an integer"):
                GenerationOptions(**{option: value})
    for option in generation.NUMBER_OPTIONS:
        for value in ("0.5", False, None if option != "repetition_penalty" else [1]):
            with pytest.raises(CuMoError, match=f"{option} must be a number"):
                GenerationOptions(**{option: value})
    for bias in ([1], {"a": 1.0}, {1: float("nan")}, {True: 1.0}):
        with pytest.raises(CuMoError, match="logit_bias must map"):
            GenerationOptions(logit_bias=bias)
    assert GenerationOptions(max_tokens=np.int64(3), temp=1, logit_bias={np.int64(2): 1}).max_tokens == 3


def test_kv_bits_picks_a_group_size_that_divides_the_head_size(tmp_path, images, loaded):
    """mlx-lm's default group 64 does not divide a head size of 32: a group size not given is picked."""
    config = tiny_config()
    config.update(num_attention_heads=2, num_key_value_heads=1)  # head size 32
    model_dir = write_text_model(tmp_path / "m", config)
    model, processor = cumo_mlx.load(model_dir)
    cache = make_prompt_cache(model.language_model)
    list(cumo_mlx.stream_generate(model, processor, QUESTION, prompt_cache=cache, kv_bits=4, quantized_kv_start=0, max_tokens=3))
    assert all(isinstance(layer, QuantizedKVCache) and layer.group_size == 32 for layer in cache)
    code, _, err = run_cli("generate", "--model", model_dir, "--prompt", QUESTION, "--max-tokens", 3, "--kv-bits", 4,
                             "--quantized-kv-start", 0)  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli("generate", "--model", model_dir, "--prompt", QUESTION, "--kv-bits", 4, "--kv-group-size", 64)
    assert code == 2 and "kv_group_size 64 does not divide the model's attention head size 32" in err
    with pytest.raises(CuMoError, match="divides the model's attention head size 16 .leave out kv_bits"):
        cumo_mlx.generate(*loaded, QUESTION, kv_bits=4)  # head size 16: no group size fits


def test_no_library_warning_on_a_long_prompt():
    """transformers warns "Token indices sequence length is longer than ..." past the tokenizer's own
    limit; the context check is ours, and stderr holds only its one line."""
    command = cli_command() + ["generate", "--model", "demo", "--prompt", "red " * 600, "--max-tokens", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: the prompt is 640 tokens")
