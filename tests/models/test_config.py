"""`cumo_mlx.models.config`: reading CuMo config.json files and resolving the vision tower.

- both model types, both connectors, CLIP-MoE on and off -> the right modules;
- the vision tower config from the built-in table, a local directory (absolute, or relative to
  the checkpoint directory), and a hub id while offline (through the converter's read_args ->
  ConfigError with a clear message);
- the stored `training` flag has no effect;
- wrong types, missing fields, unknown values -> ConfigError naming the field.
"""

import dataclasses
import json
from pathlib import Path

import huggingface_hub.constants
import pytest
from cumo_mlx.convert.convert import read_args
from cumo_mlx.errors import ConfigError
from cumo_mlx.models.config import (
    CLIP_MEAN,
    ModelArgs,
    TextConfig,
    VisionConfig,
    load_config,
    local_vision_config,
)
from cumo_mlx.models.model import Model
from cumo_mlx.models.moe import MLP, SparseMoE
from cumo_mlx.models.vision import ClipVisionModel
from tiny_models import TINY_VISION, tiny_config

CLIP_L = "openai/clip-vit-large-patch14-336"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, and an empty hub cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def original_config(**kwargs) -> dict:
    """A config.json as the original checkpoints ship it: no vision_config."""
    return tiny_config(embed_vision=False, **kwargs)


@pytest.mark.parametrize("connector", ["mlp2x_gelu", "smoe_mlp"])
@pytest.mark.parametrize("clip_smoe", [True, False])
@pytest.mark.parametrize("llm", ["mistral", "mixtral"])
def test_variants_build_the_right_modules(llm, clip_smoe, connector):
    args = ModelArgs.from_dict(tiny_config(llm=llm, clip_smoe=clip_smoe, connector=connector))
    assert args.model_type == f"llava_{llm}"
    assert args.text_config.is_moe == (llm == "mixtral")
    assert args.clip_smoe == clip_smoe
    assert args.connector_is_moe == (connector == "smoe_mlp")
    assert args.scales == [1, 3] and args.num_experts == 4 and args.num_selected == 2
    assert args.image_tokens == (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2
    model = Model(args)
    clip = model.vision_tower.vision_model
    assert isinstance(clip, ClipVisionModel)
    for layer in clip.encoder.layers:
        assert isinstance(layer.mlp, SparseMoE if clip_smoe else MLP)
        if clip_smoe:
            assert layer.mlp.num_experts == 4 and layer.mlp.top_k == 2
    assert isinstance(model.mm_projector, SparseMoE if connector == "smoe_mlp" else MLP)
    for layer in model.language_model.layers:
        assert ("block_sparse_moe" in layer) == (llm == "mixtral")
        assert ("mlp" in layer) == (llm == "mistral")


def test_round_trip_through_to_dict():
    for llm in ("mistral", "mixtral"):
        args = ModelArgs.from_dict(tiny_config(llm=llm))
        again = ModelArgs.from_dict(json.loads(json.dumps(args.to_dict())))
        assert again == args


def test_nested_text_config_is_read():
    flat = tiny_config(llm="mixtral")
    text = {f.name: flat[f.name] for f in dataclasses.fields(TextConfig) if f.name in flat}
    nested = {k: v for k, v in flat.items() if k not in text}
    nested["text_config"] = text
    assert ModelArgs.from_dict(nested) == ModelArgs.from_dict(flat)


# ------------------------------------------------------------------------------------------------
# vision tower resolution
# ------------------------------------------------------------------------------------------------


def test_builtin_clip_l_336(offline):
    config = original_config()
    config.update(mm_vision_tower=CLIP_L, mm_hidden_size=1024)
    vision = ModelArgs.from_dict(config).vision_config
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers) == (1024, 4096, 24)
    assert (vision.num_attention_heads, vision.patch_size, vision.image_size) == (16, 14, 336)
    assert vision.hidden_act == "quick_gelu" and vision.layer_norm_eps == 1e-5
    assert vision.shortest_edge == 336 and vision.crop_size == 336
    assert tuple(vision.image_mean) == CLIP_MEAN
    assert vision.num_patches == 576
    # the table's entry is not shared
    vision.image_size = 1
    assert local_vision_config(CLIP_L).image_size == 336


def write_clip_dir(directory: Path, nested: bool = False, processor: str = "dict") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    vision = {k: v for k, v in TINY_VISION.items() if k not in ("shortest_edge", "crop_size")}
    vision["model_type"] = "clip_vision_model"
    vision["projection_dim"] = 16
    config = {"model_type": "clip", "vision_config": vision, "text_config": {"hidden_size": 8}} if nested else vision
    (directory / "config.json").write_text(json.dumps(config))
    if processor == "dict":
        pre = {"size": {"shortest_edge": 18}, "crop_size": {"height": 16, "width": 16}}
    elif processor == "int":
        pre = {"size": 18, "crop_size": 16}
    else:
        return directory
    pre.update(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], do_center_crop=True)
    (directory / "preprocessor_config.json").write_text(json.dumps(pre))
    return directory


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("processor", ["dict", "int", "none"])
def test_local_directory_absolute(tmp_path, offline, nested, processor):
    clip_dir = write_clip_dir(tmp_path / "my-clip", nested, processor)
    config = original_config()
    config["mm_vision_tower"] = str(clip_dir.resolve())
    vision = ModelArgs.from_dict(config).vision_config
    assert vision.hidden_size == TINY_VISION["hidden_size"]
    assert vision.num_hidden_layers == TINY_VISION["num_hidden_layers"]
    assert vision.image_size == 16 and vision.patch_size == 4
    if processor == "none":
        assert (vision.shortest_edge, vision.crop_size) == (16, 16)
        assert tuple(vision.image_mean) == CLIP_MEAN
    else:
        assert (vision.shortest_edge, vision.crop_size) == (18, 16)
        assert vision.image_mean == [0.5, 0.5, 0.5] and vision.image_std == [0.25, 0.25, 0.25]


