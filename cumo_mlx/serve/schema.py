"""The body of `POST /v1/chat/completions`, checked, and turned into a conversation and options.

Types are checked strictly (a string is not a number, a number not a boolean); a value out of range,
a field we cannot honour (`n` > 1, `tools`, a `response_format` other than text, frequency or
presence penalties) is a 400 naming the field, never silently ignored. Fields that do not change the
answer (`user`, `metadata`, `store`, ...) are ignored.

How messages become CuMo's prompt (`cumo_mlx.prompt.chat_prompt`, the template `generate` uses):
- system (or developer) messages, before the others, are joined into the system text; without
  one, CuMo's default system prompt is used (so one user message gives `generate`'s exact prompt);
- then user and assistant turns alternate, starting and ending with a user turn (consecutive
  messages of one role are joined with a newline);
- a message's text parts are joined with newlines, and its images go before its text, one
  `<image>` line each in the order of its parts, as `generate` places them (CuMo was trained with
  the image first). A text that writes `<image>` itself places the message's images there instead
  (then it must place them all). Images of every turn are used, in the order they appear.
"""

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import CuMoError
from ..prompt import DEFAULT_SYSTEM, IMAGE_PLACEHOLDER, with_image_placeholders
from .errors import APIError

MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class ImageURL(Strict):
    url: str
    detail: Optional[str] = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]], None] = None
    name: Optional[str] = None


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(Strict):
    messages: list[Message] = Field(min_length=1)
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0, le=1 << 31)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    seed: Optional[int] = Field(None, ge=0, lt=1 << 64)
    stop: Union[str, list[str], None] = None
    repetition_penalty: Optional[float] = Field(None, gt=0, le=100)
    logit_bias: Optional[dict[str, float]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Any = None
    functions: Optional[list[Any]] = None
    function_call: Any = None
    response_format: Optional[dict[str, Any]] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


@dataclass
class Conversation:
    """The prompt's parts: `turns` alternate user / assistant (user first and last, each with its
    `<image>` placeholders), `system` the system text, `images` the image URLs in prompt order."""

    turns: list[str]
    system: Optional[str]
    images: list[str]


def validated(model: type[BaseModel], body: bytes):
    """A `model` read from the JSON `body`, or a 400 naming the first bad field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON ({first['msg']})") from None
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None) from None


def parse(body: bytes) -> ChatRequest:
    """The request, or a 400 naming the first bad field."""
    request = validated(ChatRequest, body)
    check_supported(request)
    return request


def check_supported(request: ChatRequest) -> None:
    """A 400 for each parameter we cannot honour, and for inconsistent ones."""
    unsupported = [
        (request.n not in (None, 1), "n", "only one choice per request is supported (n must be 1)"),
        (bool(request.tools) or bool(request.functions), "tools", "tools and functions are not supported"),
        (request.tool_choice not in (None, "none"), "tool_choice", "tools are not supported"),
        (request.function_call not in (None, "none"), "function_call", "functions are not supported"),
        (
            request.response_format not in (None, {"type": "text"}),
            "response_format",
            "only the text response format is supported",
        ),
        (bool(request.frequency_penalty), "frequency_penalty", "use repetition_penalty instead"),
        (bool(request.presence_penalty), "presence_penalty", "use repetition_penalty instead"),
        (request.stream_options is not None and not request.stream, "stream_options", "only allowed with stream"),
        (request.top_logprobs is not None and not request.logprobs, "top_logprobs", "needs logprobs: true"),
        (len(request.stops) > MAX_STOPS, "stop", f"at most {MAX_STOPS} stop strings"),
        (any(not s for s in request.stops), "stop", "stop strings must not be empty"),
    ]
    for bad, param, message in unsupported:
        if bad:
            raise APIError(400, f"{param}: {message}", param=param)


def logit_bias(request: ChatRequest, vocab_size: int) -> Optional[dict[int, float]]:
    """`logit_bias` with token ids as ints; a 400 for an id outside the vocabulary or a bias outside [-100, 100]."""
    if not request.logit_bias:
        return None
    bias = {}
    for key, value in request.logit_bias.items():
        if not (key.isdigit() and int(key) < vocab_size) or not (math.isfinite(value) and -100 <= value <= 100):
            raise APIError(400, f"logit_bias: {key!r}: {value} must map a token id to a bias in [-100, 100]", param="logit_bias")
        bias[int(key)] = value
    return bias


def conversation(messages: list[Message]) -> Conversation:
    """The conversation the messages make (see the module's docstring); a 400 naming the bad message."""
    system, turns = [], []  # turns: [role, texts, image urls, index of the first message]
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        texts, urls = _content(message, i)
        if role == "system":
            if turns:
                raise APIError(400, f"messages.{i}: system messages must come first", param=f"messages.{i}")
            if urls:
                raise APIError(400, f"messages.{i}: a system message cannot hold images", param=f"messages.{i}")
            system += texts
        elif turns and turns[-1][0] == role:
            turns[-1][1] += texts
            turns[-1][2] += urls
        else:
            turns.append([role, texts, urls, i])
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise APIError(400, "messages: the conversation must start and end with a user message", param="messages")
    system_text = "\n".join(system)
    if IMAGE_PLACEHOLDER in system_text:
        raise APIError(400, f"messages: a system message cannot place {IMAGE_PLACEHOLDER}", param="messages")
    prompts, images = [], []
    for role, texts, urls, i in turns:
        text = "\n".join(texts)
        if role == "assistant" and (urls or IMAGE_PLACEHOLDER in text):
            raise APIError(400, f"messages.{i}: an assistant message cannot hold images", param=f"messages.{i}")
        if role == "user" and not text.strip() and not urls:
            raise APIError(400, f"messages.{i}: the message is empty", param=f"messages.{i}")
        try:
            prompts.append(with_image_placeholders(text, len(urls)))
        except CuMoError as e:
            raise APIError(400, f"messages.{i}: {e}", param=f"messages.{i}") from None
        images += urls
    return Conversation(prompts, system_text if system else DEFAULT_SYSTEM, images)


def _content(message: Message, index: int) -> tuple[list[str], list[str]]:
    """A message's texts and image URLs, in the order of its parts."""
    if message.content is None:
        raise APIError(400, f"messages.{index}.content: a message needs content", param=f"messages.{index}.content")
    if isinstance(message.content, str):
        return [message.content], []
    texts = [part.text for part in message.content if isinstance(part, TextPart)]
    return texts, [part.url for part in message.content if isinstance(part, ImagePart)]
