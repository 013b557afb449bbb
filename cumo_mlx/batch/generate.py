"""`batch_generate`: answer many prompts at once, each exactly as `cumo_mlx.generate` answers it alone."""

import time
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

from ..errors import CuMoError
from ..generate import GenerationOptions
from ..models.model import Model
from ..processor import ImageSource, Processor
from ..prompt import DEFAULT_SYSTEM
from ..vision_cache import VisionCache
from .engine import BatchEngine, BatchStats
from .stream import RequestStream

Prompt = Union[str, Sequence[int]]
ImageEntry = Union[ImageSource, Sequence[ImageSource], None]


@dataclass
class BatchResponse:
    """The answers, in the order of the prompts."""

    texts: list[str]
    tokens: list[list[int]]  # generated ids of each prompt (the prompt and `</s>` excluded)
    finish_reasons: list[str]  # "stop" (`</s>`), "length" (max_tokens) or "error"
    errors: list[Optional[str]]  # why, where the finish_reason is "error" (an unreadable image)
    stats: BatchStats


def _check_batch(prompts, images, max_tokens) -> tuple[list, list, list[int]]:
    """The prompts, one image entry and one max_tokens per prompt; CuMoError for a batch of the wrong shape."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise CuMoError("prompts must be a list of prompts", "give a list, e.g. [question] for one")
    if not prompts:
        raise CuMoError("the list of prompts is empty", "give at least one prompt")
    n = len(prompts)
    if images is None:
        images = [None] * n
    elif isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise CuMoError("images must be a list with one entry per prompt", "give None, an image or a list each")
    elif len(images) != n:
        raise CuMoError(f"images has {len(images)} entries but there are {n} prompts", "give one per prompt (or None)")
    if not isinstance(max_tokens, (int, Sequence)):
        raise CuMoError(f"max_tokens must be an integer or a list of them, got {max_tokens!r}", "change that option")
    limits = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != n:
        raise CuMoError(f"max_tokens has {len(limits)} entries but there are {n} prompts", "give one each, or one")
    for i, limit in enumerate(limits):
        if not isinstance(limit, int) or limit < 1:
            where = f"max_tokens[{i}]" if not isinstance(max_tokens, int) else "max_tokens"
            raise CuMoError(f"{where} must be a positive integer, got {limit}", "change that option")
    return list(prompts), list(images), limits


def _collect(streams: list[RequestStream], eos: set[int]) -> tuple[list, list, list, list]:
    """Each finished request's text, generated ids (without `</s>`), finish reason and error."""
    texts, tokens, reasons, errors = [], [], [], []
    for stream in streams:
        responses = list(stream)  # all delivered: does not block
        last = responses[-1]
        generated = [r.token for r in responses if r.token is not None]
        if last.finish_reason == "stop" and generated and generated[-1] in eos:
            generated.pop()
        texts.append("".join(r.text for r in responses))
        tokens.append(generated)
        reasons.append(last.finish_reason)
        errors.append(last.error)
    return texts, tokens, reasons, errors


def batch_generate(
    model: Model,
    processor: Processor,
    prompts: Sequence[Prompt],
    images: Optional[Sequence[ImageEntry]] = None,
    *,
    system: Optional[str] = DEFAULT_SYSTEM,
    max_tokens: Union[int, Sequence[int], None] = None,
    options: Optional[GenerationOptions] = None,
    max_batch_size: int = 16,
    max_kv_bytes: Optional[int] = None,
    vision_cache: Optional[VisionCache] = None,
    **option_values,
) -> BatchResponse:
    """Answer every prompt, decoding up to `max_batch_size` of them together.

    Each prompt is what `cumo_mlx.generate` takes (a question put into the template with `system`,
    or prompt ids); `images` has one entry per prompt: None, an image (path, URL, PIL image) or a
    list of them (one `<image>` each). `max_tokens` may be a list, one per prompt. `options` and the
    option keywords (temp=, top_p=, ...) are `generate`'s, but for kv_bits and max_kv_size, which
    are refused (see `BatchEngine.check_options`). With temp 0 every answer is token for token the
    one `generate` gives alone.
    `max_kv_bytes` caps the batch's KV cache (prompts beyond it wait for a free place), as
    `BatchEngine` does; `vision_cache` shares encoded images across calls (else one per call).

    Raises CuMoError for a malformed batch or a prompt that can never run (saying which). An image
    that cannot be read, or a prompt over the model's context, ends only its prompt:
    finish_reason "error", the message in `errors`.
    """
    options = GenerationOptions.of(options, **option_values)
    prompts, images, limits = _check_batch(prompts, images, options.max_tokens if max_tokens is None else max_tokens)
    BatchEngine.check_options(options)  # once for all, before naming any prompt
    engine = BatchEngine(model, processor, max_sequences=max_batch_size, max_kv_bytes=max_kv_bytes,
                         vision_cache=vision_cache, prompt_cache_bytes=0)  # fmt: skip
    tic = time.perf_counter()
    streams = []
    for i, (prompt, entry, limit) in enumerate(zip(prompts, images, limits)):
        try:
            streams.append(engine.submit(prompt, entry, system=system, options=replace(options, max_tokens=limit)))
        except CuMoError as e:
            raise type(e)(f"prompt {i}: {e.what}", e.fix) from None
    while engine.step():
        pass
    texts, tokens, reasons, errors = _collect(streams, processor.tokenizer.eos_token_ids)
    errors = [None if e is None else f"prompt {i}: {e}" for i, e in enumerate(errors)]
    stats = replace(engine.snapshot(), wall_time=time.perf_counter() - tic)
    return BatchResponse(texts, tokens, reasons, errors, stats)
