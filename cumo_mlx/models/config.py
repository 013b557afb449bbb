"""CuMo configuration: one dataclass tree read from a checkpoint's config.json.

A CuMo config.json is a Mistral/Mixtral config with multimodal fields on top (`mm_vision_tower`,
`mm_projector_type`, `scales`, `clip_smoe`, `num_experts`, ..., set by the original's
cumo/model/llava_arch.py, LlavaMetaModel.initialize_vision_modules). The vision tower's own config
is not in the original checkpoint: it is read from what `mm_vision_tower` names (a built-in table
or a local directory here; a hub id is downloaded by the converter, through `hub`) and embedded as
`vision_config` when we write an MLX checkpoint, so that a converted model never needs the hub again.
Nothing here touches the network.
"""

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError
from ..paths import regular_file

JSON_MAX_BYTES = 64 << 20  # config.json files are kilobytes; a tokenizer.json tens of megabytes
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Return `value` if it fits `annotation` (ints are accepted as floats), else raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _check_type(name, value, inner[0])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{name}' must be a list, got {value!r}", "fix config.json")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return origin(_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    if annotation is Any:
        return value
    if annotation is dict:
        ok = isinstance(value, dict)
    elif annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, annotation)
    if not ok:
        raise ConfigError(
            f"config field '{name}' must be {getattr(annotation, '__name__', annotation)}, got {value!r}",
            "fix config.json",
        )
    return value


def _check_positive(where: str, **values: int) -> None:
    """Sizes must be at least 1 (0 or negative ones divide by zero or build empty layers later)."""
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{where} field '{name}' must be at least 1, got {value}", "fix config.json")


def from_dict(cls, params: dict, where: str = "config"):
    """Build dataclass `cls` from `params`, type-checking the fields it knows and ignoring the rest."""
    if not isinstance(params, dict):
        raise ConfigError(f"{where} must be a JSON object", "fix config.json")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in params:
            values[f.name] = _check_type(f.name, params[f.name], hints[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where} is missing the field '{f.name}'", "fix config.json")
    return cls(**values)


@dataclass
class VisionConfig:
    """CLIP ViT vision tower and its image processor."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 336
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Image processor: resize the shortest edge (bicubic), centre-crop, rescale, normalise.
    shortest_edge: int = 336
    crop_size: int = 336
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))

    def __post_init__(self):
        _check_positive(
            "the vision config", hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            patch_size=self.patch_size, image_size=self.image_size, num_channels=self.num_channels,
            shortest_edge=self.shortest_edge, crop_size=self.crop_size,
        )  # fmt: skip
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}",
                "fix the vision config",
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}",
                "fix the vision config",
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise ConfigError(
                f"vision image_mean {self.image_mean} and image_std {self.image_std} must be 3 values (RGB), "
                "the std non-zero",
                "fix the vision config",
            )
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"unsupported vision hidden_act '{self.hidden_act}'", "use quick_gelu or gelu")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


# Vision towers known without network access, by hub id.
BUILTIN_VISION_TOWERS = {"openai/clip-vit-large-patch14-336": VisionConfig()}


@dataclass
class TextConfig:
    """The Mistral (dense) or Mixtral (MoE) language model."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int = 32000
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_traditional: bool = False
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 32768
    sliding_window: Optional[int] = None
    tie_word_embeddings: bool = False
    # Mixtral only
    num_local_experts: Optional[int] = None
    num_experts_per_tok: Optional[int] = None

    def __post_init__(self):
        _check_positive(
            "the language model config", hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings,
        )  # fmt: skip
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive("the language model config", num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}",
                "fix config.json",
            )

    @property
    def is_moe(self) -> bool:
        return bool(self.num_local_experts)


MODEL_TYPES = {"llava_mistral": False, "llava_mixtral": True}  # model_type -> LLM is MoE
CONNECTOR_TYPES = ("mlp2x_gelu", "smoe_mlp")


