"""`cumo-mlx experts`: route statistics per MoE layer, the heatmap, the JSON, and bad inputs."""

import json

import mlx.core as mx
import numpy as np
import pytest
from cli_util import assert_one_error_line, run_cli
from PIL import Image
from tiny_models import tiny_config, write_mlx_model

import cumo_mlx
from cumo_mlx.plots import colour_of
from cumo_mlx.routes import count_routes, moe_layers
from cumo_mlx.shapes import write_dataset

NUM_IMAGES = 6


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, NUM_IMAGES, seed=1, progress=False)
    return out


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return write_mlx_model(tmp_path_factory.mktemp("tiny-mixtral"), tiny_config(llm="mixtral"))


def run_experts(model_dir, data_dir, tmp_path, *extra):
    out, stats = tmp_path / "heatmap.png", tmp_path / "routes.json"
    code, stdout, stderr = run_cli(
        "experts", "--model", model_dir, "--data", data_dir / "instruct.json", "--image-folder", data_dir,
        "--out", out, "--json", stats, *extra,
    )
    assert code == 0, stderr
    return stdout, out, json.loads(stats.read_text())


def check_heatmap(path, record):
    image = Image.open(path)
    grid = json.loads(image.text["grid"])
    layers = record["layers"]
    assert grid["rows"] == len(layers) and grid["cols"] == max(layer["experts"] for layer in layers)
    assert image.width >= grid["x0"] + grid["cols"] * grid["cell_w"]
    assert image.height >= grid["y0"] + grid["rows"] * grid["cell_h"]
    pixels = image.convert("RGB")
    for r, layer in enumerate(layers):
        for e, share in enumerate(layer["shares"]):
            corner = (grid["x0"] + e * grid["cell_w"] + 2, grid["y0"] + r * grid["cell_h"] + 2)
            expected = colour_of(share / grid["vmax"])
            assert max(abs(a - b) for a, b in zip(pixels.getpixel(corner), expected)) <= 1, (r, e)
    assert json.loads(image.text["stats"])["layers"] == layers


def test_clip_and_connector_shares(tiny_mlx_model_dir, shapes_data, tmp_path):
    stdout, png, record = run_experts(tiny_mlx_model_dir, shapes_data, tmp_path)
    names = [layer["name"] for layer in record["layers"]]
    assert names == ["vision.0", "vision.1", "vision.2", "connector"]
    assert [layer["router_only"] for layer in record["layers"]] == [False, False, True, False]
    config = tiny_config()
    vision = config["vision_config"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    crops = sum(s * s for s in config["scales"])
    k = config["num_selected"]
    for layer in record["layers"]:
        assert abs(sum(layer["shares"]) - 1) < 1e-5
        assert sum(layer["counts"]) == layer["assignments"]
        expected = NUM_IMAGES * patches * k if layer["name"] == "connector" else NUM_IMAGES * crops * (patches + 1) * k
        assert layer["assignments"] == expected, layer["name"]
    assert record["samples"] == NUM_IMAGES
    for name in names:
        assert name in stdout
    check_heatmap(png, record)


def test_mixtral_layers_are_counted(mixtral_dir, shapes_data, tmp_path):
    _, png, record = run_experts(mixtral_dir, shapes_data, tmp_path, "--batch-size", "4")
    names = [layer["name"] for layer in record["layers"]]
    assert names[-2:] == ["llm.0", "llm.1"] and len(names) == 6
    for layer in record["layers"]:
        assert abs(sum(layer["shares"]) - 1) < 1e-5
    check_heatmap(png, record)


def test_counts_match_an_independent_routing_and_outputs_are_unchanged(tiny_mlx_model_dir, shapes_data):
    model, processor = cumo_mlx.load(tiny_mlx_model_dir)
    samples = json.loads((shapes_data / "instruct.json").read_text())
    pixels = processor.preprocess_images([shapes_data / s["image"] for s in samples])
    ids = processor.tokenize("<s>[INST] <image>\nWhat shape is this? [/INST]")
    before = model(ids, pixels[:1])
    stats = count_routes(model, processor, shapes_data / "instruct.json", shapes_data, batch_size=4, progress=False)
    assert not model.vision_tower.training  # back in inference mode
    assert mx.array_equal(model(ids, pixels[:1]), before)
    # the connector's routing, recomputed by hand from the features it receives
    features, _ = model.vision_tower(pixels)
    connector = model.mm_projector
    logits = np.array(connector.gate(features).astype(mx.float32))
    top = np.argsort(-logits, axis=-1)[..., : connector.top_k]
    expected = np.bincount(top.reshape(-1), minlength=connector.num_experts)
    layer = [layer.name for layer in moe_layers(model)].index("connector")
    assert stats.counts[layer].tolist() == expected.tolist()


def test_max_samples_and_table(tiny_mlx_model_dir, shapes_data, tmp_path):
    code, stdout, stderr = run_cli(
        "experts", "--model", tiny_mlx_model_dir, "--data", shapes_data / "pretrain.json", "--max-samples", 2
    )
    assert code == 0, stderr
    assert "2 samples; smallest share" in stdout


def test_bad_inputs_give_one_error_line(tiny_mlx_model_dir, shapes_data, tmp_path):
    base = ["experts", "--model", tiny_mlx_model_dir, "--image-folder", shapes_data]
    (tmp_path / "bad.json").write_text("{ not json")
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00")
    for data in (tmp_path / "missing.json", tmp_path / "bad.json", tmp_path / "binary.json", tmp_path):
        code, _, stderr = run_cli(*base, "--data", data, "--out", tmp_path / "h.png")
        assert_one_error_line(code, stderr)
        assert not (tmp_path / "h.png").exists()
    data = shapes_data / "instruct.json"
    for extra in (["--batch-size", "0"], ["--out", tmp_path / "nowhere" / "h.png"], ["--template", "nope"], ["--image-folder", tmp_path / "none"]):
        code, _, stderr = run_cli(*base, "--data", data, *extra)
        assert_one_error_line(code, stderr)
    code, _, stderr = run_cli("experts", "--model", tmp_path / "no-model", "--data", data)
    assert_one_error_line(code, stderr)


def test_outputs_never_overwrite_the_data_or_an_existing_file_without_force(tiny_mlx_model_dir, shapes_data, tmp_path):
    data = tmp_path / "instruct.json"
    data.write_bytes((shapes_data / "instruct.json").read_bytes())
    before = data.read_bytes()
    base = ["experts", "--model", tiny_mlx_model_dir, "--data", data, "--image-folder", shapes_data, "--max-samples", 2]
    for option in ("--json", "--out"):
        for force in ([], ["--force"]):
            code, _, stderr = run_cli(*base, option, data, *force)
            assert "an input of this command" in assert_one_error_line(code, stderr)
            assert data.read_bytes() == before
    (tmp_path / "routes.json").write_text("earlier\n")
    code, _, stderr = run_cli(*base, "--json", tmp_path / "routes.json")
    assert "already exists" in assert_one_error_line(code, stderr)
    assert (tmp_path / "routes.json").read_text() == "earlier\n"
    code, _, stderr = run_cli(*base, "--json", tmp_path / "routes.json", "--force")
    assert code == 0, stderr
    assert json.loads((tmp_path / "routes.json").read_text())["samples"] == 2


def test_a_model_without_moe_is_refused(tmp_path, shapes_data):
    dense = write_mlx_model(tmp_path / "dense", tiny_config(clip_smoe=False, connector="mlp2x_gelu"))
    code, _, stderr = run_cli("experts", "--model", dense, "--data", shapes_data / "instruct.json")
    assert "no MoE layers" in assert_one_error_line(code, stderr)
