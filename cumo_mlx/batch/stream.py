"""The stream a request's answer comes on: one TokenResponse per generated token."""

import queue
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import mlx.core as mx


@dataclass
class TokenResponse:
    """One step of a request's answer. The last one of a request has a `finish_reason`: "stop" (its
    token is `</s>`, not part of the answer), "length", "cancelled" or "error" (then `error` says why)."""

    request_id: int
    text: str  # the answer's new text (may be empty: a character can take several tokens)
    token: Optional[int]  # the generated id; None on "cancelled" and "error"
    generation_tokens: int  # tokens generated so far
    prompt_tokens: int  # LLM positions of the prompt, image rows included
    cached_tokens: int = 0  # of those, taken from the prompt cache instead of prefilled
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    logprobs: Optional[mx.array] = None  # [vocab] log-probabilities the token was sampled from


class RequestStream:
    """The responses of one submitted request, in order; iterating blocks until the next one and
    ends after the last. The engine's thread fills it; any thread reads it or cancels the request.
    `on_response` (if given) is also called with each response, from the engine's thread (an
    asyncio server passes one that hands the response to its loop with `call_soon_threadsafe`)."""

    def __init__(self, request_id: int, cancel: Callable[[int], None], on_response=None):
        self.id = request_id
        self._cancel = cancel
        self._on_response = on_response
        self._queue: queue.SimpleQueue[TokenResponse] = queue.SimpleQueue()

    def deliver(self, response: TokenResponse) -> None:
        """Called by the engine with each response."""
        self._queue.put(response)
        if self._on_response is not None:
            self._on_response(response)

    def get(self, timeout: Optional[float] = None) -> TokenResponse:
        """The next response (queue.Empty after `timeout` seconds)."""
        return self._queue.get(timeout=timeout)

    def __iter__(self) -> Iterator[TokenResponse]:
        while True:
            response = self._queue.get()
            yield response
            if response.finish_reason is not None:
                return

    def cancel(self) -> None:
        """Stop the request: it leaves the batch at the engine's next step, with a "cancelled" response."""
        self._cancel(self.id)
