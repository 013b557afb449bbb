"""The CLIP vision tower (`cumo_mlx.models.vision.ClipVisionModel`), dense and MoE, float32.

- Dense: against transformers' `CLIPVisionModel` with the same weights, `hidden_states[-2]` (the
  state entering the last layer, CLS included), loaded through `Model.sanitize`.
- MoE: against `torch_reference.ClipVisionReference` with the same weights: features, and per
  layer the router logits, the chosen experts, the balance and router-z losses (the last layer's
  routing included, as the original counts it).
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
from cumo_mlx.models import moe
from cumo_mlx.models.config import ModelArgs
from cumo_mlx.models.model import Model
from mlx.utils import tree_flatten
from tiny_models import TINY_VISION, tiny_config
from torch_reference import ClipVisionReference, randomize
from transformers import CLIPVisionConfig, CLIPVisionModel

TOL = 1e-4
PREFIX = "model.vision_tower.vision_model."  # + the original CLIP name


def to_np(a) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def our_tower(weights: dict, clip_smoe: bool):
    """A tiny CuMo's ClipVisionModel with `weights` (original names below vision_model.) loaded."""
    model = Model(ModelArgs.from_dict(tiny_config(clip_smoe=clip_smoe)))
    sanitized = model.sanitize({PREFIX + k: mx.array(v.detach().float().numpy()) for k, v in weights.items()})
    clip = model.vision_tower.vision_model
    names = {"vision_tower.vision_model." + k for k, _ in tree_flatten(clip.parameters())}
    assert set(sanitized) == names  # every CLIP weight, nothing else
    model.load_weights(list(sanitized.items()), strict=False)
    mx.eval(model.parameters())
    return clip


def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    size = TINY_VISION["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def nhwc(x: torch.Tensor) -> mx.array:
    return mx.array(x.permute(0, 2, 3, 1).numpy())


def test_dense_matches_transformers_hidden_states_minus_2():
    cfg = CLIPVisionConfig(**{k: v for k, v in TINY_VISION.items() if k not in ("shortest_edge", "crop_size")})
    cfg._attn_implementation = "eager"
    hf = CLIPVisionModel(cfg).float().eval()
    randomize(hf, torch.Generator().manual_seed(0))
    x = pixels(3)
    with torch.no_grad():
        expected = hf(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    # transformers' CLIP names (below `vision_model.` in transformers < 5) are the original's;
    # the unused post_layernorm is left out, as in a CuMo checkpoint
    weights = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items() if "post_layernorm" not in k}
    clip = our_tower(weights, clip_smoe=False)
    clip.eval()
    features, routings = clip(nhwc(x))
    assert routings == []
    assert features.shape == tuple(expected.shape)
    np.testing.assert_allclose(to_np(features), expected.numpy(), atol=TOL, rtol=0)

    # and the torch reference agrees with transformers (same names, same numbers)
    ref = ClipVisionReference(TINY_VISION)
    ref.load_state_dict(weights, strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(ref(x).features.numpy(), expected.numpy(), atol=1e-5, rtol=0)


def test_features_do_not_depend_on_the_last_layer():
    ref = ClipVisionReference(TINY_VISION)
    randomize(ref, torch.Generator().manual_seed(1))
    clip = our_tower(ref.state_dict(), clip_smoe=False)
    clip.eval()
    x = nhwc(pixels(2))
    before = to_np(clip(x)[0])
    last = clip.encoder.layers[-1]
    last.mlp.fc1.weight = last.mlp.fc1.weight * 0 + float("nan")
    last.self_attn.q_proj.weight = last.self_attn.q_proj.weight * 0 + float("nan")
    np.testing.assert_array_equal(to_np(clip(x)[0]), before)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("mode", ["gather", "grouped"])
def test_moe_matches_reference(mode, top_k):
    num_experts = 4
    ref = ClipVisionReference(TINY_VISION, num_experts=num_experts, top_k=top_k)
    randomize(ref, torch.Generator().manual_seed(2))
    x = pixels(4, seed=5)
    with torch.no_grad():
        expected = ref(x)
    clip = our_tower(ref.state_dict(), clip_smoe=True)
    for layer in clip.encoder.layers:
        layer.mlp.top_k = top_k
    moe.set_dispatch(clip, mode)

    clip.eval()
    features, routings = clip(nhwc(x))
    assert routings == []
    np.testing.assert_allclose(to_np(features), expected.features.numpy(), atol=TOL, rtol=0)

    clip.train()
    features, routings = clip(nhwc(x))
    np.testing.assert_allclose(to_np(features), expected.features.numpy(), atol=TOL, rtol=0)
    assert len(routings) == len(expected.moe) == TINY_VISION["num_hidden_layers"]
    for i, (ours, theirs) in enumerate(zip(routings, expected.moe)):
        np.testing.assert_allclose(to_np(ours.logits), theirs.logits.numpy(), atol=TOL, rtol=0, err_msg=f"layer {i}")
        chosen = np.sort(np.array(moe.route(ours.logits, top_k)[0]), -1)
        np.testing.assert_array_equal(chosen, np.sort(theirs.indices.numpy(), -1), err_msg=f"layer {i}")
        if ours.indices is not None:  # the last layer only routes (its experts are not run)
            np.testing.assert_array_equal(np.sort(np.array(ours.indices), -1), chosen)
        b = moe.balance_loss(ours.logits, per_sequence=True).item()
        z = moe.router_z_loss(ours.logits).item()
        assert abs(b - theirs.balance_loss.item()) <= TOL, i
        assert abs(z - theirs.router_z_loss.item()) <= TOL, i
    mean_b = np.mean([moe.balance_loss(r.logits, per_sequence=True).item() for r in routings])
    mean_z = np.mean([moe.router_z_loss(r.logits).item() for r in routings])
    assert abs(mean_b - expected.balance_loss.item()) <= TOL
    assert abs(mean_z - expected.router_z_loss.item()) <= TOL
