"""What `cumo-mlx serve` generates through: one small interface, and a backend that runs it.

The HTTP layer sees only this:

    handle = backend.submit(prompt_ids, images, options)   # Unavailable: loading, closing, queue full
    async for event in handle: ...                         # TokenEvents; the last has a finish_reason
    result = await backend.call(work)                      # work(model, processor), run where MLX runs
    handle.cancel()                                        # any time: the request leaves the batch at the next step
    backend.stats()                                        # BackendStats, for /metrics

plus `ready` / `load_error` (the model loads in the background), `processor` (prompt ids, token
strings), `context_length`, `image_tokens` (LLM positions per image), `vocab_size`, `start()` and
`close()`.
`submit` is called from the server's asyncio loop; events arrive on that loop.

`BatchBackend` runs it on `cumo_mlx.batch.BatchEngine` (continuous batching: requests join and
leave one running batch between decode steps), on one thread that loads the model and then owns
MLX, with images through the engine's `VisionCache`. A request's `seed` reseeds MLX's random state
when it joins the batch, but the batch shares that one state: a sampled (temperature > 0) answer
repeats a single run only when its request decodes alone.
"""

import asyncio
import concurrent.futures
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import mlx.core as mx
from PIL import Image

from ..batch.engine import BatchEngine
from ..batch.stream import RequestStream, TokenResponse
from ..errors import CuMoError
from ..generate import GenerationOptions, context_length
from ..models.model import Model
from ..processor import Processor
from ..vision_cache import VisionCache


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

    The engine's thread `put`s each event (or an exception, raised to the reader); iteration ends
    after the event with a finish_reason. `__anext__` is cancel-safe: a timeout around it loses nothing.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = False
        self.stream: Optional[RequestStream] = None  # set once the engine has it
        self.finished = False  # the engine sent its last response

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop the generation (a no-op once it is over): its batch place is free at the next step."""
        if not self._cancelled.is_set() and not self.finished and self.stream is not None:
            self.stream.cancel()
        self._cancelled.set()

    def put(self, item) -> None:
        """From the engine's thread: a TokenEvent, or the exception that ended the request."""
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


def token_event(response: TokenResponse, top_logprobs: Optional[int]) -> TokenEvent:
    """The event of one generated token (on the engine's thread: the logprobs are MLX arrays)."""
    logprob = top = None
    if top_logprobs is not None:
        logprobs = response.logprobs
        logprob = logprobs[response.token].item()
        if top_logprobs:
            ids = mx.argpartition(-logprobs, top_logprobs - 1)[:top_logprobs]
            values = logprobs[ids].tolist()
            top = sorted(zip(ids.tolist(), values), key=lambda pair: -pair[1])
    return TokenEvent(response.text, response.token, response.prompt_tokens, logprob, top, response.finish_reason)


class BatchBackend:
    """A `BatchEngine` on one thread: up to `max_batch_size` requests decode together.

    `load` returns (model, processor); it runs on the thread, which then calls `on_loaded(None)`,
    or `on_loaded(error)` if it failed, and then serves. At most `max_queue` requests wait for a
    place in the batch (beyond: Unavailable, a 503). `vision_cache_bytes` bounds the image
    features kept (0: none).
    """

    def __init__(
        self,
        load: Callable[[], tuple[Model, Processor]],
        *,
        max_queue: int = 64,
        max_batch_size: int = 8,
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
        self._engine: Optional[BatchEngine] = None
        self._lock = threading.Lock()
        self._closing = False
        self._cancelled = 0
        self._thread = threading.Thread(target=self._serve, name="cumo-mlx-generate", daemon=True)

    def start(self) -> "BatchBackend":
        self._thread.start()
        return self

    def _check_open(self) -> BatchEngine:
        if self._closing:
            raise Unavailable("the server is shutting down")
        if not self.ready.is_set():
            raise Unavailable("the model is still loading", retry_after=5)
        return self._engine

    def submit(self, prompt_ids: list[int], images: list[Image.Image], options: Options) -> Handle:
        """Queue a request (from the asyncio loop that will read its events). CuMoError (a 400) for
        a request the engine refuses (kv_bits, max_kv_size)."""
        with self._lock:
            engine = self._check_open()
            if engine.waiting >= self.max_queue:
                raise Unavailable(f"the server is busy ({self.max_queue} requests are waiting)")
            handle = Handle(asyncio.get_running_loop())
            handle.stream = engine.submit(
                list(prompt_ids), list(images), options=options.generation, seed=options.seed,
                on_response=lambda response: self._deliver(handle, response, options.top_logprobs),
            )  # fmt: skip
        return handle

    def _deliver(self, handle: Handle, response: TokenResponse, top_logprobs: Optional[int]) -> None:
        """On the engine's thread: one response to its handle's loop."""
        if response.finish_reason is not None:
            handle.finished = True
        if response.finish_reason == "cancelled":
            if handle.cancelled:
                self._cancelled += 1
            else:  # the engine stopped under it
                handle.put(Unavailable("the server is shutting down"))
        elif response.finish_reason == "error":
            engine_fault = response.error.startswith("the engine failed")  # logged by the engine
            handle.put(RuntimeError(response.error) if engine_fault else CuMoError(response.error))
        elif not handle.cancelled:
            handle.put(token_event(response, top_logprobs))

    async def call(self, work: Callable[[Model, Processor], Any]) -> Any:
        """`work(model, processor)` run on the engine's thread between two decode steps (MLX work
        stays on that thread): its result, or its exception raised here."""
        with self._lock:
            engine = self._check_open()
            future = engine.call(lambda: work(engine.model, engine.processor))
        try:
            return await asyncio.wrap_future(future)
        except concurrent.futures.CancelledError:
            if not self._closing:
                raise
            raise Unavailable("the server is shutting down") from None

    def stats(self) -> BackendStats:
        engine, cache = self._engine, self._vision_cache
        waiting, running = (engine.waiting, engine.running) if engine is not None else (0, 0)
        return BackendStats(waiting, running, self._cancelled, cache.hits, cache.misses)

    def close(self, timeout: Optional[float] = None) -> None:
        """Refuse new requests and stop the engine: the requests not finished end (Unavailable)."""
        with self._lock:
            self._closing = True
            engine = self._engine
        if engine is not None:
            engine.close()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the engine's thread --------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            engine = self._start_engine()
            if engine is not None:
                engine.run()
        finally:
            mx.clear_streams()  # this thread's MLX streams go with it, not at process exit (which can abort)

    def _start_engine(self) -> Optional[BatchEngine]:
        """Load the model and make the engine; None if loading failed or the backend is closing."""
        try:
            model, processor = self._load()
        except BaseException as e:  # reported by the server; nothing can be generated
            self.load_error = e
            with self._lock:
                self._closing = True
            if self._on_loaded is not None:
                self._on_loaded(e)
            return None
        with self._lock:
            if self._closing:
                return None
            self._engine = BatchEngine(
                model, processor, max_sequences=self.max_batch_size, vision_cache=self._vision_cache
            )
        self.processor = processor
        self.context_length, self.image_tokens = context_length(model), model.args.image_tokens
        self.vocab_size = model.args.text_config.vocab_size
        self.ready.set()
        if self._on_loaded is not None:
            self._on_loaded(None)
        return self._engine
