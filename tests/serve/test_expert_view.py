"""The expert view's routing: grids laid out as S2 stitches crops, counts that agree with `cumo-mlx
experts` on the same image, features unchanged, a Mixtral answer's token routes as decoded, and
`POST /v1/cumo/routes` of the server (its key, its 400s, the same view computed on its thread)."""

import base64
import io
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from cli_util import run_cli
from mlx_lm.models.cache import make_prompt_cache
from PIL import Image
from serving import data_uri, post, serving
from tiny_models import tiny_config, write_mlx_model

import cumo_mlx
from cumo_mlx.models.s2 import merge_scales
from cumo_mlx.prompt import DEFAULT_SYSTEM
from cumo_mlx.serve.app import ServerConfig
from cumo_mlx.serve.backend import BatchBackend
from cumo_mlx.serve.expert_view import answer_ids, expert_view, image_sites, stitch

IMAGE = Path(__file__).resolve().parents[2] / "examples" / "shapes.png"
QUESTION = "What shape is this?"
SITES = ["CLIP layer 0, scale 1", "CLIP layer 0, scale 3", "CLIP layer 1, scale 1", "CLIP layer 1, scale 3", "connector"]


@pytest.fixture(scope="module")
def top1_model_dir(tmp_path_factory):
    """CLIP-MoE and MoE connector with one expert per token: each token's one assignment is its top-1."""
    return write_mlx_model(tmp_path_factory.mktemp("tiny-top1"), tiny_config(num_selected=1))


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return cumo_mlx.load(write_mlx_model(tmp_path_factory.mktemp("tiny-mixtral"), tiny_config(llm="mixtral")))


def test_stitch_follows_merge_scales():
    """Pooling the stitched grid's one-hot experts gives what merge_scales makes of the crops' ones."""
    scale, g, experts = 3, 4, 5
    top1 = np.random.default_rng(0).integers(0, experts, size=(scale * scale, g * g))
    one_hot = np.eye(experts, dtype=np.float32)[top1]  # [crops, g*g, E] as crop "features"
    merged = np.asarray(merge_scales(mx.array(one_hot), 1, [scale]))[0].reshape(g, g, experts)
    grid = stitch(top1, scale)
    assert grid.shape == (scale * g, scale * g)
    pooled = np.eye(experts)[grid].reshape(g, scale, g, scale, experts).mean(axis=(1, 3))
    np.testing.assert_allclose(pooled, merged, atol=1e-6)
    assert (stitch(top1[:1], 1) == top1[0].reshape(g, g)).all()


