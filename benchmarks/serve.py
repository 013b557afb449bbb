"""`cumo-mlx serve` under load: total tokens/s and time to first token at 1, 4 and 16 concurrent
streaming clients, and the time to first token of an image the vision cache has (hit) or not (miss).

    python benchmarks/serve.py [--quick] [--json] [--clients 1,4,16] [--requests 1] [--tokens 16]
        [--layers 2] [--vision-layers 2] [--models demo,mistral-7b] [--repeats 2]

The server (the app and backend `cumo-mlx serve` runs) is a real uvicorn on a local port in this
process; each client is a thread sending --requests streamed chat completions one after the other,
each an image (the same one: a vision-cache hit after the warm-up) and one of four questions,
greedy, --tokens tokens (`</s>` is forbidden by logit_bias, so every answer has that length). A
request's time to first token runs from sending it to the first chunk of answer text; tokens/s
is all answers' tokens over the run's wall time. Every answer is checked against the same
question's answer asked alone: `mismatched` counts those that differ (nothing may be mixed up
under load), `errors` the requests that failed.

Models: `demo` (the shipped demo), and `mistral-7b` with CuMo-Mistral-7B's widths at random
weights: the LLM at Mistral-7B's widths with --layers decoder layers, the vision tower at CLIP-L/14-336's
(576 rows per image, S2 scales [1, 3], CLIP-MoE 4 experts top-2) with --vision-layers layers run,
the MoE connector; the demo's tokenizer (so the LM head has its 526 rows, not 32000).
Vision cache: --repeats requests with a new image each (miss) against the same image again (hit).
"""

import base64
import http.client
import io
import json
import socket
import statistics
import threading
import time
from contextlib import contextmanager

import harness
import mlx.core as mx
import numpy as np
import uvicorn
from cumo_mlx.loader import DEMO_PATH, load, load_processor
from cumo_mlx.models.config import ModelArgs
from cumo_mlx.models.model import Model
from cumo_mlx.serve.app import ServerConfig, create_app
from cumo_mlx.serve.backend import BatchBackend
from PIL import Image

QUESTIONS = ["Describe the image.", "What shape is this?", "What colour is the circle?", "How many shapes are there?"]


def widths_model(args) -> tuple[Model, object]:
    """A CuMo at CuMo-Mistral-7B's widths (random weights), or its tiny stand-in with --quick."""
    config = json.loads((DEMO_PATH / "config.json").read_text())
    llm, clip = (harness.QUICK_MISTRAL, harness.QUICK_CLIP) if args.quick else (harness.MISTRAL_7B, harness.CLIP_L)
    config.update(llm, num_hidden_layers=args.layers, head_dim=llm["hidden_size"] // llm["num_attention_heads"],
                  max_position_embeddings=32768, tokenizer_model_max_length=4096, mm_hidden_size=clip["hidden_size"],
                  scales=[1, 3])  # fmt: skip
    side = clip["image_size"]
    config["vision_config"].update(clip, num_hidden_layers=args.vision_layers + 1, shortest_edge=side, crop_size=side)
    model_args = ModelArgs.from_dict(config)
    model = Model(model_args)
    if mx.default_device() != mx.cpu:
        model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    return model, load_processor(DEMO_PATH, model_args)


def image_uri(seed: int, side: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@contextmanager
def running_server(model, processor, name: str, max_batch_size: int):
    """The server on a free local port: yields the port."""
    backend = BatchBackend(lambda: (model, processor), max_queue=256, max_batch_size=max_batch_size).start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(backend, ServerConfig(name)), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    backend.ready.wait()
    while not server.started:
        time.sleep(0.01)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join()
        backend.close()


def ask(port: int, body: dict) -> dict:
    """One streamed request: its time to first text, answer, token count and finish reason."""
    tic = time.perf_counter()
    result = {"ttft": None, "text": "", "tokens": 0, "finish": None}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            return {**result, "error": f"HTTP {response.status}: {response.read()[:200]!r}"}
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                result["tokens"] = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content") and result["ttft"] is None:
                    result["ttft"] = time.perf_counter() - tic
                result["text"] += choice["delta"].get("content") or ""
                result["finish"] = choice["finish_reason"] or result["finish"]
    finally:
        connection.close()
    return result


def body(question: str, uri: str, tokens: int, eos: int) -> dict:
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": uri}}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "logit_bias": {str(eos): -100}}  # fmt: skip


def load_run(port: int, clients: int, requests: int, make_body, expected: list[str]) -> dict:
    """`clients` threads of `requests` sequential requests each; the figures of the whole run."""
    results, start = [], threading.Barrier(clients)

    def client(i):
        start.wait()
        for j in range(requests):
            question = (i + j) % len(QUESTIONS)
            try:
                results.append((question, ask(port, make_body(QUESTIONS[question]))))
            except OSError as e:
                results.append((question, {"error": str(e)}))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    tic = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - tic
    done = [(q, r) for q, r in results if "error" not in r and r["finish"] == "length"]
    ttfts = sorted(r["ttft"] for _, r in done if r["ttft"] is not None)
    tokens = sum(r["tokens"] for _, r in done)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else None,
        "errors": len(results) - len(done),
        "mismatched": sum(r["text"] != expected[q] for q, r in done),
    }


