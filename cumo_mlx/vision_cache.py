"""An LRU of image features (the connector's output), so an image seen before skips the vision tower.

Entries are keyed by the model and a hash of the image's *preprocessed pixels* (what the vision
tower receives: decoded, EXIF-oriented, padded to a square, resized, cropped and normalised). Every
kind of source has pixels (a PIL image has no file bytes), identical pixels give identical features
whatever the file format or name, and a file edited in place gets a new key. Preprocessing costs
milliseconds against the tower's seconds, so a hit still saves nearly all of the encode.

The model is part of the key by identity (the object, held weakly): another model, or a model
freed and another created at its address, misses. Changing a model's weights in place (training,
LoRA fusing) does not change its identity: call `clear()` then.
"""

import hashlib
import threading
import weakref
from collections import OrderedDict
from typing import Callable, NamedTuple, Sequence

import mlx.core as mx
import numpy as np

from .errors import ImageError
from .models.model import Model
from .processor import ImageSource, Processor

DEFAULT_MAX_BYTES = 512 << 20


def pixels_digest(pixels: np.ndarray) -> str:
    """A content hash of an image's preprocessed pixels (shape and dtype included)."""
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.blake2b(f"{pixels.shape}{pixels.dtype}".encode(), digest_size=16)
    digest.update(memoryview(pixels).cast("B"))
    return digest.hexdigest()


def features_digest(features: mx.array) -> str:
    """A content hash of image features given already encoded."""
    return pixels_digest(np.array(features.astype(mx.float32)))


class EncodedImage(NamedTuple):
    digest: str  # pixels_digest of its preprocessed pixels (or of the features, when given encoded)
    features: mx.array  # [1, rows, LLM hidden], evaluated
    hit: bool  # whether it came from the cache


class VisionCache:
    """Connector outputs of the images seen last, at most `max_bytes` of them (0 keeps none).

    `hits` and `misses` count the lookups. Thread-safe: the lock guards only the table, so two
    threads asking for the same new image may both compute it (the second result is kept).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.nbytes = 0
        self._entries: OrderedDict[tuple[int, str], tuple[weakref.ref, mx.array]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every entry (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def _lookup(self, model: Model, digest: str, compute: Callable[[], mx.array]) -> tuple[mx.array, bool]:
        key = (id(model), digest)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0]() is model:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1], True
            self.misses += 1
        features = compute()
        mx.eval(features)
        self._store(key, model, features)
        return features, False

    def encode(self, model: Model, processor: Processor, source: ImageSource) -> EncodedImage:
        """One image's features [1, rows, hidden] through the cache: read and preprocessed here
        (an unreadable image raises ImageError), the vision tower and connector run only on a miss."""
        return self._encode_pixels(model, processor.preprocess_image(source))

    def encode_all(self, model: Model, processor: Processor, sources: Sequence[ImageSource]) -> list[EncodedImage]:
        """Several images through the cache, every one read first (as `generate` does): an unreadable
        image raises ImageError, saying which, before the vision tower runs on any."""
        pixels = []
        for index, source in enumerate(sources, 1):
            try:
                pixels.append(processor.preprocess_image(source))
            except ImageError as e:
                raise ImageError(f"image {index}: {e.what}", e.fix) from None
        return [self._encode_pixels(model, p) for p in pixels]

    def _encode_pixels(self, model: Model, pixels: np.ndarray) -> EncodedImage:
        digest = pixels_digest(pixels)
        compute = lambda: model.encode_images(mx.array(pixels[None])).features  # noqa: E731
        return EncodedImage(digest, *self._lookup(model, digest, compute))

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self), "bytes": self.nbytes}

    def _store(self, key: tuple[int, str], model: Model, features: mx.array) -> None:
        if features.nbytes > self.max_bytes:
            return  # larger than the whole cache: kept by the caller only
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self.nbytes -= previous[1].nbytes
            self._entries[key] = (weakref.ref(model), features)
            self.nbytes += features.nbytes
            while self.nbytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes
