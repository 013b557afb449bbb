"""The expert view of the chat page: which expert each image patch (and each answer token) goes to.

For one image it runs the vision tower and the connector once, in the training mode that makes the
vision tower return its routings (as `cumo-mlx experts` does; the features are the same), and for
every MoE site (each CLIP-MoE layer at each S2 scale, and the MoE connector) lays the top-1 expert
of each patch (the argmax of its router logits) out on the patch grid. Scale 1 is the crop's own
grid; for scale s > 1 the s x s crops' grids are stitched into one (s*g) x (s*g) grid, in the crop
order of `models/s2.py` (row-major). CLS tokens are left out; so is the last CLIP layer, whose
experts inference never runs.

For a Mixtral LLM, given the question and the answer, it runs the LLM over that one-turn
conversation and reports each answer token's top-1 expert at every Mixtral layer.

`POST /v1/cumo/routes` of `cumo-mlx serve` answers with `expert_view` of its body's image.
"""

import base64
import io
from typing import Optional, Union

import mlx.core as mx
import numpy as np
from PIL import Image

from ..models.moe import SparseMoE
from ..models.s2 import scale_slices
from ..processor import Processor, expand_to_square, load_image
from ..prompt import DEFAULT_SYSTEM, chat_prompt, with_image_placeholders
from .errors import APIError
from .schema import ImageURL, Strict, validated

VIEW_SIZE = 672  # side of the picture the page tints: twice a 336 px crop


def stitch(top1: np.ndarray, scale: int) -> np.ndarray:
    """Top-1 experts of one image's crops at one scale [s*s, g*g] -> its grid [s*g, s*g]."""
    g = int(round(top1.shape[1] ** 0.5))
    # crops in row-major order: [row, col, y, x] -> [row, y, col, x]
    return top1.reshape(scale, scale, g, g).transpose(0, 2, 1, 3).reshape(scale * g, scale * g)


def site(name: str, kind: str, grid: np.ndarray, num_experts: int, **where) -> dict:
    """One MoE site: its grid of expert ids and each expert's patch count and share in percent."""
    counts = np.bincount(grid.reshape(-1), minlength=num_experts)
    return {
        "name": name,
        "kind": kind,
        **where,
        "num_experts": num_experts,
        "grid": grid.tolist(),
        "counts": counts.tolist(),
        "shares": (100.0 * counts / grid.size).tolist(),
    }


def image_sites(model, pixels: mx.array) -> tuple[mx.array, list[dict]]:
    """One image's features [1, patches, hidden] and the sites of its routing (pixels [1, S, S, 3])."""
    tower = model.vision_tower
    was_training = tower.training
    tower.train()  # makes the vision tower return its routings; the features are unchanged
    try:
        encoding = model.encode_images(pixels)
        mx.eval(encoding.features, encoding.vision_routings, encoding.connector_routing)
    finally:
        tower.train(was_training)
    sites = []
    clip_layers = tower.vision_model.encoder.layers
    for i, routing in enumerate(encoding.vision_routings[: len(clip_layers) - 1]):
        if routing is None:  # a dense CLIP layer
            continue
        top1 = np.asarray(mx.argmax(routing.logits, axis=-1))[:, 1:]  # without CLS
        num_experts = clip_layers[i].mlp.num_experts
        for scale, where in zip(tower.scales, scale_slices(1, tower.scales)):
            grid = stitch(top1[where], scale)
            sites.append(site(f"CLIP layer {i}, scale {scale}", "clip", grid, num_experts, layer=i, scale=scale))
    if isinstance(model.mm_projector, SparseMoE):
        top1 = np.asarray(mx.argmax(encoding.connector_routing.logits, axis=-1))[0]
        grid = stitch(top1[None], 1)
        sites.append(site("connector", "connector", grid, model.mm_projector.num_experts))
    return encoding.features, sites


