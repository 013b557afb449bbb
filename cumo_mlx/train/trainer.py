"""Training CuMo: the three stages of the recipe, on one machine or data-parallel.

The stages are the original's (SHI-Labs/CuMo: scripts/cumo/mistral_7b/pretrain_mistral_7b.sh,
pft_mistral_7b.sh, sft_mistral_7b.sh running cumo/train/train.py): `pretrain` trains the connector
alone on `plain` captions; `pft` trains everything (dense model); `sft` trains everything of the
upcycled model with the MoE auxiliary losses of every MoE site present. The LLM trains in full or
through LoRA (QLoRA when it is quantized); the vision tower and the connector train in full when
the stage trains them (`freeze_vision` / `freeze_connector` keep them fixed).

One optimizer step = `grad_accumulation_steps` micro-batches of `batch_size` samples, each split
across the data-parallel ranks. Every loss term is normalised by counts over the whole step (see
`losses`), so ranks and accumulation add up to one big batch. The optimizer and the schedule are in
`optim`; gradients are clipped at `max_grad_norm`. Trainable weights train in float32.

The output directory gets `metrics.jsonl` (one record per step: the loss of the weights before
that step's update, and each component), `loss.png`, checkpoints (see `checkpoints`), and at the
end either an adapter directory (LoRA runs) or a full model directory (otherwise). The data order
and every random draw derive from (seed, step), so `resume` continues bit-identically. Only rank 0
writes files.
"""

import json
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.utils import dequantize_model

from ..errors import CuMoError, DataError
from ..loader import load_model, load_processor, resolve_model_path, save
from ..models.moe import SparseMoE, dispatch_mode
from ..plots import plot_losses
from .checkpoints import (
    CHECKPOINTS,
    METRICS,
    TrainingError,
    append_metrics,
    check_new_run,
    latest_checkpoint,
    load_checkpoint,
    model_identity,
    read_metrics,
    run_state,
    save_checkpoint,
    write_metrics,
)
from .data import Dataset, StepLoader
from .lora import apply_lora, is_quantized, lora_parameters, save_adapters, stored_dtype, sync_quantization
from .losses import Totals, batch_losses, component_names, moe_sites
from .optim import compiled_update, cosine_lr, vision_and_rest
from .options import TrainConfig


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


class GradCheckpoint:
    """Gradient checkpointing of one model, per layer (LLM decoder layers and CLIP encoder layers):
    each layer becomes a subclass of its own class whose call recomputes its activations in the
    backward pass. A layer with dropout seeds each call from a counter (restarted by `reseed` for
    every micro-batch), so that the recomputation redraws the same masks.

    Layers holding a MoE block are left alone where the MoE dispatch is "grouped" (the CPU backend):
    its host-side sort evaluates the layer's intermediates inside the checkpoint, which then keeps
    them and recomputes on top (measured on CLIP-L MoE layers: 3.2 GB per layer checkpointed against
    1.2 GB plain, 0.8 GB checkpointed with the "gather" dispatch).
    """

    def __init__(self, model):
        self.base, self.calls = 0, 0
        self._classes: dict = {}  # (layer class, has dropout) -> its checkpointed subclass
        for layer in list(model.language_model.layers) + list(model.vision_tower.vision_model.encoder.layers):
            blocks = [m for _, m in layer.named_modules() if isinstance(m, SparseMoE)]
            if any(dispatch_mode(1 << 20, m.num_experts, m.dispatch) == "grouped" for m in blocks):
                continue  # a training-sized batch is dispatched "grouped"
            dropout = any(isinstance(m, nn.Dropout) and m._p_1 < 1 for _, m in layer.named_modules())
            layer.__class__ = self._checkpointed(type(layer), dropout)

    def reseed(self, base: int) -> None:
        self.base, self.calls = base, 0

    def _next_seed(self) -> int:
        self.calls += 1
        return (self.base * 7919 + self.calls) % (2**31)

    def _checkpointed(self, cls, dropout: bool) -> type:
        if (cls, dropout) not in self._classes:
            call, seeds = cls.__call__, self

            def __call__(layer, x, *args, **kwargs):
                seed = seeds._next_seed() if layer.training and dropout else None

                def inner(params, x):
                    if seed is not None:
                        mx.random.seed(seed)
                    layer.update(params)
                    return call(layer, x, *args, **kwargs)

                return mx.checkpoint(inner)(layer.trainable_parameters(), x)

            self._classes[cls, dropout] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})
        return self._classes[cls, dropout]


