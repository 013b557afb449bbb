"""Peak memory of one CuMo-7B training step, extrapolated from shallow models at the real widths.

    python benchmarks/train_memory.py [--tokens 128] [--json results.json]

CuMo-Mistral-7B widths (Mistral-7B LLM, CLIP-L/14-336 with 4-expert top-2 MoE MLPs, 4-expert MoE
connector, S2 scales [1, 3]) with only 1-2 LLM layers and 2-3 CLIP layers, random float32 weights.
One sample: one image (576 positions) and `--tokens` text positions, every answer token supervised.
For a LoRA step (rank 64 on every LLM linear) and a full step, each with gradient checkpointing, as
the trainer does them (its loss, AdamW, float32 trainables), it reads `mx.get_peak_memory()` of
one step (Adam state allocated beforehand), each configuration in a fresh process, then extrapolates linearly
per layer to 32 LLM layers and 24 CLIP layers:

    peak(32, 24) = peak(1, 2) + 31 * [peak(2, 2) - peak(1, 2)] + 22 * [peak(1, 3) - peak(1, 2)]

Weights here are float32 (the CPU backend computes in float32); on Metal the frozen weights stay in
their stored bfloat16, so the estimate is also printed with the frozen bytes halved. On the CPU the
MoE layers are not checkpointed (see `trainer.grad_checkpoint`), on Metal they are.
"""

import argparse
import json
import subprocess
import sys

SHAPES = {(1, 2), (2, 2), (1, 3)}


def measure(llm_layers: int, clip_layers: int, mode: str, tokens: int) -> dict:
    import cumo_mlx  # noqa: F401
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten

    from cumo_mlx.config import ModelArgs
    from cumo_mlx.data import Encoded, collate
    from cumo_mlx.losses import batch_losses
    from cumo_mlx.model import Model
    from cumo_mlx.trainer import TrainConfig, configure_trainable, grad_checkpoint

    config = {
        "model_type": "llava_mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": llm_layers,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "rms_norm_eps": 1e-5,
        "rope_theta": 1e6, "mm_projector_type": "smoe_mlp", "clip_smoe": True, "num_experts": 4, "num_selected": 2,
        "scales": [1, 3], "mm_hidden_size": 1024,
        "vision_config": {"num_hidden_layers": clip_layers},
    }
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    parts = configure_trainable(model, TrainConfig(model="", data="", output="", stage="sft", fine_tune_type=mode,
                                                   lora_rank=64, lora_alpha=16, lora_dropout=0.0, lora_layers=-1).resolved())
    grad_checkpoint(model)
    model.train()
    optimizer = optim.AdamW(learning_rate=1e-5, weight_decay=0.0, bias_correction=True)
    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, 32000, 20).tolist() + [-200] + rng.integers(3, 32000, tokens - 21).tolist()
    labels = [-100] * 22 + ids[22:]
    pixels = rng.standard_normal((1, 336, 336, 3)).astype(np.float32)
    batch = collate([Encoded(ids, labels, pixels)], 576, None).as_mx()
    step = nn.value_and_grad(model, lambda m, b: batch_losses(m, b)[0])

    def one_step():
        loss, grads = step(model, batch)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(loss, model.parameters(), optimizer.state)

    optimizer.init(model.trainable_parameters())  # the optimizer state a running training holds
    mx.eval(optimizer.state)
    mx.reset_peak_memory()
    one_step()
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    return {"peak_gb": mx.get_peak_memory() / 1e9, "trainable": trainable, "parameters": total, "parts": parts}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="Text positions besides the image's 576.")
    parser.add_argument("--json", help="Write the measurements and estimates here.")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # llm_layers clip_layers mode: measure in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(int(args.one[0]), int(args.one[1]), args.one[2], args.tokens)))
        return
    results = {}
    for mode in ("lora", "full"):
        runs = {}
        for llm, clip in sorted(SHAPES):
            out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--one", str(llm), str(clip), mode],
                                 check=True, capture_output=True, text=True).stdout
            runs[(llm, clip)] = json.loads(out.strip().splitlines()[-1])
            print(f"{mode}: {llm} LLM + {clip} CLIP layers: peak {runs[(llm, clip)]['peak_gb']:.2f} GB", flush=True)
        base = runs[(1, 2)]["peak_gb"]
        per_llm = runs[(2, 2)]["peak_gb"] - base
        per_clip = runs[(1, 3)]["peak_gb"] - base
        estimate = base + 31 * per_llm + 22 * per_clip
        frozen = {k: (r["parameters"] - r["trainable"]) * 4 / 1e9 for k, r in runs.items()}
        frozen_7b = frozen[(1, 2)] + 31 * (frozen[(2, 2)] - frozen[(1, 2)]) + 22 * (frozen[(1, 3)] - frozen[(1, 2)])
        results[mode] = {
            "runs": {f"{llm}x{clip}": r for (llm, clip), r in runs.items()},
            "per_llm_layer_gb": per_llm,
            "per_clip_layer_gb": per_clip,
            "cumo_7b_peak_gb": estimate,
            "cumo_7b_peak_gb_frozen_bf16": estimate - frozen_7b / 2,
        }
        print(f"{mode}: per LLM layer {per_llm:.2f} GB, per CLIP layer {per_clip:.2f} GB -> CuMo-7B step peak "
              f"{estimate:.1f} GB (float32), {estimate - frozen_7b / 2:.1f} GB with bfloat16 frozen weights", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