def answer_ids(processor: Processor, question: str, answer: str, system: Optional[str]) -> tuple[list[int], list[int]]:
    """The one-turn prompt's ids and the answer's ids as they follow it (after one space, as in the
    template's assistant turn); no answer ids when the answer does not tokenize after the prompt."""
    prompt = chat_prompt([with_image_placeholders(question, 1)], system)
    prompt_ids = processor.tokenize(prompt)
    full = processor.tokenize(f"{prompt} {answer.strip()}")
    if full[: len(prompt_ids)] != prompt_ids:
        return prompt_ids, []
    return prompt_ids, full[len(prompt_ids) :]


def token_texts(processor: Processor, ids: list[int]) -> list[str]:
    """Each token's piece of the answer text, as the streaming detokenizer gives it."""
    detokenizer = processor.tokenizer.detokenizer
    detokenizer.reset()
    texts = []
    for token in ids:
        detokenizer.add_token(token)
        texts.append(detokenizer.last_segment)
    detokenizer.finalize()
    texts[-1] += detokenizer.last_segment
    return texts


def token_routes(model, processor: Processor, features: mx.array, question: str, answer: str, system: Optional[str]) -> dict:
    """Each answer token's top-1 expert at every Mixtral layer, from one pass over the conversation."""
    layers = [i for i, layer in enumerate(model.language_model.layers) if "block_sparse_moe" in layer]
    prompt_ids, ids = answer_ids(processor, question, answer, system)
    if not ids:
        why = "the answer is empty" if not answer.strip() else "the answer's tokens do not follow the prompt's"
        return {"available": False, "reason": why}
    embeddings = model.embed_inputs(prompt_ids + ids, features)
    _, routings = model.language_model.forward(None, input_embeddings=embeddings[None])
    top1 = np.stack([np.asarray(mx.argmax(r.logits[0, -len(ids) :], axis=-1)) for r in routings], axis=1)
    return {
        "available": True,
        "layers": [f"LLM layer {i}" for i in layers],
        "num_experts": model.language_model.layers[layers[0]].block_sparse_moe.num_experts,
        "tokens": [{"text": text, "experts": experts.tolist()} for text, experts in zip(token_texts(processor, ids), top1)],
    }


def view_image(processor: Processor, image: Image.Image) -> str:
    """The part of the image the grids cover (padded or centre-cropped to a square as the model's
    preprocessing does), as a JPEG data URI of VIEW_SIZE px."""
    if processor.args.image_aspect_ratio == "pad":
        image = expand_to_square(image, processor.pad_color)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side)).resize((VIEW_SIZE, VIEW_SIZE), Image.BICUBIC)
    buffer = io.BytesIO()
    square.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def expert_view(
    model,
    processor: Processor,
    image: Image.Image,
    question: Optional[str] = None,
    answer: Optional[str] = None,
    system: Optional[str] = DEFAULT_SYSTEM,
) -> dict:
    """The routing of one image at every MoE site, and, for a Mixtral LLM given the question and the
    answer about the image, the answer tokens' routing (JSON-ready)."""
    image = load_image(image)
    features, sites = image_sites(model, processor.preprocess_images([image]))
    if not model.args.text_config.is_moe:
        tokens = {"available": False, "reason": "the language model is dense (Mistral): its tokens have no experts"}
    elif question is None or answer is None:
        tokens = {"available": False, "reason": "give the question and the answer to see the answer tokens' experts"}
    else:
        tokens = token_routes(model, processor, features, question, answer, system)
    return {"image": view_image(processor, image), "sites": sites, "tokens": tokens}


class RoutesRequest(Strict):
    """The body of `POST /v1/cumo/routes`: one image (`image`, a data: URI or URL, or `image_url`
    as in a chat message), and for a Mixtral LLM's token routes the question and the answer."""

    image: Optional[str] = None
    image_url: Union[ImageURL, str, None] = None
    question: Optional[str] = None
    answer: Optional[str] = None
    system: Optional[str] = None

    @property
    def url(self) -> str:
        if self.image_url is None:
            return self.image
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


def parse_routes_request(body: bytes) -> RoutesRequest:
    """The request, or a 400 naming what is wrong."""
    request = validated(RoutesRequest, body)
    if (request.image is None) == (request.image_url is None):
        raise APIError(400, "give the image as `image` or as `image_url` (one of them)", param="image")
    return request