@dataclass
class ModelArgs:
    """A whole CuMo model: vision tower, connector and language model."""

    model_type: str
    text_config: TextConfig
    vision_config: VisionConfig
    mm_vision_tower: str = "openai/clip-vit-large-patch14-336"
    mm_projector_type: str = "smoe_mlp"
    mm_hidden_size: int = 1024
    scales: list[int] = field(default_factory=lambda: [1, 3])
    clip_smoe: bool = True
    num_experts: int = 4
    num_selected: int = 2
    image_aspect_ratio: str = "pad"
    balance_loss_coef: float = 0.1
    router_z_loss_coef: float = 0.01
    tokenizer_model_max_length: Optional[int] = None
    quantization: Optional[dict] = None

    def __post_init__(self):
        _check_model_args(self)

    @property
    def connector_is_moe(self) -> bool:
        return self.mm_projector_type == "smoe_mlp"

    @property
    def image_tokens(self) -> int:
        """LLM positions taken by one image."""
        return self.vision_config.num_patches

    @classmethod
    def from_dict(cls, params: dict, base_dir: Optional[Path] = None) -> "ModelArgs":
        """Read a CuMo config (the original flat layout, with or without an embedded vision_config)."""
        if not isinstance(params, dict):
            raise ConfigError("config.json must hold a JSON object", "fix config.json")
        text_params = params.get("text_config") or params
        if not isinstance(text_params, dict):
            raise ConfigError("text_config must be a JSON object", "fix config.json")
        text_params = dict(text_params)
        vision_config = _vision_config(params, base_dir)
        top = {k: v for k, v in params.items() if k not in ("text_config", "vision_config")}
        top["text_config"] = from_dict(TextConfig, text_params, "the language model config")
        top["vision_config"] = vision_config
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in top and f.name not in ("text_config", "vision_config"):
                top[f.name] = _check_type(f.name, top[f.name], hints[f.name])
            elif f.name not in top and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"config.json is missing the field '{f.name}'", "fix config.json")
        return cls(**{f.name: top[f.name] for f in dataclasses.fields(cls) if f.name in top})

    def to_dict(self) -> dict:
        """The config.json of an MLX checkpoint: the original flat layout plus `vision_config`."""
        out = dataclasses.asdict(self)
        text = out.pop("text_config")
        out["vision_config"] = out.pop("vision_config")
        if out["quantization"] is None:
            del out["quantization"]
        out.update(text)
        out["architectures"] = ["LlavaMixtralForCausalLM" if self.text_config.is_moe else "LlavaMistralForCausalLM"]
        out["mm_use_im_start_end"] = False
        out["mm_use_im_patch_token"] = False
        out["mm_vision_select_layer"] = -2
        out["mm_vision_select_feature"] = "patch"
        out["mm_patch_merge_type"] = "flat"
        out["mlp_smoe"] = self.connector_is_moe
        return out


def _check_model_args(args: ModelArgs) -> None:
    """The checks that span fields: model type against the LLM, connector, scales, widths, MoE sizes."""
    if args.model_type not in MODEL_TYPES:
        raise ConfigError(f"unknown model_type '{args.model_type}'", f"expected one of {', '.join(MODEL_TYPES)}")
    if MODEL_TYPES[args.model_type] != args.text_config.is_moe:
        raise ConfigError(
            f"model_type '{args.model_type}' does not match the LLM fields "
            f"(num_local_experts={args.text_config.num_local_experts})",
            "fix config.json",
        )
    if args.mm_projector_type not in CONNECTOR_TYPES:
        raise ConfigError(
            f"unsupported mm_projector_type '{args.mm_projector_type}'",
            f"expected one of {', '.join(CONNECTOR_TYPES)}",
        )
    if not args.scales or any(s < 1 for s in args.scales) or args.scales[0] != 1:
        raise ConfigError(f"scales must be positive integers starting with 1, got {args.scales}", "fix config.json")
    if args.mm_hidden_size != args.vision_config.hidden_size:
        raise ConfigError(
            f"mm_hidden_size {args.mm_hidden_size} differs from the vision tower width "
            f"{args.vision_config.hidden_size}",
            "check mm_vision_tower",
        )
    if args.image_aspect_ratio not in ("pad", "square"):
        raise ConfigError(f"unsupported image_aspect_ratio '{args.image_aspect_ratio}'", "use pad or square")
    if args.quantization is not None and not all(
        type(args.quantization.get(key)) is int and args.quantization[key] > 0 for key in ("group_size", "bits")
    ):
        raise ConfigError(f"quantization {args.quantization} lacks a positive group_size or bits", "fix config.json")
    has_moe = args.clip_smoe or args.mm_projector_type == "smoe_mlp"
    if has_moe and not 1 <= args.num_selected <= args.num_experts:
        raise ConfigError(
            f"num_selected {args.num_selected} must be between 1 and num_experts {args.num_experts}",
            "fix config.json",
        )