def step_counts(batches: list, error: Optional[Exception], world) -> dict:
    """Counts over one step's micro-batches on every rank; a bad sample under --strict on any rank
    stops every rank."""
    counts = [sum(b.num_targets for b in batches), sum(b.num_images for b in batches), len(batches),
              sum(b.num_tokens for b in batches), sum(b.size for b in batches), int(error is not None)]
    if world.size() > 1:
        counts = mx.distributed.all_sum(mx.array(counts, dtype=mx.int32), group=world).tolist()
    if counts[5]:
        raise error or DataError("another rank stopped on a bad sample (--strict)", "see its message above")
    return dict(zip(("targets", "images", "batches", "tokens", "samples"), counts))


def broadcast(tree, world):
    """Rank 0's values of `tree` on every rank."""
    if world.size() == 1:
        return tree
    return tree_map(lambda x: mx.distributed.all_sum(x if world.rank() == 0 else mx.zeros_like(x), group=world), tree)


def write_output(out: Path, model, info: dict, model_path: Path, base_dtype: Optional[str]) -> None:
    """The trained adapters (LoRA runs) or the whole model (with the tokenizer of `model_path`), in
    the base model's floating dtype; `info` says what trained how."""
    dtype = getattr(mx, base_dtype) if base_dtype else None

    def cast(weights: dict) -> dict:  # the LoRA matrices stay float32
        if dtype is None:
            return weights
        return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith((".lora_a", ".lora_b")) else v
                for k, v in weights.items()}

    c = info["training"]
    if "llm-lora" in info["trained"]:
        parameters = lora_parameters(c["lora_rank"], c["lora_alpha"], c["lora_dropout"])
        config = {"fine_tune_type": "lora", "num_layers": c["lora_layers"], "lora_parameters": parameters, **info}
        save_adapters(out, cast(dict(tree_flatten(model.trainable_parameters()))), config)
    else:
        model.update(tree_unflatten(list(cast(dict(tree_flatten(model.parameters()))).items())))
        sync_quantization(model)
        save(out, model, tokenizer_source=model_path)
        (out / "training_args.json").write_text(json.dumps(info, indent=2) + "\n")


