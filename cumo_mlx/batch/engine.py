"""Continuous batching: requests join and leave one running batch between decode steps.

Decoding is mlx-lm's `BatchGenerator` (its batch KV caches, samplers, logits processors and stop
tokens), driven one step at a time. What images need is done here: a new request's prompt is
prefilled from its input embeddings (image rows spliced in as `cumo_mlx.generate` splices them)
into its own KV cache (`prefill.py`: alone in `prefill_step_size` chunks as `generate` does, or
short prompts together). All but its last position go in; the request then joins the batch with
that cache and its last token id, and mlx-lm merges the cache into the batch's (left-padded,
masked, RoPE offsets per sequence).

So in decoding no padded position runs through the model: padding exists only as masked KV
entries. Each sequence computes what it computes alone, up to float rounding of different matrix
shapes, and the Mixtral MoE routes every position on its own (no capacity limit: positions never
compete for an expert).

Images go through a `VisionCache`; finished requests leave their KV in a `PromptCache`, so a
request extending an earlier prompt + answer prefills only its new positions.

One thread owns MLX: `step()` in a loop of the caller's (as `batch_generate` does), `run()` on a
thread of the caller's (as the server's backend does), or `start()`'s background thread. `submit`,
`cancel` and `call` (other MLX work, run between two steps) are thread-safe and do no MLX work.
"""

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

from ..errors import CuMoError
from ..generate import GenerationOptions, as_image_list, prompt_ids, prompt_inputs
from ..models.model import Model
from ..processor import ImageSource, Processor
from ..prompt import DEFAULT_SYSTEM, IMAGE_TOKEN_INDEX
from ..vision_cache import VisionCache, features_digest
from .prefill import prefill_alone, prefill_groups, prefill_together
from .prompt_cache import PromptCache, position_keys
from .stream import RequestStream, TokenResponse

logger = logging.getLogger("cumo_mlx.batch")


@dataclass
class BatchStats:
    """What an engine did: prompt positions prefilled (and reused from the prompt cache), tokens
    generated, and the seconds spent on each; vision cache hits and misses."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_steps: int = 0
    generation_time: float = 0.0
    images: int = 0
    image_time: float = 0.0
    vision_hits: int = 0
    vision_misses: int = 0
    wall_time: float = 0.0
    peak_memory: float = 0.0  # GB, the process's peak

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_time if self.generation_time > 0 else 0.0


@dataclass
class _Job:
    """A request inside the engine."""

    stream: RequestStream
    ids: list[int]
    images: list[ImageSource]
    image_features: Optional[mx.array]
    rows: int  # LLM positions per image
    options: GenerationOptions
    positions: int  # LLM positions of the prompt
    need: int  # KV positions it may fill: prompt + max_tokens
    seed: Optional[int] = None
    uid: Optional[int] = None
    keys: list = field(default_factory=list)
    cached: int = 0
    tokens: list[int] = field(default_factory=list)  # generated, `</s>` included
    detokenizer: object = None


@dataclass
class _Start:
    """A request being started: its ids with the image rows laid out, the embeddings still to
    prefill (all but the cached prefix and the last position), and its KV cache (None: a new one)."""

    job: _Job
    tokens: list[int]
    pending: mx.array
    cache: Optional[list]


def kv_bytes_per_position(model: Model) -> int:
    """Bytes of K and V that one position takes in every layer of the LLM's cache."""
    args = model.language_model.args
    dtype = model.language_model.model.embed_tokens(mx.array([0])).dtype
    return 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * dtype.size


def _mib(size: float) -> str:
    return f"{size / (1 << 20):.1f} MiB"