def test_local_directory_relative_to_checkpoint(tmp_path, offline, monkeypatch):
    checkpoint = tmp_path / "checkpoint"
    write_clip_dir(checkpoint / "towers" / "clip")
    config = original_config()
    config["mm_vision_tower"] = "towers/clip"
    (checkpoint / "config.json").write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not relative to the working directory
    vision = ModelArgs.from_dict(load_config(checkpoint), checkpoint).vision_config
    assert vision.hidden_size == TINY_VISION["hidden_size"] and vision.shortest_edge == 18
    # without the checkpoint directory the relative path means nothing here
    with pytest.raises(ConfigError):
        ModelArgs.from_dict(load_config(checkpoint))


def test_local_directory_relative_to_working_directory(tmp_path, offline, monkeypatch):
    write_clip_dir(tmp_path / "clip")
    monkeypatch.chdir(tmp_path)
    config = original_config()
    config["mm_vision_tower"] = "clip"
    assert ModelArgs.from_dict(config, tmp_path / "somewhere-else").vision_config.hidden_size == TINY_VISION["hidden_size"]


def test_hub_id_offline_is_a_clear_config_error(offline):
    config = original_config()
    config["mm_vision_tower"] = "example-org/clip-vit-tiny"
    with pytest.raises(ConfigError) as error:
        read_args(config)  # (the converter's: ModelArgs reads no network)
    message = str(error.value)
    assert "example-org/clip-vit-tiny" in message
    assert "--vision-tower" in message and "offline" in message.lower()


def test_unusable_tower_name_is_a_config_error(offline):
    config = original_config()
    config["mm_vision_tower"] = "not/a/directory/or/hub/id"
    with pytest.raises(ConfigError, match="not/a/directory/or/hub/id"):
        ModelArgs.from_dict(config)


def test_bad_tower_directory_is_a_config_error(tmp_path, offline):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{not json")
    config = original_config()
    config["mm_vision_tower"] = str(tmp_path / "clip")
    with pytest.raises(ConfigError, match="config.json"):
        ModelArgs.from_dict(config)


def test_embedded_vision_config_wins(offline):
    config = tiny_config()
    config["mm_vision_tower"] = "example-org/unreachable"  # never looked up
    assert ModelArgs.from_dict(config).vision_config == VisionConfig(**TINY_VISION)


# ------------------------------------------------------------------------------------------------
# the training flag, and errors
# ------------------------------------------------------------------------------------------------


def test_training_flag_is_ignored():
    on, off, absent = tiny_config(), tiny_config(), tiny_config()
    on["training"], off["training"] = True, False
    del absent["training"]
    assert ModelArgs.from_dict(on) == ModelArgs.from_dict(off) == ModelArgs.from_dict(absent)
    assert "training" not in ModelArgs.from_dict(on).to_dict()


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_size", "64"),
        ("num_hidden_layers", 2.5),
        ("rope_theta", "1e6"),
        ("vocab_size", True),
        ("scales", "1,3"),
        ("scales", [1, "3"]),
        ("clip_smoe", "yes"),
        ("num_experts", 4.0),
        ("num_selected", None),
        ("mm_hidden_size", [32]),
        ("mm_projector_type", 2),
        ("mm_vision_tower", 7),
        ("balance_loss_coef", "0.1"),
    ],
)
def test_wrong_types_name_the_field(field, value):
    config = tiny_config()
    config[field] = value
    with pytest.raises(ConfigError, match=field):
        ModelArgs.from_dict(config)


@pytest.mark.parametrize("field,value", [("hidden_size", "32"), ("num_hidden_layers", None), ("image_mean", 0.5)])
def test_wrong_vision_config_types_name_the_field(field, value):
    config = tiny_config()
    config["vision_config"][field] = value
    with pytest.raises(ConfigError, match=field):
        ModelArgs.from_dict(config)


@pytest.mark.parametrize("field", ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"])
def test_missing_fields_are_named(field):
    config = tiny_config()
    del config[field]
    with pytest.raises(ConfigError, match=field):
        ModelArgs.from_dict(config)


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"model_type": "llava_llama"}, "model_type"),
        ({"model_type": "llava_mixtral"}, "model_type"),  # no num_local_experts
        ({"mm_projector_type": "linear"}, "mm_projector_type"),
        ({"scales": [2, 3]}, "scales"),
        ({"scales": []}, "scales"),
        ({"num_selected": 5}, "num_selected"),
        ({"num_selected": 0}, "num_selected"),
        ({"mm_hidden_size": 48}, "mm_hidden_size"),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio"),
    ],
)
def test_bad_values_name_the_field(changes, field):
    config = tiny_config()
    config.update(changes)
    with pytest.raises(ConfigError, match=field):
        ModelArgs.from_dict(config)


def test_bad_vision_values():
    for changes in ({"hidden_size": 30}, {"image_size": 18}, {"hidden_act": "relu"}):
        config = tiny_config()
        config["vision_config"].update(changes)
        with pytest.raises(ConfigError):
            ModelArgs.from_dict(config)


def test_not_an_object():
    with pytest.raises(ConfigError):
        ModelArgs.from_dict([1, 2])


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