class Trainer:
    """One training run: set up here; `train_step` is one optimizer step; `steps` is the loop,
    yielding each step's metrics record; `run` trains to the end and writes the result."""

    def __init__(self, config: TrainConfig, report: Optional[Callable[[str], None]] = None):
        self.config = c = config.resolved()
        self.world = mx.distributed.init()
        self.rank, self.size = self.world.rank(), self.world.size()
        self.main = self.rank == 0
        self.say = report or (print if self.main else (lambda message: None))
        self.out = Path(c.output)
        check_new_run(self.out, c.resume)
        # The topmost folder of --output this run creates: removed again if the run fails early.
        self.created = next((p for p in reversed([self.out, *self.out.parents]) if not p.exists()), None)
        self.model_path = resolve_model_path(c.model)
        self.base_dtype = stored_dtype(self.model_path)
        self.model, self.args = load_model(self.model_path)
        self.processor = load_processor(self.model_path, self.args)
        self.identity = model_identity(self.model_path) if self.main else None
        self.dataset = Dataset(c.data, self.processor, c.image_folder, c.template, c.strict, report=self.say)
        self.upfront_bad = len(self.dataset.bad)  # every rank finds these
        self.dataset.report = lambda message: print(message if self.size == 1 else f"[rank {self.rank}] {message}")
        self.data = StepLoader(self.dataset, c, self.args.image_tokens, self.rank, self.size)
        self.aux = c.stage == "sft"
        if not self.aux and moe_sites(self.model):
            self.say(f"note: stage {c.stage} trains without the MoE auxiliary losses (they belong to --stage sft)")
        self.components = component_names(self.model, self.aux)
        mx.random.seed(c.seed)  # LoRA initialisation
        self.parts = configure_trainable(self.model, c)
        self.recompute = GradCheckpoint(self.model) if c.grad_checkpoint else None
        self.optimizer = vision_and_rest(c.weight_decay)
        self.optimizer.init(self.model.trainable_parameters())
        self.update = None  # compiled by `begin`, once a resume has loaded the optimizer state
        self.step, self.records = 0, []
        self.trained_samples = 0  # over all ranks, this run and the one it resumes
        self.loss_fn = nn.value_and_grad(self.model, self._loss)

    # -- one step ----------------------------------------------------------------------------

    def _loss(self, model, batch, totals):
        c = self.config
        total, components = batch_losses(model, batch, totals, self.aux, c.balance_loss_coef, c.router_z_loss_coef)
        return total * self.size, total, components  # scaled: average_gradients divides by the rank count

    def _seed(self, step: int, micro: int) -> None:
        seed = int(np.random.SeedSequence([self.config.seed, step, micro, self.rank]).generate_state(1)[0])
        mx.random.seed(seed)
        if self.recompute is not None:
            self.recompute.reseed(seed)

    def gradients(self, step: int, batches: list, totals: Totals) -> tuple:
        """(gradients averaged over the ranks, [loss, each component] summed over micro-batches and ranks)."""
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
        values = mx.stack([total] + [components.get(k, mx.array(0.0)).astype(mx.float32) for k in self.components])
        if self.size > 1:
            grads = average_gradients(grads, group=self.world)
            values = mx.distributed.all_sum(values, group=self.world)
        return grads, values.tolist()

    def train_step(self, step: int, batches: list, error: Optional[Exception]) -> dict:
        """Optimizer step `step` (1-based) on this rank's micro-batches; the step's metrics record."""
        tic, c = time.perf_counter(), self.config
        counts = step_counts(batches, error, self.world)
        self.trained_samples += counts["samples"]
        grads, values = self.gradients(step, batches, Totals(counts["targets"], counts["images"], counts["batches"]))
        if not all(math.isfinite(v) for v in values):
            kept = latest_checkpoint(self.out)
            raise TrainingError(
                f"the loss is {values[0]} at step {step}; training stopped before that step's update",
                f"the last good checkpoint is {kept}" if kept else "no checkpoint was written yet; lower --learning-rate",
            )
        peaks = (c.vision_learning_rate, c.learning_rate)
        vision_lr, lr = (cosine_lr(step - 1, self.data.total_steps, peak, c.warmup_ratio) for peak in peaks)
        # a step whose samples were all bad leaves the weights alone
        grad_norm = self.update(grads, (vision_lr, lr), apply=counts["batches"] > 0)
        mx.eval(self.model.parameters(), self.optimizer.state)
        seconds = time.perf_counter() - tic
        record = {"step": step, "lr": lr, **({"vision_lr": vision_lr} if "vision" in self.parts else {})}
        record.update(loss=values[0], **dict(zip(self.components, values[1:])))
        record.update(
            grad_norm=None if grad_norm is None else grad_norm.item(), samples=counts["samples"], tokens=counts["tokens"],
            targets=counts["targets"], seconds=seconds, tokens_per_second=counts["tokens"] / seconds if seconds > 0 else None,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
        )  # fmt: skip
        return record

    # -- the loop ----------------------------------------------------------------------------

    def restore(self) -> None:
        """Continue from the latest checkpoint (rank 0 reads it; every rank gets its values)."""
        path = latest_checkpoint(self.out) if self.main else None
        step = trained = 0
        if path is not None:
            ours = run_state(self.step, self.data.total_steps, self.size, self.config, self.dataset, self.identity)
            state = load_checkpoint(path, self.model, self.optimizer, ours)
            self.dataset.bad.update(state["bad_samples"])
            step = state["step"]
            trained = state.get("trained_samples", 1)  # older checkpoints: some were
        progress = mx.array([step, trained], dtype=mx.int32)
        if self.size > 1:
            progress = mx.distributed.all_sum(progress, group=self.world)
            self.model.update(broadcast(self.model.trainable_parameters(), self.world))
            self.optimizer.state = broadcast(self.optimizer.state, self.world)
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.step, self.trained_samples = progress.tolist()
        if self.main:
            if path is None:
                self.say(f"no checkpoint in {self.out / CHECKPOINTS}: starting from the beginning")
            else:
                self.say(f"resuming from {path} (step {self.step} of {self.data.total_steps})")
            self.records = read_metrics(self.out / METRICS, up_to=self.step)

    def begin(self) -> None:
        """Resume (with --resume), start metrics.jsonl, and say what trains."""
        from mlx_lm.utils import maybe_set_recommended_wired_limit

        c = self.config
        maybe_set_recommended_wired_limit()
        if c.resume:
            self.restore()
        self.update = compiled_update(self.optimizer, self.model, c.max_grad_norm)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_metrics(self.out / METRICS, self.records)
            trainable = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
            self.say(
                f"stage {c.stage}: training {', '.join(self.parts)} ({trainable / 1e6:.3f}M parameters), "
                f"{len(self.dataset)} samples, {self.data.total_steps} steps of {c.batch_size} x {c.grad_accumulation_steps}"
                + (f" on {self.size} ranks" if self.size > 1 else "")
            )
        self.model.train()

    def log_step(self, record: dict) -> None:
        """Rank 0 appends the step's record to metrics.jsonl, and checkpoints every `save_every` steps."""
        if not self.main:
            return
        self.records.append(record)
        append_metrics(self.out / METRICS, record)
        if self.step % self.config.save_every == 0 and self.step < self.data.total_steps:
            state = run_state(self.step, self.data.total_steps, self.size, self.config, self.dataset, self.identity,
                              self.trained_samples)
            save_checkpoint(self.out, self.model.trainable_parameters(), self.optimizer.state, state, self.config.keep_checkpoints)

    def steps(self):
        """Train from the start (or the checkpoint `begin` resumes), yielding each step's metrics
        record once it is logged; a run left before its end is continued by --resume."""
        from tqdm import tqdm

        self.begin()
        total = self.data.total_steps
        bar = tqdm(total=total, initial=self.step, desc="train", disable=not (self.main and self.config.progress), dynamic_ncols=True)
        pool = ThreadPoolExecutor(max_workers=1)  # loads the next step's data during this one
        try:
            upcoming = pool.submit(self.data.load, self.step + 1) if self.step < total else None
            while self.step < total:
                batches, error = upcoming.result()
                upcoming = pool.submit(self.data.load, self.step + 2) if self.step + 1 < total else None
                record = self.train_step(self.step + 1, batches, error)
                self.step += 1
                self.log_step(record)
                bar.set_postfix_str(
                    f"loss {record['loss']:.4f}, {record['tokens_per_second'] or 0:.0f} tok/s, "
                    f"peak {record['peak_memory_gb']:.2f} GB"
                )
                bar.update(1)
                yield record
        finally:
            bar.close()
            pool.shutdown(wait=True, cancel_futures=True)

    def run(self) -> dict:
        """Train to the end, then write the adapters or the model, and the loss curve. A run that
        fails before it has a checkpoint of something trained removes the folders it created."""
        try:
            return self._run()
        except BaseException:
            if self.main and self.created is not None and (latest_checkpoint(self.out) is None or not self.trained_samples):
                shutil.rmtree(self.created, ignore_errors=True)
            raise

    def _run(self) -> dict:
        start = time.perf_counter()
        for _ in self.steps():
            pass
        if not self.trained_samples:  # the same count on every rank
            raise DataError(
                f"nothing was trained: every sample of {self.dataset.path} was skipped", "fix the samples the messages above name"
            )
        bad = len(self.dataset.bad)
        if self.size > 1:  # the ones found while loading, each by the rank that loaded it
            found = mx.distributed.all_sum(mx.array(bad - self.upfront_bad), group=self.world).item()
            bad = self.upfront_bad + int(found)
        if self.main:
            training = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.config).items()}
            info = {"base_model": str(self.model_path), "stage": self.config.stage, "trained": self.parts,
                    "steps": self.step, "training": training}  # fmt: skip
            write_output(self.out, self.model, info, self.model_path, self.base_dtype)
            plot_losses(self.records, self.out / "loss.png")
            if bad:
                self.say(f"skipped {bad} bad sample(s) (listed above)")
            self.say(f"trained {self.step} steps in {time.perf_counter() - start:.1f} s; wrote {self.out}")
        loss = self.records[-1]["loss"] if self.records else None
        return {"steps": self.step, "loss": loss, "skipped": bad, "output": str(self.out)}