class BatchEngine:
    """Answers many requests at once with one model.

    At most `max_sequences` requests decode together, and the KV cache of the running batch
    (`max_kv_bytes`: each request counted at its prompt + max_tokens, every sequence padded to the
    longest, as the batch cache stores them) stays under the cap; beyond either, requests wait in
    a queue, first come first served. A request that could never fit is refused by `submit`.
    `prompt_cache_bytes` bounds the KV kept from finished requests (0: none kept).
    """

    def __init__(
        self,
        model: Model,
        processor: Processor,
        *,
        max_sequences: int = 8,
        max_kv_bytes: Optional[int] = None,
        vision_cache: Optional[VisionCache] = None,
        prompt_cache_bytes: int = 1 << 30,
    ):
        for name, value in (("max_sequences", max_sequences), ("max_kv_bytes", max_kv_bytes)):
            if value is not None and value < 1:
                raise CuMoError(f"{name} must be at least 1, got {value}", "change that option")
        self.model, self.processor = model, processor
        self.max_sequences, self.max_kv_bytes = max_sequences, max_kv_bytes
        self.vision_cache = VisionCache() if vision_cache is None else vision_cache
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.stats = BatchStats()
        self.kv_position_bytes = kv_bytes_per_position(model)
        self.generator = self._new_generator()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[_Job] = []  # submitted, not yet seen by the engine's thread
        self._cancels: set[int] = set()
        self._calls: list[tuple[Callable[[], Any], Future]] = []  # see `call`
        self._waiting: deque[_Job] = deque()
        self._running: dict[int, _Job] = {}  # by BatchGenerator uid
        self._thread: Optional[threading.Thread] = None
        self._serving = False  # `run()` is looping
        self._stopping = False

    def _new_generator(self) -> BatchGenerator:
        """mlx-lm's batch decoder. Requests reach it prefilled, with one token left to run, so its own
        (right-padded, batched) prompt processing never runs."""
        return BatchGenerator(
            self.model.language_model,
            stop_tokens=[[eos] for eos in self.processor.tokenizer.eos_token_ids],
            completion_batch_size=self.max_sequences,
            prefill_batch_size=self.max_sequences,
        )

    # --- any thread -------------------------------------------------------------------------------

    def submit(
        self,
        prompt: Union[str, Sequence[int]],
        images: Union[ImageSource, Sequence[ImageSource], None] = None,
        *,
        image_features: Optional[mx.array] = None,
        system: Optional[str] = DEFAULT_SYSTEM,
        options: Optional[GenerationOptions] = None,
        on_response: Optional[Callable[[TokenResponse], None]] = None,
        seed: Optional[int] = None,
        **option_values,
    ) -> RequestStream:
        """Queue a request and return the stream its answer comes on.

        `prompt`, `images` (or `image_features` [n, rows, hidden] already encoded), `system`,
        `options` and the option keywords are those of `cumo_mlx.stream_generate` (kv_bits and
        max_kv_size refused: `check_options`). `seed` reseeds MLX's random state when the request
        joins the batch; the batch shares that one state, so a sampled (temp > 0) answer repeats
        only when its request decodes alone. Raises CuMoError now for a request that can
        never run (bad options, an empty prompt, a wrong count of images, over the KV cap); images
        are read later, by the engine: an unreadable one, or a prompt over the model's context,
        ends that request with finish_reason "error".
        """
        options = GenerationOptions.of(options, **option_values)
        self.check_options(options)
        images = as_image_list(images)
        if images and image_features is not None:
            raise CuMoError("give images or image_features, not both")
        count = len(images) if image_features is None else image_features.shape[0]
        rows = self.model.args.image_tokens if image_features is None else image_features.shape[1]
        ids = prompt_ids(self.processor, prompt, count, system)
        if ids[-1] == IMAGE_TOKEN_INDEX:
            raise CuMoError("the prompt ends with an image", "put the question after the last image")
        positions = len(ids) + count * (rows - 1)
        need = positions + options.max_tokens
        if self.max_kv_bytes is not None and need * self.kv_position_bytes > self.max_kv_bytes:
            raise CuMoError(
                f"the request needs {_mib(need * self.kv_position_bytes)} of KV cache ({positions} prompt "
                f"positions + max_tokens), over the cap of {_mib(self.max_kv_bytes)}",
                "lower max_tokens or raise max_kv_bytes",
            )
        with self._lock:
            stream = RequestStream(next(self._ids), self.cancel, on_response)
            self._inbox.append(_Job(stream, ids, images, image_features, rows, options, positions, need, seed))
            self._wake.notify()
        return stream

    def call(self, work: Callable[[], Any]) -> Future:
        """Run `work()` on the engine's thread before its next step (MLX work that must not run on
        another thread); the future gets its result or exception (cancelled if the engine stops first)."""
        future: Future = Future()
        with self._lock:
            self._calls.append((work, future))
            self._wake.notify()
        return future

    @property
    def running(self) -> int:
        """Requests in the batch now."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests queued, not yet started."""
        with self._lock:
            return len(self._waiting) + len(self._inbox)

    def cancel(self, request_id: int) -> None:
        """End a request: it leaves the queue or the batch at the next step ("cancelled")."""
        with self._lock:
            self._cancels.add(request_id)
            self._wake.notify()

    @staticmethod
    def check_options(options: GenerationOptions) -> None:
        """CuMoError for the KV cache options a batch cannot honour as `generate` does: mlx-lm's batch
        KV cache has no quantized form (kv_bits), and its rotating form keeps none of the first 4
        positions `generate`'s rotating cache keeps (max_kv_size), so answers would differ."""
        for name in ("kv_bits", "max_kv_size"):
            if getattr(options, name) is not None:
                raise CuMoError(
                    f"{name} is not supported in batched generation",
                    f"leave {name} out (max_kv_bytes bounds a batch's KV cache), or use cumo_mlx.generate",
                )

    # --- the engine's thread ----------------------------------------------------------------------

    def step(self) -> bool:
        """One round: run the calls waiting, take new requests and cancellations, start the waiting
        requests that fit (prefilled), then one decode step of the batch. Whether requests remain."""
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            cancels, self._cancels = self._cancels, set()
            calls, self._calls = self._calls, []
        for work, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work())
                except Exception as e:  # the caller's to report
                    future.set_exception(e)
        if cancels:
            self._cancel(cancels)
        self._admit()
        if self._running:
            self._decode()
        return bool(self._waiting or self._running)

    def snapshot(self) -> BatchStats:
        """The counters now, with the process's peak memory."""
        return replace(self.stats, peak_memory=mx.get_peak_memory() / 1e9)

    def _cancel(self, request_ids: set[int]) -> None:
        for job in [job for job in self._waiting if job.stream.id in request_ids]:
            self._waiting.remove(job)
            self._finish(job, "cancelled")
        uids = [uid for uid, job in self._running.items() if job.stream.id in request_ids]
        if uids:
            self.generator.remove(uids)
            for uid in uids:
                self._finish(self._running.pop(uid), "cancelled")

    def _fits(self, job: _Job, starting: list["_Start"]) -> bool:
        jobs = [*self._running.values(), *(start.job for start in starting)]
        if self.max_kv_bytes is None or not jobs:
            return True  # alone, every request fits (submit checked it)
        jobs.append(job)
        return len(jobs) * max(j.need for j in jobs) * self.kv_position_bytes <= self.max_kv_bytes

    def _admit(self) -> None:
        """Start the waiting requests that fit: each prepared (images, prompt cache), all prefilled,
        then added to the batch together."""
        starting: list[_Start] = []
        while (
            self._waiting
            and len(self._running) + len(starting) < self.max_sequences
            and self._fits(self._waiting[0], starting)
        ):
            job = self._waiting.popleft()
            try:
                starting.append(self._prepare(job))
            except CuMoError as e:  # an unreadable image, over the context: this request ends, the others go on
                self._finish(job, "error", str(e))
        if not starting:
            return
        try:
            self._prefill(starting)
            self._insert(starting)
        except Exception as e:  # out of memory, a bug: end these requests too before passing it on
            for start in starting:
                self._finish(start.job, "error", f"the engine failed: {type(e).__name__}: {e}")
            raise

    def _prepare(self, job: _Job) -> "_Start":
        features, digests = self._image_features(job)
        tokens, embeddings = prompt_inputs(self.model, job.ids, features)  # CuMoError over the context
        job.keys = position_keys(job.ids, digests, job.rows)
        cache, job.cached = self.prompt_cache.fetch(job.keys)
        self.stats.prompt_tokens += job.positions - job.cached
        self.stats.cached_tokens += job.cached
        return _Start(job, tokens.tolist(), embeddings[job.cached : -1], cache)

    def _prefill(self, starting: list["_Start"]) -> None:
        """Every position of the new requests but the last into their caches: short fresh prompts
        together (`prefill_groups`), the others alone."""
        tic = time.perf_counter()
        language_model = self.model.language_model
        fresh = [s for s in starting if s.cache is None and s.pending.shape[0]]
        lengths, steps = [s.pending.shape[0] for s in fresh], [s.job.options.prefill_step_size for s in fresh]
        with mx.stream(self.generator.stream):
            for group in prefill_groups(lengths, steps):
                if len(group) > 1:
                    for i, cache in zip(group, prefill_together(language_model, [fresh[i].pending for i in group])):
                        fresh[i].cache, fresh[i].pending = cache, fresh[i].pending[:0]
            for s in starting:
                if s.cache is None:
                    s.cache = make_prompt_cache(language_model)
                prefill_alone(language_model, s.pending, s.cache, s.job.options.prefill_step_size)
        self.stats.prompt_time += time.perf_counter() - tic

    def _insert(self, starting: list["_Start"]) -> None:
        """Hand the prefilled requests to mlx-lm's batch, each with its last prompt token."""
        options = [s.job.options for s in starting]
        vocab_size = self.model.args.text_config.vocab_size
        for s in starting:
            if s.job.seed is not None:
                mx.random.seed(s.job.seed)
        uids = self.generator.insert(
            [[s.tokens[-1]] for s in starting],
            [o.max_tokens for o in options],
            caches=[s.cache for s in starting],
            all_tokens=[s.tokens[:-1] for s in starting],  # the history the logits processors see, as in generate
            samplers=[o.sampler(vocab_size) for o in options],
            logits_processors=[o.logits_processors() for o in options],
        )
        for s, uid in zip(starting, uids):
            s.job.uid, s.job.detokenizer = uid, self.processor.tokenizer.detokenizer
            self._running[uid] = s.job

    def _image_features(self, job: _Job) -> tuple[Optional[mx.array], list[str]]:
        """The request's image features [n, rows, hidden] through the vision cache, and their digests."""
        if job.image_features is not None:
            return job.image_features, [features_digest(f) for f in job.image_features]
        if not job.images:
            return None, []
        tic = time.perf_counter()
        encoded = self.vision_cache.encode_all(self.model, self.processor, job.images)  # ImageError: a bad image
        self.stats.images += len(encoded)
        self.stats.image_time += time.perf_counter() - tic
        self.stats.vision_hits += sum(e.hit for e in encoded)
        self.stats.vision_misses += sum(not e.hit for e in encoded)
        return mx.concatenate([e.features for e in encoded]), [e.digest for e in encoded]

    def _decode(self) -> None:
        tic = time.perf_counter()
        _, responses = self.generator.next()
        self.stats.generation_time += time.perf_counter() - tic
        self.stats.generation_steps += bool(responses)
        for response in responses:
            self._emit(self._running[response.uid], response)

    def _emit(self, job: _Job, response) -> None:
        """Pass one generated token on; at the end, keep the request's KV for the prompt cache."""
        job.tokens.append(response.token)
        self.stats.generation_tokens += 1
        if response.finish_reason != "stop":  # `</s>` is not part of the text
            job.detokenizer.add_token(response.token)
        if response.finish_reason is not None:
            job.detokenizer.finalize()
            del self._running[job.uid]
            # The cache holds the prompt and every generated token (each was fed back before it was returned).
            self.prompt_cache.store(job.keys + job.tokens, response.prompt_cache)
        job.stream.deliver(
            TokenResponse(job.stream.id, job.detokenizer.last_segment, response.token, len(job.tokens),
                          job.positions, job.cached, response.finish_reason, logprobs=response.logprobs)  # fmt: skip
        )

    def _finish(self, job: _Job, reason: str, error: Optional[str] = None) -> None:
        """End a request that did not finish by itself ("cancelled" or "error")."""
        text = ""
        if job.detokenizer is not None:
            job.detokenizer.finalize()
            text = job.detokenizer.last_segment
        job.stream.deliver(
            TokenResponse(job.stream.id, text, None, len(job.tokens), job.positions, job.cached, reason, error)
        )

    def _abort(self, reason: str, error: Optional[str] = None) -> None:
        """End every request and start over with an empty batch."""
        with self._lock:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            if reason == "cancelled":  # stopping: the calls waiting will not run
                for _, future in self._calls:
                    future.cancel()
                self._calls.clear()
        for job in [*self._waiting, *self._running.values()]:
            self._finish(job, reason, error)
        self._waiting.clear()
        self._running.clear()
        self.generator.close()
        self.generator = self._new_generator()

    # --- the background thread --------------------------------------------------------------------

    def start(self) -> "BatchEngine":
        """Run the engine in a background thread, which then owns MLX, until `close()`."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self.run, name="cumo-mlx-batch-engine", daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        """Serve on the calling thread, which then owns MLX, until `close()`; the requests left
        then end "cancelled"."""
        with self._lock:
            self._serving = True
        busy = False
        while True:
            with self._lock:
                while not (busy or self._inbox or self._cancels or self._calls or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                busy = self.step()
            except Exception as e:  # a bug or MLX out of memory: end the requests, keep serving
                logger.exception("the batch engine failed")
                self._abort("error", f"the engine failed: {type(e).__name__}: {e}")
                busy = False
        self._abort("cancelled")
        with self._lock:
            self._serving = False

    def close(self) -> None:
        """Stop serving; requests not finished end "cancelled". `start()`'s thread is joined; a
        thread of the caller's in `run()` is only asked to stop (its owner joins it)."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
            serving = self._serving
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        elif not serving:
            self._abort("cancelled")

    def __enter__(self) -> "BatchEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
