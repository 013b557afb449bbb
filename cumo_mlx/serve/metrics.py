"""What `GET /metrics` reports, in Prometheus' text format: requests by path and status, tokens in
and out, the time to first token, and the backend's queue, running sequences and vision cache.

Counts are updated on the server's event loop only (one thread), so they need no lock.
"""

import bisect
from collections import Counter

from .backend import BackendStats

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds


class Metrics:
    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)  # the last bucket is +Inf
        self.ttft_sum = 0.0

    def count_request(self, path: str, status: int) -> None:
        self.requests[path, status] += 1

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
        self.ttft_sum += seconds

    def render(self, backend: BackendStats, ready: bool) -> str:
        lines = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP cumo_mlx_{name} {help}", f"# TYPE cumo_mlx_{name} {kind}"])
            lines.extend(f"cumo_mlx_{name}{labels} {value!r}" for labels, value in samples)

        requests = [(f'{{path="{path}",status="{status}"}}', n) for (path, status), n in sorted(self.requests.items())]
        metric("requests_total", "counter", "HTTP requests answered, by path and status.", requests)
        metric("prompt_tokens_total", "counter", "Prompt positions (image rows included).", [("", self.prompt_tokens)])
        metric("completion_tokens_total", "counter", "Tokens generated.", [("", self.completion_tokens)])
        metric("model_ready", "gauge", "1 once the model is loaded.", [("", int(ready))])
        metric("queue_depth", "gauge", "Requests waiting to start.", [("", backend.queue_depth)])
        metric("running_sequences", "gauge", "Sequences being generated.", [("", backend.running)])
        metric("cancelled_total", "counter", "Generations cancelled (client gone, stop string).", [("", backend.cancelled)])
        metric("vision_cache_hits_total", "counter", "Images whose features were cached.", [("", backend.vision_cache_hits)])
        metric("vision_cache_misses_total", "counter", "Images encoded.", [("", backend.vision_cache_misses)])
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, TTFT_BUCKETS), "+Inf"], self.ttft_counts):
            cumulative += count
            buckets.append((f'_bucket{{le="{bound}"}}', cumulative))
        buckets += [("_sum", self.ttft_sum), ("_count", cumulative)]
        lines.extend(["# HELP cumo_mlx_time_to_first_token_seconds From the request to its first token.",
                      "# TYPE cumo_mlx_time_to_first_token_seconds histogram"])  # fmt: skip
        lines.extend(f"cumo_mlx_time_to_first_token_seconds{suffix} {value!r}" for suffix, value in buckets)
        return "\n".join(lines) + "\n"
