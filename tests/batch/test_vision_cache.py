"""`VisionCache`: an LRU of image features bounded in bytes, keyed by pixels and model, with counters;
a hit gives the very answer a miss gives."""

import cumo_mlx
import mlx.core as mx
import numpy as np
import pytest
from cumo_mlx.batch import VisionCache
from cumo_mlx.vision_cache import pixels_digest
from cumo_mlx.errors import ImageError
from PIL import Image


def test_lru_bounded_in_bytes_with_counters(mistral, images):
    model, processor = mistral
    one = VisionCache().encode(model, processor, images[0]).features.nbytes
    cache = VisionCache(max_bytes=int(2.5 * one))  # room for two images
    for image in images:
        assert not cache.encode(model, processor, image).hit
    assert len(cache) == 2 and cache.nbytes == 2 * one <= cache.max_bytes
    assert cache.encode(model, processor, images[2]).hit  # the most recent stays
    assert not cache.encode(model, processor, images[0]).hit  # the oldest was evicted
    assert cache.stats() == {"hits": 1, "misses": 4, "entries": 2, "bytes": 2 * one}
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.hits == 1
    nothing = VisionCache(max_bytes=0)
    nothing.encode(model, processor, images[0])
    assert len(nothing) == 0 and not nothing.encode(model, processor, images[0]).hit


def test_keyed_by_pixels_and_model(models, images):
    model, processor = models["mistral"]
    cache = VisionCache()
    first = cache.encode(model, processor, images[0])
    pil = Image.open(images[0])  # the same pixels from another kind of source
    again = cache.encode(model, processor, pil)
    assert again.hit and again.digest == first.digest and again.features is first.features
    assert not cache.encode(models["mixtral"][0], processor, images[0]).hit  # another model
    flipped = pil.transpose(Image.FLIP_LEFT_RIGHT)
    assert cache.encode(model, processor, flipped).digest != first.digest
    assert pixels_digest(np.zeros((2, 2, 3), np.float32)) != pixels_digest(np.zeros((2, 3, 2), np.float32))


def test_the_vision_tower_runs_on_a_miss_only(mistral, images, monkeypatch):
    model, processor = mistral
    cache, calls, encode_images = VisionCache(), [], type(model).encode_images

    def counted(self, pixels):
        calls.append(pixels.shape)
        return encode_images(self, pixels)

    monkeypatch.setattr(type(model), "encode_images", counted)
    encoded = [cache.encode(model, processor, images[0]) for _ in range(3)]
    assert len(calls) == 1 and (cache.hits, cache.misses) == (2, 1)
    assert [e.hit for e in encoded] == [False, True, True] and encoded[2].features is encoded[0].features


def test_hits_give_the_answers_misses_give(mistral, images, alone):
    cache = VisionCache()
    prompts = ["What shape is this?", "Compare them.", "What colour is it?"]
    entries = [images[0], [images[1], images[0]], images[1]]
    first = cumo_mlx.batch_generate(*mistral, prompts, entries, max_tokens=8, temp=0.0, vision_cache=cache)
    assert (first.stats.vision_misses, first.stats.vision_hits) == (2, 2)
    second = cumo_mlx.batch_generate(*mistral, prompts, entries, max_tokens=8, temp=0.0, vision_cache=cache)
    assert (second.stats.vision_misses, second.stats.vision_hits) == (0, 4)
    assert second.tokens == first.tokens
    for i, (prompt, entry) in enumerate(zip(prompts, entries)):
        assert first.tokens[i] == alone(mistral, prompt, entry, max_tokens=8)[0]


def test_every_image_is_read_before_the_tower_runs(mistral, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    cache = VisionCache()
    with pytest.raises(ImageError, match="^image 2: cannot read"):
        cache.encode_all(*mistral, [images[0], broken])
    assert cache.misses == 0 and len(cache) == 0
    encoded = cache.encode_all(*mistral, [images[0], images[0]])
    assert [e.hit for e in encoded] == [False, True]
