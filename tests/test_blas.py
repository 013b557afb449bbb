"""`cumo_mlx.blas`: an optimized BLAS loaded before MLX on Linux, in fresh interpreters.

Each case runs a subprocess (the library must be loaded before mlx.core, once per process) that
imports cumo_mlx, multiplies two matrices with MLX and reports the shared objects mapped into it
(/proc/self/maps), the product's error against numpy, and what cumo_mlx.blas says it loaded.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS is only loaded on Linux")

PROBE = """
import json
import cumo_mlx
import mlx.core as mx
import numpy as np
from cumo_mlx import blas

a = np.random.default_rng(0).standard_normal((96, 80)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((80, 64)).astype(np.float32)
error = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max())
with open("/proc/self/maps") as f:
    mapped = sorted({line.split()[-1] for line in f if ".so" in line})
print(json.dumps({"mapped": mapped, "error": error, "loaded": blas.loaded_library}))
"""
# Make the library search find nothing, as on a machine without an optimized BLAS.
NO_BLAS = "import ctypes.util\nctypes.util.find_library = lambda name: None\n"


def probe(prelude: str = "", **env) -> tuple[dict, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CUMO_MLX_BLAS")}
    environ.update(env)
    done = subprocess.run(
        [sys.executable, "-c", prelude + PROBE], env=environ, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


@pytest.fixture(scope="module")
def baseline():
    """The probe with CUMO_MLX_BLAS=0: the libraries mapped without cumo_mlx's BLAS."""
    report, stderr = probe(CUMO_MLX_BLAS="0")
    assert report["loaded"] is None and stderr == ""
    assert report["error"] < 1e-3  # MLX's own BLAS still multiplies correctly
    return set(report["mapped"])


@pytest.fixture(scope="module")
def loaded(baseline):
    """The probe as a user runs it; skipped where the system has no optimized BLAS to find."""
    from cumo_mlx import blas

    if blas.find_blas() is None:
        pytest.skip("no optimized BLAS installed (install libopenblas0-pthread)")
    report, stderr = probe()
    return report, stderr, set(report["mapped"]) - baseline


def test_found_blas_is_mapped_before_mlx_and_used(loaded):
    report, stderr, added = loaded
    assert report["loaded"] is not None and stderr == ""
    assert any("blas" in os.path.basename(path).lower() for path in added), added
    assert report["error"] < 1e-3


def test_override_with_a_path(loaded):
    _, _, added = loaded
    (path,) = [p for p in added if "blas" in os.path.basename(p).lower()]
    report, stderr = probe(CUMO_MLX_BLAS=path)
    assert report["loaded"] == path and path in report["mapped"] and stderr == ""


def test_override_with_a_bad_path_says_so_and_still_computes(baseline):
    report, stderr = probe(CUMO_MLX_BLAS="/nonexistent/libopenblas.so")
    assert report["loaded"] is None and set(report["mapped"]) == baseline
    assert "could not load the BLAS at /nonexistent/libopenblas.so" in stderr
    assert report["error"] < 1e-3


def test_disabled_maps_no_optimized_blas(baseline, loaded):
    """CUMO_MLX_BLAS=0: the library a normal run maps is not in the process at all."""
    _, _, added = loaded
    names = {os.path.basename(p).split(".so")[0] for p in added if "blas" in os.path.basename(p).lower()}
    assert names and not {p for p in baseline if os.path.basename(p).split(".so")[0] in names}


def test_hint_once_when_none_is_found(baseline):
    """The install hint is printed once: not again by a second call, nor by a child process."""
    report, stderr = probe(NO_BLAS)
    assert report["loaded"] is None and set(report["mapped"]) == baseline and report["error"] < 1e-3
    assert stderr.count("no optimized BLAS found") == 1 and "apt-get install" in stderr

    child = NO_BLAS + "import cumo_mlx\n"
    spawn = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {child!r}], check=True)\n"
    parent = child + "cumo_mlx.blas.load_blas()\n" + spawn
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CUMO_MLX_BLAS")}
    done = subprocess.run([sys.executable, "-c", parent], env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("no optimized BLAS found") == 1
