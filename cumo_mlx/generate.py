"""Generation with a CuMo model: mlx-lm's loop (`stream_generate` -> `generate_step`) on our embeddings.

The prompt's ids (one IMAGE_TOKEN_INDEX per image) become embeddings with each placeholder
replaced by its image's rows (`Model.embed_inputs`); mlx-lm prefills them in `prefill_step_size`
chunks into its KV cache and samples with its samplers and logits processors. mlx-lm wants token
ids as long as the embeddings (for the processors' history), so each placeholder is expanded to
one IMAGE_FILL_ID per image row. Float and quantized models share this one path.

`ChatSession` keeps one KV cache across turns: each turn prefills only its own new tokens.
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START
from mlx_lm.generate import GenerationResponse as MLXGenerationResponse
from mlx_lm.generate import stream_generate as mlx_stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from PIL import Image

from .errors import CuMoError
from .model import Model
from .processor import IMAGE_TOKEN_INDEX, ImageSource, Processor, check_text, image_layout
from .templates import DEFAULT_SYSTEM, IMAGE_PLACEHOLDER, chat_prompt, user_turn, with_image_placeholders

IMAGE_FILL_ID = 0  # stands for an image row in the token history the logits processors see
KV_BITS = (1, 2, 3, 4, 5, 6, 8)  # the widths mx.quantize supports
KV_GROUP_SIZES = (32, 64, 128)


@dataclass
class GenerationResponse(MLXGenerationResponse):
    """mlx-lm's response (text segment, token, counts, tok/s, peak memory in GB, finish_reason),
    plus the seconds this call spent turning its images into LLM embeddings (preprocessing and the
    vision tower and connector; reading the files too when given paths or URLs)."""

    image_time: float = 0.0


def context_length(model: Model) -> int:
    """Positions the model takes: its LLM's, or the tokenizer limit it was trained with if smaller."""
    limits = [model.args.text_config.max_position_embeddings, model.args.tokenizer_model_max_length]
    return min(limit for limit in limits if limit)


