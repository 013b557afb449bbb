"""Training CuMo: the three stages of the recipe (reference §7), on one machine or data-parallel.

Stages: `pretrain` trains the connector alone on `plain` captions; `pft` trains everything (dense
model); `sft` trains everything of the upcycled model with the MoE auxiliary losses of every MoE
site present. The LLM trains in full or through LoRA (QLoRA when it is quantized); the vision
tower and the connector train in full when the stage trains them (`freeze_vision` /
`freeze_connector` keep them fixed).

One optimizer step = `grad_accumulation_steps` micro-batches of `batch_size` samples, each split
across the data-parallel ranks. Every loss term is normalised by counts over the whole step (see
`losses`), so ranks and accumulation add up to one big batch. AdamW (torch's: bias-corrected, `adamw`),
linear warmup then cosine decay (transformers' schedule) to a peak of `learning_rate`, or of
`vision_learning_rate` for the vision tower; gradient clipping at `max_grad_norm`.
Trainable weights train in float32.

The output directory gets `metrics.jsonl` (one record per step: the loss of the weights before
that step's update, and each component), `loss.png`, checkpoints under `checkpoints/step-N/`
(trained weights, optimizer state, run state; written to a temporary directory and renamed), and
at the end either an adapter directory (LoRA runs) or a full model directory (otherwise). The data
order and every random draw derive from (seed, step), so `resume` continues bit-identically.
Only rank 0 writes files.
"""

import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.utils import dequantize_model

from .data import Dataset, collate, epoch_batches, shard
from .errors import CuMoError, DataError
from .loader import load_model, load_processor, resolve_model_path, save
from .lora import apply_lora, is_quantized, lora_parameters, save_adapters, stored_dtype, sync_quantization
from .losses import COMPONENTS, Totals, batch_losses, moe_sites
from .moe import SparseMoE, dispatch_mode
from .train_config import TrainConfig

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
# Settings a resumed run must share with the checkpoint to continue the same run.
RESUME_KEYS = (
    "stage", "fine_tune_type", "template", "freeze_vision", "freeze_connector", "lora_rank", "lora_alpha",
    "lora_dropout", "lora_layers", "learning_rate", "vision_learning_rate", "warmup_ratio", "weight_decay",
    "max_grad_norm", "batch_size", "grad_accumulation_steps", "seed", "max_seq_length", "sort_by_length",
    "balance_loss_coef", "router_z_loss_coef",
)


class TrainingError(CuMoError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not match)."""


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


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


def configure_trainable(model, config: TrainConfig) -> list:
    """Freeze the model, then open what the stage trains; returns the trained parts' names."""
    model.freeze()
    parts = []
    if config.stage != "pretrain" and not config.freeze_vision:
        if is_quantized(model.vision_tower):
            dequantize_model(model.vision_tower)
        model.vision_tower.unfreeze()
        parts.append("vision")
    if not config.freeze_connector:
        if is_quantized(model.mm_projector):
            dequantize_model(model.mm_projector)
        model.mm_projector.unfreeze()
        parts.append("connector")
    if config.stage != "pretrain":
        if config.fine_tune_type == "lora":
            apply_lora(model, config.lora_layers, lora_parameters(config.lora_rank, config.lora_alpha, config.lora_dropout))
            parts.append("llm-lora")
        else:
            if is_quantized(model.language_model):
                raise CuMoError(
                    "full fine-tuning needs a language model that is not quantized",
                    "use --fine-tune-type lora (QLoRA), or train from the float model",
                )
            model.language_model.unfreeze()
            parts.append("llm")
    if not parts:
        raise CuMoError("nothing to train: the stage trains only the connector and it is frozen", "drop --freeze-connector")
    # Train in float32; remember what the frozen copy stores.
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p, model.trainable_parameters()))
    return parts


