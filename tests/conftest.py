import os

import pytest

import cumo_mlx  # noqa: F401  (loads the optimized BLAS before anything imports mlx)
from tiny_models import tiny_config, write_mlx_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


@pytest.fixture(scope="session")
def tiny_mlx_model_dir(tmp_path_factory):
    """A tiny Mistral-based CuMo (CLIP-MoE, MoE connector, scales [1, 3]) in MLX layout."""
    return write_mlx_model(tmp_path_factory.mktemp("tiny-cumo"), tiny_config())
