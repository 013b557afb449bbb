"""What `cumo-mlx serve` generates through: one small interface, and a backend that runs it.

The HTTP layer sees only this:

    handle = backend.submit(prompt_ids, images, options)   # Unavailable: loading, closing, queue full
    async for event in handle: ...                         # TokenEvents; the last has a finish_reason
    result = await backend.call(work)                      # work(model, processor), run where MLX runs
    handle.cancel()                                        # any time: the generation stops before its next token
    backend.stats()                                        # BackendStats, for /metrics

plus `ready` / `load_error` (the model loads in the background), `processor` (prompt ids, token
strings), `context_length`, `image_tokens` (LLM positions per image), `vocab_size`, `start()` and
`close()`.
`submit` is called from the server's asyncio loop; events arrive on that loop.

`ThreadBackend` runs it with `cumo_mlx.generate.stream_generate`, one request at a time, on one
worker thread that owns MLX (MLX work stays on one thread), with images through a `VisionCache`.
A continuous-batching engine can replace it behind the same interface.
"""

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import mlx.core as mx
from PIL import Image

from ..batch.vision_cache import VisionCache
from ..errors import CuMoError
from ..generate import GenerationOptions, context_length, stream_generate
from ..models.model import Model
from ..processor import Processor

logger = logging.getLogger("cumo_mlx.serve")


@dataclass(frozen=True)
class Options:
    """How to generate one answer: `generation` (sampling: `cumo_mlx.generate.GenerationOptions`),
    the seed of MLX's random state (None: not reseeded), and `top_logprobs` (None: no logprobs; n:
    each token's log-probability and the n likeliest tokens')."""

    generation: GenerationOptions = field(default_factory=GenerationOptions)
    seed: Optional[int] = None
    top_logprobs: Optional[int] = None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. `text` is the answer's new text (may be empty: a character can take
    several tokens); `prompt_tokens` the prompt's LLM positions (image rows included). The last event
    has `finish_reason` "stop" (its token is `</s>`, not part of the answer) or "length"."""

    text: str
    token: int
    prompt_tokens: int
    logprob: Optional[float] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None  # (token id, log-probability), likeliest first
    finish_reason: Optional[str] = None


@dataclass(frozen=True)
class BackendStats:
    queue_depth: int  # requests waiting to start
    running: int  # sequences being generated
    cancelled: int  # requests stopped by `cancel` (queued or running)
    vision_cache_hits: int
    vision_cache_misses: int


class Unavailable(Exception):
    """The backend cannot take a request now (loading, shutting down, queue full): retry later."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Handle:
    """The events of one submitted request, read on the asyncio loop that submitted it.

    The backend's thread `put`s each event (or an exception, raised to the reader); iteration ends
    after the event with a finish_reason. `__anext__` is cancel-safe: a timeout around it loses nothing.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def put(self, item) -> None:
        """From the backend's thread: a TokenEvent, or the exception that ended the request."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody reads this request any more
            self.cancel()

    def __aiter__(self) -> "Handle":
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        item = await self._events.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finish_reason is not None
        return item


@dataclass
class _Job:
    prompt_ids: list[int]
    images: list[Image.Image]
    options: Options
    handle: Handle