def check_generation_args(
    head_dim: Optional[int],
    max_tokens: int,
    temp: float,
    top_p: float,
    min_p: float,
    top_k: int,
    repetition_penalty: Optional[float],
    repetition_context_size: int,
    max_kv_size: Optional[int],
    kv_bits: Optional[int],
    kv_group_size: int,
    quantized_kv_start: int,
    prefill_step_size: int,
) -> None:
    """Raise CuMoError for a value mlx-lm would reject late, crash on, or silently ignore.

    `head_dim` (the model's attention head size) checks kv_group_size too; None skips that check.
    """
    problems = [
        (max_tokens < 1, f"max_tokens must be at least 1, got {max_tokens}"),
        (not (math.isfinite(temp) and temp >= 0), f"temp must be >= 0 and finite (0 is greedy), got {temp}"),
        (not 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
        (not 0 <= min_p <= 1, f"min_p must be in [0, 1], got {min_p}"),
        (top_k < 0, f"top_k must be >= 0 (0 keeps every token), got {top_k}"),
        (
            repetition_penalty is not None and not (math.isfinite(repetition_penalty) and repetition_penalty > 0),
            f"repetition_penalty must be > 0 and finite (1 is none), got {repetition_penalty}",
        ),
        (repetition_context_size < 1, f"repetition_context_size must be at least 1, got {repetition_context_size}"),
        (max_kv_size is not None and max_kv_size < 1, f"max_kv_size must be at least 1, got {max_kv_size}"),
        (prefill_step_size < 1, f"prefill_step_size must be at least 1, got {prefill_step_size}"),
        (quantized_kv_start < 0, f"quantized_kv_start must be >= 0, got {quantized_kv_start}"),
    ]
    if kv_bits is not None:
        problems += [
            (kv_bits not in KV_BITS, f"kv_bits must be one of {', '.join(map(str, KV_BITS))}, got {kv_bits}"),
            (
                kv_group_size not in KV_GROUP_SIZES,
                f"kv_group_size must be one of {', '.join(map(str, KV_GROUP_SIZES))}, got {kv_group_size}",
            ),
            (
                head_dim is not None and head_dim % kv_group_size != 0,
                f"kv_group_size {kv_group_size} does not divide the model's attention head size {head_dim}",
            ),
            (
                max_kv_size is not None,
                "kv_bits cannot be combined with max_kv_size (mlx-lm cannot quantize a rotating cache)",
            ),
        ]
    for bad, message in problems:
        if bad:
            raise CuMoError(message, "change that option")


def as_image_list(images: Union[ImageSource, Sequence[ImageSource], None]) -> list[ImageSource]:
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    return list(images or [])


def check_question(question: str, num_images: int) -> str:
    """The question with one `<image>` per image; CuMoError if it is empty or places a wrong count."""
    if not question.strip():
        raise CuMoError("the prompt is empty", "give a question or an instruction")
    return with_image_placeholders(check_text(question), num_images)


def expand_image_ids(ids: Sequence[int], rows_per_image: int) -> mx.array:
    """The ids with each image placeholder repeated as IMAGE_FILL_ID once per image row."""
    return mx.array(image_layout(ids, rows_per_image, IMAGE_FILL_ID)[0])


def encode_images(model: Model, processor: Processor, images: Sequence[ImageSource]) -> list[mx.array]:
    """Each image's LLM embeddings [1, rows, hidden], lazy: evaluated one by one, they take the peak
    memory of one image. Every image is read (and a bad one reported) before the vision tower runs."""
    pixels = [processor.preprocess_images([image]) for image in images]
    return [model.encode_images(p).features for p in pixels]


def stream_generate(
    model: Model,
    processor: Processor,
    prompt: Union[str, Sequence[int]],
    images: Union[ImageSource, Sequence[ImageSource], None] = None,
    *,
    image_features: Optional[mx.array] = None,
    system: Optional[str] = DEFAULT_SYSTEM,
    max_tokens: int = 512,
    temp: float = 0.2,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_k: int = 0,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
    logit_bias: Optional[dict[int, float]] = None,
    prompt_cache: Optional[list] = None,
    max_kv_size: Optional[int] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START,
    prefill_step_size: int = 2048,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
) -> Iterator[GenerationResponse]:
    """Yield the answer as it is generated, one GenerationResponse per token, as mlx-lm does.

    `prompt` is the user's question (put into the conversation template with `system`, one
    `<image>` per image unless the question places them) or prompt ids used as given (one
    IMAGE_TOKEN_INDEX per image). `images` are paths, http(s) URLs or PIL images; or give
    `image_features` [n, rows, hidden] already encoded. Sampling and the KV cache options are
    mlx-lm's (temp 0 is greedy; `logit_bias` maps token ids to added logits). With `prompt_cache`,
    the prompt continues what the cache holds. Generation stops at `</s>` or after `max_tokens`
    tokens; the last response has `finish_reason` "stop" (its token is `</s>`) or "length".
    """
    check_generation_args(
        model.args.text_config.head_dim, max_tokens, temp, top_p, min_p, top_k, repetition_penalty,
        repetition_context_size, max_kv_size, kv_bits, kv_group_size, quantized_kv_start, prefill_step_size,
    )  # fmt: skip
    images = as_image_list(images)
    if images and image_features is not None:
        raise ValueError("give images or image_features, not both")
    num_images = len(images) if image_features is None else image_features.shape[0]
    if isinstance(prompt, str):
        ids = processor.tokenize(chat_prompt([check_question(prompt, num_images)], system))
    else:
        ids = [int(i) for i in prompt]
        if not ids:
            raise CuMoError("the prompt is empty", "give a question or an instruction")
        placeholders = ids.count(IMAGE_TOKEN_INDEX)
        if placeholders != num_images:
            raise CuMoError(
                f"the prompt has {placeholders} image placeholder(s) but {num_images} image(s) were given",
                f"give one image per {IMAGE_PLACEHOLDER}",
            )

    tic = time.perf_counter()
    per_image = encode_images(model, processor, images) if images else []
    if per_image:
        image_features = mx.concatenate(per_image)
    rows = 0 if image_features is None else image_features.shape[1]
    expanded = expand_image_ids(ids, rows)
    cached = prompt_cache[0].offset if prompt_cache else 0
    context = context_length(model)
    if cached + expanded.size > context:
        what = f"the prompt is {expanded.size} tokens ({num_images * rows} of them image features)"
        if cached:
            what += f" after {cached} earlier tokens of the conversation"
        raise CuMoError(f"{what}, over the model's context of {context}", "shorten it or use fewer images")
    for features in per_image:
        mx.eval(features)
    image_time = time.perf_counter() - tic if num_images else 0.0

    responses = mlx_stream_generate(
        model.language_model,
        processor.tokenizer,
        expanded,
        max_tokens=max_tokens,
        input_embeddings=model.embed_inputs(ids, image_features),
        # top_k >= the vocabulary keeps every token, as 0 does (mlx-lm raises inside a compiled function,
        # which leaves MLX's random state unusable for the rest of the process).
        sampler=make_sampler(temp, top_p=top_p, min_p=min_p, top_k=0 if top_k >= model.args.text_config.vocab_size else top_k),
        logits_processors=make_logits_processors(
            logit_bias, repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
        ),
        prompt_cache=prompt_cache,
        max_kv_size=max_kv_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
        prefill_step_size=prefill_step_size,
        prompt_progress_callback=prompt_progress_callback,
    )
    for response in responses:
        yield GenerationResponse(**vars(response), image_time=image_time)


def format_stats(response: GenerationResponse, num_images: int) -> str:
    """The stats block printed after an answer."""
    lines = ["=========="]
    if num_images:
        lines.append(f"Images: {num_images}, {response.image_time:.3f} s to encode")
    lines += [
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec",
        f"Peak memory: {response.peak_memory:.3f} GB",
    ]
    return "\n".join(lines)


def generate(
    model: Model,
    processor: Processor,
    prompt: Union[str, Sequence[int]],
    images: Union[ImageSource, Sequence[ImageSource], None] = None,
    verbose: bool = False,
    **kwargs,
) -> str:
    """The whole answer (`stream_generate`'s text joined); `verbose` prints it as it comes and the stats."""
    text, response = "", None
    for response in stream_generate(model, processor, prompt, images, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print()
        print(format_stats(response, len(as_image_list(images))))
    return text


class ChatSession:
    """A multi-turn conversation in the model's template with one KV cache across turns.

    `ids` is the whole conversation so far: every turn's prompt ids (image placeholders
    included) and every generated id, `</s>` included; the cache holds exactly these (with
    each placeholder as its image's rows), so a turn prefills only its own new ids.
    """

    def __init__(
        self,
        model: Model,
        processor: Processor,
        system: Optional[str] = DEFAULT_SYSTEM,
        max_kv_size: Optional[int] = None,
    ):
        self.model, self.processor, self.system, self.max_kv_size = model, processor, system, max_kv_size
        self.eos = processor.tokenizer.eos_token_id
        self.encoded: dict[str, mx.array] = {}  # image source -> features: each image encoded once
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and its pending images (encoded images stay known)."""
        self.ids: list[int] = []
        self.length = 0  # positions in the cache
        self.pending: list[mx.array] = []  # features of the images for the next turn
        self.cache = make_prompt_cache(self.model.language_model, max_kv_size=self.max_kv_size)

    def add_image(self, source: ImageSource) -> None:
        """Read and encode an image now (so a bad one is reported at once); the next turn shows it."""
        key = None if isinstance(source, Image.Image) else str(source)
        features = self.encoded.get(key) if key else None
        if features is None:
            (features,) = encode_images(self.model, self.processor, [source])
            mx.eval(features)
            if key:
                self.encoded[key] = features
        self.pending.append(features)

    def turn_ids(self, question: str) -> list[int]:
        """The new ids a turn asking `question` appends to the conversation."""
        text = user_turn(check_question(question, len(self.pending)), not self.ids, self.system)
        if not self.ids:
            return self.processor.tokenize(text)
        # Tokenized as it follows `</s>` in the whole conversation's text; a previous answer cut
        # short (max tokens, Ctrl-C) is closed with `</s>` first.
        after = len(self.processor.tokenize("</s>"))
        return ([] if self.ids[-1] == self.eos else [self.eos]) + self.processor.tokenize("</s>" + text)[after:]

    def stream(self, question: str, **kwargs) -> Iterator[GenerationResponse]:
        """Ask `question` (about the images added since the last turn) and stream the answer."""
        new_ids = self.turn_ids(question)
        features = mx.concatenate(self.pending) if self.pending else None
        answered = False
        try:
            for response in stream_generate(
                self.model, self.processor, new_ids, image_features=features, prompt_cache=self.cache, **kwargs
            ):
                if not answered:  # the turn's prompt is in the cache now
                    answered = True
                    self.ids += new_ids
                    self.length += response.prompt_tokens  # image rows included
                    self.pending = []
                self.ids.append(response.token)
                self.length += 1
                yield response
        finally:  # after Ctrl-C or an early close, drop whatever the cache got beyond `ids`
            self._trim_cache()

    def _trim_cache(self) -> None:
        for layer in self.cache:
            excess = layer.offset - self.length
            if excess and not (excess > 0 and layer.is_trimmable() and layer.trim(excess) == excess):
                pending = self.pending
                self.reset()  # the cache cannot be brought back to the conversation: start over
                self.pending = pending
                raise CuMoError("the conversation's cache could not be kept after the interruption", "it was reset")
