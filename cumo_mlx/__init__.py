"""CuMo (co-upcycled mixture-of-experts vision-language model) in MLX."""

import importlib
import sys
import types

from .cpu import keep_freed_memory, load_blas

load_blas()  # before anything imports mlx
keep_freed_memory()

__all__ = ["load", "generate", "stream_generate", "ChatSession", "Model", "Processor", "batch_generate", "BatchResponse"]
__version__ = "0.1.0"

# The API is imported on first use: mlx-lm imports transformers (seconds), which `cumo-mlx --help`
# and the light modules (templates, errors, the CLI's option tables) do not need.
_API_MODULES = {
    "load": "loader",
    "generate": "generate",
    "stream_generate": "generate",
    "ChatSession": "generate",
    "Model": "models.model",
    "Processor": "processor",
    "batch_generate": "batch.generate",
    "BatchResponse": "batch.generate",
}


class _Package(types.ModuleType):
    def __getattr__(self, name):
        if name not in _API_MODULES:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{_API_MODULES[name]}", __name__), name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name, value):
        # Importing the submodule cumo_mlx.generate sets the package's `generate` to it: keep the function.
        if not (name in _API_MODULES and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(__all__))


sys.modules[__name__].__class__ = _Package
