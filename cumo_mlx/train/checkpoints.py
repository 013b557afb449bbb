"""A training run's checkpoints and its metrics file, in the run's output directory.

OUT/checkpoints/step-NNNNNNN/ holds the trained weights (`trainable.safetensors`), the optimizer
state (`optimizer.safetensors`) and the run state (`state.json`: the step, the model it started
from, the settings a resumed run must share, the data's size, the samples trained on and the bad
samples found so far). A checkpoint is written with `staging.staged_directory` (a temporary
folder renamed into place once complete), so a run killed at any moment leaves only complete
checkpoints; the last `keep` are kept. OUT/metrics.jsonl holds one JSON record per step; a torn
last line (a run killed while writing it) is ignored when it is read back.
"""

import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import CuMoError
from ..staging import staged_directory

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
    """Training cannot go on (a non-finite loss, a checkpoint that cannot be written or does not match)."""


def check_new_run(out: Path, resume: bool) -> None:
    """Refuse an --output that is a file, or that holds another run's checkpoints without --resume."""
    if any(p.exists() and not p.is_dir() for p in (out, *out.parents)):
        raise CuMoError(f"--output {out} is a file or inside one", "give a folder for --output")
    if not resume and any((out / CHECKPOINTS).glob("step-*")):
        raise CuMoError(
            f"{out} already holds checkpoints of a training run",
            "add --resume to continue it, or choose another --output",
        )


def model_identity(model_path: Path) -> dict:
    """What a resumed run must start from: the model folder and a digest of its config.json and of
    every tensor's name, dtype, shape and first and last 64 bytes. Cheap on a 7B model, yet it tells
    apart two models of the same shapes, even where only a small part (the connector) differs."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_path).glob("*")):
        if path.is_file() and path.name == "config.json":
            digest.update(path.read_bytes())
        elif path.is_file() and path.suffix == ".safetensors":
            with open(path, "rb") as f:  # the loader has already checked the header
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
                for name in sorted(k for k in header if k != "__metadata__"):
                    begin, end = header[name]["data_offsets"]
                    digest.update(f"{path.name}:{name}:{header[name]['dtype']}:{header[name]['shape']}".encode())
                    for offset in (begin, max(begin, end - 64)):
                        f.seek(8 + size + offset)
                        digest.update(f.read(min(64, end - begin)))
    return {"path": str(Path(model_path).resolve()), "digest": digest.hexdigest()}


def run_state(step: int, total_steps: int, world_size: int, config, dataset, model: dict, trained_samples: int = 0) -> dict:
    """What a checkpoint records about its run (`state.json`); `model` is its `model_identity`,
    `trained_samples` the samples trained on so far."""
    return {
        "step": step,
        "model": model,
        "total_steps": total_steps,
        "world_size": world_size,
        "config": {k: getattr(config, k) for k in RESUME_KEYS},
        "data": {"records": dataset.num_records, "usable": len(dataset)},
        "trained_samples": trained_samples,
        "bad_samples": {str(k): v for k, v in list(dataset.bad.items())},  # the loader thread adds to it
    }


def checkpoint_dirs(out: Path) -> list:
    """The complete checkpoints in `out`, oldest first."""
    root = out / CHECKPOINTS
    found = [p for p in root.glob("step-*") if (p / "state.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(out: Path) -> Optional[Path]:
    found = checkpoint_dirs(out)
    return found[-1] if found else None


def save_checkpoint(out: Path, trainable: dict, optimizer_state: dict, state: dict, keep: int) -> None:
    """Write the checkpoint of step `state["step"]`, then delete all but the last `keep`."""
    final = out / CHECKPOINTS / f"step-{state['step']:07d}"
    try:
        with staged_directory(final, replace=True) as staged:
            mx.save_safetensors(str(staged / "trainable.safetensors"), dict(tree_flatten(trainable)))
            mx.save_safetensors(str(staged / "optimizer.safetensors"), dict(tree_flatten(optimizer_state)))
            (staged / "state.json").write_text(json.dumps(state, indent=2))
    except (OSError, RuntimeError) as e:  # a full disk; MLX reports a failed write as a RuntimeError
        kept = latest_checkpoint(out)
        raise TrainingError(
            f"cannot write the checkpoint {final}: {e}",
            f"free some disk space; --resume continues from {kept}" if kept else "free some disk space and run again",
        ) from None
    for stale in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, ours: dict) -> dict:
    """Load checkpoint `path` into `model` and `optimizer` once its run state matches `ours` (this
    run's `run_state`); its run state, the bad samples keyed by index."""
    try:
        state = json.loads((path / "state.json").read_text())
        check_same_run(state, ours, path)
        model.load_weights(list(mx.load(str(path / "trainable.safetensors")).items()), strict=False)
        optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
        state["bad_samples"] = {int(k): v for k, v in state.get("bad_samples", {}).items()}
    except CuMoError:
        raise
    except Exception as e:  # a damaged checkpoint (the run only ever renames complete ones into place)
        raise TrainingError(
            f"the checkpoint {path} is damaged: {type(e).__name__}: {e}",
            "delete it to resume from the one before, or start a new --output",
        ) from None
    return state


def check_same_run(state: dict, ours: dict, path: Path) -> None:
    """A TrainingError naming what differs between a checkpoint's run state and this run's."""
    theirs_config, our_config = state["config"], ours["config"]
    differ = [f"{k}: {theirs_config.get(k)!r} there, {our_config[k]!r} now" for k in RESUME_KEYS if theirs_config.get(k) != our_config[k]]
    theirs_model = state.get("model")  # absent from checkpoints written before it was recorded
    if theirs_model is not None and theirs_model.get("digest") != ours["model"]["digest"]:
        differ.append(f"model: {theirs_model.get('path')} there, {ours['model']['path']} now (other weights or config)")
    if state.get("total_steps") != ours["total_steps"]:
        differ.append(f"total steps: {state.get('total_steps')} there, {ours['total_steps']} now")
    if state.get("data", {}).get("records") != ours["data"]["records"]:
        differ.append(f"data samples: {state.get('data', {}).get('records')} there, {ours['data']['records']} now")
    if differ:
        raise TrainingError(
            f"the checkpoint {path} belongs to a different run ({'; '.join(differ)})",
            "resume with the same settings and data, or start a new --output",
        )


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


def write_metrics(path: Path, records: list) -> None:
    """Start metrics.jsonl afresh with `records` (those a resumed run keeps)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
