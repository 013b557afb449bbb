"""The training loss: language-model cross-entropy plus the MoE auxiliary losses.

The auxiliary losses are the original's (SHI-Labs/CuMo: `CLIPEncoderMoELayer` in
cumo/model/multimodal_encoder/clip_smoe.py, the `smoe_mlp` connector in
cumo/model/multimodal_projector/builder.py; summed with their coefficients in the `forward` of
cumo/model/language_model/llava_mistral.py and llava_mixtral.py), on the router logits of each MoE
call (`moe.balance_loss`, `moe.router_z_loss`):
- balance = E^2 * mean_e(P_e * f_e), P_e the mean router probability of expert e, f_e the share of
  tokens whose top-1 expert is e;
- router z = the mean over tokens of logsumexp(logits)^2.

loss = lm_loss + balance_coef * (sum of balance losses) + z_coef * (sum of router-z losses), with
one balance and one router-z term per MoE site present:
- vision (CLIP-MoE): per layer (all layers, the last one too) and per S2 scale, the balance loss of
  each crop then averaged over crops, and the router-z mean over the scale's tokens; mean over
  layers, then over scales;
- connector: the balance loss of each image, averaged; router-z over all its tokens;
- llm (Mixtral): per layer over all (non-padding) tokens of the batch flattened; mean over layers.

Every term is written as a sum over this batch divided by a count over the whole optimizer step
(`Totals`: supervised tokens, images, batches), so gradient accumulation and data-parallel ranks
add up to exactly what one big batch gives, except for the Mixtral balance loss, which is not a
sum over tokens: it is computed per batch and the batches' values averaged.

Text-only samples contribute no vision or connector terms (the original pushes a blank image
through the tower for them, whose routing enters its aux losses; we skip that wasted work).
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..models.model import Model
from ..models.moe import balance_loss, router_z_loss
from ..models.s2 import scale_slices
from .data import Batch

SITES = ("vision", "connector", "llm")
COMPONENTS = ("lm_loss",) + tuple(f"{site}_{kind}" for site in SITES for kind in ("balance_loss", "router_z_loss"))


@dataclass
class Totals:
    """Counts over a whole optimizer step (every micro-batch on every rank)."""

    targets: int  # supervised tokens
    images: int
    batches: int  # micro-batches that hold any sample

    @staticmethod
    def of(batches: list) -> "Totals":
        return Totals(sum(b.num_targets for b in batches), sum(b.num_images for b in batches), len(batches))


def moe_sites(model: Model) -> list:
    """The MoE sites this model has, in SITES order."""
    args = model.args
    present = {"vision": args.clip_smoe, "connector": args.connector_is_moe, "llm": args.text_config.is_moe}
    return [site for site in SITES if present[site]]


def _vision_terms(logits: list, num_images: int, scales: list) -> tuple[mx.array, mx.array]:
    """Mean over scales of (mean over layers of) the per-crop balance mean and the router-z mean."""
    balance, z = mx.array(0.0), mx.array(0.0)
    for where in scale_slices(num_images, scales):
        balance = balance + sum(balance_loss(layer[where], per_sequence=True) for layer in logits)
        z = z + sum(router_z_loss(layer[where]) for layer in logits)
    count = len(logits) * len(scales)
    return balance / count, z / count


def _llm_terms(logits: list, real: mx.array) -> tuple[mx.array, mx.array]:
    """Mean over layers of the balance and router-z losses over the batch's non-padding tokens."""
    balance, z = mx.array(0.0), mx.array(0.0)
    for layer in logits:
        tokens = layer.reshape(-1, layer.shape[-1])[real]
        balance = balance + balance_loss(tokens, per_sequence=False)
        z = z + router_z_loss(tokens)
    return balance / len(logits), z / len(logits)


def component_names(model: Model, aux: bool = True) -> list:
    """The names `batch_losses` returns the components under, in COMPONENTS order."""
    sites = moe_sites(model) if aux else []
    return [name for name in COMPONENTS if name == "lm_loss" or name.split("_")[0] in sites]


def batch_losses(
    model: Model,
    batch: Batch,
    totals: Optional[Totals] = None,
    aux: bool = True,
    balance_coef: Optional[float] = None,
    z_coef: Optional[float] = None,
) -> tuple[mx.array, dict]:
    """(total loss, {component: value}) of one batch, each a share of the step's `totals`.

    With `totals` of this batch alone (the default) the values are the batch's own losses. The
    model should be in training mode (`model.train()`) so that CLIP's last layer routes.
    """
    totals = totals or Totals.of([batch])
    balance_coef = model.args.balance_loss_coef if balance_coef is None else balance_coef
    z_coef = model.args.router_z_loss_coef if z_coef is None else z_coef
    sites = moe_sites(model) if aux else []

    features, vision_routings, connector_routing = None, [], None
    if batch.pixels is not None:
        features, vision_routings, connector_routing = model.encode_images(batch.pixels)
    embeddings = model.embed_batch(batch.tokens, batch.image_rows, features)
    hidden, llm_routings = model.language_model.model(None, input_embeddings=embeddings)
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch.inputs]
    logits = model.language_model.head(hidden).astype(mx.float32)
    lm_loss = nn.losses.cross_entropy(logits, batch.targets, reduction="sum") / max(totals.targets, 1)

    components = {"lm_loss": lm_loss}
    image_share = batch.num_images / max(totals.images, 1)
    for site in sites:
        if site == "vision":
            if vision_routings:
                router_logits = [r.logits for r in vision_routings]
                b, z = _vision_terms(router_logits, batch.num_images, model.vision_tower.scales)
                b, z = b * image_share, z * image_share
            else:
                b = z = mx.array(0.0)
        elif site == "connector":
            if connector_routing is not None:
                b = balance_loss(connector_routing.logits, per_sequence=True) * image_share
                z = router_z_loss(connector_routing.logits) * image_share
            else:
                b = z = mx.array(0.0)
        else:
            b, z = _llm_terms([r.logits for r in llm_routings], batch.real)
            b, z = b / totals.batches, z / totals.batches
        components[f"{site}_balance_loss"] = b
        components[f"{site}_router_z_loss"] = z

    total = lm_loss
    for site in sites:
        total = total + balance_coef * components[f"{site}_balance_loss"] + z_coef * components[f"{site}_router_z_loss"]
    return total, components