def vision_run(port: int, repeats: int, side: int, make_body) -> dict:
    """Median time to first token of an image never seen (miss) and of the same image again (hit)."""
    miss, hit = [], []
    for seed in range(repeats):
        uri = image_uri(1000 + seed, side)
        miss.append(ask(port, make_body(QUESTIONS[0], uri))["ttft"])
        hit.append(ask(port, make_body(QUESTIONS[0], uri))["ttft"])
    figures = {"miss_ttft_s": statistics.median(miss), "hit_ttft_s": statistics.median(hit)}
    return {**figures, "miss_over_hit": figures["miss_ttft_s"] / figures["hit_ttft_s"]}


def bench_model(name: str, model, processor, args) -> dict:
    side = model.args.vision_config.crop_size
    uri, eos = image_uri(0, side), processor.tokenizer.eos_token_id

    def make_body(question, image=uri):
        return body(question, image, args.tokens, eos)

    with running_server(model, processor, name, max(args.clients)) as port:
        expected = [ask(port, make_body(q))["text"] for q in QUESTIONS]  # alone; also warms up the cache
        runs = {str(c): load_run(port, c, args.requests, make_body, expected) for c in args.clients}
        vision = vision_run(port, args.repeats, side, make_body)
    first, last = runs[str(args.clients[0])], runs[str(args.clients[-1])]
    llm = model.args.text_config
    return {
        "widths": {"hidden": llm.hidden_size, "layers": llm.num_hidden_layers, "image_rows": model.args.image_tokens},
        "runs": runs,
        "speedup": last["tokens_per_s"] / first["tokens_per_s"],
        "vision_cache": vision,
    }


def main():
    p = harness.parser(__doc__.split("\n\n")[0], repeats=2)
    p.add_argument("--clients", default="1,4,16", help="concurrent clients of each run, comma-separated")
    p.add_argument("--requests", type=int, default=1, help="requests each client sends, one after the other")
    p.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    p.add_argument("--layers", type=int, default=2, help="LLM decoder layers of the mistral-7b model")
    p.add_argument("--vision-layers", type=int, default=2, help="vision tower layers run in the mistral-7b model")
    p.add_argument("--models", default="demo,mistral-7b", help="which models, comma-separated")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.quick:
        args.tokens, args.repeats, args.layers, args.vision_layers = 4, 1, 1, 1
    result = {"machine": harness.machine(), "quick": args.quick, "tokens": args.tokens, "requests": args.requests,
              "backend": f"BatchBackend (max_batch_size {max(args.clients)})", "models": {}}  # fmt: skip
    for name in args.models.split(","):
        model, processor = load("demo") if name == "demo" else widths_model(args)
        result["models"][name] = bench_model(name, model, processor, args)
        del model, processor
    if "mistral-7b" in result["models"]:
        result["target_16x_ge_4x_1"] = result["models"]["mistral-7b"]["speedup"] >= 4
    harness.emit(result, report(result, args), args)


def report(result: dict, args) -> str:
    rows = []
    for name, figures in result["models"].items():
        for run in figures["runs"].values():
            rows.append([name, run["clients"], run["requests"], run["tokens_per_s"], run["ttft_p50_s"], run["ttft_p95_s"],
                         run["errors"], run["mismatched"]])  # fmt: skip
    text = harness.table(["model", "clients", "requests", "tok/s", "TTFT p50 s", "TTFT p95 s", "errors", "mismatched"], rows)
    lines = [text, ""]
    for name, figures in result["models"].items():
        vision = figures["vision_cache"]
        lines.append(f"{name}: {args.clients[-1]} clients / {args.clients[0]}: {figures['speedup']:.2f}x tokens/s; first "
                     f"token {vision['miss_ttft_s']:.3f} s on a vision-cache miss, {vision['hit_ttft_s']:.3f} s on a hit")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
