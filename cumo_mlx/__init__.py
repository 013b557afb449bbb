"""CuMo (co-upcycled mixture-of-experts vision-language model) in MLX."""

from .blas import load_blas

load_blas()  # before anything imports mlx

from .generate import generate, stream_generate  # noqa: E402
from .loader import load  # noqa: E402
from .model import Model  # noqa: E402
from .processor import Processor  # noqa: E402

__all__ = ["load", "generate", "stream_generate", "Model", "Processor"]
__version__ = "0.1.0"