def _vision_config(params: dict, base_dir: Optional[Path]) -> VisionConfig:
    """The embedded `vision_config`, else the config of the tower `mm_vision_tower` names."""
    if params.get("vision_config") is not None:
        return from_dict(VisionConfig, params["vision_config"], "vision_config")
    tower = params.get("mm_vision_tower")
    tower = _check_type("mm_vision_tower", tower, str) if tower is not None else ModelArgs.mm_vision_tower
    vision_config = local_vision_config(tower, base_dir)
    if vision_config is None:
        raise ConfigError(
            f"mm_vision_tower '{tower}' is neither a known tower nor a local directory",
            "set --vision-tower to a CLIP directory or hub id",
        )
    return vision_config


def load_config(model_dir: Path) -> dict:
    """The parsed config.json of a model directory, with clear errors for every way it can be bad."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {model_dir}", "point at a CuMo model directory")
    try:
        config = json.loads(regular_file(path, "config.json", JSON_MAX_BYTES, ConfigError).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}", "fix or re-create the file") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply to be a config", "fix or re-create the file") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}", "check the path and its permissions") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object", "fix or re-create the file")
    return config


def vision_config_from_hf(config: dict, preprocessor: Optional[dict]) -> VisionConfig:
    """A VisionConfig from a transformers CLIP config.json (+ preprocessor_config.json, if any)."""
    config = config.get("vision_config", config)  # a full CLIPConfig nests it
    if not isinstance(config, dict):
        raise ConfigError("the vision tower's vision_config must be a JSON object", "fix the vision tower directory")
    values = {f.name: config[f.name] for f in dataclasses.fields(VisionConfig) if f.name in config}
    values.setdefault("shortest_edge", values.get("image_size", VisionConfig.image_size))
    values.setdefault("crop_size", values.get("image_size", VisionConfig.image_size))
    if preprocessor:
        size = preprocessor.get("size")
        crop = preprocessor.get("crop_size")
        if isinstance(size, dict):
            size = size.get("shortest_edge", size.get("height"))
        if isinstance(crop, dict):
            crop = crop.get("height")
        for name, value in (("shortest_edge", size), ("crop_size", crop)):
            if value is not None:
                values[name] = value
        for name in ("image_mean", "image_std"):
            if name in preprocessor:
                values[name] = preprocessor[name]
    return from_dict(VisionConfig, values, "the vision tower config")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(regular_file(path, path.name, JSON_MAX_BYTES, ConfigError).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError, RecursionError) as e:
        raise ConfigError(f"cannot read {path}: {e}", "fix the vision tower directory") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object", "fix the vision tower directory")
    return data


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name longer than paths may be
        return False


def read_vision_tower(directory: Path) -> VisionConfig:
    """The VisionConfig of a CLIP directory: its config.json and preprocessor_config.json (if any)."""
    pre = directory / "preprocessor_config.json"
    return vision_config_from_hf(_read_json(directory / "config.json"), _read_json(pre) if pre.is_file() else None)


def local_vision_config(tower: str, base_dir: Optional[Path] = None) -> Optional[VisionConfig]:
    """Vision config for `mm_vision_tower` without the network: the built-in table, else a local
    directory (relative to `base_dir` first, then to the working directory); None for neither."""
    if tower in BUILTIN_VISION_TOWERS:
        return dataclasses.replace(BUILTIN_VISION_TOWERS[tower])
    candidates = [Path(os.path.expanduser(tower))]  # (Path.expanduser raises for "~nobody")
    if base_dir is not None and not os.path.isabs(tower):
        candidates.insert(0, Path(base_dir) / tower)
    for directory in candidates:
        if _is_file(directory / "config.json"):
            return read_vision_tower(directory)
    return None