class ThreadBackend:
    """`stream_generate` on one worker thread, first come first served.

    `load` returns (model, processor); it runs on the worker thread, which then calls
    `on_loaded(None)`, or `on_loaded(error)` if it failed. At most `max_queue` requests wait.
    `max_batch_size` is accepted for the interface: this backend decodes one sequence at a time.
    `vision_cache_bytes` bounds the image features kept (0: none).
    """

    def __init__(
        self,
        load: Callable[[], tuple[Model, Processor]],
        *,
        max_queue: int = 64,
        max_batch_size: int = 1,
        vision_cache_bytes: int = 512 << 20,
        on_loaded: Optional[Callable[[Optional[BaseException]], None]] = None,
    ):
        self.max_queue, self.max_batch_size = max_queue, max_batch_size
        self.ready = threading.Event()
        self.load_error: Optional[BaseException] = None
        self.processor: Optional[Processor] = None
        self.context_length = self.image_tokens = self.vocab_size = 0
        self._load, self._on_loaded = load, on_loaded
        self._vision_cache = VisionCache(vision_cache_bytes)
        self._model: Optional[Model] = None
        self._waiting: deque[_Job] = deque()
        self._calls: list[tuple[Callable, asyncio.AbstractEventLoop, asyncio.Future]] = []  # see `call`
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._running = 0
        self._cancelled = 0
        self._thread = threading.Thread(target=self._serve, name="cumo-mlx-generate", daemon=True)

    def start(self) -> "ThreadBackend":
        self._thread.start()
        return self

    def submit(self, prompt_ids: list[int], images: list[Image.Image], options: Options) -> Handle:
        """Queue a request (from the asyncio loop that will read its events)."""
        with self._lock:
            if self._closing:
                raise Unavailable("the server is shutting down")
            if not self.ready.is_set():
                raise Unavailable("the model is still loading", retry_after=5)
            if sum(not job.handle.cancelled for job in self._waiting) >= self.max_queue:
                raise Unavailable(f"the server is busy ({self.max_queue} requests are waiting)")
            handle = Handle(asyncio.get_running_loop())
            self._waiting.append(_Job(list(prompt_ids), list(images), options, handle))
            self._wake.notify()
        return handle

    def call(self, work: Callable[[Model, Processor], Any]) -> asyncio.Future:
        """Run `work(model, processor)` on the worker thread before the next request starts (MLX
        work stays on that thread); await the returned future for its result or its exception."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._closing:
                raise Unavailable("the server is shutting down")
            if not self.ready.is_set():
                raise Unavailable("the model is still loading", retry_after=5)
            self._calls.append((work, loop, future))
            self._wake.notify()
        return future

    def stats(self) -> BackendStats:
        with self._lock:
            waiting = sum(not job.handle.cancelled for job in self._waiting)
        cache = self._vision_cache
        return BackendStats(waiting, self._running, self._cancelled, cache.hits, cache.misses)

    def close(self, timeout: Optional[float] = None) -> None:
        """Refuse new requests, end the waiting ones (Unavailable), stop the thread after the running one."""
        with self._lock:
            self._closing = True
            while self._waiting:
                self._waiting.popleft().handle.put(Unavailable("the server is shutting down"))
            for _, loop, future in self._calls:
                _settle(loop, future, error=Unavailable("the server is shutting down"))
            self._calls.clear()
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the worker thread ----------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            self._start_model()
            while (job := self._next_job()) is not None:
                self._run(job)
        finally:
            mx.clear_streams()  # this thread's MLX streams go with it, not at process exit (which can abort)

    def _start_model(self) -> None:
        try:
            model, processor = self._load()
        except BaseException as e:  # reported by the server; nothing can be generated
            self.load_error = e
            with self._lock:
                self._closing = True
            if self._on_loaded is not None:
                self._on_loaded(e)
            return
        self._model, self.processor = model, processor
        self.context_length, self.image_tokens = context_length(model), model.args.image_tokens
        self.vocab_size = model.args.text_config.vocab_size
        self.ready.set()
        if self._on_loaded is not None:
            self._on_loaded(None)

    def _run(self, job: _Job) -> None:
        if job.handle.cancelled:
            self._cancelled += 1
            return
        self._running = 1
        try:
            self._generate(job)
        except Exception as e:  # the request's fault (CuMoError) or ours: its reader reports it
            if not isinstance(e, CuMoError):
                logger.exception("generation failed")
            job.handle.put(e)
        finally:
            self._running = 0

    def _next_job(self) -> Optional[_Job]:
        """The next request, once the calls waiting before it have run; None when closing."""
        while True:
            with self._lock:
                while not self._waiting and not self._calls and not self._closing:
                    self._wake.wait()
                calls, self._calls = self._calls, []
                if not calls:
                    return self._waiting.popleft() if self._waiting else None
            for work, loop, future in calls:
                try:
                    result = work(self._model, self.processor)
                except Exception as e:  # the caller reports it
                    _settle(loop, future, error=e)
                else:
                    _settle(loop, future, result)

    def _generate(self, job: _Job) -> None:
        options, handle = job.options, job.handle
        if options.seed is not None:
            mx.random.seed(options.seed)
        features = None
        if job.images:
            encoded = [self._vision_cache.encode(self._model, self.processor, image) for image in job.images]
            features = mx.concatenate([e.features for e in encoded])
        responses = stream_generate(
            self._model, self.processor, job.prompt_ids, image_features=features, options=options.generation
        )
        try:
            for response in responses:
                if handle.cancelled:
                    self._cancelled += 1
                    return
                handle.put(self._event(response, options.top_logprobs))
        finally:
            responses.close()

    @staticmethod
    def _event(response, top_logprobs: Optional[int]) -> TokenEvent:
        logprob = top = None
        if top_logprobs is not None:
            logprobs = response.logprobs
            logprob = logprobs[response.token].item()
            if top_logprobs:
                ids = mx.argpartition(-logprobs, top_logprobs - 1)[:top_logprobs]
                values = logprobs[ids].tolist()
                top = sorted(zip(ids.tolist(), values), key=lambda pair: -pair[1])
        return TokenEvent(
            response.text, response.token, response.prompt_tokens, logprob, top, response.finish_reason
        )


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result=None, error=None) -> None:
    """From another thread: give `future` its result or error (unless its awaiter gave up on it)."""

    def settle():
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed
        pass
