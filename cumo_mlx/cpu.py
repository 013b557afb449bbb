"""MLX's Linux CPU backend, set up before MLX loads: the BLAS it calls, and how freed memory is kept.

MLX's Linux CPU wheel links a reference BLAS that runs a 1024x1024 matmul at ~3 GFLOP/s. Loading
OpenBLAS, MKL or BLIS into the global symbol scope before `mlx.core` is imported makes MLX's BLAS
calls resolve to it instead (~95+ GFLOP/s on 2 cores). This module must be imported before mlx.

MKL installed into the Python environment (`pip install mkl`) is taken first: it was installed on
purpose, and MLX calls sgemm even for one row, which MKL runs as fast as a matrix-vector product
(3x OpenBLAS 0.3.21's on a Xeon: benchmarks/blas_matmul.py). OpenBLAS chooses its kernels by CPU
model when it loads, and a release older than the CPU falls back to generic SSE3 ones (Debian 12's
0.3.21 on a Sapphire Rapids Xeon: sgemm 4x slower), so OPENBLAS_CORETYPE is set from the CPU's
instruction set flags unless the user set it.

MLX's CPU backend allocates every array with malloc, and glibc serves each one over 32 MB with a
fresh mmap, returned to the kernel when freed: the next array of that size faults in and zeroes
its pages again. An activation of CLIP-L over 10 crops is 94 MB, a Mistral-7B weight's gradient
235 MB, so large work spends much of its time in page faults. `keep_freed_memory` makes glibc keep
freed memory for reuse instead (mallopt: no mmap, no trimming): at CuMo-7B widths a training step's
forward+backward ran 1.4x and its update 2.8x faster (benchmarks/README.md). The process's resident
memory then stays at its peak, as MLX's own caching allocator keeps it on Metal and CUDA.
CUMO_MLX_MALLOC=0 leaves glibc's defaults.
"""

import ctypes
import ctypes.util
import glob
import os
import sys

# Library names looked up through the system's loader cache, best first.
CANDIDATES = ("openblas", "openblasp", "mkl_rt", "blis")
# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
# The OpenBLAS kernel family for a CPU with these flags, best first (their sgemm kernels; newer
# families such as Cooperlake or SapphireRapids add only bfloat16 kernels, which MLX does not call).
OPENBLAS_CORES = (({"avx512f", "avx512bw", "avx512dq", "avx512vl"}, "SkylakeX"), ({"avx2", "fma"}, "Haswell"))
INSTALL_HINT = (
    "cumo-mlx: no optimized BLAS found, MLX's CPU backend will be slow "
    "(install one: `sudo apt-get install libopenblas0-pthread`, or set CUMO_MLX_BLAS=/path/to/libopenblas.so)\n"
)

loaded_library = None
loaded_core = None  # OpenBLAS's kernel family, as it reports it


def environment_mkl() -> str | None:
    """libmkl_rt from the `mkl` wheel in this Python environment, if installed."""
    found = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    return found[0] if found else None


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def openblas_core(flags: set[str]) -> str | None:
    """The OPENBLAS_CORETYPE for a CPU with `flags`, or None to let OpenBLAS decide."""
    return next((core for needed, core in OPENBLAS_CORES if needed <= flags), None)


def find_blas() -> str | None:
    """Path or soname of an optimized BLAS, or None. CUMO_MLX_BLAS overrides the search."""
    if override := os.environ.get("CUMO_MLX_BLAS"):
        return override
    if mkl := environment_mkl():
        return mkl
    for name in CANDIDATES:
        if found := ctypes.util.find_library(name):
            return found
    return None


def load_blas() -> str | None:
    """Load an optimized BLAS globally (Linux only); say once on stderr when there is none.

    CUMO_MLX_BLAS=0 turns this off (used by benchmarks to measure the difference).
    """
    global loaded_library, loaded_core
    if loaded_library or not sys.platform.startswith("linux"):
        return loaded_library
    if os.environ.get("CUMO_MLX_BLAS") == "0":
        return None
    if "mlx.core" in sys.modules:
        return None  # too late: MLX already bound its BLAS symbols
    path = find_blas()
    if path is None:
        if not os.environ.get("CUMO_MLX_BLAS_WARNED"):
            sys.stderr.write(INSTALL_HINT)
            os.environ["CUMO_MLX_BLAS_WARNED"] = "1"  # once, child processes included
        return None
    openblas = "openblas" in os.path.basename(path).lower()
    if openblas and "OPENBLAS_CORETYPE" not in os.environ and (core := openblas_core(cpu_flags())):
        os.environ["OPENBLAS_CORETYPE"] = core  # read once, when the library initializes
    try:
        library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        sys.stderr.write(f"cumo-mlx: could not load the BLAS at {path}; MLX's CPU backend will be slow\n")
        return None
    if openblas and hasattr(library, "openblas_get_corename"):
        library.openblas_get_corename.restype = ctypes.c_char_p
        loaded_core = library.openblas_get_corename().decode()
    loaded_library = path
    return path


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of mapping and unmapping large blocks (Linux
    with glibc; CUMO_MLX_MALLOC=0 skips it). True when it took effect."""
    if not sys.platform.startswith("linux") or os.environ.get("CUMO_MLX_MALLOC") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))  # -1: never trim
