import os
import sys
from pathlib import Path

# Before anything imports huggingface_hub, which reads it once: tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Subprocess tests run `cumo-mlx` as a user would, also when the venv is not activated (as in CI).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
# The demo recipe's modules (demo_recipe/ beside the package) for the tests of the shipped demo and the recipe.
DEMO_RECIPE = Path(__file__).resolve().parent.parent / "demo_recipe"
sys.path.insert(0, str(DEMO_RECIPE))

import pytest  # noqa: E402

import cumo_mlx  # noqa: E402,F401  (loads the optimized BLAS before anything imports mlx)
from tiny_models import tiny_config, write_mlx_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_mlx_model_dir(tmp_path_factory):
    """A tiny Mistral-based CuMo (CLIP-MoE, MoE connector, scales [1, 3]) in MLX layout."""
    return write_mlx_model(tmp_path_factory.mktemp("tiny-cumo"), tiny_config())
