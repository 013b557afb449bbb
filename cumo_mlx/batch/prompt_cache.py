"""KV caches of finished requests, so a follow-up turn of a conversation prefills only its new positions.

mlx-lm's server keeps them in `LRUPromptCache` (a trie of token ids, bounded in entries and bytes,
a deep copy per use, trimmed to the shared prefix); this uses it as is. With images, a token id
does not say which image a position holds, so the keys are the LLM's positions: a token's id, and
at an image row the pair (the image's content digest, the row).
"""

from typing import Any, Optional, Sequence

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from ..prompt import IMAGE_TOKEN_INDEX

_MODEL = "cumo"  # LRUPromptCache groups entries by model; one engine, one model


def position_keys(ids: Sequence[int], digests: Sequence[str], rows_per_image: int) -> list:
    """One key per LLM position of `ids`: the token id, or (image digest, row) for each image row."""
    keys, images = [], iter(digests)
    for token in ids:
        if token == IMAGE_TOKEN_INDEX:
            digest = next(images)
            keys.extend((digest, row) for row in range(rows_per_image))
        else:
            keys.append(token)
    return keys


class PromptCache:
    """The KV caches of the last finished requests, at most `max_bytes` in all (0 keeps none)."""

    def __init__(self, max_bytes: int, max_entries: int = 64):
        self.max_bytes = max_bytes
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes)

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def fetch(self, keys: list) -> tuple[Optional[list[Any]], int]:
        """A copy of the cache sharing the longest prefix with `keys`, trimmed to it, and the number
        of positions it holds: always fewer than `keys` (the last position must run to give the
        first token). (None, 0) when nothing is shared."""
        if not self.max_bytes or not keys:
            return None, 0
        cache, rest = self._lru.fetch_nearest_cache(_MODEL, keys)
        if cache is None:
            return None, 0
        if not rest:  # the whole prompt is cached: give back its last position
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            return cache, len(keys) - 1
        return cache, len(keys) - len(rest)

    def store(self, keys: list, cache: list[Any]) -> None:
        """Keep `cache`, which holds exactly the positions `keys` (evicting the least recently used)."""
        if self.max_bytes and sum(c.nbytes for c in cache) <= self.max_bytes:
            self._lru.insert_cache(_MODEL, keys, cache)
