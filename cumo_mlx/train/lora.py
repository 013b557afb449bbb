"""LoRA / QLoRA on the language model (mlx-lm's layers), adapter files, and fusing.

mlx-lm's `linear_to_lora_layers` wraps every Linear / QuantizedLinear (attention, dense MLP,
Mixtral router) and every SwitchLinear / QuantizedSwitchLinear (stacked Mixtral experts) of the
chosen decoder layers; a quantized base makes it QLoRA. `scale` = alpha / rank, as in PEFT.

An adapter directory holds `adapter_config.json` (mlx-lm's keys: fine_tune_type, num_layers,
lora_parameters; plus what the run trained) and `adapters.safetensors`: the LoRA matrices and the
full weights of whatever else trained (the vision tower, the connector).
"""

import json
from collections import Counter
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import dequantize_model

from ..errors import CheckpointError, CuMoError
from ..models.model import Model
from ..staging import staged_directory

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"
QUANTIZED = (nn.QuantizedLinear, QuantizedSwitchLinear, nn.QuantizedEmbedding)


def lora_parameters(rank: int, alpha: float, dropout: float) -> dict:
    return {"rank": rank, "alpha": alpha, "scale": alpha / rank, "dropout": dropout}


def apply_lora(model: Model, num_layers: int, parameters: dict) -> None:
    """LoRA layers on the last `num_layers` decoder layers of the LLM (all of them for -1)."""
    total = len(model.language_model.layers)
    linear_to_lora_layers(model.language_model, total if num_layers < 0 else min(num_layers, total), parameters)


def is_quantized(module: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED) for _, m in module.named_modules())


class _Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer


def dequantize_layer(layer: nn.Module) -> nn.Module:
    """The float version of one quantized layer (mlx-lm's dequantize_model walks children only)."""
    holder = _Holder(layer)
    dequantize_model(holder)
    return holder.layer


def sync_quantization(model: Model) -> None:
    """Make the config's `quantization` say what the model holds: none once no quantized layer is
    left; a layer with its own entry (the vision side of `convert -q`) that is float now, false."""
    quantization = model.args.quantization
    if quantization and not is_quantized(model):
        model.args.quantization = None
    elif quantization:
        modules = dict(model.named_modules())
        for path, entry in quantization.items():
            if isinstance(entry, dict) and not isinstance(modules.get(path), QUANTIZED):
                quantization[path] = False


def stored_dtype(model_path: Path) -> Optional[str]:
    """The most common floating dtype of a model directory's weights (read lazily), e.g. "bfloat16"."""
    counts = Counter()
    for file in Path(model_path).glob("model*.safetensors"):
        try:
            values = mx.load(str(file)).values()
        except Exception as e:  # empty, truncated, not safetensors
            raise CheckpointError(f"cannot load the weights in {model_path}: {e}", "re-convert or re-download the model") from None
        for value in values:
            if mx.issubdtype(value.dtype, mx.floating):
                counts[value.dtype] += value.size
    if not counts:
        return None
    return str(counts.most_common(1)[0][0]).split(".")[-1]


def save_adapters(path: Path, weights: dict, config: dict) -> None:
    """Write the adapter files into `path` (kept: its other files), all staged first and the config
    moved in last, so a failure leaves the previous adapters as they were."""
    path = Path(path)
    try:
        with staged_directory(path, merge=True, last=ADAPTER_CONFIG) as staged:
            mx.save_safetensors(str(staged / ADAPTER_WEIGHTS), weights, metadata={"format": "mlx"})
            (staged / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    except (OSError, RuntimeError) as e:  # a full disk; MLX reports a failed write as a RuntimeError
        raise CuMoError(
            f"cannot write the adapters to {path}: {e}", f"check the free space and permissions; {path} is unchanged"
        ) from None


def read_adapter_config(adapter_path: Path) -> dict:
    adapter_path = Path(adapter_path)
    config_file = adapter_path / ADAPTER_CONFIG
    if not config_file.is_file() or not (adapter_path / ADAPTER_WEIGHTS).is_file():
        hint = "it is a full model directory: load it directly" if (adapter_path / "config.json").is_file() else ""
        raise CheckpointError(
            f"no {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} in {adapter_path}",
            hint or "give the --output directory of a `cumo-mlx train` run with --fine-tune-type lora",
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"cannot read {config_file}: {e}", "re-run the training or fix the file") from None
    lora = config.get("lora_parameters") if isinstance(config, dict) else None
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not isinstance(config, dict) or (
        config.get("fine_tune_type", "lora") == "lora"
        and not (
            isinstance(lora, dict)
            and type(lora.get("rank")) is int
            and lora["rank"] >= 1
            and all(number(lora.get(key)) for key in ("scale", "dropout"))
            and type(config.get("num_layers", -1)) is int
        )
    ):
        raise CheckpointError(
            f"{config_file} does not describe LoRA adapters (a JSON object with num_layers and "
            "lora_parameters: rank, scale, dropout)",
            "re-run the training or fix the file",
        )
    return config


def load_adapters(model: Model, adapter_path: Path) -> Model:
    """Apply an adapter directory to `model`: LoRA layers, then the trained weights."""
    adapter_path = Path(adapter_path)
    config = read_adapter_config(adapter_path)
    if config.get("fine_tune_type", "lora") == "lora":
        apply_lora(model, config.get("num_layers", -1), config["lora_parameters"])
    try:
        weights = mx.load(str(adapter_path / ADAPTER_WEIGHTS))
    except Exception as e:
        raise CheckpointError(f"cannot read {adapter_path / ADAPTER_WEIGHTS}: {e}", "re-run the training") from None
    # Layers that trained in full replace quantized ones of the base: make those float first.
    modules = dict(model.named_modules())
    owners = {name.rsplit(".", 1)[0] for name in weights if not name.endswith((".lora_a", ".lora_b"))}
    dequantized = [(path, dequantize_layer(modules[path])) for path in owners if isinstance(modules.get(path), QUANTIZED)]
    if dequantized:
        model.update_modules(tree_unflatten(dequantized))
    params = dict(tree_flatten(model.parameters()))
    errors = [
        f"{name} {tuple(w.shape)}" + ("" if name not in params else f" (model has {tuple(params[name].shape)})")
        for name, w in weights.items()
        if name not in params or params[name].shape != w.shape
    ]
    if errors:
        raise CheckpointError(
            f"the adapters in {adapter_path} do not fit this model: {', '.join(errors[:5])}"
            + (f" and {len(errors) - 5} more" if len(errors) > 5 else ""),
            f"use the base model they were trained on ({config.get('base_model', 'see adapter_config.json')})",
        )
    model.load_weights(list(weights.items()), strict=False)
    sync_quantization(model)
    return model


def fuse(model: Model, dequantize_all: bool = False) -> Model:
    """Merge every LoRA layer into its base layer; optionally dequantize the whole model."""
    fused = [(name, m.fuse(dequantize=dequantize_all)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize_all:
        dequantize_model(model)
    sync_quantization(model)
    return model
