"""`cumo-mlx generate`: answer one prompt about zero or more images, streaming the answer.

The flags are mlx-lm's (`mlx_lm.generate`); the options shared with `cumo-mlx chat` are here.
"""

import json
import sys

import click
from cumo_mlx.prompt import DEFAULT_SYSTEM

DEFAULT_MODEL = "shi-labs/CuMo-mistral-7b"


def model_options(f):
    """--model, --image, --system: what `generate` and `chat` start from."""
    options = [
        click.option(
            "--model",
            default=DEFAULT_MODEL,
            show_default=True,
            help="An MLX model directory, a hub id (converted on first use), or `demo`.",
        ),
        click.option(
            "--image",
            "images",
            multiple=True,
            metavar="PATH|URL",
            help="An image file or http(s) URL; repeat for several (one <image> each). None: text only.",
        ),
        click.option(
            "--system",
            "--system-prompt",
            "system",
            default=None,
            help="System text replacing the template's default ('' for none).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def generation_options(f):
    """Sampling, KV cache and prefill options: mlx-lm's names and meanings, GenerationOptions' fields
    (the defaults are written here too, so that --help need not import MLX; a test keeps them equal)."""
    options = [
        click.option("--max-tokens", type=int, default=512, show_default=True, help="Most tokens to generate."),
        click.option("--temp", type=float, default=0.2, show_default=True, help="Sampling temperature (0: greedy)."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass, in (0, 1]."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the k likeliest (0: all)."),
        click.option("--min-p", type=float, default=0.0, show_default=True, help="Min-p threshold, in [0, 1]."),
        click.option("--repetition-penalty", type=float, default=None, help="Penalty (> 0) for repeating tokens."),
        click.option("--repetition-context-size", type=int, default=20, show_default=True,
                     help="Tokens the repetition penalty looks back on."),  # fmt: skip
        click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=None, help="Random seed for sampling."),
        click.option("--max-kv-size", type=int, default=None, help="Keep at most this many tokens in the KV cache."),
        click.option("--kv-bits", type=int, default=None, help="Quantize the KV cache to this many bits (1-6, 8)."),
        click.option("--kv-group-size", type=int, default=None,
                     help="Group size of KV quantization (32, 64, 128). Default: 64, or the largest that "
                     "divides the model's attention head size."),
        click.option("--quantized-kv-start", type=int, default=5000, show_default=True,
                     help="Quantize the KV cache once it holds this many tokens."),  # fmt: skip
        click.option("--prefill-step-size", type=int, default=2048, show_default=True,
                     help="Prompt positions prefilled per step (lower: less peak memory)."),  # fmt: skip
    ]
    for option in reversed(options):
        f = option(f)
    return f


def start(model: str, system, seed, flags: dict):
    """Check the options, seed MLX, load the model: (model, processor, system text, GenerationOptions)."""
    import cumo_mlx
    import mlx.core as mx
    from cumo_mlx.generate import GenerationOptions, check_system

    options = GenerationOptions(**flags)  # checked before the (slow) load; what needs the model after it
    system = check_system(DEFAULT_SYSTEM if system is None else system)
    if seed is not None:
        mx.random.seed(seed)
    model, processor = cumo_mlx.load(model)
    return model, processor, system, options.for_model(model)  # (the KV group size for its head size)


def text_stdin():
    """Standard input, its undecodable bytes kept (as surrogates) for the text checks to report."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    return sys.stdin


def read_prompt(prompt):
    if prompt == "-":
        return text_stdin().read()
    if prompt is None:
        from cumo_mlx.errors import CuMoError

        raise CuMoError("no prompt given", "pass --prompt TEXT, or --prompt - to read it from standard input")
    return prompt


@click.command()
@model_options
@click.option("--prompt", default=None, help="The question or instruction; '-' reads it from standard input.")
@generation_options
@click.option("--verbose/--quiet", default=True, show_default=True, help="Print the stats block on stderr.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, ids, stats) instead.")
def generate(model, images, system, prompt, seed, verbose, as_json, **flags):
    """Answer --prompt about the --image(s), streaming the answer to stdout (stats on stderr).

    \b
    cumo-mlx generate --image photo.jpg --prompt "What is happening here?"

    Ctrl-C stops the answer, keeping what was generated; the exit code is then 130.
    """
    from cumo_mlx.generate import check_question, format_stats, stream_prompt
    from cumo_mlx.processor import load_image
    from cumo_mlx.prompt import chat_prompt

    question = check_question(read_prompt(prompt), len(images))  # the placeholder check, before the model loads
    pictures = [load_image(image) for image in images]  # every image read before the model loads
    model, processor, system, options = start(model, system, seed, flags)
    ids = processor.tokenize(chat_prompt([question], system))

    text, tokens, response, finish_reason = "", [], None, None
    try:
        for response in stream_prompt(model, processor, ids, pictures, options=options):
            if response.finish_reason != "stop":  # the last response of a stop holds `</s>`
                tokens.append(response.token)
            text += response.text
            if not as_json:
                click.echo(response.text, nl=False)
        finish_reason = response.finish_reason
    except KeyboardInterrupt:
        finish_reason = "interrupted"
        rest = processor.decode(tokens)  # what the streaming detokenizer still held back
        if not as_json and rest.startswith(text):
            click.echo(rest[len(text) :], nl=False)
        text = rest if rest.startswith(text) else text

    if as_json:
        click.echo(json.dumps(result(text, tokens, ids, finish_reason, response, len(pictures))))
    else:
        click.echo()
        if verbose and response is not None:
            click.echo(format_stats(response, len(pictures)), err=True)
    if finish_reason == "interrupted":
        raise KeyboardInterrupt  # `cumo-mlx` reports it and exits 130


def result(text, tokens, ids, finish_reason, response, num_images) -> dict:
    """The --json object. stats.prompt_tokens counts prefilled positions (image rows included),
    stats.generation_tokens the sampled tokens (a final `</s>` included)."""
    stats = {"images": num_images}
    if response is not None:
        stats.update(
            image_time_s=response.image_time,
            prompt_tokens=response.prompt_tokens,
            prompt_tps=response.prompt_tps,
            generation_tokens=response.generation_tokens,
            generation_tps=response.generation_tps,
            peak_memory_gb=response.peak_memory,
        )
    return {"text": text, "tokens": tokens, "prompt_tokens": ids, "finish_reason": finish_reason, "stats": stats}
