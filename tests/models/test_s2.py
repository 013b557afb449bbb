"""S2 multi-scale (`cumo_mlx.models.s2`, `cumo_mlx.models.vision.VisionTower`) against PyTorch, float32.

- The bicubic resize against `F.interpolate(mode='bicubic', align_corners=False)` (a = -0.75, no
  antialias): up, down, odd and non-square sizes.
- The crops against the original's `split_chessboard` order (crop-major, row-major crops).
- `merge_scales` against the original's `merge_chessboard` + `F.interpolate(mode='area')`.
- The whole vision tower (S2 over CLIP, dense and MoE) against `torch_reference`, with the CLIP aux
  losses taken per scale through `s2.scale_slices` (mean over layers, then over scales).
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cumo_mlx.models import moe, s2
from cumo_mlx.models.config import ModelArgs
from cumo_mlx.models.model import Model
from tiny_models import TINY_VISION, tiny_config
from torch_reference import (
    VisionTowerReference,
    area_resize,
    bicubic_resize,
    merge_chessboard,
    randomize,
    split_chessboard,
)

TOL = 1e-4


def to_np(a) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def nhwc(x: torch.Tensor) -> mx.array:
    return mx.array(x.permute(0, 2, 3, 1).contiguous().numpy())


def nchw(a: mx.array) -> np.ndarray:
    return to_np(a).transpose(0, 3, 1, 2)


def images(batch, height, width, seed=0, channels=3) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "in_size,out_size",
    [((16, 16), (48, 48)), ((16, 16), (32, 32)), ((48, 48), (16, 16)), ((7, 5), (5, 13)), ((12, 20), (36, 9)), ((3, 3), (9, 9)), ((336, 336), (1008, 1008))],
)
def test_bicubic_matrix_matches_torch(in_size, out_size):
    x = images(1, *in_size, seed=1, channels=2)
    expected = F.interpolate(x, size=out_size, mode="bicubic", align_corners=False).numpy()
    rows = s2.bicubic_matrix(in_size[0], out_size[0]).astype(np.float64)
    cols = s2.bicubic_matrix(in_size[1], out_size[1]).astype(np.float64)
    assert rows.shape == (out_size[0], in_size[0]) and cols.shape == (out_size[1], in_size[1])
    ours = rows @ x.double().numpy() @ cols.T
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("in_size,size", [((16, 16), 48), ((16, 16), 32), ((48, 48), 16), ((12, 20), 36), ((20, 12), 8)])
def test_resize_bicubic_matches_torch(in_size, size):
    x = images(2, *in_size, seed=2)
    expected = bicubic_resize(x, size).numpy()
    ours = s2.resize_bicubic(nhwc(x), size)
    assert ours.dtype == mx.float32
    np.testing.assert_allclose(nchw(ours), expected, atol=1e-5, rtol=0)


def reference_pyramid(x: torch.Tensor, scales) -> torch.Tensor:
    size = x.shape[-1]
    out = [x] + [split_chessboard(bicubic_resize(x, size * s), s) for s in scales if s > 1]
    return torch.cat(out)


@pytest.mark.parametrize("scales", [[1, 3], [1, 2, 3], [1], [1, 2]])
def test_multiscale_crops_order(scales):
    batch = 2
    x = images(batch, 16, 16, seed=3)
    expected = reference_pyramid(x, scales).numpy()
    ours = s2.multiscale_crops(nhwc(x), scales)
    assert ours.shape[0] == batch * sum(s * s for s in scales)
    np.testing.assert_allclose(nchw(ours), expected, atol=1e-5, rtol=0)
    slices = s2.scale_slices(batch, scales)
    assert [sl.stop - sl.start for sl in slices] == [batch * s * s for s in scales]
    assert slices[0].start == 0 and slices[-1].stop == ours.shape[0]
    # crop (row i, col j) of image b at scale s sits at slice.start + (i * s + j) * batch + b
    for s, sl in zip(scales, slices):
        big = bicubic_resize(x, 16 * s).numpy()
        for i in range(s):
            for j in range(s):
                for b in range(batch):
                    crop = nchw(ours[sl.start + (i * s + j) * batch + b][None])[0]
                    np.testing.assert_allclose(crop, big[b, :, i * 16 : (i + 1) * 16, j * 16 : (j + 1) * 16], atol=1e-5)


def reference_merge(features: torch.Tensor, batch: int, scales) -> torch.Tensor:
    g = int(features.shape[1] ** 0.5)
    merged, start = [], 0
    for s in scales:
        f = features[start : start + s * s * batch]
        start += s * s * batch
        if s > 1:
            f = f.transpose(1, 2).reshape(f.shape[0], f.shape[2], g, g)
            f = area_resize(merge_chessboard(f, s), g).flatten(2).transpose(1, 2)
        merged.append(f)
    return torch.cat(merged, dim=-1)


@pytest.mark.parametrize("grid", [4, 6])
@pytest.mark.parametrize("scales", [[1, 3], [1, 2, 3]])
def test_merge_scales_matches_stitching_and_area(scales, grid):
    batch, dims = 2, 5
    n = batch * sum(s * s for s in scales)
    features = torch.randn(n, grid * grid, dims, generator=torch.Generator().manual_seed(4))
    expected = reference_merge(features, batch, scales).numpy()
    ours = s2.merge_scales(mx.array(features.numpy()), batch, scales)
    assert ours.shape == (batch, grid * grid, dims * len(scales))
    np.testing.assert_allclose(to_np(ours), expected, atol=1e-5, rtol=0)


def test_merge_inverts_split():
    """Crops of a feature map, merged back at scale s, give the s x s average pool of the map."""
    batch, s, g, dims = 2, 3, 4, 3
    fmap = torch.randn(batch, dims, s * g, s * g, generator=torch.Generator().manual_seed(5))
    crops = split_chessboard(fmap, s).flatten(2).transpose(1, 2)  # [s*s*B, g*g, D]
    base = torch.zeros(batch, g * g, dims)
    ours = s2.merge_scales(mx.array(torch.cat([base, crops]).numpy()), batch, [1, s])
    pooled = F.avg_pool2d(fmap, s).flatten(2).transpose(1, 2)
    np.testing.assert_allclose(to_np(ours)[..., dims:], pooled.numpy(), atol=1e-5)


@pytest.mark.parametrize("clip_smoe", [True, False])
@pytest.mark.parametrize("scales", [[1, 3], [1, 2, 3]])
def test_vision_tower_matches_reference(scales, clip_smoe):
    config = tiny_config(clip_smoe=clip_smoe, scales=scales)
    ref = VisionTowerReference(TINY_VISION, scales, 4 if clip_smoe else None, 2)
    randomize(ref, torch.Generator().manual_seed(6))
    x = images(2, 16, 16, seed=7)
    with torch.no_grad():
        expected = ref(x)

    model = Model(ModelArgs.from_dict(config))
    prefix = "model.vision_tower.vision_model."
    weights = model.sanitize({prefix + k: mx.array(v.numpy()) for k, v in ref.vision_model.state_dict().items()})
    model.load_weights(list(weights.items()), strict=False)
    tower = model.vision_tower
    tower.train()
    features, routings = tower(nhwc(x))
    assert features.shape == (2, 16, TINY_VISION["hidden_size"] * len(scales))
    np.testing.assert_allclose(to_np(features), expected.features.numpy(), atol=TOL, rtol=0)
    if not clip_smoe:
        assert expected.balance_loss is None
        return
    # CLIP aux: per scale (its crops), mean over layers; then mean over scales
    per_scale_b, per_scale_z = [], []
    for where, theirs in zip(s2.scale_slices(2, scales), expected.per_scale):
        layer_b = [moe.balance_loss(r.logits[where], per_sequence=True).item() for r in routings]
        layer_z = [moe.router_z_loss(r.logits[where]).item() for r in routings]
        assert abs(np.mean(layer_b) - theirs.balance_loss.item()) <= TOL
        assert abs(np.mean(layer_z) - theirs.router_z_loss.item()) <= TOL
        per_scale_b.append(np.mean(layer_b))
        per_scale_z.append(np.mean(layer_z))
    assert abs(np.mean(per_scale_b) - expected.balance_loss.item()) <= TOL
    assert abs(np.mean(per_scale_z) - expected.router_z_loss.item()) <= TOL
