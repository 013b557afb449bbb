"""Time one training step of the demo CuMo against its bare forward and backward pass.

    python demo_recipe/step_time.py [--batch-size 8] [--dense] [--steps 10] [--json]
        [--cumo-7b-widths --llm-layers 1 --vision-layers 2] [--no-compile]

Writes a randomly initialised demo model (`demo_model`: the upcycled MoE, or the dense model of
stages 1-2 with --dense) and a small shapes dataset into a temporary folder, trains it through the
`Trainer` (full fine-tuning, stage sft, or pft with --dense) and, right after each step, times
value_and_grad of the trainer's own loss alone on that step's batches. Prints the medians over the
steps after two warm-up ones and their ratio: what a step adds to its forward+backward (the counts,
the gradient sum, clipping, the two AdamWs, the metrics, the next step's data loading).

--cumo-7b-widths: the same model at CuMo-Mistral-7B's widths (CLIP-L/14-336, S2 [1, 3], Mistral-7B;
the demo's tokenizer) with --llm-layers and --vision-layers layers. --no-compile runs the update
op by op (`mx.disable_compile`), as the trainer did before its update was compiled.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cumo_mlx  # noqa: F401  (optimized BLAS before mlx)
import mlx.core as mx
from cumo_mlx.loader import save
from cumo_mlx.models.config import ModelArgs
from cumo_mlx.models.model import Model
from cumo_mlx.shapes import write_dataset
from cumo_mlx.train.losses import Totals
from cumo_mlx.train.options import TrainConfig
from cumo_mlx.train.trainer import Trainer
from demo_model import demo_config, write_tokenizer


CUMO_7B_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "patch_size": 14,
                  "image_size": 336, "shortest_edge": 336, "crop_size": 336}  # fmt: skip
CUMO_7B_TEXT = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
                "head_dim": 128}  # fmt: skip


def cumo_7b_config(moe: bool, llm_layers: int, vision_layers: int) -> dict:
    config = demo_config(moe=moe)
    config.update(CUMO_7B_TEXT, num_hidden_layers=llm_layers, mm_hidden_size=1024, scales=[1, 3])
    config["vision_config"] = {**config["vision_config"], **CUMO_7B_VISION, "num_hidden_layers": vision_layers}
    return config


def write_inputs(root: Path, config: dict, count: int) -> tuple:
    """A random model of `config` and a shapes dataset of `count` images under `root`."""
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    write_tokenizer(root / "model")
    save(root / "model", model)
    write_dataset(root / "data", count, progress=False)
    return root / "model", root / "data"


def bare_time(trainer: Trainer, step: int) -> float:
    """Seconds of value_and_grad of the trainer's loss over step `step`'s micro-batches, evaluated."""
    batches, _ = trainer.data.load(step)
    totals = Totals.of(batches)
    start = time.perf_counter()
    for batch in batches:
        mx.eval(trainer.loss_fn(trainer.model, batch.as_mx(), totals))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after two warm-up ones)")
    parser.add_argument("--dense", action="store_true", help="the dense model of stages 1-2 (default: upcycled MoE)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--cumo-7b-widths", action="store_true", help="CuMo-Mistral-7B's widths, a few layers")
    parser.add_argument("--llm-layers", type=int, default=1, help="with --cumo-7b-widths")
    parser.add_argument("--vision-layers", type=int, default=2, help="with --cumo-7b-widths (the last one unused)")
    parser.add_argument("--no-compile", action="store_true", help="the update op by op")
    options = parser.parse_args()
    if options.no_compile:
        mx.disable_compile()
    moe = not options.dense
    config = cumo_7b_config(moe, options.llm_layers, options.vision_layers) if options.cumo_7b_widths else demo_config(moe)

    with tempfile.TemporaryDirectory() as folder:
        model, data = write_inputs(Path(folder), config, options.batch_size * (options.steps + 2))
        stage = "pft" if options.dense else "sft"
        config = TrainConfig(
            model=str(model), data=str(data / "instruct.json"), image_folder=str(data), output=f"{folder}/run", stage=stage,
            fine_tune_type="full", batch_size=options.batch_size, iters=options.steps + 2, save_every=options.steps + 2,
            progress=False,
        )  # fmt: skip
        trainer = Trainer(config, report=lambda message: None)
        records, bare = [], []
        for record in trainer.steps():  # each step then its bare pass: a changing load hits both alike
            records.append(record)
            bare.append(bare_time(trainer, record["step"]))
    step, bare = statistics.median(r["seconds"] for r in records[2:]), bare[2:]
    result = {
        "model": "dense" if options.dense else "moe", "stage": stage, "compiled_update": not options.no_compile,
        "widths": "cumo-7b" if options.cumo_7b_widths else "demo", "batch_size": options.batch_size,
        "steps": options.steps, "tokens_per_step": statistics.median(r["tokens"] for r in records[2:]),
        "forward_backward_s": statistics.median(bare), "step_s": step, "steps_per_second": 1 / step,
        "overhead": step / statistics.median(bare) - 1,
    }  # fmt: skip
    if options.json:
        print(json.dumps(result))
        return
    print(
        f"{result['widths']} CuMo ({result['model']}, stage {stage}), batch {options.batch_size} (~{result['tokens_per_step']:.0f} tokens): "
        f"training step {step * 1000:.0f} ms ({1 / step:.2f} steps/s), its forward+backward alone "
        f"{result['forward_backward_s'] * 1000:.0f} ms: overhead {result['overhead']:+.1%} (medians over {options.steps} steps)"
    )


if __name__ == "__main__":
    main()
