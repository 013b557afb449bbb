"""Load an optimized BLAS before MLX on Linux.

MLX's Linux CPU wheel links a reference BLAS that runs a 1024x1024 matmul at ~3 GFLOP/s. Loading
OpenBLAS or MKL into the global symbol scope before `mlx.core` is imported makes MLX's BLAS calls
resolve to it instead (~95+ GFLOP/s on 2 cores). This module must be imported before mlx.
"""

import ctypes
import ctypes.util
import os
import sys

# Library names looked up through the system's loader cache, best first.
CANDIDATES = ("openblas", "openblasp", "mkl_rt", "blis")
INSTALL_HINT = (
    "cumo-mlx: no optimized BLAS found, MLX's CPU backend will be slow "
    "(install one: `sudo apt-get install libopenblas0-pthread`, or set CUMO_MLX_BLAS=/path/to/libopenblas.so)\n"
)

loaded_library = None


def find_blas() -> str | None:
    """Path or soname of an optimized BLAS, or None. CUMO_MLX_BLAS overrides the search."""
    if override := os.environ.get("CUMO_MLX_BLAS"):
        return override
    for name in CANDIDATES:
        if found := ctypes.util.find_library(name):
            return found
    return None


def load_blas() -> str | None:
    """Load an optimized BLAS globally (Linux only); say once on stderr when there is none.

    CUMO_MLX_BLAS=0 turns this off (used by benchmarks to measure the difference).
    """
    global loaded_library
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
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        sys.stderr.write(f"cumo-mlx: could not load the BLAS at {path}; MLX's CPU backend will be slow\n")
        return None
    loaded_library = path
    return path
