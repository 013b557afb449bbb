"""What the benchmarks share: interleaved timing, peak memory, the machine, and table/JSON output.

Every benchmark compares things measured in the same process on the same machine. Cases are timed
in rounds (each round runs every case once), so a change of load on a shared machine hits all of
them alike; the figure of a case is its median.
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import cumo_mlx  # noqa: F401  (an optimized BLAS before mlx)
import mlx.core as mx
import numpy as np
from cumo_mlx import cpu

GB = 1 << 30

# CuMo-Mistral-7B's widths (CLIP ViT-L/14-336, Mistral-7B) in config.json names, and the tiny stand-ins
# every benchmark's --quick uses.
CLIP_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "patch_size": 14, "image_size": 336}
QUICK_CLIP = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "patch_size": 14, "image_size": 56}
MISTRAL_7B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8}
QUICK_MISTRAL = {"hidden_size": 128, "intermediate_size": 448, "num_attention_heads": 4, "num_key_value_heads": 2}


def parser(description: str, repeats: int = 5) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark has."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--save", metavar="PATH", help="also write the JSON object to PATH")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one run each: a smoke test, not a measurement")
    p.add_argument("--repeats", type=int, default=repeats, help="runs of each case (the median is reported)")
    return p


def seconds(fn: Callable[[], object]) -> float:
    """Wall time of `fn()` with everything it returns evaluated."""
    tic = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - tic


def run_cases(
    cases: dict[str, Callable[[], dict]], repeats: int, budget: float = math.inf, min_seconds: float = 0.0
) -> dict[str, dict]:
    """The median of each figure each case returns (a dict of numbers), over runs in interleaved
    rounds after one warm-up run each, so that a change of load on a shared machine hits all alike.

    At least `repeats` rounds, more (up to 20 x `repeats`) until the rounds took `min_seconds`: fast
    cases get enough runs for a stable median. A case stops repeating once its runs (warm-up
    included) take `budget` seconds, so a path that is 30x slower is measured once instead of
    dominating the benchmark's run time; a warm-up over budget is that one measurement.
    """
    runs = {name: [] for name in cases}
    spent = dict.fromkeys(cases, 0.0)

    def run(name):
        tic = time.perf_counter()
        figures = cases[name]()
        spent[name] += time.perf_counter() - tic
        return figures

    for name in cases:
        warm = run(name)
        if spent[name] > budget:
            runs[name].append(warm)
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or (time.perf_counter() - start < min_seconds and rounds < 20 * repeats):
        for name in cases:
            if not runs[name] or spent[name] <= budget:
                runs[name].append(run(name))
        rounds += 1
    return {
        name: {**{k: statistics.median(r[k] for r in figures) for k in figures[0]}, "runs": len(figures)}
        for name, figures in runs.items()
    }


def time_cases(
    cases: dict[str, Callable[[], object]], repeats: int, budget: float = math.inf, min_seconds: float = 0.0
) -> dict[str, dict]:
    """Median seconds of each case (its results evaluated), as `run_cases` runs them."""
    timed = {name: lambda fn=fn: {"seconds": seconds(fn)} for name, fn in cases.items()}
    return run_cases(timed, repeats, budget, min_seconds)


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """The machine's memory bandwidth: bytes/s (read + written, as STREAM counts a copy) of the best of
    `repeats` copies of a `gib` GiB array by numpy (memcpy), split over one thread per core."""
    source = np.ones(int(gib * GB) // 4, np.float32)
    target = np.empty_like(source)
    cuts = np.linspace(0, source.size, (os.cpu_count() or 1) + 1).astype(int)
    bounds = list(zip(cuts[:-1], cuts[1:]))
    best = math.inf
    with ThreadPoolExecutor(len(bounds)) as pool:  # numpy releases the GIL while it copies
        for _ in range(repeats):
            tic = time.perf_counter()
            list(pool.map(lambda b: np.copyto(target[b[0] : b[1]], source[b[0] : b[1]]), bounds))
            best = min(best, time.perf_counter() - tic)
    return 2 * source.nbytes / best


def run_python(code: str, *argv: str, env: Optional[dict] = None) -> dict:
    """The JSON object a fresh interpreter running `code` with `argv` prints last (a measurement that
    must not share this process's memory or loaded libraries); its error output stops the benchmark."""
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """Where the figures were taken."""
    processor = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        processor = names[0] if names else processor
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "date": datetime.date.today().isoformat(),
        "system": f"{platform.system()} {platform.machine()}",
        "cpu": processor,
        "cores": os.cpu_count(),
        "memory_gb": round(memory / GB, 1),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "blas": cpu.loaded_library,
        "blas_core": cpu.loaded_core,
    }


def describe(info: dict) -> str:
    blas_name = os.path.basename(info["blas"]) if info["blas"] else "MLX's built-in"
    blas_name += f" ({info['blas_core']} kernels)" if info.get("blas_core") else ""
    return (
        f"{info['date']}, {info['system']}, {info['cpu']} ({info['cores']} cores), {info['memory_gb']} GB, "
        f"mlx {info['mlx']} on {info['device']}, BLAS: {blas_name}"
    )


def table(headers: list[str], rows: list[list]) -> str:
    """A plain text table; floats are printed with 3 significant decimals."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    cells = [[cell(v) for v in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def emit(result: dict, text: str, args: argparse.Namespace) -> None:
    """Print the result: one JSON object with --json, else the text (tables and notes); --save writes the JSON."""
    if args.save:
        with open(args.save, "w") as f:
            json.dump(result, f, indent=1)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{describe(result['machine'])}\n\n{text}")
