"""The settings of a training run (`cumo-mlx train`'s options), without importing MLX."""

import math
import os
import typing
from dataclasses import asdict, dataclass, fields
from typing import Optional

from ..errors import CuMoError
from ..prompt import TEMPLATES

STAGES = ("pretrain", "pft", "sft")
FINE_TUNE_TYPES = ("lora", "full")
STAGE_TEMPLATE = {"pretrain": "plain", "pft": "mistral_instruct_system", "sft": "mistral_instruct_system"}
# The recipe's learning rates for full fine-tuning (SHI-Labs/CuMo: scripts/cumo/mistral_7b/*.sh);
# LLaVA's for LoRA.
DEFAULT_LR = {"pretrain": 1e-3, "pft": 2e-6, "sft": 4e-6, "lora": 2e-4}
DEFAULT_MAX_LENGTH = {"pretrain": 2048, "pft": 4096, "sft": 4096}
MAX_SEED = 2**32 - 1  # numpy's legacy seeding and most tools take 32-bit seeds


def check_setting(name: str, value):
    """`value` as setting `name` of TrainConfig takes it (an int given for a float becomes a float);
    a CuMoError naming the setting when its type is wrong. The command line and the config file
    both pass through here, so that 2.5 is never truncated to an int nor a list taken for a number."""
    kind = {f.name: f.type for f in fields(TrainConfig)}[name]
    if typing.get_origin(kind) is typing.Union:
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    flag = "--" + name.replace("_", "-")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, (str, os.PathLike)),
    }[kind]
    if not ok:
        wanted = {bool: "true or false", int: "a whole number", float: "a number", str: "a text"}[kind]
        raise CuMoError(f"{flag} must be {wanted}, not {value!r}", "fix the option")
    return float(value) if kind is float else os.fspath(value) if kind is str else value


@dataclass
class TrainConfig:
    model: str
    data: str
    output: str
    image_folder: Optional[str] = None
    stage: str = "sft"
    fine_tune_type: str = "lora"
    template: Optional[str] = None  # default: the stage's
    freeze_vision: bool = False
    freeze_connector: bool = False
    lora_rank: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_layers: int = -1  # the last N decoder layers; -1: all
    learning_rate: Optional[float] = None  # default: DEFAULT_LR
    vision_learning_rate: Optional[float] = None  # default: learning_rate
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    batch_size: int = 4
    grad_accumulation_steps: int = 1
    grad_checkpoint: bool = False
    iters: Optional[int] = None
    epochs: Optional[float] = None  # default 1 when iters is not given
    seed: int = 0
    max_seq_length: Optional[int] = None  # default: DEFAULT_MAX_LENGTH
    sort_by_length: bool = False
    balance_loss_coef: Optional[float] = None  # default: the model config's (0.1)
    router_z_loss_coef: Optional[float] = None  # default: the model config's (0.01)
    save_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False
    strict: bool = False
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        """A copy with every default filled in, checked."""
        c = TrainConfig(**{k: check_setting(k, v) for k, v in asdict(self).items()})
        if c.stage not in STAGES:
            raise CuMoError(f"unknown stage {c.stage!r}", f"use one of {', '.join(STAGES)}")
        if c.fine_tune_type not in FINE_TUNE_TYPES:
            raise CuMoError(f"unknown fine-tune type {c.fine_tune_type!r}", f"use one of {', '.join(FINE_TUNE_TYPES)}")
        c.template = c.template or STAGE_TEMPLATE[c.stage]
        if c.template not in TEMPLATES:
            raise CuMoError(f"unknown template {c.template!r}", f"use one of {', '.join(TEMPLATES)}")
        if c.learning_rate is None:
            uses_lora = c.fine_tune_type == "lora" and c.stage != "pretrain"
            c.learning_rate = DEFAULT_LR["lora" if uses_lora else c.stage]
        if c.vision_learning_rate is None:
            c.vision_learning_rate = c.learning_rate
        if c.max_seq_length is None:
            c.max_seq_length = DEFAULT_MAX_LENGTH[c.stage]
        if c.iters is not None and c.epochs is not None:
            raise CuMoError("--iters and --epochs both given", "give one of them")
        if c.iters is None and c.epochs is None:
            c.epochs = 1.0
        checks = [
            (c.iters is None or c.iters >= 1, "--iters must be at least 1"),
            (c.epochs is None or 0 < c.epochs < math.inf, "--epochs must be positive and finite"),
            (0 <= c.seed <= MAX_SEED, f"--seed must be in [0, {MAX_SEED}]"),
            (c.batch_size >= 1, "--batch-size must be at least 1"),
            (c.grad_accumulation_steps >= 1, "--grad-accumulation-steps must be at least 1"),
            (c.learning_rate >= 0 and math.isfinite(c.learning_rate), "--learning-rate must be a non-negative number"),
            (c.vision_learning_rate >= 0 and math.isfinite(c.vision_learning_rate), "--vision-learning-rate must be a non-negative number"),
            (0 <= c.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (0 <= c.weight_decay < math.inf, "--weight-decay must be non-negative and finite"),
            (0 <= c.max_grad_norm < math.inf, "--max-grad-norm must be non-negative and finite"),
            (c.lora_rank >= 1, "--lora-rank must be at least 1"),
            (math.isfinite(c.lora_alpha), "--lora-alpha must be a finite number"),
            (c.balance_loss_coef is None or 0 <= c.balance_loss_coef < math.inf, "--balance-loss-coef must be non-negative and finite"),
            (c.router_z_loss_coef is None or 0 <= c.router_z_loss_coef < math.inf, "--router-z-loss-coef must be non-negative and finite"),
            (0 <= c.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
            (c.lora_layers == -1 or c.lora_layers >= 1, "--lora-layers must be positive, or -1 for all"),
            (c.max_seq_length >= 2, "--max-seq-length must be at least 2"),
            (c.save_every >= 1, "--save-every must be at least 1"),
            (c.keep_checkpoints >= 1, "--keep-checkpoints must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise CuMoError(message, "fix the option")
        return c
