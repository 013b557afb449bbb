"""MLX's CPU matmul with the BLAS cumo_mlx loads, next to MLX's bundled one (CUMO_MLX_BLAS=0).

    python benchmarks/blas_matmul.py [--quick] [--json] [--repeats 5] [--size 1024]

A float32 size x size matmul on the CPU, in two fresh processes (the BLAS is chosen when mlx is
first imported), each timing --repeats runs after a warm-up; GFLOP/s of the medians and the speed-up.
"""

import os

import harness

CHILD = """
import json, statistics, sys, time
import cumo_mlx
import mlx.core as mx
from cumo_mlx import blas
size, repeats = int(sys.argv[1]), int(sys.argv[2])
with mx.stream(mx.cpu):
    a, b = mx.random.normal((size, size)), mx.random.normal((size, size))
    mx.eval(a, b, a @ b)
    runs = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a @ b)
        runs.append(time.perf_counter() - tic)
print(json.dumps({"seconds": statistics.median(runs), "blas": blas.loaded_library}))
"""


def run_child(size: int, repeats: int, disable: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CUMO_MLX_BLAS"}
    if disable:
        env["CUMO_MLX_BLAS"] = "0"
    result = harness.run_python(CHILD, str(size), str(repeats), env=env)
    result["gflops"] = 2 * size**3 / result["seconds"] / 1e9
    return result


def main():
    p = harness.parser(__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1024)
    args = p.parse_args()
    size, repeats = (128, 1) if args.quick else (args.size, args.repeats)
    runs = {"loaded": run_child(size, repeats, False), "bundled": run_child(size, repeats, True)}
    speedup = runs["bundled"]["seconds"] / runs["loaded"]["seconds"]
    result = {"machine": harness.machine(), "quick": args.quick, "size": size, "runs": runs, "speedup": speedup}
    rows = [[f"{name} ({os.path.basename(r['blas'] or 'MLX bundled reference BLAS')})", r["seconds"] * 1e3, r["gflops"]]
            for name, r in runs.items()]  # fmt: skip
    text = f"float32 {size}x{size} matmul on the CPU\n" + harness.table(["BLAS", "ms", "GFLOP/s"], rows)
    harness.emit(result, f"{text}\n\nspeed-up: {speedup:.1f}x", args)


if __name__ == "__main__":
    main()
