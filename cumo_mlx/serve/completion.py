"""One request's answer in OpenAI's shapes: a `chat.completion`, or `chat.completion.chunk` server-sent
events ending with `data: [DONE]`, made from the backend's token events.

Stop strings are cut here (the backend's generation is cancelled once one appears). A stream sends
`: keepalive` comments while it waits (in the queue, during a long prefill), and its first chunk
carries the assistant role. `usage.prompt_tokens` counts the prompt's LLM positions, each image as
the rows it is spliced into; `usage.completion_tokens` the tokens generated, a final `</s>` included.
Log-probabilities come with the text they belong to (held back with it while it could start a stop string).
"""

import asyncio
import json
import logging
import time
import uuid
from typing import AsyncIterator, Awaitable, Callable, Optional

from .backend import Handle, TokenEvent
from .errors import as_api_error
from .metrics import Metrics
from .stops import StopMatcher

logger = logging.getLogger("cumo_mlx.serve")


def token_bytes(tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text and UTF-8 bytes as OpenAI reports them (SentencePiece's "▁" is a space; a
    byte-fallback piece `<0xNN>` is that one byte)."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        value = int(piece[3:5], 16)
        return bytes([value]).decode("utf-8", errors="backslashreplace"), [value]
    text = piece.replace("\u2581", " ")
    return text, list(text.encode("utf-8", errors="surrogatepass"))


class Completion:
    """Reads `handle` and answers in OpenAI's schema; `started` is when the request came in."""

    def __init__(self, handle: Handle, *, model: str, stops: list[str], logprobs: bool, tokenizer,
                 metrics: Metrics, started: float, include_usage: bool = False, keepalive_s: float = 10.0):  # fmt: skip
        self.handle, self.model, self.logprobs, self.tokenizer = handle, model, logprobs, tokenizer
        self.metrics, self.started, self.include_usage, self.keepalive_s = metrics, started, include_usage, keepalive_s
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.stops = StopMatcher(stops)
        self.prompt_tokens = self.completion_tokens = 0
        self.pending_logprobs: list[dict] = []  # of tokens whose text is held back

    async def next_event(self, timeout: float) -> Optional[TokenEvent]:
        """The next event, None after `timeout` seconds without one; StopAsyncIteration at the end."""
        try:
            return await asyncio.wait_for(anext(self.handle), timeout)
        except asyncio.TimeoutError:
            return None

    def advance(self, event: TokenEvent) -> tuple[str, list[dict], Optional[str]]:
        """The text and logprobs an event releases, and the finish reason once the answer is over."""
        if not self.completion_tokens:
            self.prompt_tokens = event.prompt_tokens
            self.metrics.prompt_tokens += event.prompt_tokens
            self.metrics.observe_ttft(time.monotonic() - self.started)
        self.completion_tokens += 1
        self.metrics.completion_tokens += 1
        if self.logprobs and event.finish_reason != "stop":  # `</s>` is not part of the answer
            self.pending_logprobs.append(self.logprob_entry(event))
        text = self.stops.feed(event.text)
        finish = "stop" if self.stops.stopped else event.finish_reason
        if self.stops.stopped:
            self.handle.cancel()
        elif finish is not None:
            text += self.stops.flush()
        logprobs = []
        if text or finish is not None:
            logprobs, self.pending_logprobs = self.pending_logprobs, []
        return text, logprobs, finish

    def logprob_entry(self, event: TokenEvent) -> dict:
        text, raw = token_bytes(self.tokenizer, event.token)
        top = []
        for token, logprob in event.top_logprobs or []:
            top_text, top_raw = token_bytes(self.tokenizer, token)
            top.append({"token": top_text, "logprob": logprob, "bytes": top_raw})
        return {"token": text, "logprob": event.logprob, "bytes": raw, "top_logprobs": top}

    def usage(self) -> dict:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}

    async def whole(self, disconnected: Callable[[], Awaitable[bool]], poll_s: float = 1.0) -> Optional[dict]:
        """The `chat.completion` object; None if the client went away first (its generation is cancelled)."""
        text, logprobs, finish = "", [], None
        try:
            while finish is None:
                event = await self.next_event(poll_s)
                if event is None:
                    if await disconnected():
                        return None
                    continue
                released, entries, finish = self.advance(event)
                text += released
                logprobs += entries
        finally:
            self.handle.cancel()  # a no-op once the answer is complete
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": {"content": logprobs} if self.logprobs else None,
            "finish_reason": finish,
        }
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage()}  # fmt: skip

    def chunk(self, delta: dict, logprobs: Optional[list] = None, finish: Optional[str] = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": {"content": logprobs} if logprobs is not None else None,
                  "finish_reason": finish}  # fmt: skip
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [choice]}  # fmt: skip
        if self.include_usage:
            chunk["usage"] = None
        return f"data: {json.dumps(chunk)}\n\n"

    async def events(self) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer. Closing the iterator (the client went away)
        cancels the generation."""
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            finish = None
            while finish is None:
                event = await self.next_event(self.keepalive_s)
                if event is None:
                    yield ": keepalive\n\n"
                    continue
                text, logprobs, finish = self.advance(event)
                if text or logprobs:
                    yield self.chunk({"content": text}, logprobs if self.logprobs else None)
            yield self.chunk({}, finish=finish)
            if self.include_usage:
                usage = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                         "model": self.model, "choices": [], "usage": self.usage()}  # fmt: skip
                yield f"data: {json.dumps(usage)}\n\n"
        except Exception as e:  # after the headers: the error goes in the stream
            error = as_api_error(e)
            if error.status >= 500:
                logger.error("generation failed", exc_info=e)
            yield f"data: {json.dumps(error.body())}\n\n"
        finally:
            self.handle.cancel()
        yield "data: [DONE]\n\n"