def test_sites_agree_with_experts_statistics(top1_model_dir, tmp_path):
    """Per layer, the grid counts are `cumo-mlx experts` counts on the same image, less the CLS
    token of each of the 1 + 9 crops (the experts command counts them, the grids do not)."""
    (tmp_path / "shapes.png").write_bytes(IMAGE.read_bytes())
    sample = {"id": "0", "image": "shapes.png", "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "A circle."}]}  # fmt: skip
    (tmp_path / "one.json").write_text(json.dumps([sample]))
    routes = tmp_path / "routes.json"
    code, _, stderr = run_cli("experts", "--model", top1_model_dir, "--data", tmp_path / "one.json", "--json", routes)
    assert code == 0, stderr
    stats = {layer["name"]: layer for layer in json.loads(routes.read_text())["layers"]}

    model, processor = cumo_mlx.load(top1_model_dir)
    view = expert_view(model, processor, IMAGE)
    sites = view["sites"]
    assert [s["name"] for s in sites] == SITES
    for s in sites:
        grid = np.array(s["grid"])
        assert grid.shape == ((12, 12) if s.get("scale") == 3 else (4, 4))
        assert s["counts"] == np.bincount(grid.ravel(), minlength=4).tolist()
        assert sum(s["shares"]) == pytest.approx(100.0)
        assert s["shares"] == pytest.approx([100 * c / grid.size for c in s["counts"]])
    assert stats["connector"]["counts"] == sites[-1]["counts"]
    for layer in (0, 1):
        grids = np.sum([s["counts"] for s in sites if s.get("layer") == layer], axis=0)
        cls_tokens = np.array(stats[f"vision.{layer}"]["counts"]) - grids
        assert (cls_tokens >= 0).all() and cls_tokens.sum() == 1 + 9, (layer, cls_tokens)
    assert "vision.2" in stats  # the router-only last layer: counted by `experts`, not an image site


def test_same_features_as_generation(tiny_mlx_model_dir):
    """The routed pass is the encoding generation uses: same features, and the model left in eval mode."""
    model, processor = cumo_mlx.load(tiny_mlx_model_dir)
    pixels = processor.preprocess_images([IMAGE])
    features, sites = image_sites(model, pixels)
    assert not model.vision_tower.training
    np.testing.assert_array_equal(np.asarray(features), np.asarray(model.encode_images(pixels).features))
    assert len(sites) == 5 and all(len(s["shares"]) == 4 for s in sites)


def test_dense_sites_are_left_out(tmp_path):
    model, processor = cumo_mlx.load(write_mlx_model(tmp_path / "dense-clip", tiny_config(clip_smoe=False)))
    assert [s["name"] for s in expert_view(model, processor, IMAGE)["sites"]] == ["connector"]
    model, processor = cumo_mlx.load(write_mlx_model(tmp_path / "dense-connector", tiny_config(connector="mlp2x_gelu")))
    assert all(s["kind"] == "clip" for s in expert_view(model, processor, IMAGE)["sites"])


def test_view_image_and_dense_llm(tiny_mlx_model_dir):
    """The picture is the square the grids cover; a Mistral LLM has no token routes, and says why."""
    model, processor = cumo_mlx.load(tiny_mlx_model_dir)
    view = expert_view(model, processor, Image.new("RGB", (40, 20), (255, 0, 0)), QUESTION, "A square.")
    header, data = view["image"].split(",", 1)
    assert header == "data:image/jpeg;base64"
    picture = Image.open(io.BytesIO(base64.b64decode(data)))
    assert picture.size == (672, 672)
    # padded to a square with the mean colour (the image sits in the middle half of the rows)
    assert picture.getpixel((336, 10))[0] < 200 and picture.getpixel((336, 336))[0] > 230
    assert view["tokens"]["available"] is False and "dense" in view["tokens"]["reason"]


def test_token_routes_are_those_of_decoding(mixtral):
    """Each answer token's experts are the top-1 routing its Mixtral layers choose when generation
    feeds it back in: one token at a time after the prompt, through the KV cache."""
    model, processor = mixtral
    answer = "A red circle and a blue square."
    tokens = expert_view(model, processor, IMAGE, QUESTION, answer)["tokens"]
    assert tokens["available"] and tokens["layers"] == ["LLM layer 0", "LLM layer 1"] and tokens["num_experts"] == 4
    assert "".join(t["text"] for t in tokens["tokens"]) == answer

    prompt_ids, ids = answer_ids(processor, QUESTION, answer, DEFAULT_SYSTEM)
    assert processor.decode(ids) == answer and len(ids) == len(tokens["tokens"])
    features = model.encode_images(processor.preprocess_images([IMAGE])).features
    cache = make_prompt_cache(model.language_model)
    model.language_model.forward(None, cache, model.embed_inputs(prompt_ids, features)[None])
    decoded = []
    for token in ids:
        _, routings = model.language_model.forward(mx.array([[token]]), cache)
        decoded.append([int(mx.argmax(r.logits[0, -1])) for r in routings])
    assert [t["experts"] for t in tokens["tokens"]] == decoded


@pytest.fixture(scope="module")
def routes_port(mixtral):
    backend = BatchBackend(lambda: mixtral).start()
    assert backend.ready.wait(30)
    with serving(backend, ServerConfig("tiny", api_key="key")) as port:
        yield port
    backend.close()


def test_routes_endpoint(routes_port, mixtral):
    key = {"Authorization": "Bearer key"}
    uri = data_uri(Image.open(IMAGE))
    body = {"image": uri, "question": QUESTION, "answer": "A red circle."}
    status, view = post(routes_port, body, key, path="/v1/cumo/routes")
    assert status == 200
    assert view == json.loads(json.dumps(expert_view(*mixtral, IMAGE, QUESTION, "A red circle.")))
    assert [s["name"] for s in view["sites"]][-1] == "connector" and view["tokens"]["available"]
    for site in view["sites"]:
        assert sum(site["shares"]) == pytest.approx(100.0) and site["num_experts"] == 4

    status, view = post(routes_port, {"image_url": {"url": uri}}, key, path="/v1/cumo/routes")  # as in a chat message
    assert status == 200 and "question" in view["tokens"]["reason"]

    for bad, where in (
        ({"image": "data:image/png;base64,AAAA"}, "cannot read"),
        ({"image": uri, "image_url": uri}, "one of them"),
        ({}, "one of them"),
        ({"image": 3}, "image"),
        ({"image": "file:///etc/passwd"}, "local files"),
        ({"image": uri, "question": "<image> and <image>?", "answer": "no"}, "placeholder"),  # raised on the thread
    ):
        status, error = post(routes_port, bad, key, path="/v1/cumo/routes")
        assert status == 400 and where in error["error"]["message"], (bad, error)
    status, error = post(routes_port, body, path="/v1/cumo/routes")
    assert status == 401 and error["error"]["code"] == "invalid_api_key"
