"""Batched generation: many prompts at once (`batch_generate`), a continuous-batching engine a server
feeds (`BatchEngine`), and the caches they use (encoded images, KV of earlier conversations)."""

from ..vision_cache import VisionCache
from .engine import BatchEngine, BatchStats
from .generate import BatchResponse, batch_generate
from .prompt_cache import PromptCache
from .stream import RequestStream, TokenResponse

__all__ = [
    "BatchEngine",
    "BatchResponse",
    "BatchStats",
    "PromptCache",
    "RequestStream",
    "TokenResponse",
    "VisionCache",
    "batch_generate",
]
