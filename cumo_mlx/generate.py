"""Generation with a CuMo model: mlx-lm's loop (`stream_generate` -> `generate_step`) on our embeddings.

A call goes in three steps, each a function a server or a batch can reuse:
- `prompt_ids`: the question in the conversation template (or prompt ids as given), after the one
  check that it places one image per image (`prompt.check_placeholders`);
- `encode_images`: each image's LLM embeddings (preprocessing, vision tower, connector), through
  a `VisionCache` when one is given (a chat owns one; `generate` is one call, so none by default);
- `stream_prompt`: the ids laid out with the image rows (`prompt_inputs`), then mlx-lm, which
  prefills them in `prefill_step_size` chunks into its KV cache and samples with its samplers and
  logits processors, as `GenerationOptions` sets them.
mlx-lm wants token ids as long as the embeddings (for the processors' history), so each placeholder
is expanded to one IMAGE_FILL_ID per image row. Float and quantized models share this one path.

`ChatSession` keeps one KV cache across turns: each turn prefills only its own new tokens.
"""

import math
import numbers
import time
from dataclasses import dataclass, replace
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
from .models.model import Model
from .processor import ImageSource, Processor, check_text
from .prompt import (
    DEFAULT_SYSTEM,
    IMAGE_PLACEHOLDER,
    chat_prompt,
    check_placeholders,
    check_token_ids,
    image_layout,
    user_turn,
    with_image_placeholders,
)
from .vision_cache import VisionCache

IMAGE_FILL_ID = 0  # stands for an image row in the token history the logits processors see
KV_BITS = (1, 2, 3, 4, 5, 6, 8)  # the widths mx.quantize supports
KV_GROUP_SIZES = (32, 64, 128)
DEFAULT_KV_GROUP_SIZE = 64  # mlx-lm's; a model whose head size it does not divide gets the largest that does
INT_OPTIONS = ("max_tokens", "top_k", "repetition_context_size", "max_kv_size", "kv_bits", "kv_group_size",
               "quantized_kv_start", "prefill_step_size")  # fmt: skip
