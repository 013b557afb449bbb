"""The whole CuMo model against `torch_reference` (same weights, float32, tiny configs).

Weights travel the way a real checkpoint does: `torch_reference.original_state_dict` (the original
checkpoint's names and layouts) -> `Model.sanitize` -> `model.load_weights` (strict).

- connector (`mlp2x_gelu`, `smoe_mlp`) outputs and routing;
- the `<image>` splice: placeholder/image count mismatch, text-only, several images, placeholders
  at the ends and side by side;
- logits for llava_mistral and llava_mixtral x CLIP-MoE on/off x both connectors;
- MLX checkpoints written with `loader.save` / `tiny_models.write_mlx_model` and read back with
  `cumo_mlx.load` give the same logits;
- the training aux losses computed from our routings (CLIP per scale through `s2.scale_slices`,
  mean over layers then scales; connector per image; Mixtral mean over layers of the flattened
  losses) and the total loss equal the reference's.
"""

import cumo_mlx
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from cumo_mlx.loader import save
from cumo_mlx.models import moe, s2
from cumo_mlx.models.config import ModelArgs
from cumo_mlx.models.model import Model
from cumo_mlx.models.moe import Routing, feed_forward
from cumo_mlx.prompt import IMAGE_TOKEN_INDEX
from mlx.utils import tree_flatten
from tiny_models import TINY_VISION, tiny_config, write_mlx_model, write_tokenizer
from torch_reference import IGNORE_INDEX, build_reference, original_state_dict

TOL = 1e-4
IMG = IMAGE_TOKEN_INDEX
SIZE = TINY_VISION["image_size"]
PROMPT = [1, 1, 5, 6, IMG, 7, 8, 9, IMG, 10, 11]  # two images


def to_np(a) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def nhwc(x: torch.Tensor) -> mx.array:
    return mx.array(x.permute(0, 2, 3, 1).contiguous().numpy())


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def ours_from_reference(ref, config: dict) -> Model:
    model = Model(ModelArgs.from_dict(config))
    weights = model.sanitize({k: mx.array(v.numpy()) for k, v in original_state_dict(ref).items()})
    model.load_weights(list(weights.items()))  # strict: every parameter, nothing extra
    mx.eval(model.parameters())
    model.eval()
    return model


def build_pair(seed: int = 0, **kwargs):
    config = tiny_config(**kwargs)
    ref = build_reference(config, seed)
    return config, ref, ours_from_reference(ref, config)


# ------------------------------------------------------------------------------------------------
# connector
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connector", ["mlp2x_gelu", "smoe_mlp"])
def test_connector(connector):
    _, ref, ours = build_pair(connector=connector, clip_smoe=False)
    in_dims = TINY_VISION["hidden_size"] * 2
    x = torch.randn(3, 16, in_dims, generator=torch.Generator().manual_seed(1))
    from torch_reference import apply_connector

    with torch.no_grad():
        expected, expected_moe = apply_connector(ref.mm_projector, x)
    y, routing = feed_forward(ours.mm_projector, mx.array(x.numpy()))
    np.testing.assert_allclose(to_np(y), expected.numpy(), atol=TOL, rtol=0)
    if connector == "mlp2x_gelu":
        assert routing is None and expected_moe is None
        return
    np.testing.assert_array_equal(np.sort(np.array(routing.indices), -1), np.sort(expected_moe.indices.numpy(), -1))
    np.testing.assert_allclose(to_np(routing.logits), expected_moe.logits.numpy(), atol=TOL, rtol=0)
    # per image: balance over each batch element's tokens, then averaged
    assert abs(moe.balance_loss(routing.logits, per_sequence=True).item() - expected_moe.balance_loss.item()) <= TOL
    assert abs(moe.router_z_loss(routing.logits).item() - expected_moe.router_z_loss.item()) <= TOL


# ------------------------------------------------------------------------------------------------
# splice
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mistral_pair():
    return build_pair(seed=3)


@pytest.mark.parametrize(
    "ids,n_images",
    [([1, 5, IMG, 6], 0), ([1, 5, IMG, 6], 2), ([1, 5, 6], 1), ([1, IMG, IMG, 6], 1), ([1, IMG, 5, IMG], 3)],
)
def test_splice_count_mismatch_raises(mistral_pair, ids, n_images):
    _, ref, ours = mistral_pair
    features = None if n_images == 0 else mx.zeros((n_images, 16, 64))
    with pytest.raises(ValueError, match="placeholder"):
        ours.embed_inputs(ids, features)
    with pytest.raises(ValueError):
        ref(ids, pixels(n_images) if n_images else None)


