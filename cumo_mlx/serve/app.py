"""`cumo-mlx serve`'s HTTP app: OpenAI's chat completions API, with images, on a generation backend.

    POST /v1/chat/completions (also /chat/completions)   answers, whole or streamed (server-sent events)
    GET  /v1/models                                      the one model served
    GET  /health                                         200 once the model is loaded, 503 before (no key)
    GET  /metrics                                        Prometheus text
    POST /v1/cumo/routes                                 the expert view of one image (expert_view.py)
    GET  /                                               the chat page; /static serves its files

With an API key every route but /health, / and /static wants `Authorization: Bearer KEY` (CORS
preflights are answered before that, for the origins allowed). A request body is read whole, at
most `max_body_bytes`; images are fetched and the prompt tokenized on a worker thread of the event
loop's pool, then the request is queued on the backend.
"""

import hmac
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..generate import GenerationOptions
from ..prompt import DEFAULT_SYSTEM, chat_prompt
from . import errors
from .backend import Options, Unavailable
from .completion import Completion
from .errors import APIError
from .expert_view import expert_view, parse_routes_request
from .images import ImageFetcher
from .metrics import Metrics
from .schema import ChatRequest, conversation, logit_bias, parse

STATIC = Path(__file__).parent / "static"  # the chat page's files
PATHS = ("/v1/chat/completions", "/chat/completions", "/v1/models", "/health", "/metrics", "/", "/v1/cumo/routes")


@dataclass(frozen=True)
class ServerConfig:
    """What the server allows: the key, the origins, the local folder, and the size limits."""

    model_id: str = "cumo"
    api_key: Optional[str] = None
    allowed_origins: tuple[str, ...] = ()
    allow_local_files: Optional[Path] = None
    max_body_bytes: int = 64 << 20
    max_images: int = 8
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 50_000_000
    url_timeout_s: float = 20.0
    keepalive_s: float = 10.0
    default_max_tokens: int = 512


class Server:
    """The app's state: the backend, the config, the metrics and the image fetcher."""

    def __init__(self, backend, config: ServerConfig):
        self.backend, self.config = backend, config
        self.metrics = Metrics()
        self.images = ImageFetcher(
            config.allow_local_files, config.max_image_bytes, config.max_image_pixels, config.url_timeout_s
        )
        self.created = int(time.time())

    def check_ready(self) -> None:
        if self.backend.load_error is not None:
            raise Unavailable("the model failed to load (see the server's log)", retry_after=60)
        if not self.backend.ready.is_set():
            raise Unavailable("the model is still loading", retry_after=5)

    def prepare(self, request: ChatRequest) -> tuple[list[int], list, Options]:
        """The prompt ids, images and options of a request (blocking: images are fetched here, last)."""
        chat = conversation(request.messages)
        count = len(chat.images)
        if count > self.config.max_images:
            raise APIError(400, f"messages: {count} images, over the limit of {self.config.max_images}", param="messages")
        ids = self.backend.processor.tokenize(chat_prompt(chat.turns, chat.system))
        positions = len(ids) + count * (self.backend.image_tokens - 1)
        context = self.backend.context_length
        if positions >= context:
            raise APIError(400, f"messages: the prompt is {positions} tokens ({count * self.backend.image_tokens} "
                           f"of them image features), over the model's context of {context}", param="messages")  # fmt: skip
        requested = request.max_completion_tokens or request.max_tokens
        max_tokens = requested or min(self.config.default_max_tokens, context - positions)
        if positions + max_tokens > context:
            param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{param}: the prompt takes {positions} of the model's {context} positions, "
                           f"{max_tokens} more tokens do not fit", param=param)  # fmt: skip
        given = {"temp": request.temperature, "top_p": request.top_p, "min_p": request.min_p, "top_k": request.top_k,
                 "repetition_penalty": request.repetition_penalty}  # fmt: skip
        generation = GenerationOptions.of(
            max_tokens=max_tokens,
            logit_bias=logit_bias(request, self.backend.vocab_size),
            **{name: value for name, value in given.items() if value is not None},
        )
        options = Options(generation, request.seed, (request.top_logprobs or 0) if request.logprobs else None)
        return ids, [self.images.fetch(url) for url in chat.images], options


class EventStream(StreamingResponse):
    """A completion's server-sent events; however the response ends (the client gone included),
    the generation is cancelled."""

    def __init__(self, completion: Completion):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(completion.events(), media_type="text/event-stream", headers=headers)
        self.completion = completion

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.completion.handle.cancel()


class CountRequests:
    """ASGI middleware: each answered request counted by path (known routes only) and status."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # unless a response starts

        async def counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.metrics.count_request(scope["path"] if scope["path"] in PATHS else "other", status)


def require_key(request: Request) -> None:
    key = request.app.state.server.config.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


async def read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def chat_completions(request: Request) -> Response:
    server: Server = request.app.state.server
    started = time.monotonic()
    chat = parse(await read_body(request, server.config.max_body_bytes))
    server.check_ready()
    ids, images, options = await run_in_threadpool(server.prepare, chat)
    handle = server.backend.submit(ids, images, options)
    completion = Completion(
        handle,
        model=server.config.model_id,
        stops=chat.stops,
        logprobs=bool(chat.logprobs),
        tokenizer=server.backend.processor.tokenizer,
        metrics=server.metrics,
        started=started,
        include_usage=bool(chat.stream_options and chat.stream_options.include_usage),
        keepalive_s=server.config.keepalive_s,
    )
    if chat.stream:
        return EventStream(completion)
    result = await completion.whole(request.is_disconnected)
    return Response(status_code=499) if result is None else JSONResponse(result)  # 499: the client closed


async def cumo_routes(request: Request) -> JSONResponse:
    """Which expert each patch of one image goes to at every MoE site (and, for a Mixtral LLM, each
    answer token), computed on the backend's thread, which owns MLX."""
    server: Server = request.app.state.server
    body = parse_routes_request(await read_body(request, server.config.max_body_bytes))
    server.check_ready()
    image = await run_in_threadpool(server.images.fetch, body.url)
    view = await server.backend.call(
        lambda model, processor: expert_view(model, processor, image, body.question, body.answer, body.system or DEFAULT_SYSTEM)
    )
    return JSONResponse(view)


def create_app(backend, config: ServerConfig) -> FastAPI:
    """The app serving `backend` (see backend.py for what it provides); the caller starts and closes it."""
    app = FastAPI(title="cumo-mlx", docs_url=None, redoc_url=None, openapi_url=None)
    server = app.state.server = Server(backend, config)
    errors.install(app)
    keyed = [Depends(require_key)]
    for path in ("/v1/chat/completions", "/chat/completions"):
        app.add_api_route(path, chat_completions, methods=["POST"], dependencies=keyed)
    app.add_api_route("/v1/cumo/routes", cumo_routes, methods=["POST"], dependencies=keyed)

    @app.get("/v1/models", dependencies=keyed)
    def models() -> dict:
        model = {"id": config.model_id, "object": "model", "created": server.created, "owned_by": "cumo-mlx"}
        return {"object": "list", "data": [model]}

    @app.get("/health")
    def health() -> JSONResponse:
        try:
            server.check_ready()
        except Unavailable as e:
            return JSONResponse({"status": "unavailable", "message": str(e)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", dependencies=keyed)
    def metrics() -> PlainTextResponse:
        text = server.metrics.render(backend.stats(), backend.ready.is_set())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/")
    def chat_page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(CountRequests, metrics=server.metrics)
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app