class _Recompute:
    """Per-call seeds for checkpointed layers with dropout: the recomputation redraws the same masks."""

    base = 0
    calls = 0

    @classmethod
    def reset(cls, base: int) -> None:
        cls.base, cls.calls = base, 0

    @classmethod
    def next(cls) -> int:
        cls.calls += 1
        return (cls.base * 7919 + cls.calls) % (2**31)


_checkpointed_classes: dict = {}


def _checkpointed(cls):
    """A subclass of `cls` whose __call__ recomputes its activations in the backward pass."""
    if cls not in _checkpointed_classes:
        call = cls.__call__

        def __call__(self, x, *args, **kwargs):
            seed = _Recompute.next() if self.training and self._has_dropout else None

            def inner(params, x):
                if seed is not None:
                    mx.random.seed(seed)
                self.update(params)
                return call(self, x, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), x)

        _checkpointed_classes[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})
    return _checkpointed_classes[cls]


def _sorts_on_host(moe: SparseMoE) -> bool:
    """Whether this MoE block dispatches a training-sized batch the "grouped" way."""
    return dispatch_mode(1 << 20, moe.num_experts) == "grouped"


def grad_checkpoint(model) -> None:
    """Gradient checkpointing per layer: LLM decoder layers and CLIP encoder layers.

    Layers holding a MoE block are left alone where the MoE dispatch is "grouped" (the CPU backend):
    its host-side sort evaluates the layer's intermediates inside the checkpoint, which then keeps
    them and recomputes on top (measured on CLIP-L MoE layers: 3.2 GB per layer checkpointed against
    1.2 GB plain, 0.8 GB checkpointed with the "gather" dispatch).
    """
    for layer in list(model.language_model.layers) + list(model.vision_tower.vision_model.encoder.layers):
        if any(_sorts_on_host(m) for _, m in layer.named_modules() if isinstance(m, SparseMoE)):
            continue
        layer._has_dropout = any(isinstance(m, nn.Dropout) and m._p_1 < 1 for _, m in layer.named_modules())
        layer.__class__ = _checkpointed(type(layer))


