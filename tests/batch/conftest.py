"""Tiny models (dense Mistral and MoE Mixtral LLMs, float and 4-bit) and images for the batch tests."""

import cumo_mlx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image
from tiny_models import tiny_config, write_mlx_model


def quantized(model):
    """The model with its LLM quantized as mlx-lm quantizes (4-bit, groups of 32), in place."""
    in_llm = lambda path, module: path.startswith("language_model") and hasattr(module, "to_quantized")  # noqa: E731
    nn.quantize(model, group_size=32, bits=4, class_predicate=in_llm)
    return model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    return {llm: write_mlx_model(tmp_path_factory.mktemp(llm), tiny_config(llm=llm)) for llm in ("mistral", "mixtral")}


@pytest.fixture(scope="session")
def models(model_dirs):
    """(model, processor) by name: mistral, mixtral, and their 4-bit forms."""
    loaded = {}
    for llm, directory in model_dirs.items():
        loaded[llm] = cumo_mlx.load(directory)
        model, processor = cumo_mlx.load(directory)
        loaded[f"{llm}-4bit"] = (quantized(model), processor)
    return loaded


@pytest.fixture(scope="session")
def mistral(models):
    return models["mistral"]


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Three image files of different sizes and shapes."""
    directory = tmp_path_factory.mktemp("batch-images")
    rng = np.random.default_rng(0)
    paths = []
    for name, shape in (("wide.png", (20, 34, 3)), ("tall.jpg", (40, 24, 3)), ("square.png", (16, 16, 3))):
        paths.append(directory / name)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(paths[-1])
    return paths


def single_tokens(loaded, prompt, images=None, **options) -> tuple[list[int], str, str]:
    """Greedy tokens (without `</s>`), text and finish reason of `prompt` generated alone."""
    responses = list(cumo_mlx.stream_generate(*loaded, prompt, images, temp=0.0, **options))
    tokens = [r.token for r in responses if r.finish_reason != "stop"]
    return tokens, "".join(r.text for r in responses), responses[-1].finish_reason


@pytest.fixture(scope="session")
def alone():
    return single_tokens
