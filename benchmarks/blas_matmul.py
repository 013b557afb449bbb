"""MLX's CPU matmul with each BLAS cumo_mlx can load, next to MLX's bundled one (CUMO_MLX_BLAS=0).

    python benchmarks/blas_matmul.py [--quick] [--json] [--repeats 5] [--size 1024] [--rows 1]

Two products on the CPU, float32: a --size x --size square matmul (GFLOP/s: prefill, training,
the vision tower), and --rows rows through a 4096 -> 14336 weight, Mistral-7B's MLP shape (GB/s of
weight read: decoding reads every weight once per token, and MLX runs it through sgemm too). Each
BLAS runs in a fresh process (the library is chosen when mlx is first imported), timing --repeats
runs after a warm-up (medians):
loaded        what `import cumo_mlx` loads by default;
bundled       MLX's reference BLAS (CUMO_MLX_BLAS=0);
openblas-cpu  OpenBLAS with the kernels cumo_mlx picks from the CPU's flags;
openblas-own  OpenBLAS with the kernels it picks from the CPU model itself (what it did before);
blis, mkl     where installed (Debian's libblis4-pthread; `pip install mkl` in this environment).
"""

import ctypes.util
import os

import harness
from cumo_mlx import cpu

CHILD = """
import json, statistics, sys, time
import cumo_mlx
import mlx.core as mx
from cumo_mlx import cpu
size, rows, repeats = map(int, sys.argv[1:4])

def median_seconds(a, b):
    mx.eval(a @ b)
    runs = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(a @ b)
        runs.append(time.perf_counter() - tic)
    return statistics.median(runs)

with mx.stream(mx.cpu):
    square = median_seconds(mx.random.normal((size, size)), mx.random.normal((size, size)))
    weight = mx.random.normal((14336, 4096 if size > 128 else 128))
    row = median_seconds(mx.random.normal((rows, weight.shape[1])), weight.T)
print(json.dumps({"seconds": square, "row_seconds": row, "weight_bytes": weight.nbytes,
                  "blas": cpu.loaded_library, "core": cpu.loaded_core}))
"""


def own_core(library: str) -> str:
    """The kernels OpenBLAS picks by itself (loaded alone, in a fresh process, without OPENBLAS_CORETYPE)."""
    code = f"import ctypes, json\nlib = ctypes.CDLL({library!r})\nlib.openblas_get_corename.restype = ctypes.c_char_p\n"
    code += "print(json.dumps({'core': lib.openblas_get_corename().decode()}))"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    return harness.run_python(code, env=env)["core"]


def choices() -> dict[str, dict]:
    """Environment overrides of each BLAS to measure (those not installed are left out)."""
    cases = {"loaded": {}, "bundled": {"CUMO_MLX_BLAS": "0"}}
    if openblas := ctypes.util.find_library("openblas"):
        cases["openblas-cpu"] = {"CUMO_MLX_BLAS": openblas}
        if core := cpu.openblas_core(cpu.cpu_flags()):
            cases["openblas-cpu"]["OPENBLAS_CORETYPE"] = core
            cases["openblas-own"] = {"CUMO_MLX_BLAS": openblas, "OPENBLAS_CORETYPE": own_core(openblas)}
    if blis := ctypes.util.find_library("blis"):
        cases["blis"] = {"CUMO_MLX_BLAS": blis}
    if mkl := cpu.environment_mkl():
        cases["mkl"] = {"CUMO_MLX_BLAS": mkl}
    return cases


def run_child(size: int, rows: int, repeats: int, overrides: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUMO_MLX_BLAS", "OPENBLAS_CORETYPE")}
    result = harness.run_python(CHILD, str(size), str(rows), str(repeats), env={**env, **overrides})
    result["gflops"] = 2 * size**3 / result["seconds"] / 1e9
    result["row_gb_per_s"] = result["weight_bytes"] / result["row_seconds"] / 1e9
    return result


def main():
    p = harness.parser(__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--rows", type=int, default=1)
    args = p.parse_args()
    size, repeats = (128, 1) if args.quick else (args.size, args.repeats)
    runs = {name: run_child(size, args.rows, repeats, env) for name, env in choices().items()}
    speedup = runs["bundled"]["seconds"] / runs["loaded"]["seconds"]
    result = {"machine": harness.machine(), "quick": args.quick, "size": size, "rows": args.rows, "runs": runs,
              "speedup": speedup}  # fmt: skip
    rows = [[name, os.path.basename(r["blas"] or "MLX bundled reference BLAS"), r["core"], r["gflops"],
             r["row_gb_per_s"]] for name, r in runs.items()]  # fmt: skip
    headers = ["case", "BLAS", "kernels", f"{size}^3 GFLOP/s", f"{args.rows} row(s) x 4096x14336: weight GB/s"]
    text = "float32 matmuls on the CPU\n" + harness.table(headers, rows)
    harness.emit(result, f"{text}\n\nloaded over bundled, square matmul: {speedup:.1f}x", args)


if __name__ == "__main__":
    main()
