"""`cumo-mlx train`: the CuMo training stages (options generated from `TrainConfig`)."""

import typing
from dataclasses import MISSING, fields

import click
from cumo_mlx.errors import CuMoError
from cumo_mlx.paths import regular_file
from cumo_mlx.prompt import TEMPLATES
from cumo_mlx.train.options import FINE_TUNE_TYPES, STAGES, TrainConfig, check_setting

HELP = {
    "model": "Model directory (MLX layout) or hub id to train from.",
    "data": "LLaVA-format JSON (or JSON Lines) data file.",
    "output": "Output directory: metrics, checkpoints, then the adapters (LoRA) or the trained model.",
    "image_folder": "Folder the samples' image paths are relative to (paths may not leave it).",
    "stage": "pretrain: connector only, plain captions; pft: everything, dense; sft: everything + MoE aux losses.",
    "fine_tune_type": "How the LLM trains: lora (QLoRA on a quantized model) or full.",
    "template": "Prompt template [default: plain for pretrain, mistral_instruct_system otherwise].",
    "freeze_vision": "Keep the vision tower (CLIP) frozen.",
    "freeze_connector": "Keep the connector frozen.",
    "lora_rank": "LoRA rank.",
    "lora_alpha": "LoRA alpha (scale = alpha / rank).",
    "lora_dropout": "Dropout on the LoRA input.",
    "lora_layers": "LoRA on the last N decoder layers (-1: all).",
    "learning_rate": "Peak learning rate [default: 1e-3 pretrain, 2e-6 pft, 4e-6 sft; 2e-4 with LoRA].",
    "vision_learning_rate": "Peak learning rate of the vision tower (LLaVA's mm_vision_tower_lr) [default: --learning-rate].",
    "warmup_ratio": "Share of the steps spent warming the learning rate up (then cosine decay).",
    "weight_decay": "AdamW weight decay.",
    "max_grad_norm": "Clip the gradient norm to this (0: no clipping).",
    "batch_size": "Samples per micro-batch, across all ranks.",
    "grad_accumulation_steps": "Micro-batches per optimizer step.",
    "grad_checkpoint": "Recompute each layer's activations in the backward pass (less memory).",
    "iters": "Optimizer steps to train for (instead of --epochs).",
    "epochs": "Passes over the data [default: 1 when --iters is not given].",
    "seed": "Seed of the data order, the LoRA initialisation and dropout.",
    "max_seq_length": "Truncate sequences (images spliced in) to this many positions [default: 2048 pretrain, 4096].",
    "sort_by_length": "Batch samples of similar length together (less padding); batches still shuffled.",
    "balance_loss_coef": "Weight of the MoE balance losses (sft) [default: the model's, 0.1].",
    "router_z_loss_coef": "Weight of the MoE router-z losses (sft) [default: the model's, 0.01].",
    "save_every": "Write a checkpoint every N steps.",
    "keep_checkpoints": "Keep the last N checkpoints.",
    "resume": "Continue from the latest checkpoint in --output.",
    "strict": "Stop at the first bad sample instead of skipping it.",
    "progress": "Show the progress bar.",
}
CHOICES = {"stage": STAGES, "fine_tune_type": FINE_TUNE_TYPES, "template": TEMPLATES}
ALIASES = {"output": ["--adapter-path"]}
# Config-file keys other tools use for the same settings.
KEY_ALIASES = {"adapter_path": "output", "num_layers": "lora_layers", "image_dir": "image_folder"}


def _param_type(field):
    if field.name in CHOICES:
        return click.Choice(CHOICES[field.name])
    annotation = field.type
    if typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return {int: int, float: float, str: str}[annotation]


def load_config_file(ctx: click.Context, param, value):
    """-c config.yaml: its keys (the option names, mlx-lm style) become the defaults."""
    if value is None:
        return value
    import yaml

    try:
        data = yaml.safe_load(regular_file(value, "config file", 1 << 20).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CuMoError(f"cannot read the config file {value}: {e}", "give a YAML file of option: value lines") from None
    if data is None:
        return value
    if not isinstance(data, dict):
        raise CuMoError(f"{value} must hold a mapping of option names to values", "write option: value lines")
    known = {f.name for f in fields(TrainConfig)}
    defaults, unknown = {}, []
    for key, item in data.items():
        key = KEY_ALIASES.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if key == "lora_parameters" and not isinstance(item, dict):
            raise CuMoError(f"{value}: lora_parameters must be a mapping (rank, alpha, dropout, scale)", "fix the config file")
        if key == "lora_parameters":  # mlx-lm's nested form
            rank = item.get("rank", defaults.get("lora_rank"))
            for sub, target in (("rank", "lora_rank"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
                if sub in item:
                    defaults[target] = item[sub]
            if "scale" in item and "alpha" not in item:
                if rank is None:
                    raise CuMoError(f"{value}: lora_parameters.scale needs lora_parameters.rank", "add rank, or give alpha")
                try:
                    defaults["lora_alpha"] = float(item["scale"]) * float(rank)
                except (TypeError, ValueError):
                    raise CuMoError(f"{value}: lora_parameters.scale and rank must be numbers", "fix the config file") from None
        elif key in known:
            defaults[key] = item
        else:
            unknown.append(str(key))
    if unknown:
        raise CuMoError(f"{value}: unknown setting(s) {', '.join(unknown)}", "use the option names of `cumo-mlx train --help`")
    # Text is parsed as on the command line; anything else must already be of the setting's type
    # (click would truncate 2.5 to an int).
    defaults = {k: v if isinstance(v, str) else check_setting(k, v) for k, v in defaults.items()}
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def training_options(command):
    for field in reversed(fields(TrainConfig)):
        flag = "--" + field.name.replace("_", "-")
        help_text = HELP[field.name]
        if field.type is bool:
            if field.default is True:
                decls = [f"{flag}/--no-{flag[2:]}"]
            else:
                decls = [flag]
            option = click.option(*decls, field.name, is_flag=True, default=None, help=help_text)
        else:
            required = field.default is MISSING
            if not required and field.default is not None and "[default" not in help_text:
                help_text += f" [default: {field.default}]"
            default = {} if required else {"default": None}  # click counts an explicit None as given
            option = click.option(
                flag, *ALIASES.get(field.name, []), field.name, type=_param_type(field), required=required, help=help_text, **default
            )
        command = option(command)
    return click.option(
        "-c", "--config", is_eager=True, expose_value=False, callback=load_config_file,
        type=click.Path(dir_okay=False), help="YAML file of option: value lines (command-line options win).",
    )(command)


@click.command(context_settings={"show_default": False})
@training_options
def train(**options):
    """Train CuMo: connector pretraining, pre-finetuning, or visual instruction tuning (with MoE losses).

    Data parallel over several processes or Macs: mlx.launch --backend ring -n 2 cumo-mlx train ...
    """
    from cumo_mlx.train.trainer import Trainer

    config = TrainConfig(**{k: v for k, v in options.items() if v is not None})
    Trainer(config).run()