NUMBER_OPTIONS = ("temp", "top_p", "min_p", "repetition_penalty")
OPTIONAL = ("repetition_penalty", "max_kv_size", "kv_bits", "kv_group_size")


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling, KV cache and prefill settings: mlx-lm's names, meanings and defaults.

    temp 0 is greedy; top_k 0 and min_p 0 keep every token; repetition_penalty None (or 1) is none;
    `logit_bias` maps token ids to added logits; max_kv_size bounds the cache (a rotating one);
    kv_bits quantizes it in kv_group_size groups (None: 64, or the largest size that divides the
    model's head size) once it holds quantized_kv_start tokens; prompts are prefilled
    prefill_step_size positions at a time. A value of the wrong type, or one mlx-lm would reject late,
    crash on, or silently ignore raises CuMoError when the options are made (`for_model`: what needs
    the model).
    """

    max_tokens: int = 512
    temp: float = 0.2
    top_p: float = 1.0
    min_p: float = 0.0
    top_k: int = 0
    repetition_penalty: Optional[float] = None
    repetition_context_size: int = 20
    logit_bias: Optional[dict[int, float]] = None
    max_kv_size: Optional[int] = None
    kv_bits: Optional[int] = None
    kv_group_size: Optional[int] = None
    quantized_kv_start: int = DEFAULT_QUANTIZED_KV_START
    prefill_step_size: int = 2048

    @classmethod
    def of(cls, options: Optional["GenerationOptions"] = None, **values) -> "GenerationOptions":
        """`options` (default: the defaults) with `values` replacing fields: how the API takes either."""
        options = options or cls()
        return replace(options, **values) if values else options

    def __post_init__(self):
        self._check_types()
        temp, penalty, kv_bits, max_kv_size = self.temp, self.repetition_penalty, self.kv_bits, self.max_kv_size
        rules = [  # (option, wrong, what it must be)
            ("max_tokens", self.max_tokens < 1, "must be at least 1"),
            ("temp", not (math.isfinite(temp) and temp >= 0), "must be >= 0 and finite (0 is greedy)"),
            ("top_p", not 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", not 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("top_k", self.top_k < 0, "must be >= 0 (0 keeps every token)"),
            ("repetition_penalty", penalty is not None and not (math.isfinite(penalty) and penalty > 0),
             "must be > 0 and finite (1 is none)"),  # fmt: skip
            ("repetition_context_size", self.repetition_context_size < 1, "must be at least 1"),
            ("max_kv_size", max_kv_size is not None and max_kv_size < 1, "must be at least 1"),
            ("prefill_step_size", self.prefill_step_size < 1, "must be at least 1"),
            ("quantized_kv_start", self.quantized_kv_start < 0, "must be >= 0"),
            ("kv_bits", kv_bits not in (None, *KV_BITS), f"must be one of {', '.join(map(str, KV_BITS))}"),
            ("kv_group_size", kv_bits is not None and self.kv_group_size not in (None, *KV_GROUP_SIZES),
             f"must be one of {', '.join(map(str, KV_GROUP_SIZES))}"),  # fmt: skip
        ]
        for option, wrong, requirement in rules:
            if wrong:
                raise CuMoError(f"{option} {requirement}, got {getattr(self, option)}", "change that option")
        if kv_bits is not None and max_kv_size is not None:
            message = "kv_bits cannot be combined with max_kv_size (mlx-lm cannot quantize a rotating cache)"
            raise CuMoError(message, "change that option")
        if kv_bits is None and self.kv_group_size is not None:  # (it would be silently ignored)
            raise CuMoError("kv_group_size has no effect without kv_bits", "add kv_bits, or leave kv_group_size out")

    def _check_types(self) -> None:
        """Integers where counts go, finite numbers where numbers go (a float max_tokens never ends)."""
        for option in INT_OPTIONS + NUMBER_OPTIONS:
            value = getattr(self, option)
            kind, what = (numbers.Integral, "an integer") if option in INT_OPTIONS else (numbers.Real, "a number")
            if (value is None and option in OPTIONAL) or (isinstance(value, kind) and not isinstance(value, bool)):
                continue
            raise CuMoError(f"{option} must be {what}, got {value!r}", "change that option")
        bias = self.logit_bias
        if bias is not None and not (
            isinstance(bias, dict)
            and all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in bias)
            and all(isinstance(v, numbers.Real) and math.isfinite(v) for v in bias.values())
        ):
            raise CuMoError(f"logit_bias must map token ids to finite numbers, got {bias!r}", "change that option")

    def for_model(self, model: Model) -> "GenerationOptions":
        """These options with the KV group size settled for the model's attention head size; CuMoError
        if a group size given does not divide it, or a logit bias names a token outside the vocabulary."""
        head_dim, vocab_size = model.args.text_config.head_dim, model.args.text_config.vocab_size
        outside = [k for k in self.logit_bias or {} if not 0 <= k < vocab_size]
        if outside:
            raise CuMoError(f"logit_bias names token id(s) {outside[:5]} outside the vocabulary of {vocab_size}",
                            f"use ids in 0..{vocab_size - 1}")  # fmt: skip
        if self.kv_bits is None:
            return self
        if self.kv_group_size is not None:
            if head_dim % self.kv_group_size != 0:
                message = f"kv_group_size {self.kv_group_size} does not divide the model's attention head size {head_dim}"
                raise CuMoError(message, "change that option")
            return self
        sizes = [DEFAULT_KV_GROUP_SIZE] + sorted(KV_GROUP_SIZES, reverse=True)
        fitting = [size for size in sizes if head_dim % size == 0]
        if not fitting:
            message = f"kv_bits needs a group size (32, 64 or 128) that divides the model's attention head size {head_dim}"
            raise CuMoError(message, "leave out kv_bits for this model")
        return replace(self, kv_group_size=fitting[0])

    def sampler(self, vocab_size: int) -> Callable[[mx.array], mx.array]:
        """mlx-lm's sampler. top_k >= the vocabulary keeps every token, as 0 does (mlx-lm raises inside
        a compiled function, which leaves MLX's random state unusable for the rest of the process)."""
        top_k = 0 if self.top_k >= vocab_size else self.top_k
        return make_sampler(self.temp, top_p=self.top_p, min_p=self.min_p, top_k=top_k)

    def logits_processors(self) -> list[Callable]:
        """mlx-lm's logits processors: the logit bias and the repetition penalty."""
        penalty, context_size = self.repetition_penalty, self.repetition_context_size
        return make_logits_processors(self.logit_bias, repetition_penalty=penalty, repetition_context_size=context_size)

    def mlx_lm_arguments(self, vocab_size: int) -> dict:
        """These options as the keyword arguments of mlx-lm's `stream_generate`."""
        cache = ("max_kv_size", "kv_bits", "quantized_kv_start", "prefill_step_size")
        return dict(
            max_tokens=self.max_tokens, sampler=self.sampler(vocab_size), logits_processors=self.logits_processors(),
            kv_group_size=self.kv_group_size or DEFAULT_KV_GROUP_SIZE, **{name: getattr(self, name) for name in cache},
        )  # fmt: skip


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


def as_image_list(images: Union[ImageSource, Sequence[ImageSource], None]) -> list[ImageSource]:
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    return list(images or [])


def check_question(question: str, num_images: int) -> str:
    """The question with one `<image>` per image; CuMoError if it is empty or places a wrong count."""
    if not question.strip():
        raise CuMoError("the prompt is empty", "give a question or an instruction")
    return with_image_placeholders(check_text(question), num_images)


def check_system(system: Optional[str]) -> Optional[str]:
    """The system text, if it is valid text without `<image>` (images go with the question)."""
    if system and IMAGE_PLACEHOLDER in check_text(system):
        raise CuMoError(f"the system text holds {IMAGE_PLACEHOLDER}", f"put {IMAGE_PLACEHOLDER} in the prompt instead")
    return system


def prompt_ids(
    processor: Processor, prompt: Union[str, Sequence[int]], num_images: int, system: Optional[str] = DEFAULT_SYSTEM
) -> list[int]:
    """The prompt ids of a one-question conversation, one IMAGE_TOKEN_INDEX per image, after the one
    placeholder check: `prompt` is the user's question (put into the template with `system`, one
    `<image>` per image unless the question places them) or prompt ids used as given."""
    if isinstance(prompt, str):
        return processor.tokenize(chat_prompt([check_question(prompt, num_images)], check_system(system)))
    ids = check_token_ids(prompt, processor.args.text_config.vocab_size)
    if not ids:
        raise CuMoError("the prompt is empty", "give a question or an instruction")
    check_placeholders(ids, num_images)
    return ids


def encode_images(
    model: Model, processor: Processor, images: Sequence[ImageSource], vision_cache: Optional[VisionCache] = None
) -> list[mx.array]:
    """Each image's LLM embeddings [1, rows, hidden]. Every image is read (and a bad one reported)
    before the vision tower runs. Without `vision_cache` they are lazy (evaluated one by one, they
    take the peak memory of one image); with it, an image seen before skips the tower and the
    others are encoded now and kept."""
    if vision_cache is not None:
        return [encoded.features for encoded in vision_cache.encode_all(model, processor, images)]
    pixels = [processor.preprocess_images([image]) for image in images]
    return [model.encode_images(p).features for p in pixels]


def prompt_inputs(
    model: Model, ids: Sequence[int], image_features: Optional[mx.array] = None, cached: int = 0
) -> tuple[mx.array, mx.array]:
    """mlx-lm's inputs for checked prompt ids and their images' features [n, rows, hidden]: the ids
    with each placeholder expanded to one IMAGE_FILL_ID per image row, and their embeddings
    [L', hidden] with the image rows in place. CuMoError if they do not fit in the model's context
    after `cached` positions of the conversation so far."""
    num_images = 0 if image_features is None else image_features.shape[0]
    rows = image_features.shape[1] if num_images else 0
    tokens, image_rows = image_layout(ids, rows, IMAGE_FILL_ID)
    context = context_length(model)
    if cached + tokens.size > context:
        what = f"the prompt is {tokens.size} tokens ({num_images * rows} of them image features)"
        if cached:
            what += f" after {cached} earlier tokens of the conversation"
        raise CuMoError(f"{what}, over the model's context of {context}", "shorten it or use fewer images")
    tokens = mx.array(tokens)
    embeddings = model.embed_batch(tokens[None], mx.array(image_rows)[None], image_features if num_images else None)
    return tokens, embeddings[0]


def stream_prompt(
    model: Model,
    processor: Processor,
    ids: Sequence[int],
    images: Sequence[ImageSource] = (),
    *,
    image_features: Optional[mx.array] = None,
    options: Optional[GenerationOptions] = None,
    prompt_cache: Optional[list] = None,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    vision_cache: Optional[VisionCache] = None,
) -> Iterator[GenerationResponse]:
    """`stream_generate` for prompt ids that passed the placeholder check (`prompt_ids`): one
    IMAGE_TOKEN_INDEX per image of `images` (paths, URLs or PIL images), or per image of
    `image_features` [n, rows, hidden]."""
    options = (options or GenerationOptions()).for_model(model)
    tic = time.perf_counter()
    per_image = encode_images(model, processor, images, vision_cache)
    if per_image:
        image_features = mx.concatenate(per_image)
    cached = prompt_cache[0].offset if prompt_cache else 0
    tokens, embeddings = prompt_inputs(model, ids, image_features, cached)
    for features in per_image:  # after the context check: a prompt that cannot fit costs no vision tower (uncached)
        mx.eval(features)
    image_time = time.perf_counter() - tic if image_features is not None and image_features.shape[0] else 0.0
    responses = mlx_stream_generate(
        model.language_model,
        processor.tokenizer,
        tokens,
        input_embeddings=embeddings,
        prompt_cache=prompt_cache,
        prompt_progress_callback=prompt_progress_callback,
        **options.mlx_lm_arguments(model.args.text_config.vocab_size),
    )
    for response in responses:
        yield GenerationResponse(**vars(response), image_time=image_time)


def stream_generate(
    model: Model,
    processor: Processor,
    prompt: Union[str, Sequence[int]],
    images: Union[ImageSource, Sequence[ImageSource], None] = None,
    *,
    image_features: Optional[mx.array] = None,
    system: Optional[str] = DEFAULT_SYSTEM,
    prompt_cache: Optional[list] = None,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    options: Optional[GenerationOptions] = None,
    vision_cache: Optional[VisionCache] = None,
    **option_values,
) -> Iterator[GenerationResponse]:
    """Yield the answer as it is generated, one GenerationResponse per token, as mlx-lm does.

    `prompt` is the user's question (put into the conversation template with `system`, one
    `<image>` per image unless the question places them) or prompt ids used as given (one
    IMAGE_TOKEN_INDEX per image). `images` are paths, http(s) URLs or PIL images; or give
    `image_features` [n, rows, hidden] already encoded. Sampling and the KV cache: `options`, or
    GenerationOptions' fields as keywords (max_tokens=, temp=, ...; over `options` when both).
    With `prompt_cache`, the prompt continues what the cache holds; with `vision_cache`, images
    seen before skip the vision tower (one call encodes each image once anyway: a cache pays off
    across calls, as a chat's). Generation stops at `</s>` or after `max_tokens` tokens; the last
    response has `finish_reason` "stop" (its token is `</s>`) or "length".
    """
    options = GenerationOptions.of(options, **option_values)
    images = as_image_list(images)
    if images and image_features is not None:
        raise ValueError("give images or image_features, not both")
    num_images = len(images) if image_features is None else image_features.shape[0]
    ids = prompt_ids(processor, prompt, num_images, system)
    yield from stream_prompt(
        model, processor, ids, images, image_features=image_features, options=options,
        prompt_cache=prompt_cache, prompt_progress_callback=prompt_progress_callback, vision_cache=vision_cache,
    )  # fmt: skip


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
    Images go through `vision_cache` (default: the session's own), keyed by their pixels: an image
    shown again skips the vision tower, a file changed on disk is encoded anew.
    """

    def __init__(
        self,
        model: Model,
        processor: Processor,
        system: Optional[str] = DEFAULT_SYSTEM,
        max_kv_size: Optional[int] = None,
        vision_cache: Optional[VisionCache] = None,
    ):
        self.model, self.processor, self.max_kv_size = model, processor, max_kv_size
        self.system = check_system(system)
        self.eos = processor.tokenizer.eos_token_id
        self.vision_cache = VisionCache() if vision_cache is None else vision_cache
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and its pending images (encoded images stay known)."""
        self.ids: list[int] = []
        self.length = 0  # positions in the cache
        self.pending: list[mx.array] = []  # features of the images for the next turn
        self.cache = make_prompt_cache(self.model.language_model, max_kv_size=self.max_kv_size)

    def add_image(self, source: ImageSource) -> None:
        """Read and encode an image now (so a bad one is reported at once); the next turn shows it."""
        self.pending.append(self.vision_cache.encode(self.model, self.processor, source).features)

    def turn_ids(self, question: str) -> list[int]:
        """The new ids a turn asking `question` appends to the conversation (the placeholder check)."""
        text = user_turn(check_question(question, len(self.pending)), not self.ids, self.system)
        if not self.ids:
            return self.processor.tokenize(text)
        # Tokenized as it follows `</s>` in the whole conversation's text; a previous answer cut
        # short (max tokens, Ctrl-C) is closed with `</s>` first.
        after = len(self.processor.tokenize("</s>"))
        return ([] if self.ids[-1] == self.eos else [self.eos]) + self.processor.tokenize("</s>" + text)[after:]

    def stream(
        self, question: str, *, prompt_progress_callback=None, options=None, **option_values
    ) -> Iterator[GenerationResponse]:
        """Ask `question` (about the images added since the last turn) and stream the answer;
        `options` and keywords as `stream_generate` takes them."""
        new_ids = self.turn_ids(question)
        options = GenerationOptions.of(options, **option_values)
        features = mx.concatenate(self.pending) if self.pending else None
        answered = False
        try:
            for response in stream_prompt(
                self.model, self.processor, new_ids, image_features=features, options=options,
                prompt_cache=self.cache, prompt_progress_callback=prompt_progress_callback,
            ):  # fmt: skip
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
