"""The optimizer and the learning-rate schedule of training, as the original trains
(SHI-Labs/CuMo: cumo/train/train.py through transformers' Trainer, with the settings of
scripts/cumo/*/*.sh): torch's AdamW, linear warmup then cosine decay, gradient clipping.

The vision tower has its own AdamW, so that it can train at its own peak rate (LLaVA's
`mm_vision_tower_lr`); both rates follow the same schedule and are set before every update.
"""

import math

import mlx.optimizers as optim


def adamw(learning_rate, weight_decay: float = 0.0) -> optim.AdamW:
    """torch's AdamW: betas (0.9, 0.999), eps 1e-8, bias-corrected. MLX's AdamW skips the bias
    correction by default, which makes the first few hundred updates up to ~3x larger; a model that
    trains from scratch (the demo) then learns far more slowly."""
    return optim.AdamW(learning_rate, betas=[0.9, 0.999], eps=1e-8, weight_decay=weight_decay, bias_correction=True)


def cosine_lr(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """transformers' cosine schedule with linear warmup: the rate of update number `step` (0-based)."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return peak * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def vision_and_rest(weight_decay: float) -> optim.MultiOptimizer:
    """Two AdamWs: the vision tower's, then everything else's (their rates are set every step)."""
    optimizers = [adamw(0.0, weight_decay) for _ in range(2)]
    return optim.MultiOptimizer(optimizers, [lambda path, _: path.startswith("vision_tower.")])


def update(optimizer: optim.MultiOptimizer, model, grads, rates: tuple, max_grad_norm: float, apply: bool = True):
    """Clip the gradients to `max_grad_norm` (0: no clipping), set the (vision, rest) learning
    `rates` and, when `apply`, update the model; the gradient norm before clipping (or None)."""
    grad_norm = None
    if max_grad_norm > 0:
        grads, grad_norm = optim.clip_grad_norm(grads, max_grad_norm)
    if apply:
        for part, rate in zip(optimizer.optimizers, rates):
            part.learning_rate = rate
        optimizer.update(model, grads)
    return grad_norm