def plot_losses(records: list, path: Path) -> None:
    """A loss-curve PNG (total and language loss per step), drawn with PIL."""
    from PIL import Image, ImageDraw

    steps = [r["step"] for r in records]
    series = [("loss", (31, 119, 180)), ("lm_loss", (255, 127, 14))]
    values = [v for key, _ in series for v in (r.get(key) for r in records) if v is not None and math.isfinite(v)]
    if not steps or not values:
        return
    W, H, left, right, top, bottom = 800, 480, 70, 20, 30, 50
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1

    def xy(step, value):
        return (left + (step - s0) / (s1 - s0) * (W - left - right), top + (hi - value) / (hi - lo) * (H - top - bottom))

    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for i in range(5):
        value = lo + (hi - lo) * i / 4
        y = xy(s0, value)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
    for i in range(5):
        step = s0 + (s1 - s0) * i / 4
        x = xy(step, lo)[0]
        draw.line([x, H - bottom, x, H - bottom + 4], fill="black")
        draw.text((x - 10, H - bottom + 8), f"{step:.0f}", fill="black")
    draw.text((W // 2 - 15, H - 20), "step", fill="black")
    for i, (key, colour) in enumerate(series):
        points = [xy(r["step"], r[key]) for r in records if r.get(key) is not None and math.isfinite(r[key])]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        elif points:
            draw.ellipse([points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2], fill=colour)
        draw.text((left + 10 + 90 * i, 8), key, fill=colour)
    image.save(path)


def read_metrics(path: Path, up_to: Optional[int] = None) -> list:
    """The records of a metrics.jsonl (a torn last line is ignored), optionally only steps <= up_to."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if up_to is None or record.get("step", 0) <= up_to:
                records.append(record)
    return records


def _broadcast(tree, world):
    """Rank 0's values of `tree` on every rank."""
    if world.size() == 1:
        return tree
    return tree_map(lambda x: mx.distributed.all_sum(x if world.rank() == 0 else mx.zeros_like(x), group=world), tree)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, config: TrainConfig, report: Optional[Callable[[str], None]] = None):
        self.config = c = config.resolved()
        self.world = mx.distributed.init()
        self.rank, self.size = self.world.rank(), self.world.size()
        self.main = self.rank == 0
        self.say = report or (print if self.main else (lambda message: None))
        self.out = Path(c.output)
        if any(p.exists() and not p.is_dir() for p in (self.out, *self.out.parents)):
            raise CuMoError(f"--output {self.out} is a file or inside one", "give a folder for --output")
        if not c.resume and any((self.out / CHECKPOINTS).glob("step-*")):
            raise CuMoError(
                f"{self.out} already holds checkpoints of a training run",
                "add --resume to continue it, or choose another --output",
            )

        self.model_path = resolve_model_path(c.model)
        self.base_dtype = stored_dtype(self.model_path)
        self.model, self.args = load_model(self.model_path)
        self.processor = load_processor(self.model_path, self.args)
        self.dataset = Dataset(c.data, self.processor, c.image_folder, c.template, c.strict, report=self.say)
        self.upfront_bad = len(self.dataset.bad)  # every rank finds these
        self.dataset.report = lambda message: print(message if self.size == 1 else f"[rank {self.rank}] {message}")

        self.aux = c.stage == "sft"
        self.sites = moe_sites(self.model) if self.aux else []
        self.balance_coef = self.args.balance_loss_coef if c.balance_loss_coef is None else c.balance_loss_coef
        self.z_coef = self.args.router_z_loss_coef if c.router_z_loss_coef is None else c.router_z_loss_coef
        if c.stage != "sft" and moe_sites(self.model):
            self.say(f"note: stage {c.stage} trains without the MoE auxiliary losses (they belong to --stage sft)")

        mx.random.seed(c.seed)  # LoRA initialisation
        self.parts = configure_trainable(self.model, c)
        if c.grad_checkpoint:
            grad_checkpoint(self.model)
        # the vision tower's, then everything else's (the rates are set every step)
        optimizers = [adamw(0.0, c.weight_decay) for _ in range(2)]
        self.optimizer = optim.MultiOptimizer(optimizers, [lambda path, _: path.startswith("vision_tower.")])
        self.optimizer.init(self.model.trainable_parameters())

        self.lengths = [s.length for s in self.dataset.samples]
        self.batches_per_epoch = math.ceil(len(self.lengths) / c.batch_size)
        if c.iters is not None:
            self.total_steps, self.total_micro = c.iters, None
        else:
            self.total_micro = max(1, math.ceil(c.epochs * self.batches_per_epoch))
            self.total_steps = math.ceil(self.total_micro / c.grad_accumulation_steps)
        self._epochs: dict = {}
        self.step = 0
        self.records: list = []
        self.loss_fn = nn.value_and_grad(self.model, self._loss)

    # -- data ------------------------------------------------------------------------------

    def micro_batch(self, k: int) -> list:
        epoch, j = divmod(k, self.batches_per_epoch)
        if epoch not in self._epochs:
            self._epochs = {epoch: epoch_batches(self.lengths, self.config.batch_size, self.config.seed, epoch, self.config.sort_by_length)}
        return self._epochs[epoch][j]

    def step_samples(self, step: int) -> list:
        """This rank's sample indices for each micro-batch of optimizer step `step` (1-based)."""
        A = self.config.grad_accumulation_steps
        ks = range((step - 1) * A, step * A)
        if self.total_micro is not None:
            ks = [k for k in ks if k < self.total_micro]
        return [shard(self.micro_batch(k), self.rank, self.size) for k in ks]

    def load_step(self, step: int):
        """(batches, error): this rank's collated micro-batches of `step`; a strict-mode DataError is returned."""
        try:
            batches = []
            for indices in self.step_samples(step):
                items = self.dataset.load(indices)
                if items:
                    batches.append(
                        collate(
                            [e for _, e in items],
                            self.args.image_tokens,
                            self.config.max_seq_length,
                            pad_id=self.pad_id,
                            names=[s.name for s, _ in items],
                        )
                    )
            return batches, None
        except DataError as e:
            return [], e

    @property
    def pad_id(self) -> int:
        tokenizer = self.processor.tokenizer
        unk = getattr(tokenizer, "unk_token_id", None)
        return unk if unk is not None else 0

    # -- one step --------------------------------------------------------------------------

    def _loss(self, model, batch, totals):
        total, components = batch_losses(model, batch, totals, self.aux, self.balance_coef, self.z_coef)
        return total * self.size, total, components  # scaled: average_gradients divides by the rank count

    def _seed(self, step: int, micro: int) -> None:
        seed = int(np.random.SeedSequence([self.config.seed, step, micro, self.rank]).generate_state(1)[0])
        mx.random.seed(seed)
        _Recompute.reset(seed)

    def train_step(self, step: int, batches: list, error: Optional[Exception]) -> dict:
        tic = time.perf_counter()
        counts = [sum(b.num_targets for b in batches), sum(b.num_images for b in batches), len(batches),
                  sum(b.num_tokens for b in batches), sum(b.size for b in batches), int(error is not None)]
        if self.size > 1:
            counts = mx.distributed.all_sum(mx.array(counts, dtype=mx.int32), group=self.world).tolist()
        if counts[5]:
            raise error or DataError("another rank stopped on a bad sample (--strict)", "see its message above")
        totals = Totals(targets=counts[0], images=counts[1], batches=counts[2])

        grads, total, components = None, mx.array(0.0), {}
        for i, batch in enumerate(batches):
            self._seed(step, i)
            (_, loss, parts), g = self.loss_fn(self.model, batch.as_mx(), totals)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            total = total + loss
            components = {k: components[k] + v if k in components else v for k, v in parts.items()}
            mx.eval(grads, total, components)
        if grads is None:
            grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        names = [k for k in COMPONENTS if k == "lm_loss" or k.split("_")[0] in self.sites]
        values = mx.stack([total] + [components.get(k, mx.array(0.0)).astype(mx.float32) for k in names])
        if self.size > 1:
            grads = average_gradients(grads, group=self.world)
            values = mx.distributed.all_sum(values, group=self.world)
        values = values.tolist()
        if not all(math.isfinite(v) for v in values):
            kept = self.latest_checkpoint()
            raise TrainingError(
                f"the loss is {values[0]} at step {step}; training stopped before that step's update",
                f"the last good checkpoint is {kept}" if kept else "no checkpoint was written yet; lower --learning-rate",
            )
        grad_norm = None
        if self.config.max_grad_norm > 0:
            grads, grad_norm = optim.clip_grad_norm(grads, self.config.max_grad_norm)
        c = self.config
        lr, vision_lr = (
            cosine_lr(step - 1, self.total_steps, peak, c.warmup_ratio) for peak in (c.learning_rate, c.vision_learning_rate)
        )
        if counts[2]:  # a step whose samples were all bad leaves the weights alone
            vision, rest = self.optimizer.optimizers
            vision.learning_rate, rest.learning_rate = vision_lr, lr
            self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state)
        seconds = time.perf_counter() - tic
        record = {"step": step, "lr": lr, **({"vision_lr": vision_lr} if "vision" in self.parts else {})}
        record.update(loss=values[0], **dict(zip(names, values[1:])))
        record.update(
            grad_norm=None if grad_norm is None else grad_norm.item(),
            samples=counts[4],
            tokens=counts[3],
            targets=counts[0],
            seconds=seconds,
            tokens_per_second=counts[3] / seconds if seconds > 0 else None,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
        )
        return record

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint_dirs(self) -> list:
        root = self.out / CHECKPOINTS
        found = [p for p in root.glob("step-*") if (p / "state.json").is_file()] if root.is_dir() else []
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def latest_checkpoint(self) -> Optional[Path]:
        found = self.checkpoint_dirs()
        return found[-1] if found else None

    def run_state(self) -> dict:
        c = self.config
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "world_size": self.size,
            "config": {k: getattr(c, k) for k in RESUME_KEYS},
            "data": {"records": self.dataset.num_records, "usable": len(self.dataset)},
            "bad_samples": {str(k): v for k, v in list(self.dataset.bad.items())},  # the loader thread adds to it
        }

    def save_checkpoint(self) -> None:
        root = self.out / CHECKPOINTS
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:07d}"
        temp = root / f".tmp-{final.name}-{os.getpid()}"
        for stale in root.glob(".tmp-step-*"):  # left by a run killed while writing a checkpoint
            shutil.rmtree(stale, ignore_errors=True)
        try:
            temp.mkdir()
            mx.save_safetensors(str(temp / "trainable.safetensors"), dict(tree_flatten(self.model.trainable_parameters())))
            mx.save_safetensors(str(temp / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
            (temp / "state.json").write_text(json.dumps(self.run_state(), indent=2))
        except (OSError, RuntimeError) as e:  # a full disk; MLX reports a failed write as a RuntimeError
            shutil.rmtree(temp, ignore_errors=True)
            kept = self.latest_checkpoint()
            raise TrainingError(
                f"cannot write the checkpoint {final}: {e}",
                f"free some disk space; --resume continues from {kept}" if kept else "free some disk space and run again",
            ) from None
        if final.exists():
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(temp, final)
        for stale in self.checkpoint_dirs()[: -self.config.keep_checkpoints]:
            shutil.rmtree(stale, ignore_errors=True)

    def restore(self) -> None:
        """Continue from the latest checkpoint (rank 0 reads it; every rank gets its values)."""
        path = self.latest_checkpoint() if self.main else None
        state = None
        if path is not None:
            try:
                state = json.loads((path / "state.json").read_text())
                self._check_resumable(state, path)
                self.model.load_weights(list(mx.load(str(path / "trainable.safetensors")).items()), strict=False)
                self.optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
                self.dataset.bad.update({int(k): v for k, v in state.get("bad_samples", {}).items()})
            except CuMoError:
                raise
            except Exception as e:  # a damaged checkpoint (the run only ever renames complete ones into place)
                raise TrainingError(
                    f"the checkpoint {path} is damaged: {type(e).__name__}: {e}",
                    "delete it to resume from the one before, or start a new --output",
                ) from None
        step = mx.array(state["step"] if state else 0, dtype=mx.int32)
        if self.size > 1:
            step = mx.distributed.all_sum(step, group=self.world)
            self.model.update(_broadcast(self.model.trainable_parameters(), self.world))
            self.optimizer.state = _broadcast(self.optimizer.state, self.world)
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.step = step.item()
        if self.main:
            if path is None:
                self.say(f"no checkpoint in {self.out / CHECKPOINTS}: starting from the beginning")
            else:
                self.say(f"resuming from {path} (step {self.step} of {self.total_steps})")
            self.records = read_metrics(self.out / METRICS, up_to=self.step)

    def _check_resumable(self, state: dict, path: Path) -> None:
        ours = {k: getattr(self.config, k) for k in RESUME_KEYS}
        differ = [f"{k}: {state['config'].get(k)!r} there, {ours[k]!r} now" for k in RESUME_KEYS if state["config"].get(k) != ours[k]]
        if state.get("total_steps") != self.total_steps:
            differ.append(f"total steps: {state.get('total_steps')} there, {self.total_steps} now")
        if state.get("data", {}).get("records") != self.dataset.num_records:
            differ.append(f"data samples: {state.get('data', {}).get('records')} there, {self.dataset.num_records} now")
        if differ:
            raise TrainingError(
                f"the checkpoint {path} belongs to a different run ({'; '.join(differ)})",
                "resume with the same settings and data, or start a new --output",
            )

    # -- outputs ---------------------------------------------------------------------------

    def _cast_for_saving(self, weights: dict) -> dict:
        dtype = getattr(mx, self.base_dtype) if self.base_dtype else None
        if dtype is None:
            return weights
        return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith((".lora_a", ".lora_b")) else v
                for k, v in weights.items()}

    def write_output(self) -> None:
        c = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        info = {
            "base_model": str(self.model_path),
            "stage": c.stage,
            "trained": self.parts,
            "steps": self.step,
            "training": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(c).items()},
        }
        if "llm-lora" in self.parts:
            config = {
                "fine_tune_type": "lora",
                "num_layers": c.lora_layers,
                "lora_parameters": lora_parameters(c.lora_rank, c.lora_alpha, c.lora_dropout),
                **info,
            }
            weights = self._cast_for_saving(dict(tree_flatten(self.model.trainable_parameters())))
            save_adapters(self.out, weights, config)
        else:
            self.model.update(tree_unflatten(list(self._cast_for_saving(dict(tree_flatten(self.model.parameters()))).items())))
            sync_quantization(self.model)
            save(self.out, self.model, tokenizer_source=self.model_path)
            (self.out / "training_args.json").write_text(json.dumps(info, indent=2) + "\n")

    def append_metrics(self, record: dict) -> None:
        self.records.append(record)
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- the loop --------------------------------------------------------------------------

    def run(self, stop_after: Optional[int] = None) -> dict:
        """Train to the end (or, for tests, stop as if killed after step `stop_after`)."""
        from mlx_lm.utils import maybe_set_recommended_wired_limit
        from tqdm import tqdm

        c = self.config
        maybe_set_recommended_wired_limit()
        if c.resume:
            self.restore()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            metrics = self.out / METRICS
            metrics.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
            self.say(
                f"stage {c.stage}: training {', '.join(self.parts)} ({trainable / 1e6:.3f}M parameters), "
                f"{len(self.dataset)} samples, {self.total_steps} steps of {c.batch_size} x {c.grad_accumulation_steps}"
                + (f" on {self.size} ranks" if self.size > 1 else "")
            )
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", disable=not (self.main and c.progress), dynamic_ncols=True)
        pool = ThreadPoolExecutor(max_workers=1)
        start = time.perf_counter()
        try:
            upcoming = pool.submit(self.load_step, self.step + 1) if self.step < self.total_steps else None
            while self.step < self.total_steps:
                batches, error = upcoming.result()
                upcoming = pool.submit(self.load_step, self.step + 2) if self.step + 1 < self.total_steps else None
                record = self.train_step(self.step + 1, batches, error)
                self.step += 1
                if self.main:
                    self.append_metrics(record)
                    if self.step % c.save_every == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
                bar.set_postfix_str(
                    f"loss {record['loss']:.4f}, {record['tokens_per_second'] or 0:.0f} tok/s, "
                    f"peak {record['peak_memory_gb']:.2f} GB"
                )
                bar.update(1)
                if stop_after is not None and self.step >= stop_after:
                    return {"steps": self.step, "stopped": True}
        finally:
            bar.close()
            pool.shutdown(wait=True, cancel_futures=True)
        bad = len(self.dataset.bad)
        if self.size > 1:  # the ones found while loading, each by the rank that loaded it
            found = mx.distributed.all_sum(mx.array(bad - self.upfront_bad), group=self.world).item()
            bad = self.upfront_bad + int(found)
        if self.main:
            self.write_output()
            plot_losses(self.records, self.out / "loss.png")
            if bad:
                self.say(f"skipped {bad} bad sample(s) (listed above)")
            self.say(f"trained {self.step} steps in {time.perf_counter() - start:.1f} s; wrote {self.out}")
        return {
            "steps": self.step,
            "loss": self.records[-1]["loss"] if self.records else None,
            "skipped": bad,
            "output": str(self.out),
        }


def train(config: TrainConfig, **kwargs) -> dict:
    return Trainer(config).run(**kwargs)
