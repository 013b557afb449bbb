"""S2 multi-scale: run an image at several scales through one vision tower and merge the features.

For scale s > 1 the normalised image is resized to s times its size with PyTorch's bicubic
interpolation (align_corners=False, a = -0.75, no antialias), cut into s*s crops in row-major
order, and every crop goes through the tower; each crop's patch grid is stitched back and
area-pooled (s x s average) to the base grid. Scales are concatenated along channels.

All crops of all scales form one batch, ordered scale by scale, and within a scale crop-major
(crop 0 of every image, then crop 1, ...) as the original orders them.
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 from floor(src)."""
    d = np.stack([t + 1, t, 1 - t, 2 - t], axis=-1)
    near = ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
    return np.where(d <= 1, near, far)


@lru_cache(maxsize=16)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix M such that M @ signal resizes a 1-D signal like torch bicubic."""
    # PyTorch computes the source coordinate in float32, as fma(scale, dst + 0.5, -0.5) with
    # scale = float32(in / out) (its CPU and CUDA kernels both contract it to an FMA); in float64
    # the product is exact, so one rounding to float32 reproduces it. Exact float64 coordinates
    # would differ by up to ~3e-5 in the weights at 336 -> 1008 (~2e-4 on normalised pixels).
    # Not clamped: PyTorch keeps negative sources for cubic.
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    base = np.floor(src)
    weights = _cubic_weights((src - base).astype(np.float64))
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)  # replicate borders
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix.astype(np.float32)


def resize_bicubic(images: mx.array, size: int) -> mx.array:
    """[B, H, W, C] float -> [B, size, size, C] in float32."""
    rows = mx.array(bicubic_matrix(images.shape[1], size))
    cols = mx.array(bicubic_matrix(images.shape[2], size))
    x = images.astype(mx.float32)
    x = mx.einsum("oh,bhwc->bowc", rows, x)
    return mx.einsum("pw,bowc->bopc", cols, x)


def multiscale_crops(images: mx.array, scales: list[int]) -> mx.array:
    """[B, S, S, C] -> [B * sum(s*s), S, S, C]: every crop of every scale, as one batch."""
    B, S, _, C = images.shape
    batches = []
    for s in scales:
        if s == 1:
            batches.append(images)
            continue
        big = resize_bicubic(images, S * s).astype(images.dtype)
        crops = big.reshape(B, s, S, s, S, C).transpose(1, 3, 0, 2, 4, 5)  # [row, col, B, S, S, C]
        batches.append(crops.reshape(s * s * B, S, S, C))
    return mx.concatenate(batches) if len(batches) > 1 else batches[0]


def scale_slices(batch_size: int, scales: list[int]) -> list[slice]:
    """Where each scale's crops sit in the multiscale batch."""
    slices, start = [], 0
    for s in scales:
        slices.append(slice(start, start + s * s * batch_size))
        start += s * s * batch_size
    return slices


def merge_scales(features: mx.array, batch_size: int, scales: list[int]) -> mx.array:
    """Crop features [N, g*g, D] -> image features [B, g*g, D * len(scales)]."""
    _, tokens, D = features.shape
    g = int(round(tokens**0.5))
    merged = []
    for s, where in zip(scales, scale_slices(batch_size, scales)):
        x = features[where]
        if s > 1:
            # [row, col, B, y, x, D] -> stitched [B, row*g + y, col*g + x, D] -> s x s average pool
            x = x.reshape(s, s, batch_size, g, g, D).transpose(2, 0, 3, 1, 4, 5).reshape(batch_size, s * g, s * g, D)
            x = x.astype(mx.float32).reshape(batch_size, g, s, g, s, D).mean(axis=(2, 4)).astype(features.dtype)
            x = x.reshape(batch_size, g * g, D)
        merged.append(x)
    return mx.concatenate(merged, axis=-1)
