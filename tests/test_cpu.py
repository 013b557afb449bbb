"""`cumo_mlx.cpu`: MLX's Linux CPU backend set up before MLX loads, in fresh interpreters.

Each BLAS case runs a subprocess (the library must be loaded before mlx.core, once per process) that
imports cumo_mlx, multiplies two matrices with MLX and reports the shared objects mapped into it
(/proc/self/maps), the product's error against numpy, and what cumo_mlx.cpu says it loaded. The
allocator case counts the page faults of large arrays allocated again.
"""

import ctypes.util
import json
import os
import subprocess
import sys

import pytest
from cumo_mlx import cpu

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS is only loaded on Linux")

PROBE = """
import json
import cumo_mlx
import mlx.core as mx
import numpy as np
from cumo_mlx import cpu

a = np.random.default_rng(0).standard_normal((96, 80)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((80, 64)).astype(np.float32)
error = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max())
with open("/proc/self/maps") as f:
    mapped = sorted({line.split()[-1] for line in f if ".so" in line})
print(json.dumps({"mapped": mapped, "error": error, "loaded": cpu.loaded_library, "core": cpu.loaded_core}))
"""
# Make the library search find nothing, as on a machine without an optimized BLAS (nor MKL in the
# Python environment).
NO_BLAS = "import ctypes.util, sys\nctypes.util.find_library = lambda name: None\nsys.prefix = '/nonexistent'\n"


def probe(prelude: str = "", **env) -> tuple[dict, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CUMO_MLX_BLAS", "OPENBLAS_CORETYPE"))}
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
    if cpu.find_blas() is None:
        pytest.skip("no optimized BLAS installed (install libopenblas0-pthread)")
    report, stderr = probe()
    return report, stderr, set(report["mapped"]) - baseline


def library_file(loaded: str, added: set) -> str:
    """The file a loaded soname or path maps to."""
    (path,) = [p for p in added if os.path.basename(p).startswith(os.path.basename(loaded).split(".so")[0])]
    return path


def test_found_blas_is_mapped_before_mlx_and_used(loaded):
    report, stderr, added = loaded
    assert report["loaded"] is not None and stderr == ""
    assert library_file(report["loaded"], added)
    assert report["error"] < 1e-3


def test_override_with_a_path(loaded):
    report, _, added = loaded
    path = library_file(report["loaded"], added)
    report, stderr = probe(CUMO_MLX_BLAS=path)
    assert report["loaded"] == path and path in report["mapped"] and stderr == ""


def test_openblas_kernels_follow_the_cpu_flags():
    """An OpenBLAS older than the CPU would fall back to generic SSE3 kernels: the flags choose."""
    avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "sse3"}
    assert cpu.openblas_core(avx512) == "SkylakeX"
    assert cpu.openblas_core(avx512 - {"avx512bw"}) == "Haswell"
    assert cpu.openblas_core({"avx2", "fma", "sse3"}) == "Haswell"
    assert cpu.openblas_core({"avx2", "sse3"}) is None and cpu.openblas_core(set()) is None
    assert "sse2" in cpu.cpu_flags() or not os.path.exists("/proc/cpuinfo") or os.uname().machine != "x86_64"


def openblas_path() -> str:
    found = ctypes.util.find_library("openblas")
    if found is None:
        pytest.skip("no OpenBLAS installed (install libopenblas0-pthread)")
    return found


def test_openblas_runs_the_kernels_of_this_cpu(baseline):
    expected = cpu.openblas_core(cpu.cpu_flags())
    if expected is None:
        pytest.skip("a CPU without AVX2: OpenBLAS decides alone")
    report, _ = probe(CUMO_MLX_BLAS=openblas_path())
    assert report["core"] == expected and report["error"] < 1e-3


def test_the_users_openblas_coretype_is_kept(baseline):
    report, _ = probe(CUMO_MLX_BLAS=openblas_path(), OPENBLAS_CORETYPE="Haswell")
    assert report["core"] == "Haswell"


def test_mkl_installed_in_the_environment_comes_first(tmp_path, monkeypatch):
    monkeypatch.delenv("CUMO_MLX_BLAS", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert cpu.environment_mkl() is None
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libmkl_rt.so.3").write_bytes(b"")
    assert cpu.find_blas() == str(tmp_path / "lib" / "libmkl_rt.so.3")
    monkeypatch.setenv("CUMO_MLX_BLAS", "/chosen/libblis.so")
    assert cpu.find_blas() == "/chosen/libblis.so"


def test_override_with_a_bad_path_says_so_and_still_computes(baseline):
    report, stderr = probe(CUMO_MLX_BLAS="/nonexistent/libopenblas.so")
    assert report["loaded"] is None and set(report["mapped"]) == baseline
    assert "could not load the BLAS at /nonexistent/libopenblas.so" in stderr
    assert report["error"] < 1e-3


def test_disabled_maps_no_optimized_blas(baseline, loaded):
    """CUMO_MLX_BLAS=0: the library a normal run maps is not in the process at all."""
    report, _, added = loaded
    name = os.path.basename(library_file(report["loaded"], added)).split(".so")[0]
    assert not {p for p in baseline if os.path.basename(p).split(".so")[0] == name}


def test_hint_once_when_none_is_found(baseline):
    """The install hint is printed once: not again by a second call, nor by a child process."""
    report, stderr = probe(NO_BLAS)
    assert report["loaded"] is None and set(report["mapped"]) == baseline and report["error"] < 1e-3
    assert stderr.count("no optimized BLAS found") == 1 and "apt-get install" in stderr

    child = NO_BLAS + "import cumo_mlx\n"
    spawn = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {child!r}], check=True)\n"
    parent = child + "cumo_mlx.cpu.load_blas()\n" + spawn
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CUMO_MLX_BLAS")}
    done = subprocess.run([sys.executable, "-c", parent], env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("no optimized BLAS found") == 1


FAULTS = """
import json, resource
import cumo_mlx
import mlx.core as mx
from cumo_mlx import cpu

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

x = mx.ones((64 << 20) // 4)  # a 64 MB array, over glibc's largest mmap threshold
mx.eval(x + 1)
before = faults()
for _ in range(5):
    mx.eval(x + 1)  # a new 64 MB output each time, the last one freed
print(json.dumps({"faults": faults() - before}))
"""


def minor_faults(**env) -> int:
    environ = {k: v for k, v in os.environ.items() if k != "CUMO_MLX_MALLOC"}
    done = subprocess.run([sys.executable, "-c", FAULTS], env={**environ, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["faults"]


def test_freed_memory_is_reused_without_faulting_it_in_again():
    """A large array freed and allocated again costs no page faults (glibc would unmap it and map a
    fresh one: 16k faults per 64 MB); CUMO_MLX_MALLOC=0 leaves glibc's behaviour."""
    kept, default = minor_faults(), minor_faults(CUMO_MLX_MALLOC="0")
    assert default > 5 * (64 << 20) // 4096 * 0.9, default
    assert kept < default / 20, (kept, default)