def test_splice_text_only(mistral_pair):
    _, ref, ours = mistral_pair
    ids = [1, 1, 5, 6, 7]
    embeds = ours.embed_inputs(ids)
    np.testing.assert_array_equal(to_np(embeds), to_np(ours.language_model.model.embed_tokens(mx.array(ids))))
    with torch.no_grad():
        expected = ref(ids)
    np.testing.assert_allclose(to_np(ours(ids)), expected.logits.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(to_np(ours(ids, None)), expected.logits.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "ids",
    [
        PROMPT,
        [IMG, 5, 6],  # image first
        [1, 5, IMG],  # image last
        [1, IMG, IMG, IMG, 5],  # side by side
        [1, 5, IMG, 6, 7, IMG, 8, IMG],
    ],
)
def test_splice_several_images(mistral_pair, ids):
    _, ref, ours = mistral_pair
    n = ids.count(IMG)
    px = pixels(n, seed=n)
    labels = [IGNORE_INDEX if i < 0 else i for i in ids]
    with torch.no_grad():
        expected = ref(ids, px, labels=labels)
    features = ours.encode_images(nhwc(px)).features
    np.testing.assert_allclose(to_np(features), expected.image_features.numpy(), atol=TOL, rtol=0)
    embeds = ours.embed_inputs(ids, features)
    length = len(ids) - n + n * 16
    assert embeds.shape == (length, 64) == tuple(expected.inputs_embeds.shape)
    np.testing.assert_allclose(to_np(embeds), expected.inputs_embeds.numpy(), atol=TOL, rtol=0)
    # image i's rows sit where its placeholder was, text rows are the token embeddings
    table = to_np(ours.language_model.model.embed_tokens.weight)
    row, image = 0, 0
    for token in ids:
        if token == IMG:
            np.testing.assert_array_equal(to_np(embeds[row : row + 16]), to_np(features[image]))
            assert (expected.labels[row : row + 16] == IGNORE_INDEX).all()
            row, image = row + 16, image + 1
        else:
            np.testing.assert_array_equal(to_np(embeds[row]), table[token])
            assert expected.labels[row].item() == token
            row += 1
    np.testing.assert_allclose(to_np(ours(ids, nhwc(px))), expected.logits.numpy(), atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# whole model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("connector", ["mlp2x_gelu", "smoe_mlp"])
@pytest.mark.parametrize("clip_smoe", [True, False])
@pytest.mark.parametrize("llm", ["mistral", "mixtral"])
def test_logits_match_reference(llm, clip_smoe, connector):
    config, ref, ours = build_pair(seed=4, llm=llm, clip_smoe=clip_smoe, connector=connector)
    px = pixels(2, seed=5)
    with torch.no_grad():
        expected = ref(PROMPT, px)
    logits = ours(PROMPT, nhwc(px))
    assert logits.shape == (1, len(PROMPT) - 2 + 2 * 16, config["vocab_size"])
    np.testing.assert_allclose(to_np(logits), expected.logits.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("mode", ["gather", "grouped"])
def test_logits_both_dispatch_paths(mode):
    _, ref, ours = build_pair(seed=6, llm="mixtral")
    px = pixels(2, seed=7)
    with torch.no_grad():
        expected = ref(PROMPT, px)
    moe.set_dispatch(ours, mode)
    logits = ours(PROMPT, nhwc(px))
    np.testing.assert_allclose(to_np(logits), expected.logits.numpy(), atol=TOL, rtol=0)


@pytest.mark.parametrize("llm", ["mistral", "mixtral"])
def test_saved_reference_weights_load_back(tmp_path, llm):
    config, ref, ours = build_pair(seed=8, llm=llm)
    save(tmp_path, ours)
    write_tokenizer(tmp_path)
    loaded, processor = cumo_mlx.load(tmp_path)
    assert processor is not None
    px = pixels(2, seed=9)
    with torch.no_grad():
        expected = ref(PROMPT, px)
    np.testing.assert_allclose(to_np(loaded(PROMPT, nhwc(px))), expected.logits.numpy(), atol=TOL, rtol=0)


def test_write_mlx_model_round_trip(tmp_path):
    config = tiny_config(llm="mixtral")
    write_mlx_model(tmp_path, config, seed=11)
    loaded, _ = cumo_mlx.load(tmp_path)
    mx.random.seed(11)  # write_mlx_model's initialisation, redone in memory
    fresh = Model(ModelArgs.from_dict(config))
    mx.eval(fresh.parameters())
    a, b = dict(tree_flatten(loaded.parameters())), dict(tree_flatten(fresh.parameters()))
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(to_np(a[name]), to_np(b[name]), err_msg=name)
    fresh.eval()
    px = nhwc(pixels(2, seed=12))
    np.testing.assert_array_equal(to_np(loaded(PROMPT, px)), to_np(fresh(PROMPT, px)))


# ------------------------------------------------------------------------------------------------
# training losses
# ------------------------------------------------------------------------------------------------


def our_losses(model: Model, config: dict, ids, px: mx.array, labels) -> dict:
    """The aux losses and the total loss from our routings, as the original combines them."""
    model.train()
    try:
        enc = model.encode_images(px)
        embeds = model.embed_inputs(ids, enc.features)
        logits, llm_routings = model.language_model.forward(None, input_embeddings=embeds[None])
    finally:
        model.eval()
    out = dict.fromkeys(("clip_balance", "clip_z", "mlp_balance", "mlp_z", "llm_balance", "llm_z"))
    if enc.vision_routings:
        bs, zs = [], []
        for where in s2.scale_slices(px.shape[0], config["scales"]):
            scale = [Routing(r.logits[where], None) for r in enc.vision_routings]
            bs.append(mx.stack([moe.balance_loss(r.logits, per_sequence=True) for r in scale]).mean())
            zs.append(mx.stack([moe.router_z_loss(r.logits) for r in scale]).mean())
        out["clip_balance"], out["clip_z"] = mx.stack(bs).mean(), mx.stack(zs).mean()
    if enc.connector_routing is not None:
        out["mlp_balance"] = moe.balance_loss(enc.connector_routing.logits, per_sequence=True)
        out["mlp_z"] = moe.router_z_loss(enc.connector_routing.logits)
    if llm_routings:
        out["llm_balance"] = mx.stack([moe.balance_loss(r.logits, per_sequence=False) for r in llm_routings]).mean()
        out["llm_z"] = mx.stack([moe.router_z_loss(r.logits) for r in llm_routings]).mean()

    targets = mx.array(labels[1:])
    mask = targets != IGNORE_INDEX
    ce = nn.losses.cross_entropy(logits[0, :-1], mx.where(mask, targets, 0))
    out["lm"] = (ce * mask).sum() / mask.sum()
    total = out["lm"]
    if config["clip_smoe"] or config["mm_projector_type"] == "smoe_mlp":
        for site in ("clip", "mlp", "llm"):
            if out[f"{site}_balance"] is not None:
                total = total + config["balance_loss_coef"] * out[f"{site}_balance"]
                total = total + config["router_z_loss_coef"] * out[f"{site}_z"]
    out["total"] = total
    return out


@pytest.mark.parametrize(
    "llm,clip_smoe,connector,scales",
    [
        ("mixtral", True, "smoe_mlp", [1, 3]),
        ("mistral", True, "smoe_mlp", [1, 2, 3]),
        ("mistral", True, "mlp2x_gelu", [1, 3]),
        ("mixtral", False, "smoe_mlp", [1, 3]),
        ("mixtral", False, "mlp2x_gelu", [1, 3]),  # no vision MoE: the original adds no aux term
    ],
)
def test_aux_losses_match_reference(llm, clip_smoe, connector, scales):
    config, ref, ours = build_pair(seed=13, llm=llm, clip_smoe=clip_smoe, connector=connector, scales=scales)
    ids = PROMPT
    px = pixels(2, seed=14)
    labels = [IGNORE_INDEX if i < 5 or i == IMG else i for i in ids]  # prompt part unsupervised
    with torch.no_grad():
        expected = ref(ids, px, labels=labels)
    got = our_losses(ours, config, ids, nhwc(px), expected.labels.tolist())
    for name, value in expected.aux.items():
        if value is None:
            assert got[name] is None, name
        else:
            assert got[name] is not None, name
            assert abs(got[name].item() - value.item()) <= TOL, (name, got[name].item(), value.item())
    assert abs(got["lm"].item() - expected.lm_loss.item()) <= TOL
    assert abs(got["total"].item() - expected.loss.item()) <= TOL
    if not clip_smoe and connector == "mlp2x_gelu":
        assert expected.loss.item() == expected.lm_loss.item()
